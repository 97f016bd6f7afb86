"""The testbed benchmarks' guest scripts are valid bash with their settings
(no VM: the scripts are only built and parsed)."""

import subprocess

import pytest

from kgpu_testbed.demo.bench import CRYPT, RAID6, guest_script


@pytest.mark.parametrize("body, settings", [
    (CRYPT, dict(size_mb=128, seconds_per_run=3, reps=3, iodepth=16)),
    (RAID6, dict(ndevs=6, member_mb=48, chunk_k=64, seconds_per_run=3,
                 reps=3, iodepth=16)),
])
@pytest.mark.parametrize("no_helper", [False, True])
def test_guest_script(body, settings, no_helper):
    s = guest_script(body, "/build/x", no_helper, **settings)
    assert s.startswith("set -eu\nB=/build/x\n")
    for k, v in settings.items():
        assert f"\n{k.upper()}={v}\n" in s
    assert ("kgpu helper --backend cpu" in s) != no_helper
    assert "{helper}" not in s
    subprocess.run(["bash", "-n"], input=s, text=True, check=True)
