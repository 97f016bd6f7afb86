"""`kgpu bench ring` with the C submitter, on the cpu backend (no GPU),
and the bench commands' edges: the openssl anchor, summaries, errors."""

import io
import shutil

import pytest
from click.testing import CliRunner

from kgpu_helper.bench import ring as ringbench
from kgpu_helper.native import NativeUnavailable, build

def _need_cc():
    try:
        build("ringsub")
    except NativeUnavailable as e:
        pytest.skip(str(e))


def test_c_submitter_through_a_real_helper_on_the_cpu_backend():
    """Every point answered, verified against the CPU oracle, nothing
    lost or doubled (the submitter counts bad completions), each point
    run 3 times with median and range, the CPU split reported."""
    _need_cc()
    rep = ringbench.run(["cpu"], ["aes-xts-256-enc", "aes-xts-256-dec",
                                  "nop"], [4096], [1, 8, 32], 0.05, 512,
                        8 << 20, 50.0, lambda *_: None, driver="c", runs=3,
                        anchor=False)
    res = rep["results"]
    assert len(res) == 3 * 3
    assert rep["helpers"]["cpu"]["exit_status"] == 0
    # asleep in poll() once idle: far under 2 % of a core
    assert rep["helpers"]["cpu"]["idle_cpu_pct"] < 2
    assert "published on its own" in rep["method"]["driver"]
    for r in res:
        assert r["n_runs"] == 3 and len(r["runs"]) == 3
        assert r["errors"] == 0 and r["requests"] > 0
        assert r["resident_completions"] == 0      # no resident kernel
        lo, hi = r["requests_per_s_range"]
        assert lo <= r["requests_per_s"] <= hi
        assert r["helper_cpu_us_per_req"] is not None
        assert r["submitter_cpu_us_per_req"] is not None
        assert r["submitters"] == min(r["depth"], 4)
        if r["service"] != "nop":
            assert r["verified"] is True
            assert r["helper_busy_s_per_gb"] <= r["helper_cpu_s_per_gb"]
    out = io.StringIO()
    ringbench.print_report(rep, out)
    text = out.getvalue()
    assert "C submitter" in text and "median [min-max]" in text


def test_summary_is_median_and_range():
    runs = [dict(requests_per_s=v, p50_us=v / 10, requests=1, errors=0,
                 helper_cpu_completions=0, verified=True)
            for v in (30.0, 10.0, 20.0)]
    s = ringbench.summarise(runs)
    assert s["requests_per_s"] == 20.0
    assert s["requests_per_s_range"] == [10.0, 30.0]
    assert s["p50_us"] == 2.0 and s["requests"] == 3 and s["n_runs"] == 3
    assert s["helper_cpu_s_per_gb"] is None
    assert s["resident_completions"] == 0


def test_report_says_what_the_resident_kernel_served():
    pts = [dict(backend="cupy", service="aes-xts-256-enc", size=4096,
                depth=1, requests=100, resident_completions=0),
           dict(backend="resident", service="aes-xts-256-enc", size=4096,
                depth=1, requests=100, resident_completions=100),
           dict(backend="resident", service="aes-xts-256-enc", size=1 << 20,
                depth=1, requests=50, resident_completions=0)]
    assert ringbench.resident_lines(pts) == [
        "resident: requests the resident kernel served: aes-xts-256-enc 4K "
        "depth 1 100/100, aes-xts-256-enc 1024K depth 1 0/50"]


@pytest.mark.skipif(not shutil.which("openssl"), reason="no openssl")
def test_openssl_anchor():
    from kgpu_helper.bench.anchor import format_anchor, openssl_xts
    a = openssl_xts([4096], seconds=1)
    r = a["results"][0]
    assert r["size"] == 4096 and r["one_core_gbps"] > 0
    assert r["all_cores_gbps"] > 0
    assert r["one_core_s_per_gb"] == pytest.approx(1 / r["one_core_gbps"],
                                                   rel=1e-2)
    assert "aes-256-xts 4K" in "\n".join(format_anchor(a))


@pytest.mark.skipif(not shutil.which("openssl"), reason="no openssl")
def test_openssl_anchor_skips_sizes_past_one_xts_data_unit():
    # openssl refuses an XTS input over 2^20 blocks and its speed test then
    # prints terabytes per second; such sizes are left out, and said so
    from kgpu_helper.bench.anchor import openssl_xts
    a = openssl_xts([4096, 64 << 20], seconds=1)
    assert [r["size"] for r in a["results"]] == [4096]
    assert a["skipped_sizes"] == [64 << 20]


def test_anchor_without_openssl(monkeypatch):
    from kgpu_helper.bench import anchor
    monkeypatch.setattr(anchor.shutil, "which", lambda _: None)
    assert anchor.openssl_xts([4096]) == {"error": "openssl is not installed"}


def test_compute_cupy_without_cuda_is_one_line(monkeypatch):
    """No traceback: one line that says what is missing."""
    from kgpu_helper import services
    from kgpu_helper.cli.main import cli
    monkeypatch.setattr(services, "cuda_available",
                        lambda: (False, "no CUDA here (test)"))
    r = CliRunner().invoke(cli, ["bench", "compute", "--backend", "cupy",
                                  "--quick", "--no-anchor"])
    assert r.exit_code == 1, r.output
    assert "Traceback" not in r.output
    lines = [x for x in r.output.splitlines() if x.strip()]
    assert lines == ["Error: the cupy backend cannot run: no CUDA here "
                     "(test)"], r.output


def test_native_build_without_cc_is_a_clear_error(monkeypatch, tmp_path):
    from kgpu_helper import native
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("KGPU_NATIVE_CACHE", str(tmp_path))
    native.build.cache_clear()
    try:
        with pytest.raises(NativeUnavailable, match="cannot run"):
            native.build("ringsub")
    finally:
        native.build.cache_clear()


@pytest.mark.gpu
def test_c_submitter_through_the_gpu_helper():
    """The same through the cupy backend (zero-copy XTS, the C batch
    path): verified, no errors, nothing on the helper's CPU."""
    from kgpu_helper.services import cuda_available
    ok, why = cuda_available()
    if not ok:
        pytest.skip(why)
    _need_cc()
    rep = ringbench.run(["cupy"], ["aes-xts-256-enc", "nop"], [4096, 1 << 20],
                        [1, 32], 0.05, 512, 64 << 20, 50.0, lambda *_: None,
                        driver="c", runs=1, anchor=False,
                        compare_compute=False)
    for r in rep["results"]:
        assert r["errors"] == 0 and r["helper_cpu_completions"] == 0
        assert r["verified"] in (True, None)
        assert r["resident_completions"] == 0     # batched launches only


@pytest.mark.gpu
def test_c_submitter_counts_the_resident_kernels_answers():
    """With `kgpu helper --resident`, the 4K XTS requests are the resident
    kernel's (CQE_RESIDENT, counted by the C submitter), the 1M ones the
    batched launches' (over its --resident-max)."""
    from kgpu_helper.services import cuda_available
    ok, why = cuda_available()
    if not ok:
        pytest.skip(why)
    _need_cc()
    rep = ringbench.run(["resident"], ["aes-xts-256-enc"], [4096, 1 << 20],
                        [1, 32], 0.05, 512, 64 << 20, 50.0, lambda *_: None,
                        driver="c", runs=1, anchor=False,
                        compare_compute=False)
    for r in rep["results"]:
        assert r["errors"] == 0 and r["verified"] is True, r
        want = r["requests"] if r["size"] == 4096 else 0
        assert r["resident_completions"] == want, r
    out = io.StringIO()
    ringbench.print_report(rep, out)
    assert "requests the resident kernel served" in out.getvalue()
