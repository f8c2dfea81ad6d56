"""Who holds what: the tensor-parallel split of one model across ranks (pure functions).

Every rank r holds a contiguous range of query heads, the KV heads those query heads read,
a contiguous range of FFN columns and a contiguous range of vocabulary rows. Ranges are
half-open ``(start, stop)``. Query heads, FFN columns and vocabulary rows are each assigned
to exactly one rank; a KV head is held by every rank whose query heads use it, so any world
size from 1 to ``n_heads`` works, including more ranks than KV heads.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from mpitpi.errors import MpitpiError


@dataclass(frozen=True)
class RankSlice:
    rank: int
    q_heads: tuple[int, int]   # query heads [start, stop)
    kv_heads: tuple[int, int]  # KV heads [start, stop) read by those query heads
    ffn: tuple[int, int]       # FFN (intermediate) columns [start, stop)
    vocab: tuple[int, int]     # vocabulary rows of embedding / lm_head [start, stop)

    @property
    def n_q(self) -> int:
        return self.q_heads[1] - self.q_heads[0]

    @property
    def n_kv(self) -> int:
        return self.kv_heads[1] - self.kv_heads[0]

    @property
    def n_ffn(self) -> int:
        return self.ffn[1] - self.ffn[0]

    @property
    def n_vocab(self) -> int:
        return self.vocab[1] - self.vocab[0]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "RankSlice":
        return cls(rank=d["rank"], q_heads=tuple(d["q_heads"]), kv_heads=tuple(d["kv_heads"]),
                   ffn=tuple(d["ffn"]), vocab=tuple(d["vocab"]))


def parse_ratios(text: str | None, world_size: int) -> list[float] | None:
    """'2,1,1' -> [2.0, 1.0, 1.0]; None or '' -> None (uniform). Checks count and sign.
    ('auto' is resolved to numbers by loader.py before it gets here.)"""
    if text is None or str(text).strip() == "":
        return None
    try:
        ratios = [float(x) for x in str(text).split(",")]
    except ValueError:
        raise MpitpiError(f"--ratios {text!r} is not a comma-separated list of numbers. "
                          f"Fix: e.g. --ratios 2,1,1 for 3 ranks.")
    check_ratios(ratios, world_size)
    return ratios


def check_ratios(ratios: list[float], world_size: int) -> None:
    if len(ratios) != world_size:
        raise MpitpiError(f"--ratios has {len(ratios)} values but the world size is {world_size}. "
                          f"Fix: give one ratio per rank.")
    bad = [r for r in ratios if not r > 0 or r != r or r == float("inf")]
    if bad:
        raise MpitpiError(f"--ratios must be positive finite numbers; got {bad}. "
                          f"Fix: e.g. --ratios 2,1,1.")


def split_counts(total: int, ratios: list[float], minimum: int = 1) -> list[int]:
    """Split ``total`` items into len(ratios) counts proportional to ``ratios``.

    Largest-remainder rounding, then every count raised to at least ``minimum`` by taking
    from the largest counts. The counts sum to ``total``.
    """
    n = len(ratios)
    if total < n * minimum:
        raise MpitpiError(f"cannot give {n} ranks at least {minimum} of {total} items each.")
    top = max(ratios)
    ratios = [r / top for r in ratios]   # huge ratios (1e308) would overflow the sum
    s = float(sum(ratios))
    ideal = [total * r / s for r in ratios]
    counts = [int(x) for x in ideal]
    order = sorted(range(n), key=lambda i: (-(ideal[i] - counts[i]), i))
    for i in order[: total - sum(counts)]:
        counts[i] += 1
    for i in range(n):
        while counts[i] < minimum:
            donor = max((j for j in range(n) if counts[j] > minimum),
                        key=lambda j: (counts[j] / ideal[j], counts[j]))
            counts[donor] -= 1
            counts[i] += 1
    return counts


def _ranges(counts: list[int]) -> list[tuple[int, int]]:
    out, start = [], 0
    for c in counts:
        out.append((start, start + c))
        start += c
    return out


FFN_ALIGN = 32   # FFN columns per unit of the split: whole int4 blocks and int8 groups


def ffn_counts(ffn_dim: int, ratios: list[float]) -> list[int]:
    """FFN columns per rank, in whole units of FFN_ALIGN where the width allows it without
    skewing the shares (at least 4 units per rank: every real model's width): each rank's
    slice of down_proj is then whole quantization blocks, so a GGUF file's blocks carry over
    and int4 needs no int8 fallback. Narrower FFNs split by column."""
    units = ffn_dim // FFN_ALIGN
    if ffn_dim % FFN_ALIGN or units < 4 * len(ratios):
        return split_counts(ffn_dim, ratios)
    return [c * FFN_ALIGN for c in split_counts(units, ratios)]


def make_plan(n_heads: int, n_kv_heads: int, ffn_dim: int, vocab_size: int,
              world_size: int, ratios: list[float] | None = None) -> list[RankSlice]:
    """The split for ``world_size`` ranks, weighted by ``ratios`` (uniform when None).

    Raises MpitpiError before any work for a world size above the query-head count, a ratio
    list of the wrong length, or a non-positive ratio.
    """
    if world_size < 1:
        raise MpitpiError(f"world size must be at least 1, got {world_size}.")
    if world_size > n_heads:
        raise MpitpiError(f"world size {world_size} is larger than the model's {n_heads} query "
                          f"heads; every rank needs at least one head. Fix: run with "
                          f"-n {n_heads} or fewer ranks.")
    if n_heads % n_kv_heads:
        raise MpitpiError(f"{n_heads} query heads are not a multiple of {n_kv_heads} KV heads.")
    if ratios is None:
        ratios = [1.0] * world_size
    check_ratios(ratios, world_size)
    group = n_heads // n_kv_heads
    q = _ranges(split_counts(n_heads, ratios))
    ffn = _ranges(ffn_counts(ffn_dim, ratios))
    vocab = _ranges(split_counts(vocab_size, ratios))
    plan = []
    for r in range(world_size):
        q0, q1 = q[r]
        kv = (q0 // group, (q1 - 1) // group + 1)
        plan.append(RankSlice(rank=r, q_heads=q[r], kv_heads=kv, ffn=ffn[r], vocab=vocab[r]))
    return plan


def plan_for_args(args, world_size: int, ratios: list[float] | None = None) -> list[RankSlice]:
    """make_plan for a ModelArgs."""
    return make_plan(args.n_heads, args.n_kv_heads, args.ffn_dim, args.vocab_size,
                     world_size, ratios)


def vocab_counts(plan: list[RankSlice]) -> list[int]:
    """Vocabulary rows rank r holds, for every r: the sizes the ranks' logits are gathered by."""
    return [s.n_vocab for s in plan]


def check_plan(plan: list[RankSlice], n_heads: int, n_kv_heads: int, ffn_dim: int,
               vocab_size: int) -> None:
    """Raise MpitpiError unless ``plan`` is a split of this model that make_plan could give:
    ranks 0..N-1 in order; query heads, FFN columns and vocabulary rows each cut into
    contiguous ranges that cover them exactly, at least one query head per rank; each rank's
    KV heads the ones its query heads read."""
    def bad(why: str) -> MpitpiError:
        return MpitpiError(f"the split plan is inconsistent ({why}); it was edited or damaged. "
                           f"Fix: split the model again.")
    if not plan:
        raise bad("no ranks")
    group = n_heads // n_kv_heads
    for what, total, get in (("query heads", n_heads, lambda s: s.q_heads),
                             ("FFN columns", ffn_dim, lambda s: s.ffn),
                             ("vocabulary rows", vocab_size, lambda s: s.vocab)):
        end = 0
        for r, s in enumerate(plan):
            lo, hi = get(s)
            if s.rank != r or lo != end or hi < lo:
                raise bad(f"rank {r}'s {what} [{lo}, {hi}) do not follow on from {end}")
            end = hi
        if end != total:
            raise bad(f"the {what} end at {end}, the model has {total}")
    for s in plan:
        q0, q1 = s.q_heads
        if q1 <= q0 or s.kv_heads != (q0 // group, (q1 - 1) // group + 1):
            raise bad(f"rank {s.rank} holds query heads {s.q_heads} with KV heads {s.kv_heads}")
