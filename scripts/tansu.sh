#!/usr/bin/env bash
# Tansu, an independent Kafka-compatible broker (Rust), on loopback.
#   scripts/tansu.sh start DIR PORT   (storage: sqlite in DIR, persists across restarts)
#   scripts/tansu.sh stop DIR
set -euo pipefail
cmd=$1 dir=$2
here=$(cd "$(dirname "$0")" && pwd)
running() { [ -f "$dir/tansu.pid" ] && kill -0 "$(cat "$dir/tansu.pid")" 2>/dev/null; }
case $cmd in
start)
  port=$3
  if running; then exit 0; fi
  if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
    echo "127.0.0.1:$port is already taken by another process: pick another port" >&2; exit 1
  fi
  tansu=$(command -v tansu || echo "$HOME/.cargo/bin/tansu")
  [ -x "$tansu" ] || { echo "tansu missing: run scripts/deps.sh tansu" >&2; exit 1; }
  mkdir -p "$dir"
  # Tansu resolves the sqlite path relative to its working directory.
  cd "$dir"
  nohup "$tansu" broker --listener-url "tcp://127.0.0.1:$port" --advertised-listener-url "tcp://127.0.0.1:$port" \
    --storage-engine "sqlite://tansu.db" >> "$dir/tansu.log" 2>&1 < /dev/null &
  echo $! > "$dir/tansu.pid"
  # Running after the port answers: ours is the process listening, not a leftover.
  "$here/wait-port.sh" 127.0.0.1 "$port" 30 && running || { tail -20 "$dir/tansu.log" >&2; exit 1; }
  ;;
stop)
  if running; then
    pid=$(cat "$dir/tansu.pid"); kill "$pid"
    for _ in $(seq 1 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
    kill -9 "$pid" 2>/dev/null || true
  fi
  rm -f "$dir/tansu.pid"
  ;;
*) echo "usage: $0 start DIR PORT | stop DIR" >&2; exit 2 ;;
esac
