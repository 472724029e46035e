"""LoRA adapters behind the API: "model" picks one per request; adapters and the base share batches."""

from __future__ import annotations

import asyncio

import httpx
import pytest
import torch
from serving import running_server

import tramontane
from tramontane.cli.main import main
from tramontane.lora.layers import LoraSpec, apply_lora, lora_state
from tramontane.lora.peft import save_adapter

QUESTION = [{"role": "user", "content": "Name three colours of the rainbow."}]


def make_adapter(smollm2_path, folder, seed: int) -> None:
    """A random adapter with a visible effect (non-zero B) on q, v and the feed-forward."""
    llm = tramontane.load(smollm2_path)
    spec = LoraSpec(rank=4, alpha=8.0, targets=("wq", "wv", "w2"))
    apply_lora(llm.model, spec, name="default", seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in llm.model.modules():
            if hasattr(module, "lora_B"):
                b = module.lora_B["default"]
                b.copy_(torch.randn(b.shape, generator=g) * 0.06)
    assert any(v.abs().sum() > 0 for k, v in lora_state(llm.model, "default").items() if k.endswith("lora_B"))
    save_adapter(llm.model, folder, "default", spec, base_model=str(smollm2_path))


@pytest.fixture(scope="module")
def adapters(smollm2_path, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    for name, seed in (("pirate", 1), ("poet", 2)):
        make_adapter(smollm2_path, root / name, seed)
    return root


def offline_answers(smollm2_path, adapters) -> dict[str | None, str]:
    llm = tramontane.load(smollm2_path, lora={"pirate": adapters / "pirate", "poet": adapters / "poet"})
    out = {}
    for name in (None, "pirate", "poet"):
        llm.use_adapter(name)
        out[name] = llm.chat(QUESTION, temperature=0, max_tokens=16).text
    return out


def test_requests_choose_adapters_in_shared_batches(smollm2_path, adapters, tmp_path):
    expected = offline_answers(smollm2_path, adapters)
    assert len(set(expected.values())) == 3, expected  # each adapter changes the answer
    with running_server(
        tmp_path / "log",
        str(smollm2_path),
        "--kv-cache-memory",
        "64M",
        "--lora",
        f"pirate={adapters / 'pirate'}",
        "--lora",
        f"poet={adapters / 'poet'}",
    ) as (base, _):
        models = httpx.get(f"{base}/v1/models").json()["data"]
        assert [m["id"] for m in models] == ["SmolLM2-135M-Instruct.Q4_1", "pirate", "poet"]
        assert models[1]["type"] == "fine-tuned" and models[1]["root"] == models[0]["id"]

        def ask(model: str) -> dict:
            return {"model": model, "messages": QUESTION, "temperature": 0, "max_tokens": 16}

        # the base first, alone: its prompt blocks enter the prefix cache, which adapters must not reuse
        first = httpx.post(f"{base}/v1/chat/completions", json=ask(models[0]["id"]), timeout=120).json()
        assert first["choices"][0]["message"]["content"] == expected[None]

        async def together() -> list[dict]:
            async with httpx.AsyncClient(timeout=120) as client:
                names = ["pirate", models[0]["id"], "poet", "pirate"]
                replies = await asyncio.gather(
                    *(client.post(f"{base}/v1/chat/completions", json=ask(n)) for n in names)
                )
                return [r.json() for r in replies]

        replies = asyncio.run(together())
        got = [(r["model"], r["choices"][0]["message"]["content"]) for r in replies]
        assert got == [
            ("pirate", expected["pirate"]),
            (models[0]["id"], expected[None]),
            ("poet", expected["poet"]),
            ("pirate", expected["pirate"]),
        ]
        missing = httpx.post(f"{base}/v1/chat/completions", json=ask("nobody"), timeout=30)
        assert missing.status_code == 404 and "pirate" in missing.json()["error"]["message"]


def test_cli_lora_flags(smollm2_path, adapters, capsys):
    assert main(["run", str(smollm2_path), "hi", "--lora", "bad"]) == 1
    assert "NAME=PATH" in capsys.readouterr().err
    args = ["run", str(smollm2_path), "hi", "--lora", f"a={adapters / 'pirate'}", "--lora", f"b={adapters / 'poet'}"]
    assert main(args) == 1
    assert "--adapter" in capsys.readouterr().err
    assert (
        main(
            [
                "run",
                str(smollm2_path),
                QUESTION[0]["content"],
                "--max-tokens",
                "16",
                "--lora",
                f"poet={adapters / 'poet'}",
            ]
        )
        == 0
    )
    assert capsys.readouterr().out.strip() == offline_answers(smollm2_path, adapters)["poet"].strip()
