"""Read fio's own JSON output (--output-format=json) with the standard library."""

import json
from dataclasses import dataclass


@dataclass
class FioRates:
    job: str
    read_mbps: float      # MB/s (10^6 bytes per second)
    write_mbps: float
    read_iops: float
    write_iops: float
    errors: int


def parse(text):
    """One FioRates per job of a fio JSON report.

    fio may print warnings before the JSON object; they are skipped.
    """
    start = text.find("{")
    if start < 0:
        raise ValueError("no JSON object in fio's output")
    report = json.loads(text[start:])
    jobs = report.get("jobs")
    if not jobs:
        raise ValueError("fio's JSON report has no jobs")
    rates = []
    for job in jobs:
        # fio's "bw_bytes" is bytes per second.
        rates.append(FioRates(
            job=job.get("jobname", "?"),
            read_mbps=job["read"]["bw_bytes"] / 1e6,
            write_mbps=job["write"]["bw_bytes"] / 1e6,
            read_iops=job["read"]["iops"],
            write_iops=job["write"]["iops"],
            errors=int(job.get("error", 0)),
        ))
    return rates
