# pg_outbox — every target installs what it needs first (each piece only if missing).
PG_CONFIG ?= /usr/lib/postgresql/15/bin/pg_config

.PHONY: help deps build install up down demo test reliability bench package clean

help:
	@echo "make demo     install everything, start Postgres + Kafka, run an order flow"
	@echo "make test     run every test (unit + integration against real Postgres, Kafka, Tansu)"
	@echo "make reliability  fault scenarios with the full workload; writes docs/RELIABILITY.md"
	@echo "make bench        benchmarks (target/bench/results.json)"
	@echo "make up/down  start/stop the local Postgres 15 + Apache Kafka (prints PG_OUTBOX_DSN/BOOTSTRAP)"
	@echo "make install  build and install into the Postgres of PG_CONFIG=$(PG_CONFIG)"

deps:
	scripts/deps.sh build kafka tansu python

build:
	scripts/deps.sh build
	cargo build --release --lib -p pg_outbox

install:
	scripts/deps.sh build
	scripts/install-extension.sh $(PG_CONFIG)

up:
	@scripts/deps.sh build kafka >&2
	@scripts/install-extension.sh $(PG_CONFIG) >&2
	@scripts/up.sh

down:
	@scripts/up.sh stop

demo: up
	scripts/demo.sh

test: deps
	scripts/install-extension.sh $(PG_CONFIG)
	scripts/test.sh

# A tarball to unpack into a Postgres 15 installation: tar -xzf pg_outbox-*.tar.gz -C /
package:
	scripts/deps.sh build
	rm -rf target/package
	scripts/install-extension.sh $(PG_CONFIG) $(CURDIR)/target/package/root
	tar -czf target/pg_outbox-$$(sed -n "s/^default_version = '\(.*\)'/\1/p" pg_outbox.control)-pg15-$$(uname -m).tar.gz \
	    -C target/package/root .
	@ls -l target/pg_outbox-*.tar.gz

# The checker's fault scenarios with the full workload; regenerates docs/RELIABILITY.md.
reliability: deps
	scripts/install-extension.sh $(PG_CONFIG)
	cargo build -p pg_outbox_tests --bin outbox-check
	target/debug/outbox-check --out docs/RELIABILITY.md

# Benchmarks against a bare INSERT, the broker's raw rate and a scheme-2 relay; sizes from BENCH_*
# (see docs/BENCHMARKS.md). Writes target/bench/results.json. Only Apache Kafka is benchmarked, so
# Tansu (a 17-minute build) is not installed for it.
bench:
	scripts/deps.sh build kafka
	scripts/install-extension.sh $(PG_CONFIG)
	@echo "==> building the benchmark driver (release)"
	cargo build --release -p pg_outbox_tests --bin outbox-bench
	target/release/outbox-bench

clean:
	cargo clean
