#!/usr/bin/env bash
# The peer product for the benchmark: Debezium's Postgres connector with its Outbox Event Router,
# in a standalone Kafka Connect worker (Debezium 3.6.1.Final on Kafka Connect 4.3.0, the Kafka
# that Debezium release is built against; see bench/debezium/pom.xml).
#   scripts/debezium.sh fetch    jars from Maven Central into ~/.cache/pg_outbox (once, cached)
#   scripts/debezium.sh start DIR BOOTSTRAP PGHOST PGPORT DBNAME [POLL_INTERVAL_MS]
#   scripts/debezium.sh stop DIR
# start writes DIR/connect-standalone.properties and DIR/outbox-connector.properties from the
# templates in bench/debezium/, logs to DIR/connect.log, and returns once the connector and its
# task report RUNNING and the replication slot is streaming: a row committed after that is sent.
#
# What the caller provides:
#   - a Postgres cluster with wal_level = logical, user postgres trusted on PGHOST without a
#     password, and in DBNAME the table the Outbox Event Router reads by default:
#       CREATE TABLE outbox_event (id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
#         aggregatetype text NOT NULL, aggregateid text NOT NULL, type text NOT NULL,
#         payload jsonb);
#     An event lands on topic outbox.event.<aggregatetype>, key aggregateid, value the payload
#     text (as jsonb prints it), header id.
#   - a broker at BOOTSTRAP. Topics need not exist: the worker creates outbox.event.* (3
#     partitions, replication factor 1) the first time it routes to one.
# The connector creates replication slot and publication debezium_bench at start and drops the
# slot when stopped cleanly (slot.drop.on.stop); the publication stays, and is reused. So every
# start is a fresh run from the current end of the WAL: rows committed while no worker ran are
# never sent. With DEBEZIUM_KEEP_SLOT=1 the slot and offsets survive a stop, and the next start
# (also with DEBEZIUM_KEEP_SLOT=1) sends what was committed in between. The worker takes 2 to 6 s to start on a busy 2-core machine, and about 500 MB RSS.
set -euo pipefail
cmd=${1:-} dir=${2:-}
here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
DEBEZIUM_VERSION=3.6.1
libs=${DEBEZIUM_LIBS:-$HOME/.cache/pg_outbox/debezium-$DEBEZIUM_VERSION/libs}
connector=outbox-bench

# A killed JVM stays a zombie until init reaps it, and kill -0 still succeeds on a zombie.
running() {
  [ -f "$dir/connect.pid" ] && kill -0 "$(cat "$dir/connect.pid")" 2>/dev/null \
    && [[ $(ps -o stat= -p "$(cat "$dir/connect.pid")" 2>/dev/null) != Z* ]]
}

# fill TEMPLATE OUT NAME=VALUE...: replaces each @NAME@; a line whose value is empty is dropped
# (so an optional setting falls back to Debezium's default rather than being set to "").
fill() {
  local text line out=$2 kv name value
  text=$(< "$1")
  shift 2
  for kv in "$@"; do
    name=${kv%%=*} value=${kv#*=}
    if [ -z "$value" ]; then
      text=$(while IFS= read -r line; do [[ $line == *"@$name@"* ]] || printf '%s\n' "$line"; done <<< "$text")
    else
      text=${text//"@$name@"/"$value"}
    fi
  done
  if [[ $text =~ @[A-Z_]+@ ]]; then echo "unfilled ${BASH_REMATCH[0]} in $out" >&2; exit 1; fi
  printf '%s\n' "$text" > "$out"
}

fetch() {
  # Into a temporary directory moved in place when complete: an interrupted download leaves no
  # half-filled libs/ that the check below would take for a cached one.
  if [ -f "$libs/debezium-connector-postgres-$DEBEZIUM_VERSION.Final.jar" ]; then return 0; fi
  command -v mvn > /dev/null || { echo "Maven is required (apt-get install maven)" >&2; exit 1; }
  local tmp="$libs.tmp.$$"
  rm -rf "$tmp"
  mvn -B -q -f "$root/bench/debezium/pom.xml" dependency:copy-dependencies -DoutputDirectory="$tmp"
  rm -rf "$libs"
  mkdir -p "$(dirname "$libs")"
  mv "$tmp" "$libs"
}

case $cmd in
fetch)
  fetch
  ;;
start)
  [ $# -ge 6 ] || { echo "usage: $0 start DIR BOOTSTRAP PGHOST PGPORT DBNAME [POLL_INTERVAL_MS]" >&2; exit 2; }
  bootstrap=$3 pghost=$4 pgport=$5 dbname=$6 poll=${7:-}
  if running; then exit 0; fi
  [ -f "$libs/debezium-connector-postgres-$DEBEZIUM_VERSION.Final.jar" ] \
    || { echo "Debezium jars missing in $libs: run $0 fetch" >&2; exit 1; }
  mkdir -p "$dir"
  dir=$(cd "$dir" && pwd)  # the worker resolves the offsets file against its own cwd otherwise
  keep_slot=${DEBEZIUM_KEEP_SLOT:-0}
  # Without DEBEZIUM_KEEP_SLOT each start is a fresh run: the slot went with the last clean stop
  # (slot.drop.on.stop), so the LSN saved in the old offsets is gone from the server and Debezium
  # would refuse to start.
  [ "$keep_slot" = 1 ] || rm -f "$dir/connect.offsets"
  rest=$("$here/free-port.sh" 1)
  fill "$root/bench/debezium/connect-standalone.properties.in" "$dir/connect-standalone.properties" \
    "DIR=$dir" "BOOTSTRAP=$bootstrap" "REST_PORT=$rest"
  fill "$root/bench/debezium/outbox-connector.properties.in" "$dir/outbox-connector.properties" \
    "PGHOST=$pghost" "PGPORT=$pgport" "DBNAME=$dbname" "POLL_INTERVAL_MS=$poll" \
    "SLOT_DROP_ON_STOP=$([ "$keep_slot" = 1 ] && echo false || echo true)"
  slot=$(sed -n 's/^slot\.name=//p' "$dir/outbox-connector.properties")
  # A slot left by a worker that did not stop cleanly (kill -9, crash) would make this run start
  # from where that one stopped, replaying old rows into the topic: drop it.
  # An active one means another worker streams from it, or a killed one's walsender has not
  # noticed yet: give that a few seconds.
  for _ in $(seq 1 20); do
    leftover=$(psql -h "$pghost" -p "$pgport" -U postgres -d "$dbname" -XAtqc \
      "SELECT active FROM pg_replication_slots WHERE slot_name = '$slot'")
    [ "$leftover" = t ] || break
    sleep 0.5
  done
  if [ "$leftover" = t ]; then echo "replication slot $slot is in use by another worker" >&2; exit 1; fi
  if [ "$leftover" = f ] && [ "$keep_slot" != 1 ]; then
    psql -h "$pghost" -p "$pgport" -U postgres -d "$dbname" -XAtqc "SELECT pg_drop_replication_slot('$slot')" > /dev/null
  fi
  echo "$rest" > "$dir/rest.port"
  # The JSON layout (YAML) needs a Jackson module the Connect runtime does not ship: properties.
  cat > "$dir/log4j2.properties" <<'CONF'
appender.stdout.type=Console
appender.stdout.name=STDOUT
appender.stdout.layout.type=PatternLayout
appender.stdout.layout.pattern=[%d] %p %m (%c)%n
rootLogger.level=INFO
rootLogger.appenderRef.stdout.ref=STDOUT
# Client and config dumps at INFO are hundreds of lines per start.
logger.clients.name=org.apache.kafka.clients
logger.clients.level=WARN
logger.config.name=org.apache.kafka.common.config.AbstractConfig
logger.config.level=WARN
logger.reflections.name=org.reflections
logger.reflections.level=ERROR
# Debezium's lag metric queues one measurement per event into a 1000-slot queue and logs a WARN
# per event it drops: thousands of lines per large transaction, and their cost lands in the
# measurement. There is no setting to turn the collector off.
logger.measurement.name=io.debezium.metrics.stats.MeasurementCollector
logger.measurement.level=ERROR
CONF
  # The JVM options of Kafka's own connect-standalone.sh and kafka-run-class.sh (its heap, G1
  # with a 20 ms pause goal), as scripts/kafka.sh gives the broker: the peer runs as its users
  # run it. Debezium's queue is bounded (max.queue.size 8192 records), so a large transaction
  # streams through rather than piling up.
  java_opts=(-Xms256m -Xmx2G -server -XX:+UseG1GC -XX:MaxGCPauseMillis=20 -XX:InitiatingHeapOccupancyPercent=35
    -XX:+ExplicitGCInvokesConcurrent -XX:MaxInlineLevel=15 -Djava.awt.headless=true
    -Dlog4j2.configurationFile="$dir/log4j2.properties")
  # The worker's cwd is DIR, so nothing it writes lands in the caller's directory. The cd is a
  # statement of its own: "cd && java &" would background a subshell, and $! be its pid, not java's.
  (cd "$dir"
   nohup java -cp "$libs/*" "${java_opts[@]}" org.apache.kafka.connect.cli.ConnectStandalone \
     "$dir/connect-standalone.properties" "$dir/outbox-connector.properties" >> "$dir/connect.log" 2>&1 < /dev/null &
   echo $! > "$dir/connect.pid")
  # RUNNING from the REST API says Connect started the task; the slot being active says Debezium
  # is streaming from it. Until both, a committed row might predate the slot and never be sent.
  # A failed start stops the worker again: no orphan JVM holding the slot or the REST port.
  fail() {
    echo "$1" >&2; tail -40 "$dir/connect.log" >&2
    "$here/debezium.sh" stop "$dir"
    exit 1
  }
  status=""
  for _ in $(seq 1 240); do
    running || fail "Kafka Connect exited during startup:"
    status=$(curl -sf "http://127.0.0.1:$rest/connectors/$connector/status" 2>/dev/null || true)
    if [[ $status == *'"state":"FAILED"'* ]]; then fail "connector failed: $status"; fi
    if [[ $status =~ \"connector\":\{\"state\":\"RUNNING\" && $status =~ \"tasks\":\[\{[^]]*\"state\":\"RUNNING\" ]]; then
      active=$(psql -h "$pghost" -p "$pgport" -U postgres -d "$dbname" -XAtqc \
        "SELECT active FROM pg_replication_slots WHERE slot_name = '$slot'" 2>/dev/null || true)
      if [ "$active" = t ]; then exit 0; fi
    fi
    sleep 0.5
  done
  fail "connector not RUNNING and streaming after 120 s (status: ${status:-none})"
  ;;
stop)
  [ -n "$dir" ] || { echo "usage: $0 stop DIR" >&2; exit 2; }
  if running; then
    # SIGTERM: Connect's shutdown hook stops the task, which drops the slot (slot.drop.on.stop).
    pid=$(cat "$dir/connect.pid"); kill "$pid"
    for _ in $(seq 1 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    kill -9 "$pid" 2>/dev/null || true
  fi
  rm -f "$dir/connect.pid"
  ;;
*) echo "usage: $0 fetch | start DIR BOOTSTRAP PGHOST PGPORT DBNAME [POLL_INTERVAL_MS] | stop DIR" >&2; exit 2 ;;
esac
