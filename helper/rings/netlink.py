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

from kgpu_helper.rings import abi

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
    "KGPU_ATTR_SVC_GPU_RESIDENT": "uint64",
    "KGPU_ATTR_SVC_KERNEL_CPU": "uint64",
}
NLA_MAP = tuple((name, ATTR_TYPES[name]) for name in abi.ATTR_NAMES)

GLOBAL_ATTRS = ("HELPER_PID", "HELPER_STALLED", "PROVIDER", "RING_ENTRIES",
                "INFLIGHT", "DATA_SIZE", "DATA_USED", "TIMEOUT_MS", "TIMEOUTS",
                "ATTACHES", "BAD_COMPLETIONS", "WAITS")
SERVICE_ATTRS = ("REQUESTS", "BYTES", "GPU", "GPU_RESIDENT", "HELPER_CPU",
                 "FALLBACK", "ERRORS", "KERNEL_CPU", "CROSSOVER")


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
    (``id``, ``name``, ``requests``, ``bytes``, ``gpu``, ``gpu_resident``,
    ``helper_cpu``, ``fallback``, ``errors``, ``kernel_cpu``,
    ``crossover``; what each counts: uapi/kgpu.h), with the two figures
    derived from them that :func:`service_paths` adds. Missing attributes
    (a module older than ABI 5 lacks ``gpu_resident`` and ``kernel_cpu``)
    are None."""
    out = {a.lower(): msg.get_attr("KGPU_ATTR_" + a) for a in GLOBAL_ATTRS}
    services = []
    for s in msg.get_attrs("KGPU_ATTR_SERVICE"):
        sid = s.get_attr("KGPU_ATTR_SVC_ID")
        d = {"id": sid,
             "name": s.get_attr("KGPU_ATTR_SVC_NAME")
             or abi.SERVICE_NAMES.get(sid, f"service-{sid}")}
        for a in SERVICE_ATTRS:
            d[a.lower()] = s.get_attr("KGPU_ATTR_SVC_" + a)
        d.update(service_paths(d))
        services.append(d)
    out["services"] = services
    return out


def service_paths(s):
    """What a service's counters imply: ``gpu_batched``, the GPU answers
    that came from batched launches (``gpu`` less ``gpu_resident``), and
    ``total``, every request of the service whichever path served it
    (``requests``, those handed to kgpu, plus ``kernel_cpu``, those never
    handed to it). None where a counter they need is missing."""
    gpu, req = s.get("gpu"), s.get("requests")
    return {"gpu_batched": None if gpu is None
            else gpu - (s.get("gpu_resident") or 0),
            "total": None if req is None
            else req + (s.get("kernel_cpu") or 0)}


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
    lines += _service_table(st.get("services", []), st.get("inflight"))
    return "\n".join(lines)


#: the per-service table: (first header line, second, key in the dict)
_COLUMNS = (("", "requests", "total"),
            ("GPU", "resident", "gpu_resident"),
            ("GPU", "batched", "gpu_batched"),
            ("helper", "CPU", "helper_cpu"),
            ("kernel", "fallback", "fallback"),
            ("kernel", "by choice", "kernel_cpu"),
            ("", "errors", "errors"),
            ("bytes", "sent", "bytes"),
            ("", "crossover", "crossover"))


def _size(n):
    """Bytes for people: 0, 512 B, 64 KiB, 1.5 GiB."""
    if n is None:
        return "-"
    if n < 1024:
        return f"{n} B" if n else "0"
    for unit in ("KiB", "MiB", "GiB", "TiB", "PiB"):
        n /= 1024
        if n < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if n == int(n) else f"{n:.1f} {unit}"


def _service_table(services, inflight):
    """Per service, how many requests each path served, as aligned
    columns, and what the columns mean."""
    rows = []
    for s in services:
        s = {**s, **service_paths(s)}
        row = [s["name"]]
        for _h1, _h2, key in _COLUMNS:
            x = s.get(key)
            row.append(_size(x) if key in ("bytes", "crossover")
                       else "-" if x is None else str(x))
        rows.append(row)
    heads = [("", "service")] + [(h1, h2) for h1, h2, _k in _COLUMNS]
    widths = [max([len(h1), len(h2)] + [len(r[i]) for r in rows])
              for i, (h1, h2) in enumerate(heads)]

    def line(cells):
        first = f"{cells[0]:<{widths[0]}}"
        rest = "".join(f"  {c:>{w}}" for c, w in zip(cells[1:], widths[1:]))
        return (first + rest).rstrip()
    out = [line([h1 for h1, _h2 in heads]), line([h2 for _h1, h2 in heads])]
    out += [line(r) for r in rows]
    out += ["",
            "Each request counts once, in the path that served it: the GPU "
            "(its resident",
            "kernel, or a batched launch), the helper's CPU, or the "
            "kernel's CPU, after a",
            "fallback (timeout, error, helper gone) or by choice (below the "
            "crossover, no",
            "helper or no room). Errors are part of fallback; bytes sent: "
            "of the requests",
            "handed to the helper."]
    if inflight:
        out.append(f"The {inflight} requests in flight count in 'requests' "
                   f"only, so far.")
    return out
