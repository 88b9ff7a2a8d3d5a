#!/usr/bin/env bash
# Builds pg_outbox (release) and installs it into the Postgres that pg_config names.
#   scripts/install-extension.sh [PG_CONFIG] [DESTDIR]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
pg_config=${1:-${PG_CONFIG:-/usr/lib/postgresql/15/bin/pg_config}}
destdir=${2:-}
export PGRX_PG_CONFIG_PATH=$pg_config
cd "$root"
echo "==> building pg_outbox (release)"
cargo build --release --lib -p pg_outbox
libdir=$destdir$("$pg_config" --pkglibdir)
extdir=$destdir$("$pg_config" --sharedir)/extension
install -d "$libdir" "$extdir"
install -m 755 target/release/libpg_outbox.so "$libdir/pg_outbox.so"
install -m 644 pg_outbox.control sql/pg_outbox--*.sql "$extdir/"
echo "==> installed pg_outbox into $libdir and $extdir"
