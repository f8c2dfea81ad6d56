"""Read a GGUF file lazily, under Hugging Face tensor names: dequantized to float32, or
with its quantized blocks carried over unchanged into int4/int8 storage (gguf_blocks.py).

GGUF stores each 2-D weight as rows of (possibly quantized) blocks along the columns, so a
row range, or a column range of whole blocks, is read and decoded on its own: a split never
holds more than one rank's slice of a tensor. llama.cpp's converter permutes the rows of Q
and K inside each head (for its rotary layout); reads undo that, so callers see the Hugging
Face layout.
"""
from __future__ import annotations

import hashlib
import mmap
import os

import numpy as np
import torch
from gguf.quants import GGML_QUANT_SIZES, dequantize

from mpitpi import gguf_blocks
from mpitpi.config import SUPPORTED_ARCHITECTURES, ModelArgs
from mpitpi.errors import MpitpiError
from mpitpi.gguf_file import GGUFFile
from mpitpi.quant import GGUF_GROUP, quantize_int8
from mpitpi.weights import Weight

DECODE_AT_ONCE = 1 << 20   # values per piece when rows are decoded to fp32

ARCHS = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
         "qwen2": "Qwen2ForCausalLM"}

# GGUF name -> Hugging Face name ({i} = layer)
_TOP = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight":
        "model.norm.weight", "output.weight": "lm_head.weight"}
_LAYER = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
          "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
          "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
          "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}


def hf_name(gguf_name: str) -> str | None:
    if gguf_name in _TOP:
        return _TOP[gguf_name]
    parts = gguf_name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in _LAYER:
        return f"model.layers.{parts[1]}.{_LAYER[parts[2]]}.{parts[3]}"
    return None


class GGUFCheckpoint:
    """A .gguf file: ModelArgs from its metadata, tensors by Hugging Face name."""

    def __init__(self, path: str):
        if not os.path.isfile(path):
            raise MpitpiError(f"model file {path!r} does not exist. Fix: pass an existing "
                              f".gguf file or a Hugging Face folder.")
        try:
            self.reader = GGUFFile(path)
        except Exception as e:
            raise MpitpiError(f"{path} is not a readable GGUF file ({e}). Fix: check the file "
                              f"(a GGUF file starts with the bytes 'GGUF'), or download it again.")
        self.folder = path   # what the manifest records as the model's path
        self.path = path
        self.tokenizer_path = path   # the tokenizer is in the metadata (tokenizer.py)
        self.tensors = {}
        for t in self.reader.tensors:
            name = hf_name(t.name)
            if name is not None:
                self.tensors[name] = t
        self.rope_freqs = next((t for t in self.reader.tensors if t.name == "rope_freqs.weight"),
                               None)
        self.args = self._args()
        self._check()

    def _args(self) -> ModelArgs:
        r = self.reader
        arch_name = r.field("general.architecture")
        if arch_name not in ARCHS:
            raise MpitpiError(f"unsupported GGUF architecture {arch_name!r} in {self.path}; "
                              f"supported: {', '.join(ARCHS)} (as "
                              f"{', '.join(SUPPORTED_ARCHITECTURES)}).")
        a = arch_name

        def need(key):
            v = r.field(f"{a}.{key}")
            if v is None:
                raise MpitpiError(f"{self.path}: GGUF metadata {a}.{key} is missing. Fix: "
                                  f"convert the model again with a current llama.cpp.")
            return v

        dim, n_heads = int(need("embedding_length")), int(need("attention.head_count"))
        n_kv = int(r.field(f"{a}.attention.head_count_kv", n_heads))
        head_dim = int(r.field(f"{a}.attention.key_length",
                                  dim // n_heads if n_heads > 0 else 0))
        tokens = r.field("tokenizer.ggml.tokens") or []
        vocab = int(r.field(f"{a}.vocab_size", len(tokens)) or
                    self.tensors["model.embed_tokens.weight"].shape[-1])
        scaling = None
        stype = r.field(f"{a}.rope.scaling.type")
        if stype == "linear":
            scaling = {"rope_type": "linear", "factor": float(need("rope.scaling.factor"))}
        elif stype not in (None, "none"):
            raise MpitpiError(f"{self.path}: rope scaling {stype!r} is not supported.")
        if self.rope_freqs is not None:
            factors = np.asarray(self.rope_freqs.data, dtype=np.float32).ravel().tolist()
            scaling = {"rope_type": "freq_factors", "factors": factors}
        eos = r.field("tokenizer.ggml.eos_token_id")
        eot = r.field("tokenizer.ggml.eot_token_id")
        eos_ids = sorted({int(x) for x in (eos, eot) if x is not None})
        qkv_bias = "model.layers.0.self_attn.q_proj.bias" in self.tensors
        return ModelArgs(
            architecture=ARCHS[a], dim=dim, n_layers=int(need("block_count")), n_heads=n_heads,
            n_kv_heads=n_kv, head_dim=head_dim, ffn_dim=int(need("feed_forward_length")),
            vocab_size=vocab, norm_eps=float(need("attention.layer_norm_rms_epsilon")),
            rope_theta=float(r.field(f"{a}.rope.freq_base", 10000.0)),
            max_seq_len=int(r.field(f"{a}.context_length", 2048)), rope_scaling=scaling,
            tie_embeddings="lm_head.weight" not in self.tensors, qkv_bias=qkv_bias,
            o_bias="model.layers.0.self_attn.o_proj.bias" in self.tensors,
            mlp_bias="model.layers.0.mlp.up_proj.bias" in self.tensors,
            bos_token_id=r.field("tokenizer.ggml.bos_token_id"),
            eos_token_ids=eos_ids).check(self.path)

    def _check(self) -> None:
        missing = [n for n in ("model.embed_tokens.weight", "model.norm.weight")
                   if n not in self.tensors]
        missing += [f"layer {i}" for i in range(self.args.n_layers)
                    if f"model.layers.{i}.self_attn.q_proj.weight" not in self.tensors]
        if missing:
            raise MpitpiError(f"{self.path} lacks tensors the metadata promises "
                              f"(first: {missing[0]}). Fix: download or convert it again.")
        for t in {t.tensor_type for t in self.tensors.values()}:
            try:
                block, size = GGML_QUANT_SIZES[t]
                dequantize(np.zeros((1, size), dtype=np.uint8), t)
            except Exception:
                raise MpitpiError(f"{self.path} holds tensors of type {t.name}, which mpitpi "
                                  f"cannot dequantize. Fix: convert the model to F16, Q8_0, "
                                  f"Q4_0, Q4_1, Q4_K or Q6_K.")

    def release(self) -> None:
        """Unmap the pages read so far (the file stays mapped): keeps a split's memory to
        the tensors in hand, not the whole file."""
        if hasattr(mmap, "MADV_DONTNEED"):
            self.reader.mm.madvise(mmap.MADV_DONTNEED)

    def has(self, name: str) -> bool:
        return name in self.tensors

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(int(x) for x in reversed(self.tensors[name].shape))

    def _unpermute(self, name: str, x: np.ndarray) -> np.ndarray:
        """Undo llama.cpp's per-head row permutation of Q and K (rows: whole heads)."""
        if self.args.architecture == "Qwen2ForCausalLM" or not (
                ".q_proj." in name or ".k_proj." in name):
            return x
        hd = self.args.head_dim
        rest = x.shape[1:]
        heads = x.shape[0] // hd
        # (heads, hd/2, 2, ...) -> (heads, 2, hd/2, ...): rotary pairs back to halves
        return x.reshape(heads, hd // 2, 2, *rest).swapaxes(1, 2).reshape(x.shape)

    def _dequant(self, name: str, data: np.ndarray) -> np.ndarray:
        t = self.tensors[name]
        return np.asarray(dequantize(np.asarray(data), t.tensor_type), dtype=np.float32)

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) (HF layout: output features), or elements of a 1-D tensor.
        Decoded DECODE_AT_ONCE values at a time into the result: a split of the vocabulary
        into fp32 holds the result and one small piece, not several whole-size temporaries."""
        data = self.tensors[name].data[start:stop]
        if data.ndim == 1:
            x = self._dequant(name, data).copy()
        else:
            cols = self.shape(name)[1]
            x = np.empty((len(data), cols), np.float32)
            step = max(1, DECODE_AT_ONCE // cols)
            for i in range(0, len(data), step):
                x[i:i + step] = self._dequant(name, data[i:i + step]).reshape(-1, cols)
        return torch.from_numpy(np.ascontiguousarray(self._unpermute(name, x)))

    def full(self, name: str) -> torch.Tensor:
        shape = self.shape(name)
        return self.rows(name, 0, shape[0]).reshape(shape)

    def _raw_cols(self, name: str, start: int, stop: int) -> tuple[np.ndarray, int, int]:
        """The stored blocks covering columns [start, stop) of every row, and where
        [start, stop) begins and ends inside them (in columns)."""
        t = self.tensors[name]
        if t.data.dtype != np.uint8:                  # F32 / F16: one column per element
            return t.data[:, start:stop], 0, stop - start
        cols, size = GGML_QUANT_SIZES[t.tensor_type]
        b0, b1 = start // cols, -(-stop // cols)
        return t.data[:, b0 * size:b1 * size], start - b0 * cols, stop - b0 * cols

    def cols(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Columns [start, stop), decoding only the blocks that hold them."""
        raw, a, b = self._raw_cols(name, start, stop)
        x = self._dequant(name, raw).reshape(raw.shape[0], -1)[:, a:b]
        return torch.from_numpy(np.ascontiguousarray(self._unpermute(name, x)))

    def _kept(self, name: str, raw: np.ndarray, a: int, b: int, dtype: str):
        """The blocks ``raw`` (columns [a, b) of them wanted) as a Weight in storage
        ``dtype`` when they carry over (gguf_blocks.py); else None."""
        kind = self.tensors[name].tensor_type.name
        if a % 32 or b % 32 or not (kind in gguf_blocks.INT4 and dtype == "int4" or
                                    kind in gguf_blocks.INT8 and dtype in ("int4", "int8")):
            return None
        parts = gguf_blocks.DECODE[kind](np.asarray(raw))
        per_byte = 2 if len(parts) == 3 else 1        # int4: two columns per byte
        wanted = [slice(a // per_byte, b // per_byte)] + [slice(a // 32, b // 32)] * 2
        tensors = [torch.from_numpy(np.ascontiguousarray(self._unpermute(name, p)[:, sl]))
                   for p, sl in zip(parts, wanted)]
        return Weight(tensors[0], tensors[1], None, tensors[2] if len(tensors) == 3 else None)

    def _finer(self, name: str, x: torch.Tensor, dtype: str):
        """int4 shards keep 5- and 6-bit source blocks (Q5_*, Q6_K) in int8, groups of 32:
        never less precise than the file."""
        kind = self.tensors[name].tensor_type.name
        if dtype == "int4" and kind[:2] in ("Q5", "Q6"):
            return Weight(*quantize_int8(x, GGUF_GROUP))
        return x

    def rows_as(self, name: str, start: int, stop: int, dtype: str) -> torch.Tensor | Weight:
        """Rows [start, stop) for shards of ``dtype``: the file's own blocks where they
        carry over into it (gguf_blocks.py), else ``rows``."""
        t = self.tensors[name]
        kept = self._kept(name, t.data[start:stop], 0, self.shape(name)[1], dtype)
        return kept if kept is not None else self._finer(name, self.rows(name, start, stop),
                                                         dtype)

    def cols_as(self, name: str, start: int, stop: int, dtype: str) -> torch.Tensor | Weight:
        """Columns [start, stop) for shards of ``dtype``, as ``rows_as``."""
        raw, a, b = self._raw_cols(name, start, stop)
        kept = self._kept(name, raw, a, b, dtype)
        return kept if kept is not None else self._finer(name, self.cols(name, start, stop),
                                                         dtype)

    def natural_dtype(self) -> str:
        """The storage that follows the file's bits: int4 for 4-bit (and smaller) layer
        weights, int8 for 5- to 8-bit ones, else the float type (fp16 for F16/BF16: the
        float with the fastest decode here)."""
        counts: dict[str, int] = {}
        for name, t in self.tensors.items():
            if ".layers." in name and len(t.shape) == 2:
                counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + int(t.n_elements)
        kind = max(counts, key=counts.get) if counts else "F16"
        if kind.startswith(("Q4", "Q3", "Q2", "IQ4", "IQ3", "IQ2", "IQ1", "TQ")):
            return "int4"
        if kind.startswith(("Q5", "Q6", "Q8")):
            return "int8"
        return "fp32" if kind == "F32" else "fp16"

    def fingerprint(self) -> str:
        return gguf_fingerprint(self.path)


def gguf_fingerprint(path: str) -> str:
    """A hash of the file's size, its first 4 MiB (metadata) and its last 1 MiB."""
    h = hashlib.sha256()
    size = os.path.getsize(path)
    h.update(str(size).encode())
    with open(path, "rb") as f:
        h.update(f.read(1 << 22))
        f.seek(max(0, size - (1 << 20)))
        h.update(f.read())
    return h.hexdigest()[:16]
