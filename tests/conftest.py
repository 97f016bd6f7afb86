"""Test tiers: plain unit tests, `gpu` (needs CUDA) and `vm` (boots QEMU).

A missing prerequisite skips a tier with the reason; it never passes
silently.
"""

import functools
import os
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@functools.lru_cache(maxsize=None)
def vm_unavailable():
    """Why the testbed cannot boot here, or None if it can."""
    from kgpu_testbed.harness.kernels import list_kernels
    from kgpu_testbed.harness.vm import QEMU, qemu_available

    if not qemu_available():
        return f"{QEMU} is not installed (make deps)"
    if not list_kernels():
        return "no Debian guest kernel installed (make deps)"
    return None


@functools.lru_cache(maxsize=None)
def gpu_unavailable():
    """Why CUDA cannot be used here, or None if it can."""
    try:
        import cupy
    except Exception as e:  # ImportError, or CUDA libraries missing
        return f"CuPy is not importable ({type(e).__name__}: {e})"
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            return "no CUDA device"
    except Exception as e:
        return f"CUDA is not usable ({e})"
    return None


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "vm" in item.keywords:
            why = vm_unavailable()
            if why:
                item.add_marker(pytest.mark.skip(reason=f"vm: {why}"))
        if "gpu" in item.keywords:
            why = gpu_unavailable()
            if why:
                item.add_marker(pytest.mark.skip(reason=f"gpu: {why}"))


def build_modules(kernel):
    """Build the modules for ``kernel`` (once per session); their folder."""
    return _build_modules(kernel.release, kernel.headers_dir)


@functools.lru_cache(maxsize=None)
def _build_modules(release, kdir):
    if not os.path.isdir(kdir):
        pytest.skip(f"no headers for {release} ({kdir}); make deps")
    out = subprocess.run(["make", "-s", "modules", f"KDIR={kdir}"], cwd=REPO,
                         capture_output=True, text=True)
    if out.returncode != 0:
        pytest.fail(f"module build for {release} failed:\n{out.stdout}\n"
                    f"{out.stderr}")
    return os.path.join(REPO, "build", release)


def guest_results(files):
    """A guest's $KGPU_OUT/results (``files``: name -> text) as a dict:
    each line's first word -> the rest of the line."""
    results = {}
    for line in files.get("results", "").splitlines():
        name, _, rest = line.partition(" ")
        results[name] = rest
    return results


def keep_artifacts(label, files):
    """For a person debugging: with $KGPU_TEST_ARTIFACTS set, write a
    guest's $KGPU_OUT files (name -> bytes), as they came, into the folder
    ``label`` under it."""
    keep = os.environ.get("KGPU_TEST_ARTIFACTS")
    if not keep:
        return
    d = os.path.join(keep, label)
    os.makedirs(d, exist_ok=True)
    for name, data in files.items():
        with open(os.path.join(d, name.replace("/", "_")), "wb") as f:
            f.write(data)


def run_guest_script(kernel, script, label, timeout, memory_mb=None):
    """Boot a testbed guest of ``kernel`` (skip if there is none), run
    ``bash script <module build dir>`` in it (``memory_mb``: the guest's
    memory, else the testbed's default), keep its files (see
    keep_artifacts under ``label``) and insist that it exited 0. Returns
    its $KGPU_OUT files as text (name -> str)."""
    from kgpu_testbed import Testbed, TestbedError

    try:
        tb = Testbed(kernel=kernel, timeout=timeout,
                     **({"memory_mb": memory_mb} if memory_mb else {}))
    except TestbedError as e:
        pytest.skip(str(e))
    build = build_modules(tb.kernel)
    r = tb.run(f"bash {script} {build}", echo=False)
    keep_artifacts(label, r.files)
    print(f"guest {tb.kernel.release}: {r.seconds:.0f} s")
    assert r.rc == 0, r.output[-4000:]
    return {k: v.decode(errors="replace") for k, v in r.files.items()}


@pytest.fixture(scope="session")
def repo():
    return REPO
