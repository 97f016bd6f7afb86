"""The demo's pieces that need no VM: fio job files, fio's JSON, the
progress follower, the results and the report with its plots."""

import glob
import json
import os
import shutil
import subprocess

import pytest
from click.testing import CliRunner

from kgpu_testbed.demo import fio, report
from kgpu_testbed.demo import run as demo

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(HERE, "data")
JOB_FILES = sorted(glob.glob(os.path.join(demo.JOBS_DIR, "*.fio")))


def test_the_suite_is_there():
    names = {os.path.basename(p) for p in JOB_FILES}
    assert {"seq-1m.fio", "rand-4k.fio", "rand-64k.fio", "mixed.fio"} <= names


@pytest.mark.parametrize("path", JOB_FILES, ids=os.path.basename)
def test_job_file_parses_and_verifies(path):
    if not shutil.which("fio"):
        pytest.skip("fio not installed")
    env = dict(os.environ, FILENAME="/dev/null")
    p = subprocess.run(["fio", "--parse-only", path], env=env,
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    text = open(path).read()
    assert "verify=crc32c" in text and "filename=${FILENAME}" in text


def test_job_file_without_filename_is_refused():
    if not shutil.which("fio"):
        pytest.skip("fio not installed")
    env = {k: v for k, v in os.environ.items() if k != "FILENAME"}
    p = subprocess.run(["fio", "--parse-only", JOB_FILES[0]], env=env,
                       capture_output=True, text=True)
    assert p.returncode != 0


def test_fio_json_from_a_real_run():
    jobs = fio.parse(open(os.path.join(DATA, "fio-rand-4k.json")).read())
    assert [j.job for j in jobs] == ["rand-4k-write", "rand-4k-read"]
    w, r = jobs
    assert w.main_side() is w.write and r.main_side() is r.read
    assert w.write.io_bytes == r.read.io_bytes == 4 << 20
    raw = json.load(open(os.path.join(DATA, "fio-rand-4k.json")))
    assert r.read.mbps == pytest.approx(
        raw["jobs"][1]["read"]["bw_bytes"] / 1e6)
    assert r.read.iops == pytest.approx(r.read.mbps * 1e6 / 4096, rel=0.01)
    assert set(r.read.lat_us) == {"p50", "p99", "p99.9"}
    assert r.read.lat_us["p50"] <= r.read.lat_us["p99"] <= \
        r.read.lat_us["p99.9"]
    assert w.errors == r.errors == 0
    assert w.read.io_bytes == 0 and w.read.lat_us == {}


def test_fio_json_errors_and_garbage():
    with pytest.raises(ValueError):
        fio.parse("no json here")
    with pytest.raises(ValueError):
        fio.parse('{"jobs": []}')
    with pytest.raises(ValueError):
        fio.parse('{"jobs": [')
    text = open(os.path.join(DATA, "fio-rand-4k.json")).read()
    d = json.loads(text)
    d["jobs"][1]["error"] = 84
    jobs = fio.parse("fio: a warning first\n" + json.dumps(d))
    assert jobs[1].errors == 84


def test_progress_follows_steps_checks_and_fio():
    lines = []

    class S:
        def isatty(self):
            return False

        def write(self, t):
            lines.append(t)

        def flush(self):
            pass
    p = demo.Progress(live=False, stream=S())
    p.feed("some boot noise")
    p.feed("@@step 1/7 load the modules")
    p.feed("@@fio kgpu seq-1m 32 MiB")
    p.feed("Jobs: 1 (f=1): [W(1)][12.5%][w=2048KiB/s][w=2 IOPS][eta 00m:05s]"
           "\rJobs: 1 (f=1): [W(1)][37.5%][w=2050KiB/s][w=2 IOPS]"
           "[eta 00m:03s]")
    assert p.pct == 37.5 and "eta 00m:03s" in p.fio_detail
    p.feed("@@check fio-verify-kgpu-seq-1m PASS seq-1m on kgpu")
    p.feed("@@step 2/7 next")
    p.feed("@@check md-parity-check FAIL mismatch_cnt=8")
    p.feed("@@fatal mdadm --assemble")
    assert [s[1] for s in p.steps] == ["done", "failed"]
    assert p.checks[1] == ("md-parity-check", "FAIL", "mismatch_cnt=8")
    assert p.fatal == "mdadm --assemble"
    out = "".join(lines)
    assert "[1/7] load the modules" in out and "FATAL" in out


def test_progress_renders_live():
    from rich.console import Console

    p = demo.Progress(live=False)
    p.feed("@@step 1/2 one")
    p.feed("@@fio kgpu seq-1m 8 MiB")
    p.feed("Jobs: 1 (f=1): [R(1)][50.0%][r=1MiB/s][r=1 IOPS][eta 00m:01s]")
    p.feed("@@check x FAIL broken")
    c = Console(record=True, width=100)
    c.print(p)
    text = c.export_text()
    assert "1/2" in text and "FAIL x" in text and "seq-1m" in text


def _results():
    with open(os.path.join(DATA, "demo-results.json")) as f:
        return json.load(f)


def test_collect_reads_the_scripts_files():
    fio_text = open(os.path.join(DATA, "fio-rand-4k.json"), "rb").read()
    files = {
        "suite-kgpu-rand-4k.json": fio_text,
        "suite-stock-rand-4k.json": fio_text,
        "degraded-read.json": fio_text,
        "checks.txt": b"a PASS one two\nb FAIL three\n",
        "status-kgpu-r6.txt": b"0 100 gpu-raid6 raid6_ls 6 AAAAAA 16/16 idle 0 0 - 1 2 3 4 5\n",
        "points.txt": b"1 md 4k randread 1 50 7 100\n",
        "pt1.json": fio_text,
        "kgpu-status.json": b'{"services": []}',
        "helper.log": b"INFO: attached ...; backend cpu on Some CPU\n",
    }
    res = demo.collect(files)
    assert set(res["suite"]) == {"kgpu", "stock"}
    assert res["suite"]["kgpu"]["rand-4k"]["rand-4k-read"]["read"]["io_bytes"] \
        == 4 << 20
    assert res["checks"][1] == {"name": "b", "result": "FAIL",
                                "detail": "three"}
    assert res["dm_status"]["kgpu-r6"].startswith("0 100 gpu-raid6")
    assert res["helper_backend"] == "cpu (Some CPU)"
    (pt,) = res["sweep"]["points"]
    assert pt["target"] == "md" and pt["rw"] == "randread"
    assert pt["kernel_cpu_s"] == 0.5 and pt["helper_cpu_s"] == 0.07
    # the point's fio JSON holds two jobs; the first, the write, is read
    assert pt["bytes"] == 0
    ok, text = report.verdict(res)
    assert not ok and "b" in text


def test_verdict():
    res = _results()
    ok, text = report.verdict(res)
    assert ok and text.startswith("PASS")
    res["checks"][0]["result"] = "FAIL"
    ok, text = report.verdict(res)
    assert not ok and res["checks"][0]["name"] in text
    assert not report.verdict({"checks": []})[0]
    assert not report.verdict({"checks": [], "fatal": "x"})[0]


def _check_png(path):
    from PIL import Image

    with Image.open(path) as im:
        assert im.format == "PNG"
        assert im.size == report.FIG_PIXELS
        colors = im.convert("RGB").getcolors(maxcolors=1 << 20)
        # a plot, not a blank canvas: many colours, white not everything
        assert colors is None or len(colors) > 50


def test_report_from_stored_results(tmp_path):
    res = _results()
    paths = report.write_report(res, str(tmp_path))
    names = {os.path.basename(p) for p in paths}
    assert names == {"crypt.png", "raid6.png", "report.json", "report.md"}
    for n in ("crypt.png", "raid6.png"):
        _check_png(tmp_path / n)
    md = (tmp_path / "report.md").read_text()
    assert "**PASS" in md and "![gpu-crypt beside dm-crypt](crypt.png)" in md
    assert res["where"]["kernel"] in md
    # every sweep row and every suite job is in the markdown
    for r in res["sweep"]["summary"]:
        assert f"| {r['target']} | {r['bs']} | {r['rw']} |" in md
    for job in res["suite"]["kgpu"]:
        assert f"| {job} |" in md
    back = json.loads((tmp_path / "report.json").read_text())
    assert back["verdict"]["ok"] is True


def test_summarize_points_median_and_range():
    pts = [dict(target="t", bs="4k", rw="read", bytes=b, seconds=1.0,
                kernel_cpu_s=0.5, helper_cpu_s=0.0, lat_p50_us=10)
           for b in (1e6, 3e6, 2e6)]
    (row,) = report.summarize_points(pts)
    assert row["mbps_median"] == 2.0 and row["mbps_min"] == 1.0 \
        and row["mbps_max"] == 3.0 and row["runs"] == 3
    assert row["kernel_cpu_s_per_gb"] == pytest.approx(250.0)


def test_cli_bench_stack_refuses_bad_members(tmp_path):
    from kgpu_helper.cli.main import cli

    r = CliRunner().invoke(cli, ["bench", "stack"])
    assert r.exit_code != 0 and "--members or --loop" in r.output
    r = CliRunner().invoke(cli, ["bench", "stack", "--members", "/a,/b"])
    assert r.exit_code != 0 and "six different devices" in r.output


@pytest.mark.skipif(not shutil.which("mkfs.ext4") or not shutil.which("blkid"),
                    reason="needs e2fsprogs and blkid")
def test_member_with_a_file_system_or_partitions_is_refused(tmp_path):
    from kgpu_testbed.cli import member_refusal

    blank = tmp_path / "blank"
    blank.write_bytes(b"\0" * (8 << 20))
    assert member_refusal(str(blank)) is None
    fs = tmp_path / "fs"
    fs.write_bytes(b"\0" * (8 << 20))
    subprocess.run(["mkfs.ext4", "-q", "-F", str(fs)], check=True)
    assert "ext4" in member_refusal(str(fs))
    if shutil.which("sfdisk"):
        pt = tmp_path / "pt"
        pt.write_bytes(b"\0" * (8 << 20))
        subprocess.run(["sfdisk", "-q", str(pt)], input="label: gpt\n,\n",
                       text=True, check=True, capture_output=True)
        assert "partition table" in member_refusal(str(pt))


def _gpu_files():
    return [os.path.join(DATA, "gpu-compute-h200.json"),
            os.path.join(DATA, "gpu-ring-h200.json")]


def test_gpu_results_join_the_report(tmp_path):
    """kgpu report --gpu-results with JSON stored from an H200 run."""
    from kgpu_helper.cli.main import cli

    report.write_report(_results(), str(tmp_path))
    args = ["report", "--dir", str(tmp_path)]
    for f in _gpu_files():
        args += ["--gpu-results", f]
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0, r.output
    _check_png(tmp_path / "gpu.png")
    res = json.loads((tmp_path / "report.json").read_text())
    gpu = res["gpu"]
    assert gpu["device"] == "NVIDIA H200"
    assert gpu["copy_ceiling"]["bidir_gbps"] > 0
    # the openssl rows past one XTS data unit (16 MiB) are nonsense, out
    assert max(gpu["openssl"]["by_size"], key=int) == str(16 << 20)
    md = (tmp_path / "report.md").read_text()
    assert "![GPU throughput against request size](gpu.png)" in md
    assert "**PASS" in md      # the demo's part is still there
    text = " ".join(gpu["findings"])
    assert "PCIe copy ceiling" in text and "openssl" in text
    assert "the CPU wins there" in text     # 4 KiB: it does, in that run


def test_gpu_findings_follow_the_numbers():
    reports = [(os.path.basename(f), json.load(open(f)))
               for f in _gpu_files()]
    gpu = report.gpu_section(reports)
    e2e = max(r["gbps"] for r in gpu["compute"]
              if r["service"] == "aes-xts-256-enc"
              and r["path"] == "end_to_end")
    assert f"{e2e:.1f} GB/s" in gpu["findings"][0]
    # in that run one H200 (47.7 GB/s) stays behind 16 cores (55.4)
    assert "behind the whole CPU" in gpu["findings"][0]
    # a GPU twice as fast: the sentence turns around
    for r in reports[0][1]["results"]:
        r["gbps"] *= 2
    fast = report.gpu_section(reports)
    assert "ahead of the whole CPU" in fast["findings"][0]


def test_report_refuses_files_that_are_not_bench_json(tmp_path):
    from kgpu_helper.cli.main import cli

    bad = tmp_path / "x.json"
    bad.write_text('{"hello": 1}')
    r = CliRunner().invoke(cli, ["report", "--dir", str(tmp_path),
                                 "--gpu-results", str(bad)])
    assert r.exit_code != 0 and "not a kgpu bench JSON" in r.output
