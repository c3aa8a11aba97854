# metald — the two commands a newcomer runs are `make demo` and `make test`.
SHELL := /bin/bash
CARGO ?= cargo
GUEST_DIR ?= $(CURDIR)/build/guest
DEMO_DIR ?= $(CURDIR)/.demo

.PHONY: build deps apt-deps js-deps guest-image test test-rust lint doc demo demo-stop bench clean

## build: release binaries, also copied to ./build/metald and ./build/metaldctl
build:
	$(CARGO) build --release --bins
	mkdir -p build
	cp target/release/metald target/release/metaldctl build/

## deps: everything the tests and the demo need, installed when missing
deps: apt-deps js-deps

apt-deps:
	@scripts/install-deps.sh

js-deps:
	@if [ ! -x tests/js/node_modules/.bin/buf ] || [ ! -x tests/js/node_modules/.bin/tsx ]; then \
		echo "installing npm test peers (buf, connect-node, tsx) into tests/js"; \
		cd tests/js && npm ci --no-audit --no-fund; \
	fi

## guest-image: kernel, vmlinux, initramfs and ext4 rootfs for real guests
guest-image:
	scripts/guest-image.sh $(GUEST_DIR)

## test: everything CI runs
test: deps guest-image lint test-rust doc

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --all-targets -- -D warnings
	$(CARGO) test --test layering

test-rust:
	METALD_GUEST_IMAGE_DIR=$(GUEST_DIR) $(CARGO) test --all-targets

doc:
	RUSTDOCFLAGS="-D warnings" $(CARGO) doc --no-deps --lib

## demo: install, build, start metald and boot a demo VM
demo: deps build guest-image
	scripts/demo.sh

demo-stop:
	scripts/demo.sh stop

## bench: API latency (and the other benches)
bench:
	$(CARGO) bench

clean:
	$(CARGO) clean
	rm -rf build $(DEMO_DIR)
