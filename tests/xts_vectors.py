"""Reader for the NIST CAVP XTS-AES response files under vectors/xts/."""

import os

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "vectors",
                    "xts")


def load(kind, bits):
    """Entries of ``vectors/xts/<kind>/XTSGenAES<bits>.rsp``.

    kind: "tweak-128hexstr" (tweak given as 16 raw bytes, key "i") or
    "tweak-dataunitseqno" (tweak given as a data unit sequence number,
    which is plain64's sector number). Returns a list of dicts with keys
    op ("encrypt"/"decrypt"), key, tweak (bytes) or seqno (int), pt, ct.
    """
    path = os.path.join(HERE, kind, f"XTSGenAES{bits}.rsp")
    out = []
    op = None
    cur = {}
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line in ("[ENCRYPT]", "[DECRYPT]"):
                op = line[1:-1].lower()
                continue
            if not line or line.startswith("#") or "=" not in line:
                continue
            name, value = (s.strip() for s in line.split("=", 1))
            if name == "COUNT":
                cur = {"op": op, "count": int(value)}
                out.append(cur)
            elif name == "DataUnitLen":
                cur["bits"] = int(value)
            elif name == "Key":
                cur["key"] = bytes.fromhex(value)
            elif name == "i":
                cur["tweak"] = bytes.fromhex(value)
            elif name == "DataUnitSeqNumber":
                cur["seqno"] = int(value)
            elif name in ("PT", "CT"):
                cur[name.lower()] = bytes.fromhex(value)
    return out
