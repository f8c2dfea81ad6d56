#!/usr/bin/env bash
# How fast the tile kernels stream weights on this host, against a plain read of the same
# bytes in the same round, for build-time variants of mpitpi/csrc/common.h (prefetch
# distance PF_BYTES, hint PF_LOC). A shared host's memory speed moves from minute to minute,
# so each round runs a plain read, every variant, and the read again; the ratios are
# medians over rounds, reported apart for rounds where the read was fast and slow.
#
#   ROUNDS=40 MB=600 ./jobs/tile-stream.sh "" "-DPF_BYTES=16384" "-DPF_LOC=3"
#
# KINDS: the kernels timed (tile_stream.c's kinds; default "4 7": the decode step's int4
# tiles and int6 vocabulary rows against int8 activations; 6 for int6 against int16, the
# kernel of builds without VNNI and GFNI).
# Each argument is the extra compiler flags of one variant ("" = the defaults). Needs an
# x86-64 host with AVX2 (the tiles' kernels); gcc with OpenMP. FAST: the read rate (GB/s)
# above which a round counts as fast (default: the median read of the run).
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-40}
MB=${MB:-600}
KINDS=${KINDS:-4 7}
CC=${CC:-gcc}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} OMP_PROC_BIND=${OMP_PROC_BIND:-true}
[ $# -gt 0 ] || set -- ""
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
i=0
for flags in "$@"; do
    # shellcheck disable=SC2086  # the flags are words on purpose
    $CC -O3 -march="${MPITPI_MARCH:-native}" -ffast-math -fopenmp $flags -Impitpi/csrc \
        jobs/tile_stream.c -o "$tmp/v$i" -lm
    i=$((i + 1))
done
log=$tmp/log
for r in $(seq 1 "$ROUNDS"); do
    line="$("$tmp/v0" 0 "$MB" 1)"
    for j in $(seq 0 $((i - 1))); do
        for k in $KINDS; do line="$line $("$tmp/v$j" "$k" "$MB" 1)"; done
    done
    echo "$line $("$tmp/v0" 0 "$MB" 1)" >> "$log"
    printf '.' >&2
done
echo >&2
python3 - "$log" "${FAST:-}" "$KINDS" "$@" <<'EOF'
import statistics, sys
rows = [list(map(float, l.split())) for l in open(sys.argv[1])]
kinds = [{"4": "int4", "6": "int6 x16", "7": "int6 x8", "8": "int8"}[k] for k in sys.argv[3].split()]
names = [a or "defaults" for a in sys.argv[4:]] or ["defaults"]
reads = [(r[0] + r[-1]) / 2 for r in rows]
fast = float(sys.argv[2]) if sys.argv[2] else statistics.median(reads)
print(f"{len(rows)} rounds; plain read {min(reads):.1f}-{max(reads):.1f} GB/s, fast above {fast:.1f}")
print("variant | kernel | GB/s median | x read, fast rounds | x read, slow rounds")
for j, n in enumerate(names):
    for k, kind in enumerate(kinds):
        v = [r[1 + len(kinds) * j + k] for r in rows]
        x = [a / b for a, b in zip(v, reads)]
        f = [a for a, b in zip(x, reads) if b > fast] or [0]
        s = [a for a, b in zip(x, reads) if b <= fast] or [0]
        print(f"{n} | {kind} | {statistics.median(v):.1f} | {statistics.median(f):.3f} "
              f"| {statistics.median(s):.3f}")
EOF
