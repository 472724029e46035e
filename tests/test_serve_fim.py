"""Fill-in-the-middle through the real engine: a tiny random Mistral native model with mistral-common's
v3 tokenizer (which has the [SUFFIX] / [PREFIX] tokens), served in-process."""

from __future__ import annotations

import contextlib
import json
import shutil

import pytest
from fake_engine import DATA, V1, V3
from fastapi.testclient import TestClient
from models import hf_model, save_native

import tramontane
from tramontane.engine import AsyncEngine
from tramontane.errors import TokenizerError
from tramontane.serve import create_app, drain
from tramontane.text.tokenizer import MistralCommonTokenizer

PROMPT, SUFFIX = "def add(a, b):\n    c = ", "\n    return c"


def test_supports_fim_only_with_fim_tokens():
    v3 = MistralCommonTokenizer(V3)
    ids = v3.encode_fim("def f(", "return 1")
    suffix, prefix = v3.encode_fim("", "")[1:3]  # [BOS, SUFFIX, PREFIX] when both parts are empty
    assert ids[:2] == [v3.bos_id, suffix] and ids.index(prefix) > 2 and 0 not in ids
    assert ids[ids.index(prefix) + 1 :] == v3.encode("def f(")
    assert MistralCommonTokenizer(DATA / "tekken_240718.json").supports_fim
    for no_fim in (V1, DATA / "mistral_instruct_tokenizer_240216.model.v2"):  # v2 encodes [PREFIX] as <unk>
        assert not MistralCommonTokenizer(no_fim).supports_fim
    with pytest.raises(TokenizerError, match="fill-in-the-middle"):
        MistralCommonTokenizer(V1).encode_fim("a", "b")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = save_native(hf_model("mistral", seed=5, vocab_size=32768), tmp_path_factory.mktemp("fim"))
    shutil.copy(V3, folder / "tokenizer.model.v3")
    return tramontane.load(folder)


@pytest.fixture(scope="module")
def api(tiny):
    engine = AsyncEngine(tiny, model_name="tiny", kv_cache_memory=4 << 20, block_size=16)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        engine.start()
        yield
        await drain(app, 10)

    with TestClient(create_app(engine, lifespan=lifespan)) as client:
        yield client


def test_fim_completion_equals_offline_generation(api, tiny):
    assert tiny.tokenizer.supports_fim
    ids = tiny.tokenizer.encode_fim(PROMPT, SUFFIX)
    expected = tiny.generate(ids, temperature=0, max_tokens=6, ignore_eos=True)[0]
    body = {"model": "tiny", "prompt": PROMPT, "suffix": SUFFIX, "max_tokens": 6, "temperature": 0, "ignore_eos": True}
    r = api.post("/v1/fim/completions", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["choices"][0]["message"]["content"] == expected.text
    assert out["usage"] == {
        "prompt_tokens": len(ids),
        "completion_tokens": 6,
        "total_tokens": len(ids) + 6,
        "prompt_tokens_details": {"cached_tokens": out["usage"]["prompt_tokens_details"]["cached_tokens"]},
    }
    same = api.post("/v1/completions", json={**body, "stream": True}).text  # suffix on /v1/completions
    chunks = [line[6:] for line in same.splitlines() if line.startswith("data: ")]
    assert chunks[-1] == "[DONE]"
    parsed = [json.loads(c) for c in chunks[:-1]]
    assert "".join(c["choices"][0]["text"] for c in parsed if c["choices"]) == expected.text
    assert api.get("/v1/models").json()["data"][0]["capabilities"]["completion_fim"] is True
