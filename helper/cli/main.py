"""The one ``kgpu`` command line: helper daemon, status, benchmarks, testbed."""

import click

from kgpu_helper import __version__
from kgpu_helper.bench.services import bench
from kgpu_helper.cli.commands import helper_cmd, status
from kgpu_helper.cli.crypt import crypt
from kgpu_helper.cli.doctor import doctor
from kgpu_helper.cli.raid6 import raid6
from kgpu_helper.bench.ring import ring


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="kgpu")
def cli():
    """kgpu: GPU-offloaded dm-crypt (AES-XTS) and md-compatible RAID6.

    The kernel targets gpu-crypt and gpu-raid6 hand their arithmetic to a
    helper process that runs it on NVIDIA GPUs (or on the CPU). This command
    runs that helper, reports its state, measures it, and drives the QEMU
    testbed used to test the kernel side.
    """


bench.add_command(ring)  # next to `bench compute`
cli.add_command(bench)
cli.add_command(helper_cmd)
cli.add_command(status)
cli.add_command(crypt)
cli.add_command(raid6)
cli.add_command(doctor)


def _add_testbed():
    # The testbed is a separate package; import it here so that
    # `kgpu --help` lists it while the helper keeps no dependency on it.
    from kgpu_testbed.cli import bench_stack, demo, report, testbed

    cli.add_command(testbed)
    cli.add_command(demo)
    cli.add_command(report)
    bench.add_command(bench_stack)


_add_testbed()


def main(argv=None):
    """Entry point; returns the process exit status."""
    try:
        return cli.main(args=argv, prog_name="kgpu", standalone_mode=False) or 0
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        return 130
    except click.ClickException as e:
        e.show()
        return e.exit_code
    except click.exceptions.Exit as e:
        return e.exit_code

