"""The kgpu core in the guest, on both kernels, one boot each.

Misbehaving helpers (tests/vm/fakehelper.py) drive every failure path of
the kernel side: no helper, a helper that answers errors, one that never
answers (timeouts), one that answers garbage, and one killed with -9 with
requests in flight. In every case the self-test, which checks each result
against the kernel's own xts(aes) and raid6_pq, must pass: requests end up
on the CPU, nothing hangs, nothing is lost, nothing crashes.
"""

import re

import pytest

from conftest import build_modules, guest_results

pytestmark = pytest.mark.vm

GUEST = r"""
set -u
modprobe raid6_pq
O=$KGPU_OUT
# Bad parameters are refused, nothing is left behind.
insmod {ko} ring_entries=100 2>/dev/null && echo "bad-param accepted" >> $O/results
insmod {ko} data_mb=0 2>/dev/null && echo "bad-param accepted" >> $O/results
insmod {ko} timeout_ms=30000 ring_entries=64 data_mb=4
S=/sys/kernel/debug/kgpu/selftest
start() {{
    python3 tests/vm/fakehelper.py $1 > /tmp/h.$1 2>&1 &
    HPID=$!
    for i in $(seq 900); do
        grep -q attached /tmp/h.$1 && return 0
        sleep 0.1
    done
    echo "helper $1 did not attach:"; cat /tmp/h.$1; return 1
}}
run() {{  # run <name> <rounds>: the self-test, its status and report
    timeout -s KILL 120 sh -c "echo $2 > $S"
    echo "$1 rc=$? $(cat $S)" >> $O/results
}}
run none 5
start error;   run error 5;   kill $HPID; wait $HPID
echo 300 > /sys/module/kgpu/parameters/timeout_ms
start silent;  run silent 2;  kill -9 $HPID; wait $HPID
start garbage; run garbage 2; kill $HPID; wait $HPID
echo 5 > /sys/module/kgpu/parameters/timeout_ms 2>/dev/null && echo "bad-timeout accepted" >> $O/results
echo 60000 > /sys/module/kgpu/parameters/timeout_ms
start silent
( sleep 2; kill -9 $HPID ) &
run killed 3
wait
# One helper at a time; the next attaches once the first is gone.
start silent
python3 tests/vm/fakehelper.py probe > $O/busy 2>&1
kill -9 $HPID; wait $HPID
python3 tests/vm/fakehelper.py probe > $O/reattach 2>&1
rmmod kgpu || echo "rmmod failed" >> $O/results
dmesg > $O/dmesg.txt
"""


def boot(series, script, timeout=600):
    """Boot the testbed on kernel ``series`` and run ``script`` (a format
    string given ``ko``, the freshly built kgpu.ko) in it; returns the
    lines of $KGPU_OUT/results as a dict (first word -> the rest) and
    every file it left in $KGPU_OUT, decoded. Skips without a testbed."""
    from kgpu_testbed import Testbed, TestbedError

    try:
        tb = Testbed(kernel=series, timeout=timeout)
    except TestbedError as e:
        pytest.skip(str(e))
    ko = f"{build_modules(tb.kernel)}/kgpu.ko"
    r = tb.run(script.format(ko=ko), echo=False)
    assert r.rc == 0, r.output
    files = {k: v.decode(errors="replace") for k, v in r.files.items()}
    return guest_results(files), files


def selftest_report(results, name):
    """The self-test run ``name``: it passed; its counts as a dict."""
    line = results.get(name)
    assert line, f"no result for {name}: {results}"
    m = re.match(r"rc=(\d+) (PASS|FAIL): (\d+) rounds, (\d+) requests, "
                 r"\d+ bytes: helper (\d+), fallback (\d+), cpu-only (\d+); "
                 r"the helper's: GPU resident (\d+), GPU batched (\d+), "
                 r"its CPU (\d+)", line)
    assert m, line
    rc, verdict, rounds, reqs, helper, fallback, cpu, res, bat, hcpu = \
        m.groups()
    assert rc == "0" and verdict == "PASS", line
    out = dict(requests=int(reqs), helper=int(helper),
               fallback=int(fallback), cpu=int(cpu), resident=int(res),
               batched=int(bat), helper_cpu=int(hcpu))
    assert out["resident"] + out["batched"] + out["helper_cpu"] == \
        out["helper"], line
    return out


@pytest.fixture(scope="module", params=["6.1", "6.12"])
def guest(request):
    results, files = boot(request.param, GUEST)
    return results, files["dmesg.txt"], files


def test_no_helper_runs_everything_on_the_cpu(guest):
    r = selftest_report(guest[0], "none")
    assert r["requests"] == 5 * 16 and r["cpu"] == r["requests"]


def test_helper_errors_fall_back(guest):
    r = selftest_report(guest[0], "error")
    assert r["fallback"] == r["requests"] == 5 * 16


def test_silent_helper_times_out_to_cpu(guest):
    # The first requests time out; while the helper still owns them it
    # gets nothing new, so the rest go straight to the CPU, no waiting.
    r = selftest_report(guest[0], "silent")
    assert r["fallback"] > 0 and r["helper"] == 0
    assert r["fallback"] + r["cpu"] == r["requests"]
    assert "did not complete requests within 300 ms" in guest[1]


def test_garbage_completions_are_dropped(guest):
    r = selftest_report(guest[0], "garbage")
    assert r["fallback"] > 0 and r["helper"] == 0
    assert r["fallback"] + r["cpu"] == r["requests"]


def test_kill_9_with_requests_in_flight(guest):
    r = selftest_report(guest[0], "killed")
    assert r["requests"] == 3 * 16
    assert r["fallback"] > 0      # the ones the dead helper held
    assert re.search(r"helper \d+ detached with \d+ requests in flight",
                     guest[1])


def test_second_helper_refused_and_reattach(guest):
    files = guest[2]
    assert files["busy"].strip() == "open failed: EBUSY"
    # After all those helpers died, a new one still attaches and probes.
    assert files["reattach"].strip() == "attached"


def test_bad_parameter_refused_and_clean_unload(guest):
    results, dmesg, _ = guest
    assert "bad-param" not in results
    assert "bad-timeout" not in results
    assert "ring_entries must be a power of two" in dmesg
    assert "data_mb must be in 1..2048" in dmesg
    assert "rmmod failed" not in results
    assert "kgpu: unloaded" in dmesg
    for bad in ("BUG:", "Oops", "WARNING:", "Call Trace", "refcount_t"):
        assert bad not in dmesg, dmesg
