"""kgpu testbed: boot a stock Debian kernel under QEMU and run commands in it.

The guest sees the host's root file system read-only over 9p with a tmpfs
overlay on top, so the host's Python, fio, dmsetup and the freshly built
modules are all there without building an image. See ``vm.Testbed``.
"""

from kgpu_testbed.kernels import Kernel, find_kernel, list_kernels
from kgpu_testbed.vm import RunResult, Testbed, TestbedError

__all__ = ["Kernel", "find_kernel", "list_kernels", "RunResult", "Testbed",
           "TestbedError"]
