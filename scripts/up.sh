#!/usr/bin/env bash
# Starts (idempotently) a local Apache Kafka broker and a Postgres 15 cluster with pg_outbox
# preloaded and created in database "shop", then prints how to reach them:
#   PG_OUTBOX_DSN=...        a superuser libpq connection string
#   PG_OUTBOX_BOOTSTRAP=...  the Kafka bootstrap server
# scripts/up.sh stop        stops both.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
run=${PG_OUTBOX_RUN_DIR:-/tmp/pg_outbox-run}
pg_port=${PG_OUTBOX_PG_PORT:-55432}
kafka_port=${PG_OUTBOX_KAFKA_PORT:-59092}
mkdir -p "$run"
chmod 755 "$run"

if [ "${1:-start}" = stop ]; then
  "$here/pg.sh" stop "$run/pg"
  "$here/kafka.sh" stop "$run/kafka"
  echo "stopped Postgres and Kafka in $run"
  exit 0
fi

echo "==> starting Apache Kafka on 127.0.0.1:$kafka_port" >&2
"$here/kafka.sh" start "$run/kafka" "$kafka_port"
echo "==> starting Postgres 15 on 127.0.0.1:$pg_port" >&2
PG_OUTBOX_EXTRA_CONF="track_commit_timestamp = on" \
  "$here/pg.sh" start "$run/pg" "$pg_port" "127.0.0.1:$kafka_port" shop
# An older cluster of a previous version is brought up to date (a no-op when it is current).
psql -h 127.0.0.1 -p "$pg_port" -U postgres -d shop -qc "CREATE EXTENSION IF NOT EXISTS pg_outbox" -c "ALTER EXTENSION pg_outbox UPDATE" >&2
echo "PG_OUTBOX_DSN=host=127.0.0.1 port=$pg_port user=postgres dbname=shop"
echo "PG_OUTBOX_BOOTSTRAP=127.0.0.1:$kafka_port"
