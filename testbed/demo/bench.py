"""``kgpu testbed bench crypt|raid6``: the gpu targets beside the stock ones.

One guest, the same loop devices, the same fio jobs, back to back:
gpu-crypt beside dm-crypt (sequential writes and reads at 4 KiB, 64 KiB
and 1 MiB), gpu-raid6 beside md RAID6 (sequential 1 MiB and random 4 KiB,
healthy and with one member missing). Each point runs three times. For
each run the guest records fio's bytes and seconds, the kernel's CPU time
over all CPUs (system + irq + softirq, from /proc/stat) and the helper's
own CPU time (from /proc/<pid>/stat). The host prints medians and ranges
and can write everything as JSON.

Under QEMU (TCG) every instruction is emulated, so the MB/s are not what a
real machine gives; the ratio between the targets, measured in the same
run, is the figure to read. GPU figures come from `kgpu bench ring`.
"""

import json
import os
import subprocess

import click

HELPER = r"""
CX=auto; [ "${CROSSOVER:--1}" -ge 0 ] && CX=$CROSSOVER
kgpu helper --backend cpu --crossover $CX > /tmp/helper.log 2>&1 &
echo $! > /tmp/helper.pid
for i in $(seq 1200); do grep -q "INFO: serving" /tmp/helper.log && break; sleep 0.1; done
grep -q "INFO: serving" /tmp/helper.log
"""

# point <label> <device> <bs> <rw> <MiB>: $REPS timed fio runs. Each run
# leaves fio's JSON in $KGPU_OUT/pt<N>.json and a line "N label bs rw rep
# kernel_ticks helper_ticks ticks_per_s" in $KGPU_OUT/points.txt; the host
# reads them (read_points). No Python in the guest between runs: under
# TCG its start-up alone costs more than a run. Expects HELPER (or
# nothing) before it.
POINT = r"""
HP=$(cat /tmp/helper.pid 2>/dev/null || echo 0)
PN=0
HZ=$(getconf CLK_TCK 2>/dev/null || echo 100)   # USER_HZ
kcpu() { awk '/^cpu /{print $4 + $7 + $8}' /proc/stat; }
hcpu() { if [ "$HP" != 0 ]; then awk '{print $14 + $15}' /proc/$HP/stat; else echo 0; fi; }
point() {
  local t=$1 dev=$2 bs=$3 rw=$4 mb=$5 rep k0 h0 k1 h1
  for rep in $(seq $REPS); do
    PN=$((PN + 1))
    k0=$(kcpu); h0=$(hcpu)
    fio --name=b --filename=$dev --direct=1 --ioengine=libaio \
      --iodepth=$IODEPTH --rw=$rw --bs=$bs --size=${mb}M --time_based \
      --runtime=$SECONDS_PER_RUN --output-format=json \
      --output=$KGPU_OUT/pt$PN.json > /dev/null
    k1=$(kcpu); h1=$(hcpu)
    echo "$PN $t $bs $rw $rep $((k1 - k0)) $((h1 - h0)) $HZ" >> $KGPU_OUT/points.txt
  done
}
"""


def read_points(files):
    """The runs of POINT, from the guest's files (name -> bytes): one dict
    per run with fio's bytes, seconds, IOPS, latency and error, and the
    kernel's and the helper's CPU seconds."""
    from kgpu_testbed.demo import fio

    points = []
    for line in files.get("points.txt", b"").decode().splitlines():
        f = line.split()
        if len(f) != 8:
            continue
        n, t, bs, rw, rep, k, h, hz = f
        job = fio.parse(files[f"pt{n}.json"].decode())[0]
        side = job.read if "read" in rw else job.write
        points.append(dict(
            target=t, bs=bs, rw=rw, rep=int(rep), bytes=side.io_bytes,
            seconds=side.runtime_s, iops=side.iops,
            lat_p50_us=side.lat_us.get("p50"),
            lat_p99_us=side.lat_us.get("p99"), errors=job.errors,
            kernel_cpu_s=int(k) / int(hz), helper_cpu_s=int(h) / int(hz)))
    return points


CRYPT = r"""
modprobe loop; modprobe dm_mod; modprobe dm_crypt; modprobe raid6_pq
insmod $B/kgpu.ko timeout_ms=30000
insmod $B/dm-gpu-crypt.ko
truncate -s ${SIZE_MB}M /tmp/bench.img
L=$(losetup -f --show /tmp/bench.img)
KEY=$(head -c 64 /dev/urandom | od -An -tx1 | tr -d ' \n')
S=$(( SIZE_MB * 2048 ))
""" + "{helper}" + POINT + r"""
for t in crypt gpu-crypt; do
  echo "0 $S $t aes-xts-plain64 $KEY 0 $L 0" | dmsetup create bench
  dmsetup mknodes bench
  for bs in 4k 64k 1m; do
    for rw in write read; do
      point $t /dev/mapper/bench $bs $rw $SIZE_MB
    done
  done
  dmsetup status bench > $KGPU_OUT/status-$t.txt
  dmsetup remove bench
done
kgpu status --json > $KGPU_OUT/kgpu-status.json 2>/dev/null || true
"""

# The modules, and $NDEVS loop devices of $MEMBER_MB MiB in $LOOPS.
LOOP_MEMBERS = r"""
modprobe loop; modprobe dm_mod; modprobe raid6_pq; modprobe raid456
insmod $B/kgpu.ko timeout_ms=30000
insmod $B/dm-gpu-raid6.ko
mkdir -p /tmp/r6b
LOOPS=""
for i in $(seq 0 $((NDEVS - 1))); do
  truncate -s ${MEMBER_MB}M /tmp/r6b/m$i
  LOOPS="$LOOPS $(losetup -f --show /tmp/r6b/m$i)"
done
LOOPS=${LOOPS# }
"""

RAID6 = LOOP_MEMBERS + "{helper}" + POINT + r"""
run_points() {  # run_points <label> <device> <MiB> [reads]
  local bs rw r
  for bs in 1m 4k; do
    for rw in write read; do
      if [ -n "${4:-}" ] && [ $rw = write ]; then continue; fi
      r=$rw; [ $bs = 4k ] && r=rand$rw
      point $1 $2 $bs $r $3
    done
  done
}
# md RAID6 (the kernel's raid456): healthy, then with member 1 failed
mdadm --create /dev/md0 --run --quiet --level=6 --raid-devices=$NDEVS \
  --chunk=$CHUNK_K --layout=left-symmetric --metadata=1.0 --assume-clean \
  $LOOPS > /dev/null 2>&1
MB=$(( $(blockdev --getsz /dev/md0) / 2048 ))
run_points md /dev/md0 $MB
mdadm /dev/md0 --fail $(echo $LOOPS | cut -d' ' -f2) > /dev/null 2>&1
run_points md/1-missing /dev/md0 $MB reads
mdadm --stop /dev/md0 > /dev/null 2>&1
for l in $LOOPS; do mdadm --zero-superblock $l > /dev/null 2>&1 || true; done
# gpu-raid6 on the same loop devices: healthy, then member 1 given as -
ROWS=$(( MEMBER_MB * 2048 / (CHUNK_K * 2) ))
LEN=$(( ROWS * (NDEVS - 2) * CHUNK_K * 2 ))
echo "0 $LEN gpu-raid6 left-symmetric $((CHUNK_K * 2)) $NDEVS $LOOPS" | dmsetup create b6
dmsetup mknodes b6
run_points gpu-raid6 /dev/mapper/b6 $((LEN / 2048))
dmsetup status b6 > $KGPU_OUT/status-gpu-raid6.txt
dmsetup remove b6
DEG=$(echo $LOOPS | awk '{$2 = "-"; print}')
echo "0 $LEN gpu-raid6 left-symmetric $((CHUNK_K * 2)) $NDEVS $DEG" | dmsetup create b6
dmsetup mknodes b6
run_points gpu-raid6/1-missing /dev/mapper/b6 $((LEN / 2048)) reads
dmsetup status b6 > $KGPU_OUT/status-gpu-raid6-1-missing.txt
dmsetup remove b6
kgpu status --json > $KGPU_OUT/kgpu-status.json 2>/dev/null || true
kgpu status 2>/dev/null | grep raid6 > $KGPU_OUT/status-kgpu-raid6.txt || true
# the helper's requests per batch (it says so when it stops)
if [ "$HP" != 0 ]; then
  kill -TERM $HP
  for i in $(seq 100); do kill -0 $HP 2>/dev/null || break; sleep 0.1; done
  grep -o "[0-9]* requests answered in [0-9]* batches" /tmp/helper.log \
    > $KGPU_OUT/status-helper.txt || true
fi
"""


# Background maintenance, md beside gpu-raid6 on the same members: the
# initial resync, a check, the rebuild of member 1. Each run leaves a line
# "N target op rep kernel_ticks helper_ticks ticks_per_s seconds
# member_sectors" in $KGPU_OUT/maint.txt (read_maint). md's speed limit and
# gpu-raid6's max_recovery_rate are raised so that both run flat out.
MAINT = LOOP_MEMBERS + r"""
M1=$(echo $LOOPS | cut -d' ' -f2)
""" + "{helper}" + r"""
if [ "$(cat /sys/module/kgpu/parameters/region 2>/dev/null)" = ivshmem ]; then
  # served by the host's helper through ivshmem: wait until it attaches
  for i in $(seq 600); do
    grep -q '^helper_pid: [1-9]' /sys/kernel/debug/kgpu/stats && break
    sleep 0.2
  done
  cp /sys/kernel/debug/kgpu/stats $KGPU_OUT/stats-start.txt
fi
HP=$(cat /tmp/helper.pid 2>/dev/null || echo 0)
HZ=$(getconf CLK_TCK 2>/dev/null || echo 100)   # USER_HZ
N=0
kcpu() { awk '/^cpu /{print $4 + $7 + $8}' /proc/stat; }
hcpu() { if [ "$HP" != 0 ]; then awk '{print $14 + $15}' /proc/$HP/stat; else echo 0; fi; }
now() { cut -d' ' -f1 /proc/uptime; }
T0=0; K0=0; H0=0
start() { K0=$(kcpu); H0=$(hcpu); T0=$(now); }
stop() {  # target op rep sectors
  local t1=$(now) k1=$(kcpu) h1=$(hcpu)
  N=$((N + 1))
  echo "$N $1 $2 $3 $((k1 - K0)) $((h1 - H0)) $HZ $(awk "BEGIN {print $t1 - $T0}") $4" >> $KGPU_OUT/maint.txt
}
mdwait() { while [ "$(cat /sys/block/md0/md/sync_action)" != idle ]; do sleep 0.05; done; }
grwait() { while [ "$(dmsetup status r6 | awk '{print $8}')" != idle ]; do sleep 0.05; done; }
slow() { echo $1 > /proc/sys/dev/raid/speed_limit_min; echo $1 > /proc/sys/dev/raid/speed_limit_max; }
md() { mdadm "$@" > /dev/null 2>&1; }
for rep in $(seq $REPS); do
  for l in $LOOPS; do md --zero-superblock $l; done
  # md: create held back (speed limit 1), then the initial resync flat
  # out; check; fail + re-add member 1 (rebuild)
  slow 1
  md --create /dev/md0 --run --level=6 --raid-devices=$NDEVS --chunk=$CHUNK_K \
    --layout=left-symmetric --metadata=1.2 --bitmap=none $LOOPS
  S=$(( $(cat /sys/block/md0/md/component_size) * 2 ))
  start; slow 4000000; sleep 0.1; mdwait; stop md resync $rep $S
  start; echo check > /sys/block/md0/md/sync_action; sleep 0.1; mdwait; stop md check $rep $S
  md /dev/md0 --fail $M1; md /dev/md0 --remove $M1; md --zero-superblock $M1
  start; md /dev/md0 --add $M1; sleep 0.1; mdwait; stop md rebuild $rep $S
  md --stop /dev/md0
  # gpu-raid6: an array mdadm created and stopped before any sync, opened
  # with md_superblocks (the initial resync), check, rebuild of member 1
  for l in $LOOPS; do md --zero-superblock $l; done
  slow 1
  md --create /dev/md0 --run --level=6 --raid-devices=$NDEVS --chunk=$CHUNK_K \
    --layout=left-symmetric --metadata=1.2 --bitmap=none $LOOPS
  OFF=$(cat /sys/block/md0/md/dev-*/offset | head -1)
  LEN=$(cat /sys/block/md0/size)
  md --stop /dev/md0
  slow 4000000
  T="0 $LEN gpu-raid6 left-symmetric $((CHUNK_K * 2)) $NDEVS $LOOPS"
  O="data_offset $OFF md_superblocks max_recovery_rate 4000000"
  start; dmsetup create r6 --table "$T 5 $O"; sleep 0.1; grwait; stop gpu-raid6 resync $rep $S
  start; dmsetup message r6 0 check; sleep 0.1; grwait; stop gpu-raid6 check $rep $S
  dmsetup status r6 > $KGPU_OUT/status-after-check.txt
  dmsetup suspend r6
  dmsetup load r6 --table "$T 7 $O rebuild 1"
  start; dmsetup resume r6; sleep 0.1; grwait; stop gpu-raid6 rebuild $rep $S
  dmsetup status r6 > $KGPU_OUT/status-after-rebuild.txt
  dmsetup remove r6
done
kgpu status --json > $KGPU_OUT/kgpu-status.json 2>/dev/null || true
cp /sys/kernel/debug/kgpu/stats $KGPU_OUT/stats-end.txt 2>/dev/null || true
"""


def read_maint(files, ndevs):
    """The runs of MAINT: one dict per run (target, op as rw, the bytes
    of all members' data that the operation covered, seconds, CPU)."""
    points = []
    for line in files.get("maint.txt", b"").decode().splitlines():
        f = line.split()
        if len(f) != 9:
            continue
        n, t, op, rep, k, h, hz, secs, sectors = f
        points.append(dict(
            target=t, bs="all", rw=op, rep=int(rep),
            bytes=int(sectors) * 512 * ndevs, seconds=float(secs),
            kernel_cpu_s=int(k) / int(hz), helper_cpu_s=int(h) / int(hz)))
    return points


def guest_script(body, build, no_helper, **settings):
    """The guest's script: settings as shell variables, then ``body``."""
    lines = ["set -eu", f"B={build}"]
    lines += [f"{k.upper()}={int(v)}" for k, v in sorted(settings.items())]
    return "\n".join(lines) + "\n" + body.replace(
        "{helper}", "" if no_helper else HELPER)


def summarize(points):
    """Median and range per (target, bs, rw); CPU seconds per GB."""
    from kgpu_testbed.demo.report import summarize_points
    return summarize_points(points)


def format_rows(rows):
    out = [f"{'target':<20} {'bs':>4} {'rw':<9} {'MB/s median':>11} "
           f"{'range':>15} {'kernel CPU s/GB':>15} {'helper CPU s/GB':>15}"]
    for r in rows:
        def f(v):
            return "-" if v is None else f"{v:.2f}"
        out.append(f"{r['target']:<20} {r['bs']:>4} {r['rw']:<9} "
                   f"{r['mbps_median']:>11.1f} "
                   f"{r['mbps_min']:>7.1f}-{r['mbps_max']:<7.1f} "
                   f"{f(r['kernel_cpu_s_per_gb']):>15} "
                   f"{f(r['helper_cpu_s_per_gb']):>15}")
    return "\n".join(out)


def build_modules(headers_dir, release):
    """`make modules` of this checkout for one kernel; its build folder."""
    from kgpu_testbed.harness import checkout

    repo = checkout()
    if repo is None:
        raise click.ClickException("the modules are built from a kgpu "
                                   "checkout; install with 'pip install -e .'")
    p = subprocess.run(["make", "-s", "modules", f"KDIR={headers_dir}"],
                       cwd=repo, capture_output=True, text=True)
    if p.returncode:
        raise click.ClickException(f"module build failed:\n{p.stderr}")
    return os.path.join(repo, "build", release)


def _run(kernel, body, no_helper, json_path, what, ivshmem=(), bundle=None,
         **settings):
    """Build the modules, boot, run the script, print and save the table.
    With a bundle, its own modules ($KGPU_MODULES in the guest)."""
    from kgpu_testbed import Testbed, TestbedError

    try:
        tb = Testbed(kernel=kernel, timeout=3600, ivshmem=ivshmem,
                     bundle=bundle)
    except TestbedError as e:
        raise click.ClickException(str(e)) from None
    build = ("$KGPU_MODULES" if bundle else
             build_modules(tb.kernel.headers_dir, tb.kernel.release))
    script = guest_script(body, build, no_helper, **settings)
    click.echo(f"benchmarking {what} in a {tb.kernel.release} guest "
               f"({settings['reps']} runs per point)", err=True)
    r = tb.run(script, echo=False)
    if r.rc:
        raise click.ClickException(f"the guest failed:\n{r.output[-3000:]}")
    points = (read_maint(r.files, settings["ndevs"]) if body is MAINT
              else read_points(r.files))
    rows = summarize(points)
    where = (f"QEMU TCG guest, kernel {tb.kernel.release}, "
             f"{'no helper' if no_helper else 'helper with the cpu backend'}")
    if ivshmem:
        where = (f"QEMU TCG guest, kernel {tb.kernel.release}, served by the "
                 f"host's helper through ivshmem")
    if not no_helper and settings.get("crossover", -1) >= 0:
        where += f", crossover {settings['crossover']} bytes"
    click.echo(f"# {where}")
    click.echo(format_rows(rows))
    status = {k: r.files[k].decode().strip() for k in r.files
              if k.startswith("status-")}
    for k, v in sorted(status.items()):
        click.echo(f"{k[7:-4]}: {v}")
    if json_path:
        with open(json_path, "w") as f:
            json.dump(dict(where=where, settings=settings, points=points,
                           summary=rows, status=status), f, indent=1)
    return 0


def _common(f):
    for opt in reversed([
        click.option("--kernel", default="6.12", show_default=True,
                     help="Guest kernel series or release."),
        click.option("--seconds", default=3, show_default=True,
                     help="Run time of each fio run."),
        click.option("--reps", default=3, show_default=True,
                     help="Runs per point (median and range are printed)."),
        click.option("--iodepth", default=16, show_default=True),
        click.option("--no-helper", is_flag=True,
                     help="Leave the helper out: the gpu targets on the "
                          "kernel's CPU."),
        click.option("--json", "json_path", type=click.Path(dir_okay=False),
                     help="Write every run and the summary here."),
    ]):
        f = opt(f)
    return f


@click.group("bench")
def bench():
    """Benchmarks of the kernel targets inside the testbed guest."""


@bench.command("crypt")
@_common
@click.option("--size-mb", default=128, show_default=True,
              help="Size of the loop device (in the guest's RAM).")
def bench_crypt(kernel, seconds, reps, iodepth, no_helper, json_path,
                size_mb):
    """fio on gpu-crypt (helper attached, cpu backend) and on stock crypt,
    side by side in one guest: MB/s, and kernel and helper CPU seconds per
    GB, for sequential writes and reads of 4 KiB, 64 KiB and 1 MiB.

    Under QEMU every instruction is emulated: compare the targets with each
    other, not with a real machine.
    """
    return _run(kernel, CRYPT, no_helper, json_path, "gpu-crypt and crypt",
                size_mb=size_mb, seconds_per_run=seconds, reps=reps,
                iodepth=iodepth)


@bench.command("raid6")
@_common
@click.option("--devs", default=6, show_default=True,
              help="Members (loop devices in the guest's RAM).")
@click.option("--member-mb", default=48, show_default=True)
@click.option("--chunk-k", default=64, show_default=True,
              help="Chunk size in KiB.")
@click.option("--crossover", type=int, default=-1,
              help="Bytes: the helper's crossover for every service "
                   "(requests below it stay on the kernel's CPU); default: "
                   "what the helper decides (a cpu-backend helper: 0).")
def bench_raid6(kernel, seconds, reps, iodepth, no_helper, json_path, devs,
                member_mb, chunk_k, crossover):
    """fio on gpu-raid6 (helper attached, cpu backend) and on md RAID6
    (mdadm, left-symmetric) over the same loop devices in one guest:
    sequential 1 MiB and random 4 KiB writes and reads, healthy, then
    reads with member 1 missing (md: failed; gpu-raid6: given as -).

    Under QEMU every instruction is emulated: compare the targets with each
    other, not with a real machine.
    """
    if not 4 <= devs <= 32:
        raise click.BadParameter("--devs takes 4 to 32 members")
    return _run(kernel, RAID6, no_helper, json_path, "gpu-raid6 and md RAID6",
                ndevs=devs, member_mb=member_mb, chunk_k=chunk_k,
                seconds_per_run=seconds, reps=reps, iodepth=iodepth,
                crossover=crossover)


@bench.command("raid6-maint")
@click.option("--kernel", default="6.12", show_default=True,
              help="Guest kernel series or release.")
@click.option("--reps", default=3, show_default=True,
              help="Runs of each operation (median and range are printed).")
@click.option("--no-helper", is_flag=True,
              help="Leave the helper out: gpu-raid6 on the kernel's CPU.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False),
              help="Write every run and the summary here.")
@click.option("--devs", default=6, show_default=True,
              help="Members (loop devices in the guest's RAM).")
@click.option("--member-mb", default=64, show_default=True)
@click.option("--chunk-k", default=512, show_default=True,
              help="Chunk size in KiB (mdadm's default).")
@click.option("--ivshmem", metavar="SOCKET",
              help="Serve the guest from the host's helper through ivshmem "
                   "('kgpu helper --ivshmem SOCKET' runs on the host; no "
                   "helper in the guest).")
@click.option("--bundle", type=click.Path(dir_okay=False, exists=True),
              help="Boot from this 'kgpu testbed bundle' (a GPU host "
                   "without QEMU); its modules are used.")
def bench_raid6_maint(kernel, reps, no_helper, json_path, devs, member_mb,
                      chunk_k, ivshmem, bundle):
    """Resync, check and rebuild: md RAID6 beside gpu-raid6 on the same
    loop devices in one guest, each flat out (md's speed_limit_min/max and
    gpu-raid6's max_recovery_rate raised). MB/s counts the data of all
    members that the operation covered; kernel CPU is system + irq +
    softirq over all CPUs, per GB of it.

    Under QEMU every instruction is emulated: compare the two with each
    other, not with a real machine.
    """
    if not 4 <= devs <= 32:
        raise click.BadParameter("--devs takes 4 to 32 members")
    return _run(kernel, MAINT, no_helper or bool(ivshmem), json_path,
                "resync, check and rebuild of md RAID6 and gpu-raid6",
                ivshmem=(ivshmem,) if ivshmem else (), bundle=bundle,
                ndevs=devs, member_mb=member_mb, chunk_k=chunk_k, reps=reps,
                seconds_per_run=0, iodepth=0, crossover=-1)
