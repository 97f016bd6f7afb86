#!/usr/bin/env bash
# Install what the testbed and the test suite need on Debian 12, idempotently.
# Quiet when everything is already there.
set -euo pipefail

need_root() {
	if [ "$(id -u)" != 0 ]; then
		echo "deps: installing packages needs root (run 'sudo make deps')" >&2
		exit 1
	fi
}

base_pkgs="qemu-system-x86 linux-image-amd64 linux-headers-amd64 fio dmsetup
cryptsetup-bin mdadm busybox-static kmod cpio xz-utils zstd gcc make
dkms e2fsprogs systemd udev"

missing=""
for p in $base_pkgs; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" ||
		missing="$missing $p"
done

# Debian 12 carries a 6.12 kernel beside its default 6.1; the exact ABI
# suffix moves with security updates, so take the newest with headers.
have612=$(dpkg-query -W -f='${Package} ${Status}\n' 'linux-headers-6.12.*-amd64' 2>/dev/null |
	grep -c "ok installed" || true)

export DEBIAN_FRONTEND=noninteractive
if [ -n "$missing" ] || [ "$have612" = 0 ]; then
	need_root
	echo "deps: installing${missing:- } (and a 6.12 kernel if absent)"
	apt-get update -qq
	pkgs="$missing"
	if [ "$have612" = 0 ]; then
		rel=$(apt-cache search --names-only '^linux-headers-6\.12\.[0-9]+\+deb12-amd64$' |
			awk '{print $1}' | sed 's/^linux-headers-//' | sort -V | tail -n 1)
		if [ -z "$rel" ]; then
			echo "deps: no 6.12 kernel headers found in the apt sources" >&2
			exit 1
		fi
		# The signed image can be a virtual package with no candidate
		# (apt-cache show still succeeds on it): ask for a candidate.
		img="linux-image-$rel"
		apt-cache policy "$img" 2>/dev/null | grep -q 'Candidate: [0-9]' ||
			img="linux-image-$rel-unsigned"
		pkgs="$pkgs $img linux-headers-$rel"
	fi
	# shellcheck disable=SC2086
	apt-get install -y -qq --no-install-recommends $pkgs >/dev/null
fi
