"""Every command of the one `kgpu` CLI has a --help that explains it."""

import click
from click.testing import CliRunner

from kgpu_helper.cli.main import cli, main


def _commands(group, path=()):
    for name, cmd in group.commands.items():
        yield path + (name,), cmd
        if isinstance(cmd, click.Group):
            yield from _commands(cmd, path + (name,))


def test_every_command_has_help():
    runner = CliRunner()
    seen = []
    for path, cmd in _commands(cli):
        r = runner.invoke(cli, list(path) + ["--help"])
        assert r.exit_code == 0, (path, r.output)
        assert cmd.help and len(cmd.help.strip()) > 20, path
        assert "Usage: " in r.output
        seen.append(" ".join(path))
    for expected in ("testbed run", "testbed shell", "demo", "bench"):
        assert expected in seen


def test_main_returns_status_for_bad_usage(capsys):
    assert main(["no-such-command"]) == 2
    assert "No such command" in capsys.readouterr().err


def test_testbed_unknown_kernel_is_a_clear_error(capsys):
    rc = main(["testbed", "run", "--kernel", "2.6", "true"])
    assert rc == 1
    err = capsys.readouterr().err
    assert "2.6" in err
