"""`mpitpi perplexity`: the windows, the cross-rank log-softmax against transformers, the
dtypes of the bundled GGUF against fp32, and the errors of a bad --file."""
import json
import math
import time

import pytest
import torch
import torch.nn.functional as F

from conftest import run_mpi
from mpitpi.errors import MpitpiError
from mpitpi.perplexity import SHIPPED, added_bos, cut_windows, default_text
from mpitpi.tokenizer import load_tokenizer

TEXT = ("Tensor parallel inference splits every layer across the ranks. Each rank holds a "
        "slice of the heads, of the feed-forward columns and of the vocabulary; the ranks "
        "reduce their partial sums after attention and after the feed-forward block. ") * 6


def test_windows_drop_the_partial_tail_unless_alone():
    ids = list(range(10, 33))                                   # 23 text tokens
    w = cut_windows(ids, 8, 1, 256, 300)
    assert w.tolist() == [[1, *range(10, 17)], [1, *range(17, 24)], [1, *range(24, 31)]]
    assert cut_windows(ids, 8, None, 256, 300).tolist()[1] == list(range(18, 26))
    assert cut_windows(ids, 64, 1, 256, 300).tolist() == [[1, *ids]]   # the only window
    assert cut_windows(ids, 8, 1, 256, 300, max_windows=2).shape == (2, 8)
    for bad in ([[5], 4, None], [ids, 1, 1], [ids, 512, 1], [[400], 8, 1]):
        with pytest.raises(MpitpiError, match="Fix"):
            cut_windows(bad[0], bad[1], bad[2], 256, 300)


def test_default_text_is_the_repository_docs_and_the_package_ships_a_copy():
    text, source = default_text()
    assert source == "README.md + docs/*.md" and "# mpitpi" in text and len(text) > 10_000
    with open(SHIPPED, encoding="utf-8") as f:
        assert "# mpitpi" in f.read()


def reference_perplexity(hf, windows: list[list[int]]) -> float:
    """transformers' own: each window from scratch, every token after the first scored."""
    nll, n = 0.0, 0
    with torch.no_grad():
        for w in windows:
            ids = torch.tensor(w)
            logits = hf(ids[None]).logits[0, :-1].double()      # (T-1, vocab)
            nll += float(F.cross_entropy(logits, ids[1:], reduction="sum"))
            n += len(w) - 1
    return math.exp(nll / n)


@pytest.mark.parametrize("n", [1, 3])
def test_fp32_perplexity_equals_transformers(textmodel, tmp_path, n):
    folder, hf = textmodel
    text = tmp_path / "text.txt"
    text.write_text(TEXT, encoding="utf-8")
    tok = load_tokenizer(f"{folder}/tokenizer.json")
    ids = tok.encode(TEXT, special=False)
    assert added_bos(tok) == 1 and len(ids) > 3 * 199      # 3 windows of two chunks each
    saved = tmp_path / "windows.json"
    r = run_mpi(n, ["perplexity", "--model", folder, "--file", str(text),
                    "--ctx", "200", "--dtype", "fp32", "--json", "--save-windows", str(saved)],
                timeout=240)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    expect = [[1, *ids[i * 199:(i + 1) * 199]] for i in range(len(ids) // 199)]
    assert json.loads(saved.read_text())["windows"] == expect
    assert (res["windows"], res["tokens"], res["ctx"], res["dtype"]) == \
        (len(expect), 199 * len(expect), 200, "fp32")
    ref = reference_perplexity(hf, expect)
    assert abs(res["perplexity"] - ref) / ref < 1e-4, (res["perplexity"], ref)


def smollm(dtype: str) -> dict:
    r = run_mpi(2 if dtype == "int8" else 1,
                ["perplexity", "--model", "smollm2-135m", "--dtype", dtype, "--ctx", "128",
                 "--max-windows", "3", "--json"], timeout=400)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_smollm2_int4_and_int8_within_one_percent_of_fp32():
    fp32, int4, int8 = smollm("fp32"), smollm("int4"), smollm("int8")
    assert fp32["tokens"] == int4["tokens"] == int8["tokens"] == 3 * 127   # no BOS: 128 text tokens
    for q in (int4, int8):
        assert abs(q["perplexity"] / fp32["perplexity"] - 1) < 0.01, (q, fp32)


@pytest.mark.parametrize("content,problem", [(None, "cannot read"), (b" \n", "is empty"),
                                             (b"caf\xe9", "is not UTF-8")])
def test_a_bad_file_is_a_clear_error_on_every_rank(textmodel, tmp_path, content, problem):
    folder, _ = textmodel
    path = tmp_path / "eval.txt"
    if content is not None:
        path.write_bytes(content)
    t0 = time.monotonic()
    r = run_mpi(2, ["perplexity", "--model", folder, "--file", str(path)], timeout=60)
    assert r.returncode == 2, r.stderr
    assert problem in r.stderr and "--file" in r.stderr and "Fix:" in r.stderr
    assert r.stderr.count("mpitpi: error") == 1                  # said once, by rank 0
    assert time.monotonic() - t0 < 30                            # before any model is loaded
