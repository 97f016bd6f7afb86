/* SPDX-License-Identifier: GPL-2.0 WITH Linux-syscall-note */
/*
 * kgpu user-space ABI: /dev/kgpu, shared between the kernel module and the
 * helper. Fixed-width fields only, no pointers, so that the Python mirror
 * can describe every structure as a plain field list.
 */
#ifndef _UAPI_KGPU_H
#define _UAPI_KGPU_H

#include <linux/ioctl.h>
#include <linux/types.h>

#define KGPU_MAGIC		0x6b677075u	/* "kgpu" */
#define KGPU_ABI_VERSION	1u

/* KGPU_IOC_VERSION: the module's magic and ABI version. */
struct kgpu_version {
	__u32 magic;
	__u32 abi_version;
};

#define KGPU_IOC_BASE		0xb7
#define KGPU_IOC_VERSION	_IOR(KGPU_IOC_BASE, 0x00, struct kgpu_version)

#endif /* _UAPI_KGPU_H */
