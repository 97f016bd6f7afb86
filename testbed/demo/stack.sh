# kgpu's whole stack under fio, with stock dm-crypt and md as oracles.
#
# Sourced by bash after these variables are set (kgpu demo sets them in
# the testbed guest, kgpu bench stack on a real host):
#   B          directory with kgpu.ko, dm-gpu-crypt.ko, dm-gpu-raid6.ko
#   JOBS       directory with the fio job files (testbed/demo/jobs)
#   OUT        where results go (fio JSON, checks.txt, status files)
#   WORK       scratch directory (loop backing files, mount point)
#   MEMBERS    six block devices, or empty: six loop devices of LOOP_MB MiB
#              are made in WORK
#   MEMBER_MB  MiB of each member that the arrays use
#   BACKEND    the helper's backend (cpu, cupy, auto); "none": no helper
#   SEQ_MB RAND4K_MB RAND64K_MB MIXED_MB   span of each fio job
#   MDDEV      the md device to use (/dev/md0 unless busy)
#   SWEEP_BS   block sizes of the throughput sweep ("" skips the sweep)
#   REPS SECONDS_PER_RUN IODEPTH           of each sweep point
# and after the functions of bench.POINT (point, kcpu, hcpu).
#
# It prints "@@step <n>/<total> <title>" when a step starts and
# "@@check <name> PASS|FAIL <detail>" for each verdict (also appended to
# $OUT/checks.txt); fio's own progress lines come between them. Everything
# it sets up is torn down on exit, also after a failure.

set -u
STEPS=7
CHUNK_K=64
NDEVS=6
MNT=$WORK/mnt
step() { echo "@@step $1/$STEPS $2"; }
check() {  # check <name> <0 = pass> <detail>
    local v=FAIL
    [ "$2" = 0 ] && v=PASS
    echo "@@check $1 $v ${3:-}"
    echo "$1 $v ${3:-}" >> $OUT/checks.txt
}
die() { echo "@@fatal $*"; exit 1; }
quiet() { "$@" > /dev/null 2>&1; }

# -- teardown, also on failure ------------------------------------------------
HP=0
cleanup() {
    set +e
    quiet umount $MNT
    for d in kgpu-chk kgpu-c kgpu-stock kgpu-r6 kgpu-b kgpu-b6; do
        quiet dmsetup remove $d
    done
    quiet mdadm --stop $MDDEV
    for i in $(seq 0 $((NDEVS - 1))); do quiet dmsetup remove kgpu-m$i; done
    [ "$HP" != 0 ] && { kill $HP; wait $HP; } 2> /dev/null
    for l in ${OWN_LOOPS:-}; do quiet losetup -d $l; done
    rm -f $WORK/member* $WORK/key
}
trap cleanup EXIT

# fio with its progress on stdout and its JSON report in a file.
# runfio <json> <job file> [fio options...]
runfio() {
    local out=$1 job=$2
    shift 2
    fio --eta=always --eta-newline=1 --output-format=json --output=$out \
        "$@" $JOBS/$job.fio
}

# -- 1. modules, helper, members ----------------------------------------------
step 1 "load the modules, start the helper, make the members"
mkdir -p $OUT $WORK $MNT
: > $OUT/checks.txt
quiet modprobe loop
for m in dm_mod dm_crypt raid6_pq raid456; do modprobe $m || die "modprobe $m"; done
for m in kgpu dm-gpu-crypt dm-gpu-raid6; do
    if ! grep -q "^${m//-/_} " /proc/modules; then
        insmod $B/$m.ko || die "insmod $B/$m.ko"
    fi
done
if [ "$BACKEND" != none ]; then
    kgpu helper --backend $BACKEND > $OUT/helper.log 2>&1 &
    HP=$!
    echo $HP > $WORK/helper.pid
    for i in $(seq 1800); do
        grep -q "INFO: serving" $OUT/helper.log && break
        kill -0 $HP 2> /dev/null || break
        sleep 0.1
    done
    grep -q "INFO: serving" $OUT/helper.log || die "the helper did not start: $(tail -3 $OUT/helper.log)"
    echo "helper: $(grep -m1 'INFO: serving' $OUT/helper.log | sed 's/.*INFO: //')"
fi
OWN_LOOPS=""
if [ -z "$MEMBERS" ]; then
    for i in $(seq 0 $((NDEVS - 1))); do
        truncate -s ${MEMBER_MB}M $WORK/member$i
        OWN_LOOPS="$OWN_LOOPS $(losetup -f --show $WORK/member$i)" || die "losetup"
    done
    MEMBERS=${OWN_LOOPS# }
else
    # Real devices: zero what the arrays use, so that P and Q start
    # consistent (all zero) and --assume-clean is the truth.
    for m in $MEMBERS; do
        dd if=/dev/zero of=$m bs=1M count=$MEMBER_MB oflag=direct status=none || die "zeroing $m"
    done
fi
# Each member behind a dm-linear device, so that one can fail on demand.
SHIMS=""
i=0
for m in $MEMBERS; do
    echo "0 $((MEMBER_MB * 2048)) linear $m 0" | dmsetup create kgpu-m$i || die "dm-linear over $m"
    SHIMS="$SHIMS /dev/mapper/kgpu-m$i"
    i=$((i + 1))
done
SHIMS=${SHIMS# }
quiet dmsetup mknodes
head -c 64 /dev/urandom > $WORK/key
KEY=$(od -An -tx1 $WORK/key | tr -d ' \n')

# The fio suite on a mounted file system; JSON to $OUT/suite-<label>-<job>.json
suite() {
    local label=$1 job mb
    for job in seq-1m rand-4k rand-64k mixed; do
        case $job in
        seq-1m) mb=$SEQ_MB;; rand-4k) mb=$RAND4K_MB;;
        rand-64k) mb=$RAND64K_MB;; mixed) mb=$MIXED_MB;;
        esac
        echo "@@fio $label $job ${mb} MiB"
        FILENAME=$MNT/$job.dat runfio $OUT/suite-$label-$job.json $job --size=${mb}M
        check fio-verify-$label-$job $? "$job on $label, ${mb} MiB"
    done
}
mkfs_mount() {
    mkfs.ext4 -q -F -E lazy_itable_init=0,lazy_journal_init=0 $1 || die "mkfs.ext4 $1"
    mount $1 $MNT || die "mount $1"
}

# -- 2. stock stack: md RAID6 + dm-crypt + ext4 --------------------------------
step 2 "stock stack: md RAID6 + dm-crypt + ext4, fio suite"
mdadm --create $MDDEV --run --quiet --level=6 --raid-devices=$NDEVS \
    --chunk=$CHUNK_K --layout=left-symmetric --metadata=1.2 --assume-clean \
    $SHIMS > $OUT/mdadm-create.txt 2>&1 || die "mdadm --create: $(cat $OUT/mdadm-create.txt)"
MD=$MDDEV
MDS=$(blockdev --getsz $MD)
echo "0 $MDS crypt aes-xts-plain64 $KEY 0 $MD 0" | dmsetup create kgpu-stock || die "crypt over md"
quiet dmsetup mknodes
mkfs_mount /dev/mapper/kgpu-stock
suite stock
umount $MNT
dmsetup remove kgpu-stock
mdadm --stop $MD > /dev/null 2>&1 || die "mdadm --stop"

# -- 3. kgpu stack: gpu-raid6 + gpu-crypt + ext4 -------------------------------
step 3 "kgpu stack: gpu-raid6 + gpu-crypt + ext4, fio suite"
gpu_stack() {
    kgpu raid6 create kgpu-r6 --from-mdadm $SHIMS > $OUT/raid6-create.txt 2>&1 \
        || die "kgpu raid6 create: $(cat $OUT/raid6-create.txt)"
    kgpu crypt open kgpu-c /dev/mapper/kgpu-r6 --key-file $WORK/key > $OUT/crypt-open.txt 2>&1 \
        || die "kgpu crypt open: $(cat $OUT/crypt-open.txt)"
}
gpu_stack
echo "$(dmsetup table kgpu-r6)"
mkfs_mount /dev/mapper/kgpu-c
suite kgpu
# A file of known content beside fio's, for the interop checks.
head -c $((SEQ_MB * 1048576)) /dev/urandom > $MNT/payload.bin
(cd $MNT && sha256sum *.dat payload.bin > $WORK/sums)
umount $MNT
dmsetup status kgpu-r6 > $OUT/status-kgpu-r6.txt
dmsetup status kgpu-c > $OUT/status-kgpu-c.txt

# -- 4. stock dm-crypt reads what gpu-crypt wrote ------------------------------
step 4 "interop: stock dm-crypt reads what gpu-crypt wrote"
S=$(blockdev --getsz /dev/mapper/kgpu-r6)
echo "0 $S crypt aes-xts-plain64 $KEY 0 /dev/mapper/kgpu-r6 0" | dmsetup create --readonly kgpu-chk || die "crypt over gpu-raid6"
quiet dmsetup mknodes
e2fsck -fn /dev/mapper/kgpu-chk > $OUT/e2fsck-crypt.txt 2>&1
check crypt-reads-gpu-crypt-fsck $? "e2fsck -fn through stock crypt"
mount -o ro /dev/mapper/kgpu-chk $MNT && (cd $MNT && sha256sum -c --quiet $WORK/sums) > $OUT/sums-crypt.txt 2>&1
check crypt-reads-gpu-crypt-files $? "sha256 of every file through stock crypt"
quiet umount $MNT
dmsetup remove kgpu-chk
dmsetup remove kgpu-c
dmsetup remove kgpu-r6

# -- 5. md assembles what gpu-raid6 wrote ---------------------------------------
step 5 "interop: md assembles the members gpu-raid6 wrote; parity check"
mdadm --assemble $MDDEV --run $SHIMS > /dev/null 2>&1 || die "mdadm --assemble"
MD=$MDDEV
echo check > /sys/block/${MD#/dev/}/md/sync_action
sleep 0.5
while [ "$(cat /sys/block/${MD#/dev/}/md/sync_action)" != idle ]; do
    echo "md check: $(grep -o '[0-9.]*%' /proc/mdstat | head -1)"
    sleep 1
done
MM=$(cat /sys/block/${MD#/dev/}/md/mismatch_cnt)
check md-parity-check "$MM" "mismatch_cnt=$MM after md's check of gpu-raid6's writes"
echo "0 $MDS crypt aes-xts-plain64 $KEY 0 $MD 0" | dmsetup create --readonly kgpu-chk || die "crypt over md"
quiet dmsetup mknodes
mount -o ro /dev/mapper/kgpu-chk $MNT && (cd $MNT && sha256sum -c --quiet $WORK/sums) > $OUT/sums-md.txt 2>&1
check md-reads-gpu-raid6-files $? "sha256 of every file through md + crypt"
quiet umount $MNT
dmsetup remove kgpu-chk
mdadm --stop $MD > /dev/null 2>&1

# -- 6. a member fails under load ------------------------------------------------
step 6 "degraded: member 2 fails while fio verifies; reads and writes go on"
gpu_stack
mount /dev/mapper/kgpu-c $MNT || die "mount kgpu-c"
echo "@@fio degraded seq-1m-read $SEQ_MB MiB"
FILENAME=$MNT/seq-1m.dat runfio $OUT/degraded-read.json seq-1m --size=${SEQ_MB}M \
    --section=seq-1m-read --rate=$(( SEQ_MB * 1048576 / 4 )) &
FP=$!
sleep 1
kill -0 $FP 2> /dev/null && echo "fio running: failing member 2"
dmsetup suspend kgpu-m2
dmsetup load kgpu-m2 --table "0 $((MEMBER_MB * 2048)) error"
dmsetup resume kgpu-m2
wait $FP
check degraded-fio-verify $? "fio read verify across the failure of member 2"
ST=$(dmsetup status kgpu-r6)
echo "$ST" > $OUT/status-degraded.txt
echo "$ST" | awk '{print $6}' | grep -q '^AAD' ; check degraded-member-marked-dead $? "status: $ST"
echo 3 > /proc/sys/vm/drop_caches
(cd $MNT && sha256sum -c --quiet $WORK/sums) > $OUT/sums-degraded.txt 2>&1
check degraded-files-read $? "sha256 of every file with member 2 dead"
echo "@@fio degraded rand-64k $RAND64K_MB MiB"
FILENAME=$MNT/degraded.dat runfio $OUT/degraded-rand-64k.json rand-64k --size=${RAND64K_MB}M
check degraded-fio-write-verify $? "rand-64k write + verify with member 2 dead"
(cd $MNT && sha256sum degraded.dat >> $WORK/sums)
umount $MNT
dmsetup status kgpu-r6 > $OUT/status-kgpu-r6-degraded.txt
dmsetup remove kgpu-c
dmsetup remove kgpu-r6
# md, given the five survivors, reads what gpu-raid6 wrote while degraded.
mdadm --assemble $MDDEV --run $(echo $SHIMS | sed 's#/dev/mapper/kgpu-m2##') > /dev/null 2>&1 || die "mdadm --assemble degraded"
MD=$MDDEV
echo "0 $MDS crypt aes-xts-plain64 $KEY 0 $MD 0" | dmsetup create --readonly kgpu-chk || die "crypt over degraded md"
quiet dmsetup mknodes
mount -o ro /dev/mapper/kgpu-chk $MNT && (cd $MNT && sha256sum -c --quiet $WORK/sums) > $OUT/sums-md-degraded.txt 2>&1
check md-reads-degraded-writes $? "degraded md + crypt read every file, the degraded write included"
quiet umount $MNT
dmsetup remove kgpu-chk
mdadm --stop $MD > /dev/null 2>&1
# member 2 comes back for the sweep
dmsetup suspend kgpu-m2
echo "0 $((MEMBER_MB * 2048)) linear $(echo $MEMBERS | cut -d' ' -f3) 0" | dmsetup load kgpu-m2
dmsetup resume kgpu-m2

# -- 7. throughput against block size -------------------------------------------
step 7 "throughput sweep: each target beside its stock twin"
kgpu status --json > $OUT/kgpu-status-stack.json 2> /dev/null || true
if [ -n "$SWEEP_BS" ]; then
    M0=/dev/mapper/kgpu-m0
    S0=$(blockdev --getsz $M0)
    for t in crypt gpu-crypt; do
        echo "0 $S0 $t aes-xts-plain64 $KEY 0 $M0 0" | dmsetup create kgpu-b || die "$t for the sweep"
        quiet dmsetup mknodes
        for bs in $SWEEP_BS; do
            for rw in write read; do
                echo "@@point $t $bs $rw"
                point $t /dev/mapper/kgpu-b $bs $rw $MEMBER_MB
            done
        done
        dmsetup remove kgpu-b
    done
    for l in $SHIMS; do quiet mdadm --zero-superblock $l; done
    mdadm --create $MDDEV --run --quiet --level=6 --raid-devices=$NDEVS \
        --chunk=$CHUNK_K --layout=left-symmetric --metadata=1.0 --assume-clean \
        $SHIMS > /dev/null 2>&1 || die "mdadm --create for the sweep"
    MD=$MDDEV
    MB=$(( $(blockdev --getsz $MD) / 2048 ))
    sweep() {  # sweep <label> <dev> [reads]
        local bs rw
        for bs in $SWEEP_BS; do
            for rw in write read; do
                [ -n "${3:-}" ] && [ $rw = write ] && continue
                echo "@@point $1 $bs $rw"
                point $1 $2 $bs $rw $MB
            done
        done
    }
    sweep md $MD
    mdadm $MD --fail /dev/mapper/kgpu-m1 > /dev/null 2>&1
    sweep md-degraded $MD reads
    mdadm --stop $MD > /dev/null 2>&1
    for l in $SHIMS; do quiet mdadm --zero-superblock $l; done
    ROWS=$(( MEMBER_MB * 2048 / (CHUNK_K * 2) ))
    LEN=$(( ROWS * (NDEVS - 2) * CHUNK_K * 2 ))
    echo "0 $LEN gpu-raid6 left-symmetric $((CHUNK_K * 2)) $NDEVS $SHIMS" | dmsetup create kgpu-b6 || die "gpu-raid6 for the sweep"
    quiet dmsetup mknodes
    sweep gpu-raid6 /dev/mapper/kgpu-b6
    dmsetup remove kgpu-b6
    DEG=$(echo $SHIMS | awk '{$2 = "-"; print}')
    echo "0 $LEN gpu-raid6 left-symmetric $((CHUNK_K * 2)) $NDEVS $DEG" | dmsetup create kgpu-b6 || die "degraded gpu-raid6 for the sweep"
    quiet dmsetup mknodes
    sweep gpu-raid6-degraded /dev/mapper/kgpu-b6 reads
    dmsetup remove kgpu-b6
fi
kgpu status --json > $OUT/kgpu-status.json 2> /dev/null || true
if dmesg | grep -E 'BUG:|Oops|WARNING:|Call Trace' > $OUT/dmesg-bad.txt; then
    check kernel-log 1 "$(head -1 $OUT/dmesg-bad.txt)"
else
    check kernel-log 0 "no BUG, Oops or WARNING in the kernel log"
fi
echo "@@end $(cut -d' ' -f1 /proc/uptime)"
