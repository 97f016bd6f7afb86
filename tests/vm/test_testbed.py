"""The testbed itself: exit status, files back, the timeout kill. (The
demo job end to end is tests/vm/test_demo.py.)"""

import subprocess
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

    before = _qemu_pids()
    start = time.monotonic()
    with pytest.raises(TestbedError, match="did not finish within 25 s"):
        tb.run("echo going-to-hang; sleep 100000", timeout=25)
    assert time.monotonic() - start < 60
    assert _qemu_pids() <= before, "a QEMU process outlived the call"
