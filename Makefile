# kgpu: GPU-offloaded dm-crypt and md-compatible RAID6.
#
#   make            build the kernel modules against KDIR (default: the
#                   newest installed kernel headers) into build/<release>/
#   make deps       install the apt and Python packages (idempotent)
#   make test       deps, modules for every testbed kernel, the whole suite
#   make demo       deps and the main job in the QEMU testbed
#   make install    on a real host, as root: the modules through DKMS for
#                   every kernel with headers, the kgpu command, the
#                   systemd units and the udev rule (helper/docs/install.md)
#   make uninstall  all of that again (configuration in /etc is kept)
#   make clean

SHELL := /bin/bash
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip
SRC := $(abspath .)

# The newest installed headers, unless KDIR is given.
KDIR ?= $(shell ls -d /lib/modules/*/build 2>/dev/null | sort -V | tail -n 1)
KREL = $(shell sed -n 's/^\#define UTS_RELEASE "\(.*\)"/\1/p' $(KDIR)/include/generated/utsrelease.h 2>/dev/null)
BUILD = $(SRC)/build/$(KREL)
# The testbed's kernels: the newest 6.1 and the newest 6.12 with headers.
TEST_KDIRS = $(foreach s,6.1 6.12,$(shell ls -d /lib/modules/$(s).*/build \
	2>/dev/null | sort -V | tail -n 1))

KSRC := $(wildcard kmod/*.c kmod/*.h dm_targets/*.c dm_targets/*.h) kmod/Kbuild
# Warnings are errors here; DKMS builds on users' hosts pass KGPU_WERROR=
# (kmod/dkms.conf): a newer compiler's new warning must not cost a host
# its modules.
KGPU_WERROR ?= -Werror

.PHONY: all modules deps pydeps test unit demo clean install uninstall \
	install-modules install-python install-units

all: modules

modules: $(KSRC)
	@test -n "$(KDIR)" -a -d "$(KDIR)" || \
		{ echo "no kernel headers (KDIR=$(KDIR)); run 'make deps'" >&2; exit 1; }
	@mkdir -p $(BUILD)
	@ln -sfn $(SRC)/kmod/uapi $(BUILD)/uapi
	@for f in $(filter %.c %.h,$(KSRC)); do ln -sf $(SRC)/$$f $(BUILD)/; done
	@printf 'KGPU_SRC := %s\ninclude $$(KGPU_SRC)/kmod/Kbuild\n-include $$(KGPU_SRC)/dm_targets/Kbuild\nccflags-y += $(KGPU_WERROR) -I$$(KGPU_SRC)/kmod\n' \
		'$(SRC)' > $(BUILD)/Kbuild
	$(MAKE) -C $(KDIR) M=$(BUILD) W=1 modules
	@echo "modules for $(KREL) in build/$(KREL)/"

deps:
	@bash testbed/harness/deps.sh
	@$(MAKE) -s pydeps

# The Python package (editable, from this checkout) with its test
# dependencies; quiet when that is already what is installed. An editable
# install of another checkout is replaced, so tests always run this code.
pydeps:
	@$(PYTHON) -c 'import os, sys, click, cryptography, matplotlib, numpy, pyroute2, pytest, rich, wheel, kgpu_testbed, kgpu_helper as k; sys.exit(os.path.dirname(os.path.dirname(os.path.realpath(k.__file__))) != os.path.realpath("$(SRC)"))' 2>/dev/null \
		|| $(PIP) install -q --disable-pip-version-check --root-user-action=ignore -e '.[test]'

test: deps
	@for k in $(TEST_KDIRS); do $(MAKE) -s modules KDIR=$$k || exit 1; done
	$(PYTHON) -m pytest --durations=40

# The fast tier alone: no VM, no GPU.
unit:
	$(PYTHON) -m pytest -m "not vm and not gpu"

demo: deps
	$(PYTHON) -m kgpu_helper.cli demo

# --- make install: a real host (helper/docs/install.md) ---
VERSION := $(shell sed -n 's/^version *= *//p' setup.cfg)
# Installed by hand, not by a distribution package: under /usr/local
# (systemd and udev look there, or in /etc for udev), the helper in a
# virtual environment of its own under /opt: Debian's Python is the
# distribution's (PEP 668), and the kgpu command is linked into sbin.
PREFIX ?= /usr/local
VENV ?= /opt/kgpu
SBINDIR = $(PREFIX)/sbin
LIBEXECDIR = $(PREFIX)/lib/kgpu
DOCDIR = $(PREFIX)/share/doc/kgpu
UNITDIR = $(PREFIX)/lib/systemd/system
UDEVDIR = /etc/udev/rules.d
DKMS_SRC = /usr/src/kgpu-$(VERSION)
# Kernels to build for: every one with headers (DKMS builds new ones as
# they are installed).
KERNELS ?= $(patsubst /lib/modules/%/build,%,$(wildcard /lib/modules/*/build))
# CuPy for this host's CUDA: cuda11, cuda12, cuda13 (auto: the driver's
# CUDA major from nvidia-smi, by helper/cli/cudaextra.py, the rule kgpu
# doctor follows too; none without a GPU, the helper then runs on the CPU).
CUDA ?= auto
VENV_FLAGS ?=
PIP_FLAGS ?=
SYSTEMD_FILES = kgpu-helper.service kgpu-crypt@.service kgpu-raid6.service

install: install-modules install-python install-units
	@echo "installed kgpu $(VERSION); next: systemctl enable --now kgpu-helper, then kgpu doctor"

install-modules:
	@test "$$(id -u)" = 0 || { echo "make install: run it as root" >&2; exit 1; }
	@command -v dkms >/dev/null || { echo "make install: needs DKMS (apt install dkms)" >&2; exit 1; }
	@test -n "$(KERNELS)" || { echo "make install: no kernel headers in /lib/modules/*/build (apt install linux-headers-$$(uname -r))" >&2; exit 1; }
	-@dkms remove kgpu/$(VERSION) --all >/dev/null 2>&1
	rm -rf $(DKMS_SRC)
	mkdir -p $(DKMS_SRC)
	cp -r Makefile setup.cfg kmod dm_targets $(DKMS_SRC)/
	sed 's/@VERSION@/$(VERSION)/' kmod/dkms.conf > $(DKMS_SRC)/dkms.conf
	dkms add kgpu/$(VERSION)
	@for k in $(KERNELS); do \
		[ -d /lib/modules/$$k/build/include ] || { \
			echo "skipping $$k: its headers are gone (/lib/modules/$$k/build)"; continue; }; \
		echo "dkms install kgpu/$(VERSION) -k $$k"; \
		dkms install kgpu/$(VERSION) -k $$k || exit 1; \
	done

install-python:
	@test "$$(id -u)" = 0 || { echo "make install: run it as root" >&2; exit 1; }
	@$(PYTHON) -c 'import ensurepip' 2>/dev/null || { echo "make install: $(PYTHON) cannot make a virtual environment (apt install python3-venv)" >&2; exit 1; }
	$(PYTHON) -m venv $(VENV_FLAGS) $(VENV)
	@extra='$(CUDA)'; \
	if [ "$$extra" = auto ]; then extra=$$($(PYTHON) helper/cli/cudaextra.py) || exit 1; fi; \
	spec=.; [ "$$extra" = none ] || spec=".[$$extra]"; \
	echo "$(VENV)/bin/pip install $(PIP_FLAGS) '$$spec'  (CuPy: $$extra)"; \
	$(VENV)/bin/pip install -q --disable-pip-version-check $(PIP_FLAGS) "$$spec"
	mkdir -p $(SBINDIR)
	ln -sfn $(VENV)/bin/kgpu $(SBINDIR)/kgpu

install-units:
	@test "$$(id -u)" = 0 || { echo "make install: run it as root" >&2; exit 1; }
	mkdir -p $(UNITDIR) $(LIBEXECDIR) $(DOCDIR) $(UDEVDIR) /etc/kgpu /etc/modprobe.d
	for f in $(SYSTEMD_FILES); do \
		sed -e 's|@SBINDIR@|$(SBINDIR)|g' -e 's|@DOCDIR@|$(DOCDIR)|g' \
			helper/systemd/$$f > $(UNITDIR)/$$f || exit 1; \
	done
	install -m 0755 helper/systemd/kgpu-raid6-member $(LIBEXECDIR)/
	sed 's|@LIBEXECDIR@|$(LIBEXECDIR)|g' helper/systemd/63-kgpu-raid6.rules \
		> $(UDEVDIR)/63-kgpu-raid6.rules
	install -m 0644 README.md helper/docs/*.md $(DOCDIR)/
	test -e /etc/modprobe.d/kgpu.conf || \
		install -m 0644 helper/systemd/kgpu-modprobe.conf /etc/modprobe.d/kgpu.conf
	@if [ -d /run/systemd/system ]; then systemctl daemon-reload; fi
	@udevadm control --reload 2>/dev/null || true

uninstall:
	@test "$$(id -u)" = 0 || { echo "make uninstall: run it as root" >&2; exit 1; }
	@if [ -d /run/systemd/system ]; then systemctl disable --now kgpu-helper.service kgpu-raid6.service 2>/dev/null; fi; true
	rm -f $(addprefix $(UNITDIR)/,$(SYSTEMD_FILES)) $(UDEVDIR)/63-kgpu-raid6.rules
	rm -rf $(LIBEXECDIR) $(DOCDIR) $(VENV)
	rm -f $(SBINDIR)/kgpu
	-dkms remove kgpu/$(VERSION) --all
	rm -rf $(DKMS_SRC)
	@if [ -d /run/systemd/system ]; then systemctl daemon-reload; fi
	@udevadm control --reload 2>/dev/null || true
	@echo "removed kgpu $(VERSION); kept /etc/kgpu and /etc/modprobe.d/kgpu.conf"

clean:
	rm -rf build
	find . -name __pycache__ -prune -exec rm -rf {} +
