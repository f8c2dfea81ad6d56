"""`mpitpi synth`'s shape table: configs checked without writing any weights (the 405B shape
alone would be 15 GB for one layer), and a tiny checkpoint read back by the splitter."""
import json

import pytest

from mpitpi.checkpoint import open_checkpoint
from mpitpi.config import load_hf_config
from mpitpi.errors import MpitpiError
from mpitpi.synth import synth, synth_config, tensor_shapes


def test_llama_3_1_405b_config(tmp_path):
    cfg = synth_config("llama-3.1-405b", layers=1)
    assert cfg["num_hidden_layers"] == 1
    assert synth_config("llama-3.1-405b")["num_hidden_layers"] == 126
    assert (cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]) == \
        (16384, 53248, 128256)
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"]) == (128, 8)
    assert cfg["tie_word_embeddings"] is False
    assert cfg["rope_theta"] == 500000.0 and cfg["rms_norm_eps"] == 1e-5
    assert cfg["max_position_embeddings"] == 131072
    assert cfg["rope_scaling"] == {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0,
                                   "original_max_position_embeddings": 8192}
    # what mpitpi reads from it: head_dim 128, GQA groups of 16
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    args = load_hf_config(str(tmp_path))
    assert (args.dim, args.n_layers, args.n_heads, args.n_kv_heads, args.head_dim) == \
        (16384, 1, 128, 8, 128)
    assert (args.ffn_dim, args.vocab_size, args.tie_embeddings) == (53248, 128256, False)
    assert args.rope_scaling["factor"] == 8.0
    files = tensor_shapes(cfg)
    assert list(files) == ["model-embed.safetensors", "model-layer000.safetensors"]
    top, layer = files.values()
    assert top["model.embed_tokens.weight"] == top["lm_head.weight"] == (128256, 16384)
    assert layer["model.layers.0.self_attn.q_proj.weight"] == (16384, 16384)
    assert layer["model.layers.0.self_attn.k_proj.weight"] == (1024, 16384)
    assert layer["model.layers.0.mlp.down_proj.weight"] == (16384, 53248)
    params = sum(a * b for f in files.values() for s in f.values() if len(s) == 2 for a, b in [s])
    assert 2 * params / 1e9 == pytest.approx(14.8, abs=0.1)   # GB of bf16 for one layer


def test_unknown_shape_and_bad_layers():
    with pytest.raises(MpitpiError, match="unknown shape"):
        synth_config("llama-9-1t")
    with pytest.raises(MpitpiError, match="at least 1"):
        synth_config("llama-3.1-405b", layers=0)


def test_written_checkpoint_reads_back(tmp_path):
    out = tmp_path / "m"
    cfg = synth("smollm2-135m", str(out), layers=1, progress=False)
    ckpt = open_checkpoint(str(out))   # checks every tensor's shape against config.json
    assert ckpt.args.n_layers == 1 and cfg["num_hidden_layers"] == 1
    w = ckpt.full("model.layers.0.mlp.down_proj.weight").float()
    assert w.shape == (576, 1536) and 0.8 < float(w.std()) * 1536 ** 0.5 < 1.2


def test_column_slices_read_only_their_columns_and_match_the_whole(tmp_path):
    """A split cuts o_proj and down_proj by columns, one row's bytes at a time: every
    slice, empty and whole included, equals the slice of the whole tensor; a file cut
    short is refused."""
    import torch
    out = tmp_path / "m"
    synth("smollm2-135m", str(out), layers=1, dtype="bf16", progress=False)
    ckpt = open_checkpoint(str(out))
    for name in ("model.layers.0.mlp.down_proj.weight", "model.layers.0.self_attn.o_proj.weight"):
        whole = ckpt.full(name)
        for a, b in ((0, 64), (100, 333), (0, whole.shape[1]), (5, 5), (whole.shape[1] - 1,
                                                                           whole.shape[1])):
            got = ckpt.cols(name, a, b)
            assert got.dtype == whole.dtype == torch.bfloat16
            assert torch.equal(got, whole[:, a:b]), (name, a, b)
    name = "model.layers.0.mlp.down_proj.weight"
    path = out / ckpt.weight_map[name]
    path.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(MpitpiError, match="cut short|Fix"):
        open_checkpoint(str(out)).cols(name, 0, 64)
