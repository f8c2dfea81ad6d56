"""Random-weight Hugging Face checkpoints with the exact shapes of real models.

For measuring speed and memory at real widths without downloading anything. Tensors are
written one safetensors file per layer (plus one for the embeddings), with an index, so the
largest thing in memory is one layer. Weights are drawn N(0, 1/fan_in) (norms near 1) so
activations keep their scale through the layers and logits are far from flat: greedy tokens
do not hinge on rounding.
"""
from __future__ import annotations

import json
import os

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from mpitpi.errors import MpitpiError
from mpitpi.weights import STORAGE

_LLAMA3_ROPE = {"rope_type": "llama3", "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}

# Public config.json values of each model (shapes only; the weights here are random).
SHAPES = {
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                         max_position_embeddings=8192, rope_theta=100000.0,
                         tie_word_embeddings=True, rms_norm_eps=1e-5),
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                         max_position_embeddings=131072, rope_theta=500000.0,
                         rope_scaling={**_LLAMA3_ROPE, "factor": 32.0},
                         tie_word_embeddings=True, rms_norm_eps=1e-5, head_dim=64),
    "llama-3.1-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                         max_position_embeddings=131072, rope_theta=500000.0,
                         rope_scaling={**_LLAMA3_ROPE, "factor": 8.0},
                         tie_word_embeddings=False, rms_norm_eps=1e-5),
    "llama-2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
                       max_position_embeddings=4096, rope_theta=10000.0,
                       tie_word_embeddings=False, rms_norm_eps=1e-5),
    "llama-2-70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                        num_attention_heads=64, num_key_value_heads=8, vocab_size=32000,
                        max_position_embeddings=4096, rope_theta=10000.0,
                        tie_word_embeddings=False, rms_norm_eps=1e-5),
}


def _weight(gen: torch.Generator, shape: tuple[int, ...], dtype) -> torch.Tensor:
    if len(shape) == 1:
        return (1.0 + 0.1 * torch.randn(shape, generator=gen)).to(dtype)
    w = torch.randn(shape, generator=gen)
    w *= shape[-1] ** -0.5
    return w.to(dtype)


def synth(shape: str, out: str, layers: int | None = None, dtype: str = "bf16",
          seed: int = 0, progress: bool = True) -> dict:
    """Write the checkpoint into the new (or empty) folder ``out``; returns its config."""
    if shape not in SHAPES:
        raise MpitpiError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}.")
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise MpitpiError(f"--out {out!r} exists and is not an empty folder; nothing is "
                          f"overwritten. Fix: choose a new folder.")
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
           "bos_token_id": 1, "eos_token_id": 2,
           "torch_dtype": str(STORAGE[dtype]).removeprefix("torch."), **SHAPES[shape]}
    if layers is not None:
        if layers < 1:
            raise MpitpiError(f"--layers must be at least 1, got {layers}.")
        cfg["num_hidden_layers"] = layers
    d, f, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    hd = cfg.get("head_dim") or d // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    dt = STORAGE[dtype]
    gen = torch.Generator().manual_seed(seed)
    os.makedirs(out, exist_ok=True)
    n = cfg["num_hidden_layers"]
    weight_map = {}

    def write(filename: str, tensors: dict) -> None:
        save_file(tensors, os.path.join(out, filename), metadata={"format": "pt"})
        weight_map.update({k: filename for k in tensors})

    for i in tqdm(range(-1, n), desc="synth", unit="layer", disable=not progress):
        if i < 0:
            top = {"model.embed_tokens.weight": _weight(gen, (v, d), dt),
                   "model.norm.weight": _weight(gen, (d,), dt)}
            if not cfg["tie_word_embeddings"]:
                top["lm_head.weight"] = _weight(gen, (v, d), dt)
            write("model-embed.safetensors", top)
            continue
        p = f"model.layers.{i}."
        write(f"model-layer{i:03d}.safetensors", {
            p + "self_attn.q_proj.weight": _weight(gen, (q, d), dt),
            p + "self_attn.k_proj.weight": _weight(gen, (kv, d), dt),
            p + "self_attn.v_proj.weight": _weight(gen, (kv, d), dt),
            p + "self_attn.o_proj.weight": _weight(gen, (d, q), dt),
            p + "mlp.gate_proj.weight": _weight(gen, (f, d), dt),
            p + "mlp.up_proj.weight": _weight(gen, (f, d), dt),
            p + "mlp.down_proj.weight": _weight(gen, (d, f), dt),
            p + "input_layernorm.weight": _weight(gen, (d,), dt),
            p + "post_attention_layernorm.weight": _weight(gen, (d,), dt)})
    with open(os.path.join(out, "model.safetensors.index.json"), "w") as fh:
        json.dump({"metadata": {}, "weight_map": weight_map}, fh, indent=1)
    with open(os.path.join(out, "config.json"), "w") as fh:
        json.dump(cfg, fh, indent=1)
    return cfg
