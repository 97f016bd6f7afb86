// SPDX-License-Identifier: GPL-2.0
/*
 * kgpu core: the channel between the device-mapper targets (gpu-crypt,
 * gpu-raid6) and the user-space helper that runs their arithmetic on GPUs.
 *
 * For now this is the skeleton the rest grows on: it registers the misc
 * device /dev/kgpu, through which the helper will attach (mmap of the shared
 * region, poll, ioctl), and answers KGPU_IOC_VERSION so that user space can
 * check the ABI it speaks. Nothing here is on an I/O path yet, so a missing
 * helper changes nothing.
 */
#include <linux/fs.h>
#include <linux/miscdevice.h>
#include <linux/module.h>
#include <linux/uaccess.h>

#include "uapi/kgpu.h"

static long kgpu_ioctl(struct file *file, unsigned int cmd, unsigned long arg)
{
	struct kgpu_version v = {
		.magic = KGPU_MAGIC,
		.abi_version = KGPU_ABI_VERSION,
	};

	switch (cmd) {
	case KGPU_IOC_VERSION:
		if (copy_to_user((void __user *)arg, &v, sizeof(v)))
			return -EFAULT;
		return 0;
	default:
		return -ENOTTY;
	}
}

static const struct file_operations kgpu_fops = {
	.owner		= THIS_MODULE,
	.unlocked_ioctl	= kgpu_ioctl,
	.compat_ioctl	= compat_ptr_ioctl,
	.llseek		= noop_llseek,
};

static struct miscdevice kgpu_misc = {
	.minor	= MISC_DYNAMIC_MINOR,
	.name	= "kgpu",
	.fops	= &kgpu_fops,
	.mode	= 0600,
};

static int __init kgpu_init(void)
{
	int ret = misc_register(&kgpu_misc);

	if (ret) {
		pr_err("kgpu: cannot register /dev/kgpu: %d\n", ret);
		return ret;
	}
	pr_info("kgpu: loaded, ABI %u\n", KGPU_ABI_VERSION);
	return 0;
}

static void __exit kgpu_exit(void)
{
	misc_deregister(&kgpu_misc);
	pr_info("kgpu: unloaded\n");
}

module_init(kgpu_init);
module_exit(kgpu_exit);

MODULE_AUTHOR("kgpu developers");
MODULE_DESCRIPTION("kgpu core: GPU offload channel for dm targets");
MODULE_LICENSE("GPL");
