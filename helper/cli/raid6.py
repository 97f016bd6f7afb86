"""``kgpu raid6``: open md-compatible RAID6 arrays with the gpu-raid6 target.

The target's table line is
``0 <len> gpu-raid6 <layout> <chunk_sectors> <#devs> <dev0>... [<#opts>
[data_offset <sectors>] [md_superblocks]]``; this module builds it, either
from a layout and chunk given by hand or from what ``mdadm --examine`` says
about members of an array that mdadm created (then with md_superblocks:
the target keeps md's state in the members' superblocks and decides which
members are stale), and runs dmsetup. ``status`` shows the target's status
for people and follows a resync or check with a progress bar. The pure
parts (table lines, --examine and status parsing) are plain functions,
tested without a kernel.
"""

import re
import subprocess
import sys
import time

import click

# Layouts the target knows, by the names md (mdadm) and dm-raid use; the
# value is the name written into the table line.
LAYOUTS = {
    "left-asymmetric": "left-asymmetric",
    "right-asymmetric": "right-asymmetric",
    "left-symmetric": "left-symmetric",
    "right-symmetric": "right-symmetric",
    "raid6_zr": "raid6_zr",
    "ddf-zero-restart": "raid6_zr",
    "raid6_nr": "raid6_nr",
    "ddf-N-restart": "raid6_nr",
}
MIN_DEVS, MAX_DEVS = 4, 32
MISSING = "-"


class Raid6Error(ValueError):
    """Something about the members or the geometry that we refuse."""


def parse_chunk(text):
    """Chunk size in sectors from '64K', '512k', '1M' or a number of KiB."""
    m = re.fullmatch(r"\s*(\d+)\s*([kKmM]?)(i?[bB])?\s*", str(text))
    if not m:
        raise Raid6Error(f"chunk size must look like 64K or 1M, got {text!r}")
    kib = int(m.group(1)) * (1024 if m.group(2) in ("m", "M") else 1)
    sectors = kib * 2
    if sectors < 8 or sectors & (sectors - 1):
        raise Raid6Error(f"chunk size must be a power of two of at least 4K, "
                         f"got {text!r}")
    return sectors


def table_line(layout, chunk_sectors, devices, length, data_offset=0,
               md_superblocks=False):
    """The dmsetup table line for the target (one line, no newline)."""
    if layout not in LAYOUTS:
        raise Raid6Error(f"unknown layout {layout!r}; known: "
                         f"{', '.join(sorted(LAYOUTS))}")
    n = len(devices)
    if not MIN_DEVS <= n <= MAX_DEVS:
        raise Raid6Error(f"RAID6 needs {MIN_DEVS} to {MAX_DEVS} members, "
                         f"got {n}")
    missing = sum(1 for d in devices if d == MISSING)
    if missing > 2:
        raise Raid6Error(f"{missing} members missing: RAID6 survives at most "
                         f"two")
    if length <= 0:
        raise Raid6Error("the members are too small for one row of chunks")
    line = (f"0 {length} gpu-raid6 {LAYOUTS[layout]} {chunk_sectors} {n} "
            + " ".join(devices))
    opts = []
    if data_offset:
        opts += ["data_offset", str(data_offset)]
    if md_superblocks:
        opts.append("md_superblocks")
    if opts:
        line += f" {len(opts)} " + " ".join(opts)
    return line


def length_from_members(member_sectors, chunk_sectors, ndevs, data_offset=0):
    """Sectors of the array: whole rows of chunks on the smallest member."""
    usable = min(member_sectors) - data_offset
    if usable < chunk_sectors:
        raise Raid6Error(f"members of {min(member_sectors)} sectors hold no "
                         f"whole chunk after data_offset {data_offset}")
    rows = usable // chunk_sectors
    return rows * (ndevs - 2) * chunk_sectors


_FIELD = re.compile(r"^\s*([A-Za-z][A-Za-z ]*?)\s*:\s*(.*?)\s*$")


def parse_examine(text):
    """The fields of one member's ``mdadm --examine`` output, as a dict.

    Returns keys: uuid, level, raid_devices, layout, chunk_sectors,
    data_offset, array_sectors (or None), role (int, or None for a spare),
    events (or None).
    """
    fields = {}
    for line in text.splitlines():
        m = _FIELD.match(line)
        if m and m.group(1) not in fields:
            fields[m.group(1)] = m.group(2)
    if "Raid Level" not in fields:
        raise Raid6Error("no md superblock found (mdadm --examine shows no "
                         "Raid Level)")

    def number(key, default=None):
        v = fields.get(key)
        if v is None:
            return default
        m = re.match(r"(\d+)", v)
        if not m:
            raise Raid6Error(f"cannot read {key!r}: {v!r}")
        return int(m.group(1))

    role = None
    r = fields.get("Device Role") or fields.get("this")
    if r:
        m = re.search(r"Active device (\d+)", r)
        role = int(m.group(1)) if m else None
    chunk = fields.get("Chunk Size")
    array = fields.get("Array Size")
    array_sectors = None
    if array:
        m = re.match(r"(\d+)\s*(\w*)", array)
        if m:   # KiB unless it says sectors
            array_sectors = int(m.group(1)) * (
                1 if m.group(2).startswith("sector") else 2)
    return {
        "uuid": fields.get("Array UUID") or fields.get("UUID"),
        "level": fields["Raid Level"].strip().lower(),
        "raid_devices": number("Raid Devices"),
        "layout": (fields.get("Layout") or "").strip(),
        "chunk_sectors": parse_chunk(chunk) if chunk else None,
        "data_offset": number("Data Offset", 0),
        "array_sectors": array_sectors,
        "role": role,
        "events": number("Events"),
    }


def geometry_from_examines(examines):
    """Layout, chunk, ordered devices, data_offset and length of an array.

    ``examines``: {device path: parsed --examine}. Members the dict does
    not name become "-". Refuses members of different arrays or
    geometries, spares, and arrays that are not RAID6.
    """
    if not examines:
        raise Raid6Error("no members given")
    first_dev, first = next(iter(examines.items()))
    for dev, e in examines.items():
        if e["level"] != "raid6":
            raise Raid6Error(f"{dev} is a member of a {e['level']} array, "
                             f"not raid6")
        for key, what in (("uuid", "array UUID"), ("raid_devices",
                          "number of members"), ("layout", "layout"),
                          ("chunk_sectors", "chunk size"),
                          ("data_offset", "data offset")):
            if e[key] != first[key]:
                raise Raid6Error(f"{dev} and {first_dev} disagree on the "
                                 f"{what}: {e[key]} vs {first[key]}")
        if e["role"] is None:
            raise Raid6Error(f"{dev} is not an active member (a spare?)")
    n = first["raid_devices"]
    if not n or not MIN_DEVS <= n <= MAX_DEVS:
        raise Raid6Error(f"the array has {n} members; the target takes "
                         f"{MIN_DEVS} to {MAX_DEVS}")
    if first["layout"] not in LAYOUTS:
        raise Raid6Error(f"layout {first['layout']!r} is not supported; "
                         f"supported: {', '.join(sorted(LAYOUTS))}")
    # Members whose events lag are passed on: the target reads every
    # superblock (md_superblocks) and keeps a stale member out.
    devices = [MISSING] * n
    for dev, e in examines.items():
        if not 0 <= e["role"] < n:
            raise Raid6Error(f"{dev} claims role {e['role']} of {n}")
        other = devices[e["role"]]
        if other != MISSING:
            raise Raid6Error(f"{dev} and {other} both claim role "
                             f"{e['role']} (events {e['events']} and "
                             f"{examines[other]['events']}): leave out the "
                             f"stale one")
        devices[e["role"]] = dev
    length = first["array_sectors"]
    if not length:
        raise Raid6Error("mdadm --examine shows no Array Size")
    return {"layout": first["layout"], "chunk_sectors": first["chunk_sectors"],
            "devices": devices, "data_offset": first["data_offset"],
            "length": length}


def _run(argv):
    try:
        p = subprocess.run(argv, capture_output=True, text=True)
    except FileNotFoundError:
        raise click.ClickException(f"{argv[0]} is not installed") from None
    return p


def _member_sectors(dev):
    p = _run(["blockdev", "--getsz", dev])
    if p.returncode != 0:
        raise click.ClickException(f"cannot read the size of {dev}: "
                                   f"{p.stderr.strip()}")
    return int(p.stdout.strip())


def _dmsetup_create(name, line, dry_run):
    if dry_run:
        click.echo(line)
        return
    p = _run(["dmsetup", "create", name, "--table", line])
    if p.returncode != 0:
        raise click.ClickException(
            f"dmsetup create {name} failed: {p.stderr.strip()} (the kernel's "
            f"reason is in dmesg; table: {line})")
    _run(["dmsetup", "mknodes", name])
    click.echo(f"/dev/mapper/{name}: {line}")


def _line_from_mdadm(devices):
    """The md_superblocks table line of the md array of ``devices``."""
    examines = {}
    for dev in devices:
        if dev == MISSING:
            continue
        p = _run(["mdadm", "--examine", dev])
        if p.returncode != 0:
            raise Raid6Error(f"mdadm --examine {dev} failed: "
                             f"{(p.stderr or p.stdout).strip()}")
        examines[dev] = parse_examine(p.stdout)
    g = geometry_from_examines(examines)
    return table_line(g["layout"], g["chunk_sectors"], g["devices"],
                      g["length"], g["data_offset"], md_superblocks=True)


def parse_examine_scan(text):
    """``mdadm --examine --scan --verbose`` as a list of arrays: dicts of
    its key=value words (uuid, level, name, ...) with ``devices`` a list."""
    arrays = []
    for line in text.splitlines():
        words = line.split()
        if not words:
            continue
        if words[0] == "ARRAY":
            a = {"devices": []}
            for w in words[2:]:
                k, eq, v = w.partition("=")
                if eq:
                    a[k.lower().replace("-", "_")] = v
            arrays.append(a)
        elif arrays and words[0].startswith("devices="):
            arrays[-1]["devices"] += [d for d in
                                      words[0][len("devices="):].split(",")
                                      if d]
    return arrays


_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")
_UUID = re.compile(r"^[0-9a-f]{8}(:[0-9a-f]{8}){3}$")


def parse_assemble_config(text, where="config"):
    """The arrays to open as gpu-raid6: {uuid: name}, from lines
    ``ARRAY <name> UUID=<md's array UUID>`` (# starts a comment)."""
    arrays, names = {}, set()
    for n, raw in enumerate(text.splitlines(), 1):
        words = raw.split("#", 1)[0].split()
        if not words:
            continue
        if (len(words) != 3 or words[0] != "ARRAY" or
                not words[2].upper().startswith("UUID=")):
            raise Raid6Error(f"{where}:{n}: expected 'ARRAY <name> "
                             f"UUID=<uuid>', got {raw.strip()!r}")
        name, uuid = words[1], words[2][5:].lower()
        if not _NAME.match(name):
            raise Raid6Error(f"{where}:{n}: {name!r} is not a device name "
                             f"(letters, digits, _ . + -)")
        if not _UUID.match(uuid):
            raise Raid6Error(f"{where}:{n}: {uuid!r} is not an md array "
                             f"UUID (as mdadm --examine shows it)")
        if uuid in arrays or name in names:
            raise Raid6Error(f"{where}:{n}: {name} or its UUID is listed "
                             f"twice")
        arrays[uuid] = name
        names.add(name)
    return arrays


def md_array_name(name, uuid):
    """A device name from md's array name ("host:name"), else the UUID."""
    short = (name or "").rpartition(":")[2]
    if short.isdigit():
        short = f"md{short}"
    return short if short and _NAME.match(short) else \
        "md-" + uuid.replace(":", "")[:8]


def plan_assemble(scan, config, take_all):
    """[(name, uuid, devices)] to open and [(uuid, why)] left alone, from
    the scan and the config ({uuid: name})."""
    todo, skipped = [], []
    for a in scan:
        uuid = (a.get("uuid") or "").lower()
        if a.get("level") not in ("raid6", "6"):
            skipped.append((uuid, f"{a.get('level')}, not raid6: md's"))
            continue
        if uuid in config:
            name = config[uuid]
        elif take_all:
            name = md_array_name(a.get("name"), uuid)
        else:
            skipped.append((uuid, "not in the config: md's"))
            continue
        todo.append((name, uuid, a["devices"]))
    return todo, skipped


@click.group("raid6")
def raid6():
    """Open md RAID6 arrays (or new ones) with the gpu-raid6 target.

    The members keep exactly md's on-disk format, so an array can be used
    through gpu-raid6 and later assembled by mdadm, and the reverse. Stop
    the md array first: a member belongs to one of them at a time.
    """


@raid6.command("create")
@click.argument("name")
@click.argument("devices", nargs=-1, required=True)
@click.option("--from-mdadm", "from_mdadm", is_flag=True,
              help="Read level, layout, chunk, member order, data offset and "
                   "size from `mdadm --examine` of each member; members not "
                   "given are opened as missing.")
@click.option("--layout", type=click.Choice(sorted(LAYOUTS)),
              help="md layout (left-symmetric is mdadm's default, raid6_zr "
                   "alias ddf-zero-restart is LVM's).")
@click.option("--chunk", help="Chunk size, e.g. 64K or 512K.")
@click.option("--data-offset", type=click.IntRange(0), default=0,
              show_default=True, help="Sectors before the data on each member.")
@click.option("--sectors", type=click.IntRange(1),
              help="Array length in sectors (default: whole rows of chunks on "
                   "the smallest member; give it for md arrays with metadata "
                   "at the end, or use --from-mdadm).")
@click.option("--md-superblocks", is_flag=True,
              help="The members carry md v1.x superblocks: keep the array's "
                   "state in them as md does (implied by --from-mdadm). "
                   "Without it the array has no persistent state: scratch "
                   "arrays only.")
@click.option("--dry-run", is_flag=True, help="Print the table line only.")
def create(name, devices, from_mdadm, layout, chunk, data_offset, sectors,
           md_superblocks, dry_run):
    """Create device NAME over DEVICES ("-" for a missing member).

    \b
    kgpu raid6 create r6 --layout left-symmetric --chunk 64K /dev/sd[b-e]
    kgpu raid6 create r6 --from-mdadm /dev/sdb /dev/sdc /dev/sdd
    """
    try:
        if from_mdadm:
            if layout or chunk or data_offset or sectors:
                raise Raid6Error("--from-mdadm reads the geometry itself; "
                                 "leave out --layout/--chunk/--data-offset/"
                                 "--sectors")
            line = _line_from_mdadm(devices)
        else:
            if not layout or not chunk:
                raise Raid6Error("give --layout and --chunk, or --from-mdadm")
            cs = parse_chunk(chunk)
            present = [d for d in devices if d != MISSING]
            if not present:
                raise Raid6Error("no member devices given")
            length = sectors or length_from_members(
                [_member_sectors(d) for d in present], cs, len(devices),
                data_offset)
            line = table_line(layout, cs, list(devices), length, data_offset,
                              md_superblocks)
    except Raid6Error as e:
        raise click.ClickException(str(e)) from None
    _dmsetup_create(name, line, dry_run)


@raid6.command("assemble")
@click.option("--scan", is_flag=True, required=True,
              help="Find md RAID6 members by their superblocks (mdadm "
                   "--examine --scan) and group them by array UUID.")
@click.option("--config", "config_path", default="/etc/kgpu/raid6.conf",
              show_default=True,
              help="Arrays to open: lines 'ARRAY <name> UUID=<uuid>'.")
@click.option("--all", "take_all", is_flag=True,
              help="Open every md RAID6 found, those not in the config "
                   "named from md's array name.")
@click.option("--dry-run", is_flag=True, help="Print the table lines only.")
def assemble(scan, config_path, take_all, dry_run):
    """Open md RAID6 arrays as gpu-raid6, as mdadm --assemble --scan.

    Arrays listed in the config are opened under their names there; the
    others are left to md unless --all. An array whose device exists
    already is passed over. Exits 1 if an array could not be opened.

    \b
    # /etc/kgpu/raid6.conf
    ARRAY data UUID=c749f278:8a387146:b7514ee2:044bcc46
    """
    config = _read_assemble_config(config_path)
    if config is None:
        if not take_all:
            raise click.ClickException(
                f"no {config_path}: list the arrays to open there "
                f"('ARRAY <name> UUID=<uuid>', the UUID from mdadm "
                f"--examine), or give --all")
        config = {}
    p = _run(["mdadm", "--examine", "--scan", "--verbose"])
    if p.returncode != 0:
        raise click.ClickException("mdadm --examine --scan failed: "
                                   f"{(p.stderr or p.stdout).strip()}")
    todo, skipped = plan_assemble(parse_examine_scan(p.stdout), config,
                                  take_all)
    for uuid, why in skipped:
        click.echo(f"{uuid}: left alone ({why})")
    failed = 0
    for name, uuid, devices in todo:
        if _run(["dmsetup", "info", name]).returncode == 0:
            click.echo(f"{name} ({uuid}): already open, passed over")
            continue
        try:
            _dmsetup_create(name, _line_from_mdadm(devices), dry_run)
        except (Raid6Error, click.ClickException) as e:
            click.echo(f"{name} ({uuid}): not opened: "
                       f"{getattr(e, 'message', e)}", err=True)
            failed += 1
    missing = set(config) - {u for _n, u, _d in todo}
    for uuid in sorted(missing):
        click.echo(f"{config[uuid]} ({uuid}): no members found", err=True)
        failed += 1
    if failed:
        sys.exit(1)


def _read_assemble_config(config_path):
    try:
        with open(config_path) as f:
            return parse_assemble_config(f.read(), config_path)
    except FileNotFoundError:
        return None
    except Raid6Error as e:
        raise click.ClickException(str(e)) from None


@raid6.command("stop")
@click.option("--scan", is_flag=True, required=True,
              help="Every array of the config (as mdadm --stop --scan).")
@click.option("--config", "config_path", default="/etc/kgpu/raid6.conf",
              show_default=True, help="The arrays 'kgpu raid6 assemble "
                                      "--scan' opens.")
def stop(scan, config_path):
    """Remove the gpu-raid6 devices of the config's arrays.

    Their superblocks are marked clean as each is removed. Devices not
    open are passed over; one still in use (mounted, or under another
    mapping) is left open and reported. Exits 1 if any was left open.
    """
    config = _read_assemble_config(config_path)
    if config is None:
        raise click.ClickException(f"no {config_path}")
    left = 0
    for uuid, name in sorted(config.items(), key=lambda kv: kv[1]):
        p = _run(["dmsetup", "table", name])
        if p.returncode != 0:
            continue
        try:
            _remove_gpu_raid6(name, p.stdout, retry=True)
        except click.ClickException as e:
            click.echo(f"{name} ({uuid}): left open: {e.message}", err=True)
            left += 1
        else:
            click.echo(f"{name} ({uuid}): removed")
    if left:
        sys.exit(1)


def _remove_gpu_raid6(name, table, retry=False):
    """dmsetup remove NAME, whose `dmsetup table` is ``table``, if it is a
    gpu-raid6 device (``retry``: while it is briefly busy); raises
    ClickException saying why not."""
    if " gpu-raid6 " not in f" {table} ":
        raise click.ClickException(f"{name} is not a gpu-raid6 device: "
                                   f"{table.strip()}")
    p = _run(["dmsetup", "remove"] + (["--retry"] if retry else []) + [name])
    if p.returncode != 0:
        raise click.ClickException(f"dmsetup remove {name} failed: "
                                   f"{p.stderr.strip()}")


@raid6.command("remove")
@click.argument("name")
def remove(name):
    """Remove the gpu-raid6 device NAME (the members are left as they are)."""
    p = _run(["dmsetup", "table", name])
    if p.returncode != 0:
        raise click.ClickException(f"no device {name}: {p.stderr.strip()}")
    _remove_gpu_raid6(name, p.stdout)
    click.echo(f"removed {name}")


def replace_member(table, index, new_device):
    """``dmsetup table`` of a gpu-raid6 device with member ``index``
    replaced by ``new_device`` and ``rebuild <index>`` among the options."""
    f = table.split()
    if len(f) < 6 or f[2] != "gpu-raid6":
        raise Raid6Error(f"not a gpu-raid6 table: {table.strip()!r}")
    n = int(f[5])
    if not 0 <= index < n:
        raise Raid6Error(f"member index {index} out of range: the array has "
                         f"{n} members (0 to {n - 1})")
    devs = f[6:6 + n]
    opts = f[7 + n:] if len(f) > 6 + n else []
    devs[index] = new_device
    kept, i = [], 0
    while i < len(opts):      # an earlier rebuild of this member goes
        if opts[i] == "rebuild" and i + 1 < len(opts) \
                and int(opts[i + 1]) == index:
            i += 2
            continue
        kept.append(opts[i])
        i += 1
    kept += ["rebuild", str(index)]
    return " ".join(f[:6] + devs + [str(len(kept))] + kept)


@raid6.command("replace")
@click.argument("name")
@click.argument("index", type=click.IntRange(0))
@click.argument("new_device")
def replace(name, index, new_device):
    """Replace member INDEX of NAME with NEW_DEVICE and rebuild it.

    The table is reloaded live (suspend, load, resume) with the new member
    and ``rebuild INDEX``; the rebuild runs in the background while I/O goes
    on (follow it with ``kgpu raid6 status NAME --wait``). With md
    superblocks the new member gets its own, and an interrupted rebuild
    goes on from its checkpoint the next time the array is opened.
    """
    p = _run(["dmsetup", "table", name])
    if p.returncode != 0:
        raise click.ClickException(f"no device {name}: {p.stderr.strip()}")
    try:
        line = replace_member(p.stdout, index, new_device)
    except Raid6Error as e:
        raise click.ClickException(str(e)) from None
    for argv in (["dmsetup", "load", name, "--table", line],
                 ["dmsetup", "suspend", name], ["dmsetup", "resume", name]):
        p = _run(argv)
        if p.returncode != 0:
            if argv[1] == "load":
                _run(["dmsetup", "clear", name])
            raise click.ClickException(
                f"{' '.join(argv[:3])} failed: {p.stderr.strip()} (the "
                f"kernel's reason is in dmesg; table: {line})")
    click.echo(f"{name}: member {index} is now {new_device}, rebuilding")


# dmsetup status of gpu-raid6: dm-raid's fields, then kgpu's counters.
_STATUS_FIELDS = ("raid_type", "devices", "health", "sync_ratio", "action",
                  "mismatch_cnt", "data_offset", "journal", "stripes_written",
                  "degraded_reads", "gpu", "helper_cpu", "kernel")


def parse_status(line):
    """One ``dmsetup status`` line of a gpu-raid6 device, as a dict.

    Adds ``synced`` and ``total`` (per-member sectors) from the ratio."""
    f = line.split()
    if len(f) < 3 + len(_STATUS_FIELDS) or f[2] != "gpu-raid6":
        raise Raid6Error(f"not a gpu-raid6 status line: {line.strip()!r}")
    st = dict(zip(_STATUS_FIELDS, f[3:]))
    for k in _STATUS_FIELDS[5:]:
        if k not in ("journal",):
            st[k] = int(st[k])
    st["devices"] = int(st["devices"])
    done, _, total = st["sync_ratio"].partition("/")
    st["synced"], st["total"] = int(done), int(total)
    return st


def describe_status(st):
    """Lines for people."""
    pct = 100.0 * st["synced"] / st["total"] if st["total"] else 100.0
    health = st["health"]
    state = ("in sync" if "a" not in health else "not in sync")
    dead = [str(i) for i, ch in enumerate(health) if ch == "D"]
    return [
        f"layout        {st['raid_type']}, {st['devices']} members",
        f"health        {health}" + (f"  (out: {', '.join(dead)})"
                                     if dead else ""),
        f"array         {state}; {st['action']} "
        f"({st['synced']}/{st['total']} sectors per member, {pct:.1f}%)",
        f"mismatches    {st['mismatch_cnt']} sectors (last check or repair)",
        f"computations  gpu {st['gpu']}, helper cpu {st['helper_cpu']}, "
        f"kernel {st['kernel']}",
    ]


def _status_of(name):
    p = _run(["dmsetup", "status", name])
    if p.returncode != 0:
        raise click.ClickException(f"no device {name}: {p.stderr.strip()}")
    try:
        return parse_status(p.stdout)
    except Raid6Error as e:
        raise click.ClickException(str(e)) from None


@raid6.command("status")
@click.argument("name")
@click.option("--wait", "wait", is_flag=True,
              help="Follow a running resync, check or repair until it ends: "
                   "a progress bar with rate and ETA on a terminal, a plain "
                   "line every --interval seconds otherwise.")
@click.option("--interval", type=click.FloatRange(0.1), default=5.0,
              show_default=True, help="Seconds between plain lines.")
@click.option("--timeout", type=click.FloatRange(0), default=0,
              help="With --wait: give up after this many seconds (exit 1).")
def status(name, wait, interval, timeout):
    """Health, sync state and counters of the gpu-raid6 device NAME."""
    st = _status_of(name)
    for line in describe_status(st):
        click.echo(line)
    if not wait or st["action"] in ("idle", "frozen"):
        return
    start = time.monotonic()
    tty = sys.stdout.isatty()
    last = (start, st["synced"])
    shown = start
    action = st["action"]
    with click.progressbar(length=st["total"], label=action,
                           show_eta=True, show_percent=True,
                           file=sys.stdout if tty else None) as bar:
        bar.update(st["synced"])
        while st["action"] == action:
            if timeout and time.monotonic() - start > timeout:
                raise click.ClickException(f"{action} still running after "
                                           f"{timeout:g} s")
            time.sleep(min(interval, 0.5) if tty else 0.5)
            st = _status_of(name)
            bar.update(max(0, st["synced"] - bar.pos))
            now = time.monotonic()
            if not tty and now - shown >= interval:
                rate = (st["synced"] - last[1]) * 512 / max(now - last[0], 1e-6)
                left = (st["total"] - st["synced"]) * 512 / rate \
                    if rate > 0 else float("inf")
                click.echo(f"{action}: {st['synced']}/{st['total']} sectors, "
                           f"{rate / 1e6:.1f} MB/s per member, ETA "
                           f"{left:.0f} s")
                last, shown = (now, st["synced"]), now
    click.echo(f"{action} ended: {st['action']}, mismatches "
               f"{st['mismatch_cnt']} sectors, health {st['health']}")
