"""Randomly malformed request bodies (fixed seed) get only 4xx answers in the OpenAI error shape, and
none of them reaches the engine or stops the server."""

from __future__ import annotations

import json
import math
import random

from fake_engine import FakeEngine
from fastapi.testclient import TestClient

from tramontane.serve import create_app

VALID = {
    "/v1/chat/completions": {
        "model": "fake-model",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "hi"}]},
        ],
        "temperature": 0.5,
        "max_tokens": 3,
        "n": 1,
        "stop": ["x"],
        "seed": 1,
        "top_k": 5,
    },
    "/v1/completions": {"prompt": "hi", "max_tokens": 3, "temperature": 0.5, "logprobs": 1},
    "/v1/fim/completions": {"prompt": "def f(", "suffix": "return 1", "max_tokens": 3, "random_seed": 2},
    "/v1/embeddings": {"input": ["a", "b"], "encoding_format": "float"},
    "/v1/tokenize": {"prompt": "a"},
    "/v1/detokenize": {"tokens": [1, 2]},
}
REQUIRED = {
    "/v1/chat/completions": "messages",
    "/v1/completions": "prompt",
    "/v1/fim/completions": "prompt",
    "/v1/embeddings": "input",
    "/v1/detokenize": "tokens",
}
NUMBERS = [math.nan, math.inf, -math.inf, 10**30, -(10**30), 1e308 * 10]
# Values that are wrong for the field whatever the rest of the body says.
BAD = {
    "temperature": [-1, "hot", [], {}, *NUMBERS[:3], 1e400],
    "top_p": [0, -0.5, 2, math.nan, "x", [0.5]],
    "top_k": [-5, 1.5, "k", math.inf, {}],
    "min_p": [-1, 2, math.nan, "p"],
    "max_tokens": [0, -5, 10**30, 1.5, "ten", math.nan, [3]],
    "min_tokens": [-1, 10**40, "x", 0.5],
    "n": [0, -1, 10**9, 2.5, "two", math.inf],
    "stop": [[""], 5, [1], {"a": 1}, ["x"] * 100, ["y" * 5000]],
    "seed": [2**80, -(2**80), 1.5, "s", math.nan],
    "random_seed": [2**70, "r", [1]],
    "presence_penalty": [5, -5, math.nan, "p"],
    "frequency_penalty": [2.5, math.inf, "f"],
    "repetition_penalty": [0, -1, math.inf, math.nan],
    "stream": ["sometimes", [], {}, 2],
    "messages": [
        [],
        "hi",
        [1],
        [{}],
        [{"role": "alien", "content": "x"}],
        [{"role": "user", "content": 5}],
        [{"role": "user"}],
        None,
        [{"role": "user", "content": [{"type": "image_url"}]}],
        [{"role": ["user"], "content": "x"}],
        {"role": "user", "content": "x"},
        [{"role": "user", "content": "lone \ud800 surrogate"}],
    ],
    "prompt": [[], 5, None, [[]], [-1], [10**9], {"a": 1}, [1.5], [[1], "x"], "w " * 400, "\udfff"],
    "suffix": [5, [], {}],
    "input": [[], None, [[]], [-1], {"a": 1}, [["a"]], 3.5],
    "tokens": [[-1], [10**9], "abc", None, [1.5], [[1]]],
    "encoding_format": ["hex", 5],
    "logprobs": [-1, 50, "x", [1]],
    "response_format": [{"type": "yaml"}, "json", 5],
    "tools": [[{"type": "function", "function": {"name": "f"}}], "tools", 7],
    "model": ["gpt-4", 5, ["fake-model"]],
}
FIELDS_OF = {
    path: [f for f in BAD if f in body or f in ("temperature", "model", "n", "stream", "response_format")]
    for path, body in VALID.items()
}
FIELDS_OF["/v1/embeddings"] = ["input", "encoding_format", "model"]
FIELDS_OF["/v1/tokenize"] = ["model", "messages"]
FIELDS_OF["/v1/detokenize"] = ["tokens", "model"]


def _random_json(rng: random.Random, depth: int = 0):
    kind = rng.randrange(6 if depth < 4 else 4)
    if kind == 0:
        return rng.choice([None, True, False, 0, -1, 1.5, 10**20, math.nan])
    if kind == 1:
        return "".join(rng.choice('ab"\\{}[]\x00é🙂') for _ in range(rng.randrange(8)))
    if kind == 2:
        return rng.randrange(-(10**6), 10**6)
    if kind == 3:
        return rng.choice(NUMBERS)
    if kind == 4:
        return [_random_json(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {f"k{rng.randrange(5)}": _random_json(rng, depth + 1) for _ in range(rng.randrange(4))}


def malformed(rng: random.Random) -> tuple[str, bytes]:
    path = rng.choice(sorted(VALID))
    body = json.loads(json.dumps(VALID[path]))
    kind = rng.randrange(10)
    if kind <= 4:  # one or more fields with a wrong value
        for field in rng.sample(FIELDS_OF[path], k=min(len(FIELDS_OF[path]), 1 + (kind == 4) * 2)):
            body[field] = rng.choice(BAD[field])
    elif kind == 5:  # a required field missing, garbage added
        body.pop(REQUIRED.get(path, "prompt"), None)
        body[f"x{rng.randrange(9)}"] = _random_json(rng)
    elif kind == 6:  # not an object at all
        body = rng.choice([[body], "body", 42, None, [], _random_json(rng, 3)])
        if isinstance(body, dict):
            body = [body]
    elif kind == 7:  # invalid JSON: truncated
        text = json.dumps(body).encode()
        return path, text[: rng.randrange(len(text))]
    elif kind == 8:  # invalid JSON: garbage in front, or single quotes
        text = json.dumps(body)
        return path, (rng.choice(["x", "'", "}", "\x00", "\ufeff\ufeff"]) + text).encode("utf-8", "surrogatepass")
    else:  # a required field replaced by a random nested value that cannot be valid
        body[REQUIRED.get(path, "prompt") if path != "/v1/tokenize" else "messages"] = {"k": _random_json(rng)}
    return path, json.dumps(body).encode()


def test_malformed_bodies_get_only_4xx():
    engine = FakeEngine(max_model_len=256)
    api = TestClient(create_app(engine, max_body_bytes=32 << 10), raise_server_exceptions=False)
    rng = random.Random(20240601)
    statuses: dict[int, int] = {}
    for _ in range(400):
        path, raw = malformed(rng)
        r = api.post(path, content=raw, headers={"Content-Type": "application/json"})
        assert 400 <= r.status_code < 500, (path, raw[:300], r.status_code, r.text[:300])
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
        statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
    assert not engine.requests and not engine.embedded  # nothing malformed reached the engine
    assert {400, 404, 422} <= set(statuses), statuses
    assert api.get("/health").json() == {"status": "ok"}
    ok = api.post("/v1/chat/completions", json=VALID["/v1/chat/completions"])
    assert ok.status_code == 200, ok.text
