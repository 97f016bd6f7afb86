"""Read fio's own JSON output (--output-format=json) with the standard library.

One FioJob per job of a report: per direction the bytes moved, MB/s,
IOPS and completion-latency percentiles, and the job's CPU use and error.
fio 3.x field names: ``bw_bytes`` (bytes/s), ``iops``, ``io_bytes``,
``runtime`` (ms), ``clat_ns.percentile`` (keys such as ``"99.000000"``),
``usr_cpu``/``sys_cpu`` (percent of one CPU), ``error`` (errno of the first
failure, verify failures included).
"""

import json
from dataclasses import asdict, dataclass

# Percentiles kept, as fio names them, and as we name them.
PERCENTILES = (("50.000000", "p50"), ("99.000000", "p99"),
               ("99.900000", "p99.9"))


@dataclass
class FioSide:
    """One direction (read or write) of one job."""
    io_bytes: int
    runtime_s: float
    mbps: float           # MB/s, 10^6 bytes per second
    iops: float
    lat_us: dict          # completion latency percentiles in µs


@dataclass
class FioJob:
    job: str
    read: FioSide
    write: FioSide
    usr_cpu: float        # percent of one CPU, as fio reports it
    sys_cpu: float
    errors: int           # fio's error (an errno), 0 when all went well

    @property
    def read_mbps(self):
        return self.read.mbps

    @property
    def write_mbps(self):
        return self.write.mbps

    @property
    def read_iops(self):
        return self.read.iops

    @property
    def write_iops(self):
        return self.write.iops

    def main_side(self):
        """The direction that moved more bytes (a write job's write)."""
        return self.read if self.read.io_bytes >= self.write.io_bytes \
            else self.write

    def to_dict(self):
        return asdict(self)


def _side(d):
    pct = (d.get("clat_ns") or {}).get("percentile") or {}
    lat = {ours: pct[theirs] / 1000.0 for theirs, ours in PERCENTILES
           if theirs in pct}
    return FioSide(io_bytes=int(d.get("io_bytes", 0)),
                   runtime_s=d.get("runtime", 0) / 1000.0,
                   mbps=d["bw_bytes"] / 1e6, iops=float(d["iops"]),
                   lat_us=lat)


def parse(text):
    """One FioJob per job of a fio JSON report.

    fio may print warnings before the JSON object; they are skipped.
    """
    start = text.find("{")
    if start < 0:
        raise ValueError("no JSON object in fio's output")
    try:
        report, _ = json.JSONDecoder().raw_decode(text[start:])
    except json.JSONDecodeError as e:
        raise ValueError(f"fio's JSON report does not parse: {e}") from None
    jobs = report.get("jobs")
    if not jobs:
        raise ValueError("fio's JSON report has no jobs")
    return [FioJob(job=j.get("jobname", "?"), read=_side(j["read"]),
                   write=_side(j["write"]),
                   usr_cpu=float(j.get("usr_cpu", 0.0)),
                   sys_cpu=float(j.get("sys_cpu", 0.0)),
                   errors=int(j.get("error", 0)))
            for j in jobs]
