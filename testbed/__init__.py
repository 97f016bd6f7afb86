"""kgpu testbed: boot a stock Debian kernel under QEMU and run commands in it.

The guest sees the host's root file system read-only over 9p with a tmpfs
overlay on top, so the host's Python, fio, dmsetup and the freshly built
modules are all there without building an image. See
``harness.vm.Testbed``.

Two rooms and a door, each importing only what is below it:

- ``cli``: ``kgpu testbed``, ``kgpu demo``, ``kgpu report`` and
  ``kgpu bench stack``;
- ``demo``: the demo and its report (stack.sh, the fio jobs, the sweep,
  the plots, stored results);
- ``harness``: the VM harness (QEMU, guest kernels, initramfs, bundles).
"""

from kgpu_testbed.harness.kernels import Kernel, find_kernel, list_kernels
from kgpu_testbed.harness.vm import RunResult, Testbed, TestbedError

__all__ = ["Kernel", "find_kernel", "list_kernels", "RunResult", "Testbed",
           "TestbedError"]
