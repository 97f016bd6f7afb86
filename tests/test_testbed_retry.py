"""The testbed boots a guest again when it stops before its command starts
(an early oops under TCG, a panic, a hang), and never once the command has
started. No VM: a fake QEMU plays the guest, from a plan of what each boot
does, and runs the command on the host the way the guest's init would."""

import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from kgpu_testbed.harness import vm
from kgpu_testbed.harness.kernels import Kernel

FAKE_QEMU = textwrap.dedent(r'''
    #!{python}
    """Fake qemu-system-x86_64: boot number N does plan[N-1]."""
    import os, re, subprocess, sys, time
    here = os.path.dirname(os.path.abspath(__file__))
    with open(os.path.join(here, "boots"), "a+") as f:
        f.seek(0)
        boot = len(f.read().splitlines())
        f.write("boot\n")
    what = open(os.path.join(here, "plan")).read().split()[boot]
    fsdevs = [a for a in sys.argv if a.startswith("local,id=kgpurun,")]
    rundir = re.search(r"path=([^,]+)", fsdevs[0]).group(1)
    say = lambda s: print(s.replace("\n", "\r\n"), flush=True)
    say("[    0.000000] Linux version 6.12.0-fake")
    if what == "qemu-error":
        say("qemu-system-x86_64: -kernel: could not open")
        sys.exit(1)
    if what == "hang":
        with open(os.path.join(here, "pid"), "w") as f:
            f.write(str(os.getpid()))
        time.sleep(600)
    if what == "oops":
        say("[    2.213000] Oops: int3: 0000 [#1] PREEMPT SMP NOPTI\n"
            "[    2.213100] RIP: 0010:sched_clock_cpu+0x1/0x20\n"
            "[    2.230000] Kernel panic - not syncing: Fatal exception in "
            "interrupt")
        sys.exit(0)
    say("{marker}")
    if what == "dies-after-start":
        say("[   12.000000] Kernel panic - not syncing: Attempted to kill "
            "init!")
        sys.exit(0)
    # "ok": run the command as the guest's init does, and write its status.
    out = subprocess.run(["bash", os.path.join(rundir, "cmd.sh")],
                         stdin=subprocess.DEVNULL, capture_output=True,
                         text=True)
    say(out.stdout + out.stderr)
    with open(os.path.join(rundir, "rc"), "w") as f:
        f.write(f"{{out.returncode}}\n")
    say("[   13.000000] reboot: Power down")
''').lstrip()


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """fake(plan...) -> (Testbed on the fake QEMU, log lines, boots so far)."""
    qemu = tmp_path / "qemu-system-x86_64"
    qemu.write_text(FAKE_QEMU.format(python=sys.executable,
                                     marker=vm.COMMAND_MARKER))
    qemu.chmod(0o755)
    monkeypatch.setattr(vm, "initramfs_for", lambda kernel, log=None:
                        str(tmp_path / "initrd"))
    monkeypatch.setattr(vm, "LOCK_PATH", str(tmp_path / "lock"))

    def make(*plan, boot_timeout=30):
        (tmp_path / "plan").write_text(" ".join(plan))
        log = []
        kernel = Kernel("6.12.0-fake", str(tmp_path / "vmlinuz"))
        tb = vm.Testbed(kernel=kernel, qemu=str(qemu), log=log.append,
                        timeout=60, boot_timeout=boot_timeout)

        def boots():
            path = tmp_path / "boots"
            return len(path.read_text().splitlines()) if path.exists() else 0
        return tb, log, boots
    return make


def test_init_prints_the_marker_before_the_command():
    init = open(os.path.join(os.path.dirname(vm.__file__), "init.sh")).read()
    echo = init.index(f'echo "{vm.COMMAND_MARKER}"')
    assert echo < init.index("chroot $r /bin/bash /run/kgpu/cmd.sh </dev/null")


def test_oops_before_the_command_boots_again(fake, tmp_path):
    tb, log, boots = fake("oops", "ok")
    r = tb.run("echo hello from the command; exit 5", cwd=str(tmp_path),
               echo=False)
    assert (r.rc, r.boots, boots()) == (5, 2, 2)
    assert "hello from the command" in r.output
    assert vm.COMMAND_MARKER not in r.output
    (said,) = [m for m in log if "booting again" in m]
    assert "Oops: int3" in said and "Fatal exception in interrupt" in said
    assert "(2 of 3)" in said
    assert "sched_clock_cpu" in said    # the last console lines


def test_hang_before_the_command_is_killed_and_booted_again(fake, tmp_path):
    tb, log, boots = fake("hang", "oops", "ok", boot_timeout=2)
    r = tb.run("echo third time", cwd=str(tmp_path), echo=False)
    assert (r.rc, r.boots, boots()) == (0, 3, 3)
    assert "no command after 2 s" in log[0]


def test_timeout_before_the_boot_deadline_stays_a_timeout(fake, tmp_path):
    tb, log, boots = fake("hang", "ok", boot_timeout=30)
    with pytest.raises(vm.TestbedError, match="did not finish within 2 s"):
        tb.run("true", cwd=str(tmp_path), timeout=2, echo=False)
    assert boots() == 1


def test_three_boots_at_most(fake, tmp_path):
    tb, log, boots = fake("oops", "oops", "oops", "ok")
    with pytest.raises(vm.TestbedError, match="each of 3 boots.*Oops: int3"):
        tb.run("true", cwd=str(tmp_path), echo=False)
    assert boots() == 3
    assert len([m for m in log if "booting again" in m]) == 2


def test_death_after_the_command_started_is_not_retried(fake, tmp_path):
    tb, log, boots = fake("dies-after-start", "ok")
    with pytest.raises(vm.TestbedError, match="without reporting an exit"):
        tb.run("true", cwd=str(tmp_path), echo=False)
    assert boots() == 1
    assert not [m for m in log if "booting again" in m]


def test_failed_command_is_not_retried(fake, tmp_path):
    tb, log, boots = fake("ok", "ok")
    assert tb.run("exit 1", cwd=str(tmp_path), echo=False).rc == 1
    assert boots() == 1


def test_qemu_error_is_not_retried(fake, tmp_path):
    tb, log, boots = fake("qemu-error", "ok")
    with pytest.raises(vm.TestbedError, match="could not open"):
        tb.run("true", cwd=str(tmp_path), echo=False)
    assert boots() == 1


def test_marker_is_not_echoed(fake, tmp_path, capsys):
    tb, log, boots = fake("oops", "ok")
    tb.run("echo visible", cwd=str(tmp_path), echo=True)
    out = capsys.readouterr().out
    assert "visible" in out and "Oops: int3" in out
    assert vm.COMMAND_MARKER not in out
    assert not re.search(r"reboot: Power down", out)


DRIVER = """
import sys
from kgpu_testbed.harness import vm
from kgpu_testbed.harness.kernels import Kernel
here = sys.argv[1]
vm.initramfs_for = lambda kernel, log=None: here + "/initrd"
vm.LOCK_PATH = here + "/lock"
vm.Testbed(kernel=Kernel("6.12.0-fake", here + "/vmlinuz"),
           qemu=here + "/qemu-system-x86_64").run("true", echo=False)
"""


def test_qemu_dies_with_a_killed_caller(fake, tmp_path):
    fake("hang")
    driver = subprocess.Popen([sys.executable, "-c", DRIVER, str(tmp_path)])
    pidfile = tmp_path / "pid"
    for _ in range(200):
        if pidfile.exists() and pidfile.read_text():
            break
        time.sleep(0.05)
    qemu = int(pidfile.read_text())
    driver.send_signal(signal.SIGTERM)    # no finally runs
    driver.wait()
    for _ in range(100):
        if not _alive(qemu):
            return
        time.sleep(0.05)
    os.kill(qemu, signal.SIGKILL)
    pytest.fail("QEMU outlived the process that started it")


def _alive(pid):
    """Running (a zombie that no init has reaped yet is dead)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_marker_stripped_once():
    text = f"boot\r\n{vm.COMMAND_MARKER}\r\nout\r\n{vm.COMMAND_MARKER}\r\n"
    assert vm._strip_marker(text.encode()) == \
        f"boot\nout\n{vm.COMMAND_MARKER}\n"
