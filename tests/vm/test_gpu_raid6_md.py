"""gpu-raid6 keeps md's array state (md_superblocks), md as the oracle.

One guest per kernel runs raid6_md_guest.sh over arrays that mdadm made:
a member fails and comes back stale (never read, by gpu-raid6 or by
mdadm --assemble); a power cut under fio (dm-flakey drop_writes on every
member) leaves the superblocks active and parity stale, and re-opening
resyncs it; an array mdadm created without --assume-clean gets its
initial sync from gpu-raid6, interrupted and resumed from the superblock
checkpoint; check and repair count what md's check counts on the same
corruption, and a writer that changes its buffer mid-write leaves parity
right; md's write-intent bitmap is set while a region is written, cleared
lazily, kept while a member is out, and after a power cut only its dirty
rows resync; bad tables are refused with the reason and nothing written.
"""

import os
import re

import pytest

from conftest import guest_results, run_guest_script

pytestmark = pytest.mark.vm

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module", params=["6.1", "6.12"])
def guest(request):
    files = run_guest_script(request.param, f"{HERE}/raid6_md_guest.sh",
                             f"gpu-raid6-md-{request.param}", timeout=1500)
    res = {k: dict(kv.split("=", 1) for kv in v.split() if "=" in kv)
           for k, v in guest_results(files).items()}
    return res, guest_results(files), files


def test_superblocks_say_active_while_writing_and_clean_after(guest):
    st = guest[0]["stale_states"]
    assert st["busy"] == "active" and st["idle"] == "clean", st


def test_failure_recorded_before_the_write_is_acknowledged(guest):
    f = guest[0]["stale_fail"]
    assert f["wrc"] == "0", f                      # degraded write succeeded
    assert f["health"] == "AADAAA", f
    assert int(f["ev1"]) > int(f["ev0"]) > int(guest[0]["stale_states"]
                                                ["created"]), f
    assert f["array"] == "AA.AAA", f                # member 2 out
    assert int(f["m2"]) < int(f["ev1"]) - 1, f      # the failed one lags
    assert int(f["dmev1"]) > int(f["dmev0"]), f     # dm_table_event
    table = guest[2]["stale-table.txt"]
    assert " md_superblocks" in table, table


def test_stale_member_is_never_read(guest):
    r = guest[0]["stale_reopen"]
    assert r["health"] == "AADAAA", r
    assert r["cmp"] == "ok", r                      # gpu-raid6 read B, not A
    assert r["md_degraded"] == "1" and r["md_cmp"] == "ok", \
        guest[2].get("stale-mdadm.txt")


def test_power_cut_leaves_active_superblocks_and_resync_fixes_parity(guest):
    c = guest[0]["crash"]
    assert c["state"] == "active", c
    assert int(c["stale_sectors"]) > 0, c           # the cut did tear stripes
    # re-opening resynced the whole array (md_superblocks' size: 6144)
    assert c["log"] == "resync_from_sector_0,resync_done_at_sector_6144,", c
    d = guest[0]["crash_resynced"]
    assert d == {"health": "AAAAAA", "state": "clean", "md_mismatch": "0"}, d


def test_bitmap_bits_set_on_every_member_while_writing_cleared_lazily(guest):
    b = guest[0]["bitmap_lazy"]
    # two writers, rows 0 and 8; a 64 KiB bitmap chunk is one row
    assert b["bits"] == "48" and b["busy"] == "2" and b["busy_m5"] == "2", b
    # md's daemon: cleared two idle passes (daemon_sleep 5 s) after
    assert b["idle"] == "0" and 3 <= float(b["clear_s"]) <= 25, b


def test_bitmap_after_a_power_cut_only_dirty_rows_resync(guest):
    c = guest[0]["bitmap_crash"]
    assert c["state"] == "active" and c["dirty"] == "2", c
    assert int(c["stale_sectors"]) > 0, c           # the cut did tear stripes
    # the bits mdadm -X counted are the rows resynced; the rest passed over
    assert c["synced"] == c["dirty"] and c["passed"] == "46", c
    assert c["after"] == "0", c                     # cleared once in sync
    d = guest[0]["bitmap_degraded"]
    # md's own check after only those rows resynced: nothing stale is left
    assert d["md_mismatch"] == "0", d
    # md takes the bitmap as current, and reads the array degraded
    assert d["md_out_of_date"] == "0" and d["md_bitmap"], d
    assert d["md_degraded"] == "1", d


def test_bitmap_keeps_bits_while_a_member_is_out(guest):
    d = guest[0]["bitmap_degraded"]
    assert int(d["dirty"]) >= 1, d                  # 12 s idle, still set


def test_bitmap_of_metadata_1_0_kept_where_md_keeps_it(guest):
    v = guest[0]["bitmap_v10"]
    assert v["version"] == "1.0", v
    # written and clean at removal: every bit cleared, events with md's
    assert v["dirty"] == "0" and v["bm_events"] == v["sb_events"], v
    assert v["md_cmp"] == "ok" and v["md_mismatch"] == "0", v


def test_assemble_scan_opens_the_configured_arrays_only(guest):
    a = guest[0]["assemble"]
    # the listed array opens as gpu-raid6 under its config name, its data
    # as md wrote it; the unlisted one is left to md
    assert a["rc"] == "0" and a["data"] == "gpu-raid6", guest[2].get(
        "assemble.txt")
    assert a["cmp"] == "ok" and a["spare"] == "absent", a
    assert a["left_to_md"] == "yes", guest[2].get("assemble.txt")
    # again: already open, passed over; --all takes md's own name
    assert a["again_rc"] == "0" and a["again"] == "yes", a
    assert a["all_rc"] == "0" and a["all_spare"] == "gpu-raid6", a
    # a configured array with no members: said, and exit 1
    assert a["missing_rc"] == "1", a
    assert "gone (01234567:89abcdef:01234567:89abcdef): no members found" \
        in guest[2]["assemble-missing.txt"]


def test_initial_sync_of_an_unsynced_mdadm_array_resumes(guest):
    i = guest[0]["initial"]
    assert i["state1"] == "active", i               # checkpoint, not clean
    ro0, pos1, ro1, from2 = (int(i[k]) for k in ("ro0", "pos1", "ro1",
                                                  "from2"))
    # ours went on from md's checkpoint, was cut (max_recovery_rate kept it
    # slow), and the next table resumed from the checkpoint it wrote
    assert 0 <= ro0 < pos1 <= ro1 == from2 < 6144, i
    d = guest[0]["initial_done"]
    a, b = d["ratio"].split("/")
    assert d["health"] == "AAAAAA" and a == b, d
    assert d["ro"] == "none" and d["state"] == "clean", d
    assert d["md_mismatch"] == "0", d


def test_check_counts_what_md_counts_and_repair_fixes(guest):
    c = guest[0]["check"]
    assert c["md"] == "24", c                       # 3 blocks of 4 KiB
    assert c["gpu"] == c["md"] and c["repair"] == c["md"], c
    assert c["after"] == "0" and c["md_after"] == "0", c


def test_writer_changing_its_buffer_leaves_parity_right(guest):
    s = guest[0]["scribble"]
    assert "wrote_300" in guest[1]["scribble"], guest[2].get("scribble.txt")
    assert guest[0]["check"]["md_after"] == "0"
    assert s["msgrc"] != "0", s


def test_unknown_message_refused_precisely(guest):
    assert "unrecognised message 'frobnicate'" in guest[2]["msg-bad.txt"]


BAD = {
    "twoarrays": "Members of different md arrays",
    "chunk": "Chunk size differs from the md superblocks",
    "layout": "Layout differs from the md superblocks",
    "members": "Number of members differs",
    "offset": "data_offset differs from the md superblocks",
    "order": "Member order differs",
    "twice": "The same device is given as two members",
    "length": "Target length",
    "rate": "Invalid recovery rate",
    "rebuildidx": "Rebuild index out of range",
    "rebuild3": "More than two members to rebuild",
    "v090": "md 0.90 metadata is not supported",
    "bitmap": "md bitmap damaged: bad magic",
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_table_refused_precisely(guest, name):
    got = guest[1].get(f"bad_{name}", "missing")
    assert got.startswith("OK") and BAD[name] in got, got


def test_refused_tables_write_nothing(guest):
    n = guest[0]["bad_nothing_written"]
    assert n["before"] == n["after"], n


def test_no_kernel_complaints(guest):
    dmesg = guest[2]["dmesg.txt"]
    for bad in ("BUG:", "Oops", "WARNING:", "Call Trace", "hung_task"):
        assert bad not in dmesg, dmesg[-3000:]


def test_rebuild_of_a_replaced_member_under_fio_verify(guest):
    r = guest[0]["rebuild_one"]
    assert r["failed"] == "AADAAA" and r["array_failed"] == "AA.AAA", r
    assert r["replace_rc"] == "0", guest[2].get("replace.txt")
    assert r["fio_running"] == "yes", r              # rebuilt under fio
    assert r["during"] in ("AAaAAA", "AAAAAA"), r
    assert r["after"] == "AAAAAA" and r["array"] == "AAAAAA", r
    assert r["ev_member"] == r["ev_new"], r          # one array, one story
    assert r["fio_rc"] == "0", guest[2].get("fio-rebuild.txt", "")[-2000:]
    assert "Active device 2" in guest[2]["examine-rebuilt.txt"]
    assert "rebuild" not in guest[2]["table-rebuilt.txt"]   # done: gone


def test_two_members_rebuilt_at_once_then_md_agrees(guest):
    r = guest[0]["rebuild_two"]
    assert r["failed"] == "ADAADA" and r["load_rc"] == "0", r
    assert r["during"] in ("AaAAaA", "AAAAAA"), r
    assert r["after"] == "AAAAAA", r
    assert r["md_degraded"] == "0" and r["md_cmp"] == "ok", r
    assert r["md_mismatch"] == "0", r


def test_interrupted_rebuild_goes_on_from_its_checkpoint(guest):
    r = guest[0]["rebuild_resume"]
    assert r["action"] == "recover", r
    pos1, rec1, from2 = int(r["pos1"]), int(r["rec1"]), int(r["from2"])
    assert 0 < pos1 <= rec1 == from2 < 6144, r
    assert r["after"] == "AAAAAA" and r["cmp"] == "ok", r
    assert r["md_mismatch"] == "0", r


def test_read_error_is_corrected_and_the_member_stays(guest):
    b = guest[0]["badsector"]
    assert b["read"] == "ok" and b["health_read"] == "AAAAAA", b
    assert b["health_check"] == "AAAAAA" and b["check_mismatch"] == "0", b
    events = guest[1]["badsector_nbd"]
    n = guest[0]["badsector_nbd"]
    # a read, then a scrub: the segment holding each bad sector was
    # rewritten from parity. A read the block layer merged with the bad
    # sector's (the scrub's lanes read neighbouring rows at once) fails
    # with it, as a drive fails a whole request, and is rewritten too,
    # with the same bytes: how many depends on the merging (2 to 7 seen).
    # What must hold: every segment corrected is one whose read failed,
    # and the two holding the bad sectors are among them.
    fixed = [(int(a), int(a) + int(k)) for a, k in re.findall(
        r"read error at sector (\d+) \((\d+) sectors\) corrected from "
        r"parity", guest[2]["dmesg.txt"])]
    failed = [(int(a), int(a) + int(k)) for _, a, k in re.findall(
        r"read-error_(\d+)_(\d+)_(\d+)", events)]
    assert len(fixed) >= 2 and len(fixed) == int(b["corrected_logged"]), \
        (b, fixed)
    for a, e in fixed:
        assert any(fa <= a and e <= fe for fa, fe in failed), \
            ("corrected a segment whose read did not fail", (a, e), failed)
    for s in ("s1", "s2"):
        assert any(a <= int(n[s]) < e for a, e in fixed), (n, fixed)
    for s in ("s1", "s2"):                         # failed, then rewritten
        assert f"read-error_{n[s]}" in events and f"healed_{n[s]}" in events
    assert f"write-error_{n['s3']}" in events, events


def test_read_error_that_cannot_be_rewritten_fails_the_member(guest):
    b = guest[0]["badsector_stuck"]
    assert b["read"] == "ok" and b["health"] == "AAADAA", b
    assert b["not_corrected_logged"] == "1", b
    assert b["md_degraded"] == "1" and b["md_cmp"] == "ok", b
