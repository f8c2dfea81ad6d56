#!/usr/bin/env bash
# An emulated edge cluster on one machine: K network namespaces ("devices") joined by veth
# pairs to a bridge that lives in a namespace of its own, each device's link limited with tbf.
# mpitpi runs across them with MPICH's hydra, which starts its proxies through
# `ip netns exec` instead of ssh. Everything made here is removed on exit (trap).
#
#   jobs/edge-cluster.sh [-k K] [-r RATE] [-d DELAY_MS] [-n RANKS] -- mpitpi ARGS...
#   e.g. jobs/edge-cluster.sh -k 4 -r 100mbit -- generate --model smollm2-135m --prompt Hi
#
# Only addresses inside the namespaces made here (10.77.0.0/24) are used. Needs root,
# iproute2 and tc (tbf). -d adds a fixed delay to every packet a device receives, in user
# space (jobs/netdelay.py: iptables-legacy NFQUEUE + NetfilterQueue), as netem is missing.
set -euo pipefail
K=4; RATE=100mbit; RANKS=""; DELAY=0; PREFIX=mpitpi-edge-$$
while getopts "k:r:n:d:" opt; do
  case $opt in k) K=$OPTARG;; r) RATE=$OPTARG;; n) RANKS=$OPTARG;; d) DELAY=$OPTARG;;
    *) exit 2;; esac
done
shift $((OPTIND - 1)); [ "${1:-}" = "--" ] && shift
RANKS=${RANKS:-$K}
HERE=$(cd "$(dirname "$0")/.." && pwd)
VENV=${VENV:-$HERE/.venv}
BR=$PREFIX-br
LAUNCH=$(mktemp /tmp/mpitpi-launch.XXXXXX)

if [ "$DELAY" != 0 ] && ! "$VENV/bin/python" -c "import netfilterqueue" 2>/dev/null; then
  # the delayer's needs, installed on first use: iptables-legacy, libnetfilter-queue, and
  # PyPI's NetfilterQueue built against it
  apt-get install -y -q iptables libnetfilter-queue-dev >/dev/null
  "$VENV/bin/pip" install -q NetfilterQueue
fi

DELAYERS=()
cleanup() {
  for pid in "${DELAYERS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${DELAYERS[@]}"; do wait "$pid" 2>/dev/null || true; done
  for i in $(seq 0 $((K - 1))); do ip netns del "$PREFIX-$i" 2>/dev/null || true; done
  ip netns del "$BR" 2>/dev/null || true
  rm -f "$LAUNCH"
}
trap cleanup EXIT INT TERM

ip netns add "$BR"
ip -n "$BR" link add br0 type bridge
ip -n "$BR" link set br0 up
ip -n "$BR" link set lo up
HOSTS=""
for i in $(seq 0 $((K - 1))); do
  ns=$PREFIX-$i
  ip netns add "$ns"
  ip link add "e$$-$i" type veth peer name "b$$-$i"
  ip link set "e$$-$i" netns "$ns"
  ip link set "b$$-$i" netns "$BR"
  ip -n "$ns" link set "e$$-$i" name eth0
  ip -n "$ns" addr add "10.77.0.$((i + 1))/24" dev eth0
  ip -n "$ns" link set eth0 up
  ip -n "$ns" link set lo up
  ip -n "$BR" link set "b$$-$i" master br0
  ip -n "$BR" link set "b$$-$i" up
  # each device sends at most RATE (its uplink); the bridge side limits what it receives
  ip netns exec "$ns" tc qdisc add dev eth0 root tbf rate "$RATE" burst 32kbit latency 50ms
  ip netns exec "$BR" tc qdisc add dev "b$$-$i" root tbf rate "$RATE" burst 32kbit latency 50ms
  HOSTS+="10.77.0.$((i + 1)),"
  if [ "$DELAY" != 0 ]; then
    ip netns exec "$ns" "$VENV/bin/python" "$HERE/jobs/netdelay.py" "$DELAY" &
    DELAYERS+=($!)
  fi
done
[ "$DELAY" != 0 ] && sleep 1   # let the delayers install their rules

# hydra calls "LAUNCH [ssh options] HOST COMMAND...": run COMMAND inside HOST's namespace
cat > "$LAUNCH" <<LAUNCHER
#!/usr/bin/env bash
while [ \$# -gt 0 ] && [[ "\$1" == -* ]]; do
  case "\$1" in -x|-q|-T) shift;; *) shift 2;; esac
done
host=\$1; shift
i=\$(( \${host##*.} - 1 ))
exec ip netns exec "$PREFIX-\$i" bash -c "\$*"
LAUNCHER
chmod +x "$LAUNCH"

export UCX_TLS=tcp,self          # else UCX finds the other ranks' shared memory
export FI_PROVIDER=tcp           # the same for an OFI build of MPICH
echo "edge cluster $PREFIX: $K namespaces at 10.77.0.1-$K, links $RATE each, delay ${DELAY} ms" >&2
rc=0
ip netns exec "$PREFIX-0" "$VENV/bin/mpiexec" -launcher ssh -launcher-exec "$LAUNCH" \
  -iface eth0 -hosts "${HOSTS%,}" -n "$RANKS" -ppn 1 \
  -genv UCX_TLS tcp,self -genv FI_PROVIDER tcp \
  "$VENV/bin/mpitpi" "$@" || rc=$?
# what crossed each device's link (bytes its eth0 sent, bytes it received)
for i in $(seq 0 $((K - 1))); do
  tx=$(ip netns exec "$PREFIX-$i" cat /sys/class/net/eth0/statistics/tx_bytes)
  rx=$(ip netns exec "$PREFIX-$i" cat /sys/class/net/eth0/statistics/rx_bytes)
  echo "edge-cluster link $i tx_bytes=$tx rx_bytes=$rx" >&2
done
exit $rc
