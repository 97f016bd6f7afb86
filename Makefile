# kgpu: GPU-offloaded dm-crypt and md-compatible RAID6.
#
#   make            build the kernel modules against KDIR (default: the
#                   newest installed kernel headers) into build/<release>/
#   make deps       install the apt and Python packages (idempotent)
#   make test       deps, modules for every testbed kernel, the whole suite
#   make demo       deps and the main job in the QEMU testbed
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

.PHONY: all modules deps pydeps test unit demo clean

all: modules

modules: $(KSRC)
	@test -n "$(KDIR)" -a -d "$(KDIR)" || \
		{ echo "no kernel headers (KDIR=$(KDIR)); run 'make deps'" >&2; exit 1; }
	@mkdir -p $(BUILD)
	@ln -sfn $(SRC)/kmod/uapi $(BUILD)/uapi
	@for f in $(filter %.c %.h,$(KSRC)); do ln -sf $(SRC)/$$f $(BUILD)/; done
	@printf 'KGPU_SRC := %s\ninclude $$(KGPU_SRC)/kmod/Kbuild\n-include $$(KGPU_SRC)/dm_targets/Kbuild\nccflags-y += -Werror -I$$(KGPU_SRC)/kmod\n' \
		'$(SRC)' > $(BUILD)/Kbuild
	$(MAKE) -C $(KDIR) M=$(BUILD) W=1 modules
	@echo "modules for $(KREL) in build/$(KREL)/"

deps:
	@bash testbed/deps.sh
	@$(MAKE) -s pydeps

# The Python package (editable, from this checkout) with its test
# dependencies; quiet when that is already what is installed. An editable
# install of another checkout is replaced, so tests always run this code.
pydeps:
	@$(PYTHON) -c 'import os, sys, click, cryptography, matplotlib, numpy, pyroute2, pytest, rich, kgpu_testbed, kgpu_helper as k; sys.exit(os.path.dirname(os.path.dirname(os.path.realpath(k.__file__))) != os.path.realpath("$(SRC)"))' 2>/dev/null \
		|| $(PIP) install -q --disable-pip-version-check --root-user-action=ignore -e '.[test]'

test: deps
	@for k in $(TEST_KDIRS); do $(MAKE) -s modules KDIR=$$k || exit 1; done
	$(PYTHON) -m pytest

# The fast tier alone: no VM, no GPU.
unit:
	$(PYTHON) -m pytest -m "not vm and not gpu"

demo: deps
	$(PYTHON) -m kgpu_helper.cli demo

clean:
	rm -rf build
	find . -name __pycache__ -prune -exec rm -rf {} +
