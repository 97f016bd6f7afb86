"""The VM harness: boot a stock Debian kernel under QEMU with this
checkout's modules and run commands in it. ``vm`` (the Testbed: QEMU's
command line, the guest's overlay, retries, ivshmem, running several
guests), ``kernels`` (the installed guest kernels), ``initramfs`` (the
guest's initramfs and ``init.sh``), ``bundle`` (a self-contained tarball
for a GPU host without the packages). ``deps.sh`` installs what
``make test`` needs; ``ivshmem-guest.sh`` is the check run inside a guest
served by its host's helper.

The bottom of kgpu_testbed: imports nothing of the demo or the command
line, and nothing of kgpu_helper.
"""

import os

#: the folder three levels up: the kgpu checkout when run from one
#: (its Makefile builds the modules); see :func:`checkout`
_REPO = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.realpath(__file__))))


def checkout():
    """The kgpu checkout this package runs from, or None when it was
    installed without one (no Makefile beside it)."""
    return _REPO if os.path.exists(os.path.join(_REPO, "Makefile")) \
        else None
