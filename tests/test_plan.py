"""The split plan: a pure function, tested on its own."""
import pytest

from mpitpi.errors import MpitpiError
from mpitpi.plan import make_plan, parse_ratios, split_counts


def covered(ranges, total):
    """Every index in [0, total) is in exactly one of the contiguous ranges."""
    seen = [i for a, b in ranges for i in range(a, b)]
    return sorted(seen) == list(range(total)) and len(seen) == total


@pytest.mark.parametrize("heads,kv", [(8, 8), (8, 4), (8, 1), (9, 3), (32, 8), (6, 2), (7, 7)])
def test_every_world_size_assigns_everything_once(heads, kv):
    ffn, vocab = 1000 + heads, 3001
    for n in range(1, heads + 1):
        plan = make_plan(heads, kv, ffn, vocab, n)
        assert [s.rank for s in plan] == list(range(n))
        assert covered([s.q_heads for s in plan], heads)
        assert covered([s.ffn for s in plan], ffn)
        assert covered([s.vocab for s in plan], vocab)
        g = heads // kv
        for s in plan:
            assert s.n_q >= 1
            needed = {h // g for h in range(*s.q_heads)}
            assert set(range(*s.kv_heads)) == needed   # exactly the KV heads its queries read


def test_more_ranks_than_kv_heads_share_kv_heads():
    plan = make_plan(9, 3, 1536, 49152, 4)
    holders = {kv: [s.rank for s in plan if s.kv_heads[0] <= kv < s.kv_heads[1]]
               for kv in range(3)}
    assert all(holders[kv] for kv in range(3))
    assert any(len(r) > 1 for r in holders.values())


def test_ratios_respected():
    plan = make_plan(8, 4, 1200, 4000, 3, [2, 1, 1])
    assert [s.n_q for s in plan] == [4, 2, 2]
    assert [s.n_ffn for s in plan] == [600, 300, 300]
    assert [s.n_vocab for s in plan] == [2000, 1000, 1000]


def test_split_counts_rounding_and_minimum():
    assert split_counts(9, [1, 1, 1, 1]) == [3, 2, 2, 2]
    assert split_counts(9, [100, 1, 1]) == [7, 1, 1]
    assert sum(split_counts(11008, [3, 1, 2.5])) == 11008
    with pytest.raises(MpitpiError):
        split_counts(2, [1, 1, 1])


@pytest.mark.parametrize("n,ratios,words", [
    (9, None, "larger than the model's 8 query heads"),
    (3, [1, 1], "has 2 values but the world size is 3"),
    (2, [1, 0], "positive"),
    (2, [1, -2], "positive"),
    (0, None, "at least 1"),
])
def test_bad_input_is_a_clear_error(n, ratios, words):
    with pytest.raises(MpitpiError, match=words):
        make_plan(8, 4, 100, 100, n, ratios)


def test_parse_ratios():
    assert parse_ratios("2,1,1", 3) == [2.0, 1.0, 1.0]
    assert parse_ratios(None, 3) is None
    with pytest.raises(MpitpiError, match="comma-separated"):
        parse_ratios("2;1", 2)
    with pytest.raises(MpitpiError, match="world size"):
        parse_ratios("1,1", 3)


def test_ffn_split_in_whole_blocks_where_the_width_allows():
    from mpitpi.plan import FFN_ALIGN, ffn_counts
    for n in range(1, 10):                       # SmolLM2's 1536 on up to its 9 heads
        counts = ffn_counts(1536, [1.0] * n)
        assert sum(counts) == 1536 and all(c % FFN_ALIGN == 0 and c > 0 for c in counts)
        assert max(counts) - min(counts) <= FFN_ALIGN
    skewed = ffn_counts(8192, [2.0, 1.0, 1.0])
    assert skewed == [4096, 2048, 2048]
    assert ffn_counts(160, [1.0] * 3) == [54, 53, 53]   # too narrow: by column, even
    assert ffn_counts(100, [1.0, 1.0]) == [50, 50]      # not a multiple of 32
