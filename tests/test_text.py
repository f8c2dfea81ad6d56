"""Text in, text out: tokenizer, streaming, stop strings, sampling options."""
import json
import random

import pytest
import torch

from conftest import run_mpi
from mpitpi.sampling import Sampler, SamplingParams
from mpitpi.tokenizer import StreamText, load_tokenizer
from refmodels import reference_greedy


def test_prompt_text_streams_the_greedy_answer(textmodel):
    folder, hf = textmodel
    tok = load_tokenizer(f"{folder}/tokenizer.json")
    ids = tok.encode("hello world")
    assert ids[0] == 1
    r = run_mpi(2, ["generate", "--model", folder, "--prompt", "hello world", "--max-tokens",
                    "12", "--json"])
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["prompt_tokens"] == len(ids)
    ref = reference_greedy(hf, ids, 12)
    assert res["token_ids"] == ref[:len(res["token_ids"])]
    assert res["text"] == tok.decode(res["token_ids"])
    r2 = run_mpi(3, ["generate", "--model", folder, "--prompt", "hello world", "--max-tokens",
                     "12"])
    assert r2.returncode == 0, r2.stderr
    assert r2.stdout.rstrip("\n") == res["text"]     # streamed text == final text
    assert "ms/token" in r2.stderr


def test_stop_string_cuts_the_text(textmodel):
    folder, _ = textmodel
    full = json.loads(run_mpi(1, ["generate", "--model", folder, "--prompt", "the quick",
                                  "--max-tokens", "16", "--json"]).stdout)
    text = full["text"]
    assert len(text) > 6
    stop = text[3:6]
    r = run_mpi(2, ["generate", "--model", folder, "--prompt", "the quick", "--max-tokens",
                    "16", "--json", "--stop", stop])
    res = json.loads(r.stdout)
    assert res["text"] == text[:text.find(stop)]
    assert res["finish_reason"] == "stop"


def test_seeded_sampling_is_reproducible_across_world_sizes(textmodel):
    folder, _ = textmodel
    args = ["generate", "--model", folder, "--prompt", "hello", "--max-tokens", "10", "--json",
            "--temperature", "0.9", "--top-k", "40", "--top-p", "0.95", "--seed", "7"]
    a = json.loads(run_mpi(1, args).stdout)["token_ids"]
    b = json.loads(run_mpi(2, args).stdout)["token_ids"]
    assert a == b


def test_sampler_filters():
    logits = torch.tensor([5.0, 4.0, 1.0, 0.0, -1.0])
    greedy = Sampler(SamplingParams(temperature=0))
    assert greedy(logits, []) == 0
    top1 = Sampler(SamplingParams(temperature=1.0, top_k=1, seed=0))
    assert all(top1(logits, []) == 0 for _ in range(20))
    nucleus = Sampler(SamplingParams(temperature=1.0, top_p=0.5, seed=0))
    assert all(nucleus(logits, []) == 0 for _ in range(20))
    minp = Sampler(SamplingParams(temperature=1.0, min_p=0.2, seed=0))
    assert {minp(logits, []) for _ in range(200)} == {0, 1}
    pen = Sampler(SamplingParams(temperature=0, repeat_penalty=10.0))
    assert pen(logits, [0]) == 1
    with pytest.raises(Exception, match="top-p"):
        Sampler(SamplingParams(top_p=0))


def test_stream_text_holds_back_possible_stop_prefix():
    words = {1: "ab", 2: "c", 3: "de"}
    s = StreamText(lambda ids: "".join(words[i] for i in ids), stops=["cd"])
    out = s.push(1) + s.push(2)
    assert "c" not in out
    out += s.push(3)
    assert s.stopped and out + s.flush() == "ab"


def _metaspace_tokenizer():
    """A small SentencePiece-style tokenizer: words marked by a leading '▁', which the
    decoder turns into spaces and drops at the very start of a text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    text = ["the quick brown fox jumps over the lazy dog", "héllo wörld, ünïcode text",
            "tensor parallel inference on small devices"]
    tok.train_from_iterator(text * 20, trainers.BpeTrainer(vocab_size=200,
                                                           special_tokens=["<unk>"]))
    return lambda ids: tok.decode(ids), tok.get_vocab_size()


@pytest.mark.parametrize("kind", ["smollm2", "metaspace"])
def test_stream_text_decodes_short_windows_into_the_whole_text(kind):
    """Each token decodes a few ids, not all of them (it cost 380 us a token at 4000), and
    the deltas still add up to the text of every id, including characters split across
    byte tokens and ids in random order."""
    if kind == "smollm2":
        from mpitpi.checkpoint import resolve_model
        tok = load_tokenizer(resolve_model("smollm2-135m"))
        decode, n_vocab = tok.decode, tok.vocab_size
        text = open(__file__.replace("tests/test_text.py", "README.md")).read()[:3000]
        ids = tok.encode(text + " naïve café — 日本語 🙂 done")
    else:
        decode, n_vocab = _metaspace_tokenizer()
        ids = []
    rng = random.Random(5)
    for seq in (ids, [rng.randrange(n_vocab) for _ in range(600)]):
        if not seq:
            continue
        longest = []
        s = StreamText(lambda w: (longest.append(len(w)), decode(w))[1])
        out = "".join(s.push(t) for t in seq) + s.flush()
        assert out == s.text == decode(seq)
        assert max(longest) <= 16, max(longest)
