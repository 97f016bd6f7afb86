"""Generic netlink client of the kgpu module (family "kgpu", version 1).

::

    enum kgpu_genl_cmd { KGPU_CMD_UNSPEC, KGPU_CMD_GET_STATS,
                         KGPU_CMD_SET_CROSSOVER };
    enum kgpu_genl_attr { KGPU_ATTR_UNSPEC, KGPU_ATTR_HELPER_PID, ...,
                          KGPU_ATTR_SERVICE (nested), KGPU_ATTR_SVC_ID, ...,
                          KGPU_ATTR_PAD };

The attribute names come from ``abi.ATTR_NAMES`` (one list, checked
against the header by tests/test_abi.py); the types are below. u64
attributes are sent with ``nla_put_u64_64bit`` (alignment padding in
``KGPU_ATTR_PAD`` attributes, which are skipped). A nested
``KGPU_ATTR_SERVICE`` holds the ``KGPU_ATTR_SVC_*`` attributes of one
service, in the same attribute space.

    with KgpuNetlink() as nl:
        stats = nl.get_stats()          # dict, see parse_stats()
        nl.set_crossover(abi.SVC_XTS_ENC, 65536)
"""

import errno

from pyroute2.netlink import NLM_F_ACK, NLM_F_REQUEST, genlmsg, nla
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.generic import GenericNetlinkSocket

from kgpu_helper import abi

ATTR_TYPES = {
    "KGPU_ATTR_UNSPEC": "none",
    "KGPU_ATTR_HELPER_PID": "uint32",
    "KGPU_ATTR_RING_ENTRIES": "uint32",
    "KGPU_ATTR_INFLIGHT": "uint32",
    "KGPU_ATTR_DATA_SIZE": "uint64",
    "KGPU_ATTR_DATA_USED": "uint64",
    "KGPU_ATTR_TIMEOUT_MS": "uint32",
    "KGPU_ATTR_TIMEOUTS": "uint64",
    "KGPU_ATTR_ATTACHES": "uint64",
    "KGPU_ATTR_BAD_COMPLETIONS": "uint64",
    "KGPU_ATTR_WAITS": "uint64",
    "KGPU_ATTR_SERVICE": "service",
    "KGPU_ATTR_SVC_ID": "uint32",
    "KGPU_ATTR_SVC_NAME": "asciiz",
    "KGPU_ATTR_SVC_REQUESTS": "uint64",
    "KGPU_ATTR_SVC_BYTES": "uint64",
    "KGPU_ATTR_SVC_GPU": "uint64",
    "KGPU_ATTR_SVC_HELPER_CPU": "uint64",
    "KGPU_ATTR_SVC_FALLBACK": "uint64",
    "KGPU_ATTR_SVC_ERRORS": "uint64",
    "KGPU_ATTR_SVC_CROSSOVER": "uint32",
    "KGPU_ATTR_PAD": "hex",
    "KGPU_ATTR_HELPER_STALLED": "uint32",
    "KGPU_ATTR_PROVIDER": "asciiz",
}
NLA_MAP = tuple((name, ATTR_TYPES[name]) for name in abi.ATTR_NAMES)

GLOBAL_ATTRS = ("HELPER_PID", "HELPER_STALLED", "PROVIDER", "RING_ENTRIES",
                "INFLIGHT", "DATA_SIZE", "DATA_USED", "TIMEOUT_MS", "TIMEOUTS",
                "ATTACHES", "BAD_COMPLETIONS", "WAITS")
SERVICE_ATTRS = ("REQUESTS", "BYTES", "GPU", "HELPER_CPU", "FALLBACK",
                 "ERRORS", "CROSSOVER")


class kgpumsg(genlmsg):
    """A message of the "kgpu" family."""

    prefix = "KGPU_ATTR_"
    nla_map = NLA_MAP

    class service(nla):
        prefix = "KGPU_ATTR_"
        # the same attribute space; a service never nests another
        nla_map = tuple((n, "hex" if t == "service" else t)
                        for n, t in NLA_MAP)


class KgpuNotLoaded(RuntimeError):
    """The generic netlink family "kgpu" does not exist."""

    def __init__(self):
        super().__init__("kgpu module not loaded (no generic netlink family "
                         "'kgpu'): modprobe kgpu, or insmod kgpu.ko")


def stats_request():
    msg = kgpumsg()
    msg["cmd"] = abi.CMD_GET_STATS
    msg["version"] = abi.GENL_VERSION
    return msg


def crossover_request(svc_id, nbytes):
    nbytes = int(nbytes)
    if not 0 <= nbytes <= 0xFFFFFFFF:
        raise ValueError(f"crossover must be 0..4294967295 bytes, got "
                         f"{nbytes}")
    msg = kgpumsg()
    msg["cmd"] = abi.CMD_SET_CROSSOVER
    msg["version"] = abi.GENL_VERSION
    msg["attrs"] = [("KGPU_ATTR_SVC_ID", int(svc_id)),
                    ("KGPU_ATTR_SVC_CROSSOVER", nbytes)]
    return msg


def parse_stats(msg):
    """A GET_STATS reply -> a plain dict: the global counters in lower case
    (``helper_pid``, ``ring_entries``...) and ``services``, a list of dicts
    (``id``, ``name``, ``requests``, ``bytes``, ``gpu``, ``helper_cpu``,
    ``fallback``, ``errors``, ``crossover``). Missing attributes are None."""
    out = {a.lower(): msg.get_attr("KGPU_ATTR_" + a) for a in GLOBAL_ATTRS}
    services = []
    for s in msg.get_attrs("KGPU_ATTR_SERVICE"):
        sid = s.get_attr("KGPU_ATTR_SVC_ID")
        d = {"id": sid,
             "name": s.get_attr("KGPU_ATTR_SVC_NAME")
             or abi.SERVICE_NAMES.get(sid, f"service-{sid}")}
        for a in SERVICE_ATTRS:
            d[a.lower()] = s.get_attr("KGPU_ATTR_SVC_" + a)
        services.append(d)
    out["services"] = services
    return out


class KgpuNetlink(GenericNetlinkSocket):
    """A socket bound to the "kgpu" family; raises KgpuNotLoaded when the
    module is not there."""

    def __init__(self):
        super().__init__()
        try:
            self.bind(abi.GENL_NAME, kgpumsg)
        except NetlinkError as e:
            self.close()
            if e.code in (errno.ENOENT, errno.ENOTSUP):
                raise KgpuNotLoaded() from None
            raise

    def get_stats(self):
        replies = self.nlm_request(stats_request(), msg_type=self.prid,
                                   msg_flags=NLM_F_REQUEST)
        for m in replies:
            if m.get("cmd") == abi.CMD_GET_STATS or m.get_attrs(
                    "KGPU_ATTR_SERVICE"):
                return parse_stats(m)
        raise RuntimeError("the kgpu module sent no statistics")

    def set_crossover(self, svc_id, nbytes):
        """Requests of service ``svc_id`` below ``nbytes`` stay on the
        kernel's CPU. Needs CAP_NET_ADMIN (PermissionError otherwise)."""
        try:
            self.nlm_request(crossover_request(svc_id, nbytes),
                             msg_type=self.prid,
                             msg_flags=NLM_F_REQUEST | NLM_F_ACK)
        except NetlinkError as e:
            if e.code == errno.EPERM:
                raise PermissionError(
                    "setting the crossover needs root (CAP_NET_ADMIN)") \
                    from None
            raise


def format_stats(st):
    """The readable summary of ``kgpu status``."""
    def mib(n):
        return "?" if n is None else f"{n / (1 << 20):.1f} MiB"

    pid = st.get("helper_pid")
    stalled = (", STALLED: a request got no answer in time; requests go "
               "to the CPU until it answers" if st.get("helper_stalled")
               else "")
    where = (" on the host (ivshmem)" if st.get("provider") == "ivshmem"
             else "")
    who = f"attached, pid {pid}{where}" if pid else "none"
    lines = [f"helper:    {who}"
             f"{stalled} (attaches so far: {st.get('attaches')})",
             f"ring:      {st.get('inflight')}/{st.get('ring_entries')} "
             f"requests in flight; data {mib(st.get('data_used'))} of "
             f"{mib(st.get('data_size'))} in use",
             f"timeouts:  {st.get('timeouts')} (timeout "
             f"{st.get('timeout_ms')} ms); bad completions "
             f"{st.get('bad_completions')}; submitters that waited "
             f"{st.get('waits')}",
             ""]
    head = (f"{'service':<10}{'requests':>11}{'bytes':>15}{'gpu':>11}"
            f"{'helper-cpu':>11}{'fallback':>11}{'errors':>8}"
            f"{'crossover':>11}")
    lines.append(head)
    for s in st.get("services", []):
        def v(k):
            x = s.get(k)
            return "-" if x is None else str(x)
        lines.append(f"{s['name']:<10}{v('requests'):>11}{v('bytes'):>15}"
                     f"{v('gpu'):>11}{v('helper_cpu'):>11}"
                     f"{v('fallback'):>11}{v('errors'):>8}"
                     f"{v('crossover'):>11}")
    return "\n".join(lines)
