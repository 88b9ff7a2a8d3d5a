#!/usr/bin/env bash
# free-port.sh [N]: prints a port P such that P..P+N-1 are used by no socket at all (listening or
# connected). Chosen below Linux's ephemeral range (32768+), so an outgoing connection cannot take it
# between this check and the server's bind.
n=${1:-2}
used=$(ss -Htan 2>/dev/null | awk '{print $4}' | sed 's/.*://' | sort -u)
for _ in $(seq 1 200); do
  p=$((20000 + RANDOM % 12000))
  ok=1
  for i in $(seq 0 $((n - 1))); do
    if grep -qx "$((p + i))" <<< "$used"; then ok=0; break; fi
  done
  if [ $ok = 1 ]; then echo "$p"; exit 0; fi
done
echo "no free port range of $n found" >&2
exit 1
