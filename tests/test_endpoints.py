"""The server's endpoints beside the completions, across 2 ranks on a tiny model with an API
key: GET /v1/models/{id} (the official client's models.retrieve), POST /tokenize and
/detokenize (llama-server's shapes, against the tokenizer's own ids and text; bad input a
400 naming the field), GET /metrics (Prometheus text whose counters follow one completion,
every rank's all-reduce seconds included), and HEAD/OPTIONS/405 on the new routes."""
import os
import time

import pytest
from tokenizers import Tokenizer

from test_server import Server, scrape

KEY = "sesame"
AUTH = {"Authorization": f"Bearer {KEY}"}
ORIGIN = "http://localhost:3000"   # the server's --cors-origin
TEXT = "hello world, the quick brown fox ✓ é"


@pytest.fixture(scope="module")
def served(textmodel, tmp_path_factory):
    """(server, the model's own tokenizer); shards in a temporary cache, not ~/.cache."""
    folder, _ = textmodel
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MPITPI_CACHE", str(tmp_path_factory.mktemp("cache")))
        # a later --model replaces Server's own default one
        s = Server(2, ["--model", folder, "--name", "tiny", "--api-key", KEY,
                       "--cors-origin", ORIGIN])
    yield s, Tokenizer.from_file(os.path.join(folder, "tokenizer.json"))
    s.stop()


def post(s, path: str, body, headers=None):
    return s.request("POST", path, body, {**AUTH, **(headers or {})})


def test_models_retrieve_and_auth(served):
    s, _ = served
    from openai import NotFoundError
    m = s.client(KEY).models.retrieve("tiny")
    assert (m.id, m.object, m.owned_by) == ("tiny", "model", "mpitpi") and m.created > 0
    assert m.model_dump() == s.client(KEY).models.list().data[0].model_dump()
    with pytest.raises(NotFoundError) as e:
        s.client(KEY).models.retrieve("gpt-9")
    assert "gpt-9" in str(e.value) and "'tiny'" in str(e.value)
    for method, path in [("GET", "/v1/models/tiny"), ("GET", "/metrics"),
                         ("POST", "/tokenize"), ("POST", "/detokenize")]:
        status, err = s.request(method, path, {"content": "hi"} if method == "POST" else None)
        assert status == 401 and err["error"]["code"] == "invalid_api_key", (path, err)


def test_tokenize_and_detokenize_match_the_tokenizer(served):
    s, tok = served
    plain, special = tok.encode(TEXT, add_special_tokens=False).ids, tok.encode(TEXT).ids
    assert special == [1] + plain                       # the tokenizer adds BOS (id 1)
    assert post(s, "/tokenize", {"content": TEXT}) == (200, {"tokens": plain})
    assert post(s, "/tokenize", {"content": TEXT, "add_special": True}) == (
        200, {"tokens": special})
    assert post(s, "/detokenize", {"tokens": plain}) == (200, {"content": TEXT})
    assert post(s, "/detokenize", {"tokens": special}) == (
        200, {"content": tok.decode(special, skip_special_tokens=False)})
    assert post(s, "/tokenize", {"content": ""}) == (200, {"tokens": []})
    status, got = post(s, "/tokenize", {"content": TEXT, "with_pieces": True})
    assert status == 200 and [t["id"] for t in got["tokens"]] == plain
    pieces = [t["piece"] for t in got["tokens"]]
    assert any(isinstance(p, list) for p in pieces)     # the bytes of ✓, one token each
    assert b"".join(p.encode() if isinstance(p, str) else bytes(p) for p in pieces) == \
        TEXT.encode()


BAD = [
    ("/tokenize", {}, "content"),
    ("/tokenize", {"content": 5}, "content"),
    ("/tokenize", {"content": ["hi"]}, "content"),
    ("/tokenize", {"content": "hi", "add_special": "yes"}, "add_special"),
    ("/tokenize", {"content": "hi", "with_pieces": 1}, "with_pieces"),
    ("/tokenize", {"content": "hi", "parse_special": False}, "parse_special"),
    ("/detokenize", {}, "tokens"),
    ("/detokenize", {"tokens": "1,2"}, "tokens"),
    ("/detokenize", {"tokens": [1, "a"]}, "tokens"),
    ("/detokenize", {"tokens": [1, 300]}, "tokens"),        # the vocabulary is 0..299
    ("/detokenize", {"tokens": [-1]}, "tokens"),
    ("/detokenize", {"tokens": [True]}, "tokens"),
    ("/detokenize", {"tokens": [1.5]}, "tokens"),
]


@pytest.mark.parametrize("path,body,field", BAD, ids=[f"{p}-{b}" for p, b, _ in BAD])
def test_bad_token_requests_get_400_naming_the_field(served, path, body, field):
    status, err = post(served[0], path, body)
    assert status == 400 and err["error"]["param"] == field, err
    assert f"'{field}'" in err["error"]["message"]


def test_non_json_token_requests_get_415(served):
    status, err = post(served[0], "/tokenize", b"content=hi",
                       {"Content-Type": "application/x-www-form-urlencoded"})
    assert status == 415 and "application/json" in err["error"]["message"]


def test_metrics_follow_one_completion(served):
    s, _ = served
    before = scrape(s, AUTH)
    status, r = post(s, "/v1/completions", {"prompt": TEXT, "max_tokens": 8, "temperature": 0})
    assert status == 200, r
    usage, finish = r["usage"], r["choices"][0]["finish_reason"]
    deadline = time.monotonic() + 10   # rank 1's figure comes when the run of passes ends
    while True:
        after = scrape(s, AUTH)
        ranks = {r: after[("mpitpi_allreduce_seconds_total", (("rank", r),))] for r in "01"}
        if ranks["1"] > before.get(("mpitpi_allreduce_seconds_total", (("rank", "1"),)), 0):
            break
        assert time.monotonic() < deadline, ranks
        time.sleep(0.05)

    def grew(name, labels=()):
        return after[(name, labels)] - before.get((name, labels), 0)
    assert ranks["0"] > 0 and ranks["1"] > 0
    assert grew("mpitpi_generated_tokens_total") == usage["completion_tokens"]
    assert grew("mpitpi_prompt_tokens_total") == usage["prompt_tokens"]
    assert grew("mpitpi_time_to_first_token_seconds_count") == 1
    # a step per token after the first, and one for the end of text if it came
    assert grew("mpitpi_time_per_output_token_seconds_count") == (
        usage["completion_tokens"] - 1 + (finish == "stop"))
    assert grew("mpitpi_requests_total", (("code", "200"), ("endpoint", "/v1/completions"))) == 1
    assert after[("mpitpi_requests_waiting", ())] == 0
    assert after[("mpitpi_requests_running", ())] == 0
    assert after[("mpitpi_requests_total", (("code", "401"), ("endpoint", "/metrics")))] >= 1


def test_head_options_and_405_on_the_new_routes(served):
    s, _ = served
    status, headers, body = s.exchange("HEAD", "/metrics", headers=AUTH)
    assert status == 200 and body == b"" and int(headers["Content-Length"]) > 0
    assert s.exchange("HEAD", "/v1/models/tiny", headers=AUTH)[0] == 200
    status, headers, _ = s.exchange("OPTIONS", "/tokenize", headers={
        "Origin": ORIGIN, "Access-Control-Request-Method": "POST"})
    assert status == 204 and headers["Access-Control-Allow-Origin"] == ORIGIN
    assert headers["Access-Control-Allow-Methods"] == "POST, OPTIONS"
    status, headers, _ = s.exchange("GET", "/detokenize", headers=AUTH)
    assert status == 405 and headers["Allow"] == "POST, OPTIONS"
    status, headers, _ = s.exchange("POST", "/metrics", {}, headers=AUTH)
    assert status == 405 and headers["Allow"] == "GET, HEAD, OPTIONS"
