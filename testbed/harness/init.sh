#!/bin/busybox sh
# kgpu testbed guest init (runs as PID 1 from the initramfs).
#
# Loads the few modules needed to reach the host, mounts the host's root
# read-only over 9p with a tmpfs overlay on top, then runs the command the
# host left in the run share (or a shell) chrooted into that overlay, and
# powers off. The exit status goes back through the run share.
#
# kgpu.root=bundle (a bundle of kgpu testbed bundle): the 9p root is the
# bundle's guest root instead of the host's, and the host's working
# directory (tag hostcwd, its path in the run share's cwd file) is mounted
# at the same path, read-only under its own tmpfs overlay.
#
# kgpu.upper=vdX: the overlay's upper layer is that disk's ext4 instead of
# a tmpfs, so what one boot writes (an installed package, disk images,
# the journal) is there at the next boot of the same disk.
#
# kgpu.init=systemd: systemd becomes PID 1 in the overlay (switch_root)
# and the command runs as the unit kgpu-testbed.service once
# multi-user.target is reached; the guest powers off through systemd.
/bin/busybox mkdir -p /proc /sys /dev /tmp /sbin /usr/bin /usr/sbin
/bin/busybox --install -s
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev

die() {
	echo "kgpu-init: $*" >&2
	poweroff -f
}

mode=run
for arg in $(cat /proc/cmdline); do
	case "$arg" in
	kgpu.mode=*) mode="${arg#kgpu.mode=}" ;;
	kgpu.overlay_mb=*) overlay_mb="${arg#kgpu.overlay_mb=}" ;;
	kgpu.root=*) root="${arg#kgpu.root=}" ;;
	kgpu.upper=*) upper="${arg#kgpu.upper=}" ;;
	kgpu.init=*) init="${arg#kgpu.init=}" ;;
	esac
done

while read -r m; do
	insmod "/modules/$m" || die "cannot load $m"
done < /modules/order

mkdir -p /host /rw /newroot
mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=512000,cache=loose \
	hostroot /host || die "cannot mount the host root over 9p"
if [ -n "$upper" ]; then
	mount -t ext4 "/dev/$upper" /rw || die "cannot mount the upper disk $upper"
else
	mount -t tmpfs -o "size=${overlay_mb:-1024}m,mode=0755" tmpfs /rw
fi
mkdir -p /rw/upper /rw/work
mount -t overlay overlay \
	-o lowerdir=/host,upperdir=/rw/upper,workdir=/rw/work /newroot ||
	die "cannot mount the overlay root"

r=/newroot
mount -t proc proc $r/proc
mount -t sysfs sysfs $r/sys
mount -t devtmpfs devtmpfs $r/dev
mkdir -p $r/dev/pts $r/dev/shm
mount -t devpts devpts $r/dev/pts
# What udev would add: bash's <(...) and /dev/stdin need these.
ln -sfn /proc/self/fd $r/dev/fd
ln -sf /proc/self/fd/0 $r/dev/stdin
ln -sf /proc/self/fd/1 $r/dev/stdout
ln -sf /proc/self/fd/2 $r/dev/stderr
mount -t tmpfs tmpfs $r/dev/shm
# /tmp stays the host's, seen through the overlay (writes land in the
# tmpfs upper layer): a checkout under the host's /tmp must stay visible.
mount -t tmpfs tmpfs $r/run
mount -t debugfs debugfs $r/sys/kernel/debug 2>/dev/null
mount -t configfs configfs $r/sys/kernel/config 2>/dev/null
mkdir -p $r/run/kgpu
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 kgpurun $r/run/kgpu ||
	die "cannot mount the run share"
ln -sf /proc/self/mounts $r/etc/mtab 2>/dev/null
cwd=$(cat $r/run/kgpu/cwd 2>/dev/null)
if [ "$root" = bundle ] && [ -n "$cwd" ]; then
	mkdir -p /cwd /rw/cwd/upper /rw/cwd/work "$r$cwd"
	mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=512000,cache=loose \
		hostcwd /cwd || die "cannot mount the host's $cwd over 9p"
	mount -t overlay overlay \
		-o lowerdir=/cwd,upperdir=/rw/cwd/upper,workdir=/rw/cwd/work "$r$cwd" ||
		die "cannot mount the overlay on $cwd"
fi
hostname kgpu-testbed
if [ "$init" = systemd ]; then
	# The command as a unit after multi-user.target; its output on the
	# console, where the host looks for the marker.
	u=$r/etc/systemd/system
	mkdir -p $u/multi-user.target.wants
	cat > $u/kgpu-testbed.service <<-'EOF'
	[Unit]
	Description=kgpu testbed: the host's command
	After=multi-user.target
	[Service]
	Type=oneshot
	StandardOutput=journal+console
	StandardError=journal+console
	TimeoutStartSec=infinity
	ExecStart=/bin/sh -c 'echo "kgpu-init: running the command"; /bin/bash /run/kgpu/cmd.sh </dev/null; echo $$? > /run/kgpu/rc; sync; systemctl --no-block poweroff'
	EOF
	ln -sf ../kgpu-testbed.service $u/multi-user.target.wants/
	# Debian's tmpfiles.d/tmp.conf empties /tmp at boot ("D"): here that
	# is the host's /tmp seen through the overlay, where a checkout (and
	# the command's working directory) may live. Keep it.
	mkdir -p $r/etc/tmpfiles.d
	echo "d /tmp 1777 root root -" > $r/etc/tmpfiles.d/tmp.conf
	[ -x $r/lib/systemd/systemd ] || die "no systemd in the guest root"
	exec switch_root $r /lib/systemd/systemd
fi
# PID 1 stays in the initramfs, and the kernel runs its modprobe helper
# (crypto algorithms, dm targets on demand) from PID 1's root: send it to
# the host's modprobe inside the overlay.
printf '#!/bin/busybox sh\nexec /bin/busybox chroot /newroot /sbin/modprobe "$@"\n' \
	> /sbin/kgpu-modprobe
chmod 755 /sbin/kgpu-modprobe
echo /sbin/kgpu-modprobe > /proc/sys/kernel/modprobe

if [ "$mode" = shell ]; then
	setsid -c chroot $r /bin/bash /run/kgpu/cmd.sh </dev/ttyS0 >/dev/ttyS0 2>&1
	rc=$?
else
	# The host boots again a guest that stops before this line (an early
	# oops under TCG); the text is COMMAND_MARKER in vm.py.
	echo "kgpu-init: running the command"
	chroot $r /bin/bash /run/kgpu/cmd.sh </dev/null
	rc=$?
fi
echo "$rc" > $r/run/kgpu/rc
sync
umount $r/run/kgpu
poweroff -f
