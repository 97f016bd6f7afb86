"""``kgpu testbed ...``, ``kgpu demo``, ``kgpu report``, ``kgpu bench stack``."""

import os
import sys

import click

from kgpu_testbed.demo.bench import bench, build_modules
from kgpu_testbed.harness.kernels import list_kernels
from kgpu_testbed.harness.vm import Testbed, TestbedError

kernel_option = click.option(
    "--kernel", "-k", default=None, metavar="6.1|6.12|RELEASE",
    help="Guest kernel: a series (6.1, 6.12) or a full release; "
         "default: the newest installed.")
memory_option = click.option(
    "--memory", "memory_mb", default=2048, show_default=True, metavar="MiB",
    help="Guest memory.")
cpus_option = click.option(
    "--cpus", default=None, type=click.IntRange(1, 64),
    help="Guest CPUs (default: host CPUs, at most 4).")
ivshmem_option = click.option(
    "--ivshmem", multiple=True, metavar="SOCKET",
    help="Give the guest an ivshmem-doorbell device served by the ivshmem "
         "server at SOCKET ('kgpu helper --ivshmem SOCKET'); repeatable.")
bundle_option = click.option(
    "--bundle", type=click.Path(dir_okay=False, exists=True), default=None,
    metavar="FILE",
    help="Run QEMU, the kernel and the guest root from this bundle (of "
         "'kgpu testbed bundle') instead of the host's; the current "
         "directory is shared at its own path.")


def _testbed(kernel, memory_mb, cpus, timeout=600, ivshmem=(), bundle=None):
    try:
        return Testbed(kernel=kernel, memory_mb=memory_mb, cpus=cpus,
                       timeout=timeout, ivshmem=ivshmem, bundle=bundle)
    except TestbedError as e:
        raise click.ClickException(str(e))


@click.group()
def testbed():
    """Boot a stock Debian kernel under QEMU and run commands in it.

    The guest shares the host's root file system read-only (over 9p, with a
    tmpfs overlay on top), so host tools, Python and freshly built modules
    are visible at the same paths. Commands run as root, in the current
    directory. Files written to $KGPU_OUT in the guest are kept only for
    the library's callers.
    """


@testbed.command("run")
@kernel_option
@memory_option
@cpus_option
@click.option("--timeout", default=600, show_default=True, metavar="SECONDS",
              help="Kill the guest if the command has not finished by then.")
@ivshmem_option
@bundle_option
@click.option("--out", "out_dir", default=None,
              type=click.Path(file_okay=False),
              help="Keep the files the command wrote to $KGPU_OUT here.")
@click.argument("command", nargs=-1, required=True)
def run_cmd(kernel, memory_mb, cpus, timeout, ivshmem, bundle, out_dir,
            command):
    """Run COMMAND (a bash command line) as root in a fresh guest.

    The guest's console is streamed here; the exit status is the command's.

    \b
    Examples:
      kgpu testbed run --kernel 6.12 'uname -r'
      kgpu testbed run --ivshmem /tmp/kgpu.sock 'ls /sys/bus/pci/devices'
      kgpu testbed run --bundle kgpu-testbed.tar.gz 'insmod $KGPU_MODULES/kgpu.ko'
    """
    tb = _testbed(kernel, memory_mb, cpus, timeout, ivshmem, bundle)
    try:
        result = tb.run(" ".join(command))
    except TestbedError as e:
        raise click.ClickException(str(e))
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        for name, data in result.files.items():
            path = os.path.join(out_dir, name)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as f:
                f.write(data)
        click.echo(f"testbed: {len(result.files)} files of $KGPU_OUT in "
                   f"{out_dir}", err=True)
    click.echo(f"testbed: exit status {result.rc} after {result.seconds:.1f} s "
               f"on {tb.kernel.release}", err=True)
    sys.exit(result.rc)


@testbed.command()
@kernel_option
@memory_option
@cpus_option
@ivshmem_option
@bundle_option
def shell(kernel, memory_mb, cpus, ivshmem, bundle):
    """An interactive root shell in a fresh guest ('exit' powers off)."""
    tb = _testbed(kernel, memory_mb, cpus, ivshmem=ivshmem, bundle=bundle)
    try:
        sys.exit(tb.shell())
    except TestbedError as e:
        raise click.ClickException(str(e))


testbed.add_command(bench)   # kgpu testbed bench crypt


@testbed.command("bundle")
@kernel_option
@click.option("--modules", "modules_dir", default=None,
              type=click.Path(file_okay=False, exists=True),
              help="Folder with kgpu.ko, dm-gpu-crypt.ko and dm-gpu-raid6.ko "
                   "for that kernel (default: build them from this checkout).")
@click.option("-o", "--output", default=None, type=click.Path(dir_okay=False),
              help="The archive (default: build/kgpu-testbed-RELEASE.tar.gz "
                   "in the checkout).")
def bundle_cmd(kernel, modules_dir, output):
    """Pack the testbed for an x86-64 host without QEMU, in one tar.gz.

    \b
    It holds QEMU with its libraries (less glibc: the host's runs it), its
    TCG module and ROMs, the guest kernel (default 6.12) and initramfs,
    kgpu's modules for it, and a guest root with the tools the guest tests
    use (fio, dmsetup, cryptsetup, mdadm, e2fsprogs, kmod, bash, busybox),
    their libraries and the kernel modules they need. No Python in the
    guest: it reads kgpu's counters from /sys/kernel/debug/kgpu. Only
    installed files are packed; the same files give the same archive.
    On the other host:
      kgpu testbed run --bundle FILE [--ivshmem SOCKET] COMMAND
    """
    import time

    from kgpu_testbed.harness import bundle as bundle_mod
    from kgpu_testbed.harness.kernels import find_kernel

    try:
        k = find_kernel(kernel or "6.12")
    except LookupError as e:
        raise click.ClickException(str(e))
    start = time.monotonic()
    if modules_dir is None:
        click.echo(f"building kgpu's modules for {k.release}", err=True)
        modules_dir = build_modules(k.headers_dir, k.release)
    out = output or bundle_mod.default_path(k.release)
    try:
        summary = bundle_mod.build(k, modules_dir, out,
                                   log=lambda m: click.echo(m, err=True))
    except bundle_mod.BundleError as e:
        raise click.ClickException(str(e))
    for part, (n, size) in summary["parts"].items():
        click.echo(f"  {part + '/':6} {n:4} files, {size / 1e6:6.1f} MB "
                   f"unpacked")
    click.echo(f"{out}: {summary['archive_bytes'] / 1e6:.1f} MB, kernel "
               f"{k.release}, built in {time.monotonic() - start:.0f} s")


@testbed.command()
def kernels():
    """List the guest kernels installed on this host."""
    found = list_kernels()
    if not found:
        raise click.ClickException("no guest kernel installed; run 'make deps'")
    for k in found:
        click.echo(f"{k.series:6} {k.release:32} {k.image}")


def _conclude(res, report_dir, progress):
    from kgpu_testbed.demo.report import write_report

    paths = write_report(res, report_dir)
    v = res["verdict"]
    click.echo("")
    click.echo(f"verdict: {v['text']}")
    for c in res.get("checks", []):
        click.echo(f"  {c['result']:4} {c['name']}: {c['detail']}")
    click.echo(f"where: {res['where']['kind']}, kernel "
               f"{res['where']['kernel']}, helper backend "
               f"{res['where']['backend']}; {res['seconds'] / 60:.1f} min")
    click.echo(f"report: {os.path.join(report_dir, 'report.md')} "
               f"({len(paths)} files)")
    if not v["ok"]:
        raise click.ClickException("the demo failed (see the report)")


@click.command()
@kernel_option
@click.option("--report-dir", default="kgpu-report", show_default=True,
              type=click.Path(file_okay=False),
              help="Where report.md, report.json and the plots go.")
@click.option("--quick", is_flag=True,
              help="Smaller files, one run per point, one block size: the "
                   "same steps in about half the time.")
@click.option("--reps", type=click.IntRange(1, 20), default=None,
              help="Runs per sweep point (default 3; --quick: 1).")
@click.option("--seconds", "seconds_per_run", type=click.IntRange(1, 60),
              default=None, help="Seconds of each sweep run (default 1).")
@click.option("--no-live", is_flag=True,
              help="Plain progress lines even on a terminal.")
def demo(kernel, report_dir, quick, reps, seconds_per_run, no_live):
    """Run the main job: the whole kgpu stack in the QEMU testbed.

    \b
    In one guest (Debian's kernel under QEMU TCG, the helper on the cpu
    backend):
      1. load kgpu.ko, dm-gpu-crypt.ko, dm-gpu-raid6.ko; start the helper
      2. stock stack: md RAID6 over 6 loop devices + dm-crypt + ext4, fio
      3. kgpu stack: gpu-raid6 over the same members + gpu-crypt + ext4, fio
      4. stock dm-crypt reads what gpu-crypt wrote (e2fsck, sha256)
      5. md assembles what gpu-raid6 wrote: parity check, reads
      6. member 2 fails under fio; reads and writes go on and verify
      7. each gpu target beside its stock twin across block sizes
    The fio suite is testbed/demo/jobs/*.fio, each with verify=crc32c.
    Ends with a verdict, and writes report.md, report.json and PNG plots
    to --report-dir. Exit status 1 when any check failed.
    """
    from kgpu_testbed.demo.run import Progress, run_in_testbed, settings_for

    settings = settings_for(quick, reps=reps,
                            seconds_per_run=seconds_per_run)
    tb = _testbed(kernel, 2048, None, timeout=1500)
    with Progress(live=False if no_live else None) as progress:
        progress.note(f"building the modules for {tb.kernel.release}")
        build = build_modules(tb.kernel.headers_dir, tb.kernel.release)
        try:
            res = run_in_testbed(tb, settings, progress, build)
        except TestbedError as e:
            raise click.ClickException(f"demo failed: {e}")
    _conclude(res, report_dir, progress)


@click.command()
@click.option("--dir", "report_dir", default="kgpu-report", show_default=True,
              type=click.Path(file_okay=False),
              help="The report directory (of kgpu demo or kgpu bench stack).")
@click.option("--gpu-results", "gpu_results", multiple=True, required=True,
              type=click.Path(exists=True, dir_okay=False),
              help="JSON from `kgpu bench compute --json` or `kgpu bench ring"
                   " --json` on a GPU host; give it once per file.")
def report(report_dir, gpu_results):
    """Add GPU figures to a report: a plot of GPU AES-XTS and RAID6
    throughput against request size, with the PCIe copy ceiling and
    openssl's figures from the same run, and what they mean.

    \b
    On the GPU host:
      kgpu bench compute --json compute.json
      kgpu bench ring --json ring.json
    Then, where the report is:
      kgpu report --gpu-results compute.json --gpu-results ring.json
    """
    from kgpu_testbed.demo.report import add_gpu_results

    try:
        res = add_gpu_results(report_dir, gpu_results)
    except (ValueError, KeyError) as e:
        raise click.ClickException(f"cannot read the GPU results: {e}")
    for x in res["gpu"]["findings"]:
        click.echo(f"- {x}")
    click.echo(f"report: {os.path.join(report_dir, 'report.md')}")


def member_refusal(dev):
    """Why ``dev`` must not be overwritten without --force, or None."""
    import subprocess

    p = subprocess.run(["blkid", "-p", "-o", "export", dev],
                       capture_output=True, text=True)
    found = dict(ln.split("=", 1) for ln in p.stdout.splitlines()
                 if "=" in ln)
    if "PTTYPE" in found:
        return f"{dev} holds a {found['PTTYPE']} partition table"
    if "TYPE" in found:
        return f"{dev} holds {found['TYPE']} ({found.get('USAGE', 'data')})"
    if p.returncode not in (0, 2):   # 2: nothing found
        return f"blkid cannot probe {dev}: {p.stderr.strip()}"
    return None


@click.command("stack")
@click.option("--members", help="Six block devices, comma-separated. "
              "EVERYTHING ON THEM IS OVERWRITTEN.")
@click.option("--loop", "loop_mb", type=click.IntRange(16), metavar="MiB",
              help="Six loop devices of this many MiB instead (in a "
                   "temporary directory).")
@click.option("--member-size", "member_mb", type=click.IntRange(16),
              default=1024, show_default=True, metavar="MiB",
              help="With --members: MiB of each member the arrays use.")
@click.option("--force", is_flag=True,
              help="Overwrite members that hold a file system or a "
                   "partition table.")
@click.option("--backend", type=click.Choice(["auto", "cupy", "cpu", "none"]),
              default="auto", show_default=True,
              help="The helper's backend (auto: the GPU when CUDA works); "
                   "none: no helper, the targets on the kernel's CPU.")
@click.option("--report-dir", default="kgpu-report", show_default=True,
              type=click.Path(file_okay=False))
@click.option("--modules", "modules_dir", type=click.Path(file_okay=False,
              exists=True), help="Folder with kgpu.ko, dm-gpu-crypt.ko and "
              "dm-gpu-raid6.ko built for the running kernel (default: build "
              "them from this checkout).")
@click.option("--quick", is_flag=True, help="As kgpu demo --quick.")
@click.option("--reps", type=click.IntRange(1, 20), default=None)
@click.option("--seconds", "seconds_per_run", type=click.IntRange(1, 60),
              default=None)
def bench_stack(members, loop_mb, member_mb, force, backend, report_dir,
                modules_dir, quick, reps, seconds_per_run):
    """kgpu demo's steps on this host, without the VM (root; needs
    device-mapper, md, fio, mdadm and the modules built for the running
    kernel by `make`).

    \b
    kgpu bench stack --loop 256
    kgpu bench stack --members /dev/sdb,/dev/sdc,/dev/sdd,/dev/sde,/dev/sdf,/dev/sdg
    """
    import platform

    from kgpu_testbed.demo.run import Progress, run_on_host, settings_for

    if bool(members) == bool(loop_mb):
        raise click.UsageError("give --members or --loop (one of them)")
    devs = []
    if members:
        devs = [d for d in members.split(",") if d]
        if len(devs) != 6 or len(set(devs)) != 6:
            raise click.BadParameter("six different devices", param_hint="--members")
        for d in devs:
            if not os.path.exists(d):
                raise click.BadParameter(f"{d} does not exist",
                                         param_hint="--members")
            why = member_refusal(d)
            if why and not force:
                raise click.ClickException(f"{why}; refusing to overwrite it "
                                           f"(give --force to do it anyway)")
    if os.geteuid() != 0:
        raise click.ClickException("kgpu bench stack needs root")
    settings = settings_for(quick, reps=reps, seconds_per_run=seconds_per_run,
                            member_mb=loop_mb or member_mb)
    mddev = next(f"/dev/md{i}" for i in range(127)
                 if not os.path.exists(f"/sys/block/md{i}"))
    if modules_dir:
        build = os.path.abspath(modules_dir)
        for m in ("kgpu.ko", "dm-gpu-crypt.ko", "dm-gpu-raid6.ko"):
            if not os.path.exists(os.path.join(build, m)):
                raise click.ClickException(f"no {m} in {build}")
    else:
        headers = f"/lib/modules/{platform.release()}/build"
        if not os.path.isdir(headers):
            raise click.ClickException(f"no kernel headers in {headers}; "
                                       f"install them or give --modules")
        build = build_modules(headers, platform.release())
    with Progress() as progress:
        res = run_on_host(settings, progress, build, devs, backend, mddev)
    _conclude(res, report_dir, progress)


