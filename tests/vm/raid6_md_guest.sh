# gpu-raid6 with md_superblocks: md's array state, checked by md itself.
#
# Run as root inside a testbed guest (bash). Every array is made by mdadm
# over dm-linear "shims" on loop files, so a member can fail (dm error), or
# silently drop writes (dm-flakey drop_writes: a power cut), and come back.
# md is the oracle at every step: mdadm --examine for the superblocks,
# mdadm --assemble for who is in the array, md's check for parity.
# Each story appends "<name> <key=value>..." to $KGPU_OUT/results; the
# pytest side asserts. Usage: bash raid6_md_guest.sh <build dir>
set -u
B=$1
O=$KGPU_OUT
W=/mnt/r6md
N=6
MB=4
res() { echo "$*" >> $O/results; }
stamp() {  # a story starts: its time; the kernel log so far kept, then cleared
    echo "$1 $(cut -d' ' -f1 /proc/uptime)" >> $O/times
    dmesg >> $O/dmesg.txt; dmesg -C
}

modprobe loop max_loop=64 2>/dev/null
modprobe raid6_pq; modprobe dm_mod; modprobe raid456; modprobe dm_flakey
insmod $B/kgpu.ko timeout_ms=5000 || exit 1
insmod $B/dm-gpu-raid6.ko || exit 1
mkdir -p $W; mount -t tmpfs -o size=1g tmpfs $W

mkmembers() {  # tag [random]: $N loop files behind shims /dev/mapper/<tag>m<i>
    SH=""
    for i in $(seq 0 $((N-1))); do
        if [ "${2:-}" = random ]; then
            head -c $((MB << 20)) /dev/urandom > $W/$1$i
        else
            truncate -s ${MB}M $W/$1$i
        fi
        l=$(losetup -f --show $W/$1$i)
        echo $l > $W/$1$i.loop
        dmsetup create $1m$i --table "0 $(blockdev --getsz $l) linear $l 0"
        SH="$SH /dev/mapper/$1m$i"
    done
    dmsetup mknodes
    SH=${SH# }
}
freemembers() {  # tag
    for i in $(seq 0 $((N-1))); do
        dmsetup remove $1m$i 2>/dev/null
        losetup -d $(cat $W/$1$i.loop)
        rm -f $W/$1$i $W/$1$i.loop
    done
}
shim() {  # tag i linear|error|drop: what the member's shim maps to
    local l=$(cat $W/$1$2.loop) t
    local n=$(blockdev --getsz $l)
    case $3 in
        linear) t="0 $n linear $l 0";;
        error) t="0 $n error";;
        drop) t="0 $n flakey $l 0 0 3600 1 drop_writes";;
    esac
    dmsetup load $1m$2 --table "$t" && dmsetup suspend $1m$2 && dmsetup resume $1m$2
}
mdcreate() {  # [mdadm options]: a RAID6 of $SH
    mdadm --create /dev/md0 --run --quiet --level=6 --raid-devices=$N \
        --chunk=64 --metadata=${MDMETA:-1.2} "$@" $SH > $W/mdadm.txt 2>&1 || { cat $W/mdadm.txt; return 1; }
    MDSIZE=$(cat /sys/block/md0/size)
    MDOFF=$(cat /sys/block/md0/md/dev-*/offset | head -1)
}
mdstop() { mdadm --stop /dev/md0 > /dev/null 2>&1; }
mdcheck() {  # md's parity check: mismatch_cnt, or why there is none
    local a=/sys/block/md0/md/sync_action t=0
    [ -e $a ] || { echo no-array; return; }
    mdadm --readwrite /dev/md0 2>/dev/null
    while [ "$(cat $a)" != idle ]; do sleep 0.2; done    # a resync md wants
    echo check > $a
    sleep 0.2
    while [ "$(cat $a)" != idle ]; do
        sleep 0.2; t=$((t+1)); [ $t -gt 900 ] && { echo check-hung; return; }
    done
    cat /sys/block/md0/md/mismatch_cnt
}
exf() {  # member field: one field of mdadm --examine
    mdadm --examine $1 2>/dev/null | sed -n "s/^ *$2 : \([^ ]*\).*/\1/p" | head -1
}
sf() { dmsetup status $1 | awk "{print \$$2}"; }   # name field#
resync_offset() {  # member: md 1.2's resync_offset (mdadm 4.2's --examine
                   # shows only "active"), read from the superblock at 4 KiB
    python3 -c 'import struct, sys
f = open(sys.argv[1], "rb"); f.seek(4096); b = f.read(256)
assert struct.unpack_from("<I", b, 0)[0] == 0xa92b4efc, "no superblock"
v = struct.unpack_from("<Q", b, 208)[0]
print("none" if v == (1 << 64) - 1 else v)' $1
}
open_md() {  # name: kgpu raid6 create --from-mdadm over $SH
    kgpu raid6 create $1 --from-mdadm $SH >> $O/create-$1.txt 2>&1
}
waitsync() {  # name tag: until the background work ends
    kgpu raid6 status $1 --wait --interval 2 --timeout 600 > $O/wait-$2.txt 2>&1
}
torn() {  # tag: the sectors a check counts through a table that keeps no
          # md state (no md_superblocks: no resync first), the damage seen
    local line=$(kgpu raid6 create x --from-mdadm --dry-run $SH |
        sed 's/ md_superblocks$//; s/ 3 data_offset/ 2 data_offset/')
    dmsetup create r6x --table "$line"
    dmsetup message r6x 0 check
    waitsync r6x $1
    sf r6x 9
    dmsetup remove r6x
}

stamp start
# -- 1. a member fails, comes back stale: never read, by us or by mdadm ------
mkmembers s
mdcreate --assume-clean || exit 1
mdstop
ev_created=$(exf /dev/mapper/sm0 Events)
open_md r6 || { res stale FAIL create; cat $O/create-r6.txt; }
dmsetup table r6 > $O/stale-table.txt
head -c $((MDSIZE * 512)) /dev/urandom > $W/refA
dd if=$W/refA of=/dev/mapper/r6 bs=1M oflag=direct status=none
# safe mode: active while writes come, clean 200 ms after the last
fio --name=a --filename=/dev/mapper/r6 --direct=1 --rw=randwrite --bs=4k \
    --size=1m --rate_iops=40 --runtime=8 --time_based > /dev/null 2>&1 &
FP=$!
state_busy=clean
for t in $(seq 20); do   # active at some look while fio writes
    sleep 0.5
    [ "$(exf /dev/mapper/sm0 State)" = active ] && { state_busy=active; break; }
done
wait $FP
dd if=$W/refA of=/dev/mapper/r6 bs=1M oflag=direct status=none
sleep 1
state_idle=$(exf /dev/mapper/sm0 State)
ev0=$(exf /dev/mapper/sm0 Events)
dmev0=$(dmsetup info -c --noheadings -o events r6)
shim s 2 error
head -c $((MDSIZE * 512)) /dev/urandom > $W/refB
dd if=$W/refB of=/dev/mapper/r6 bs=1M oflag=direct status=none; wrc=$?
health1=$(sf r6 6)
sleep 1
dmev1=$(dmsetup info -c --noheadings -o events r6)
mdadm --examine /dev/mapper/sm0 > $O/examine-stale-survivor.txt 2>&1
ev1=$(exf /dev/mapper/sm0 Events)
arr1=$(exf /dev/mapper/sm0 "Array State")
dmsetup status r6 > $O/status-stale-failed.txt
dmsetup remove r6
shim s 2 linear                      # the flaky cable is back
mdadm --examine /dev/mapper/sm2 > $O/examine-stale-member.txt 2>&1
ev_m2=$(exf /dev/mapper/sm2 Events)
open_md r6 || res stale_reopen FAIL create
health2=$(sf r6 6)
dmsetup status r6 > $O/status-stale-reopened.txt
cmp -s $W/refB /dev/mapper/r6 && c1=ok || c1=bad
dmsetup remove r6
mdadm --assemble /dev/md0 --run $SH > $O/stale-mdadm.txt 2>&1
mddeg=$(cat /sys/block/md0/md/degraded 2>/dev/null)
cat /proc/mdstat >> $O/stale-mdadm.txt
cmp -s $W/refB /dev/md0 && c2=ok || c2=bad
mdstop
res stale_states created=$ev_created busy=$state_busy idle=$state_idle
res stale_fail wrc=$wrc ev0=$ev0 ev1=$ev1 m2=$ev_m2 health=$health1 array=$arr1 dmev0=$dmev0 dmev1=$dmev1
res stale_reopen health=$health2 cmp=$c1 md_degraded=$mddeg md_cmp=$c2
freemembers s

stamp crash
# -- 2. a power cut under fio: parity stale, superblocks active; re-opening
#    resyncs, and md's check then finds nothing ------------------------------
mkmembers c
mdcreate --assume-clean || exit 1
mdstop
open_md r6 || res crash FAIL create
fio --name=c --filename=/dev/mapper/r6 --direct=1 --ioengine=libaio \
    --rw=randwrite --bsrange=4k-64k --iodepth=16 --numjobs=2 --size=2m \
    --offset_increment=2m --runtime=30 --time_based > $O/fio-crash.txt 2>&1 &
FP=$!
sleep 3
for i in $(seq 0 $((N-1))); do shim c $i drop; done   # writes vanish
kill $FP; wait $FP
dmsetup remove r6                    # its clean superblocks vanish too
for i in $(seq 0 $((N-1))); do shim c $i linear; done
mdadm --examine /dev/mapper/cm0 > $O/examine-crash.txt 2>&1
state_crash=$(exf /dev/mapper/cm0 State)
mm_crash=$(torn crash-check)
open_md r6 || res crash_reopen FAIL create
waitsync r6 crash-resync
resync_log=$(dmesg | grep -o 'resync from sector [0-9]*\|resync done at sector [0-9]*' | tr ' ' _ | tr '\n' ,)
dmsetup status r6 > $O/status-crash-resynced.txt
health_after=$(sf r6 6)
dmsetup remove r6
state_after=$(exf /dev/mapper/cm0 State)
mdadm --assemble /dev/md0 --run $SH > /dev/null 2>&1
mm_md=$(mdcheck)
mdstop
res crash state=$state_crash stale_sectors=$mm_crash log=$resync_log
res crash_resynced health=$health_after state=$state_after md_mismatch=$mm_md
freemembers c

stamp initial
# -- 3. mdadm --create without --assume-clean: the initial sync is ours; an
#    interrupted resync resumes from its checkpoint --------------------------
mkmembers n random
echo 1 > /proc/sys/dev/raid/speed_limit_min
echo 1 > /proc/sys/dev/raid/speed_limit_max
mdcreate || exit 1
mdstop
echo 1000 > /proc/sys/dev/raid/speed_limit_min
echo 200000 > /proc/sys/dev/raid/speed_limit_max
mdadm --examine /dev/mapper/nm0 > $O/examine-initial.txt 2>&1
ro0=$(resync_offset /dev/mapper/nm0)
LINE=$(kgpu raid6 create x --from-mdadm --dry-run $SH | sed 's/ 3 data_offset \([0-9]*\) md_superblocks$/ 5 data_offset \1 md_superblocks max_recovery_rate 300/')
dmsetup create r6 --table "$LINE" > $O/create-initial.txt 2>&1 && dmsetup mknodes r6
sleep 3
dmsetup status r6 > $O/status-initial-slow.txt
pos1=$(sf r6 7 | cut -d/ -f1)
dmsetup remove r6                    # interrupted
ro1=$(resync_offset /dev/mapper/nm0)
state1=$(exf /dev/mapper/nm0 State)
open_md r6 || res initial FAIL create
waitsync r6 initial
from2=$(dmesg | grep -o 'resync from sector [0-9]*' | tail -1 | awk '{print $4}')
dmsetup status r6 > $O/status-initial-done.txt
health3=$(sf r6 6)
ratio3=$(sf r6 7)
dmsetup remove r6
ro2=$(resync_offset /dev/mapper/nm0)
state2=$(exf /dev/mapper/nm0 State)
mdadm --assemble /dev/md0 --run $SH > /dev/null 2>&1
mm_md=$(mdcheck)
mdstop
res initial ro0=$ro0 pos1=$pos1 ro1=$ro1 state1=$state1 from2=$from2
res initial_done health=$health3 ratio=$ratio3 ro=$ro2 state=$state2 md_mismatch=$mm_md
freemembers n

stamp check
# -- 4. check and repair against md's check on the same corruption ----------
mkmembers k
mdcreate --assume-clean || exit 1
head -c $((MDSIZE * 512)) /dev/urandom > /dev/md0
sync
mdstop
for b in 3 20 41; do   # three 4 KiB blocks of member 1, rows apart
    dd if=/dev/urandom of=/dev/mapper/km1 bs=4k seek=$((MDOFF / 8 + b * 16)) count=1 \
        conv=notrunc oflag=direct status=none
done
mdadm --assemble /dev/md0 --run $SH > /dev/null 2>&1
mm_md=$(mdcheck)
mdstop
open_md r6 || res check FAIL create
dmsetup message r6 0 check; waitsync r6 check
mm_check=$(sf r6 9)
dmsetup message r6 0 repair; waitsync r6 repair
mm_repair=$(sf r6 9)
dmsetup message r6 0 check; waitsync r6 check2
mm_after=$(sf r6 9)
dmsetup status r6 > $O/status-check.txt
# a writer that changes its buffer while its O_DIRECT writes are in flight
python3 - > $O/scribble.txt 2>&1 <<'EOF'
import mmap, os, random, threading
fd = os.open("/dev/mapper/r6", os.O_WRONLY | os.O_DIRECT)
size = os.lseek(fd, 0, os.SEEK_END)
buf = mmap.mmap(-1, 1 << 16)
stop = []
def scribble():
    while not stop:
        buf[:] = os.urandom(1 << 16)
t = threading.Thread(target=scribble)
t.start()
rnd = random.Random(7)
for _ in range(300):
    n = rnd.choice((4096, 8192, 16384))
    os.pwrite(fd, memoryview(buf)[:n], rnd.randrange(0, size - n, 4096))
stop.append(1)
t.join()
os.close(fd)
print("wrote 300")
EOF
dmsetup message r6 0 frobnicate > $O/msg-bad.txt 2>&1; msgrc=$?
dmesg | grep -o "gpu-raid6: unrecognised message.*" >> $O/msg-bad.txt
dmsetup remove r6
mdadm --assemble /dev/md0 --run $SH > /dev/null 2>&1
mm_md2=$(mdcheck)
mdstop
res check md=$mm_md gpu=$mm_check repair=$mm_repair after=$mm_after md_after=$mm_md2
res scribble $(tail -1 $O/scribble.txt | tr ' ' _) msgrc=$msgrc
freemembers k

stamp rebuild
# -- 5. rebuild: a failed member replaced under fio verify; two at once; an
#    interrupted rebuild goes on from the new member's recovery_offset ------
N=2 mkmembers q                      # the new disks: qm0, qm1
mkmembers r
mdcreate --assume-clean || exit 1
mdstop
open_md r6 || res rebuild FAIL create
FIOV="fio --name=v --filename=/dev/mapper/r6 --direct=1 --ioengine=libaio \
 --rw=randwrite --bsrange=4k-64k --iodepth=8 --numjobs=2 --size=2m \
 --offset_increment=2m --verify=crc32c --verify_fatal=1 --do_verify=1"
$FIOV --loops=40 --rate=4m > $O/fio-rebuild.txt 2>&1 &
FP=$!
sleep 2
shim r 2 error
dd if=/dev/urandom of=/dev/mapper/r6 bs=64k seek=100 count=8 oflag=direct status=none
h_failed=$(sf r6 6); arr_failed=$(exf /dev/mapper/rm0 "Array State")
kgpu raid6 replace r6 2 /dev/mapper/qm0 > $O/replace.txt 2>&1; rrc=$?
fr=no; kill -0 $FP 2>/dev/null && fr=yes
h_during=$(sf r6 6); a_during=$(sf r6 8)
waitsync r6 rebuild
wait $FP; frc=$?
h_after=$(sf r6 6)
dmsetup table r6 > $O/table-rebuilt.txt
mdadm --examine /dev/mapper/qm0 > $O/examine-rebuilt.txt 2>&1
role_new=$(exf /dev/mapper/qm0 "Device Role" | head -1)
arr_after=$(exf /dev/mapper/rm0 "Array State"); ev_a=$(exf /dev/mapper/rm0 Events); ev_n=$(exf /dev/mapper/qm0 Events)
res rebuild_one fio_running=$fr failed=$h_failed array_failed=$arr_failed replace_rc=$rrc during=$h_during action=$a_during after=$h_after fio_rc=$frc array=$arr_after ev_member=$ev_a ev_new=$ev_n
# two at once: members 1 and 4 fail, two new disks, one table
shim r 1 error; shim r 4 error
dd if=/dev/urandom of=/dev/mapper/r6 bs=64k count=4 oflag=direct status=none
h2_failed=$(sf r6 6)
T=$(dmsetup table r6 | awk '{$8 = "/dev/mapper/qm1"; $11 = "/dev/mapper/rm4"; print}')
echo "$T" > $O/table-two-before.txt
shim r 4 linear                      # the disk at 4 is back, blank for us
dd if=/dev/zero of=/dev/mapper/rm4 bs=1M count=1 oflag=direct status=none
T=$(echo "$T" | sed 's/ 3 data_offset \([0-9]*\) md_superblocks$/ 7 data_offset \1 md_superblocks rebuild 1 rebuild 4/')
dmsetup load r6 --table "$T" && dmsetup suspend r6 && dmsetup resume r6; trc=$?
h2_during=$(sf r6 6)
waitsync r6 rebuild-two
h2_after=$(sf r6 6)
head -c $((MDSIZE * 512)) /dev/urandom > $W/refR
dd if=$W/refR of=/dev/mapper/r6 bs=1M oflag=direct status=none
dmsetup remove r6
mdadm --assemble /dev/md0 --run /dev/mapper/rm0 /dev/mapper/qm1 /dev/mapper/qm0 /dev/mapper/rm3 /dev/mapper/rm4 /dev/mapper/rm5 > $O/mdadm-rebuilt.txt 2>&1
mddeg=$(cat /sys/block/md0/md/degraded 2>/dev/null)
cmp -s $W/refR /dev/md0 && mdcmp=ok || mdcmp=bad
mm=$(mdcheck)
mdstop
res rebuild_two failed=$h2_failed load_rc=$trc during=$h2_during after=$h2_after md_degraded=$mddeg md_cmp=$mdcmp md_mismatch=$mm
# interrupted: slow, cut after 3 s, opened again: it goes on from there
shim r 1 linear                      # the old disk at 1, as a new one
SET="/dev/mapper/rm0 /dev/mapper/qm1 /dev/mapper/qm0 /dev/mapper/rm3 /dev/mapper/rm4 /dev/mapper/rm5"
SH=$SET
LINE=$(kgpu raid6 create x --from-mdadm --dry-run $SET | awk '{$8 = "/dev/mapper/rm1"; print}' | sed 's/ 3 data_offset \([0-9]*\) md_superblocks$/ 7 data_offset \1 md_superblocks rebuild 1 max_recovery_rate 300/')
SET="/dev/mapper/rm0 /dev/mapper/rm1 /dev/mapper/qm0 /dev/mapper/rm3 /dev/mapper/rm4 /dev/mapper/rm5"
dmsetup create r6 --table "$LINE" > $O/create-slow-rebuild.txt 2>&1 && dmsetup mknodes r6
sleep 3
pos1=$(sf r6 7 | cut -d/ -f1); a1=$(sf r6 8)
dmsetup remove r6
mdadm --examine /dev/mapper/rm1 > $O/examine-interrupted.txt 2>&1
rec1=$(exf /dev/mapper/rm1 "Recovery Offset")
SH=$SET
open_md r6 || res rebuild_resume FAIL create
waitsync r6 rebuild-resumed
from2=$(dmesg | grep -o 'recover from sector [0-9]*' | tail -1 | awk '{print $4}')
h3=$(sf r6 6)
cmp -s $W/refR /dev/mapper/r6 && c3=ok || c3=bad
dmsetup remove r6
mdadm --assemble /dev/md0 --run $SET > /dev/null 2>&1
mm=$(mdcheck)
mdstop
res rebuild_resume action=$a1 pos1=$pos1 rec1=$rec1 from2=$from2 after=$h3 cmp=$c3 md_mismatch=$mm
freemembers r
N=2 freemembers q

stamp badsector
# -- 6. a read error is not a dead disk: member 3 is an NBD disk with bad
#    sectors (badsector_nbd.py) that heal on write, or do not ---------------
modprobe nbd nbds_max=2
mkmembers b
mdcreate --assume-clean || exit 1
head -c $((MDSIZE * 512)) /dev/urandom > $W/refD
dd if=$W/refD of=/dev/md0 bs=1M oflag=direct status=none
mdstop
: > $W/bad
python3 $(dirname $0)/badsector_nbd.py /dev/nbd0 $W/b3 $W/bad > $O/nbd.txt 2>&1 &
for t in $(seq 50); do grep -q serving $O/nbd.txt && break; sleep 0.2; done
SRV=$(awk '/serving/ {print $4}' $O/nbd.txt)
dmsetup load bm3 --table "0 $(blockdev --getsz /dev/nbd0) linear /dev/nbd0 0" &&
    dmsetup suspend bm3 && dmsetup resume bm3
open_md r6 || res badsector FAIL create
# left-symmetric, 6 members: member 3 holds data in row 0, P in row 2
S1=$((MDOFF + 10)); S2=$((MDOFF + 2 * 128 + 20)); S3=$((MDOFF + 6 * 128 + 5))
echo "$S1 heal" > $W/bad; kill -USR1 $SRV; sleep 0.3
dd if=/dev/mapper/r6 iflag=direct bs=64k status=none | cmp -s - $W/refD && c1=ok || c1=bad
h1=$(sf r6 6)
echo "$S2 heal" > $W/bad; kill -USR1 $SRV; sleep 0.3
dmsetup message r6 0 check; waitsync r6 badsector-check
h2=$(sf r6 6); mm2=$(sf r6 9)
echo "$S3 stick" > $W/bad; kill -USR1 $SRV; sleep 0.3
dd if=/dev/mapper/r6 iflag=direct bs=64k status=none | cmp -s - $W/refD && c3=ok || c3=bad
h3=$(sf r6 6)
dmsetup remove r6
python3 -c "import fcntl, os; fcntl.ioctl(os.open('/dev/nbd0', os.O_RDWR), 0xab08)"
wait
shim b 3 linear
mdadm --assemble /dev/md0 --run $SH > /dev/null 2>&1
mddeg=$(cat /sys/block/md0/md/degraded 2>/dev/null)
cmp -s $W/refD /dev/md0 && mdcmp=ok || mdcmp=bad
mdstop
corr=$(dmesg | grep -c "corrected from parity")
notc=$(dmesg | grep -c "not corrected: the rewrite failed")
res badsector read=$c1 health_read=$h1 health_check=$h2 check_mismatch=$mm2 corrected_logged=$corr
res badsector_stuck read=$c3 health=$h3 not_corrected_logged=$notc md_degraded=$mddeg md_cmp=$mdcmp
res badsector_nbd $(grep -v serving $O/nbd.txt | tr ' ' _ | tr '\n' ,) s1=$S1 s2=$S2 s3=$S3
freemembers b

stamp bitmap
# -- 7. md's write-intent bitmap: a bit set on the members while its region
#    is written, cleared lazily after; after a power cut only the regions
#    with a bit set resync, and md's own check finds nothing left ---------
dirty() {  # member: dirty bits, as mdadm -X counts them
    mdadm -X $1 2>/dev/null | sed -n 's/.* \([0-9]*\) dirty.*/\1/p'
}
mkmembers w
mdcreate --assume-clean --bitmap=internal --bitmap-chunk=64K || exit 1
mdstop
mdadm -X /dev/mapper/wm0 > $O/bitmap-created.txt 2>&1
bits=$(mdadm -X /dev/mapper/wm0 | sed -n 's/.*: \([0-9]*\) bits.*/\1/p')
open_md r6 || res bitmap FAIL create
# two writers, rows 0 and 8 (256 KiB of data a row): two bits
FIOB="fio --name=b --filename=/dev/mapper/r6 --direct=1 --ioengine=libaio \
 --rw=randwrite --bs=4k --iodepth=4 --numjobs=2 --size=256k \
 --offset_increment=2m"
$FIOB --rate_iops=50 --runtime=6 --time_based > /dev/null 2>&1 &
FP=$!
busy=0; busy5=0
for t in $(seq 10); do
    sleep 0.5
    d0=$(dirty /dev/mapper/wm0); d5=$(dirty /dev/mapper/wm5)
    [ "${d0:-0}" -gt $busy ] && busy=$d0
    [ "${d5:-0}" -gt $busy5 ] && busy5=$d5
done
wait $FP
t0=$(cut -d' ' -f1 /proc/uptime)
for t in $(seq 60); do [ "$(dirty /dev/mapper/wm0)" = 0 ] && break; sleep 0.5; done
idle=$(dirty /dev/mapper/wm0)
clear_s=$(awk -v a=$t0 -v b=$(cut -d' ' -f1 /proc/uptime) 'BEGIN {printf "%.1f", b - a}')
res bitmap_lazy bits=$bits busy=$busy busy_m5=$busy5 idle=$idle clear_s=$clear_s
# the power cut, under the same two writers
$FIOB --runtime=30 --time_based > /dev/null 2>&1 &
FP=$!
sleep 3
for i in $(seq 0 $((N-1))); do shim w $i drop; done
kill $FP; wait $FP
dmsetup remove r6
for i in $(seq 0 $((N-1))); do shim w $i linear; done
mdadm -X /dev/mapper/wm0 > $O/bitmap-crash.txt 2>&1
cut_dirty=$(dirty /dev/mapper/wm0)
cut_state=$(exf /dev/mapper/wm0 State)
mm_cut=$(torn bitmap-check)
open_md r6 || res bitmap_resync FAIL create
waitsync r6 bitmap-resync
bmlog=$(dmesg | grep -o 'resync by the bitmap: .*' | tail -1 | tr -d ',')
synced=$(echo "$bmlog" | awk '{print $5}'); passed=$(echo "$bmlog" | awk '{print $8}')
for t in $(seq 60); do [ "$(dirty /dev/mapper/wm0)" = 0 ] && break; sleep 0.5; done
after=$(dirty /dev/mapper/wm0)
# a member out: the bits of the writes that missed it stay
shim w 2 error
dd if=/dev/urandom of=/dev/mapper/r6 bs=64k seek=20 count=4 oflag=direct status=none
sleep 12
deg=$(dirty /dev/mapper/wm0)
dmsetup remove r6
shim w 2 linear
mdadm -X /dev/mapper/wm0 > $O/bitmap-degraded.txt 2>&1
mdadm --examine /dev/mapper/wm0 > $O/examine-bitmap.txt 2>&1
dmesg >> $O/dmesg.txt; dmesg -C
mdadm --assemble /dev/md0 --run $SH > $O/bitmap-mdadm.txt 2>&1
md_old=$(dmesg | grep -c 'bitmap file is out of date')
md_bm=$(grep -o 'bitmap: [0-9]*/[0-9]* pages' /proc/mdstat | tr -d ' ')
mddeg=$(cat /sys/block/md0/md/degraded 2>/dev/null)
mm_md=$(mdcheck)
mdstop
res bitmap_crash dirty=$cut_dirty state=$cut_state stale_sectors=$mm_cut synced=$synced passed=$passed after=$after
res bitmap_degraded dirty=$deg md_bitmap=$md_bm md_out_of_date=$md_old md_degraded=$mddeg md_mismatch=$mm_md
freemembers w
# metadata 1.0: the superblock at the end, the bitmap just before it
mkmembers v
MDMETA=1.0 mdcreate --assume-clean --bitmap=internal || exit 1
mdstop
open_md r6 || res bitmap_v10 FAIL create
head -c $((MDSIZE * 512)) /dev/urandom > $W/refV
dd if=$W/refV of=/dev/mapper/r6 bs=1M oflag=direct status=none
dmsetup remove r6
mdadm -X /dev/mapper/vm3 > $O/bitmap-v10.txt 2>&1
v_ev=$(sed -n 's/^ *Events : \([0-9]*\).*/\1/p' $O/bitmap-v10.txt)
v_dirty=$(dirty /dev/mapper/vm3)
v_sb=$(exf /dev/mapper/vm3 Events)
mdadm --assemble /dev/md0 --run $SH > /dev/null 2>&1
cmp -s $W/refV /dev/md0 && v_cmp=ok || v_cmp=bad
v_mm=$(mdcheck)
mdstop
res bitmap_v10 version=$(exf /dev/mapper/vm3 Version) bm_events=$v_ev sb_events=$v_sb dirty=$v_dirty md_cmp=$v_cmp md_mismatch=$v_mm
freemembers v

stamp assemble
# -- 8. kgpu raid6 assemble --scan: md RAID6 arrays found by their
#    superblocks; those in the config open as gpu-raid6 under their names,
#    the others stay md's unless --all ----------------------------------------
mkloops() {  # tag: $N loop files (no shims: what a scan sees), into SH
    SH=""
    for i in $(seq 0 $((N-1))); do
        truncate -s ${MB}M $W/$1$i
        SH="$SH $(losetup -f --show $W/$1$i)"
    done
    SH=${SH# }
}
freeloops() {  # tag
    for i in $(seq 0 $((N-1))); do
        losetup -d $(losetup -j $W/$1$i | cut -d: -f1) 2>/dev/null
        rm -f $W/$1$i
    done
}
mkloops sa
mdcreate --assume-clean || exit 1
head -c $((MDSIZE * 512)) /dev/urandom > $W/refS
dd if=$W/refS of=/dev/md0 bs=1M oflag=direct status=none
set -- $SH; UA=$(exf $1 "Array UUID")
mdstop
mkloops sb
mdcreate --assume-clean --name=spare || exit 1
UB=$(exf $(echo $SH | cut -d' ' -f1) "Array UUID")
mdstop
mdadm --examine --scan --verbose > $O/examine-scan.txt 2>&1
mkdir -p /etc/kgpu
printf '# the arrays gpu-raid6 opens\nARRAY data UUID=%s\n' $UA > /etc/kgpu/raid6.conf
kgpu raid6 assemble --scan > $O/assemble.txt 2>&1; arc=$?
a_data=$(dmsetup table data 2>/dev/null | awk '{print $3}')
a_spare=$(dmsetup info spare > /dev/null 2>&1 && echo open || echo absent)
cmp -s $W/refS /dev/mapper/data && a_cmp=ok || a_cmp=bad
grep -q "$UB: left alone (not in the config" $O/assemble.txt && a_left=yes || a_left=no
kgpu raid6 assemble --scan > $O/assemble-again.txt 2>&1; arc2=$?
grep -q "data ($UA): already open" $O/assemble-again.txt && a_again=yes || a_again=no
kgpu raid6 assemble --scan --all > $O/assemble-all.txt 2>&1; arc3=$?
a_all=$(dmsetup table spare 2>/dev/null | awk '{print $3}')
dmsetup remove data; dmsetup remove spare
printf 'ARRAY gone UUID=01234567:89abcdef:01234567:89abcdef\n' > /etc/kgpu/raid6.conf
kgpu raid6 assemble --scan > $O/assemble-missing.txt 2>&1; arc4=$?
rm -rf /etc/kgpu
res assemble rc=$arc data=$a_data spare=$a_spare cmp=$a_cmp left_to_md=$a_left again_rc=$arc2 again=$a_again all_rc=$arc3 all_spare=$a_all missing_rc=$arc4
freeloops sa
freeloops sb

stamp bad
# -- 9. bad input: refused with the reason, nothing written -----------------
mkmembers x
mdcreate --assume-clean || exit 1
mdstop
XS="$SH"; XSIZE=$MDSIZE; XOFF=$MDOFF
mkmembers y
mdcreate --assume-clean || exit 1
mdstop
YS="$SH"
set -- $XS
ev_x=$(exf $1 Events)
bad() {  # name expected-text table
    dmesg >> $O/dmesg.txt; dmesg -C
    if dmsetup create badr6 --table "$3" > /dev/null 2>&1; then
        res "bad_$1 FAIL accepted"; dmsetup remove badr6; return
    fi
    local msg=$(dmesg | grep -o "gpu-raid6: .*" | tr '\n' '|')
    local left=$(dmsetup ls | grep -c badr6)
    case "$msg" in
        *"$2"*) [ $left = 0 ] && res "bad_$1 OK $msg" || res "bad_$1 FAIL left behind";;
        *) res "bad_$1 FAIL got: $msg";;
    esac
}
T="0 $XSIZE gpu-raid6 left-symmetric 128 6"
O3="3 data_offset $XOFF md_superblocks"
bad twoarrays "Members of different md arrays" "$T $1 $2 $3 $4 $5 $(echo $YS | awk '{print $6}') $O3"
bad chunk "Chunk size differs from the md superblocks" "0 $XSIZE gpu-raid6 left-symmetric 256 6 $XS $O3"
bad layout "Layout differs from the md superblocks" "0 $XSIZE gpu-raid6 right-symmetric 128 6 $XS $O3"
bad members "Number of members differs" "0 $((XSIZE * 3 / 4)) gpu-raid6 left-symmetric 128 5 $1 $2 $3 $4 $5 $O3"
bad offset "data_offset differs from the md superblocks" "$T $XS 3 data_offset $((XOFF - 8)) md_superblocks"
bad order "Member order differs" "$T $2 $1 $3 $4 $5 $6 $O3"
bad twice "The same device is given as two members" "$T $1 $2 $3 $4 $5 $5 $O3"
bad length "Target length" "0 $((XSIZE + 512)) gpu-raid6 left-symmetric 128 6 $XS $O3"
bad rate "Invalid recovery rate" "$T $XS 5 data_offset $XOFF md_superblocks max_recovery_rate 0"
bad rebuildidx "Rebuild index out of range" "$T $XS 5 data_offset $XOFF md_superblocks rebuild 6"
bad rebuild3 "More than two members to rebuild" "$T $XS 9 data_offset $XOFF md_superblocks rebuild 0 rebuild 1 rebuild 2"
ev_x2=$(exf $1 Events)
freemembers y
freemembers x
mkmembers z
mdadm --create /dev/md0 --run --quiet --level=6 --raid-devices=$N --chunk=64 \
    --metadata=0.90 --assume-clean $SH > /dev/null 2>&1
ZSIZE=$(cat /sys/block/md0/size); mdstop
bad v090 "md 0.90 metadata is not supported" "0 $ZSIZE gpu-raid6 left-symmetric 128 6 $SH 1 md_superblocks"
for l in $SH; do mdadm --zero-superblock $l > /dev/null 2>&1; done
mdcreate --assume-clean --bitmap=internal || exit 1
mdstop
set -- $SH
BMAT=$(( ($(exf $1 "Super Offset") + $(exf $1 "Internal Bitmap")) * 512 ))
printf 'junk' | dd of=$1 bs=1 seek=$BMAT conv=notrunc oflag=direct status=none 2>/dev/null ||
    printf 'junk' | dd of=$1 bs=1 seek=$BMAT conv=notrunc status=none
sync
bad bitmap "md bitmap damaged: bad magic" "0 $MDSIZE gpu-raid6 left-symmetric 128 6 $SH 3 data_offset $MDOFF md_superblocks"
freemembers z
res bad_nothing_written before=$ev_x after=$ev_x2

stamp end
