#!/usr/bin/env bash
# wait-port.sh HOST PORT SECONDS: waits until something accepts connections there.
host=$1 port=$2 secs=${3:-30}
for _ in $(seq 1 $((secs * 4))); do
  if (exec 3<>"/dev/tcp/$host/$port") 2>/dev/null; then exit 0; fi
  sleep 0.25
done
echo "nothing listens on $host:$port after ${secs}s" >&2
exit 1
