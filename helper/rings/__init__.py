"""The ways to reach a ring: ``abi`` (the SQE/CQE and region layout shared
with kmod/uapi/kgpu.h), ``transport`` (kgpu.ko's ring through /dev/kgpu,
and the shm ring), ``ivshmem`` and ``ivshmem_server`` (VM guests' rings
through QEMU's ivshmem), ``ringdriver`` (the user-space stand-in for the
kernel's side of a ring) and ``netlink`` (the genetlink control plane).

Imports nothing of kgpu_helper but its own modules: the bottom of the
helper's own layers, above only services, cuda and native.
"""
