"""A self-contained testbed for a host without QEMU: ``kgpu testbed bundle``.

The bundle is a tar.gz of installed files only (offline, reproducible):

    manifest.json           release, and the paths below
    boot/vmlinuz            the guest kernel
    boot/initrd.cpio.gz     the testbed's initramfs for it (init.sh)
    qemu/bin/qemu-system-x86_64
    qemu/lib/               the libraries QEMU links against, less glibc and
                            libgcc_s (the host's are used: run it with
                            LD_LIBRARY_PATH); links into root/ where the
                            guest root has the same file
    qemu/modules/           accel-tcg-x86_64.so (QEMU_MODULE_DIR)
    qemu/share/             SeaBIOS and the option ROMs a testbed guest
                            loads (QEMU's -L)
    root/                   the guest root: fio, dmsetup, cryptsetup, mdadm,
                            e2fsprogs, kmod, bash, busybox for the rest, all
                            their libraries with Debian's libc and loader;
                            /lib/modules/<release> with the kernel modules
                            the guest tests use and kgpu's own in extra/

The guest root has no Python: guests read kgpu's counters from debugfs.
fio links (through gluster's libxml2) against ICU, whose 31 MB data
library it never reads: the bundle carries a stub of that one library.

Unpacking (``unpack``) is cached under the testbed's cache folder by the
archive's hash; it needs nothing but this module and the standard library.
"""

import gzip
import hashlib
import json
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass

from kgpu_testbed.harness import checkout
from kgpu_testbed.harness.initramfs import cache_dir, module_files

FORMAT = 1
MULTIARCH = "x86_64-linux-gnu"
QEMU_BIN = "/usr/bin/qemu-system-x86_64"
QEMU_MODULE_DIRS = ["/usr/lib/x86_64-linux-gnu/qemu"]
QEMU_MODULES = ["accel-tcg-x86_64.so"]
# What QEMU opens from its data folders for a testbed guest (the pc
# machine, -kernel, no NIC, no VGA), as strace shows it; the bundle's
# self-check fails if QEMU misses any of them.
QEMU_ROMS = ["bios-256k.bin", "kvmvapic.bin", "linuxboot_dma.bin"]
QEMU_DATA_DIRS = ["/usr/share/qemu", "/usr/share/seabios", "/usr/lib/ipxe/qemu"]
# Provided by the host that runs QEMU (a bundled glibc cannot run under
# the host's loader).
HOST_LIBS = re.compile(r"^(libc|libm|libgcc_s|libpthread|libdl|librt|"
                       r"libresolv|libutil|libanl|libmvec|ld-linux[-\w]*)"
                       r"\.so[.\d]*$")
# Guest-side tools, at their Debian paths; [name, ...] are more names of
# the same program (links).
GUEST_TOOLS = {
    "/usr/bin/bash": ["/usr/bin/sh.bash"],
    "/usr/bin/busybox": [],
    "/usr/bin/fio": [],
    "/usr/sbin/dmsetup": [],
    "/usr/sbin/cryptsetup": [],
    "/usr/sbin/mdadm": [],
    "/usr/sbin/mke2fs": ["/usr/sbin/mkfs.ext4", "/usr/sbin/mkfs.ext2"],
    "/usr/sbin/e2fsck": ["/usr/sbin/fsck.ext4"],
    "/usr/sbin/tune2fs": [],
    "/usr/sbin/dumpe2fs": [],
    "/usr/sbin/losetup": [],
    "/usr/sbin/blkid": [],
    "/usr/sbin/blockdev": [],
    "/usr/sbin/wipefs": [],
    "/usr/bin/kmod": ["/usr/sbin/modprobe", "/usr/sbin/insmod",
                      "/usr/sbin/rmmod", "/usr/sbin/lsmod",
                      "/usr/sbin/depmod", "/usr/sbin/modinfo"],
}
# Large libraries the guest tools link against but never use, replaced by
# a stub with the same exported data symbols.
STUB_LIBS = re.compile(r"^libicudata\.so")
# Kernel modules for the guest tests (with their dependencies), and whole
# folders of crypto algorithms so that any cipher dm-crypt asks for loads.
GUEST_MODULES = ["dm_mod", "dm_crypt", "loop", "raid456", "raid6_pq",
                 "ext4", "xts", "aesni_intel", "sha256_generic",
                 "crc32c_generic", "algif_skcipher", "algif_hash",
                 "dm_raid", "9p"]
MODULE_DIRS = ["kernel/crypto", "kernel/arch/x86/crypto", "kernel/lib"]
KGPU_MODULES = ["kgpu.ko", "dm-gpu-crypt.ko", "dm-gpu-raid6.ko"]
ARCHIVE_ROOT = "kgpu-testbed"


class BundleError(RuntimeError):
    """The bundle cannot be built or used (says what is wrong)."""


@dataclass(frozen=True)
class Bundle:
    """An unpacked bundle."""
    dir: str
    release: str

    @property
    def kernel_image(self):
        return os.path.join(self.dir, "boot", "vmlinuz")

    @property
    def initrd(self):
        return os.path.join(self.dir, "boot", "initrd.cpio.gz")

    @property
    def qemu(self):
        return os.path.join(self.dir, "qemu", "bin", "qemu-system-x86_64")

    @property
    def root(self):
        return os.path.join(self.dir, "root")

    @property
    def share(self):
        return os.path.join(self.dir, "qemu", "share")

    def qemu_env(self):
        """What QEMU's environment needs to run from the bundle."""
        return {"LD_LIBRARY_PATH": os.path.join(self.dir, "qemu", "lib"),
                "QEMU_MODULE_DIR": os.path.join(self.dir, "qemu", "modules")}

    @property
    def guest_modules(self):
        """Guest path of kgpu's modules in the guest root."""
        return f"/lib/modules/{self.release}/extra"


def default_path(release):
    """build/kgpu-testbed-<release>.tar.gz in the checkout (git-ignored),
    or in the current folder outside a checkout."""
    base = checkout() or "."
    return os.path.join(base, "build", f"kgpu-testbed-{release}.tar.gz")


# ---------------------------------------------------------------- building

def _ldd(path):
    """[(soname, resolved path)] of what ``path`` loads, the loader too."""
    p = subprocess.run(["ldd", path], capture_output=True, text=True)
    if "not a dynamic executable" in p.stdout + p.stderr:
        return []           # static (busybox)
    if p.returncode:
        raise BundleError(f"ldd {path} failed: {p.stdout}{p.stderr}".strip())
    libs = []
    for line in p.stdout.splitlines():
        parts = line.split()
        if "=>" in parts:
            i = parts.index("=>")
            if i + 1 < len(parts) and parts[i + 1] == "not":
                raise BundleError(f"{path}: {parts[0]} not found")
            if i + 1 < len(parts) and parts[i + 1].startswith("/"):
                libs.append((parts[0], parts[i + 1]))
        elif parts and parts[0].startswith("/"):      # the loader
            libs.append((os.path.basename(parts[0]), parts[0]))
    return libs


class _Tree:
    """A folder being filled: copies, links, stubs."""

    def __init__(self, top):
        self.top = top

    def path(self, rel):
        return os.path.join(self.top, rel.lstrip("/"))

    def copy(self, src, rel):
        dst = self.path(rel)
        if os.path.lexists(dst):
            return dst
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        shutil.copyfile(src, dst)
        os.chmod(dst, 0o755 if os.access(src, os.X_OK) else 0o644)
        return dst

    def link(self, target, rel):
        dst = self.path(rel)
        if os.path.lexists(dst):
            return
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        os.symlink(target, dst)

    def write(self, rel, text, mode=0o644):
        dst = self.path(rel)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        with open(dst, "w") as f:
            f.write(text)
        os.chmod(dst, mode)


def _usr(path):
    """``path`` as it is on a merged-/usr Debian (/lib/x -> /usr/lib/x)."""
    for top in ("/bin/", "/sbin/", "/lib/", "/lib64/"):
        if path.startswith(top):
            return "/usr" + path
    return path


def _stub_library(src, soname, dst):
    """A library with ``src``'s exported data symbols, each a few zero
    bytes, and the same SONAME (``src`` must export data only)."""
    out = subprocess.run(["nm", "-D", "--defined-only", src],
                         capture_output=True, text=True, check=True).stdout
    lines = []
    for line in out.splitlines():
        parts = line.split()
        if len(parts) != 3:
            continue
        if parts[1] not in "RDBV":
            raise BundleError(f"cannot stub {src}: it exports code "
                              f"({parts[2]})")
        lines.append(f"const char {parts[2]}[64] "
                     "__attribute__((aligned(16))) = {0};")
    with tempfile.TemporaryDirectory(prefix="kgpu-stub-") as tmp:
        c = os.path.join(tmp, "stub.c")
        with open(c, "w") as f:
            f.write("\n".join(lines) + "\n")
        p = subprocess.run(["gcc", "-shared", "-fPIC", "-O2", "-s",
                            f"-Wl,-soname,{soname}", "-o", dst, c],
                           capture_output=True, text=True)
        if p.returncode:
            raise BundleError(f"cannot build a stub of {src}:\n{p.stderr}")


def _add_root_program(root, path, extra_names):
    """Copy one program and its libraries into the guest root."""
    real = os.path.realpath(path)
    if not os.path.exists(real):
        raise BundleError(f"{path} is not installed ('make deps')")
    root.copy(real, _usr(real))
    for name in [path] + extra_names:
        if _usr(name) != _usr(real):
            rel = os.path.relpath(_usr(real), os.path.dirname(_usr(name)))
            root.link(rel, _usr(name))
    _add_root_libs(root, real)


def _add_root_libs(root, binary):
    for soname, where in _ldd(binary):
        real = os.path.realpath(where)
        dst = _usr(real)
        if not os.path.lexists(root.path(dst)):
            if STUB_LIBS.match(soname):
                os.makedirs(os.path.dirname(root.path(dst)), exist_ok=True)
                _stub_library(real, soname, root.path(dst))
            else:
                root.copy(real, dst)
        # The name the loader looks for, in the folder ldd found it in.
        named = _usr(os.path.join(os.path.realpath(os.path.dirname(where)),
                                  soname))
        if named != dst:
            root.link(os.path.relpath(dst, os.path.dirname(named)), named)


def _busybox_applets(root):
    """Links for busybox's applets that no real program provides."""
    out = subprocess.run([root.path("/usr/bin/busybox"), "--list-full"],
                         capture_output=True, text=True, check=True).stdout
    for rel in sorted(out.split()):
        if rel == "linuxrc":
            continue
        dst = _usr("/" + rel)
        if not os.path.lexists(root.path(dst)):
            root.link(os.path.relpath("/usr/bin/busybox",
                                      os.path.dirname(dst)), dst)


def _skeleton(root):
    for d in ("proc", "sys", "dev", "run", "tmp", "root", "mnt", "var/tmp",
              "etc", "usr/bin", "usr/sbin", "usr/lib", "usr/lib64"):
        os.makedirs(root.path(d), exist_ok=True)
    os.chmod(root.path("tmp"), 0o1777)
    os.chmod(root.path("var/tmp"), 0o1777)
    os.chmod(root.path("root"), 0o700)
    for name in ("bin", "sbin", "lib", "lib64"):
        root.link(f"usr/{name}", name)
    root.write("etc/passwd", "root:x:0:0:root:/root:/bin/bash\n")
    root.write("etc/group", "root:x:0:\ndisk:x:6:\n")
    root.write("etc/hostname", "kgpu-testbed\n")
    root.write("etc/mdadm/mdadm.conf", "# kgpu testbed: no arrays listed\n")
    root.write("etc/os-release", 'NAME="kgpu testbed guest root"\n')


def _add_kernel_modules(root, release, kgpu_dir):
    src = os.path.join("/lib/modules", release)
    dst = f"/usr/lib/modules/{release}"
    files = set()
    for name in GUEST_MODULES:
        try:
            files.update(module_files(release, [name]))
        except RuntimeError as e:
            raise BundleError(str(e)) from None
    for d in MODULE_DIRS:
        for dirpath, _, names in os.walk(os.path.join(src, d)):
            files.update(os.path.join(dirpath, n) for n in names
                         if ".ko" in n)
    for path in sorted(files):
        root.copy(path, dst + "/" + os.path.relpath(path, src))
    for name in ("modules.order", "modules.builtin",
                 "modules.builtin.modinfo"):
        if os.path.exists(os.path.join(src, name)):
            root.copy(os.path.join(src, name), f"{dst}/{name}")
    for name in KGPU_MODULES:
        ko = os.path.join(kgpu_dir, name)
        if not os.path.exists(ko):
            raise BundleError(f"no {name} in {kgpu_dir} (build it with "
                              f"'make modules KDIR=/lib/modules/{release}/"
                              f"build' or give --modules)")
        root.copy(ko, f"{dst}/extra/{name}")
    p = subprocess.run(["depmod", "-b", root.top, release],
                       capture_output=True, text=True)
    if p.returncode:
        raise BundleError(f"depmod failed: {p.stderr}")


def _find(name, dirs):
    """The first of ``dirs`` that holds QEMU's file ``name``, its path."""
    for d in dirs:
        if os.path.exists(os.path.join(d, name)):
            return os.path.realpath(os.path.join(d, name))
    raise BundleError(f"QEMU's {name} not found in {', '.join(dirs)} "
                      "(install qemu-system-x86: 'make deps')")


def _add_qemu(tree, root):
    """QEMU, its libraries (links into the guest root where it has the
    same file), its TCG module and its ROMs."""
    tree.copy(os.path.realpath(QEMU_BIN), "qemu/bin/qemu-system-x86_64")
    mods = [tree.copy(_find(name, QEMU_MODULE_DIRS), f"qemu/modules/{name}")
            for name in QEMU_MODULES]
    for binary in [QEMU_BIN] + mods:
        for soname, where in _ldd(binary):
            if HOST_LIBS.match(soname):
                continue
            real = os.path.realpath(where)
            rel = f"qemu/lib/{soname}"
            if os.path.exists(root.path(_usr(real))):
                tree.link(os.path.relpath(root.path(_usr(real)),
                                          tree.path("qemu/lib")), rel)
            else:
                tree.copy(real, rel)
    for rom in QEMU_ROMS:
        tree.copy(_find(rom, QEMU_DATA_DIRS), f"qemu/share/{rom}")


def _self_check(top, release):
    """Start the bundle's QEMU paused, alone with its ROMs (-L), for a
    moment: libraries, the TCG module and the ROMs must all be found."""
    b = Bundle(top, release)
    env = dict(os.environ, **b.qemu_env())
    argv = [b.qemu, "-L", b.share, "-accel", "tcg", "-cpu", "max",
            "-m", "128", "-kernel", b.kernel_image, "-initrd", b.initrd,
            "-nic", "none", "-display", "none", "-vga", "none",
            "-monitor", "none", "-serial", "none", "-S", "-no-user-config",
            "-nodefaults"]
    try:
        p = subprocess.run(argv, env=env, capture_output=True, text=True,
                           timeout=3)
        problem = f"exited with status {p.returncode}: {p.stderr.strip()}"
    except subprocess.TimeoutExpired as e:      # still running: it started
        err = e.stderr or ""
        if isinstance(err, bytes):
            err = err.decode(errors="replace")
        if not re.search(r"could not|cannot|failed", err, re.I):
            return
        problem = err.strip()
    raise BundleError(f"the bundle's QEMU does not start on its own: "
                      f"{problem}")


def _write_archive(src_top, out):
    """tar.gz of ``src_top`` as ARCHIVE_ROOT/: sorted, owned by root, one
    fixed mtime, no gzip timestamp: the same files give the same bytes."""
    def norm(info):
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        info.mtime = 0
        return info

    entries = []
    for dirpath, dirnames, names in os.walk(src_top):
        dirnames.sort()
        for n in dirnames + sorted(names):
            entries.append(os.path.join(dirpath, n))
    entries.sort()
    tmp = out + ".tmp"
    with open(tmp, "wb") as raw, \
            gzip.GzipFile(filename="", fileobj=raw, mode="wb",
                          compresslevel=6, mtime=0) as gz, \
            tarfile.open(fileobj=gz, mode="w", format=tarfile.GNU_FORMAT) as tar:
        tar.add(src_top, arcname=ARCHIVE_ROOT, recursive=False, filter=norm)
        for path in entries:
            arc = ARCHIVE_ROOT + "/" + os.path.relpath(path, src_top)
            tar.add(path, arcname=arc, recursive=False, filter=norm)
    os.replace(tmp, out)


def build(kernel, kgpu_dir, out, log=print):
    """Write the bundle for ``kernel`` (a kernels.Kernel) with kgpu's
    modules from ``kgpu_dir`` to ``out``; returns a summary dict."""
    from kgpu_testbed.harness.initramfs import initramfs_for

    initrd = initramfs_for(kernel, log=log)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="kgpu-bundle-") as top:
        tree = _Tree(top)
        root = _Tree(os.path.join(top, "root"))
        _skeleton(root)
        for path, names in GUEST_TOOLS.items():
            _add_root_program(root, path, names)
        _busybox_applets(root)
        _add_kernel_modules(root, kernel.release, kgpu_dir)
        tree.copy(kernel.image, "boot/vmlinuz")
        tree.copy(initrd, "boot/initrd.cpio.gz")
        _add_qemu(tree, root)
        manifest = {"format": FORMAT, "release": kernel.release,
                    "kgpu_modules": KGPU_MODULES,
                    "guest_tools": sorted(GUEST_TOOLS)}
        tree.write("manifest.json", json.dumps(manifest, indent=1) + "\n")
        _self_check(top, kernel.release)
        summary = _summarize(top)
        _write_archive(top, out)
    summary["archive_bytes"] = os.path.getsize(out)
    return summary


def _summarize(top):
    parts = {}
    for part in ("boot", "qemu", "root"):
        n = size = 0
        for dirpath, _, names in os.walk(os.path.join(top, part)):
            for name in names:
                p = os.path.join(dirpath, name)
                if not os.path.islink(p):
                    n += 1
                    size += os.path.getsize(p)
        parts[part] = (n, size)
    return {"parts": parts}


# ---------------------------------------------------------------- using

def _sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def unpack(archive, log=None):
    """The unpacked bundle of ``archive``, unpacking it once per content
    (under the cache folder, by the archive's hash)."""
    if not os.path.isfile(archive):
        raise BundleError(f"no bundle at {archive} (build one with "
                          "'kgpu testbed bundle')")
    digest = _sha256(archive)[:16]
    dest = os.path.join(cache_dir(), f"bundle-{digest}")
    top = os.path.join(dest, ARCHIVE_ROOT)
    if not os.path.exists(os.path.join(top, "manifest.json")):
        if log:
            log(f"unpacking {archive} into {dest}")
        os.makedirs(cache_dir(), exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f"bundle-{digest}.", dir=cache_dir())
        try:
            with tarfile.open(archive, "r:gz") as tar:
                for m in tar.getmembers():
                    if not m.name.startswith(ARCHIVE_ROOT + "/") and \
                            m.name != ARCHIVE_ROOT or ".." in m.name.split("/"):
                        raise BundleError(f"{archive} is not a kgpu testbed "
                                          f"bundle (has {m.name})")
                tar.extractall(tmp)
            try:
                os.rename(tmp, dest)
            except OSError:     # another process unpacked it first
                shutil.rmtree(tmp, ignore_errors=True)
        except (tarfile.TarError, OSError, EOFError) as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise BundleError(f"cannot unpack {archive}: {e}") from None
    with open(os.path.join(top, "manifest.json")) as f:
        manifest = json.load(f)
    if manifest.get("format") != FORMAT:
        raise BundleError(f"{archive} is a bundle of format "
                          f"{manifest.get('format')}; this testbed reads "
                          f"format {FORMAT} (build it again)")
    return Bundle(top, manifest["release"])


def listing(archive):
    """Names in the archive (for a summary)."""
    with tarfile.open(archive, "r:gz") as tar:
        return tar.getnames()
