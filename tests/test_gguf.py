"""The bundled SmolLM2-135M-Instruct GGUF: logits against transformers' own GGUF loader,
its tokenizer against transformers', and golden chat answers identical for N = 1 to 4."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import MPIEXEC, run_mpi
from mpitpi.checkpoint import resolve_model
from mpitpi.tokenizer import chat_messages, load_tokenizer

GOLDEN = [("What is the capital of France?", "Paris"),
          ("How many days are in a week?", "7"),
          ("What color is the sky on a clear day?", "blue")]


@pytest.fixture(scope="module")
def gguf_path():
    return resolve_model("smollm2-135m")


@pytest.fixture(scope="module")
def hf_gguf(gguf_path):
    from transformers import AutoModelForCausalLM
    folder, name = os.path.split(gguf_path)
    return AutoModelForCausalLM.from_pretrained(folder, gguf_file=name).eval()


@pytest.fixture(scope="module")
def tok(gguf_path):
    return load_tokenizer(gguf_path)


def test_tokenizer_matches_transformers(gguf_path, tok):
    from transformers import AutoTokenizer
    folder, name = os.path.split(gguf_path)
    ref = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    for text in ["Hello world!", "The year 2024 had 366 days.", "  spaces\tand\nnewlines  ",
                 "naïve café — ünïcödé 😀", "<|im_start|>user\nHi<|im_end|>"]:
        assert tok.encode(text, special=False) == ref(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(tok.encode(text)) == ref.decode(ref(text)["input_ids"],
                                                          skip_special_tokens=True)


def test_chat_template_renders_like_transformers(gguf_path, tok):
    from transformers import AutoTokenizer
    folder, name = os.path.split(gguf_path)
    ref = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    msgs = chat_messages("Hi there", system="Be brief.")
    expect = ref.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert tok.render_chat(msgs) == expect
    assert "<|im_start|>assistant" in tok.render_chat(chat_messages("Hi"))


@pytest.mark.parametrize("n", [2, 4])   # 3 KV heads: split 2/1, and one held by two ranks
def test_logits_match_transformers_gguf_loader(hf_gguf, tok, tmp_path, n):
    ids = tok.encode_chat(chat_messages(GOLDEN[0][0]))
    out = tmp_path / "logits.npy"
    r = run_mpi(n, ["generate", "--model", "smollm2-135m", "--dtype", "fp32", "--prompt-ids",
                    ",".join(map(str, ids)), "--max-tokens", "12", "--json",
                    "--logits-out", str(out)], timeout=300)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    ours = np.load(out)
    gen = res["token_ids"]
    with torch.no_grad():
        ref = hf_gguf(torch.tensor([ids + gen])).logits[0, len(ids) - 1:len(ids) - 1 +
                                                         ours.shape[0]].numpy()
    err = float(np.abs(ours - ref).max())
    assert err <= 1e-4, f"max abs logits difference {err}"
    assert gen == ref.argmax(-1)[:len(gen)].tolist()


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_half_precision_logits_stay_close(hf_gguf, tok, tmp_path, dtype):
    """Half-precision shards (fp16 is the GGUF default): logits near fp32, same top token."""
    ids = tok.encode_chat(chat_messages(GOLDEN[1][0]))
    out = tmp_path / "logits.npy"
    r = run_mpi(2, ["generate", "--model", "smollm2-135m", "--dtype", dtype, "--prompt-ids",
                    ",".join(map(str, ids)), "--max-tokens", "8", "--json",
                    "--logits-out", str(out)], timeout=300)
    assert r.returncode == 0, r.stderr
    gen = json.loads(r.stdout)["token_ids"]
    ours = np.load(out)
    with torch.no_grad():
        ref = hf_gguf(torch.tensor([ids + gen])).logits[0, len(ids) - 1:len(ids) - 1 +
                                                         ours.shape[0]].numpy()
    rel = np.abs(ours - ref).max() / np.abs(ref).max()
    assert rel < (0.02 if dtype == "fp16" else 0.05), rel
    assert (ours.argmax(-1) == ref.argmax(-1)).all()


def golden_texts(n: int, tmp_path, dtype: str | None = None) -> list[str]:
    """The answers to every golden question from one `generate --prompts-file` run on ``n``
    ranks (one batch: a row's numbers do not depend on its neighbours, tests/test_batch.py)."""
    prompts, out = tmp_path / f"golden-{n}.jsonl", tmp_path / f"answers-{n}.jsonl"
    prompts.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q}]}) + "\n"
                               for q, _ in GOLDEN))
    r = run_mpi(n, ["generate", "--model", "smollm2-135m", *(["--dtype", dtype] if dtype else []),
                    "--prompts-file", str(prompts), "--out", str(out), "--max-tokens", "32"],
                timeout=300)
    assert r.returncode == 0, r.stderr
    return [json.loads(line)["text"] for line in out.read_text().splitlines()]


def test_golden_answers_identical_for_every_world_size(tmp_path):
    """Float shards: the same text whatever the split (sums differ only in the last bits)."""
    texts = [golden_texts(n, tmp_path, "fp16") for n in (1, 2, 3, 4)]
    for (question, fact), text in zip(GOLDEN, texts[0]):
        assert fact in text, (question, text)
    assert texts == [texts[0]] * 4, texts


@pytest.mark.parametrize("n", [1, 3])
def test_golden_answers_right_in_the_default_int4(n, tmp_path):
    """The default storage of the Q4_1 file (int4, its own blocks): every golden answer
    right. Its decode rounds activations to int8, so a last-bit difference between splits can
    move a later word: the texts of different world sizes may differ (README, limits)."""
    for (question, fact), text in zip(GOLDEN, golden_texts(n, tmp_path)):
        assert fact in text, (question, text)


def test_chat_repl_multi_turn_reset_and_end_of_input():
    lines = ("What is the capital of France?\nAnd of Germany?\n/reset\n"
             "How many days are in a week?\n")
    p = subprocess.run([MPIEXEC, "-n", "2", sys.executable, "-m", "mpitpi", "chat", "--model",
                        "smollm2-135m", "--max-tokens", "24"], input=lines, text=True,
                       capture_output=True, timeout=300)
    assert p.returncode == 0, p.stderr
    answers = p.stdout.strip().splitlines()
    assert len(answers) == 3, p.stdout
    assert "Paris" in answers[0] and "Berlin" in answers[1] and "7" in answers[2]
    assert "(conversation reset)" in p.stderr


def test_generate_chat_with_system_message(tok):
    system = "You are a helpful AI assistant named SmolLM, trained by Hugging Face. Be brief."
    question = "What is the capital of France?"
    r = run_mpi(2, ["generate", "--model", "smollm2-135m", "--chat", "--system", system,
                    "--prompt", question, "--max-tokens", "24", "--json"], timeout=300)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["prompt_tokens"] == len(tok.encode_chat(chat_messages(question, system)))
    assert "Paris" in res["text"]
