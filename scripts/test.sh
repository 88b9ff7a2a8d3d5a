#!/usr/bin/env bash
# Runs every test: the engine's unit tests, then the integration tests against real Postgres
# clusters and real brokers (Apache Kafka and Tansu, started here on their own ports).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
export PATH=$HOME/.cargo/bin:$PATH
# Everything of this run (brokers, test clusters) lives in a directory of its own on ports found free,
# so a second run on the same machine, or a leftover process, cannot take them from under us.
run=${PG_OUTBOX_TEST_RUN_DIR:-$(mktemp -d /tmp/pg_outbox-test.XXXXXX)}
ports=$("$here/free-port.sh" 4)  # Kafka, its controller, Tansu, the examples' Postgres
kafka_port=${PG_OUTBOX_TEST_KAFKA_PORT:-$ports}
tansu_port=${PG_OUTBOX_TEST_TANSU_PORT:-$((ports + 2))}
examples_port=${PG_OUTBOX_TEST_EXAMPLES_PORT:-$((ports + 3))}
export PG_OUTBOX_TEST_DIR=$run/clusters

cleanup() {
  "$here/pg.sh" stop "$run/examples-pg" immediate || true
  "$here/kafka.sh" stop "$run/kafka" || true
  "$here/tansu.sh" stop "$run/tansu" || true
  # Clusters and brokers of tests that died before their Drop ran.
  for d in "$PG_OUTBOX_TEST_DIR"/pg-*; do [ -f "$d/postmaster.pid" ] && "$here/pg.sh" stop "$d" immediate; done 2>/dev/null || true
  for d in "$PG_OUTBOX_TEST_DIR"/broker-*; do "$here/kafka.sh" stop "$d"; "$here/tansu.sh" stop "$d"; done 2>/dev/null || true
  [ -n "${PG_OUTBOX_KEEP_TEST_DIRS:-}" ] || rm -rf "$run"
}
trap cleanup EXIT
mkdir -p "$run" "$PG_OUTBOX_TEST_DIR"
chmod 755 "$run"

cd "$root"
echo "==> unit tests (bgworker crate: batching, retry policy, Kafka sink config)"
cargo test -p pg_outbox_bgworker

echo "==> building the integration tests"
cargo test -p pg_outbox_tests --no-run

echo "==> starting Apache Kafka (127.0.0.1:$kafka_port) and Tansu (127.0.0.1:$tansu_port)"
"$here/kafka.sh" start "$run/kafka" "$kafka_port"
"$here/tansu.sh" start "$run/tansu" "$tansu_port"
export PG_OUTBOX_TEST_KAFKA=127.0.0.1:$kafka_port PG_OUTBOX_TEST_TANSU=127.0.0.1:$tansu_port

echo "==> integration tests (real Postgres 15 clusters, real brokers)"
cargo test -p pg_outbox_tests --no-fail-fast -- --test-threads="${PG_OUTBOX_TEST_THREADS:-2}"

echo "==> ORM examples (Python + SQLAlchemy, Rust + sqlx) against a cluster of their own"
"$here/pg.sh" start "$run/examples-pg" "$examples_port" "127.0.0.1:$kafka_port" shop
export PG_OUTBOX_DSN="host=127.0.0.1 port=$examples_port user=postgres dbname=shop"
export PG_OUTBOX_BOOTSTRAP=127.0.0.1:$kafka_port
psql "$PG_OUTBOX_DSN" -qc "CREATE EXTENSION IF NOT EXISTS pg_outbox"
(cd examples/python && "$HOME/.cache/pg_outbox/venv/bin/python" -m pytest -q -p no:cacheprovider)
cargo run -q --manifest-path examples/rust-sqlx/Cargo.toml

echo "==> packaging: make package produces an installable tarball"
make -s -C "$root" package > /dev/null
tarball=$(ls -t "$root"/target/pg_outbox-*-pg15-*.tar.gz | head -1)
# The listing is read whole first: `tar | grep -q` fails under pipefail when grep stops early.
listing=$(tar -tzf "$tarball")
for f in pg_outbox.so extension/pg_outbox.control extension/pg_outbox--0.1.0.sql extension/pg_outbox--0.1.0--0.2.0.sql extension/pg_outbox--0.2.0--0.3.0.sql extension/pg_outbox--0.3.0--0.4.0.sql extension/pg_outbox--0.4.0--0.5.0.sql extension/pg_outbox--0.5.0--0.6.0.sql extension/pg_outbox--0.6.0--0.7.0.sql extension/pg_outbox--0.7.0--0.8.0.sql; do
  grep -q "$f" <<< "$listing" || { echo "FAILED: $f missing from $tarball" >&2; exit 1; }
done
echo "package: $tarball holds the library, control file and SQL scripts"
echo "1 passed, 0 failed"
