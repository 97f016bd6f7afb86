"""kgpu helper: the user-space side of kgpu.

Layout (transport, services and GPU loading are kept apart, the way
ublksrv and nbdkit split theirs):

- ``kgpu_helper.services``: the compute services (AES-XTS, RAID6 P/Q),
  arrays in, arrays out, with a ``cpu`` and a ``cupy`` backend;
- ``kgpu_helper.cuda``: the ``.cu`` sources and their loader;
- ``kgpu_helper.cli``: the one ``kgpu`` command line.
"""

__version__ = "0.1.0"
