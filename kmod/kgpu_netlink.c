// SPDX-License-Identifier: GPL-2.0
/*
 * kgpu core: the generic netlink family "kgpu" (statistics and tunables),
 * the way nbd is configured over netlink. Commands and attributes are in
 * uapi/kgpu.h; `kgpu status` is the user-space side.
 */
#define pr_fmt(fmt) KBUILD_MODNAME ": " fmt

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
	    nla_put_u32(skb, KGPU_ATTR_SVC_CROSSOVER, s->crossover)) {
		nla_nest_cancel(skb, nest);
		return -EMSGSIZE;
	}
	nla_nest_end(skb, nest);
	return 0;
}

static int kgpu_fill_stats(struct sk_buff *skb, const struct kgpu_stats *st)
{
	unsigned int i;

	if (nla_put_u32(skb, KGPU_ATTR_HELPER_PID, st->helper_pid) ||
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

int kgpu_netlink_init(void)
{
	return genl_register_family(&kgpu_genl_family);
}

void kgpu_netlink_exit(void)
{
	genl_unregister_family(&kgpu_genl_family);
}
