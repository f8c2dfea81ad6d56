"""Random-weight Hugging Face checkpoints with the exact shapes of real models.

For measuring speed and memory at real widths without downloading anything. Tensors are
written one safetensors file per layer (plus one for the embeddings), with an index. Each
file is written as it is drawn, a block of rows at a time, so the largest thing in memory is
one block (16 M weights), not a layer: the 405B shape's 4.2 GB vocabulary matrices fit on a
small machine. Weights are drawn N(0, 1/fan_in) (norms near 1) so activations keep their
scale through the layers and logits are far from flat: greedy tokens do not hinge on
rounding. (Drawing by blocks gives the same numbers as drawing each tensor whole.)
"""
from __future__ import annotations

import json
import os

import torch
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
    "llama-3.1-405b": dict(hidden_size=16384, intermediate_size=53248, num_hidden_layers=126,
                           num_attention_heads=128, num_key_value_heads=8, vocab_size=128256,
                           max_position_embeddings=131072, rope_theta=500000.0,
                           rope_scaling={**_LLAMA3_ROPE, "factor": 8.0},
                           tie_word_embeddings=False, rms_norm_eps=1e-5),
}

_ST_NAMES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}
_BLOCK = 1 << 24   # weights drawn at a time


def synth_config(shape: str, layers: int | None = None, dtype: str = "bf16") -> dict:
    """The config.json ``synth`` writes for ``shape`` (with only ``layers`` layers)."""
    if shape not in SHAPES:
        raise MpitpiError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}.")
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
           "bos_token_id": 1, "eos_token_id": 2,
           "torch_dtype": str(STORAGE[dtype]).removeprefix("torch."), **SHAPES[shape]}
    if layers is not None:
        if layers < 1:
            raise MpitpiError(f"--layers must be at least 1, got {layers}.")
        cfg["num_hidden_layers"] = layers
    return cfg


def tensor_shapes(cfg: dict) -> dict[str, dict[str, tuple[int, ...]]]:
    """{file name: {tensor name: shape}} of the checkpoint of ``cfg``, in the order written
    (and drawn)."""
    d, f, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    hd = cfg.get("head_dim") or d // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    top = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,)}
    if not cfg["tie_word_embeddings"]:
        top["lm_head.weight"] = (v, d)
    files = {"model-embed.safetensors": top}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        files[f"model-layer{i:03d}.safetensors"] = {
            p + "self_attn.q_proj.weight": (q, d), p + "self_attn.k_proj.weight": (kv, d),
            p + "self_attn.v_proj.weight": (kv, d), p + "self_attn.o_proj.weight": (d, q),
            p + "mlp.gate_proj.weight": (f, d), p + "mlp.up_proj.weight": (f, d),
            p + "mlp.down_proj.weight": (d, f), p + "input_layernorm.weight": (d,),
            p + "post_attention_layernorm.weight": (d,)}
    return files


def _blocks(gen: torch.Generator, shape: tuple[int, ...], dtype):
    """The random tensor of ``shape`` in ``dtype``, as blocks of whole rows (row-major)."""
    if len(shape) == 1:
        yield (1.0 + 0.1 * torch.randn(shape, generator=gen)).to(dtype)
        return
    rows, cols = shape
    step = max(1, _BLOCK // cols)
    for r in range(0, rows, step):
        w = torch.randn(min(step, rows - r), cols, generator=gen)
        w *= cols ** -0.5
        yield w.to(dtype)


def _write_file(path: str, tensors: dict[str, tuple[int, ...]], gen: torch.Generator,
                dtype) -> None:
    """A safetensors file of random ``tensors`` (name: shape), drawn block by block."""
    size = torch.finfo(dtype).bits // 8
    header, offset = {}, 0
    for name, shape in tensors.items():
        n = size
        for dim in shape:
            n *= dim
        header[name] = {"dtype": _ST_NAMES[dtype], "shape": list(shape),
                        "data_offsets": [offset, offset + n]}
        offset += n
    header["__metadata__"] = {"format": "pt"}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as fh:
        fh.write(len(text).to_bytes(8, "little"))
        fh.write(text)
        for shape in tensors.values():
            for block in _blocks(gen, shape, dtype):
                fh.write(block.contiguous().view(torch.uint8).numpy())


def synth(shape: str, out: str, layers: int | None = None, dtype: str = "bf16",
          seed: int = 0, progress: bool = True) -> dict:
    """Write the checkpoint into the new (or empty) folder ``out``; returns its config."""
    cfg = synth_config(shape, layers, dtype)
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise MpitpiError(f"--out {out!r} exists and is not an empty folder; nothing is "
                          f"overwritten. Fix: choose a new folder.")
    dt = STORAGE[dtype]
    gen = torch.Generator().manual_seed(seed)
    os.makedirs(out, exist_ok=True)
    weight_map = {}
    files = tensor_shapes(cfg)
    for filename, tensors in tqdm(files.items(), desc="synth", unit="file",
                                  disable=not progress):
        _write_file(os.path.join(out, filename), tensors, gen, dt)
        weight_map.update({k: filename for k in tensors})
    with open(os.path.join(out, "model.safetensors.index.json"), "w") as fh:
        json.dump({"metadata": {}, "weight_map": weight_map}, fh, indent=1)
    with open(os.path.join(out, "config.json"), "w") as fh:
        json.dump(cfg, fh, indent=1)
    return cfg
