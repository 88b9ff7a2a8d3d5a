#!/usr/bin/env bash
# The order flow: one order commits, one rolls back; only the committed order's event reaches
# Kafka. Run through `make demo` (which starts Postgres and Kafka first).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
export PATH=$HOME/.cargo/bin:$PATH
eval "$("$here/up.sh" 2>/dev/null | sed 's/^\([A-Z_]*\)=\(.*\)$/export \1="\2"/')"
echo "==> PG_OUTBOX_DSN=$PG_OUTBOX_DSN"
echo "==> PG_OUTBOX_BOOTSTRAP=$PG_OUTBOX_BOOTSTRAP"
echo "==> building the demo consumer"
(cd "$root" && cargo build -q -p pg_outbox_tests --bin outbox-consume)
consume="$root/target/debug/outbox-consume"
sql() { psql "$PG_OUTBOX_DSN" -v ON_ERROR_STOP=1 "$@"; }

committed=$(( $(date +%s) % 1000000 * 10 + 1 ))
rolled_back=$((committed + 1))
sql -qc "CREATE TABLE IF NOT EXISTS orders (id bigint PRIMARY KEY, total numeric NOT NULL, created_at timestamptz DEFAULT now())"

# One order transaction: the order row and its event, ended by COMMIT or ROLLBACK.
place_order() {
  local id=$1 total=$2 ending=$3
  echo
  echo "==> order $id: INSERT + enqueue_message, then $ending"
  sql -e <<SQL
BEGIN;
INSERT INTO orders (id, total) VALUES ($id, $total);
SELECT outbox.enqueue_message('orders.created', jsonb_build_object('id', $id, 'total', $total),
                              key => '$id', headers => '{"source": "shop"}');
$ending;
SQL
}
place_order "$committed" 99.50 COMMIT
place_order "$rolled_back" 12.00 ROLLBACK

echo
echo "==> reading topic orders.created back from Kafka"
out=$("$consume" "$PG_OUTBOX_BOOTSTRAP" orders.created 1 15)
echo "$out" | grep -E "key=($committed|$rolled_back) " || true
echo
if grep -q "key=$committed " <<< "$out"; then
  echo "OK: the committed order $committed was delivered to Kafka"
else
  echo "FAILED: the committed order $committed is not in Kafka" >&2; exit 1
fi
if grep -q "key=$rolled_back " <<< "$out"; then
  echo "FAILED: the rolled-back order $rolled_back reached Kafka" >&2; exit 1
else
  echo "OK: the rolled-back order $rolled_back never reached Kafka"
fi

echo
echo "==> monitoring views"
sql -c "SELECT topic, pending, oldest_pending_age, delivered_total, last_delivered_at FROM outbox.topic_stats" \
    -c "SELECT database, pid, state, broker_state, messages_delivered, last_error FROM outbox.worker_status"
echo "make down stops Postgres and Kafka."
