#!/bin/bash
# Before the first systemd boot (test_systemd_boot.py), in an ordinary
# testbed guest whose overlay's upper layer is the disk image the systemd
# boots then use (/dev/vda), with six empty member disks vdb..vdg:
# kgpu installed as a user installs it (make install: DKMS for this
# kernel, the helper's virtual environment, units, udev rule), a six-member
# md RAID6 listed for gpu-raid6, LUKS2 on it in /etc/crypttab, ext4 on
# that in /etc/fstab, and the units enabled.
set -u
O=$KGPU_OUT
res() { echo "$*" >> $O/results; }
fail() { res "setup-failed $*"; exit 1; }
MEMBERS="/dev/vdb /dev/vdc /dev/vdd /dev/vde /dev/vdf /dev/vdg"

# The testbed's Python (the one running the tests, with kgpu's
# dependencies) makes the virtual environment; no network in the guest,
# so pip takes kgpu's dependencies from it and nothing from an index.
T0=$(date +%s)
make install KERNELS="$(uname -r)" PYTHON="$(command -v python3)" \
	VENV_FLAGS=--system-site-packages \
	PIP_FLAGS="--no-index --no-build-isolation" > $O/install.log 2>&1 ||
	fail "make install: $(tail -n 5 $O/install.log)"
res "install seconds=$(( $(date +%s) - T0 ))"
dkms status kgpu > $O/dkms-status.txt 2>&1
modinfo -n kgpu dm-gpu-crypt dm-gpu-raid6 > $O/modinfo.txt 2>&1

# dmsetup create loads a target's module by itself (device-mapper asks
# for dm-<target>; depmod knows ours now), its dependencies with it.
loaded() { for m in "$@"; do [ -d /sys/module/$m ] && echo -n "$m,"; done; }
res "before-create loaded=$(loaded kgpu dm_gpu_crypt dm_gpu_raid6)"
dmsetup create kt --readonly --table "0 8 gpu-crypt aes-xts-plain64 $(head -c 64 /dev/urandom | od -An -tx1 | tr -d ' \n') 0 /dev/vdb 0" ||
	fail "dmsetup create gpu-crypt"
dmsetup remove kt
res "after-crypt loaded=$(loaded kgpu dm_gpu_crypt dm_gpu_raid6)"

# The array, made by mdadm: members of zeros, so parity of zeros is right
# and --assume-clean tells the truth.
modprobe raid456
mdadm --create /dev/md/r6 --run --assume-clean --level=6 --raid-devices=6 \
	--metadata=1.2 --chunk=64 --name=r6 $MEMBERS > $O/mdadm.txt 2>&1 ||
	fail "mdadm --create: $(tail -n 3 $O/mdadm.txt)"
UUID=$(mdadm --detail --export /dev/md/r6 | sed -n 's/^MD_UUID=//p')
mdadm --stop /dev/md/r6 >> $O/mdadm.txt 2>&1
mkdir -p /etc/kgpu
echo "ARRAY r6 UUID=$UUID" > /etc/kgpu/raid6.conf
res "array uuid=$UUID"
kgpu raid6 assemble --scan > $O/assemble.txt 2>&1 ||
	fail "assemble: $(cat $O/assemble.txt)"
res "after-raid6 loaded=$(loaded kgpu dm_gpu_crypt dm_gpu_raid6)"

# LUKS2 (a fast PBKDF: TCG), ext4 inside.
head -c 64 /dev/urandom > /etc/kgpu-test.key
chmod 600 /etc/kgpu-test.key
cryptsetup luksFormat --batch-mode --type luks2 --pbkdf pbkdf2 \
	--pbkdf-force-iterations 1000 --key-file /etc/kgpu-test.key \
	/dev/mapper/r6 > $O/luks.txt 2>&1 || fail "luksFormat: $(cat $O/luks.txt)"
cryptsetup open --key-file /etc/kgpu-test.key /dev/mapper/r6 data ||
	fail "cryptsetup open"
mkfs.ext4 -q /dev/mapper/data || fail mkfs
cryptsetup close data
kgpu raid6 stop --scan >> $O/assemble.txt 2>&1 || fail "raid6 stop"
echo "data /dev/mapper/r6 /etc/kgpu-test.key luks" > /etc/crypttab
mkdir -p /srv/data
echo "/dev/mapper/data /srv/data ext4 defaults 0 2" > /etc/fstab

# The testbed boots this machine's own root: its services (a database,
# timers, time sync) are not this test's, and have no network here.
rm -f /etc/systemd/system/multi-user.target.wants/* \
	/etc/systemd/system/timers.target.wants/* \
	/etc/systemd/system/sysinit.target.wants/systemd-timesyncd.service
# The journal kept on disk: the second boot reads the first's shutdown.
mkdir -p /var/log/journal
systemctl enable kgpu-helper.service kgpu-raid6.service \
	kgpu-crypt@data.service > $O/enable.txt 2>&1 ||
	fail "systemctl enable: $(cat $O/enable.txt)"
# The testbed's Python (its virtual environment's base) lives under /root;
# on a real host it is /usr/bin/python3 and ProtectHome=yes stays.
mkdir -p /etc/systemd/system/kgpu-helper.service.d
printf '[Service]\nProtectHome=read-only\n' \
	> /etc/systemd/system/kgpu-helper.service.d/testbed.conf
cp /usr/local/lib/systemd/system/kgpu-helper.service \
	/usr/local/lib/systemd/system/kgpu-crypt@.service \
	/usr/local/lib/systemd/system/kgpu-raid6.service \
	/etc/udev/rules.d/63-kgpu-raid6.rules $O/
res "setup done"
