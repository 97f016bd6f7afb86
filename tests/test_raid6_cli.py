"""`kgpu raid6`: table lines and `mdadm --examine` parsing, no kernel needed.

The --examine samples are Debian 12's mdadm output, captured in the VM
test's guest (the 1.0 one verbatim, the 1.2 one with its role, UUID, level,
layout and events made into fields); test_gpu_raid6.py's
test_cli_opens_mdadm_array runs the same parser against the real mdadm.
"""

import pytest
from click.testing import CliRunner

from kgpu_helper.cli.main import cli
from kgpu_helper.cli.raid6 import (Raid6Error, describe_status,
                                   geometry_from_examines, parse_status,
                                   replace_member, md_array_name,
                                   length_from_members, parse_chunk,
                                   parse_assemble_config, parse_examine,
                                   parse_examine_scan, plan_assemble,
                                   table_line)

EXAMINE_12 = """\
/dev/loop{role}:
          Magic : a92b4efc
        Version : 1.2
    Feature Map : 0x0
     Array UUID : {uuid}
           Name : kgpu-testbed:0  (local to host kgpu-testbed)
  Creation Time : Wed Dec  2 11:49:37 2026
     Raid Level : {level}
   Raid Devices : 5

 Avail Dev Size : 2048 sectors
     Array Size : 3072 KiB
    Data Offset : 2048 sectors
   Super Offset : 8 sectors
   Unused Space : before=1968 sectors, after=0 sectors
          State : clean
    Device UUID : 42aed7a0:8d39f931:a8f95013:78a629c4

    Update Time : Wed Dec  2 11:49:38 2026
  Bad Block Log : 512 entries available at offset 16 sectors
       Checksum : c1ea3533 - correct
         Events : {events}

         Layout : {layout}
     Chunk Size : 64K

   Device Role : Active device {role}
   Array State : AAAAA ('A' == active, '.' == missing, 'R' == replacing)
"""

# Verbatim, from an 8-member array made in the VM by the test's mdcreate.
EXAMINE_10 = """\
/dev/loop0:
          Magic : a92b4efc
        Version : 1.0
    Feature Map : 0x0
     Array UUID : f7c1cf1d:14610570:63a64564:197765e2
           Name : kgpu-testbed:0  (local to host kgpu-testbed)
  Creation Time : Wed Dec  2 11:48:36 2026
     Raid Level : raid6
   Raid Devices : 8

 Avail Dev Size : 4064 sectors
     Array Size : 11904 KiB (11.63 MiB 12.19 MB)
  Used Dev Size : 3968 sectors
   Super Offset : 4080 sectors
   Unused Space : before=0 sectors, after=104 sectors
          State : clean
    Device UUID : b20e9c6e:52a9f72b:cab029b9:f5abc282

    Update Time : Wed Dec  2 11:48:36 2026
  Bad Block Log : 512 entries available at offset -8 sectors
       Checksum : 779f4e27 - correct
         Events : 1

         Layout : ddf-zero-restart
     Chunk Size : 64K

   Device Role : Active device 0
   Array State : AAAAAAAA ('A' == active, '.' == missing, 'R' == replacing)
"""

UUID = "7a3f1c52:0d9b6e41:8e2f6a77:1c4b9d03"


def ex(role, uuid=UUID, level="raid6", layout="left-symmetric", events=0):
    return parse_examine(EXAMINE_12.format(role=role, uuid=uuid, level=level,
                                           layout=layout, events=events))


def test_parse_examine_12():
    e = ex(3)
    assert e == {"uuid": UUID, "level": "raid6", "raid_devices": 5,
                 "layout": "left-symmetric", "chunk_sectors": 128,
                 "data_offset": 2048, "array_sectors": 6144, "role": 3,
                 "events": 0}


def test_parse_examine_10_has_no_data_offset_line():
    e = parse_examine(EXAMINE_10)
    assert e["data_offset"] == 0 and e["chunk_sectors"] == 128
    assert e["layout"] == "ddf-zero-restart" and e["array_sectors"] == 23808
    assert e["raid_devices"] == 8 and e["role"] == 0 and e["events"] == 1


def test_parse_examine_without_superblock():
    with pytest.raises(Raid6Error, match="no md superblock"):
        parse_examine("mdadm: No md superblock detected on /dev/loop0.\n")


def test_geometry_orders_members_by_role_and_fills_missing():
    g = geometry_from_examines({"/dev/b": ex(1), "/dev/d": ex(4),
                                "/dev/a": ex(0), "/dev/c": ex(3)})
    assert g["devices"] == ["/dev/a", "/dev/b", "-", "/dev/c", "/dev/d"]
    line = table_line(g["layout"], g["chunk_sectors"], g["devices"],
                      g["length"], g["data_offset"])
    assert line == ("0 6144 gpu-raid6 left-symmetric 128 5 /dev/a /dev/b - "
                    "/dev/c /dev/d 2 data_offset 2048")


def test_ddf_layout_becomes_raid6_zr():
    assert table_line("ddf-zero-restart", 1024, ["a", "b", "c", "d"],
                      7936) == "0 7936 gpu-raid6 raid6_zr 1024 4 a b c d"


@pytest.mark.parametrize("examines,why", [
    ({"/dev/a": ex(0), "/dev/b": ex(1, uuid="1:2:3:4")}, "array UUID"),
    ({"/dev/a": ex(0), "/dev/b": ex(1, layout="right-symmetric")}, "layout"),
    ({"/dev/a": ex(0, level="raid5"), "/dev/b": ex(1, level="raid5")},
     "raid5 array, not raid6"),
    ({"/dev/a": ex(0), "/dev/b": ex(0, events=5)}, "both claim role 0 "
     r"\(events 5 and 0\): leave out the stale one"),
    ({"/dev/a": ex(0, layout="ddf-N-continue")}, "not supported"),
])
def test_geometry_refuses(examines, why):
    with pytest.raises(Raid6Error, match=why):
        geometry_from_examines(examines)


def test_table_line_refusals():
    with pytest.raises(Raid6Error, match="4 to 32 members"):
        table_line("left-symmetric", 128, ["a", "b", "c"], 100)
    with pytest.raises(Raid6Error, match="at most two"):
        table_line("left-symmetric", 128, ["a", "-", "-", "-"], 100)
    with pytest.raises(Raid6Error, match="unknown layout"):
        table_line("left-diagonal", 128, ["a", "b", "c", "d"], 100)


def test_chunk_and_length():
    assert parse_chunk("64K") == 128 and parse_chunk("1M") == 2048
    assert parse_chunk("512") == 1024
    with pytest.raises(Raid6Error, match="power of two"):
        parse_chunk("48K")
    # 6 members of 1000 sectors, 64K chunks: 7 rows of 4 data chunks
    assert length_from_members([1000] * 6, 128, 6) == 7 * 4 * 128
    assert length_from_members([1000, 3000, 1100, 5000], 128, 4, 100) == \
        7 * 2 * 128
    with pytest.raises(Raid6Error, match="no whole chunk"):
        length_from_members([100] * 4, 128, 4)


def test_cli_dry_run_and_refusals():
    r = CliRunner().invoke(cli, ["raid6", "create", "x", "--layout",
                                 "raid6_zr", "--chunk", "64K", "--sectors",
                                 "4096", "--dry-run", "a", "-", "c", "d"])
    assert r.exit_code == 0, r.output
    assert r.output.strip() == "0 4096 gpu-raid6 raid6_zr 128 4 a - c d"
    r = CliRunner().invoke(cli, ["raid6", "create", "x", "a", "b", "c", "d"])
    assert r.exit_code != 0 and "--from-mdadm" in r.output
    r = CliRunner().invoke(cli, ["raid6", "create", "x", "--from-mdadm",
                                 "--chunk", "64K", "a"])
    assert r.exit_code != 0 and "reads the geometry itself" in r.output


def test_lagging_member_is_passed_on_to_the_target():
    """The target decides which member is stale (md_superblocks)."""
    g = geometry_from_examines({"/dev/a": ex(0, events=7),
                                "/dev/b": ex(1, events=3),
                                "/dev/c": ex(2, events=7)})
    assert g["devices"][:3] == ["/dev/a", "/dev/b", "/dev/c"]
    line = table_line(g["layout"], g["chunk_sectors"], g["devices"],
                      g["length"], g["data_offset"], md_superblocks=True)
    assert line.endswith(" 3 data_offset 2048 md_superblocks"), line
    assert table_line("left-symmetric", 128, ["a", "b", "c", "d"], 256,
                      md_superblocks=True).endswith(" 4 a b c d 1 md_superblocks")


def test_parse_status_reads_dm_raid_fields_then_counters():
    st = parse_status("0 6144 gpu-raid6 raid6_ls 6 aaDaaa 1024/4096 resync "
                      "0 2048 - 5 6 7 8 9\n")
    assert st["raid_type"] == "raid6_ls" and st["devices"] == 6
    assert st["health"] == "aaDaaa" and st["action"] == "resync"
    assert (st["synced"], st["total"]) == (1024, 4096)
    assert st["data_offset"] == 2048 and st["kernel"] == 9
    text = "\n".join(describe_status(st))
    assert "out: 2" in text and "not in sync" in text and "25.0%" in text
    with pytest.raises(Raid6Error, match="not a gpu-raid6 status"):
        parse_status("0 100 crypt aes-xts-plain64 ...")


def test_replace_member_adds_rebuild():
    t = ("0 6144 gpu-raid6 left-symmetric 128 6 254:1 254:2 254:3 254:4 "
         "254:5 254:6 3 data_offset 2048 md_superblocks\n")
    assert replace_member(t, 2, "/dev/new") == (
        "0 6144 gpu-raid6 left-symmetric 128 6 254:1 254:2 /dev/new 254:4 "
        "254:5 254:6 5 data_offset 2048 md_superblocks rebuild 2")
    t2 = ("0 6144 gpu-raid6 raid6_zr 128 4 a - c d 2 rebuild 1\n")
    assert replace_member(t2, 1, "b") == \
        "0 6144 gpu-raid6 raid6_zr 128 4 a b c d 2 rebuild 1"
    assert replace_member("0 8 gpu-raid6 raid6_zr 128 4 a b c d", 3, "e") \
        == "0 8 gpu-raid6 raid6_zr 128 4 a b c e 2 rebuild 3"
    with pytest.raises(Raid6Error, match="out of range"):
        replace_member(t, 6, "/dev/new")
    with pytest.raises(Raid6Error, match="not a gpu-raid6 table"):
        replace_member("0 8 linear /dev/a 0", 0, "b")


# ---- kgpu raid6 assemble --scan ---------------------------------------------

SCAN = """\
ARRAY /dev/md/0  level=raid6 metadata=1.2 num-devices=6 UUID=c749f278:8a387146:b7514ee2:044bcc46 name=kgpu-testbed:0
   devices=/dev/dm-5,/dev/dm-4,/dev/dm-3,/dev/dm-2,/dev/dm-1,/dev/dm-0
ARRAY /dev/md/data  level=raid6 metadata=1.2 num-devices=4 UUID=0aa11bb2:33cc44dd:55ee66ff:77889900 name=host:data
   devices=/dev/sdb,/dev/sdc,/dev/sdd,/dev/sde
ARRAY /dev/md/1  level=raid1 metadata=1.2 num-devices=2 UUID=11111111:22222222:33333333:44444444 name=host:1
   devices=/dev/sdf,/dev/sdg
"""
U0 = "c749f278:8a387146:b7514ee2:044bcc46"
UD = "0aa11bb2:33cc44dd:55ee66ff:77889900"


def test_examine_scan_groups_members_by_array():
    arrays = parse_examine_scan(SCAN)
    assert [a["uuid"] for a in arrays] == [U0, UD,
                                           "11111111:22222222:33333333:44444444"]
    assert arrays[0]["devices"] == [f"/dev/dm-{i}" for i in (5, 4, 3, 2, 1, 0)]
    assert arrays[0]["level"] == "raid6" and arrays[0]["num_devices"] == "6"
    assert arrays[1]["name"] == "host:data"


def test_assemble_config_lines_and_their_errors():
    assert parse_assemble_config(
        f"# gpu-raid6 arrays\nARRAY r6 UUID={U0}  # the big one\n\n"
        f"ARRAY data UUID={UD.upper()}\n") == {U0: "r6", UD: "data"}
    for text, why in ((f"ARRAY r6 {U0}", "expected 'ARRAY <name>"),
                      (f"ARRAY r/6 UUID={U0}", "is not a device name"),
                      ("ARRAY r6 UUID=1234", "is not an md array UUID"),
                      (f"ARRAY r6 UUID={U0}\nARRAY r7 UUID={U0}",
                       "listed twice")):
        with pytest.raises(Raid6Error, match=why) as e:
            parse_assemble_config(text, "/etc/kgpu/raid6.conf")
        assert str(e.value).startswith("/etc/kgpu/raid6.conf:")


def test_assemble_takes_listed_arrays_and_leaves_the_rest_to_md():
    scan = parse_examine_scan(SCAN)
    todo, skipped = plan_assemble(scan, {U0: "r6"}, take_all=False)
    assert todo == [("r6", U0, [f"/dev/dm-{i}" for i in (5, 4, 3, 2, 1, 0)])]
    assert (UD, "not in the config: md's") in skipped
    assert any("raid1, not raid6" in why for _u, why in skipped)
    todo, _ = plan_assemble(scan, {U0: "r6"}, take_all=True)
    assert [(n, u) for n, u, _d in todo] == [("r6", U0), ("data", UD)]


def test_md_array_names_become_device_names():
    assert md_array_name("host:data", UD) == "data"
    assert md_array_name("kgpu-testbed:0", U0) == "md0"
    assert md_array_name(None, U0) == "md-c749f278"
    assert md_array_name("host:bad/name", U0) == "md-c749f278"


def test_assemble_needs_a_config_or_all(tmp_path):
    r = CliRunner().invoke(cli, ["raid6", "assemble", "--scan", "--config",
                                 str(tmp_path / "none.conf")])
    assert r.exit_code == 1 and "or give --all" in r.output
    bad = tmp_path / "bad.conf"
    bad.write_text("ARRAY r6\n")
    r = CliRunner().invoke(cli, ["raid6", "assemble", "--scan", "--config",
                                 str(bad)])
    assert r.exit_code == 1 and f"{bad}:1: expected" in r.output
