"""kgpu helper: the user-space side of kgpu.

Subpackages by role, each importing only those below it (a unit test,
tests/test_layout.py, walks the imports and fails on one going up):

- ``cli``: the one ``kgpu`` command line (helper, status, doctor, crypt,
  raid6, bench; ``kgpu testbed`` and ``kgpu demo`` come from kgpu_testbed);
- ``bench``: benchmarks of the services and of the whole ring, and the
  native CPU anchor (openssl) they are compared with;
- ``serve``: the serving loop (daemon), its batching, engines,
  calibration, the C fast path, readiness for systemd, and the
  GPU-resident XTS path;
- ``rings``: the ways to reach a ring: the ABI, kgpu.ko's ring and the shm
  ring (transport), ivshmem for VM guests and its server, the user-space
  ring driver, and the genetlink control plane;
- ``services``: the compute services (AES-XTS, RAID6 P/Q), arrays in,
  arrays out, with a ``cpu`` and a ``cupy`` backend;
- ``cuda`` and ``native``: the CUDA and C sources and their loaders.

Order, top to bottom: cli; bench and serve; rings; services; cuda and
native. Data beside the code: ``systemd/`` (units, udev rule, modprobe
file) and ``docs/`` (one page per topic, linked from the README).
"""

__version__ = "0.1.0"
