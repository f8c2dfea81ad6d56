"""Several sequences per forward pass, prefix reuse and drafted tokens, in one process (world
size 1): each row of a batch gets the numbers it would get alone, a prompt's numbers do not
depend on its chunks or on a cached prefix, drafts never change greedy text, and the draft
acceptance rule keeps the sampling distribution."""
import numpy as np
import pytest
import torch

from mpitpi import kernels
from mpitpi.batch import Batch, Pass
from mpitpi.checkpoint import open_checkpoint
from mpitpi.comm import Comm
from mpitpi.draft import ModelDrafter, lookup
from mpitpi.loader import open_rank
from mpitpi.model import Segment, Transformer, default_kv_dtype
from mpitpi.sampling import Sampler, SamplingParams
from mpitpi.session import Session
from mpitpi.shards import write_shards

needs_kernels = pytest.mark.skipif(not kernels.available(), reason="no C compiler")


def test_pass_survives_its_encoding():
    p = Pass([Segment(3, 17, torch.tensor([5, 6, 7]), 2, False),
              Segment(0, 0, torch.arange(200), 1, True)], drops=[1, 4],
             copies=[(2, 5, 30), (0, 1, 7)], full=True)
    q = Pass.decode(p.encode())
    assert (q.drops, q.copies, q.full) == ([1, 4], [(2, 5, 30), (0, 1, 7)], True)
    for a, b in zip(p.segs, q.segs):
        assert (a.slot, a.start, a.n_out, a.prompt) == (b.slot, b.start, b.n_out, b.prompt)
        assert torch.equal(a.tokens, b.tokens)


def test_lookup_continues_the_latest_earlier_occurrence():
    h = [1, 2, 3, 9, 9, 1, 2, 3, 4, 5, 6, 7, 1, 2, 3]
    assert lookup(h, 3) == [4, 5, 6]          # the later "1 2 3" wins
    assert lookup(h, 10) == [4, 5, 6, 7, 1, 2, 3]
    assert lookup([5, 6, 7, 8], 4) == []      # nothing recurs
    assert lookup([7, 1, 2, 7], 2) == [1, 2]  # a 1-gram when no longer suffix recurs
    assert lookup(h, 0) == []


@pytest.mark.parametrize("params", [SamplingParams(temperature=1.0),
                                    SamplingParams(temperature=0.7, top_k=3)])
def test_a_draft_leaves_the_sampled_distribution_unchanged(params):
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0])
    p = Sampler(params).distribution(logits)
    p = (p / p.sum()).numpy()
    n = 40000
    for draft in (0, 3):   # the likeliest token, and one top-k may drop
        s = Sampler(SamplingParams(**{**params.__dict__, "seed": 7}))
        counts = np.bincount([s(logits, [], draft) for _ in range(n)], minlength=5) / n
        assert np.abs(counts - p).max() < 0.012, (draft, counts, p)


def _model(folder, dtype):
    """One rank's model with the KV cache the product gives these weights (fp16 but for
    fp32 weights)."""
    args, plan, top, layers = open_rank(folder, 0, 1, None)
    return Transformer(args, plan, 0, top, layers, kv_dtype=default_kv_dtype(dtype))


@pytest.fixture(scope="module", params=["fp32", "fp16", "int8", "int4"])
def shards(models, tmp_path_factory, request):
    folder, _ = models("llama-gqa")
    out = str(tmp_path_factory.mktemp(f"batch_{request.param}"))
    write_shards(open_checkpoint(folder), out, 1, None, request.param, progress=False)
    return out, request.param


@needs_kernels
def test_rows_of_a_batch_get_the_numbers_they_get_alone(shards):
    model = _model(*shards)
    prompts = [[1, 17, 42, 5, 99], [3, 8, 2], [60, 61, 62, 63, 64, 65, 66]]
    for slot, p in enumerate(prompts):
        model.forward_batch([Segment(slot, 0, torch.tensor(p))])
    nxt = [[7], [9, 10, 11], [12]]   # the middle one: a token and two guesses after it
    alone = [model.forward_batch([Segment(s, len(p), torch.tensor(t), len(t), False)])
             for s, (p, t) in enumerate(zip(prompts, nxt))]
    together = model.forward_batch([Segment(s, len(p), torch.tensor(t), len(t), False)
                                    for s, (p, t) in enumerate(zip(prompts, nxt))])
    assert torch.equal(torch.cat(alone), together)


@needs_kernels
def test_a_prompt_gives_the_same_numbers_whole_in_chunks_or_after_a_cached_prefix(shards):
    """Bit for bit, every dtype: a prompt row's products take one path whatever the chunk
    (choices.py), and its attention runs row by row in C."""
    model = _model(*shards)
    prompt = torch.tensor([1, 17, 42, 5, 99, 23, 7, 64, 11, 3, 150, 8, 31, 12])
    whole = model.forward_batch([Segment(0, 0, prompt, 4)])
    model.forward_batch([Segment(1, 0, prompt[:5], 0)])
    model.forward_batch([Segment(1, 5, prompt[5:9], 0)])
    chunks = model.forward_batch([Segment(1, 9, prompt[9:], 4)])
    model.forward_batch([Segment(2, 0, prompt[:13], 0)])
    last = model.forward_batch([Segment(2, 13, prompt[13:], 1)])   # one prompt row
    assert torch.equal(whole, chunks) and torch.equal(whole[-1:], last)
    for i in range(model.n_layers):
        assert torch.equal(model.cache_k[0][i][:, :14], model.cache_k[1][i][:, :14])


def _greedy(model, prompt, n, draft, slots=1):
    s = Session(prompt, n)
    b = Batch(Comm(), model, slots, draft=draft)
    b.admit(s)
    while b.active:
        b.step()
    b.close()
    return s.result


@needs_kernels
def test_drafted_greedy_text_equals_plain_greedy_text(shards):
    model = _model(*shards)
    prompt = [5, 6, 7, 8, 9, 10, 5, 6, 7, 8, 9, 10, 5, 6, 7]
    plain = _greedy(model, prompt, 24, 0)
    drafted = _greedy(_model(*shards), prompt, 24, 6)
    assert drafted.token_ids == plain.token_ids
    assert drafted.drafted > 0 and drafted.forward_passes < plain.forward_passes


@needs_kernels
def test_a_second_request_reuses_the_cached_prefix_and_answers_the_same(shards):
    model = _model(*shards)
    fresh = _greedy(_model(*shards), [1, 2, 3, 4, 5, 6, 7, 8, 40, 41], 8, 0)
    first = _greedy(model, [1, 2, 3, 4, 5, 6, 7, 8, 30], 8, 0)
    again = _greedy(model, [1, 2, 3, 4, 5, 6, 7, 8, 40, 41], 8, 0)
    assert (first.cached_tokens, again.cached_tokens) == (0, 8)
    assert again.token_ids == fresh.token_ids


@needs_kernels
def test_sequences_decoded_together_match_each_alone(shards):
    prompts = [[1, 17, 42, 5, 99], [3, 8, 2], [60, 61, 62, 63, 64, 65, 66], [9]]
    alone = [_greedy(_model(*shards), p, 10, 0).token_ids for p in prompts]
    model = _model(*shards)
    sessions = [Session(p, 10) for p in prompts]
    b = Batch(Comm(), model, max_batch=3)
    waiting, passes = list(sessions), 0
    while waiting or b.active:
        while waiting and b.admit(waiting[0]):
            waiting.pop(0)
        b.step()
        passes += 1
    b.close()
    assert [s.result.token_ids for s in sessions] == alone
    assert passes < sum(s.result.forward_passes for s in sessions)   # rows shared passes


@needs_kernels
def test_concurrent_prompts_share_a_prefix_another_slot_holds(shards):
    """A prefix cached in one slot is copied into the slots of the sequences admitted
    beside it (each reports it as cached) and they answer as each does alone."""
    system = [1, 17, 42, 5, 99, 23, 7, 64, 11, 3]
    prompts = [system + [30 + i, 40 + i] for i in range(3)]
    alone = [_greedy(_model(*shards), p, 8, 0).token_ids for p in prompts]
    model = _model(*shards)
    b = Batch(Comm(), model, max_batch=4)
    warm = Session(system + [2], 2)
    b.admit(warm)
    while b.active:
        b.step()
    sessions = [Session(p, 8) for p in prompts]
    assert all(b.admit(s) for s in sessions)
    while b.active:
        b.step()
    b.close()
    assert [s.result.cached_tokens for s in sessions] == [len(system)] * 3
    assert [s.result.token_ids for s in sessions] == alone


@needs_kernels
def test_prompts_admitted_together_compute_their_shared_prefix_once(shards):
    """Prompts arriving together with a common start (a system prompt): the later ones wait
    a pass, copy it from the first and compute only their own rows; same answers as alone."""
    system = list(range(20, 36))
    prompts = [system + [50 + i, 60 + i, 70 + i] for i in range(3)]
    alone = [_greedy(_model(*shards), p, 6, 0).token_ids for p in prompts]
    b = Batch(Comm(), _model(*shards), max_batch=3)
    sessions = [Session(p, 6) for p in prompts]
    assert all(b.admit(s) for s in sessions)
    while b.active:
        b.step()
    b.close()
    assert [s.result.cached_tokens for s in sessions] == [0, len(system), len(system)]
    assert [s.result.token_ids for s in sessions] == alone


def test_a_slot_copied_from_and_into_in_one_pass_keeps_a_true_record(models, tmp_path):
    """A slot whose old prefix is copied out in the same pass as a new one is copied in:
    the slot that received the old prefix is recorded as holding it (a wrong record once
    gave a later prompt another sequence's keys and values)."""
    folder, _ = models("llama-gqa")
    write_shards(open_checkpoint(folder), str(tmp_path / "s"), 1, None, "fp32", progress=False)
    model = _model(str(tmp_path / "s"), "fp32")
    b = Batch(Comm(), model, max_batch=4)
    x = [7] + list(range(100, 130))
    shared = [7] + list(range(130, 290))
    b.admit(Session(x, 2))
    b.step()                                        # x's prompt; x decodes
    b.admit(Session(shared + [5, 6, 9], 2))
    b.step()                                        # x ends: its slot idle, holding x
    b.admit(Session(shared + [8, 10, 11], 2))       # into x's old slot, waits on the first
    b.step()
    follow = Session(x + [20, 21, 22], 2)           # copies x out of that slot
    b.admit(follow)
    slot = next(q.slot for q in b.seqs if q.session is follow)
    while b.active:
        b.step()
    b.close()
    assert follow.result.cached_tokens == len(x)
    assert model.cached[slot][:len(x)] == x


def test_the_kv_budget_holds_a_request_back_until_memory_is_free(models, tmp_path):
    folder, _ = models("llama-gqa")
    write_shards(open_checkpoint(folder), str(tmp_path / "s"), 1, None, "fp32", progress=False)
    model = _model(str(tmp_path / "s"), "fp32")
    b = Batch(Comm(), model, max_batch=2, kv_budget=256)
    a, c = Session([1, 2, 3], 5), Session([4, 5, 6], 5)
    assert b.admit(a) and not b.admit(c)            # 256 positions: one sequence at a time
    assert not b.fits_ever(300) and b.fits_ever(200)
    while b.active:
        b.step()
    assert b.admit(c)                               # the idle slot's prefix is given up
    while b.active:
        b.step()
    b.close()
    assert len(c.result.token_ids) == 5 and b.drops == []


@needs_kernels
def test_sampled_text_keeps_its_distribution_with_a_draft_model(models, tmp_path):
    """Two-sample chi-square over the 8 outcomes of 3 tokens sampled with top-k 2, with and
    without a draft model (the same tiny model, so guesses are often kept and often not)."""
    folder, _ = models("llama-gqa")
    write_shards(open_checkpoint(folder), str(tmp_path / "s"), 1, None, "fp32", progress=False)
    model, small = _model(str(tmp_path / "s"), "fp32"), _model(str(tmp_path / "s"), "fp32")
    drafter = ModelDrafter(small)
    n, counts, kept = 800, [{}, {}], 0
    for i in range(n):
        for which in (0, 1):
            s = Session([1, 17, 42, 5], 3, Sampler(SamplingParams(temperature=1.5, top_k=2,
                                                                  seed=i * 2 + which)))
            b = Batch(Comm(), model, draft=2 * which, drafter=drafter if which else None)
            b.admit(s)
            while b.active:
                b.step()
            key = tuple(s.result.token_ids)
            counts[which][key] = counts[which].get(key, 0) + 1
            kept += s.result.accepted
    keys = sorted(set(counts[0]) | set(counts[1]))
    a = np.array([counts[0].get(k, 0) for k in keys], float)
    c = np.array([counts[1].get(k, 0) for k in keys], float)
    expect = (a + c) / 2
    chi2 = float((((a - expect) ** 2 + (c - expect) ** 2) / np.maximum(expect, 1)).sum())
    assert kept > n // 4                  # the rule was exercised both ways
    assert chi2 < 24.3, (chi2, keys, a, c)   # df = 7: p = 0.001
