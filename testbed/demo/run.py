"""The main job: the whole kgpu stack under fio, checked by stock tools.

``kgpu demo`` runs testbed/demo/stack.sh in a QEMU guest; ``kgpu bench stack``
runs the same script on this host. The script builds gpu-raid6 over six
members, gpu-crypt on it and ext4 on that, runs the fio suite
(testbed/demo/jobs/), has stock dm-crypt and md read and check what the gpu
targets wrote, fails a member under load, and measures each gpu target
beside its stock twin across block sizes. This module assembles the
script, follows its progress lines, and turns its files into the results
that testbed/demo/report.py renders.
"""

import datetime
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
import time

from kgpu_testbed.demo import fio
from kgpu_testbed.demo.bench import POINT, read_points
from kgpu_testbed.harness.vm import collect_files

HERE = os.path.dirname(os.path.realpath(__file__))
JOBS_DIR = os.path.join(HERE, "jobs")
STACK_SH = os.path.join(HERE, "stack.sh")

FULL = dict(member_mb=40, seq_mb=32, rand4k_mb=4, rand64k_mb=16, mixed_mb=8,
            sweep_bs="4k 64k 1m", reps=3, seconds_per_run=1, iodepth=16)
QUICK = dict(member_mb=24, seq_mb=8, rand4k_mb=1, rand64k_mb=4, mixed_mb=2,
             sweep_bs="64k", reps=1, seconds_per_run=1, iodepth=16)


def settings_for(quick=False, **over):
    s = dict(QUICK if quick else FULL)
    s.update({k: v for k, v in over.items() if v is not None})
    return s


def build_script(settings, *, build_dir, work, out=None, members="",
                 backend="cpu", mddev="/dev/md0"):
    """The bash script: settings as variables, bench.POINT, stack.sh.
    Without ``out`` the results go to $KGPU_OUT (the testbed's)."""
    v = {"B": build_dir, "JOBS": JOBS_DIR, "WORK": work,
         "MEMBERS": members, "BACKEND": backend, "MDDEV": mddev,
         "SWEEP_BS": settings["sweep_bs"]}
    for k in ("member_mb", "seq_mb", "rand4k_mb", "rand64k_mb", "mixed_mb",
              "reps", "seconds_per_run", "iodepth"):
        v[k.upper()] = str(int(settings[k]))
    lines = [f"{k}={shlex.quote(str(x))}" for k, x in v.items()]
    lines.append(f"OUT={shlex.quote(out)}" if out else "OUT=$KGPU_OUT")
    lines.append("export KGPU_OUT=$OUT")
    with open(STACK_SH) as f:
        stack = f.read()
    return "\n".join(lines) + "\n" + POINT + "\n" + stack


# -- progress ---------------------------------------------------------------------

FIO_PCT = re.compile(r"\[(\d+(?:\.\d+)?)%\]")
FIO_ETA = re.compile(r"\[eta ([^\]]+)\]")
FIO_RATE = re.compile(r"\]\[((?:r|w)=[^\]]*)\]\[")


class Progress:
    """Follows the script's @@ lines and fio's status lines.

    On a terminal it keeps a live display (rich): every step with its
    state and time, the checks as they come, and the running fio job with
    its percentage, rate and ETA. Elsewhere (CI, a pipe) it prints one
    plain line per event.
    """

    def __init__(self, live=None, stream=None):
        self.stream = stream or sys.stderr
        self.live_on = self.stream.isatty() if live is None else live
        self.steps = []          # [title, state, start, end]
        self.total = 0
        self.checks = []
        self.activity = ""
        self.pct = None
        self.fio_detail = ""     # the running fio job's rate and ETA
        self.fatal = None
        self.live = None
        self.end_uptime = None   # the guest's uptime at the script's end
        self.t0 = time.monotonic()

    def __enter__(self):
        if self.live_on:
            from rich.console import Console
            from rich.live import Live
            self.live = Live(self, console=Console(file=self.stream),
                             refresh_per_second=4, transient=False)
            self.live.__enter__()
        return self

    def __exit__(self, *exc):
        if self.live:
            self.live.__exit__(*exc)

    def _say(self, text):
        if not self.live_on:
            print(f"{time.monotonic() - self.t0:5.0f} s  {text}",
                  file=self.stream, flush=True)

    def step_times(self):
        """[(title, seconds, state)] of the steps seen so far."""
        now = time.monotonic()
        return [(t, round((e or now) - s, 1), st)
                for t, st, s, e in self.steps]

    def note(self, text):
        """A host-side event (booting, building)."""
        self.activity = text
        self.pct = None
        self._say(f"demo: {text}")

    def _end_step(self, state="done"):
        if self.steps and self.steps[-1][1] == "running":
            self.steps[-1][1] = state
            self.steps[-1][3] = time.monotonic()

    def feed(self, line):
        for part in line.replace("\r", "\n").split("\n"):
            self._feed(part.strip())

    def _feed(self, line):
        if not line:
            return
        if line.startswith("@@step "):
            m = re.match(r"@@step (\d+)/(\d+) (.*)", line)
            if m:
                self._end_step()
                self.total = int(m.group(2))
                self.steps.append([m.group(3), "running", time.monotonic(),
                                   None])
                self.activity, self.pct = "", None
                self._say(f"[{m.group(1)}/{m.group(2)}] {m.group(3)}")
        elif line.startswith("@@check "):
            parts = line.split(" ", 3)
            if len(parts) >= 3:
                c = (parts[1], parts[2], parts[3] if len(parts) > 3 else "")
                self.checks.append(c)
                self._say(f"    {c[1]:4} {c[0]}: {c[2]}")
        elif line.startswith("@@fio ") or line.startswith("@@point "):
            what = line.split(" ", 1)[1]
            self.activity = ("fio " if line.startswith("@@fio") else
                             "point ") + what
            self.pct = None
            if line.startswith("@@fio"):
                self._say(f"    fio {what}")
        elif line.startswith("@@fatal "):
            self.fatal = line[8:]
            self._end_step("failed")
            self._say(f"    FATAL: {self.fatal}")
        elif line.startswith("@@end"):
            self.end_uptime = float(line.split()[1]) \
                if len(line.split()) > 1 else None
            self._end_step()
            self.activity, self.pct = "", None
        elif line.startswith("md check: "):
            m = re.search(r"(\d+(?:\.\d+)?)%", line)
            self.activity = "md parity check"
            self.pct = float(m.group(1)) if m else None
        elif line.startswith("Jobs: "):
            m = FIO_PCT.search(line)
            if m:
                self.pct = float(m.group(1))
            eta = FIO_ETA.search(line)
            rate = FIO_RATE.search(line)
            self.fio_detail = " ".join(x for x in (
                rate.group(1) if rate else "",
                f"eta {eta.group(1)}" if eta and "d:" not in eta.group(1)
                else "") if x)

    def __rich__(self):
        from rich.console import Group
        from rich.progress_bar import ProgressBar
        from rich.table import Table
        from rich.text import Text

        t = Table.grid(padding=(0, 1))
        now = time.monotonic()
        for i, (title, state, start, end) in enumerate(self.steps, 1):
            mark = {"running": "[yellow]…[/]", "done": "[green]✓[/]",
                    "failed": "[red]✗[/]"}[state]
            t.add_row(mark, f"{i}/{self.total}", title,
                      f"[dim]{(end or now) - start:5.0f} s[/]")
        parts = [Text.from_markup(f"[bold]kgpu demo[/]  "
                                  f"{now - self.t0:4.0f} s"), t]
        if self.checks:
            passed = sum(1 for c in self.checks if c[1] == "PASS")
            line = Text(f"checks: {passed} passed, "
                        f"{len(self.checks) - passed} failed")
            for c in self.checks:
                if c[1] != "PASS":
                    line.append(f"\n  FAIL {c[0]}: {c[2]}", style="red")
            parts.append(line)
        if self.activity:
            parts.append(Text(f"  {self.activity}  "
                              f"{self.fio_detail}",
                              style="cyan"))
            if self.pct is not None:
                parts.append(ProgressBar(total=100, completed=self.pct,
                                         width=50))
        return Group(*parts)


# -- results ----------------------------------------------------------------------

def collect(files, fatal=None):
    """The run's files (name -> bytes) -> the results dict (no metadata)."""
    res = {"suite": {}, "degraded": {}, "checks": [], "dm_status": {},
           "sweep": {"points": []}}
    for name, data in sorted(files.items()):
        base = os.path.basename(name)
        text = data.decode(errors="replace")
        m = re.fullmatch(r"suite-(stock|kgpu)-(.+)\.json", base)
        if m:
            res["suite"].setdefault(m.group(1), {})[m.group(2)] = {
                j.job: j.to_dict() for j in fio.parse(text)}
        elif re.fullmatch(r"degraded-.+\.json", base):
            res["degraded"][base[9:-5]] = {j.job: j.to_dict()
                                           for j in fio.parse(text)}
        elif base == "checks.txt":
            for ln in text.splitlines():
                p = ln.split(" ", 2)
                if len(p) >= 2:
                    res["checks"].append(dict(
                        name=p[0], result=p[1],
                        detail=p[2] if len(p) > 2 else ""))
        elif base.startswith("status-") and base.endswith(".txt"):
            res["dm_status"][base[7:-4]] = text.strip()
        elif base == "helper.log":
            m = re.search(r"backend (\S+) on ([^\n]*)", text)
            if m:
                res["helper_backend"] = f"{m.group(1)} ({m.group(2)})"
        elif base == "kgpu-status.json":
            try:
                res["kgpu_status"] = json.loads(text)
            except ValueError:
                pass
    res["sweep"]["points"] = read_points(files)
    if fatal:
        res["fatal"] = fatal
    return res


def host_line():
    model = "?"
    try:
        with open("/proc/cpuinfo") as f:
            for ln in f:
                if ln.startswith("model name"):
                    model = ln.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{platform.node()}, {model}, {os.cpu_count()} CPUs"


def finish(files, progress, rc, tail, *, kind, kernel, backend, settings,
           seconds):
    """The results of one run of the script: its files, what the progress
    follower saw (steps, a fatal line), and where and how it ran."""
    res = collect(files, progress.fatal)
    res["steps"] = progress.step_times()
    if rc and not progress.fatal and not res["checks"]:
        res["fatal"] = f"the stack script exited {rc}: {tail}"
    res.update(where={"kind": kind, "kernel": kernel,
                      "backend": res.get("helper_backend", backend)},
               settings=settings, seconds=round(seconds, 1),
               host=host_line(),
               date=datetime.datetime.now(datetime.timezone.utc).isoformat(
                   timespec="seconds"))
    return res


def run_in_testbed(testbed, settings, progress, build_dir, timeout=1500):
    """Run the stack script in ``testbed``; returns the results dict."""
    script = build_script(settings, build_dir=build_dir,
                          work="/tmp/kgpu-demo")
    t0 = time.monotonic()
    progress.note(f"booting {testbed.kernel.release} under QEMU (TCG)")
    r = testbed.run(script, echo=False, on_line=progress.feed,
                    timeout=timeout)
    # From the guest's boot to the script's end: the time the demo takes
    # on an idle machine (the wait for another guest's lock left out).
    seconds = progress.end_uptime or (time.monotonic() - t0)
    res = finish(r.files, progress, r.rc, r.output[-800:],
                 kind=f"QEMU TCG guest ({testbed.cpus} vCPUs, emulated)",
                 kernel=testbed.kernel.release, backend="cpu",
                 settings=settings, seconds=seconds)
    res["console_tail"] = r.output[-4000:]
    return res


def run_on_host(settings, progress, build_dir, members, backend, mddev):
    """Run the stack script on this host (root); returns the results."""
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="kgpu-stack-") as tmp:
        out = os.path.join(tmp, "out")
        script = build_script(settings, build_dir=build_dir, out=out,
                              work=os.path.join(tmp, "work"),
                              members=" ".join(members), backend=backend,
                              mddev=mddev)
        path = os.path.join(tmp, "stack.sh")
        with open(path, "w") as f:
            f.write(script)
        proc = subprocess.Popen(["bash", path], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT)
        tail = []
        for raw in proc.stdout:
            ln = raw.decode(errors="replace").rstrip("\n")
            tail = (tail + [ln])[-60:]
            progress.feed(ln)
        rc = proc.wait()
        files = collect_files(out)
    return finish(files, progress, rc, "\n".join(tail), kind="host", kernel=platform.release(),
                  backend=backend, settings=settings,
                  seconds=time.monotonic() - t0)
