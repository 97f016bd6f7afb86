"""The resident kernel faults mid-stream (test_resident_gpu.py runs this in
a child process: a GPU fault ends the CUDA context). Prints one JSON line:
what was submitted and how it was answered."""

import json
import os
import pathlib
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("CUDA_MODULE_LOADING", "EAGER")

import test_resident_gpu as t  # noqa: E402


def main(tmp):
    os.makedirs(tmp, exist_ok=True)
    s = t.ResServed(pathlib.Path(tmp), blocks=4, fault_at=40)
    d = s.d
    sent = {}     # seq -> (off, data, sector, slot, dec)
    answers = {}  # seq -> [status, ...]

    def submit(n, size=4096):
        reqs, cases = [], []
        for _ in range(n):
            k = len(sent) + len(cases)
            req, off, data = t._xts(d, size, 512, 1000 + k, k % 4,
                                    dec=k % 3 == 0)
            reqs.append(req)
            cases.append((off, data, 1000 + k, k % 4, k % 3 == 0))
        tags = d.submit(np.concatenate(reqs))
        assert len(tags) == n
        for tag, case in zip(tags.tolist(), cases):
            sent[int(d.seq_of[tag])] = case

    def collect(want, timeout=30):
        end = time.monotonic() + timeout
        n = 0
        while n < want and time.monotonic() < end:
            for c in d.wait(timeout=1).tolist():
                answers.setdefault(int(c[1]), []).append(int(c[2]))
                n += 1

    try:
        # rounds of 16 (the ring has 64 entries), one 64K spill each; the
        # kernel traps in the 40th request it takes
        for _ in range(6):
            submit(1, 65536)
            submit(15)
            collect(16)
        fault, failover = s.res.fault, s.res.failover
        # after the failover: more, served without the resident kernel
        first_after = max(sent) + 1
        submit(16)
        collect(16)
        collect(1, timeout=0.3)  # anything answered twice would come now
        wrong = 0
        for seq, (off, data, sector, slot, dec) in sent.items():
            a = answers.get(seq)
            if a and a[0] == 0 and d.view(off, len(data)).tobytes() != \
                    t._want(t.KEYS[slot], data, sector, 1, 512, False, dec):
                wrong += 1
        bad = d.bad_completions
    finally:
        s.close()
    after = [seq for seq in sent if seq >= first_after]
    print(json.dumps({
        "submitted": len(sent),
        "answered_once": sum(1 for seq in sent
                             if len(answers.get(seq, ())) == 1),
        "unknown_answers": len(set(answers) - set(sent)),
        "bad_completions": bad,
        "eio": sum(1 for a in answers.values() if a[0] != 0),
        "wrong_data": wrong, "fault": fault, "failover": failover,
        "after": len(after),
        "after_ok": sum(1 for seq in after if answers.get(seq) == [0]),
        "final": {k: v for k, v in (s.final or {}).items()
                  if k != "per_server_served"}}, default=str))


if __name__ == "__main__":
    import signal
    signal.alarm(150)  # never outlive the test's own timeout
    try:
        main(sys.argv[1])
    except BaseException:
        import traceback
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    sys.stdout.flush()
    os._exit(0)  # a faulted context makes the interpreter's exit noisy
