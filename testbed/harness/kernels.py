"""Find the guest kernels installed on the host (Debian's linux-image-*)."""

import os
import re
from dataclasses import dataclass

BOOT = "/boot"
MODULES = "/lib/modules"


@dataclass(frozen=True)
class Kernel:
    release: str        # e.g. "6.12.117+deb12-amd64"
    image: str          # path of the vmlinuz

    @property
    def series(self):
        """"major.minor", e.g. "6.1" or "6.12"."""
        m = re.match(r"(\d+)\.(\d+)", self.release)
        return f"{m.group(1)}.{m.group(2)}" if m else self.release

    @property
    def modules_dir(self):
        return os.path.join(MODULES, self.release)

    @property
    def headers_dir(self):
        """The kbuild tree to build modules against (may not exist)."""
        return os.path.join(self.modules_dir, "build")


def _version_key(release):
    return [int(x) if x.isdigit() else x for x in re.split(r"(\d+)", release)]


def list_kernels(boot=BOOT):
    """Every kernel with both an image and a modules folder, oldest first."""
    found = []
    try:
        names = os.listdir(boot)
    except FileNotFoundError:
        return []
    for name in names:
        if not name.startswith("vmlinuz-"):
            continue
        release = name[len("vmlinuz-"):]
        if os.path.isdir(os.path.join(MODULES, release)):
            found.append(Kernel(release, os.path.join(boot, name)))
    return sorted(found, key=lambda k: _version_key(k.release))


def find_kernel(want=None, boot=BOOT):
    """The kernel for ``want``: a series ("6.1", "6.12"), a full release,
    or None for the newest. Raises LookupError with what is installed."""
    kernels = list_kernels(boot)
    if not kernels:
        raise LookupError(
            f"no guest kernel found (no vmlinuz-* in {boot} with modules in "
            f"{MODULES}); run 'make deps' to install Debian's kernels")
    if want is None:
        return kernels[-1]
    exact = [k for k in kernels if k.release == want]
    if exact:
        return exact[0]
    series = [k for k in kernels if k.series == want]
    if series:
        return series[-1]
    have = ", ".join(k.release for k in kernels)
    raise LookupError(f"no installed kernel matches {want!r} (installed: {have})")
