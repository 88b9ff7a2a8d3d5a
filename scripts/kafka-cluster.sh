#!/usr/bin/env bash
# A three-node Apache Kafka cluster (KRaft, every node broker + controller) on loopback, set up as
# users run it in production: replication factor 3, min.insync.replicas 2.
#   scripts/kafka-cluster.sh start DIR BASEPORT     nodes listen on BASEPORT, +2, +4 (controllers +1)
#   scripts/kafka-cluster.sh stop DIR
#   scripts/kafka-cluster.sh kill-node DIR N        SIGKILL node N (1..3)
#   scripts/kafka-cluster.sh start-node DIR N
set -euo pipefail
cmd=$1 dir=$2
here=$(cd "$(dirname "$0")" && pwd)
libs=${KAFKA_LIBS:-$HOME/.cache/pg_outbox/kafka-4.1.1/libs}
java_opts=(-Xms256m -Xmx512m -XX:+UseG1GC -Djava.awt.headless=true -Dlog4j2.configurationFile="$dir/log4j2.yaml")

node_port() { echo $(( $(cat "$dir/baseport") + 2 * ($1 - 1) )); }

start_node() {
  local n=$1
  if [ -f "$dir/node$n.pid" ] && kill -0 "$(cat "$dir/node$n.pid")" 2>/dev/null; then return; fi
  nohup java -cp "$libs/*" "${java_opts[@]}" kafka.Kafka "$dir/node$n.properties" >> "$dir/node$n.log" 2>&1 < /dev/null &
  echo $! > "$dir/node$n.pid"
}

case $cmd in
start)
  mkdir -p "$dir"
  echo "$3" > "$dir/baseport"
  voters=""
  for n in 1 2 3; do voters="$voters${voters:+,}$n@127.0.0.1:$(( $(node_port $n) + 1 ))"; done
  printf 'Configuration:\n  Appenders:\n    Console: { name: STDOUT, PatternLayout: { pattern: "[%%d] %%p %%m (%%c)%%n" } }\n  Loggers:\n    Root: { level: WARN, AppenderRef: [ { ref: STDOUT } ] }\n' > "$dir/log4j2.yaml"
  [ -f "$dir/cluster-id" ] || java -cp "$libs/*" "${java_opts[@]}" kafka.tools.StorageTool random-uuid > "$dir/cluster-id"
  for n in 1 2 3; do
    port=$(node_port $n)
    cat > "$dir/node$n.properties" <<CONF
process.roles=broker,controller
node.id=$n
controller.quorum.voters=$voters
listeners=PLAINTEXT://127.0.0.1:$port,CONTROLLER://127.0.0.1:$((port + 1))
advertised.listeners=PLAINTEXT://127.0.0.1:$port
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
log.dirs=$dir/node$n/data
num.partitions=3
default.replication.factor=3
min.insync.replicas=2
unclean.leader.election.enable=false
auto.create.topics.enable=false
offsets.topic.replication.factor=3
transaction.state.log.replication.factor=3
transaction.state.log.min.isr=2
share.coordinator.state.topic.replication.factor=3
share.coordinator.state.topic.min.isr=2
group.initial.rebalance.delay.ms=0
CONF
    if [ ! -f "$dir/node$n/data/meta.properties" ]; then
      java -cp "$libs/*" "${java_opts[@]}" kafka.tools.StorageTool format -t "$(cat "$dir/cluster-id")" \
        -c "$dir/node$n.properties" > "$dir/format$n.log" 2>&1
    fi
  done
  for n in 1 2 3; do start_node $n; done
  for n in 1 2 3; do "$here/wait-port.sh" 127.0.0.1 "$(node_port $n)" 90; done
  ;;
start-node)
  start_node "$3"
  "$here/wait-port.sh" 127.0.0.1 "$(node_port "$3")" 90
  ;;
kill-node)
  [ -f "$dir/node$3.pid" ] && kill -9 "$(cat "$dir/node$3.pid")" 2>/dev/null || true
  rm -f "$dir/node$3.pid"
  ;;
stop)
  for n in 1 2 3; do
    if [ -f "$dir/node$n.pid" ]; then kill "$(cat "$dir/node$n.pid")" 2>/dev/null || true; fi
  done
  for n in 1 2 3; do
    if [ -f "$dir/node$n.pid" ]; then
      pid=$(cat "$dir/node$n.pid")
      for _ in $(seq 1 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
      kill -9 "$pid" 2>/dev/null || true
      rm -f "$dir/node$n.pid"
    fi
  done
  ;;
*) echo "usage: $0 start DIR BASEPORT | stop DIR | kill-node DIR N | start-node DIR N" >&2; exit 2 ;;
esac
