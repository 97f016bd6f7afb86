# gpu-crypt checks, run as root inside a testbed guest (bash).
#
# Every data check uses stock dm-crypt ("crypt") as the oracle: what one
# target writes, the other reads. Each check appends "ok <name>" or
# "fail <name>: <why>" to $KGPU_OUT/results; the pytest side asserts.
# Usage: bash gpu_crypt_guest.sh <build dir>
set -u
B=$1
O=$KGPU_OUT
R=$O/results
: > "$R"
ok() { echo "ok $1" >> "$R"; }
fail() { echo "fail $1: $2" >> "$R"; echo "FAIL $1: $2" >&2; }
check() { # check <name> <command...>: ok when the command succeeds
	local name=$1; shift
	if out=$("$@" 2>&1); then ok "$name"; else fail "$name" "$(echo "$out" | tail -n 5 | tr '\n' ' ')"; fi
}

modprobe loop
modprobe dm_mod
modprobe dm_crypt
modprobe raid6_pq
insmod "$B/kgpu.ko" timeout_ms=30000 || exit 1
insmod "$B/dm-gpu-crypt.ko" || exit 1

W=/tmp/gcrypt
mkdir -p $W
truncate -s 80M $W/disk.img
L=$(losetup -f --show $W/disk.img)
DEVSECT=$((80 << 11))
head -c 2M /dev/urandom > $W/data

hexkey() { head -c "$1" /dev/urandom | od -An -tx1 | tr -d ' \n'; }

mk() { # mk <name> <table line>
	echo "$2" | dmsetup create "$1" && dmsetup mknodes "$1"
}

# One interop case, both directions: <name> <cipher> <key bytes>
# <iv_offset> <device offset> [<#opts> <opts>...]
interop() {
	local name=$1 cipher=$2 kb=$3 ivo=$4 off=$5; shift 5
	local opts="$*" key len w r
	key=$(hexkey "$kb")
	len=$(( (DEVSECT - off) / 8 * 8 ))
	for w in gpu-crypt crypt; do
		r=crypt; [ $w = crypt ] && r=gpu-crypt
		wipefs -qa "$L" 2>/dev/null; dd if=/dev/zero of="$L" bs=1M count=4 status=none
		mk w "0 $len $w $cipher $key $ivo $L $off $opts" || { fail "$name/$w" "create $w"; continue; }
		dd if=$W/data of=/dev/mapper/w bs=256k oflag=direct status=none
		dmsetup remove w
		mk r "0 $len $r $cipher $key $ivo $L $off $opts" || { fail "$name/$w" "create $r"; continue; }
		dd if=/dev/mapper/r of=$W/back bs=256k count=8 iflag=direct status=none
		dmsetup remove r
		if cmp -s $W/data $W/back; then ok "$name/$w-to-$r"
		else fail "$name/$w-to-$r" "read back differs"; fi
	done
}

matrix() { # matrix <suffix>
	local s=$1
	interop "plain64-512k$s" aes-xts-plain64 64 0 0
	interop "plain64-256k-ivoff-devoff$s" aes-xts-plain64 32 12345 8
	interop "plain-ivwrap$s" aes-xts-plain 64 4294967290 0
	interop "ss1024$s" aes-xts-plain64 64 2 16 1 sector_size:1024
	interop "ss4096-large$s" aes-xts-plain64 64 8 8 2 sector_size:4096 iv_large_sectors
	interop "ss4096$s" aes-xts-plain64 32 0 2048 1 sector_size:4096
	interop "plain-ss1024-large$s" aes-xts-plain 32 4294967290 0 2 sector_size:1024 iv_large_sectors
}

start_helper() { # start_helper <log>
	kgpu helper --backend cpu > "$1" 2>&1 &
	HP=$!
	for i in $(seq 1200); do
		grep -q "INFO: serving" "$1" && return 0
		sleep 0.1
	done
	fail helper-start "$(tail -n 3 "$1")"
	return 1
}

# fio with crc32c verify on a fresh gpu-crypt: <name> <rw> [extra fio args]
fio_verify() {
	local name=$1 rw=$2; shift 2
	fio --name="$name" --filename=/dev/mapper/g --direct=1 \
		--ioengine=libaio --iodepth=32 --rw="$rw" --bsrange=4k-1m \
		--size=24m --verify=crc32c --verify_fatal=1 --do_verify=1 \
		--output-format=json --output=$O/fio-$name.json "$@" \
		> $O/fio-$name.log 2>&1
}

KEY=$(hexkey 64)
G="0 $((DEVSECT - 8)) gpu-crypt aes-xts-plain64 $KEY 0 $L 8"

# ---- without a helper: the kernel's xts(aes) -----------------------------
matrix ""
mk g "$G"
check fio-rand-nohelper fio_verify rand-nohelper randwrite
check fio-seq-nohelper fio_verify seq-nohelper write
dmsetup status g > $O/status-nohelper.txt
dmsetup remove g

# ---- bad table lines: refused with the message, nothing left behind -------
bad() { # bad <name> <expected dmesg text> <table line>
	dmesg -C
	if echo "$3" | dmsetup create bad 2>/dev/null; then
		dmsetup remove bad
		fail "bad/$1" "accepted"
		return
	fi
	if dmsetup info bad > /dev/null 2>&1; then
		dmsetup remove bad
		fail "bad/$1" "device left behind"
	elif dmesg | grep -qF "$2"; then
		ok "bad/$1"
	else
		fail "bad/$1" "no '$2' in dmesg: $(dmesg | tail -n 2 | tr '\n' ' ')"
	fi
}
S=$((DEVSECT - 8))
bad cipher "Unsupported cipher" "0 $S gpu-crypt aes-cbc-essiv:sha256 $KEY 0 $L 8"
bad keylen "Invalid key size" "0 $S gpu-crypt aes-xts-plain64 ${KEY:0:62} 0 $L 8"
bad keyhex "Key is not hex" "0 $S gpu-crypt aes-xts-plain64 zz${KEY:2} 0 $L 8"
bad keyring "Keyring key not found" "0 $S gpu-crypt aes-xts-plain64 :64:logon:kgpu-no-such-key 0 $L 8"
bad keyringtype "Invalid keyring key type" "0 $S gpu-crypt aes-xts-plain64 :64:trusted:x 0 $L 8"
bad sectorsize "Invalid sector_size" "0 $S gpu-crypt aes-xts-plain64 $KEY 0 $L 8 1 sector_size:3000"
bad optunknown "Unknown or malformed optional parameter" "0 $S gpu-crypt aes-xts-plain64 $KEY 0 $L 8 1 no_such_flag"
bad optcount "Invalid number of optional parameters" "0 $S gpu-crypt aes-xts-plain64 $KEY 0 $L 8 3 allow_discards"
bad optjunk "Unexpected arguments" "0 $S gpu-crypt aes-xts-plain64 $KEY 0 $L 8 1 allow_discards extra"
bad ivoffset "Invalid iv_offset sector" "0 $S gpu-crypt aes-xts-plain64 $KEY 3 $L 8 1 sector_size:4096"
bad ivoffsetjunk "Invalid iv_offset sector" "0 $S gpu-crypt aes-xts-plain64 $KEY 0x $L 8"
bad devsector "Invalid device sector" "0 $S gpu-crypt aes-xts-plain64 $KEY 0 $L 8k"
bad nodev "Device lookup failed" "0 $S gpu-crypt aes-xts-plain64 $KEY 0 /dev/no-such-disk 8"
bad beyond "too small for target" "0 $S gpu-crypt aes-xts-plain64 $KEY 0 $L 4096"
bad lenmultiple "not a multiple of sector_size" "0 $((S - 1)) gpu-crypt aes-xts-plain64 $KEY 0 $L 8 1 sector_size:4096"
bad fewargs "Not enough arguments" "0 $S gpu-crypt aes-xts-plain64 $KEY 0 $L"

# ---- the table line comes back as dm-crypt gives it ------------------------
MM=$(cat /sys/block/"$(basename "$L")"/dev)
T="0 $S gpu-crypt aes-xts-plain64 $KEY 8 $MM 8 4 allow_discards same_cpu_crypt sector_size:4096 iv_large_sectors"
mk g "$T"
mk c "${T/gpu-crypt/crypt}"
a=$(dmsetup table g); b=$(dmsetup table --showkeys c)
if [ "$a" = "$T" ] && [ "${b/crypt/gpu-crypt}" = "$a" ]; then ok table
else fail table "gpu-crypt '$a', crypt '$b', given '$T'"; fi
dmsetup remove c
dmsetup remove g

# ---- a keyring key (the form LUKS2 volumes use) ----------------------------
python3 - "$KEY" <<'EOF'
import ctypes, sys
libc = ctypes.CDLL(None, use_errno=True)
key = bytes.fromhex(sys.argv[1])
# add_key(2), x86_64 syscall 248; -4: the user keyring
if libc.syscall(248, b"logon", b"kgpu:test", key, len(key), -4) < 0:
    sys.exit(f"add_key: errno {ctypes.get_errno()}")
EOF
mk g "0 $S gpu-crypt aes-xts-plain64 :64:logon:kgpu:test 0 $L 8"
case "$(dmsetup table g)" in
*" :64:logon:kgpu:test 0 "*) ok keyring-table ;;
*) fail keyring-table "$(dmsetup table g | cut -c1-60)" ;;
esac
dd if=$W/data of=/dev/mapper/g bs=1M oflag=direct status=none
dmsetup remove g
mk c "0 $S crypt aes-xts-plain64 $KEY 0 $L 8"
dd if=/dev/mapper/c of=$W/back bs=1M count=2 iflag=direct status=none
dmsetup remove c
check keyring-interop cmp $W/data $W/back

# ---- key wipe and key set, while suspended ---------------------------------
mk g "$G"
dd if=$W/data of=/dev/mapper/g bs=1M oflag=direct status=none
dmsetup message g 0 key wipe 2>/dev/null && fail key-wipe-live "accepted while live" || ok key-wipe-live
dmsetup suspend g
check key-wipe dmsetup message g 0 key wipe
dmsetup resume g 2>/dev/null && fail resume-wiped "resumed without a key" || ok resume-wiped
dmsetup message g 0 key set "${KEY:0:64}" 2>/dev/null && fail key-set-size "other size taken" || ok key-set-size
check key-set dmsetup message g 0 key set "$KEY"
check resume-after-set dmsetup resume g
dd if=/dev/mapper/g of=$W/back bs=1M count=2 iflag=direct status=none
check key-set-data cmp $W/data $W/back
dmsetup remove g

# ---- with the helper (cpu backend) ----------------------------------------
start_helper /tmp/h1.log || exit 1
matrix "+helper"
# The bounce path (a region without struct pages, such as an ivshmem BAR)
echo 1 > /sys/module/dm_gpu_crypt/parameters/bounce
interop "bounce-plain64+helper" aes-xts-plain64 64 16 8 1 sector_size:4096
mk g "$G"
check fio-rand-bounce fio_verify rand-bounce randwrite --size=12m
dmsetup remove g
echo 0 > /sys/module/dm_gpu_crypt/parameters/bounce
mk g "$G"
check fio-rand-helper fio_verify rand-helper randwrite
check fio-seq-helper fio_verify seq-helper write
dmsetup status g > $O/status-helper.txt
# kill -9 the helper in the middle of a verified run (once it has served
# some of it), restart it at once, and check that it serves again after.
served() { dmsetup status g | sed -n 's/.*helper_cpu:\([0-9]*\).*/\1/p'; }
fio_verify killed randrw --size=64m --rwmixread=30 &
FP=$!
base=$(served)
for i in $(seq 600); do [ "$(served)" -ge $((base + 16)) ] && break; sleep 0.1; done
kill -9 $HP
start_helper /tmp/h2.log &
SP=$!
wait $FP && ok fio-helper-killed || fail fio-helper-killed "fio status $?"
dmsetup status g > $O/status-killed.txt
wait $SP
HP=$(pgrep -f "kgpu helper" | head -n 1)
grep -q "INFO: serving" /tmp/h2.log || fail restarted "$(tail -n 3 /tmp/h2.log)"
before=$(served)
dd if=$W/data of=/dev/mapper/g bs=1M oflag=direct status=none
dd if=/dev/mapper/g of=$W/back bs=1M count=2 iflag=direct status=none
[ "$(served)" -gt "$before" ] && cmp -s $W/data $W/back && ok restarted ||
	fail restarted "served $before -> $(served)"
dmsetup remove g

# ---- a file system written through gpu-crypt, checked through crypt ---------
mk g "$G"
mkfs.ext4 -q -F /dev/mapper/g
mkdir -p /mnt/g
mount /dev/mapper/g /mnt/g
mkdir -p /mnt/g/tree
for i in $(seq 40); do head -c $((i * 7919)) /dev/urandom > /mnt/g/tree/f$i; done
cp -a "$(dirname "$B")/../helper" /mnt/g/tree/src 2>/dev/null
(cd /mnt/g && find tree -type f -print0 | sort -z | xargs -0 sha256sum) > $W/sums
umount /mnt/g
dmsetup remove g
mk c "${G/gpu-crypt/crypt}"
check fsck fsck.ext4 -fn /dev/mapper/c
mount -o ro /dev/mapper/c /mnt/g
check fs-files sh -c "cd /mnt/g && sha256sum --quiet -c $W/sums"
umount /mnt/g
dmsetup remove c

# ---- kgpu crypt open / close, against cryptsetup's plain mode -------------
head -c 64 /dev/urandom > $W/keyfile
head -c 16 /dev/urandom > $W/shortkey
kgpu crypt open ko "$L" --key-file $W/shortkey > /dev/null 2>&1 && fail open-short-key "accepted" || ok open-short-key
if kgpu crypt open ko "$L" --key-file $W/keyfile --offset 8 --skip 16 > $O/open.txt 2>&1; then
	dd if=$W/data of=/dev/mapper/ko bs=1M oflag=direct status=none
	kgpu crypt close ko
	cryptsetup open --type plain --cipher aes-xts-plain64 --key-size 512 \
		--key-file $W/keyfile --offset 8 --skip 16 "$L" cs
	dd if=/dev/mapper/cs of=$W/back bs=1M count=2 iflag=direct status=none
	cryptsetup close cs
	check open-vs-cryptsetup cmp $W/data $W/back
else
	fail open-vs-cryptsetup "$(cat $O/open.txt)"
fi

# ---- takeover and release of a LUKS2 volume, mounted, fio running ---------
printf 'kgpu test passphrase' > $W/pass
cryptsetup luksFormat -q --type luks2 --cipher aes-xts-plain64 --key-size 512 \
	--pbkdf pbkdf2 --pbkdf-force-iterations 1000 --key-file $W/pass "$L"
cryptsetup open --key-file $W/pass "$L" lv
cryptsetup luksDump --dump-volume-key --volume-key-file $W/vk \
	--key-file $W/pass --batch-mode "$L" > /dev/null
dmsetup table lv | cut -d' ' -f1-4 > $O/luks-table.txt
mkfs.ext4 -q -F /dev/mapper/lv
mkdir -p /mnt/lv
mount /dev/mapper/lv /mnt/lv
fio --name=takeover --directory=/mnt/lv --size=24m --direct=1 \
	--ioengine=libaio --iodepth=8 --rw=randwrite --bsrange=4k-128k \
	--verify=crc32c --verify_fatal=1 --do_verify=1 --output-format=json \
	--output=$O/fio-takeover.json > $O/fio-takeover.log 2>&1 &
FP=$!
sleep 3
target() { dmsetup table "$1" | cut -d' ' -f3; }
kgpu crypt takeover lv --key-file $W/vk > $O/takeover.txt 2>&1
[ "$(target lv)" = gpu-crypt ] && ok takeover || fail takeover "$(cat $O/takeover.txt)"
sleep 3
kgpu crypt release lv --key-file $W/vk > $O/release.txt 2>&1
[ "$(target lv)" = crypt ] && ok release || fail release "$(cat $O/release.txt)"
wait $FP && ok fio-across-takeover || fail fio-across-takeover "fio status $?"
umount /mnt/lv
check luks-fsck fsck.ext4 -fn /dev/mapper/lv
cryptsetup close lv
# A cipher gpu-crypt cannot do is refused and left as it was.
echo "0 8192 crypt aes-cbc-essiv:sha256 $(hexkey 32) 0 $L 0" | dmsetup create cbc
kgpu crypt takeover cbc > $O/takeover-cbc.txt 2>&1 && fail takeover-refused "accepted" ||
	{ [ "$(target cbc)" = crypt ] && grep -q "not one gpu-crypt does" $O/takeover-cbc.txt &&
	  ok takeover-refused || fail takeover-refused "$(cat $O/takeover-cbc.txt)"; }
dmsetup remove cbc

# ---- the LUKS volumes people have: taken over and released under fio -------
# luks_case <name> <takeover key args> <luksFormat args...>: format, open,
# ext4, fio verify running across takeover and release; cryptsetup status
# while taken over and after; close; stock crypt reads what fio left.
luks_case() {
	local n=$1 kargs=$2; shift 2
	wipefs -qa "$L"
	cryptsetup luksFormat -q --cipher aes-xts-plain64 --key-size 512 \
		--pbkdf pbkdf2 --pbkdf-force-iterations 1000 --key-file $W/pass \
		"$@" "$L" > $O/luks-$n-format.txt 2>&1 || { fail luks-$n "luksFormat: $(cat $O/luks-$n-format.txt)"; return; }
	[ "$1" = "--type" ] && [ "$2" = luks1 ] && local t=luks1 || local t=luks2
	cryptsetup open --key-file $W/pass "$L" lv
	cryptsetup luksDump --dump-volume-key --volume-key-file $W/vk-$n \
		--key-file $W/pass --batch-mode "$L" > /dev/null
	dmsetup table lv | cut -d' ' -f1-4,6- > $O/luks-$n-table.txt
	mkfs.ext4 -q -F /dev/mapper/lv
	mount /dev/mapper/lv /mnt/lv
	fio --name=$n --directory=/mnt/lv --size=16m --direct=1 \
		--ioengine=libaio --iodepth=8 --rw=randwrite --bsrange=4k-128k \
		--verify=crc32c --verify_fatal=1 --do_verify=1 --output-format=json \
		--output=$O/fio-luks-$n.json > $O/fio-luks-$n.log 2>&1 &
	local fp=$!
	sleep 2
	kgpu crypt takeover lv $kargs > $O/luks-$n-takeover.txt 2>&1
	[ "$(target lv)" = gpu-crypt ] && ok luks-$n-takeover ||
		fail luks-$n-takeover "$(cat $O/luks-$n-takeover.txt)"
	cryptsetup status lv > $O/luks-$n-status-taken.txt 2>&1
	echo "rc=$?" >> $O/luks-$n-status-taken.txt
	if [ $n = luks1 ]; then   # kgpu doctor with a gpu-crypt mapping served
		kgpu doctor > $O/doctor.txt 2>&1
		echo "rc=$?" >> $O/doctor.txt
	fi
	sleep 2
	kgpu crypt release lv $kargs > $O/luks-$n-release.txt 2>&1
	[ "$(target lv)" = crypt ] && ok luks-$n-release ||
		fail luks-$n-release "$(cat $O/luks-$n-release.txt)"
	wait $fp && ok luks-$n-fio || fail luks-$n-fio "fio status $?"
	cryptsetup status lv > $O/luks-$n-status-released.txt 2>&1 &&
		grep -q "type: *${t^^}" $O/luks-$n-status-released.txt &&
		ok luks-$n-status || fail luks-$n-status "$(cat $O/luks-$n-status-released.txt | tr '\n' ' ')"
	(cd /mnt/lv && ls -l > $W/ls-$n && md5sum $n.* > $W/sums-$n 2>/dev/null)
	umount /mnt/lv
	check luks-$n-fsck fsck.ext4 -fn /dev/mapper/lv
	check luks-$n-close cryptsetup close lv
	# stock crypt, opened afresh, reads what fio wrote through both targets
	cryptsetup open --key-file $W/pass "$L" lv
	mount -o ro /dev/mapper/lv /mnt/lv
	check luks-$n-reopen sh -c "cd /mnt/lv && md5sum --quiet -c $W/sums-$n"
	umount /mnt/lv
	cryptsetup close lv
}
luks_case luks2-4k "--key-file $W/vk-luks2-4k" --type luks2 --sector-size 4096
luks_case luks1 "" --type luks1
# LUKS2 with its key in the kernel keyring: cryptsetup unlinks it once the
# volume is open, so a takeover without --key-file is refused, saying so
wipefs -qa "$L"
cryptsetup luksFormat -q --type luks2 --cipher aes-xts-plain64 --key-size 512 \
	--pbkdf pbkdf2 --pbkdf-force-iterations 1000 --key-file $W/pass "$L"
cryptsetup open --key-file $W/pass "$L" lv
dmsetup table lv | cut -d' ' -f5 | cut -d: -f1-3 > $O/luks-keyring-key.txt
kgpu crypt takeover lv > $O/luks-keyring-nokey.txt 2>&1 && fail luks-keyring-nokey "accepted" ||
	{ [ "$(target lv)" = crypt ] && grep -q -- "--key-file" $O/luks-keyring-nokey.txt &&
	  ok luks-keyring-nokey || fail luks-keyring-nokey "$(cat $O/luks-keyring-nokey.txt)"; }
cryptsetup close lv
luks_case luks2-keyring "--key-file $W/vk-luks2-keyring" --type luks2

# ---- discards end to end: fstrim through gpu-crypt reaches the backing file --
# trim_case <name> <opt params>: allocated KiB of a sparse backing file
# after a 24 MiB file is written, and after it is deleted and fstrim ran
trim_case() {
	local n=$1 lt; shift
	rm -f $W/trim.img; truncate -s 64M $W/trim.img
	lt=$(losetup -f --show $W/trim.img)
	mk t "0 $(( (64 << 11) - 8 )) gpu-crypt aes-xts-plain64 $KEY 0 $lt 8 $*"
	mkfs.ext4 -q -F -E nodiscard /dev/mapper/t
	mkdir -p /mnt/t; mount /dev/mapper/t /mnt/t
	head -c 24M /dev/urandom > /mnt/t/f; sync
	local full=$(du -k $W/trim.img | cut -f1)
	rm /mnt/t/f; sync
	fstrim -v /mnt/t > $O/fstrim-$n.txt 2>&1; local rc=$?
	sync
	local after=$(du -k $W/trim.img | cut -f1)
	umount /mnt/t; dmsetup remove t; losetup -d $lt
	echo "$n full=$full after=$after fstrim_rc=$rc" >> $O/trim.txt
}
trim_case allow 1 allow_discards
trim_case none

kgpu status --json > $O/kgpu-status.json
kill -TERM $HP
wait $HP
losetup -d "$L"
rmmod dm-gpu-crypt && ok rmmod-target || fail rmmod-target "rmmod failed"
rmmod kgpu
dmesg > $O/dmesg.txt
