"""Tiny random-initialised Hugging Face models, saved offline, and their reference outputs.

Weights are drawn with a larger spread than transformers' default so the logits are far
from flat: greedy tokens then do not hinge on float rounding.
"""
from __future__ import annotations

import os

import torch

BASE = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=8,
            num_key_value_heads=4, vocab_size=300, max_position_embeddings=256,
            rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
            bos_token_id=1, eos_token_id=2)

SHAPES = {
    "llama-gqa": dict(),
    "llama-mha": dict(num_key_value_heads=8),
    "llama-mqa": dict(num_key_value_heads=1),
    "llama-tied": dict(tie_word_embeddings=True),
    "llama3-rope": dict(rope_theta=500000.0, max_position_embeddings=512, rope_scaling=dict(
        rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=64)),
    "llama-odd": dict(hidden_size=72, num_attention_heads=6, num_key_value_heads=2,
                      intermediate_size=100, vocab_size=257, num_hidden_layers=3),
    "qwen2": dict(arch="qwen2", tie_word_embeddings=True),
    "mistral": dict(arch="mistral", sliding_window=8),
    "llama-deep": dict(num_hidden_layers=6, max_position_embeddings=4096),
    "llama-wide": dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=16,
                       num_attention_heads=8, num_key_value_heads=8, vocab_size=256),
    # int4 in coded tiles with rows after the last tile: on 3 ranks wqkv has (3 + 2) 40 =
    # 200 rows (12 tiles of 16 and 8 rows, or 25 tiles of 8), every width >= 4 blocks
    "llama-coded": dict(hidden_size=320, intermediate_size=256, num_attention_heads=8,
                        num_key_value_heads=2),
}


def make_model(name: str, seed: int = 0):
    """A random transformers model of shape ``name`` (see SHAPES), fp32, eval mode."""
    from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM,
                              Qwen2Config, Qwen2ForCausalLM)

    kw = {**BASE, **SHAPES[name]}
    arch = kw.pop("arch", "llama")
    cls_cfg, cls = {"llama": (LlamaConfig, LlamaForCausalLM),
                    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
                    "mistral": (MistralConfig, MistralForCausalLM)}[arch]
    torch.manual_seed(seed)
    model = cls(cls_cfg(**kw)).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif p.dim() == 1:   # biases
                p.copy_(0.1 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / p.shape[-1] ** 0.5)
    return model


def save_model(name: str, folder: str, seed: int = 0, shard_size: str | None = None):
    """Save ``make_model(name)`` as safetensors into ``folder``; returns the model."""
    model = make_model(name, seed)
    kw = {"max_shard_size": shard_size} if shard_size else {}
    model.save_pretrained(folder, safe_serialization=True, **kw)
    return model


@torch.no_grad()
def reference_logits(model, prompt: list[int], new_tokens: list[int]) -> torch.Tensor:
    """(len(new_tokens), vocab): row i = logits that chose new_tokens[i] (teacher-forced)."""
    ids = torch.tensor([prompt + new_tokens[:-1]])
    out = model(ids).logits[0]                        # (T, vocab)
    return out[len(prompt) - 1:]


def logits_vs_reference(model, prompt: list[int], new_tokens: list[int], ours):
    """ours: (n, vocab) logits that chose new_tokens -> (largest |difference| relative to the
    largest reference logit, (n,) bool: same top-1 as the reference at each step)."""
    expect = reference_logits(model, prompt, new_tokens).numpy()
    assert ours.shape == expect.shape
    rel = float(abs(ours - expect).max() / abs(expect).max())
    return rel, ours.argmax(-1) == expect.argmax(-1)


@torch.no_grad()
def reference_greedy(model, prompt: list[int], n: int) -> list[int]:
    ids = torch.tensor([prompt])
    out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                         eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def env() -> dict:
    e = dict(os.environ)
    e["HF_HUB_OFFLINE"] = "1"
    return e


def save_tokenizer(folder: str, vocab_size: int = 300) -> None:
    """Train a small byte-level BPE tokenizer.json (BOS id 1 added) into ``folder``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    text = ["the quick brown fox jumps over the lazy dog", "hello world, hello mpitpi",
            "tensor parallel inference on small devices", "ranks reduce their partial sums"]
    tok.train_from_iterator(text * 20, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.save(os.path.join(folder, "tokenizer.json"))
