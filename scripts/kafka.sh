#!/usr/bin/env bash
# A one-node Apache Kafka (KRaft) on loopback, as Kafka's own scripts run it.
#   scripts/kafka.sh start DIR PORT [ADVERTISED_PORT]   (idempotent; storage persists in DIR)
#   scripts/kafka.sh stop DIR
# With KAFKA_TLS=1 the client listener speaks TLS (a self-signed certificate for 127.0.0.1 whose
# PEM is written to DIR/ca.pem, for the clients' ssl.ca.location). With ADVERTISED_PORT the broker
# tells clients to connect to that port instead (a proxy in front of it); kept across restarts.
set -euo pipefail
cmd=$1 dir=$2
here=$(cd "$(dirname "$0")" && pwd)
libs=${KAFKA_LIBS:-$HOME/.cache/pg_outbox/kafka-4.1.1/libs}

running() { [ -f "$dir/kafka.pid" ] && kill -0 "$(cat "$dir/kafka.pid")" 2>/dev/null; }

case $cmd in
start)
  port=$3 cport=$(($3 + 1))
  if running; then exit 0; fi
  if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
    echo "127.0.0.1:$port is already taken by another process: pick another port" >&2; exit 1
  fi
  [ -d "$libs" ] || { echo "Kafka jars missing in $libs: run scripts/deps.sh kafka" >&2; exit 1; }
  mkdir -p "$dir/data"
  [ -n "${4:-}" ] && echo "$4" > "$dir/advertised-port"
  advertised_port=$(cat "$dir/advertised-port" 2>/dev/null || echo "$port")
  proto=PLAINTEXT
  if [ "${KAFKA_TLS:-0}" = 1 ] || [ -f "$dir/broker.p12" ]; then
    proto=SSL
    if [ ! -f "$dir/broker.p12" ]; then
      keytool -genkeypair -alias broker -keyalg RSA -keysize 2048 -validity 30 -dname "CN=127.0.0.1" \
        -ext "SAN=IP:127.0.0.1,DNS:localhost" -keystore "$dir/broker.p12" -storetype PKCS12 \
        -storepass changeit -keypass changeit > /dev/null 2>&1
      keytool -exportcert -alias broker -keystore "$dir/broker.p12" -storepass changeit -rfc \
        -file "$dir/ca.pem" > /dev/null 2>&1
    fi
  fi
  cat > "$dir/server.properties" <<CONF
process.roles=broker,controller
node.id=1
listeners=$proto://127.0.0.1:$port,CONTROLLER://127.0.0.1:$cport
advertised.listeners=$proto://127.0.0.1:$advertised_port
controller.listener.names=CONTROLLER
inter.broker.listener.name=$proto
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,SSL:SSL,CONTROLLER:PLAINTEXT
ssl.keystore.location=$dir/broker.p12
ssl.keystore.type=PKCS12
ssl.keystore.password=changeit
ssl.key.password=changeit
ssl.truststore.location=$dir/broker.p12
ssl.truststore.type=PKCS12
ssl.truststore.password=changeit
controller.quorum.bootstrap.servers=127.0.0.1:$cport
log.dirs=$dir/data
num.partitions=3
auto.create.topics.enable=false
offsets.topic.replication.factor=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
CONF
  cat > "$dir/log4j2.yaml" <<'CONF'
Configuration:
  Appenders:
    Console: { name: STDOUT, PatternLayout: { pattern: "[%d] %p %m (%c)%n" } }
  Loggers:
    Root: { level: WARN, AppenderRef: [ { ref: STDOUT } ] }
    # The controller's fencing and unfencing of the broker (a pause longer than its session
    # timeout fences it): what a test that froze the broker needs to explain itself.
    Logger:
      - { name: kafka.server.KafkaRaftServer, level: INFO }
      - { name: org.apache.kafka.controller.ReplicationControlManager, level: INFO }
      - { name: org.apache.kafka.controller.BrokerHeartbeatManager, level: INFO }
CONF
  # The JVM options of Kafka's own kafka-server-start.sh and kafka-run-class.sh (1 GB heap, G1
  # with a 20 ms pause goal, a GC log). With a 768 MB heap and G1's default 200 ms goal, young
  # collections came twice as often in a 30 s latency run and one paused the broker for 85 ms;
  # with these, the longest was 14 ms.
  java_opts=(-Xms1G -Xmx1G -server -XX:+UseG1GC -XX:MaxGCPauseMillis=20 -XX:InitiatingHeapOccupancyPercent=35
    -XX:+ExplicitGCInvokesConcurrent -XX:MaxInlineLevel=15 -Djava.awt.headless=true
    "-Xlog:gc*:file=$dir/gc.log:time,tags:filecount=4,filesize=20M"
    -Dlog4j2.configurationFile="$dir/log4j2.yaml")
  if [ ! -f "$dir/data/meta.properties" ]; then
    id=$(java -cp "$libs/*" "${java_opts[@]}" kafka.tools.StorageTool random-uuid)
    java -cp "$libs/*" "${java_opts[@]}" kafka.tools.StorageTool format --standalone -t "$id" \
      -c "$dir/server.properties" > "$dir/format.log" 2>&1
  fi
  nohup java -cp "$libs/*" "${java_opts[@]}" kafka.Kafka "$dir/server.properties" >> "$dir/kafka.log" 2>&1 < /dev/null &
  echo $! > "$dir/kafka.pid"
  # Running after the port answers: ours is the process listening, not a leftover.
  "$here/wait-port.sh" 127.0.0.1 "$port" 90 && running || { tail -20 "$dir/kafka.log" >&2; exit 1; }
  ;;
stop)
  if running; then
    pid=$(cat "$dir/kafka.pid"); kill "$pid"
    for _ in $(seq 1 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    kill -9 "$pid" 2>/dev/null || true
  fi
  rm -f "$dir/kafka.pid"
  ;;
*) echo "usage: $0 start DIR PORT | stop DIR" >&2; exit 2 ;;
esac
