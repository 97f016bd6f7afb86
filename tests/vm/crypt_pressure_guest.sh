# gpu-crypt under memory pressure with the helper stopped: the fallback
# must not wait for what it frees. Run as root inside a small testbed guest
# (bash): bounce pages (as for device memory), a helper that is SIGSTOPped
# after it served, a memory hog, buffered 1 MiB writes with fio verify.
# Appends "<name> key=value..." lines to $KGPU_OUT/results.
# Usage: bash crypt_pressure_guest.sh <build dir>
set -u
B=$1
O=$KGPU_OUT
res() { echo "$*" >> $O/results; }
modprobe loop
modprobe dm_mod
modprobe raid6_pq
insmod $B/kgpu.ko timeout_ms=3000 || exit 1
insmod $B/dm-gpu-crypt.ko || exit 1
echo 1 > /sys/module/dm_gpu_crypt/parameters/bounce
echo 60 > /proc/sys/kernel/hung_task_timeout_secs   # stricter than 120 s

W=/tmp/press
mkdir -p $W
fallocate -l 72M $W/disk.img   # tmpfs: its pages now, not under the hog
L=$(losetup -f --show $W/disk.img)
KEY=$(head -c 64 /dev/urandom | od -An -tx1 | tr -d ' \n')
echo "0 $((72 << 11)) gpu-crypt aes-xts-plain64 $KEY 0 $L 0" | dmsetup create g
dmsetup mknodes g
st() { dmsetup status g | sed -n "s/.*$1:\([0-9]*\).*/\1/p"; }

kgpu helper --backend cpu > $O/helper.log 2>&1 &
HP=$!
for i in $(seq 1200); do grep -q "INFO: serving" $O/helper.log && break; sleep 0.1; done
dd if=/dev/urandom of=/dev/mapper/g bs=1M count=4 oflag=direct status=none
served0=$(st helper_cpu)
kill -STOP $HP

# the hog: all but 128 MiB of what is available, touched, first to go if
# the OOM killer must choose (dirty pages written back through requests
# that time out are slow to free: a tighter hog gets killed)
sync; echo 3 > /proc/sys/vm/drop_caches
avail=$(awk '/MemAvailable/ {print int($2 / 1024)}' /proc/meminfo)
python3 - $((avail - 128)) > $O/hog.txt 2>&1 <<'PY' &
import os, sys, time
open("/proc/self/oom_score_adj", "w").write("1000")
mb = int(sys.argv[1])
hog = [bytearray(1 << 20) for _ in range(mb)]
for b in hog:
    b[::4096] = b"x" * len(b[::4096])
print("holding", mb, "MiB", flush=True)
time.sleep(3600)
PY
HOG=$!
for i in $(seq 300); do grep -q holding $O/hog.txt && break; sleep 0.2; done
free -m > $O/free-under-hog.txt
t0=$(cut -d' ' -f1 /proc/uptime)
timeout 900 fio --name=press --filename=/dev/mapper/g --rw=write --bs=1m \
    --size=48m --ioengine=psync --direct=0 --end_fsync=1 \
    --verify=crc32c --verify_fatal=1 --do_verify=1 \
    --output-format=json --output=$O/fio-press.json > $O/fio-press.log 2>&1
frc=$?
t1=$(cut -d' ' -f1 /proc/uptime)
fb=$(st fallback); kern=$(st kernel)
hog_alive=no; kill -0 $HOG 2>/dev/null && hog_alive=yes
kill $HOG; wait $HOG 2>/dev/null
# the helper, woken, serves again
kill -CONT $HP
sleep 1
before=$(st helper_cpu)
for i in $(seq 30); do
    dd if=/dev/urandom of=/dev/mapper/g bs=1M count=2 oflag=direct status=none
    [ "$(st helper_cpu)" -gt "$before" ] && break
    sleep 1
done
after=$(st helper_cpu)
blocked=$(dmesg | grep -c "blocked for more than")
oom=$(dmesg | grep -c "Out of memory")
victims=$(dmesg | sed -n 's/.*Killed process \([0-9]*\).*/\1/p' | sort -u | tr '\n' ,)
secs=$(awk -v a=$t0 -v b=$t1 'BEGIN {printf "%.0f", b - a}')
res pressure fio_rc=$frc secs=$secs served_before=$served0 fallback=$fb kernel=$kern hog_alive=$hog_alive hog=$HOG oom=$oom victims=${victims:-none} blocked=$blocked
res resumed before=$before after=$after
kill -TERM $HP; wait $HP
dmsetup remove g
losetup -d $L
dmesg > $O/dmesg.txt
