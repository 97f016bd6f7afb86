"""The CPU anchor: ``openssl speed -evp aes-256-xts`` in the same run.

Both benches (``kgpu bench compute``, ``kgpu bench ring``) print and
store OpenSSL's own AES-256-XTS rate at their request sizes, on one core
and on all cores (``-multi``), so that every GPU figure stands next to
what the machine's CPU does with OpenSSL's assembler (AES-NI / VAES).
OpenSSL encrypts each buffer as ONE XTS data unit of that size (the
benches' requests are units of 512 to 4096 bytes): the same AES work,
a few tweak setups fewer.
"""

import os
import re
import shutil
import subprocess

# IEEE 1619 caps an XTS data unit at 2^20 blocks (16 MiB) and OpenSSL
# refuses longer inputs, so `openssl speed -bytes` above that times failed
# calls and prints nonsense (terabytes per second): such sizes are skipped.
MAX_XTS_UNIT = 16 << 20

_LINE = re.compile(r"^aes-256-xts\s+([0-9.]+)k\s*$", re.I | re.M)


def openssl_xts(sizes, seconds=1, cores=None):
    """{"version", "cores", "results": [{size, one_core_gbps,
    all_cores_gbps, one_core_s_per_gb}]}, or {"error": why} without
    openssl. ``seconds`` per size and core count."""
    exe = shutil.which("openssl")
    if not exe:
        return {"error": "openssl is not installed"}
    cores = cores or os.cpu_count() or 1
    try:
        ver = subprocess.run([exe, "version"], capture_output=True,
                             text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError) as e:
        return {"error": f"openssl version: {e}"}
    out = {"version": ver, "cores": cores, "seconds": seconds,
           "command": f"openssl speed [-multi {cores}] -evp aes-256-xts "
                      f"-bytes SIZE -seconds {seconds}", "results": []}
    skipped = [z for z in sizes if z > MAX_XTS_UNIT]
    if skipped:
        out["skipped_sizes"] = skipped
        out["skipped_why"] = ("an XTS data unit holds at most 2^20 blocks "
                              "(16 MiB); openssl refuses longer inputs")
    for size in sizes:
        if size > MAX_XTS_UNIT:
            continue
        row = {"size": size}
        for key, multi in (("one_core_gbps", []),
                           ("all_cores_gbps", ["-multi", str(cores)])):
            cmd = [exe, "speed", *multi, "-evp", "aes-256-xts", "-bytes",
                   str(size), "-seconds", str(seconds)]
            try:
                r = subprocess.run(cmd, capture_output=True, text=True,
                                   timeout=60 + 4 * seconds)
                m = _LINE.findall(r.stdout)
            except (OSError, subprocess.SubprocessError):
                m = []
            row[key] = round(float(m[-1]) * 1e3 / 1e9, 3) if m else None
        g = row["one_core_gbps"]
        row["one_core_s_per_gb"] = round(1 / g, 4) if g else None
        out["results"].append(row)
    return out


def format_anchor(a):
    """Lines for a bench's text output."""
    if "error" in a:
        return [f"openssl anchor: {a['error']}"]
    lines = [f"openssl anchor ({a['version']}; {a['command']}):"]
    for r in a["results"]:
        lines.append(
            f"  aes-256-xts {r['size'] >> 10}K: 1 core {r['one_core_gbps']} "
            f"GB/s ({r['one_core_s_per_gb']} s/GB), {a['cores']} cores "
            f"{r['all_cores_gbps']} GB/s")
    return lines
