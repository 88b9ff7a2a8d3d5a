#!/usr/bin/env bash
# Installs what pg_outbox needs on a fresh Debian machine, each piece only if it is missing.
#   scripts/deps.sh build   Postgres 15 + headers, clang, cargo-pgrx 0.18.0 (initialised for PG 15)
#   scripts/deps.sh kafka   Apache Kafka broker jars from Maven Central (needs Java 17 and Maven)
#   scripts/deps.sh tansu   Tansu, a second Kafka-compatible broker (cargo install, ~15 min cold)
#   scripts/deps.sh python  a virtualenv with what the Python ORM example needs (PyPI)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
export PATH=$HOME/.cargo/bin:$PATH
KAFKA_VERSION=4.1.1
KAFKA_LIBS=${KAFKA_LIBS:-$HOME/.cache/pg_outbox/kafka-$KAFKA_VERSION/libs}

step() { echo "==> $*"; }

apt_install() {
  local missing=()
  for p in "$@"; do dpkg -s "$p" > /dev/null 2>&1 || missing+=("$p"); done
  if [ ${#missing[@]} -gt 0 ]; then
    step "installing Debian packages: ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" > /dev/null
  fi
}

build() {
  # gdb: an integration test holds the worker at a chosen function.
  apt_install postgresql-15 postgresql-server-dev-15 libclang-dev clang pkg-config libssl-dev zlib1g-dev make gdb
  command -v cargo > /dev/null || { echo "cargo (Rust) is required" >&2; exit 1; }
  if ! cargo pgrx --version 2>/dev/null | grep -q '0\.18\.0'; then
    step "installing cargo-pgrx 0.18.0 (about 3 minutes)"
    cargo install cargo-pgrx --version 0.18.0 --locked
  fi
  if ! grep -q 'pg15' "$HOME/.pgrx/config.toml" 2>/dev/null; then
    step "cargo pgrx init --pg15"
    cargo pgrx init --pg15 /usr/lib/postgresql/15/bin/pg_config
  fi
}

kafka() {
  if [ ! -f "$KAFKA_LIBS/kafka_2.13-$KAFKA_VERSION.jar" ] || ! ls "$KAFKA_LIBS"/log4j-slf4j-impl-*.jar > /dev/null 2>&1; then
    command -v java > /dev/null || apt_install openjdk-17-jre-headless
    command -v mvn > /dev/null || apt_install maven
    step "fetching Apache Kafka $KAFKA_VERSION from Maven Central"
    mkdir -p "$KAFKA_LIBS"
    mvn -q -B -f "$here/kafka/pom.xml" -Dkafka.version="$KAFKA_VERSION" \
      dependency:copy-dependencies -DoutputDirectory="$KAFKA_LIBS"
  fi
}

tansu() {
  # type -P: this function is itself named tansu, so `command -v tansu` would always succeed.
  if ! type -P tansu > /dev/null; then
    step "installing Tansu (cargo install, about 15 minutes on a cold machine)"
    cargo install tansu --locked --features dynostore,libsql
  fi
}

python() {
  local venv=$HOME/.cache/pg_outbox/venv
  if ! "$venv/bin/python" -c "import sqlalchemy, psycopg2, confluent_kafka, pytest" 2> /dev/null; then
    step "installing the Python example's packages into $venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q -r "$here/../examples/python/requirements.txt"
  fi
}

[ $# -gt 0 ] || set -- build kafka tansu python
for what in "$@"; do
  case $what in
  build | kafka | tansu | python) "$what" ;;
  *) echo "usage: $0 [build] [kafka] [tansu] [python]" >&2; exit 2 ;;
  esac
done
