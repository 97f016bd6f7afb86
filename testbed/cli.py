"""``kgpu testbed ...`` and ``kgpu demo``: the QEMU testbed from the shell."""

import sys

import click

from kgpu_testbed.bench import bench
from kgpu_testbed.kernels import list_kernels
from kgpu_testbed.vm import Testbed, TestbedError

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


def _testbed(kernel, memory_mb, cpus, timeout=600):
    try:
        return Testbed(kernel=kernel, memory_mb=memory_mb, cpus=cpus,
                       timeout=timeout)
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
@click.argument("command", nargs=-1, required=True)
def run_cmd(kernel, memory_mb, cpus, timeout, command):
    """Run COMMAND (a bash command line) as root in a fresh guest.

    The guest's console is streamed here; the exit status is the command's.

    \b
    Example:
      kgpu testbed run --kernel 6.12 'uname -r'
    """
    tb = _testbed(kernel, memory_mb, cpus, timeout)
    try:
        result = tb.run(" ".join(command))
    except TestbedError as e:
        raise click.ClickException(str(e))
    click.echo(f"testbed: exit status {result.rc} after {result.seconds:.1f} s "
               f"on {tb.kernel.release}", err=True)
    sys.exit(result.rc)


@testbed.command()
@kernel_option
@memory_option
@cpus_option
def shell(kernel, memory_mb, cpus):
    """An interactive root shell in a fresh guest ('exit' powers off)."""
    tb = _testbed(kernel, memory_mb, cpus)
    try:
        sys.exit(tb.shell())
    except TestbedError as e:
        raise click.ClickException(str(e))


testbed.add_command(bench)   # kgpu testbed bench crypt


@testbed.command()
def kernels():
    """List the guest kernels installed on this host."""
    found = list_kernels()
    if not found:
        raise click.ClickException("no guest kernel installed; run 'make deps'")
    for k in found:
        click.echo(f"{k.series:6} {k.release:32} {k.image}")


@click.command()
@kernel_option
@click.option("--size", "size_mb", default=128, show_default=True,
              metavar="MiB", help="Size of the device fio writes and reads.")
@click.option("--bs", default="128k", show_default=True, help="fio block size.")
@click.option("--iodepth", default=16, show_default=True, help="fio queue depth.")
def demo(kernel, size_mb, bs, iodepth):
    """Run the main job: a crypt device in the testbed driven by fio.

    Builds a stock dm-crypt (aes-xts-plain64) device over a loop device in
    the guest, writes it with fio and reads it back with fio's crc32c
    verify, then prints the throughput fio measured. (The gpu-crypt and
    gpu-raid6 targets join this job as they land.)
    """
    from kgpu_testbed.demo import run_demo

    tb = _testbed(kernel, 2048, None, timeout=900)
    click.echo(f"demo: booting {tb.kernel.release} under QEMU (TCG)", err=True)
    try:
        write, read = run_demo(tb, size_mb=size_mb, bs=bs, iodepth=iodepth)
    except (TestbedError, RuntimeError, KeyError, ValueError) as e:
        raise click.ClickException(f"demo failed: {e}")
    click.echo("")
    click.echo(f"dm-crypt aes-xts-plain64, {size_mb} MiB, bs={bs}, "
               f"iodepth={iodepth}, kernel {tb.kernel.release} (QEMU TCG)")
    click.echo(f"  write: {write.write_mbps:8.1f} MB/s  {write.write_iops:8.0f} IOPS")
    click.echo(f"  read:  {read.read_mbps:8.1f} MB/s  {read.read_iops:8.0f} IOPS "
               "(crc32c verify passed)")
