"""`kgpu demo --quick` end to end in the testbed: the whole stack, the
stock tools as oracles, a member failing under load, the report."""

import json
import os

import pytest
from click.testing import CliRunner

pytestmark = pytest.mark.vm

EXPECTED_CHECKS = (
    [f"fio-verify-{s}-{j}" for s in ("stock", "kgpu")
     for j in ("seq-1m", "rand-4k", "rand-64k", "mixed")]
    + ["crypt-reads-gpu-crypt-fsck", "crypt-reads-gpu-crypt-files",
       "md-parity-check", "md-reads-gpu-raid6-files", "degraded-fio-verify",
       "degraded-member-marked-dead", "degraded-files-read",
       "degraded-fio-write-verify", "md-reads-degraded-writes", "kernel-log"])


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    from kgpu_helper.cli.main import cli
    from kgpu_testbed.harness.kernels import find_kernel

    try:
        find_kernel("6.12")
    except LookupError as e:
        pytest.skip(str(e))
    out = tmp_path_factory.mktemp("report")
    r = CliRunner().invoke(cli, ["demo", "--quick", "--kernel", "6.12",
                                 "--report-dir", str(out)])
    with open(out / "report.json") as f:
        res = json.load(f)
    return r, res, out


def test_demo_verdict_passes(demo_run):
    r, res, _ = demo_run
    assert r.exit_code == 0, r.output[-3000:] + res.get("console_tail", "")
    assert "verdict: PASS" in r.output
    names = [c["name"] for c in res["checks"]]
    assert names == EXPECTED_CHECKS
    assert all(c["result"] == "PASS" for c in res["checks"])


def test_demo_used_the_helper_and_the_gpu_targets(demo_run):
    _, res, _ = demo_run
    served = {s["name"]: s for s in res["kgpu_status"]["services"]}
    for svc in ("xts-enc", "xts-dec", "raid6-gen", "raid6-rec"):
        assert served[svc]["helper_cpu"] > 0, served[svc]
    assert "AADAAA" in res["dm_status"]["degraded"]


def test_demo_report(demo_run):
    from PIL import Image

    from kgpu_testbed.demo.report import FIG_PIXELS

    _, res, out = demo_run
    targets = {p["target"] for p in res["sweep"]["points"]}
    assert targets == {"crypt", "gpu-crypt", "md", "md-degraded",
                       "gpu-raid6", "gpu-raid6-degraded"}
    assert all(p["errors"] == 0 and p["bytes"] > 0
               for p in res["sweep"]["points"])
    for name in ("crypt.png", "raid6.png"):
        with Image.open(out / name) as im:
            assert im.size == FIG_PIXELS
    md = (out / "report.md").read_text()
    assert "**PASS" in md and "QEMU TCG" in md
    assert [s[0] for s in res["steps"]][0].startswith("load the modules")
    assert len(res["steps"]) == 7 and all(s[2] == "done"
                                          for s in res["steps"])
    assert os.path.getsize(out / "report.json") > 1000


def test_bench_stack_runs_the_same_steps_on_a_host():
    """`kgpu bench stack --loop` is the demo without the VM, for a real
    host; the guest stands in for that host here."""
    from conftest import build_modules
    from kgpu_testbed import Testbed, TestbedError

    try:
        tb = Testbed(kernel="6.12", timeout=900)
    except TestbedError as e:
        pytest.skip(str(e))
    build = build_modules(tb.kernel)
    r = tb.run(f"kgpu bench stack --loop 24 --quick --backend cpu "
               f"--modules {build} --report-dir $KGPU_OUT/rep", echo=False)
    assert r.rc == 0, r.output[-4000:]
    assert "verdict: PASS: all 18 checks passed" in r.output
    res = json.loads(r.files["rep/report.json"])
    assert res["where"]["kind"] == "host"
    assert res["where"]["kernel"] == tb.kernel.release
    assert res["where"]["backend"].startswith("cpu")
    assert {"crypt.png", "raid6.png", "report.md"} <= {
        k.split("/")[-1] for k in r.files}
