#!/bin/bash
# A guest served by its host's helper through ivshmem: correctness, then
# numbers. Runs inside a testbed guest (a bundle's or the host's root)
# started with --ivshmem SOCKET while `kgpu helper --ivshmem SOCKET` runs
# on the host:
#
#   kgpu helper --ivshmem /tmp/g.sock --backend cupy --crossover 0 &
#   kgpu testbed run --bundle B.tar.gz --ivshmem /tmp/g.sock \
#       'bash testbed/harness/ivshmem-guest.sh'
#
# Writes to $KGPU_OUT: the kgpu counters (/sys/kernel/debug/kgpu/stats)
# after each step, the module self-test's verdict (every helper answer
# checked against the guest kernel's own xts(aes) and raid6_pq), fio JSON
# of a verify run on gpu-crypt and on gpu-raid6, and fio JSON of the same
# 4 KiB depth-1 random reads and 1 MiB depth-8 sequential reads and
# writes on gpu-crypt and on stock dm-crypt over identical loop devices.
# $KGPU_MODULES: the folder of kgpu.ko (a bundle guest has it set).
# $SECONDS_PER_RUN (default 5) and $REPS (default 3) set the timing runs.
set -u
O=${KGPU_OUT:-/tmp/kgpu-out}
M=${KGPU_MODULES:?set KGPU_MODULES to the folder of kgpu.ko}
T=${SECONDS_PER_RUN:-5}
REPS=${REPS:-3}
ST=/sys/kernel/debug/kgpu/stats
mkdir -p $O
say() { echo "ivshmem-guest: $*"; }
die() { say "FAILED: $*"; exit 1; }

for m in dm-mod dm-crypt raid6_pq loop; do modprobe $m || die "modprobe $m"; done
insmod $M/kgpu.ko timeout_ms=10000 || die "insmod kgpu.ko"
insmod $M/dm-gpu-crypt.ko || die "insmod dm-gpu-crypt.ko"
insmod $M/dm-gpu-raid6.ko || die "insmod dm-gpu-raid6.ko"
[ "$(cat /sys/module/kgpu/parameters/region)" = ivshmem ] ||
	die "kgpu.ko did not take the ivshmem region (no --ivshmem device?)"
for i in $(seq 600); do
	grep -q '^helper_pid: [1-9]' $ST && break
	sleep 0.2
done
grep -q '^helper_pid: [1-9]' $ST || die "no helper attached in 120 s"
cp $ST $O/stats-0-attached.txt
dmesg | grep -i kgpu > $O/dmesg-attach.txt

say "self-test through the host helper"
echo 8 > /sys/kernel/debug/kgpu/selftest
cat /sys/kernel/debug/kgpu/selftest | tee $O/selftest.txt
cp $ST $O/stats-1-selftest.txt

KEY=$(head -c 64 /dev/urandom | od -An -tx1 | tr -d ' \n')
loopdev() { truncate -s $2M /tmp/$1.img; losetup -f --show /tmp/$1.img; }
G=$(loopdev gpu 256)
S=$(loopdev stock 256)
echo "0 $((256 * 2048)) gpu-crypt aes-xts-plain64 $KEY 0 $G 0" | dmsetup create g
echo "0 $((256 * 2048)) crypt aes-xts-plain64 $KEY 0 $S 0" | dmsetup create s
dmsetup mknodes
[ -b /dev/mapper/g ] && [ -b /dev/mapper/s ] || die "dmsetup create"

say "fio verify on gpu-crypt (128 MiB, 1 MiB blocks)"
fio --name=verify --filename=/dev/mapper/g --rw=write --bs=1M --size=128M \
	--ioengine=libaio --iodepth=8 --direct=1 --verify=crc32c \
	--do_verify=1 --verify_fatal=0 --output-format=json \
	--output=$O/fio-verify-crypt.json || die "fio verify on gpu-crypt"
cp $ST $O/stats-2-verify.txt
# stock dm-crypt reads what gpu-crypt wrote: same table, same bytes
dd if=/dev/mapper/g bs=1M count=128 status=none | sha256sum > $O/sum-gpu.txt
dmsetup remove g
echo "0 $((256 * 2048)) crypt aes-xts-plain64 $KEY 0 $G 0" | dmsetup create x
dmsetup mknodes
dd if=/dev/mapper/x bs=1M count=128 status=none | sha256sum > $O/sum-stock.txt
dmsetup remove x
echo "0 $((256 * 2048)) gpu-crypt aes-xts-plain64 $KEY 0 $G 0" | dmsetup create g
dmsetup mknodes

say "timing: gpu-crypt and crypt, $REPS x ${T}s per point"
point() {  # point <name> <dev> <fio args...>
	local name=$1 dev=$2 r
	shift 2
	for r in $(seq $REPS); do
		fio --name=$name --filename=$dev --direct=1 --time_based \
			--runtime=$T --ioengine=libaio --output-format=json \
			--output=$O/fio-$name-$r.json "$@" || die "fio $name"
	done
}
for d in g s; do
	point $d-4k-qd1-randread /dev/mapper/$d --rw=randread --bs=4k --iodepth=1
	point $d-1m-qd8-read /dev/mapper/$d --rw=read --bs=1M --iodepth=8
	point $d-1m-qd8-write /dev/mapper/$d --rw=write --bs=1M --iodepth=8
	cp $ST $O/stats-3-after-$d.txt
done
dmsetup remove g
dmsetup remove s

say "gpu-raid6: six 32 MiB members, left-symmetric, 64 KiB chunks"
R=""
for i in 0 1 2 3 4 5; do R="$R $(loopdev r$i 32)"; done
echo "0 $((512 * 4 * 128)) gpu-raid6 left-symmetric 128 6$R" | dmsetup create r6 ||
	die "gpu-raid6 create"
dmsetup mknodes
fio --name=verify-r6 --filename=/dev/mapper/r6 --rw=randwrite --bs=64k \
	--size=96M --ioengine=libaio --iodepth=8 --direct=1 --verify=crc32c \
	--do_verify=1 --verify_fatal=0 --output-format=json \
	--output=$O/fio-verify-raid6.json || die "fio verify on gpu-raid6"
point r6-1m-qd8-write /dev/mapper/r6 --rw=write --bs=1M --iodepth=8
dmsetup status r6 > $O/status-r6.txt
dmsetup remove r6
cp $ST $O/stats-4-end.txt
dmesg | grep -iE "kgpu|BUG|WARNING|Oops" > $O/dmesg.txt
say "done"
