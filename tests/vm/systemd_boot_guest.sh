#!/bin/bash
# One systemd boot of test_systemd_boot.py (argument: 1 or 2), run by
# kgpu-testbed.service once multi-user.target is reached. Boot 1: the
# stack came up by itself; the helper is killed under fio verify and
# systemd restarts it; data is written and checksummed. Boot 2 (after a
# clean power-off of boot 1): the same again, the data intact, and boot
# 1's shutdown in the journal.
set -u
BOOT=$1
O=$KGPU_OUT
unset DM_DISABLE_UDEV    # udev runs here
res() { echo "$*" >> $O/results; }
ms() { echo $(( $(date +%s%N) / 1000000 )); }
target() { dmsetup table "$1" 2>/dev/null | awk '{print $3; exit}'; }

# kgpu-crypt@data is not ordered before multi-user.target: wait for it.
for i in $(seq 600); do
	[ "$(systemctl is-active kgpu-crypt@data)" = activating ] || break
	sleep 0.2
done
res "units helper=$(systemctl is-active kgpu-helper) raid6=$(systemctl is-active kgpu-raid6) crypt=$(systemctl is-active kgpu-crypt@data) cryptsetup=$(systemctl is-active systemd-cryptsetup@data)"
res "targets r6=$(target r6) data=$(target data)"
res "mount $(findmnt -n -o SOURCE,FSTYPE /srv/data | tr ' ' ,)"
res "md arrays=$(cat /proc/mdstat 2>/dev/null | grep -c '^md') member_fs_type=$(udevadm info -q property /dev/vdb | sed -n 's/^ID_FS_TYPE=//p')"
res "failed $(systemctl --failed --no-legend --plain | awk '{print $1}' | tr '\n' , )"
res "resync $(dmesg | grep -c 'r6: resync from sector')"
kgpu raid6 status r6 > $O/raid6-status.txt 2>&1
systemctl status --no-pager -l kgpu-helper kgpu-raid6 kgpu-crypt@data \
	> $O/status-$BOOT.txt 2>&1
kgpu doctor > $O/doctor-$BOOT.txt 2>&1
res "doctor rc=$?"

if [ "$BOOT" = 2 ]; then
	(cd /srv/data && sha256sum -c blob.sha) > $O/sha.txt 2>&1
	res "sha rc=$?"
	fio --name=v --filename=/srv/data/fio.dat --size=16M --bs=4k \
		--rw=randwrite --verify=crc32c --verify_only --direct=1 \
		--ioengine=psync --randseed=42 --output-format=json \
		--output=$O/fio-reread.json > /dev/null 2>&1
	res "reread rc=$?"
	journalctl -b -1 --no-pager -o short-monotonic > $O/journal-prev.txt 2>&1
	res "prevboot lines=$(wc -l < $O/journal-prev.txt)"
fi

if [ "$BOOT" = 1 ]; then
	# fio verify on the file system, the helper killed under it.
	kgpu status --json > $O/kgpu-status-before.json 2>&1
	fio --name=v --filename=/srv/data/fio.dat --size=16M --bs=4k \
		--rw=randwrite --verify=crc32c --direct=1 --ioengine=libaio \
		--iodepth=8 --randseed=42 --output-format=json \
		--output=$O/fio.json > /dev/null 2>&1 &
	FIO=$!
	sleep 3
	OLD=$(systemctl show -p MainPID --value kgpu-helper)
	T0=$(ms)
	kill -9 "$OLD"
	# restarted: a new main process; ready: active again (READY=1,
	# sent once attached and calibrated)
	restart=none ready=none
	for i in $(seq 1200); do
		NEW=$(systemctl show -p MainPID --value kgpu-helper)
		if [ "$restart" = none ] && [ "$NEW" != 0 ] && [ "$NEW" != "$OLD" ]; then
			restart=$(( $(ms) - T0 ))
		fi
		if [ "$restart" != none ] &&
		   [ "$(systemctl is-active kgpu-helper)" = active ]; then
			ready=$(( $(ms) - T0 ))
			break
		fi
		sleep 0.1
	done
	wait $FIO
	res "fio rc=$? killed=$OLD new=$NEW restart_ms=$restart ready_ms=$ready restarts=$(systemctl show -p NRestarts --value kgpu-helper)"
	kgpu status --json > $O/kgpu-status.json 2>&1
	head -c 8M /dev/urandom > /srv/data/blob
	(cd /srv/data && sha256sum blob > blob.sha)
	cp /srv/data/blob.sha $O/
	sync
fi
journalctl -b --no-pager -o short-monotonic -u kgpu-helper -u kgpu-raid6 \
	-u kgpu-crypt@data -u systemd-cryptsetup@data > $O/journal-$BOOT.txt 2>&1
dmesg > $O/dmesg-$BOOT.txt
# Where the shutdown starts, for the next boot to read in the journal.
echo "command done, powering off" | systemd-cat -t kgpu-testbed
res "done"
