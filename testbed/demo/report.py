"""The demo's report: report.json, report.md and PNG plots in one directory.

``results`` is the dict that ``kgpu demo`` (or ``kgpu bench stack``)
builds; ``write_report`` renders it, ``add_gpu_results`` folds in JSON from
``kgpu bench compute --json`` and ``kgpu bench ring --json`` run on a GPU
host. Everything here reads stored results only, so it is tested without
a VM or a GPU.
"""

import json
import os
import statistics
import textwrap

REPORT_JSON = "report.json"
# Every PNG is drawn at this size (inches x dpi), so a test can check it.
FIG_INCHES = (9.0, 4.8)
FIG_DPI = 100
FIG_PIXELS = (int(FIG_INCHES[0] * FIG_DPI), int(FIG_INCHES[1] * FIG_DPI))

BS_ORDER = {"4k": 4, "16k": 16, "64k": 64, "256k": 256, "1m": 1024,
            "4m": 4096}


def _bs_kib(bs):
    return BS_ORDER.get(bs.lower(), 0)


# -- the sweep: medians and ranges per (target, bs, rw) -------------------------

def summarize_points(points):
    """Median and range of MB/s per (target, bs, rw), with CPU per GB."""
    groups = {}
    for p in points:
        groups.setdefault((p["target"], p["bs"], p["rw"]), []).append(p)
    rows = []
    for (target, bs, rw), ps in groups.items():
        mbps = [p["bytes"] / p["seconds"] / 1e6 for p in ps if p["seconds"]]
        gb = [p["bytes"] / 1e9 for p in ps]

        def med(key):
            v = [p[key] / g for p, g in zip(ps, gb) if g and key in p]
            return round(statistics.median(v), 3) if v else None
        rows.append(dict(
            target=target, bs=bs, rw=rw, runs=len(ps),
            errors=sum(p.get("errors", 0) for p in ps),
            mbps_median=round(statistics.median(mbps), 2) if mbps else 0.0,
            mbps_min=round(min(mbps, default=0.0), 2),
            mbps_max=round(max(mbps, default=0.0), 2),
            lat_p50_us=_med([p.get("lat_p50_us") for p in ps]),
            lat_p99_us=_med([p.get("lat_p99_us") for p in ps]),
            kernel_cpu_s_per_gb=med("kernel_cpu_s"),
            helper_cpu_s_per_gb=med("helper_cpu_s")))
    rows.sort(key=lambda r: (r["target"], _bs_kib(r["bs"]), r["rw"]))
    return rows


def _med(values):
    v = [x for x in values if x is not None]
    return round(statistics.median(v), 1) if v else None


# -- verdict ----------------------------------------------------------------------

def verdict(results):
    """(ok, one-line verdict) from the checks of a run."""
    checks = results.get("checks", [])
    failed = [c for c in checks if c["result"] != "PASS"]
    if results.get("fatal"):
        return False, f"FAILED: the run stopped early: {results['fatal']}"
    if not checks:
        return False, "FAILED: no check ran"
    if failed:
        return False, (f"FAILED: {len(failed)} of {len(checks)} checks "
                       f"failed ({', '.join(c['name'] for c in failed)})")
    return True, (f"PASS: all {len(checks)} checks passed: fio verify on the "
                  "whole stack, stock dm-crypt and md read what the gpu "
                  "targets wrote, md's parity check found no mismatch, and "
                  "reads and writes verified with a member dead")


def served_by(kgpu_status):
    """Per service: requests by GPU, helper CPU and kernel fallback."""
    out = []
    for s in (kgpu_status or {}).get("services", []):
        if not s.get("requests"):
            continue
        out.append(dict(service=s["name"], requests=s["requests"],
                        gpu=s.get("gpu") or 0,
                        helper_cpu=s.get("helper_cpu") or 0,
                        kernel=s.get("fallback") or 0,
                        bytes=s.get("bytes") or 0))
    return out


def served_line(kgpu_status):
    rows = served_by(kgpu_status)
    if not rows:
        return "no request reached the kgpu core"
    g = sum(r["gpu"] for r in rows)
    h = sum(r["helper_cpu"] for r in rows)
    k = sum(r["kernel"] for r in rows)
    return (f"requests served: {g} by GPU, {h} by the helper's CPU, "
            f"{k} by the kernel's CPU")


def where_line(results):
    w = results.get("where", {})
    return (f"{w.get('kind', '?')}, kernel {w.get('kernel', '?')}, helper "
            f"backend {w.get('backend', '?')}")


# -- plots ----------------------------------------------------------------------

def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _series(rows, target, rw):
    pts = sorted((r for r in rows if r["target"] == target and r["rw"] == rw),
                 key=lambda r: _bs_kib(r["bs"]))
    return ([_bs_kib(r["bs"]) for r in pts],
            [r["mbps_median"] for r in pts],
            [r["mbps_median"] - r["mbps_min"] for r in pts],
            [r["mbps_max"] - r["mbps_median"] for r in pts])


def _bs_axis(ax, kibs):
    ax.set_xscale("log", base=2)
    ticks = sorted(set(kibs))
    ax.set_xticks(ticks)
    ax.set_xticklabels([_fmt_size(k << 10) for k in ticks])
    ax.set_xlabel("block size (sequential, O_DIRECT)")
    ax.grid(True, which="major", alpha=0.3)
    ax.set_ylim(bottom=0)


def _line(ax, rows, target, rw, label, **style):
    x, y, lo, hi = _series(rows, target, rw)
    if x:
        ax.errorbar(x, y, yerr=[lo, hi], label=label, capsize=3,
                    marker="o", **style)
    return x


def _footer(fig, text):
    fig.text(0.01, 0.01, "\n".join(textwrap.wrap(text, 150)), fontsize=7,
             color="0.35", va="bottom")


def _where_footer(results):
    return (f"Measured in: {where_line(results)}; "
            f"{served_line(results.get('kgpu_status'))}; median and range "
            f"of {results.get('settings', {}).get('reps', '?')} runs per "
            f"point.")


def plot_crypt(results, path):
    plt = _plt()
    rows = results["sweep"]["summary"]
    fig, ax = plt.subplots(figsize=FIG_INCHES, dpi=FIG_DPI)
    xs = []
    for target, color in (("crypt", "tab:gray"), ("gpu-crypt", "tab:green")):
        for rw, ls in (("write", "-"), ("read", "--")):
            xs += _line(ax, rows, target, rw, f"{target} {rw}", color=color,
                        linestyle=ls)
    _bs_axis(ax, xs or [4])
    ax.set_ylabel("MB/s (higher is better)")
    ax.set_title("gpu-crypt beside stock dm-crypt (aes-xts-plain64)")
    ax.legend(fontsize=8)
    _footer(fig, _where_footer(results))
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=FIG_DPI)
    plt.close(fig)


def plot_raid6(results, path):
    plt = _plt()
    rows = results["sweep"]["summary"]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=FIG_INCHES, dpi=FIG_DPI)
    xs = []
    for target, color in (("md", "tab:gray"), ("gpu-raid6", "tab:blue")):
        for rw, ls in (("write", "-"), ("read", "--")):
            xs += _line(a1, rows, target, rw, f"{target} {rw}", color=color,
                        linestyle=ls)
        xs += _line(a2, rows, f"{target}-degraded", "read",
                    f"{target} read, 1 member dead", color=color,
                    linestyle="--")
    for ax, title in ((a1, "healthy, 6 members"),
                      (a2, "degraded: one member missing")):
        _bs_axis(ax, xs or [4])
        ax.set_ylabel("MB/s (higher is better)")
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=7)
    fig.suptitle("gpu-raid6 beside md RAID6 (left-symmetric, 64 KiB chunks)",
                 fontsize=11)
    _footer(fig, _where_footer(results))
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=FIG_DPI)
    plt.close(fig)


def plot_gpu(gpu, path):
    """GPU end-to-end throughput against request size, with the PCIe copy
    ceiling and openssl on the same host drawn as lines."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=FIG_INCHES, dpi=FIG_DPI)
    styles = {"aes-xts-256-enc": ("tab:green", "-"),
              "aes-xts-256-dec": ("tab:green", "--"),
              "raid6-gen-k8": ("tab:blue", "-"),
              "raid6-rec2-k8": ("tab:blue", "--")}
    for svc, (color, ls) in styles.items():
        pts = sorted((r["size"], r["gbps"]) for r in gpu["compute"]
                     if r["service"] == svc and r["path"] == "end_to_end")
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o",
                    color=color, linestyle=ls, label=f"GPU {svc} (end to end)")
    for svc, color in (("aes-xts-256-enc", "tab:green"),
                       ("raid6-gen-k8", "tab:blue")):
        pts = sorted((r["size"], r["gbps"]) for r in gpu["ring"]
                     if r["service"] == svc and r.get("backend") == "cupy"
                     and r.get("depth", 0) >= 32)
        if pts:
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], marker="x",
                       s=50, color=color,
                       label=f"{svc} through the ring, depth >= 32")
    ceil = gpu.get("copy_ceiling") or {}
    if ceil.get("bidir_gbps"):
        ax.axhline(ceil["bidir_gbps"], color="tab:red", linestyle=":",
                   label=f"PCIe copy ceiling, both ways at once "
                         f"({ceil['bidir_gbps']:.1f} GB/s each way)")
    o = gpu.get("openssl")
    if o:
        by = sorted((int(k), v) for k, v in o["by_size"].items())
        for which, ls, what in (("one", "-.", "1 core"),
                                ("all", ":", f"{o.get('cores')} cores")):
            pts = [(z, v[which]) for z, v in by if v.get(which)]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts],
                        color="0.3", linestyle=ls, marker=".",
                        label=f"CPU: openssl speed aes-256-xts, {what}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ticks = sorted({r["size"] for r in gpu["compute"] + gpu["ring"]})
    if ticks:
        ax.set_xticks(ticks)
        ax.set_xticklabels([_fmt_size(t).replace(" ", "\n") for t in ticks],
                           fontsize=8)
    ax.set_xlabel("request size (end to end: one call of that size at a "
                  "time, pipelined; ring: many requests in flight)")
    ax.set_ylabel("GB/s of user data")
    ax.set_title(f"GPU services on {gpu.get('device', '?')}", fontsize=10)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    _footer(fig, f"Measured on a GPU host ({gpu.get('device', '?')}, CPU "
            f"{gpu.get('host_cpu', '?')}), {gpu.get('date', '?')}, by kgpu "
            f"bench compute and kgpu bench ring.")
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=FIG_DPI)
    plt.close(fig)


# -- GPU results from a GPU host ----------------------------------------------------

def _openssl(rep):
    """openssl speed -evp aes-256-xts of a bench report
    (helper/bench/anchor.py):
    {"version", "cores", "by_size": {size: {"one": GB/s, "all": GB/s}}},
    or None when the report has none."""
    o = rep.get("openssl")
    if not isinstance(o, dict) or not o.get("results"):
        return None
    by = {}
    for r in o["results"]:
        # above 16 MiB (one XTS data unit at most) openssl fails and its
        # speed test prints nonsense; older reports still hold such rows
        if int(r["size"]) > 16 << 20:
            continue
        if r.get("one_core_gbps") or r.get("all_cores_gbps"):
            by[int(r["size"])] = {"one": r.get("one_core_gbps"),
                                  "all": r.get("all_cores_gbps")}
    if not by:
        return None
    return {"version": o.get("version", "?"), "cores": o.get("cores"),
            "by_size": by}


def _openssl_at(gpu, size, which):
    """openssl's GB/s at ``size`` (or the nearest size measured)."""
    o = gpu.get("openssl")
    if not o:
        return None
    by = {int(k): v for k, v in o["by_size"].items()}
    near = min(by, key=lambda z: abs(z - size))
    return by[near].get(which)


def gpu_section(reports):
    """One dict from several bench JSON files (compute and/or ring)."""
    gpu = {"compute": [], "ring": [], "files": []}
    for name, rep in reports:
        gpu["files"].append(name)
        if "results" not in rep:
            raise ValueError(f"{name}: not a kgpu bench JSON (no results)")
        kind = "ring" if any("depth" in r for r in rep["results"]) \
            else "compute"
        gpu[kind] += rep["results"]
        gpu.setdefault("device", rep.get("device"))
        gpu.setdefault("host_cpu", rep.get("cpu"))
        gpu.setdefault("date", rep.get("date"))
        if rep.get("copy_ceiling"):
            gpu["copy_ceiling"] = rep["copy_ceiling"]
        o = _openssl(rep)
        if o and (not gpu.get("openssl") or
                  len(o["by_size"]) > len(gpu["openssl"]["by_size"])):
            gpu["openssl"] = o
    gpu["findings"] = gpu_findings(gpu)
    return gpu


def gpu_findings(gpu):
    """Plain sentences, from the numbers: where the GPU wins, where the
    CPU does."""
    out = []
    e2e = [r for r in gpu["compute"] if r["service"] == "aes-xts-256-enc"
           and r["path"] == "end_to_end"]
    if e2e:
        xts = max(e2e, key=lambda r: r["gbps"])
        s = (f"Bulk AES-256-XTS: the GPU reaches {xts['gbps']:.1f} GB/s end "
             f"to end at {_fmt_size(xts['size'])} requests")
        o = gpu.get("openssl")
        if o:
            by = {int(k): v for k, v in o["by_size"].items()}
            best_all = max((v["all"] or 0, z) for z, v in by.items())
            best_one = max((v["one"] or 0, z) for z, v in by.items())
            ratio = xts["gbps"] / best_all[0] if best_all[0] else 0
            verdict = ("about even with" if 0.9 <= ratio <= 1.1 else
                       "ahead of" if ratio > 1.1 else "behind")
            s += (f"; openssl on the same host peaks at {best_all[0]:.1f} "
                  f"GB/s on all {o.get('cores')} cores ({_fmt_size(best_all[1])}"
                  f" buffers) and {best_one[0]:.2f} on one, so one GPU is "
                  f"{verdict} the whole CPU and does the work of about "
                  f"{xts['gbps'] / best_one[0]:.0f} cores")
        else:
            s += " (these results hold no openssl figure to compare with)"
        out.append(s + ".")
        ceil = gpu.get("copy_ceiling") or {}
        if ceil.get("bidir_gbps"):
            out.append(f"That is {100 * xts['gbps'] / ceil['bidir_gbps']:.0f}"
                       f" % of the PCIe copy ceiling of the same run "
                       f"({ceil['bidir_gbps']:.1f} GB/s each way with both "
                       f"ways busy): the link bounds it, not the GPU.")
        small = sorted((r for r in e2e if r["size"] <= 65536),
                       key=lambda r: r["size"])
        for r in small[:1]:
            one = _openssl_at(gpu, r["size"], "one")
            if one:
                out.append(
                    f"Small requests: one {_fmt_size(r['size'])} call at a "
                    f"time gives {r['gbps']:.2f} GB/s on the GPU path against"
                    f" {one:.2f} for one "
                    f"CPU core with openssl: "
                    f"{'the CPU wins there' if one > r['gbps'] else 'the GPU still wins'}"
                    f", so below the helper's crossover requests stay on the"
                    f" kernel's CPU.")
    ring = [r for r in gpu["ring"] if r.get("backend") == "cupy"
            and r.get("service", "").startswith("aes-xts")]
    for r in ring:
        if r["size"] == 4096 and r.get("depth") == 1 and r.get("p50_us"):
            one = _openssl_at(gpu, 4096, "one")
            s = (f"Latency: one 4 KiB XTS request through the ring takes "
                 f"{r['p50_us']:.1f} µs (p50, depth 1)")
            if one:
                s += (f"; one CPU core encrypts 4 KiB in "
                      f"{4096 / (one * 1e9) * 1e6:.1f} µs")
            out.append(s + ".")
            break
    cpu = [r for r in ring if r.get("helper_cpu_s_per_gb")
           and r["size"] >= 1 << 20]
    if cpu:
        r = max(cpu, key=lambda r: (r["size"], r.get("depth", 0)))
        one = _openssl_at(gpu, r["size"], "one")
        s = (f"CPU freed: at {_fmt_size(r['size'])} depth {r.get('depth')} "
             f"the helper spends {r['helper_cpu_s_per_gb']:.3f} CPU s per GB")
        if one:
            s += (f", where doing the AES on one core costs {1 / one:.3f} s "
                  f"per GB")
        out.append(s + ".")
    return out


def _fmt_size(n):
    for unit, div in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= div and n % div == 0:
            return f"{n // div} {unit}"
    return f"{n} B"


def add_gpu_results(outdir, files):
    """Fold bench JSON files into the report in ``outdir`` and re-render."""
    path = os.path.join(outdir, REPORT_JSON)
    if os.path.exists(path):
        with open(path) as f:
            results = json.load(f)
    else:
        results = {}
    reports = []
    for name in files:
        with open(name) as f:
            reports.append((os.path.basename(name), json.load(f)))
    results["gpu"] = gpu_section(reports)
    write_report(results, outdir)
    return results


# -- report.md ------------------------------------------------------------------------

def _f(v, fmt="{:.1f}"):
    return "-" if v is None else fmt.format(v)


def _suite_rows(results):
    suite = results.get("suite", {})
    rows = []
    jobs = sorted({j for label in suite.values() for j in label})
    for job in jobs:
        for phase in sorted({p for label in suite.values()
                             for p in label.get(job, {})}):
            cells = {}
            for label in ("stock", "kgpu"):
                fj = suite.get(label, {}).get(job, {}).get(phase)
                cells[label] = fj
            rows.append((job, phase, cells))
    return rows


def _side_cells(fj):
    if not fj:
        return ["-"] * 5
    side = fj["read"] if fj["read"]["io_bytes"] >= fj["write"]["io_bytes"] \
        else fj["write"]
    lat = side.get("lat_us", {})
    return [f"{side['mbps']:.1f}", f"{side['iops']:.0f}",
            f"{_f(lat.get('p50'), '{:.0f}')} / {_f(lat.get('p99'), '{:.0f}')}"
            f" / {_f(lat.get('p99.9'), '{:.0f}')}",
            f"{fj['usr_cpu']:.0f} / {fj['sys_cpu']:.0f}",
            "ok" if fj["errors"] == 0 else f"error {fj['errors']}"]


def render_md(results):
    ok, text = verdict(results) if "checks" in results else (None, None)
    s = results.get("settings", {})
    md = ["# kgpu report", ""]
    if "where" in results:
        md += [f"Measured in: {where_line(results)}.",
               f"Date: {results.get('date', '?')}. Run time: "
               f"{results.get('seconds', 0) / 60:.1f} min"
               f"{' (from the guest boot)' if 'QEMU' in results['where'].get('kind', '') else ''}. Host: "
               f"{results.get('host', '?')}.", ""]
        if results["where"].get("kind", "").startswith("QEMU"):
            md += ["Inside the QEMU guest every instruction is emulated "
                   "(TCG) and the helper runs on the guest's CPU: the MB/s "
                   "below compare each gpu target with its stock twin in "
                   "the same run, not with a real machine. GPU figures come "
                   "from `kgpu bench compute` and `kgpu bench ring` on a GPU "
                   "host (section at the end, when added with `kgpu report "
                   "--gpu-results`).", ""]
    if text:
        md += ["## Verdict", "", f"**{text}**", ""]
        md += ["| check | result | detail |", "| --- | --- | --- |"]
        md += [f"| {c['name']} | {c['result']} | {c['detail']} |"
               for c in results.get("checks", [])]
        md += [""]
    if results.get("steps"):
        md += ["## Steps", "", "| step | seconds | state |",
               "| --- | ---: | --- |"]
        md += [f"| {t} | {sec:.0f} | {st} |" for t, sec, st in
               results["steps"]]
        md += [""]
    if results.get("suite"):
        md += ["## fio suite on the whole stack", "",
               "ext4 on crypt on RAID6 over 6 members: stock = dm-crypt on "
               "md RAID6, kgpu = gpu-crypt on gpu-raid6. Job files: "
               "`testbed/demo/jobs/`; every phase ends with fio's crc32c "
               "verify. Latency is fio's completion latency; CPU is fio's own "
               "(user / system % of one CPU).", "",
               "| job | phase | stock MB/s | kgpu MB/s | stock IOPS | kgpu "
               "IOPS | stock lat p50/p99/p99.9 µs | kgpu lat p50/p99/p99.9 "
               "µs | stock CPU usr/sys | kgpu CPU usr/sys | stock | kgpu |",
               "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
               "| ---: | --- | --- |"]
        for job, phase, cells in _suite_rows(results):
            a, b = _side_cells(cells["stock"]), _side_cells(cells["kgpu"])
            md.append(f"| {job} | {phase} | {a[0]} | {b[0]} | {a[1]} | "
                      f"{b[1]} | {a[2]} | {b[2]} | {a[3]} | {b[3]} | {a[4]} "
                      f"| {b[4]} |")
        md += [""]
    sweep = results.get("sweep", {}).get("summary")
    if sweep:
        md += ["## Throughput against block size", "",
               f"Sequential O_DIRECT fio at iodepth {s.get('iodepth', '?')}, "
               f"{s.get('reps', '?')} runs of {s.get('seconds_per_run', '?')}"
               " s per point; kernel CPU is system + irq + softirq time of "
               "all CPUs, helper CPU the helper process's own.", "",
               "![gpu-crypt beside dm-crypt](crypt.png)", "",
               "![gpu-raid6 beside md RAID6](raid6.png)", "",
               "| target | bs | rw | MB/s median | range | p50 µs | p99 µs "
               "| kernel CPU s/GB | helper CPU s/GB |",
               "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for r in sweep:
            md.append(f"| {r['target']} | {r['bs']} | {r['rw']} | "
                      f"{r['mbps_median']:.1f} | {r['mbps_min']:.1f} - "
                      f"{r['mbps_max']:.1f} | {_f(r['lat_p50_us'], '{:.0f}')}"
                      f" | {_f(r['lat_p99_us'], '{:.0f}')} | "
                      f"{_f(r['kernel_cpu_s_per_gb'], '{:.2f}')} | "
                      f"{_f(r['helper_cpu_s_per_gb'], '{:.2f}')} |")
        md += [""]
    served = served_by(results.get("kgpu_status"))
    if served:
        md += ["## Who served the requests", "",
               "From `kgpu status` at the end of the run (all steps "
               "together).", "",
               "| service | requests | GPU | helper CPU | kernel CPU | MiB |",
               "| --- | ---: | ---: | ---: | ---: | ---: |"]
        md += [f"| {r['service']} | {r['requests']} | {r['gpu']} | "
               f"{r['helper_cpu']} | {r['kernel']} | {r['bytes'] >> 20} |"
               for r in served]
        md += [""]
    if results.get("dm_status"):
        md += ["## dmsetup status", "", "```"]
        md += [f"{k}: {v}" for k, v in sorted(results["dm_status"].items())]
        md += ["```", ""]
    gpu = results.get("gpu")
    if gpu:
        md += ["## GPU figures", "",
               f"From {', '.join(gpu['files'])}: {gpu.get('device', '?')}, "
               f"host CPU {gpu.get('host_cpu', '?')}, {gpu.get('date', '?')}."
               " Measured with `kgpu bench compute` (end to end: pinned host "
               "memory to the GPU and back) and `kgpu bench ring` (through "
               "the ring, with a user-space stand-in for the kernel).", "",
               "![GPU throughput against request size](gpu.png)", ""]
        md += [f"- {x}" for x in gpu["findings"]]
        md += [""]
    return "\n".join(md) + "\n"


def write_report(results, outdir):
    """report.json, report.md and the plots the results allow; returns the
    paths written."""
    os.makedirs(outdir, exist_ok=True)
    written = []
    sweep = results.get("sweep", {})
    if sweep.get("points") and not sweep.get("summary"):
        sweep["summary"] = summarize_points(sweep["points"])
    if "checks" in results:
        ok, text = verdict(results)
        results["verdict"] = {"ok": ok, "text": text}
    if sweep.get("summary"):
        for name, fn in (("crypt.png", plot_crypt), ("raid6.png", plot_raid6)):
            p = os.path.join(outdir, name)
            fn(results, p)
            written.append(p)
    if results.get("gpu"):
        p = os.path.join(outdir, "gpu.png")
        plot_gpu(results["gpu"], p)
        written.append(p)
    p = os.path.join(outdir, REPORT_JSON)
    with open(p, "w") as f:
        json.dump(results, f, indent=1)
    written.append(p)
    p = os.path.join(outdir, "report.md")
    with open(p, "w") as f:
        f.write(render_md(results))
    written.append(p)
    return written
