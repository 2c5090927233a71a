# pag0 — the front door. Every target installs what it needs.
SHELL := /bin/bash
WASM := target/wasm32-wasip1/release/pag0.wasm
CARGO ?= cargo

.PHONY: build run run-cluster demo test test-native test-wasm lint clean envoy wasm-target bench bench-smoke fuzz soak

wasm-target:
	@rustup target list --installed | grep -qx wasm32-wasip1 || rustup target add wasm32-wasip1

build: wasm-target
	$(CARGO) build --release --target wasm32-wasip1
	@scripts/shrink-wasm.sh $(WASM)
	@ls -l $(WASM) | awk '{print "built $(WASM): " $$5 " bytes"}'

envoy:
	@scripts/ensure-envoy.sh

run: build envoy
	scripts/run.sh

# Two Envoys (10000 and 10001) sharing one budget ledger in Redis behind Webdis, with
# the reference policy and the demo APIs; the ledger's AOF stays in .tools/run-cluster.
run-cluster: build envoy
	scripts/run-cluster.sh

demo: build envoy
	scripts/demo.sh

# Every test: native core, the core in wasm, Envoy integration and load tests.
test: build envoy lint test-native test-wasm bench-smoke

test-native:
	@scripts/ensure-chromium.sh >/dev/null
	$(CARGO) test --all-targets --no-fail-fast

test-wasm:
	scripts/wasm-test.sh

lint: wasm-target
	$(CARGO) fmt --check
	$(CARGO) clippy --all-targets -- -D warnings
	$(CARGO) clippy --release --target wasm32-wasip1 --lib -- -D warnings

clean:
	$(CARGO) clean
	rm -rf out

# Fuzz the parsers of untrusted input (x402 headers, configuration, shared-data records)
# and the whole request path with its money invariants (request) with cargo-fuzz on the
# nightly toolchain, FUZZ_SECONDS each (not part of `make test`).
FUZZ_SECONDS ?= 60
fuzz:
	rustup toolchain install nightly --profile minimal
	@command -v cargo-fuzz >/dev/null 2>&1 || cargo install cargo-fuzz --locked
	cd fuzz && for t in x402 config records request; do cargo +nightly fuzz run $$t -- -max_total_time=$(FUZZ_SECONDS) || exit 1; done

# Every kind of call with upstream faults, hung-up clients and crashed VMs for
# SOAK_SECONDS (not part of `make test`): the ledger must equal what clients were told,
# nothing may stay reserved, and Envoy's memory must stay flat.
SOAK_SECONDS ?= 600
soak: build envoy
	PAG0_SOAK_SECONDS=$(SOAK_SECONDS) $(CARGO) test --release --test soak -- --ignored --nocapture

# What pag0 costs per request, side by side with bare Envoy, and how it scales: writes
# bench/RESULTS.md, bench/results.json and README.md's benchmark block (about 15 minutes;
# settings in bench/run.py, e.g. BENCH_ROUNDS=3 BENCH_SESSIONS=0 make bench).
bench: build envoy
	python3 bench/run.py

# The same script for a few seconds, checked for well-formed results (never for speed).
bench-smoke: build envoy
	python3 bench/run.py --smoke
