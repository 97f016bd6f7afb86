"""Build (once per kernel, then cached) the busybox initramfs of the guest."""

import gzip
import hashlib
import lzma
import os
import shutil
import subprocess
import tempfile

# What the init needs before it can reach the host root; everything else
# comes from the host's /lib/modules through the overlay.
INIT_MODULES = ["virtio_pci", "9pnet_virtio", "9p", "overlay",
                # a persistent upper layer (Testbed(upper_disk=...))
                "virtio_blk", "ext4"]
BUSYBOX_CANDIDATES = ["/bin/busybox", "/usr/bin/busybox"]

_HERE = os.path.dirname(os.path.abspath(__file__))


def cache_dir():
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return os.path.join(base, "kgpu", "testbed")


def _busybox():
    for path in BUSYBOX_CANDIDATES:
        if os.path.exists(path):
            return path
    raise FileNotFoundError(
        "busybox not found; install Debian's busybox-static ('make deps')")


def module_files(release, names=INIT_MODULES):
    """Module files for ``names`` and their dependencies, in load order,
    as ``modprobe --show-depends`` resolves them (built-ins are skipped)."""
    order = []
    for name in names:
        out = subprocess.run(
            ["modprobe", "-S", release, "--show-depends", name],
            capture_output=True, text=True)
        if out.returncode != 0:
            raise RuntimeError(
                f"modprobe cannot resolve {name} for {release}: "
                f"{out.stderr.strip()}")
        for line in out.stdout.splitlines():
            parts = line.split()
            if parts and parts[0] == "insmod" and parts[1] not in order:
                order.append(parts[1])
    return order


def _decompressed(path):
    """Module bytes, uncompressed (busybox insmod takes plain .ko only)."""
    if path.endswith(".xz"):
        with lzma.open(path) as f:
            return f.read(), os.path.basename(path)[:-3]
    if path.endswith(".gz"):
        with gzip.open(path) as f:
            return f.read(), os.path.basename(path)[:-3]
    if path.endswith(".zst"):
        data = subprocess.run(["zstd", "-dc", path], check=True,
                              capture_output=True).stdout
        return data, os.path.basename(path)[:-4]
    with open(path, "rb") as f:
        return f.read(), os.path.basename(path)


def _fingerprint(release, modules, busybox, init):
    h = hashlib.sha256()
    h.update(release.encode())
    for path in [busybox, init] + modules:
        st = os.stat(path)
        h.update(f"{path}:{st.st_size}:{st.st_mtime_ns}".encode())
    with open(init, "rb") as f:
        h.update(f.read())
    return h.hexdigest()[:16]


def initramfs_for(kernel, log=None):
    """Path of the cached initramfs for ``kernel``, building it if needed."""
    busybox = _busybox()
    init = os.path.join(_HERE, "init.sh")
    modules = module_files(kernel.release)
    key = _fingerprint(kernel.release, modules, busybox, init)
    out = os.path.join(cache_dir(), f"initramfs-{kernel.release}-{key}.cpio.gz")
    if os.path.exists(out):
        return out
    if log:
        log(f"building the initramfs for {kernel.release}")
    os.makedirs(cache_dir(), exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="kgpu-initramfs-") as root:
        os.makedirs(os.path.join(root, "bin"))
        os.makedirs(os.path.join(root, "modules"))
        shutil.copy(busybox, os.path.join(root, "bin", "busybox"))
        shutil.copy(init, os.path.join(root, "init"))
        os.chmod(os.path.join(root, "init"), 0o755)
        names = []
        for path in modules:
            data, name = _decompressed(path)
            with open(os.path.join(root, "modules", name), "wb") as f:
                f.write(data)
            names.append(name)
        with open(os.path.join(root, "modules", "order"), "w") as f:
            f.write("".join(n + "\n" for n in names))
        files = subprocess.run(["find", "."], cwd=root, check=True,
                               capture_output=True).stdout
        cpio = subprocess.run(["cpio", "--quiet", "-o", "-H", "newc",
                               "--owner=0:0"], cwd=root, input=files,
                              check=True, capture_output=True).stdout
    tmp = f"{out}.{os.getpid()}.tmp"
    with gzip.open(tmp, "wb", compresslevel=1) as f:
        f.write(cpio)
    os.replace(tmp, out)
    return out
