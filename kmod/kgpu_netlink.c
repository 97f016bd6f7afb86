// SPDX-License-Identifier: GPL-2.0
/*
 * kgpu core: the generic netlink family "kgpu" (statistics and tunables),
 * the way nbd is configured over netlink. Commands and attributes are in
 * uapi/kgpu.h; `kgpu status` is the user-space side. The same statistics
 * as text in debugfs, for a guest with no Python:
 *
 *	cat /sys/kernel/debug/kgpu/stats
 *
 * one "key: value" line per global attribute (the netlink names, lower
 * case), then one line per service: "service NAME: requests N bytes N
 * gpu N helper_cpu N fallback N errors N crossover N gpu_resident N
 * kernel_cpu N" (the last two since ABI 5, after the others so that
 * readers of the older line still parse it).
 */
#define pr_fmt(fmt) KBUILD_MODNAME ": " fmt

#include <linux/debugfs.h>
#include <linux/seq_file.h>
#include <linux/slab.h>
#include <net/genetlink.h>

#include "kgpu_internal.h"

static struct genl_family kgpu_genl_family;

static const struct nla_policy kgpu_genl_policy[KGPU_ATTR_MAX + 1] = {
	[KGPU_ATTR_SVC_ID]		= NLA_POLICY_MAX(NLA_U32, KGPU_SVC_COUNT - 1),
	[KGPU_ATTR_SVC_CROSSOVER]	= { .type = NLA_U32 },
};

static int kgpu_put_service(struct sk_buff *skb, unsigned int id,
			    const struct kgpu_svc_stats *s)
{
	struct nlattr *nest = nla_nest_start(skb, KGPU_ATTR_SERVICE);

	if (!nest)
		return -EMSGSIZE;
	if (nla_put_u32(skb, KGPU_ATTR_SVC_ID, id) ||
	    nla_put_string(skb, KGPU_ATTR_SVC_NAME, kgpu_svc_names[id]) ||
	    nla_put_u64_64bit(skb, KGPU_ATTR_SVC_REQUESTS, s->requests,
			      KGPU_ATTR_PAD) ||
	    nla_put_u64_64bit(skb, KGPU_ATTR_SVC_BYTES, s->bytes,
			      KGPU_ATTR_PAD) ||
	    nla_put_u64_64bit(skb, KGPU_ATTR_SVC_GPU, s->gpu, KGPU_ATTR_PAD) ||
	    nla_put_u64_64bit(skb, KGPU_ATTR_SVC_HELPER_CPU, s->helper_cpu,
			      KGPU_ATTR_PAD) ||
	    nla_put_u64_64bit(skb, KGPU_ATTR_SVC_FALLBACK, s->fallback,
			      KGPU_ATTR_PAD) ||
	    nla_put_u64_64bit(skb, KGPU_ATTR_SVC_ERRORS, s->errors,
			      KGPU_ATTR_PAD) ||
	    nla_put_u32(skb, KGPU_ATTR_SVC_CROSSOVER, s->crossover) ||
	    nla_put_u64_64bit(skb, KGPU_ATTR_SVC_GPU_RESIDENT, s->gpu_resident,
			      KGPU_ATTR_PAD) ||
	    nla_put_u64_64bit(skb, KGPU_ATTR_SVC_KERNEL_CPU, s->kernel_cpu,
			      KGPU_ATTR_PAD)) {
		nla_nest_cancel(skb, nest);
		return -EMSGSIZE;
	}
	nla_nest_end(skb, nest);
	return 0;
}

static int kgpu_fill_stats(struct sk_buff *skb, const struct kgpu_stats *st)
{
	unsigned int i;

	if (nla_put_string(skb, KGPU_ATTR_PROVIDER, st->provider) ||
	    nla_put_u32(skb, KGPU_ATTR_HELPER_PID, st->helper_pid) ||
	    nla_put_u32(skb, KGPU_ATTR_HELPER_STALLED, st->helper_stalled) ||
	    nla_put_u32(skb, KGPU_ATTR_RING_ENTRIES, st->ring_entries) ||
	    nla_put_u32(skb, KGPU_ATTR_INFLIGHT, st->inflight) ||
	    nla_put_u64_64bit(skb, KGPU_ATTR_DATA_SIZE, st->data_size,
			      KGPU_ATTR_PAD) ||
	    nla_put_u64_64bit(skb, KGPU_ATTR_DATA_USED, st->data_used,
			      KGPU_ATTR_PAD) ||
	    nla_put_u32(skb, KGPU_ATTR_TIMEOUT_MS, st->timeout_ms) ||
	    nla_put_u64_64bit(skb, KGPU_ATTR_TIMEOUTS, st->timeouts,
			      KGPU_ATTR_PAD) ||
	    nla_put_u64_64bit(skb, KGPU_ATTR_ATTACHES, st->attaches,
			      KGPU_ATTR_PAD) ||
	    nla_put_u64_64bit(skb, KGPU_ATTR_BAD_COMPLETIONS,
			      st->bad_completions, KGPU_ATTR_PAD) ||
	    nla_put_u64_64bit(skb, KGPU_ATTR_WAITS, st->waits, KGPU_ATTR_PAD))
		return -EMSGSIZE;
	for (i = 0; i < KGPU_SVC_COUNT; i++)
		if (kgpu_put_service(skb, i, &st->svc[i]))
			return -EMSGSIZE;
	return 0;
}

static int kgpu_genl_get_stats(struct sk_buff *skb, struct genl_info *info)
{
	struct kgpu_stats *st;
	struct sk_buff *msg;
	void *hdr;
	int ret = -ENOMEM;

	st = kzalloc(sizeof(*st), GFP_KERNEL);
	msg = genlmsg_new(NLMSG_GOODSIZE, GFP_KERNEL);
	if (!st || !msg)
		goto out;
	kgpu_get_stats(st);
	hdr = genlmsg_put_reply(msg, info, &kgpu_genl_family, 0,
				KGPU_CMD_GET_STATS);
	if (!hdr) {
		ret = -EMSGSIZE;
		goto out;
	}
	ret = kgpu_fill_stats(msg, st);
	if (ret)
		goto out;
	genlmsg_end(msg, hdr);
	kfree(st);
	return genlmsg_reply(msg, info);
out:
	nlmsg_free(msg);
	kfree(st);
	return ret;
}

static int kgpu_genl_set_crossover(struct sk_buff *skb, struct genl_info *info)
{
	if (!info->attrs[KGPU_ATTR_SVC_ID] ||
	    !info->attrs[KGPU_ATTR_SVC_CROSSOVER]) {
		GENL_SET_ERR_MSG(info, "needs KGPU_ATTR_SVC_ID and KGPU_ATTR_SVC_CROSSOVER");
		return -EINVAL;
	}
	return kgpu_set_crossover(nla_get_u32(info->attrs[KGPU_ATTR_SVC_ID]),
			nla_get_u32(info->attrs[KGPU_ATTR_SVC_CROSSOVER]));
}

static const struct genl_small_ops kgpu_genl_ops[] = {
	{
		.cmd	= KGPU_CMD_GET_STATS,
		.doit	= kgpu_genl_get_stats,
	},
	{
		.cmd	= KGPU_CMD_SET_CROSSOVER,
		.doit	= kgpu_genl_set_crossover,
		.flags	= GENL_ADMIN_PERM,
	},
};

static struct genl_family kgpu_genl_family __ro_after_init = {
	.name		= KGPU_GENL_NAME,
	.version	= KGPU_GENL_VERSION,
	.maxattr	= KGPU_ATTR_MAX,
	.policy		= kgpu_genl_policy,
	.module		= THIS_MODULE,
	.small_ops	= kgpu_genl_ops,
	.n_small_ops	= ARRAY_SIZE(kgpu_genl_ops),
};

static int kgpu_stats_show(struct seq_file *m, void *v)
{
	struct kgpu_stats *st = kzalloc(sizeof(*st), GFP_KERNEL);
	unsigned int i;

	if (!st)
		return -ENOMEM;
	kgpu_get_stats(st);
	seq_printf(m, "provider: %s\n", st->provider);
	seq_printf(m, "helper_pid: %d\n", st->helper_pid);
	seq_printf(m, "helper_stalled: %u\n", st->helper_stalled);
	seq_printf(m, "ring_entries: %u\n", st->ring_entries);
	seq_printf(m, "inflight: %u\n", st->inflight);
	seq_printf(m, "data_size: %llu\n", st->data_size);
	seq_printf(m, "data_used: %llu\n", st->data_used);
	seq_printf(m, "timeout_ms: %u\n", st->timeout_ms);
	seq_printf(m, "timeouts: %llu\n", st->timeouts);
	seq_printf(m, "attaches: %llu\n", st->attaches);
	seq_printf(m, "bad_completions: %llu\n", st->bad_completions);
	seq_printf(m, "waits: %llu\n", st->waits);
	for (i = 0; i < KGPU_SVC_COUNT; i++) {
		const struct kgpu_svc_stats *s = &st->svc[i];

		seq_printf(m, "service %s: requests %llu bytes %llu gpu %llu helper_cpu %llu fallback %llu errors %llu crossover %u gpu_resident %llu kernel_cpu %llu\n",
			   kgpu_svc_names[i], s->requests, s->bytes, s->gpu,
			   s->helper_cpu, s->fallback, s->errors, s->crossover,
			   s->gpu_resident, s->kernel_cpu);
	}
	kfree(st);
	return 0;
}
DEFINE_SHOW_ATTRIBUTE(kgpu_stats);

void kgpu_stats_debugfs_init(struct dentry *dir)
{
	debugfs_create_file("stats", 0400, dir, NULL, &kgpu_stats_fops);
}

int kgpu_netlink_init(void)
{
	return genl_register_family(&kgpu_genl_family);
}

void kgpu_netlink_exit(void)
{
	genl_unregister_family(&kgpu_genl_family);
}
