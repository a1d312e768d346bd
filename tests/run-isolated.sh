#!/usr/bin/env bash
# Runs a command (the test suite) inside a fresh loopback-only network namespace when we are root:
# Ray, NIXL's listener and our servers bind every interface, and the tests must reach nothing
# outside this machine. Without root (or without `ip`), it runs in place and says so.
set -euo pipefail
export UCX_NET_DEVICES=lo
export PYTHONUNBUFFERED=1
if [ "$(id -u)" = 0 ] && command -v ip >/dev/null 2>&1 && [ -z "${PDSERVE_NO_NETNS:-}" ]; then
  ns="pdserve-test-$$"
  ip netns add "$ns"
  trap 'ip netns pids "$ns" 2>/dev/null | xargs -r kill -9 2>/dev/null; ip netns del "$ns" 2>/dev/null || true' EXIT
  ip netns exec "$ns" ip link set lo up
  echo "running in loopback-only network namespace $ns"
  ip netns exec "$ns" "$@"
else
  echo "not root (or no iproute2, or PDSERVE_NO_NETNS set): running without a network namespace" >&2
  "$@"
fi
