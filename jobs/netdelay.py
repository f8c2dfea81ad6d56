"""Add a fixed delay to packets arriving in this network namespace (netem is missing here).

Run inside a namespace made by jobs/edge-cluster.sh:
    ip netns exec NS python jobs/netdelay.py DELAY_MS [QUEUE]
It sends the namespace's incoming eth0 packets to an NFQUEUE (iptables-legacy), holds each
for DELAY_MS in user space and then lets it through, in arrival order. Removes its rule on
exit. Needs Debian's iptables and libnetfilter-queue, and PyPI's NetfilterQueue.
"""
import heapq
import itertools
import select
import signal
import subprocess
import sys
import time

from netfilterqueue import NetfilterQueue

delay = float(sys.argv[1]) / 1e3
queue = int(sys.argv[2]) if len(sys.argv) > 2 else 0
rule = ["INPUT", "-i", "eth0", "-j", "NFQUEUE", "--queue-num", str(queue)]
held: list = []
seq = itertools.count()


def hold(pkt):
    pkt.retain()
    heapq.heappush(held, (time.monotonic() + delay, next(seq), pkt))


def stop(*_):
    raise SystemExit(0)


signal.signal(signal.SIGTERM, stop)
nfq = NetfilterQueue()
nfq.bind(queue, hold, max_len=100000)
subprocess.run(["iptables-legacy", "-I", *rule], check=True)
try:
    fd = nfq.get_fd()
    print(f"netdelay: holding incoming packets {delay * 1e3:.1f} ms", file=sys.stderr,
          flush=True)
    while True:
        wait = max(0.0, held[0][0] - time.monotonic()) if held else 0.5
        if select.select([fd], [], [], wait)[0]:
            nfq.run(block=False)
        now = time.monotonic()
        while held and held[0][0] <= now:
            heapq.heappop(held)[2].accept()
finally:
    subprocess.run(["iptables-legacy", "-D", *rule])
    for _, _, pkt in held:
        pkt.accept()
    nfq.unbind()
