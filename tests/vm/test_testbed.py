"""The testbed itself: exit status, files back, the timeout kill. (The
demo job end to end is tests/vm/test_demo.py.)"""

import os
import subprocess
import threading
import time

import pytest

pytestmark = pytest.mark.vm


@pytest.fixture(scope="module")
def tb():
    from kgpu_testbed import Testbed
    return Testbed(timeout=300)


def test_status_output_and_files(tb, tmp_path):
    # The host's /tmp is the guest's too (a CI clone may live there), and
    # the command runs in the caller's directory.
    (tmp_path / "marker").write_text("host-side\n")
    r = tb.run('uname -r; cat marker; echo payload > "$KGPU_OUT/x.txt"; '
               'exit 7', cwd=str(tmp_path))
    assert r.rc == 7
    assert tb.kernel.release in r.output
    assert "host-side" in r.output
    assert r.files["x.txt"] == b"payload\n"


def _qemu_pids():
    out = subprocess.run(["pgrep", "-f", "qemu-system-x86_64"],
                         capture_output=True, text=True)
    return set(out.stdout.split())


def test_hung_guest_is_killed(tb):
    from kgpu_testbed import TestbedError

    from kgpu_testbed.harness.vm import guest_lock

    # Timed from the lock's hold, not from waiting for other guests.
    with guest_lock():
        before = _qemu_pids()
        start = time.monotonic()
        with pytest.raises(TestbedError, match="did not finish within 25 s"):
            tb.run("echo going-to-hang; sleep 100000", timeout=25)
        assert time.monotonic() - start < 60
    assert _qemu_pids() <= before, "a QEMU process outlived the call"


def _my_qemus():
    """How many QEMU processes this process has started and still runs."""
    n = 0
    for pid in os.listdir("/proc"):
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{pid}/comm") as f:
                comm = f.read().strip()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == os.getpid() and comm.startswith("qemu-system"):
            n += 1
    return n


def test_two_guests_at_once():
    # One hold of the testbed lock, two 6.12 guests running together,
    # each with its own output, files and exit status.
    from kgpu_testbed import Testbed, TestbedError
    from kgpu_testbed.harness.vm import TOGETHER_MEMORY_MB, run_together

    try:
        tb = Testbed(kernel="6.12", timeout=300)
    except TestbedError as e:
        pytest.skip(str(e))
    most, done = [0], threading.Event()

    def watch():
        while not done.wait(0.2):
            most[0] = max(most[0], _my_qemus())

    watcher = threading.Thread(target=watch)
    watcher.start()
    start = time.monotonic()
    try:
        a, b = run_together([
            (tb, 'sleep 2; uname -r; echo A > "$KGPU_OUT/who"; exit 3'),
            (tb, 'sleep 2; uname -r; echo B > "$KGPU_OUT/who"; '
                 'grep MemTotal /proc/meminfo')])
    finally:
        done.set()
        watcher.join()
    seconds = time.monotonic() - start
    print(f"two guests together: {seconds:.1f} s ({a.seconds:.1f} s and "
          f"{b.seconds:.1f} s each)")
    assert most[0] == 2, f"at most {most[0]} QEMU at a time"
    assert (a.rc, b.rc) == (3, 0)
    for r in (a, b):
        assert tb.kernel.release in r.output
    assert (a.files, b.files) == ({"who": b"A\n"}, {"who": b"B\n"})
    assert "MemTotal" not in a.output
    kib = int(b.output.split("MemTotal:")[1].split()[0])
    assert kib <= TOGETHER_MEMORY_MB * 1024
