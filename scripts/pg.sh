#!/usr/bin/env bash
# A throwaway PostgreSQL 15 cluster with pg_outbox preloaded, run as the postgres OS user.
#   scripts/pg.sh start DIR PORT BOOTSTRAP [DATABASES]   (idempotent)
#   scripts/pg.sh stop DIR [MODE]                        (MODE: fast, immediate)
# Extra postgresql.conf lines can be passed in $PG_OUTBOX_EXTRA_CONF.
set -euo pipefail
cmd=$1 dir=$2
bin=${PG_BIN:-$(/usr/lib/postgresql/15/bin/pg_config --bindir 2>/dev/null || pg_config --bindir)}
as_postgres() { if [ "$(id -u)" = 0 ]; then su postgres -s /bin/bash -c "$*"; else bash -c "$*"; fi; }

case $cmd in
start)
  port=$3 bootstrap=$4 databases=${5:-shop}
  if [ ! -f "$dir/PG_VERSION" ]; then
    mkdir -p "$dir"
    [ "$(id -u)" = 0 ] && chown postgres: "$dir"
    chmod 700 "$dir"
    as_postgres "'$bin/initdb' -D '$dir' -U postgres -A trust --no-sync -E UTF8 --locale=C.UTF-8" > /dev/null
    cat >> "$dir/postgresql.conf" <<CONF
port = $port
listen_addresses = '127.0.0.1'
unix_socket_directories = '$dir'
shared_preload_libraries = 'pg_outbox'
pg_outbox.database = '$databases'
pg_outbox.kafka_bootstrap_servers = '$bootstrap'
max_prepared_transactions = 20
max_worker_processes = 32
wal_level = logical
log_line_prefix = '%m [%p] %b '
${PG_OUTBOX_EXTRA_CONF:-}
CONF
  fi
  if ! as_postgres "'$bin/pg_ctl' -D '$dir' status" > /dev/null 2>&1; then
    as_postgres "'$bin/pg_ctl' -D '$dir' -l '$dir/postgres.log' -w -t 60 start" > /dev/null
  fi
  for db in ${databases//,/ }; do
    as_postgres "'$bin/psql' -h '$dir' -p $port -U postgres -d postgres -Atqc \"SELECT 1 FROM pg_database WHERE datname = '$db'\"" | grep -q 1 ||
      as_postgres "'$bin/createdb' -h '$dir' -p $port -U postgres '$db'"
  done
  ;;
stop)
  mode=${3:-fast}
  if [ -f "$dir/postmaster.pid" ]; then
    as_postgres "'$bin/pg_ctl' -D '$dir' -m $mode -w stop" > /dev/null || true
  fi
  ;;
*) echo "usage: $0 start DIR PORT BOOTSTRAP [DATABASES] | stop DIR [MODE]" >&2; exit 2 ;;
esac
