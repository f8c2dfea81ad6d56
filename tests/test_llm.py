"""The user-facing edges: the Python API (mpitpi.LLM), Hugging Face ids from the local cache,
environment-variable defaults and --log-level."""
import json
import os
import shutil
import sys
import textwrap

import pytest

from conftest import run_cmd, run_mpi
from mpitpi.errors import MpitpiError
from mpitpi.hub import resolve_id
from mpitpi.tokenizer import load_tokenizer
from refmodels import reference_greedy

TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<s>assistant:{% endif %}")


@pytest.fixture(scope="module")
def chatmodel(textmodel, tmp_path_factory):
    """The tokenizer model with a chat template beside it."""
    folder = str(tmp_path_factory.mktemp("chatmodel"))
    shutil.copytree(textmodel[0], folder, dirs_exist_ok=True)
    with open(os.path.join(folder, "chat_template.jinja"), "w") as f:
        f.write(TEMPLATE)
    return folder, textmodel[1]


SCRIPT = textwrap.dedent("""
    import json, sys
    import mpitpi
    from mpitpi.errors import MpitpiError
    llm = mpitpi.LLM(sys.argv[1], progress=False, max_batch=2)
    out = {"rank": llm.rank, "size": llm.world_size}
    out["one"] = llm.generate("hello world", max_tokens=6).token_ids
    out["many"] = [c.token_ids for c in llm.generate(["the quick", "hello world", "the lazy"],
                                                    max_tokens=5)]
    try:
        llm.generate("hello", max_tokens=0)
    except MpitpiError as e:
        out["error"] = str(e)
    try:
        llm.generate("hello", max_tokens=2, stop=5)
    except MpitpiError as e:
        out["error2"] = str(e)
    msgs = [{"role": "user", "content": "hello"}]
    first = llm.chat(msgs, max_tokens=4)
    msgs += [{"role": "assistant", "content": first.text}, {"role": "user", "content": "dog"}]
    out["cached"] = llm.chat(msgs, max_tokens=4).cached_tokens
    llm.close()
    with open(f"{sys.argv[2]}.{llm.rank}", "w") as f:
        json.dump(out, f)
""")


def test_python_api_alone_and_under_mpiexec(chatmodel, tmp_path):
    """Every rank returns the same completions, equal to transformers' greedy ones; a bad
    argument raises on every rank and the next call still works; chat turns reuse the cache."""
    folder, hf = chatmodel
    tok = load_tokenizer(f"{folder}/tokenizer.json")
    script = tmp_path / "use_llm.py"
    script.write_text(SCRIPT)
    alone = run_cmd([sys.executable, str(script), folder, str(tmp_path / "alone")], timeout=120)
    assert alone.returncode == 0, alone.stderr
    r = run_cmd([os.path.join(os.path.dirname(sys.executable), "mpiexec"), "-n", "2",
                 sys.executable, str(script), folder, str(tmp_path / "two")], timeout=120)
    assert r.returncode == 0, r.stderr
    outs = [json.loads((tmp_path / name).read_text()) for name in ("alone.0", "two.0", "two.1")]
    assert sorted((o["rank"], o["size"]) for o in outs) == [(0, 1), (0, 2), (1, 2)]
    for o in outs:
        assert o["one"] == reference_greedy(hf, tok.encode("hello world"), 6)
        assert o["many"] == [reference_greedy(hf, tok.encode(p), 5)
                             for p in ("the quick", "hello world", "the lazy")]
        assert "max_tokens" in o["error"] or "max-tokens" in o["error"]
        assert "stop must be" in o["error2"]
        assert o["cached"] > len(tok.encode("<s>user: hello\n"))
    assert "load rank" not in alone.stderr   # progress=False


def fake_hub(root, model_id: str, src: str) -> str:
    """``src`` laid out as huggingface_hub leaves a download: refs/main -> snapshots/HASH."""
    repo = os.path.join(root, "models--" + model_id.replace("/", "--"))
    os.makedirs(os.path.join(repo, "refs"))
    with open(os.path.join(repo, "refs", "main"), "w") as f:
        f.write("0123abcd")
    shutil.copytree(src, os.path.join(repo, "snapshots", "0123abcd"))
    return repo


def test_hub_id_from_the_local_cache(models, tmp_path, monkeypatch):
    folder, hf = models("llama-gqa")
    hub = tmp_path / "hub"
    repo = fake_hub(hub, "tiny-org/llama-gqa", folder)
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    assert resolve_id("tiny-org/llama-gqa") == os.path.join(repo, "snapshots", "0123abcd")
    with pytest.raises(MpitpiError, match="huggingface-cli download tiny-org/other"):
        resolve_id("tiny-org/other")
    r = run_mpi(2, ["generate", "--model", "tiny-org/llama-gqa", "--prompt-ids", "1,5,9",
                    "--max-tokens", "5", "--json"], env={"HF_HUB_CACHE": str(hub)})
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["token_ids"] == reference_greedy(hf, [1, 5, 9], 5)
    r = run_mpi(2, ["generate", "--model", "tiny-org/absent", "--prompt-ids", "1",
                    "--max-tokens", "2"], env={"HF_HUB_CACHE": str(hub)}, timeout=60)
    assert r.returncode == 2
    assert "huggingface-cli download " \
        "tiny-org/absent" in r.stderr and str(hub) in r.stderr


def test_environment_defaults_and_log_level(models, monkeypatch):
    from mpitpi.cli import build_parser
    monkeypatch.setenv("MPITPI_MODEL", "/some/model")
    monkeypatch.setenv("MPITPI_PORT", "8123")
    monkeypatch.setenv("MPITPI_API_KEY", "sekrit")
    monkeypatch.setenv("MPITPI_LOG_LEVEL", "warning")
    a = build_parser().parse_args(["serve"])
    assert (a.model, a.port, a.api_key, a.host, a.log_level) == (
        "/some/model", 8123, "sekrit", "127.0.0.1", "warning")
    a = build_parser().parse_args(["serve", "--port", "9", "--model", "m", "--log-level",
                                   "debug"])
    assert (a.model, a.port, a.log_level) == ("m", 9, "debug")
    monkeypatch.setenv("MPITPI_PORT", "eighty")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve"])
    folder, _ = models("llama-gqa")
    args = ["generate", "--prompt-ids", "1,2", "--max-tokens", "2"]
    quiet = run_mpi(1, ["--log-level", "warning", *args], env={"MPITPI_MODEL": folder})
    loud = run_mpi(1, [*args, "--log-level", "info"], env={"MPITPI_MODEL": folder})
    assert quiet.returncode == loud.returncode == 0, quiet.stderr + loud.stderr
    assert "load rank 0" in loud.stderr and "load rank 0" not in quiet.stderr
    assert quiet.stdout == loud.stdout


def test_sampling_options_of_the_api_on_the_command_line(models):
    folder, _ = models("llama-gqa")
    args = ["generate", "--model", folder, "--prompt-ids", "1,2", "--max-tokens", "3", "--json"]
    r = run_mpi(2, [*args, "--logit-bias", "42=100", "--presence-penalty", "0.5",
                    "--frequency-penalty", "0.5"])
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["token_ids"] == [42, 42, 42]
    r = run_mpi(2, [*args, "--logit-bias", "99999=1"], timeout=60)
    assert r.returncode == 2 and "outside the model's vocabulary" in r.stderr

