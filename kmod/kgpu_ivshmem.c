// SPDX-License-Identifier: GPL-2.0
/*
 * kgpu core: the ivshmem region provider, for a guest without a GPU served
 * by its host's (uapi/kgpu.h, "The ivshmem region provider", is the
 * protocol).
 *
 * The device is QEMU's ivshmem-doorbell (PCI 1af4:1110): BAR0 holds its
 * registers (IVPosition, our peer id, at 8; Doorbell at 12: writing
 * peer << 16 | vector interrupts that peer), BAR2 is a shared-memory file
 * of the host, mapped write-back, and MSI-X vector 0 is the host helper's
 * interrupt to us. The region is laid out in BAR2 by kgpu_region_setup()
 * as a vmalloc region would be; struct kgpu_link in its header page
 * replaces /dev/kgpu.
 *
 * The interrupt only queues ivs.work, on a WQ_MEM_RECLAIM workqueue of its
 * own: done() callbacks run in process context, as with KGPU_IOC_COMPLETE.
 * The work item, one at a time, is the only one that attaches or detaches
 * while loaded: it reads the link (a new token: the previous helper, if
 * any, is detached and the new one attached; a helper that stopped:
 * detached), then reaps the CQ. ivs.token is the attached helper's token,
 * touched by the work item and, once it can no longer run, by the stop.
 *
 * Probe runs at module load (synchronously: the driver can neither be
 * bound later nor unbound from sysfs). Unload stops in this order: no
 * more interrupts, no more work, the link down (guest_state and
 * guest_token 0, the key slots wiped, the doorbell rung), the helper's
 * requests completed on the CPU. The BARs stay mapped until the core is
 * done with the region (kgpu_ivshmem_exit()); a hot removal also waits,
 * after the stop, until every request is back from its submitter: their
 * buffers are in BAR2, which leaves with the device.
 */
#define pr_fmt(fmt) KBUILD_MODNAME ": " fmt

#include <linux/interrupt.h>
#include <linux/io.h>
#include <linux/mutex.h>
#include <linux/pci.h>
#include <linux/sizes.h>
#include <linux/workqueue.h>

#include "kgpu_internal.h"

#define IVS_IVPOSITION	8	/* BAR0 registers */
#define IVS_DOORBELL	12
#define IVS_HELPER_BELL	((KGPU_IVSHMEM_HELPER_PEER << 16) | 0)

static struct kgpu_ivs {
	struct pci_dev *pdev;		/* bound (kept until exit) */
	void __iomem *regs;		/* BAR0 */
	void *shm;			/* BAR2, the region */
	size_t shm_size;
	struct kgpu_link *link;
	struct workqueue_struct *wq;
	struct work_struct work;
	u32 token;			/* attached helper's token, 0: none */
	bool required;			/* region=ivshmem: errors are fatal */
	bool irq;			/* requested */
	bool up;			/* the region is laid out and live */
	bool stopping;			/* the work item must not attach */
	bool enabled;			/* pci_enable_device, regions held */
	char why[256];			/* why the device is not used */
} ivs;

static void kgpu_ivs_bell(void)
{
	iowrite32(IVS_HELPER_BELL, ivs.regs + IVS_DOORBELL);
}

/*
 * After a submission (sq_tail published, kg.lock dropped): wake the helper
 * if it sleeps. The barrier orders our sq_tail store before the load of
 * need_wakeup, against the helper's store of need_wakeup before its last
 * look at sq_tail: one of the two sees the other. Any context.
 */
void kgpu_ivshmem_kick(void)
{
	smp_mb();
	if (READ_ONCE(ivs.link->need_wakeup))
		kgpu_ivs_bell();
}

/* The link first, then the CQ; nothing read from the link is trusted. */
static void kgpu_ivs_work_fn(struct work_struct *work)
{
	struct kgpu_link *l = ivs.link;
	u32 xo[ARRAY_SIZE(l->crossover)];
	u32 state, token, pid;
	unsigned int i;

	/* Queued by an interrupt during probe, or at unload: not ours yet. */
	if (!smp_load_acquire(&ivs.up) || READ_ONCE(ivs.stopping))
		return;
	state = READ_ONCE(l->helper_state);
	/* The helper writes token, pid, crossovers, then the state. */
	smp_rmb();
	token = READ_ONCE(l->helper_token);
	/* A new token can come without a state change: pid, crossovers after. */
	smp_rmb();
	if (state == KGPU_LINK_ATTACH && token && token != ivs.token) {
		pid = READ_ONCE(l->helper_pid);
		for (i = 0; i < ARRAY_SIZE(xo); i++)
			xo[i] = READ_ONCE(l->crossover[i]);
		if (ivs.token) {
			WRITE_ONCE(l->guest_token, 0);
			kgpu_link_detach();	/* replaced: it died */
		}
		kgpu_link_attach(min_t(u32, pid, PID_MAX_LIMIT), xo,
				 ARRAY_SIZE(xo));
		ivs.token = token;
		/* Header, keys and indexes before the token that says so. */
		smp_wmb();
		WRITE_ONCE(l->guest_token, token);
		kgpu_ivs_bell();
	} else if (state != KGPU_LINK_ATTACH && ivs.token) {
		ivs.token = 0;
		WRITE_ONCE(l->guest_token, 0);
		kgpu_link_detach();
	}
	kgpu_link_reap();
}

static irqreturn_t kgpu_ivs_irq(int irq, void *data)
{
	queue_work(ivs.wq, &ivs.work);
	return IRQ_HANDLED;
}

#define ivs_fail(ret, fmt, ...) \
	({ snprintf(ivs.why, sizeof(ivs.why), fmt, ##__VA_ARGS__); (ret); })

static void kgpu_ivs_release(struct pci_dev *pdev)
{
	if (ivs.irq) {
		free_irq(pci_irq_vector(pdev, 0), &ivs);
		ivs.irq = false;
	}
	pci_free_irq_vectors(pdev);
	if (ivs.enabled) {
		pci_clear_master(pdev);
		pci_release_regions(pdev);
		pci_disable_device(pdev);
		ivs.enabled = false;
	}
}

static void kgpu_ivs_unmap(struct pci_dev *pdev)
{
	if (ivs.shm)
		memunmap(ivs.shm);
	if (ivs.regs)
		pci_iounmap(pdev, ivs.regs);
	ivs.shm = NULL;
	ivs.regs = NULL;
	ivs.link = NULL;
}

static int kgpu_ivs_probe(struct pci_dev *pdev, const struct pci_device_id *id)
{
	resource_size_t start, len;
	size_t data_size;
	int ret;

	if (ivs.pdev)
		return -EBUSY;	/* one device is the region; no other */
	ret = pci_enable_device(pdev);
	if (ret)
		return ivs_fail(ret, "cannot enable the device (%d)", ret);
	ret = pci_request_regions(pdev, KBUILD_MODNAME);
	if (ret) {
		pci_disable_device(pdev);
		return ivs_fail(ret, "its BARs are in use (%d)", ret);
	}
	ivs.enabled = true;
	pci_set_master(pdev);	/* MSI-X messages are its writes */

	start = pci_resource_start(pdev, 2);
	len = pci_resource_len(pdev, 2);
	if (!(pci_resource_flags(pdev, 2) & IORESOURCE_MEM) || !len) {
		ret = ivs_fail(-ENODEV, "it has no shared memory (BAR2)");
		goto bad;
	}
	ivs.shm_size = len;
	data_size = kgpu_region_data_size(len);
	if (data_size < SZ_1M) {
		ret = ivs_fail(-ENOSPC, "its shared memory of %llu KiB leaves %zu KiB of data space, less than 1 MiB; give the server a larger size",
			       (unsigned long long)len >> 10, data_size >> 10);
		goto bad;
	}
	ivs.regs = pci_iomap(pdev, 0, 0);
	ivs.shm = memremap(start, len, MEMREMAP_WB);
	if (!ivs.regs || !ivs.shm) {
		ret = ivs_fail(-ENOMEM, "cannot map BAR0 or BAR2");
		goto bad;
	}
	ivs.link = ivs.shm + KGPU_LINK_OFF;

	ret = pci_alloc_irq_vectors(pdev, 1, 1, PCI_IRQ_MSIX);
	if (ret < 0) {
		ret = ivs_fail(ret, "it has no MSI-X vector (%d), so the host helper cannot interrupt this guest (an ivshmem-plain device has none); QEMU: -device ivshmem-doorbell,chardev=...,vectors=1, served by the helper's ivshmem server",
			       ret);
		goto bad;
	}
	ret = request_irq(pci_irq_vector(pdev, 0), kgpu_ivs_irq, 0,
			  "kgpu-ivshmem", &ivs);
	if (ret) {
		ret = ivs_fail(ret, "cannot request its MSI-X interrupt (%d)",
			       ret);
		goto bad;
	}
	ivs.irq = true;

	/*
	 * The memory is the host's and outlives a reload or reboot of this
	 * guest: say it is not valid before rewriting it, so that a helper
	 * still serving the previous instance stops at its next look.
	 */
	WRITE_ONCE(ivs.link->guest_state, KGPU_LINK_NONE);
	WRITE_ONCE(ivs.link->guest_token, 0);
	smp_wmb();
	/* The last step that can fail; the work item waits for ivs.up. */
	ret = kgpu_region_setup(ivs.shm, data_size, ivs.link);
	if (ret) {
		ret = ivs_fail(ret, "no memory for the ring's bookkeeping");
		goto bad;
	}
	ivs.pdev = pci_dev_get(pdev);
	ivs.token = 0;
	WRITE_ONCE(ivs.link->guest_token, 0);
	WRITE_ONCE(ivs.link->guest_id, ioread32(ivs.regs + IVS_IVPOSITION));
	/* The region before the state that says it is valid. */
	smp_wmb();
	WRITE_ONCE(ivs.link->guest_state, KGPU_LINK_READY);
	smp_store_release(&ivs.up, true);
	pci_info(pdev, "region in BAR2: %llu MiB shared memory, %zu KiB data space, ivshmem peer %u; the helper is peer %u on the host\n",
		 (unsigned long long)len >> 20, data_size >> 10,
		 READ_ONCE(ivs.link->guest_id), KGPU_IVSHMEM_HELPER_PEER);
	/* A helper may be waiting already: look at the link now. */
	queue_work(ivs.wq, &ivs.work);
	kgpu_ivs_bell();
	return 0;

bad:
	kgpu_ivs_release(pdev);
	kgpu_ivs_unmap(pdev);
	return ret;
}

/*
 * Stop serving: at unload (before the core lets go of the region) or at a
 * hot removal. Idempotent.
 */
void kgpu_ivshmem_stop(void)
{
	static DEFINE_MUTEX(stop_lock);	/* unload against hot removal */

	mutex_lock(&stop_lock);
	if (!ivs.up) {
		mutex_unlock(&stop_lock);
		return;
	}
	WRITE_ONCE(ivs.stopping, true);
	if (ivs.irq) {
		free_irq(pci_irq_vector(ivs.pdev, 0), &ivs);
		ivs.irq = false;
	}
	cancel_work_sync(&ivs.work);	/* and no interrupt queues it again */

	WRITE_ONCE(ivs.link->guest_state, KGPU_LINK_NONE);
	WRITE_ONCE(ivs.link->guest_token, 0);
	kgpu_region_wipe_keys();
	smp_wmb();
	kgpu_ivs_bell();
	ivs.token = 0;
	/* What the helper still had: done() on the CPU. */
	kgpu_link_detach();
	ivs.up = false;
	mutex_unlock(&stop_lock);
}

static void kgpu_ivs_remove(struct pci_dev *pdev)
{
	if (pdev != ivs.pdev)
		return;
	if (ivs.up)
		pci_err(pdev, "removed while kgpu uses it: requests go to the CPU until kgpu is unloaded\n");
	kgpu_ivshmem_stop();
	/* BAR2 goes with the device: not before every request is back. */
	kgpu_wait_idle();
	kgpu_ivs_release(pdev);
}

static const struct pci_device_id kgpu_ivs_ids[] = {
	{ PCI_DEVICE(KGPU_IVSHMEM_VENDOR, KGPU_IVSHMEM_DEVICE) },
	{ }
};

static struct pci_driver kgpu_ivs_driver = {
	.name		= "kgpu-ivshmem",
	.id_table	= kgpu_ivs_ids,
	.probe		= kgpu_ivs_probe,
	.remove		= kgpu_ivs_remove,
	.driver = {
		/* The targets' requests point into BAR2: never unbound. */
		.suppress_bind_attrs	= true,
		.probe_type		= PROBE_FORCE_SYNCHRONOUS,
	},
};

/*
 * Use the first ivshmem device as the region. @required (region=ivshmem):
 * a missing or unusable device fails the load; otherwise (auto) the
 * caller falls back to vmalloc, and the log says why.
 */
int kgpu_ivshmem_init(bool required)
{
	struct pci_dev *dev;
	int ret;

	dev = pci_get_device(KGPU_IVSHMEM_VENDOR, KGPU_IVSHMEM_DEVICE, NULL);
	if (!dev) {
		if (required)
			pr_err("region=ivshmem: no ivshmem device (PCI %04x:%04x) in this machine; QEMU: -chardev socket,path=SOCKET,id=ivs0 -device ivshmem-doorbell,chardev=ivs0,vectors=1\n",
			       KGPU_IVSHMEM_VENDOR, KGPU_IVSHMEM_DEVICE);
		return -ENODEV;
	}
	pci_dev_put(dev);

	ivs.required = required;
	ivs.stopping = false;
	snprintf(ivs.why, sizeof(ivs.why),
		 "it is bound to another driver");
	ivs.wq = alloc_workqueue("kgpu-ivshmem", WQ_MEM_RECLAIM, 1);
	if (!ivs.wq)
		return -ENOMEM;
	INIT_WORK(&ivs.work, kgpu_ivs_work_fn);
	ret = pci_register_driver(&kgpu_ivs_driver);
	if (!ret && !ivs.pdev) {
		pci_unregister_driver(&kgpu_ivs_driver);
		ret = -ENODEV;
	}
	if (ret) {
		destroy_workqueue(ivs.wq);
		ivs.wq = NULL;
		if (required)
			pr_err("region=ivshmem: cannot use the ivshmem device: %s\n",
			       ivs.why);
		else
			pr_warn("not using the ivshmem device: %s; the region is in this guest's memory (vmalloc) instead\n",
				ivs.why);
		return ret == -ENODEV ? -ENODEV : ret;
	}
	return 0;
}

/* Unload, once the core is done with the region: let go of the device. */
void kgpu_ivshmem_exit(void)
{
	struct pci_dev *pdev = ivs.pdev;

	if (!pdev)
		return;
	pci_unregister_driver(&kgpu_ivs_driver);	/* remove(), if bound */
	kgpu_ivs_unmap(pdev);
	destroy_workqueue(ivs.wq);
	ivs.wq = NULL;
	ivs.pdev = NULL;
	pci_dev_put(pdev);
}
