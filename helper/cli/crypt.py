"""``kgpu crypt``: open, close, take over and release gpu-crypt volumes.

gpu-crypt takes dm-crypt's table line, so these commands are thin: they
build or rewrite a table line and hand it to dmsetup on its standard input,
so that no key ever appears on a command line (``ps``) or in a log.
"""

import ctypes
import os
import subprocess
import tempfile

import click

SUPPORTED_CIPHERS = ("aes-xts-plain64", "aes-xts-plain",
                     "capi:xts(aes)-plain64", "capi:xts(aes)-plain")
# Optional parameters gpu-crypt takes (sector_size:N is checked apart).
SUPPORTED_FLAGS = ("allow_discards", "same_cpu_crypt",
                   "submit_from_crypt_cpus", "no_read_workqueue",
                   "no_write_workqueue", "iv_large_sectors")


class TableError(ValueError):
    """A table line gpu-crypt (or this tool) cannot take."""


def _dmsetup(*args, stdin=None):
    try:
        p = subprocess.run(["dmsetup", *args], input=stdin,
                           capture_output=True, text=True)
    except FileNotFoundError:
        raise click.ClickException("dmsetup not found; install dmsetup") \
            from None
    if p.returncode:
        msg = (p.stderr or p.stdout).strip().splitlines()
        raise click.ClickException(
            f"dmsetup {args[0]} {args[-1] if len(args) > 1 else ''} failed: "
            f"{msg[-1] if msg else 'status ' + str(p.returncode)} "
            "(the kernel log, dmesg, says why)")
    return p.stdout


def parse_crypt_table(text, target):
    """The fields of a one-line ``target`` table, as a dict.

    Raises TableError when the mapping is not a single ``target`` line that
    gpu-crypt can serve.
    """
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if len(lines) != 1:
        raise TableError(f"it has {len(lines)} targets; gpu-crypt swaps "
                         "only single-target crypt mappings")
    f = lines[0].split()
    if len(f) < 8 or f[2] != target:
        raise TableError(f"it is a '{f[2] if len(f) > 2 else '?'}' mapping, "
                         f"not '{target}'")
    t = dict(start=f[0], length=f[1], target=f[2], cipher=f[3], key=f[4],
             iv_offset=f[5], device=f[6], offset=f[7], opts=[])
    if t["cipher"] not in SUPPORTED_CIPHERS:
        raise TableError(f"its cipher {t['cipher']} is not one gpu-crypt "
                         f"does ({', '.join(SUPPORTED_CIPHERS[:2])})")
    if len(f) > 8:
        n = int(f[8])
        t["opts"] = f[9:9 + n]
        if len(t["opts"]) != n or len(f) != 9 + n:
            raise TableError("its optional parameters are malformed")
        for o in t["opts"]:
            if o not in SUPPORTED_FLAGS and not o.startswith("sector_size:"):
                raise TableError(f"gpu-crypt does not take its optional "
                                 f"parameter {o}")
    if t["key"] == "-" or not t["key"]:
        raise TableError("it has no key loaded")
    return t


def format_table(t, target):
    line = [t["start"], t["length"], target, t["cipher"], t["key"],
            t["iv_offset"], t["device"], t["offset"]]
    if t["opts"]:
        line += [str(len(t["opts"]))] + t["opts"]
    return " ".join(line)


def read_key_file(path, nbytes):
    """The first ``nbytes`` bytes of a key file, as cryptsetup's plain mode
    takes a key file (no hashing)."""
    with open(path, "rb") as f:
        key = f.read(nbytes)
    if len(key) != nbytes:
        raise click.ClickException(
            f"{path} holds {len(key)} bytes; a {nbytes * 8}-bit key needs "
            f"{nbytes}")
    return key


def device_sectors(device):
    try:
        fd = os.open(device, os.O_RDONLY)
    except OSError as e:
        raise click.ClickException(f"cannot open {device}: {e.strerror}") \
            from None
    try:
        return os.lseek(fd, 0, os.SEEK_END) // 512
    finally:
        os.close(fd)


# add_key(2), request_key(2) and keyctl(2): x86_64 system call numbers.
_SYS_ADD_KEY, _SYS_REQUEST_KEY, _SYS_KEYCTL = 248, 249, 250
# The session keyring: dmsetup, our child, inherits it, and the target's
# request_key() searches it. (Not the user keyring: a systemd service's
# private session keyring does not link it.)
_KEY_SPEC_SESSION_KEYRING = -3
_KEYCTL_REVOKE = 3


class _LogonKey:
    """A logon key in our session keyring for as long as the block runs:
    the target copies it when it loads the table, so it is revoked after."""

    def __init__(self, description, key):
        self.description, self.key, self.serial = description, key, None

    def __enter__(self):
        libc = ctypes.CDLL(None, use_errno=True)
        self._libc = libc
        serial = libc.syscall(_SYS_ADD_KEY, b"logon",
                              self.description.encode(), self.key,
                              len(self.key), _KEY_SPEC_SESSION_KEYRING)
        if serial < 0:
            raise click.ClickException(
                f"cannot add the key to the kernel keyring: "
                f"{os.strerror(ctypes.get_errno())}")
        self.serial = serial
        return self

    def __exit__(self, *exc):
        self._libc.syscall(_SYS_KEYCTL, _KEYCTL_REVOKE, self.serial)
        return False


def parse_crypttab(text):
    """/etc/crypttab as {name: (source, key file or None, {option: value})}
    (crypttab(5): name, device, key file, options; # starts a comment)."""
    out = {}
    for raw in text.splitlines():
        words = raw.split("#", 1)[0].split()
        if len(words) < 2:
            continue
        key = words[2] if len(words) > 2 else None
        if key in ("-", "none"):
            key = None
        opts = {}
        if len(words) > 3:
            for o in words[3].split(","):
                k, _, v = o.partition("=")
                opts[k] = v
        out[words[0]] = (words[1], key, opts)
    return out


def volume_key_from_crypttab(name, size, crypttab):
    """The LUKS volume key of ``name`` (``size`` bytes), read from its
    header with the key file its /etc/crypttab line gives."""
    try:
        with open(crypttab) as f:
            entry = parse_crypttab(f.read()).get(name)
    except FileNotFoundError:
        entry = None
    how = ("give the volume key with --key-file (cryptsetup luksDump "
           "--dump-volume-key --volume-key-file FILE DEV)")
    if entry is None:
        raise click.ClickException(
            f"{name} is left as it is: its key is no longer in the kernel "
            f"keyring and {crypttab} has no line for it; {how}")
    source, key_file, opts = entry
    if key_file is None or ":" in key_file:
        raise click.ClickException(
            f"{name} is left as it is: its key is no longer in the kernel "
            f"keyring and its {crypttab} line has no key file (a passphrase "
            f"or token unlocks it); {how}")
    if "=" in source:           # UUID=..., PARTUUID=..., LABEL=...
        p = subprocess.run(["findfs", source], capture_output=True, text=True)
        if p.returncode != 0:
            raise click.ClickException(f"{name}: no device {source}")
        source = p.stdout.strip()
    argv = ["cryptsetup", "luksDump", "--dump-volume-key", "--batch-mode",
            "--key-file", key_file]
    for opt, flag in (("keyfile-offset", "--keyfile-offset"),
                      ("keyfile-size", "--keyfile-size"),
                      ("header", "--header")):
        if opts.get(opt):
            argv += [flag, opts[opt]]
    # cryptsetup writes the key to a new file: a private folder on a tmpfs
    # (/run), read back and removed at once.
    d = tempfile.mkdtemp(prefix="kgpu-vk-",
                         dir="/run" if os.path.isdir("/run") else None)
    path = os.path.join(d, "vk")
    try:
        p = subprocess.run(argv + ["--volume-key-file", path, source],
                           capture_output=True, text=True)
        if p.returncode != 0:
            raise click.ClickException(
                f"{name} is left as it is: reading its volume key with the "
                f"key file of {crypttab} failed: "
                f"{(p.stderr or p.stdout).strip()}")
        with open(path, "rb") as f:
            key = f.read()
    finally:
        if os.path.exists(path):
            os.unlink(path)
        os.rmdir(d)
    if len(key) != size:
        raise click.ClickException(
            f"{name}: the volume key from {source} has {len(key)} bytes, "
            f"the table {size}")
    return key


def _in_keyring(ktype, desc):
    """Whether the target, loading a table from this process (or dmsetup,
    its child), would find the key: the same search, request_key()
    without a call-out."""
    libc = ctypes.CDLL(None, use_errno=True)
    return libc.syscall(_SYS_REQUEST_KEY, ktype.encode(), desc.encode(),
                        None, 0) >= 0


def _swap(name, source, dest, key_file, crypttab="/etc/crypttab"):
    """Swap mapping ``name`` from target ``source`` to ``dest``, live."""
    try:
        t = parse_crypt_table(_dmsetup("table", "--showkeys", name), source)
    except TableError as e:
        raise click.ClickException(f"{name} is left as it is: {e}") from None
    new = format_table(t, dest)
    key = t["key"]
    if key.startswith(":"):
        # ":<size>:<type>:<description>": the key must be in the keyring
        # when the new table loads. cryptsetup drops it after activating.
        size, ktype, desc = key[1:].split(":", 2)
        if key_file and ktype != "logon":
            raise click.ClickException(
                f"{name} uses a '{ktype}' key; --key-file adds logon keys "
                "only")
        if key_file:
            with _LogonKey(desc, read_key_file(key_file, int(size))):
                _load(name, new, key_hint=False)
        elif ktype == "logon" and not _in_keyring(ktype, desc):
            # Gone from the keyring: the volume key from the LUKS header,
            # unlocked with the key file /etc/crypttab gives the volume.
            with _LogonKey(desc, volume_key_from_crypttab(name, int(size),
                                                          crypttab)):
                _load(name, new, key_hint=False)
        else:
            _load(name, new, key_hint=True)
    else:
        _load(name, new, key_hint=False)
    # The new table is loaded in the inactive slot: swap it in.
    _dmsetup("suspend", name)
    try:
        _dmsetup("resume", name)
    except click.ClickException:
        _dmsetup("clear", name)
        _dmsetup("resume", name)
        raise
    return t


def _load(name, table, key_hint):
    try:
        _dmsetup("load", name, stdin=table + "\n")
    except click.ClickException as e:
        hint = ""
        if key_hint:
            hint = ("; if the kernel log says 'Keyring key not found', give "
                    "the volume key with --key-file (for LUKS: cryptsetup "
                    "luksDump --dump-volume-key --volume-key-file FILE DEV)")
        raise click.ClickException(
            f"{name} is left as it is: {e.message}{hint}") from None


@click.group("crypt")
def crypt():
    """gpu-crypt volumes: open and close them, or move a volume that stock
    dm-crypt has open over to gpu-crypt and back, live.

    gpu-crypt takes dm-crypt's table line and writes the same bytes, so a
    volume opened here reads the same through cryptsetup, and the reverse.
    """


@crypt.command("open")
@click.argument("name")
@click.argument("device", type=click.Path(exists=True, dir_okay=False))
@click.option("--key-file", required=True,
              type=click.Path(exists=True, dir_okay=False),
              help="Read the key from this file (its first key-size bits, "
                   "as cryptsetup's plain mode does: no hashing).")
@click.option("--cipher", default="aes-xts-plain64", show_default=True,
              type=click.Choice(SUPPORTED_CIPHERS[:2]))
@click.option("--key-size", default=512, show_default=True,
              type=click.Choice(["256", "512"]), help="Bits: 256 for "
              "AES-128-XTS, 512 for AES-256-XTS.")
@click.option("--sector-size", default=512, show_default=True,
              type=click.Choice(["512", "1024", "2048", "4096"]),
              help="Bytes of one encryption unit.")
@click.option("--offset", default=0, show_default=True, type=int,
              help="Start of the data on DEVICE, in 512-byte sectors.")
@click.option("--skip", default=0, show_default=True, type=int,
              help="IV offset: added to every sector number in the IV.")
@click.option("--size", type=int, help="Sectors to map (default: the rest "
              "of DEVICE after --offset).")
@click.option("--iv-large-sectors", is_flag=True,
              help="IVs count sector-size units, not 512-byte sectors.")
@click.option("--allow-discards", is_flag=True)
@click.option("--readonly", is_flag=True)
def open_cmd(name, device, key_file, cipher, key_size, sector_size, offset,
             skip, size, iv_large_sectors, allow_discards, readonly):
    """Map DEVICE as /dev/mapper/NAME through gpu-crypt.

    Builds the table that `cryptsetup open --type plain --cipher CIPHER
    --key-size KEY_SIZE --key-file FILE --offset OFFSET --skip SKIP`
    would, with gpu-crypt as the target.
    """
    key = read_key_file(key_file, int(key_size) // 8)
    ss = int(sector_size)
    if offset < 0 or skip < 0:
        raise click.BadParameter("--offset and --skip are sector counts, "
                                 "0 or more")
    if size is None:
        size = device_sectors(device) - offset
        size -= size % (ss // 512)
    if size <= 0:
        raise click.ClickException(f"nothing to map: {device} has no "
                                   f"sectors after offset {offset}")
    opts = []
    if allow_discards:
        opts.append("allow_discards")
    if ss != 512:
        opts.append(f"sector_size:{ss}")
    if iv_large_sectors:
        opts.append("iv_large_sectors")
    t = dict(start="0", length=str(size), cipher=cipher, key=key.hex(),
             iv_offset=str(skip), device=os.path.realpath(device),
             offset=str(offset), opts=opts)
    args = ["create", name] + (["--readonly"] if readonly else [])
    _dmsetup(*args, stdin=format_table(t, "gpu-crypt") + "\n")
    _dmsetup("mknodes", name)
    click.echo(f"/dev/mapper/{name}: {size} sectors of {device} through "
               f"gpu-crypt ({cipher}, {key_size}-bit key)")


@crypt.command("close")
@click.argument("name")
def close_cmd(name):
    """Remove the gpu-crypt mapping NAME."""
    try:
        parse_crypt_table(_dmsetup("table", name), "gpu-crypt")
    except TableError as e:
        raise click.ClickException(f"{name} is left as it is: {e}") from None
    _dmsetup("remove", name)


_KEY_FILE_HELP = ("The volume key, raw, for a mapping whose key is a "
                  "keyring reference that is no longer in the keyring "
                  "(LUKS2: cryptsetup luksDump --dump-volume-key "
                  "--volume-key-file FILE DEV). Without it, such a key is "
                  "read from the LUKS header with the key file of NAME's "
                  "line in --crypttab.")
_CRYPTTAB_HELP = ("Where a LUKS2 volume's key file is found when its key "
                  "has left the keyring (as after systemd-cryptsetup).")


@crypt.command("takeover")
@click.argument("name")
@click.option("--key-file", type=click.Path(exists=True, dir_okay=False),
              help=_KEY_FILE_HELP)
@click.option("--crypttab", default="/etc/crypttab", show_default=True,
              help=_CRYPTTAB_HELP)
def takeover(name, key_file, crypttab):
    """Move the open dm-crypt mapping NAME to gpu-crypt, live.

    Loads the same table with the target changed, then suspends and
    resumes NAME: a mounted file system keeps working. A mapping gpu-crypt
    cannot serve (another cipher, integrity, several targets) is refused
    and left untouched. `kgpu crypt release NAME` moves it back.
    """
    t = _swap(name, "crypt", "gpu-crypt", key_file, crypttab)
    click.echo(f"{name}: now served by gpu-crypt ({t['cipher']}); "
               f"cryptsetup status and close know only dm-crypt: "
               f"`kgpu crypt release {name}` first")


@crypt.command("release")
@click.argument("name")
@click.option("--key-file", type=click.Path(exists=True, dir_okay=False),
              help=_KEY_FILE_HELP)
@click.option("--crypttab", default="/etc/crypttab", show_default=True,
              help=_CRYPTTAB_HELP)
def release(name, key_file, crypttab):
    """Move the gpu-crypt mapping NAME back to stock dm-crypt, live."""
    t = _swap(name, "gpu-crypt", "crypt", key_file, crypttab)
    click.echo(f"{name}: now served by dm-crypt ({t['cipher']})")
