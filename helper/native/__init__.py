"""Small C programs and libraries of the helper, built at run time.

    from kgpu_helper.native import build
    exe = build("ringsub")                 # ringsub.c -> an executable
    lib = build("fastpath", shared=True)   # fastpath.c -> a .so (ctypes)

Each ``<name>.c`` here is compiled with the system's C compiler (``$CC``,
else ``cc``) the first time it is asked for, into a cache folder keyed by
the source's hash (``$KGPU_NATIVE_CACHE``, else ``~/.cache/kgpu/native``),
so an edited source is built again. No build step at install time and no
dependency beyond a C compiler; without one, :class:`NativeUnavailable`
says so and callers fall back to their Python paths.

The bottom of the helper's layers: imports nothing of kgpu_helper.
"""

import functools
import hashlib
import os
import shutil
import subprocess
import tempfile

SOURCE_DIR = os.path.dirname(os.path.abspath(__file__))
CFLAGS = ("-O2", "-Wall", "-Wextra", "-pthread")


class NativeUnavailable(RuntimeError):
    """The C source cannot be built here; ``str`` says why."""


def cache_dir():
    """``$KGPU_NATIVE_CACHE``, else ``~/.cache/kgpu/native``, else (not
    writable) a folder of this user's under the temporary directory."""
    d = os.environ.get("KGPU_NATIVE_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "kgpu", "native")
    try:
        os.makedirs(d, exist_ok=True)
        if os.access(d, os.W_OK):
            return d
    except OSError:
        pass
    d = os.path.join(tempfile.gettempdir(), f"kgpu-native-{os.getuid()}")
    os.makedirs(d, mode=0o700, exist_ok=True)
    return d


@functools.lru_cache(maxsize=None)
def build(name, shared=False):
    """Path of the built ``<name>.c`` (an executable, or a shared library
    with ``shared``); built on first use and cached on disk."""
    src = os.path.join(SOURCE_DIR, f"{name}.c")
    with open(src, "rb") as f:
        text = f.read()
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        raise NativeUnavailable(f"no C compiler (cc) to build {name}.c: "
                                f"install gcc, or set CC")
    flags = CFLAGS + (("-shared", "-fPIC") if shared else ())
    h = hashlib.sha256(text + " ".join(flags).encode()).hexdigest()[:16]
    out = os.path.join(cache_dir(), f"{name}-{h}" + (".so" if shared
                                                     else ""))
    if os.path.exists(out):
        return out
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(out), prefix=name)
    os.close(fd)
    try:
        try:
            r = subprocess.run([cc, *flags, "-o", tmp, src],
                               capture_output=True, text=True)
        except OSError as e:
            raise NativeUnavailable(f"cannot run {cc} to build {name}.c: "
                                    f"{e}") from None
        if r.returncode:
            raise NativeUnavailable(f"{cc} could not build {name}.c: "
                                    f"{r.stderr.strip()[-2000:]}")
        os.replace(tmp, out)  # atomic: concurrent builders agree
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out
