"""ModelArgs: the shape of a Llama-family model, read from a checkpoint's config.

One dataclass describes every supported architecture (Llama 2/3/3.1/3.2, Mistral, Qwen2);
the differences between them are fields (biases, rope scaling, tied embeddings, sliding
window), not subclasses.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field

from mpitpi.errors import MpitpiError

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclass
class ModelArgs:
    architecture: str
    dim: int                      # hidden size
    n_layers: int
    n_heads: int                  # query heads
    n_kv_heads: int               # key/value heads (== n_heads: MHA, 1: MQA, else GQA)
    head_dim: int
    ffn_dim: int                  # MLP intermediate size
    vocab_size: int
    norm_eps: float
    rope_theta: float
    max_seq_len: int              # context length (max_position_embeddings)
    rope_scaling: dict | None = None   # {"rope_type": "llama3"|"linear", ...}
    tie_embeddings: bool = False
    qkv_bias: bool = False        # Qwen2, Llama with attention_bias
    o_bias: bool = False          # Llama with attention_bias
    mlp_bias: bool = False        # Llama with mlp_bias
    sliding_window: int | None = None  # Mistral: keys older than this many positions are masked
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)

    @property
    def group_size(self) -> int:
        """Query heads per KV head."""
        return self.n_heads // self.n_kv_heads

    def check(self, source: str) -> "ModelArgs":
        """Refuse shapes no model has (zero widths, heads not grouping); returns self.

        ``source`` names where the values came from (a config.json, a GGUF file, a manifest).
        """
        sizes = {"hidden size": self.dim, "layers": self.n_layers, "heads": self.n_heads,
                 "KV heads": self.n_kv_heads, "head dim": self.head_dim,
                 "FFN width": self.ffn_dim, "vocabulary": self.vocab_size,
                 "context length": self.max_seq_len}
        for what, v in sizes.items():
            if not (isinstance(v, int) and not isinstance(v, bool) and v > 0):
                raise MpitpiError(f"{source}: the model's {what} is {v!r}; it must be a "
                                  f"positive integer. Fix: use the model's original files.")
        if self.n_heads % self.n_kv_heads:
            raise MpitpiError(f"{source}: {self.n_heads} heads do not group evenly over "
                              f"{self.n_kv_heads} KV heads. Fix: use the model's original files.")
        for what, v in (("norm epsilon", self.norm_eps), ("rope theta", self.rope_theta)):
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise MpitpiError(f"{source}: the model's {what} is {v!r}; it must be a "
                                  f"positive number. Fix: use the model's original files.")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelArgs":
        return cls(**d)


def _require(cfg: dict, key: str, path: str):
    if key not in cfg or cfg[key] is None:
        raise MpitpiError(f"{path} has no '{key}' field; it is required for a "
                          f"{cfg.get('architectures', ['Llama'])[0]} model. Fix: use the "
                          f"config.json that came with the checkpoint.")
    return cfg[key]


def _rope(cfg: dict) -> tuple[float, dict | None]:
    """Rope theta and scaling, from `rope_parameters` (new) or `rope_theta`/`rope_scaling` (old)."""
    params = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or {}
    merged = {**scaling, **params}
    theta = float(merged.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    rope_type = merged.get("rope_type", merged.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise MpitpiError(f"rope scaling type '{rope_type}' is not supported; supported: "
                          f"{', '.join(SUPPORTED_ROPE_TYPES)}.")
    if rope_type == "default":
        return theta, None
    out = {k: v for k, v in merged.items() if k not in ("rope_theta", "type")}
    out["rope_type"] = rope_type
    return theta, out


def _eos_ids(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def args_from_hf_config(cfg: dict, path: str = "config.json") -> ModelArgs:
    """Build ModelArgs from a Hugging Face config.json dict (plus generation_config eos ids)."""
    archs = cfg.get("architectures") or []
    arch = archs[0] if archs else None
    if arch not in SUPPORTED_ARCHITECTURES:
        raise MpitpiError(f"unsupported architecture {arch!r} in {path}; supported: "
                          f"{', '.join(SUPPORTED_ARCHITECTURES)}.")
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise MpitpiError(f"{path}: hidden_act {act!r} is not supported (only 'silu').")
    dim = int(_require(cfg, "hidden_size", path))
    n_heads = int(_require(cfg, "num_attention_heads", path))
    n_kv = int(cfg.get("num_key_value_heads") or n_heads)
    head_dim = cfg.get("head_dim") or (dim // n_heads if n_heads > 0 else 0)
    theta, scaling = _rope(cfg)
    sliding = None
    if arch == "MistralForCausalLM":
        sliding = cfg.get("sliding_window")
    elif arch == "Qwen2ForCausalLM" and cfg.get("use_sliding_window"):
        raise MpitpiError(f"{path}: Qwen2 with use_sliding_window=true is not supported.")
    attention_bias = bool(cfg.get("attention_bias", False))
    return ModelArgs(
        architecture=arch,
        dim=dim,
        n_layers=int(_require(cfg, "num_hidden_layers", path)),
        n_heads=n_heads,
        n_kv_heads=n_kv,
        head_dim=int(head_dim),
        ffn_dim=int(_require(cfg, "intermediate_size", path)),
        vocab_size=int(_require(cfg, "vocab_size", path)),
        norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        max_seq_len=int(cfg.get("max_position_embeddings", 2048)),
        rope_scaling=scaling,
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        qkv_bias=attention_bias or arch == "Qwen2ForCausalLM",
        o_bias=attention_bias,
        mlp_bias=bool(cfg.get("mlp_bias", False)),
        sliding_window=int(sliding) if sliding else None,
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=_eos_ids(cfg.get("eos_token_id")),
    ).check(path)


def load_hf_config(folder: str) -> ModelArgs:
    """Read config.json (and generation_config.json's eos ids, if present) from an HF folder."""
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise MpitpiError(f"no config.json in {folder}: a Hugging Face model folder holds "
                          f"config.json and *.safetensors. Fix: pass the folder that has them.")
    try:
        with open(path) as f:
            cfg = json.load(f)
    except (OSError, ValueError) as e:
        raise MpitpiError(f"cannot read {path}: {e}. Fix: restore the checkpoint's config.json.")
    args = args_from_hf_config(cfg, path)
    gen_path = os.path.join(folder, "generation_config.json")
    if os.path.isfile(gen_path):
        try:
            with open(gen_path) as f:
                gen = json.load(f)
            if gen.get("eos_token_id") is not None:
                args.eos_token_ids = _eos_ids(gen["eos_token_id"])
        except (OSError, ValueError):
            pass  # generation_config is optional; config.json's eos id stands
    return args
