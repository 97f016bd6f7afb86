"""gpu-raid6 against md itself, in the VM (one boot per kernel).

md (mdadm + raid456) is the oracle: arrays are created by `mdadm --create
--assume-clean` over loop devices in tmpfs; data md wrote is read through
gpu-raid6, healthy and with every one and every two members given as
"-"; data gpu-raid6 wrote is checked by md's own `check` (mismatch_cnt)
and read back through md. fio's crc32c verify covers concurrent random
writes, a helper killed with -9 mid-run and a member that starts failing
mid-run (a dm linear member swapped for an `error` target). Bad table
lines must be refused with the precise reason and leave nothing behind.
Most checks run with the real helper (`kgpu helper --backend cpu`)
attached; the first interop configuration runs without one.
"""

import json
import os

import pytest

from conftest import build_modules, guest_results

pytestmark = pytest.mark.vm

GUEST = r"""
set -u
O=$KGPU_OUT
B={build}
W=/mnt/r6
res() {{ echo "$*" >> $O/results; }}
stamp() {{ echo "$1 $(cut -d' ' -f1 /proc/uptime)" >> $O/times; }}
modprobe loop max_loop=16 2>/dev/null
modprobe raid6_pq; modprobe dm_mod; modprobe raid456
insmod $B/kgpu.ko timeout_ms=5000 || exit 1
insmod $B/dm-gpu-raid6.ko || exit 1
mkdir -p $W; mount -t tmpfs -o size=1g tmpfs $W

mkloops() {{  # mkloops N MiB -> LOOPS
    LOOPS=""
    for i in $(seq 0 $(($1-1))); do
        truncate -s ${{2}}M $W/m$i
        LOOPS="$LOOPS $(losetup -f --show $W/m$i)"
    done
    LOOPS=${{LOOPS# }}
}}
freeloops() {{ for l in $LOOPS; do losetup -d $l; done; rm -f $W/m*; }}
mdcreate() {{  # layout chunkK metadata
    mdadm --create /dev/md0 --run --quiet --level=6 \
        --raid-devices=$(echo $LOOPS | wc -w) --chunk=$2 --layout=$1 \
        --metadata=$3 --assume-clean $LOOPS > /dev/null 2>&1 || return 1
    MDSIZE=$(cat /sys/block/md0/size)
    MDOFF=$(cat /sys/block/md0/md/dev-$(basename ${{LOOPS%% *}})/offset)
}}
mdstop() {{ mdadm --stop /dev/md0 > /dev/null 2>&1; }}
mdcheck() {{  # md's parity check: mismatch_cnt, or why there is none
    local a=/sys/block/md0/md/sync_action t=0
    [ -e $a ] || {{ echo no-array; return; }}
    echo check > $a
    sleep 0.2
    while [ "$(cat $a)" != idle ]; do
        sleep 0.2; t=$((t+1)); [ $t -gt 600 ] && {{ echo check-hung; return; }}
    done
    cat /sys/block/md0/md/mismatch_cnt
}}
table() {{  # layout chunk_sectors "devs"
    local opt=""
    [ "$MDOFF" != 0 ] && opt=" 2 data_offset $MDOFF"
    echo "0 $MDSIZE gpu-raid6 $1 $2 $(echo $3 | wc -w) $3$opt"
}}
r6create() {{ dmsetup create $1 --table "$2" && dmsetup mknodes $1; }}
withmissing() {{  # "devs" i [j]
    local k=0 out=""
    for l in $1; do
        if [ $k = $2 ] || [ $k = "${{3:--1}}" ]; then out="$out -"; else out="$out $l"; fi
        k=$((k+1))
    done
    echo ${{out# }}
}}
start_helper() {{  # the real helper, cpu backend; HP=its pid
    kgpu helper --backend cpu > $1 2>&1 &
    HP=$!
    timeout 120 sh -c "until grep -q 'INFO: serving' $1; do sleep 0.1; done" \
        || {{ echo "helper did not attach"; cat $1; return 1; }}
}}

# -- bad tables: refused with the reason, nothing left behind -------------
mkloops 4 2
L="$LOOPS"
set -- $L
bad() {{  # name expected-text table
    dmesg -C
    if dmsetup create badr6 --table "$3" > /dev/null 2>&1; then
        res "bad_$1 FAIL accepted"; dmsetup remove badr6; return
    fi
    msg=$(dmesg | grep -o "gpu-raid6: .*" | head -1)
    left=$(dmsetup ls | grep -c badr6)
    case "$msg" in
        *"$2"*) [ $left = 0 ] && res "bad_$1 OK $msg" || res "bad_$1 FAIL left behind";;
        *) res "bad_$1 FAIL got: $msg $(dmesg | tail -3 | tr '\n' ' ')";;
    esac
}}
bad few "Too few members" "0 2048 gpu-raid6 left-symmetric 128 3 $1 $2 $3"
bad missing3 "More than two members missing" "0 2048 gpu-raid6 left-symmetric 128 4 $1 - - -"
bad chunk "Chunk size is not a power of two" "0 2048 gpu-raid6 left-symmetric 96 4 $L"
bad length "Target length does not fit the members" "0 20000 gpu-raid6 left-symmetric 128 4 $L"
bad layout "Unknown layout" "0 2048 gpu-raid6 left-diagonal 128 4 $L"
bad device "Member device lookup failed" "0 2048 gpu-raid6 left-symmetric 128 4 $1 $2 $3 /dev/nonexistent"
bad opt "Unknown optional parameter" "0 2048 gpu-raid6 left-symmetric 128 4 $L 1 frobnicate"
bad optval "Invalid data_offset" "0 2048 gpu-raid6 left-symmetric 128 4 $L 2 data_offset 12x"
bad devcount "Fewer member devices than #devs" "0 2048 gpu-raid6 left-symmetric 128 6 $L"
MDSIZE=2048; MDOFF=0
r6create good "$(table raid6_zr 128 "$1 - $3 $4")"
dmsetup table good > $O/table.txt
dmsetup status good > $O/status.txt
blkdiscard /dev/mapper/good > $O/discard.txt 2>&1 || echo "rc=$?" >> $O/discard.txt
echo "$1 - $3 $4" > $O/table-devs.txt
dmsetup remove good
freeloops

stamp before-interop
# -- interop: md writes, gpu-raid6 reads (healthy, every 1 and 2 missing);
#    gpu-raid6 writes, md checks and reads ----------------------------------
interop() {{  # tag mdlayout dmlayout chunkK n MiB metadata cmpbytes
    stamp $1
    local tag=$1 cs=$(($4 * 2)) n=$5 bad=0
    mkloops $n $6
    mdcreate $2 $4 $7 || {{ res "$tag FAIL mdadm create"; freeloops; return; }}
    mdadm --examine ${{LOOPS%% *}} > $O/examine-$7.txt 2>&1
    head -c $((MDSIZE * 512)) /dev/urandom > $W/ref
    dd if=$W/ref of=/dev/md0 bs=1M oflag=direct status=none
    mdstop
    r6create r6 "$(table $3 $cs "$LOOPS")" || {{ res "$tag FAIL create"; freeloops; return; }}
    cmp -s $W/ref /dev/mapper/r6 && res "${{tag}}_healthy OK" || res "${{tag}}_healthy FAIL"
    dmsetup remove r6
    local combos=0 fails=""
    for i in $(seq 0 $((n-1))); do for j in $(seq $i $((n-1))); do
        [ $i = $j ] && jj="" || jj=$j
        r6create r6 "$(table $3 $cs "$(withmissing "$LOOPS" $i $jj)")"
        cmp -s -n $8 $W/ref /dev/mapper/r6 || fails="$fails $i/$jj"
        dmsetup remove r6
        combos=$((combos+1))
    done; done
    [ -z "$fails" ] && res "${{tag}}_degraded OK $combos" || res "${{tag}}_degraded FAIL$fails"
    # writes through gpu-raid6: one big sequential pass, then small pieces
    r6create r6 "$(table $3 $cs "$LOOPS")"
    head -c $((MDSIZE * 512)) /dev/urandom > $W/ref
    dd if=$W/ref of=/dev/mapper/r6 bs=1M oflag=direct status=none
    for s in 3 17 100 555 1000 2047 $((MDSIZE - 9)); do
        c=$((s % 37 + 1)); [ $((s + c)) -gt $MDSIZE ] && c=$((MDSIZE - s))
        dd if=/dev/urandom of=$W/piece bs=512 count=$c status=none
        dd if=$W/piece of=$W/ref bs=512 seek=$s conv=notrunc status=none
        dd if=$W/piece of=/dev/mapper/r6 bs=512 seek=$s oflag=direct conv=notrunc status=none
    done
    cmp -s $W/ref /dev/mapper/r6 || bad=1
    dmsetup remove r6
    mdadm --assemble /dev/md0 --run $LOOPS > /dev/null 2>&1
    mm=$(mdcheck)
    cmp -s $W/ref /dev/md0 || bad=2
    [ $bad = 0 ] && [ "$mm" = 0 ] && res "${{tag}}_written OK" || res "${{tag}}_written FAIL bad=$bad mismatch_cnt=$mm"
    mdstop
    freeloops
}}
# 8 rows cover every parity rotation of n <= 8 members
interop ls64n4nohelper left-symmetric left-symmetric 64 4 2 1.0 $((8 * 2 * 65536))
start_helper /tmp/h1.log || exit 1
interop zr64n8 ddf-zero-restart raid6_zr 64 8 2 1.0 $((8 * 6 * 65536))
interop ls512n6 left-symmetric left-symmetric 512 6 3 1.2 $((2 * 4 * 524288))
interop zr512n4 ddf-zero-restart raid6_zr 512 4 3 1.2 $((4 * 2 * 524288))

stamp before-the
# -- the CLI opens an mdadm array -----------------------------------------
mkloops 5 2
mdcreate left-symmetric 64 1.2
mdstop
set -- $LOOPS
kgpu raid6 create r6 --from-mdadm $1 $2 $4 $5 > $O/cli.txt 2>&1
dmsetup table r6 >> $O/cli.txt 2>&1
kgpu raid6 remove r6 >> $O/cli.txt 2>&1
echo "MDSIZE=$MDSIZE MDOFF=$MDOFF LOOPS=$LOOPS" >> $O/cli.txt
freeloops

stamp before-fio
# -- fio on dm-linear members: random writes with verify, kill -9 of the
#    helper, a member failing mid-run; md checks afterwards -----------------
FIO="fio --name=v --filename=/dev/mapper/r6 --direct=1 --ioengine=libaio \
 --rw=randwrite --bsrange=4k-256k --iodepth=32 --numjobs=4 --size=1536k \
 --offset_increment=1536k --verify=crc32c --verify_fatal=1 --do_verify=1 \
 --randrepeat=0 --group_reporting"
fiorun() {{  # tag n layout chunkK [action]: kill the helper or fail member 2
             # while fio runs (then 6 rounds of write + verify)
    local tag=$1 n=$2 cs=$(($4 * 2)) devs="" i
    mkloops $n 2
    i=0
    mdcreate $3 $4 1.0 || {{ res "$tag FAIL mdadm"; return; }}
    mdstop
    for l in $LOOPS; do
        dmsetup create r6m$i --table "0 $(blockdev --getsz $l) linear $l 0"
        devs="$devs /dev/mapper/r6m$i"; i=$((i+1))
    done
    dmsetup mknodes
    dl=$3; [ $3 = ddf-zero-restart ] && dl=raid6_zr
    r6create r6 "$(table $dl $cs "${{devs# }}")"
    $FIO --loops=$([ -n "${{5:-}}" ] && echo 6 || echo 1) > $O/fio-$tag.txt 2>&1 &
    FP=$!
    case "${{5:-}}" in
    kill) sleep 2; kill -0 $FP && echo "fio running" >> $O/ev-$tag.txt
        kill -9 $HP; echo "killed helper" >> $O/ev-$tag.txt;;
    fail) sleep 2; kill -0 $FP && echo "fio running" >> $O/ev-$tag.txt
        dmsetup suspend r6m2; dmsetup load r6m2 --table "0 $(blockdev --getsz /dev/mapper/r6m2) error"; dmsetup resume r6m2; echo "failed member 2" >> $O/ev-$tag.txt;;
    esac
    wait $FP; frc=$?
    st=$(dmsetup status r6)
    dmsetup remove r6
    for i in $(seq 0 $((n-1))); do dmsetup remove r6m$i; done
    if [ "${{5:-}}" = fail ]; then
        mdadm --assemble /dev/md0 --run $(withmissing "$LOOPS" 2) > /dev/null 2>&1
        mm=degraded
    else
        mdadm --assemble /dev/md0 --run $LOOPS > /dev/null 2>&1
        mm=$(mdcheck)
    fi
    mdstop
    res "fio_$tag rc=$frc mismatch_cnt=$mm status=$(echo $st | tr ' ' ,)"
    freeloops
}}
fiorun ls6 6 left-symmetric 64
fiorun zr8 8 ddf-zero-restart 64
fiorun kill 6 left-symmetric 64 kill
wait $HP 2>/dev/null
start_helper /tmp/h2.log || exit 1
fiorun fail 6 left-symmetric 64 fail

stamp before-degraded
# -- degraded writes: 1 and 2 missing, read back degraded and through md ----
degwrite() {{  # tag i [j]
    mkloops 6 2
    mdcreate left-symmetric 64 1.0; mdstop
    local devs=$(withmissing "$LOOPS" $2 ${{3:-}})
    r6create r6 "$(table left-symmetric 128 "$devs")"
    head -c $((MDSIZE * 512)) /dev/urandom > $W/ref
    dd if=$W/ref of=/dev/mapper/r6 bs=64k oflag=direct status=none
    for s in 5 300 777 1500; do
        dd if=/dev/urandom of=$W/piece bs=512 count=$((s % 23 + 1)) status=none
        dd if=$W/piece of=$W/ref bs=512 seek=$s conv=notrunc status=none
        dd if=$W/piece of=/dev/mapper/r6 bs=512 seek=$s oflag=direct conv=notrunc status=none
    done
    local a=ok b=ok
    cmp -s $W/ref /dev/mapper/r6 || a=bad
    dmsetup remove r6
    mdadm --assemble /dev/md0 --run $(echo $devs | tr -d -- -) > /dev/null 2>&1
    cmp -s $W/ref /dev/md0 || b=bad
    mdstop
    res "degwrite_$1 degraded=$a md=$b"
    freeloops
}}
degwrite one 1
degwrite two 0 4

stamp end
kill -TERM $HP; wait $HP
kgpu status --json > $O/kstatus.json
dmesg > $O/dmesg.txt
"""

BAD = {
    "few": "Too few members",
    "missing3": "More than two members missing",
    "chunk": "Chunk size is not a power of two",
    "length": "Target length does not fit the members",
    "layout": "Unknown layout",
    "device": "Member device lookup failed",
    "opt": "Unknown optional parameter",
    "optval": "Invalid data_offset",
    "devcount": "Fewer member devices than #devs",
}
INTEROP = ["ls64n4nohelper", "zr64n8", "ls512n6", "zr512n4"]


def _boot(kernel):
    from kgpu_testbed import Testbed, TestbedError

    try:
        tb = Testbed(kernel=kernel, timeout=900)
    except TestbedError as e:
        pytest.skip(str(e))
    build = build_modules(tb.kernel)
    r = tb.run(GUEST.format(build=build), echo=False)
    files = {k: v.decode(errors="replace") for k, v in r.files.items()}
    keep = os.environ.get("KGPU_KEEP_GUEST_FILES")   # a folder, to debug
    if keep:
        os.makedirs(os.path.join(keep, kernel), exist_ok=True)
        for name, text in files.items():
            with open(os.path.join(keep, kernel, name), "w") as f:
                f.write(text)
    assert r.rc == 0, r.output[-4000:] + files.get("results", "")
    return guest_results(files), files


@pytest.fixture(scope="module", params=["6.1", "6.12"])
def guest(request):
    return _boot(request.param)


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_table_refused_precisely(guest, name):
    got = guest[0].get(f"bad_{name}", "missing")
    assert got.startswith("OK") and BAD[name] in got, got


def test_table_and_status_lines(guest):
    files = guest[1]
    devs = files["table-devs.txt"].split()
    table = files["table.txt"].split()
    assert table[:6] == ["0", "2048", "gpu-raid6", "raid6_zr", "128", "4"], table
    assert len(table) == 10 and table[7] == "-", table   # members as dev_t
    status = files["status.txt"].split()
    # dm-raid's fields (no md_superblocks: always in sync), then kgpu's
    assert status == ["0", "2048", "gpu-raid6", "raid6_zr", "4", "ADAA",
                      "1024/1024", "idle", "0", "0", "-", "0", "0", "0",
                      "0", "0"], status
    assert len(devs) == 4


def test_discard_refused_cleanly(guest):
    """No discard support is advertised: blkdiscard fails, nothing else."""
    text = guest[1]["discard.txt"]
    assert "rc=" in text and "not supported" in text, text


@pytest.mark.parametrize("tag", INTEROP)
def test_md_data_reads_through_gpu_raid6(guest, tag):
    assert guest[0].get(f"{tag}_healthy") == "OK", guest[0]


@pytest.mark.parametrize("tag", INTEROP)
def test_every_one_and_two_missing_read_identical(guest, tag):
    got = guest[0].get(f"{tag}_degraded", "missing")
    assert got.startswith("OK"), got
    combos = int(got.split()[1])
    members = int(tag.split("n")[1][0])
    assert combos == members + members * (members - 1) // 2


@pytest.mark.parametrize("tag", INTEROP)
def test_gpu_raid6_writes_pass_md_check(guest, tag):
    assert guest[0].get(f"{tag}_written") == "OK", guest[0].get(f"{tag}_written")


def _fio(guest, tag):
    line = guest[0].get(f"fio_{tag}", "missing")
    out = guest[1].get(f"fio-{tag}.txt", "")
    fields = dict(f.split("=", 1) for f in line.split())
    return fields, out, guest[1].get(f"ev-{tag}.txt", "")


@pytest.mark.parametrize("tag", ["ls6", "zr8", "kill"])
def test_fio_verify_then_md_check(guest, tag):
    f, out, ev = _fio(guest, tag)
    assert f["rc"] == "0", out[-3000:]
    assert "verify failed" not in out and "bad magic" not in out, out
    assert f["mismatch_cnt"] == "0", f
    if tag == "kill":
        assert ev == "fio running\nkilled helper\n", ev


def test_member_failing_mid_run(guest):
    f, out, ev = _fio(guest, "fail")
    assert ev == "fio running\nfailed member 2\n", ev
    assert "verify failed" not in out and "bad magic" not in out, out
    assert f["rc"] == "0", out[-3000:]
    status = f["status"].split(",")
    assert status[3:6] == ["raid6_ls", "6", "AADAAA"], status
    dmesg = guest[1]["dmesg.txt"]
    failures = [ln for ln in dmesg.splitlines()
                if "member 2 (" in ln and "failed: running degraded" in ln]
    assert len(failures) == 1, "failure logged once"


@pytest.mark.parametrize("tag", ["one", "two"])
def test_degraded_writes_read_back(guest, tag):
    assert guest[0].get(f"degwrite_{tag}") == "degraded=ok md=ok", guest[0]


def test_cli_opens_mdadm_array(guest):
    text = guest[1]["cli.txt"]
    info = text.splitlines()[-1]
    env = dict(kv.split("=", 1) for kv in info.split(" ", 2)[:2])
    assert f"0 {env['MDSIZE']} gpu-raid6 left-symmetric 128 5 " in text, text
    assert f"data_offset {env['MDOFF']}" in text and " - " in text, text
    assert "removed r6" in text, text


def test_helper_served_raid6(guest):
    st = json.loads(guest[1]["kstatus.json"])
    svcs = {s["name"]: s for s in st["services"]}
    served = sum(svcs[n]["helper_cpu"] + svcs[n]["gpu"]
                 for n in ("raid6-gen", "raid6-rec", "raid6-pqd"))
    assert served > 0, svcs
    assert svcs["raid6-rec"]["helper_cpu"] + svcs["raid6-rec"]["gpu"] > 0
    # read-modify-write (fio's small random writes) went to the helper
    assert svcs["raid6-pqd"]["helper_cpu"] + svcs["raid6-pqd"]["gpu"] > 0


def test_no_kernel_complaints(guest):
    dmesg = guest[1]["dmesg.txt"]
    for bad in ("BUG:", "Oops", "WARNING:", "Call Trace", "hung_task"):
        assert bad not in dmesg, dmesg[-3000:]
