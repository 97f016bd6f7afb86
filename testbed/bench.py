"""``kgpu testbed bench crypt``: gpu-crypt beside stock dm-crypt in one guest.

Same guest, same loop device, same fio jobs, back to back: sequential
writes and reads at 4 KiB, 64 KiB and 1 MiB, each point run three times.
For each run the guest records fio's bytes and seconds, the kernel's CPU
time over all CPUs (system + irq + softirq, from /proc/stat) and the
helper's own CPU time (from /proc/<pid>/stat). The host prints medians and
ranges and can write everything as JSON.

Under QEMU (TCG) every instruction is emulated, so the MB/s are not what a
real machine gives; the ratio between the two targets, measured in the same
run, is the figure to read. GPU figures come from `kgpu bench ring`.
"""

import json
import statistics

import click

GUEST = r"""
set -eu
B={build}
modprobe loop; modprobe dm_mod; modprobe dm_crypt; modprobe raid6_pq
insmod $B/kgpu.ko timeout_ms=30000
insmod $B/dm-gpu-crypt.ko
truncate -s {size_mb}M /tmp/bench.img
L=$(losetup -f --show /tmp/bench.img)
KEY=$(head -c 64 /dev/urandom | od -An -tx1 | tr -d ' \n')
S=$(( {size_mb} * 2048 ))
{helper}
HP=$(cat /tmp/helper.pid 2>/dev/null || echo 0)
kcpu() {{ awk '/^cpu /{{print $4 + $7 + $8}}' /proc/stat; }}
hcpu() {{ [ "$HP" != 0 ] && awk '{{print $14 + $15}}' /proc/$HP/stat || echo 0; }}
for t in {targets}; do
  echo "0 $S $t aes-xts-plain64 $KEY 0 $L 0" | dmsetup create bench
  dmsetup mknodes bench
  for bs in {block_sizes}; do
    for rw in write read; do
      for rep in $(seq {reps}); do
        k0=$(kcpu); h0=$(hcpu)
        fio --name=b --filename=/dev/mapper/bench --direct=1 --ioengine=libaio \
          --iodepth={iodepth} --rw=$rw --bs=$bs --size={size_mb}M --time_based \
          --runtime={seconds} --output-format=json --output=/tmp/fio.json > /dev/null
        k1=$(kcpu); h1=$(hcpu)
        python3 - "$t" "$bs" "$rw" "$rep" $((k1 - k0)) $((h1 - h0)) >> $KGPU_OUT/points.jsonl <<'EOF'
import json, os, sys
t, bs, rw, rep, k, h = sys.argv[1:]
job = json.load(open("/tmp/fio.json"))["jobs"][0]
side = job[rw]
hz = os.sysconf("SC_CLK_TCK")
print(json.dumps(dict(target=t, bs=bs, rw=rw, rep=int(rep),
                      bytes=side["io_bytes"], seconds=side["runtime"] / 1000,
                      errors=job["error"], kernel_cpu_s=int(k) / hz,
                      helper_cpu_s=int(h) / hz)))
EOF
      done
    done
  done
  dmsetup status bench > $KGPU_OUT/status-$t.txt
  dmsetup remove bench
done
kgpu status --json > $KGPU_OUT/kgpu-status.json 2>/dev/null || true
"""

HELPER = r"""
kgpu helper --backend cpu > /tmp/helper.log 2>&1 &
echo $! > /tmp/helper.pid
for i in $(seq 1200); do grep -q "INFO: serving" /tmp/helper.log && break; sleep 0.1; done
grep -q "INFO: serving" /tmp/helper.log
"""


def summarize(points):
    """Median and range per (target, bs, rw); CPU seconds per GB."""
    groups = {}
    for p in points:
        groups.setdefault((p["target"], p["bs"], p["rw"]), []).append(p)
    rows = []
    for (target, bs, rw), ps in sorted(groups.items()):
        mbps = [p["bytes"] / p["seconds"] / 1e6 for p in ps if p["seconds"]]
        gb = [p["bytes"] / 1e9 for p in ps]
        kcpu = [p["kernel_cpu_s"] / g for p, g in zip(ps, gb) if g]
        hcpu = [p["helper_cpu_s"] / g for p, g in zip(ps, gb) if g]
        rows.append(dict(
            target=target, bs=bs, rw=rw, runs=len(ps),
            errors=sum(p["errors"] for p in ps),
            mbps_median=statistics.median(mbps) if mbps else 0.0,
            mbps_min=min(mbps, default=0.0), mbps_max=max(mbps, default=0.0),
            kernel_cpu_s_per_gb=statistics.median(kcpu) if kcpu else None,
            helper_cpu_s_per_gb=statistics.median(hcpu) if hcpu else None))
    return rows


def format_rows(rows):
    out = [f"{'target':<10} {'bs':>4} {'rw':<5} {'MB/s median':>11} "
           f"{'range':>15} {'kernel CPU s/GB':>15} {'helper CPU s/GB':>15}"]
    for r in rows:
        def f(v):
            return "-" if v is None else f"{v:.2f}"
        out.append(f"{r['target']:<10} {r['bs']:>4} {r['rw']:<5} "
                   f"{r['mbps_median']:>11.1f} "
                   f"{r['mbps_min']:>7.1f}-{r['mbps_max']:<7.1f} "
                   f"{f(r['kernel_cpu_s_per_gb']):>15} "
                   f"{f(r['helper_cpu_s_per_gb']):>15}")
    return "\n".join(out)


@click.group("bench")
def bench():
    """Benchmarks of the kernel targets inside the testbed guest."""


@bench.command("crypt")
@click.option("--kernel", default="6.12", show_default=True,
              help="Guest kernel series or release.")
@click.option("--size-mb", default=128, show_default=True,
              help="Size of the loop device (in the guest's RAM).")
@click.option("--seconds", default=3, show_default=True,
              help="Run time of each fio run.")
@click.option("--reps", default=3, show_default=True,
              help="Runs per point (median and range are printed).")
@click.option("--iodepth", default=16, show_default=True)
@click.option("--no-helper", is_flag=True,
              help="Leave the helper out: gpu-crypt on the kernel's CPU.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False),
              help="Write every run and the summary here.")
def bench_crypt(kernel, size_mb, seconds, reps, iodepth, no_helper,
                json_path):
    """fio on gpu-crypt (helper attached, cpu backend) and on stock crypt,
    side by side in one guest: MB/s, and kernel and helper CPU seconds per
    GB, for sequential writes and reads of 4 KiB, 64 KiB and 1 MiB.

    Under QEMU every instruction is emulated: compare the targets with each
    other, not with a real machine.
    """
    import os
    import subprocess

    from kgpu_testbed import Testbed, TestbedError

    repo = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
    if not os.path.exists(os.path.join(repo, "Makefile")):
        raise click.ClickException("the modules are built from a kgpu "
                                   "checkout; install with 'pip install -e .'")
    try:
        tb = Testbed(kernel=kernel, timeout=3600)
    except TestbedError as e:
        raise click.ClickException(str(e)) from None
    build = subprocess.run(["make", "-s", "modules",
                            f"KDIR={tb.kernel.headers_dir}"], cwd=repo,
                           capture_output=True, text=True)
    if build.returncode:
        raise click.ClickException(f"module build failed:\n{build.stderr}")
    script = GUEST.format(
        build=os.path.join(repo, "build", tb.kernel.release),
        size_mb=size_mb, seconds=seconds, reps=reps, iodepth=iodepth,
        targets="crypt gpu-crypt", block_sizes="4k 64k 1m",
        helper="" if no_helper else HELPER)
    click.echo(f"benchmarking in a {tb.kernel.release} guest: 2 targets x "
               f"3 sizes x 2 directions x {reps} runs of {seconds} s",
               err=True)
    r = tb.run(script, echo=False)
    if r.rc:
        raise click.ClickException(f"the guest failed:\n{r.output[-3000:]}")
    points = [json.loads(x) for x in
              r.files.get("points.jsonl", b"").decode().splitlines() if x]
    rows = summarize(points)
    where = (f"QEMU TCG guest, kernel {tb.kernel.release}, "
             f"{'no helper' if no_helper else 'helper with the cpu backend'}")
    click.echo(f"# {where}")
    click.echo(format_rows(rows))
    status = {k: r.files[k].decode().strip() for k in r.files
              if k.startswith("status-")}
    for k, v in sorted(status.items()):
        click.echo(f"{k[7:-4]}: {v}")
    if json_path:
        with open(json_path, "w") as f:
            json.dump(dict(where=where, points=points, summary=rows,
                           status=status), f, indent=1)
    return 0
