#!/usr/bin/env bash
# Run mpitpi across the hosts of a hydra hostfile.
#
#   jobs/run-hostfile.sh HOSTFILE RANKS mpitpi-command [args...]
#   e.g. cp jobs/hostfile.example hostfile    # then put your hosts in it
#        jobs/run-hostfile.sh hostfile 4 generate --model smollm2-135m --prompt "Hi"
#
# Every host needs this checkout (with its .venv, from `make install`) at the same path, and
# passwordless ssh from this one (docs/HOSTS.md; `mpitpi check` checks the hosts first).
# Rank 0's host needs the model; the other hosts get their shard file from rank 0 once, into
# $LOCAL_SHARDS (default /var/tmp/mpitpi-shards), and reuse it on later runs.
set -euo pipefail
[ $# -ge 3 ] || { sed -n '2,11p' "$0" >&2; exit 2; }
HOSTFILE=$1; RANKS=$2; shift 2
[ -r "$HOSTFILE" ] || { echo "cannot read hostfile $HOSTFILE" >&2; exit 2; }
HERE=$(cd "$(dirname "$0")/.." && pwd)
VENV=${VENV:-$HERE/.venv}
LOCAL_SHARDS=${LOCAL_SHARDS:-/var/tmp/mpitpi-shards}
CMD=$1; shift
extra=()
case "$CMD" in generate|chat|serve|bench|perplexity|check) extra=(--local-shards "$LOCAL_SHARDS");; esac
exec "$VENV/bin/mpiexec" -f "$HOSTFILE" -n "$RANKS" "$VENV/bin/mpitpi" "$CMD" "${extra[@]}" "$@"
