"""Acceptance 3: the real SmolLM2 GGUF against transformers' own loading of the same file (float32)."""

from __future__ import annotations

import pytest
import torch

import tramontane

TEXT = (
    "The mistral is a strong, cold wind that blows from the north into the Gulf of Lion. It brings "
    "clear skies and sunshine to Provence, but it can last for days and is said to make people "
    "restless. Farmers plant rows of cypress trees to shelter their fields, and the old houses of the "
    "region turn their backs to the north, with few windows on that side. Sailors know it well: the sea "
    "rises quickly, and small boats stay in harbour until it drops. Its cousin, the tramontane, blows "
    "across Languedoc and Roussillon from the mountains."
)
QUESTION = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]


@pytest.fixture(scope="module")
def both(smollm2_path, smollm2_hf_tokenizer):
    import functools

    import gguf
    from transformers import AutoModelForCausalLM

    kw = {"gguf_file": smollm2_path.name}
    # transformers' GGUF loading parses the file twice (config, then weights) and rebuilds gguf's tensor
    # name table for every tensor: ~30 s on 2 cores. Memos of those two pure steps; nothing else changes.
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(gguf, "get_tensor_name_map", functools.lru_cache(gguf.get_tensor_name_map))
        patch.setattr(gguf, "GGUFReader", functools.lru_cache(gguf.GGUFReader))
        hf = AutoModelForCausalLM.from_pretrained(smollm2_path.parent, dtype=torch.float32, **kw).eval()
    return tramontane.load(smollm2_path), hf, smollm2_hf_tokenizer[0]


def test_logits_over_100_tokens_match_transformers(both):
    llm, hf, _ = both
    ids = llm.tokenizer.encode(TEXT)[:100]
    assert len(ids) == 100
    with torch.inference_mode():
        ours = llm.model(torch.tensor([ids]))
        theirs = hf(torch.tensor([ids])).logits.float()
    diff = (ours - theirs).abs().max().item()
    assert diff <= 1e-3, f"max abs logit difference {diff}"


def test_greedy_chat_answer_matches_transformers(both):
    llm, hf, hf_tok = both
    prompt = llm.tokenizer.encode_chat(QUESTION)
    assert prompt == hf_tok.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=True, return_dict=False)
    with torch.inference_mode():
        out = hf.generate(
            torch.tensor([prompt]),
            max_new_tokens=32,
            do_sample=False,
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        )
    theirs = out[0, len(prompt) :].tolist()
    ours = llm.chat(QUESTION, temperature=0, max_tokens=32)
    assert ours.token_ids == theirs[: len(ours.token_ids)]
    assert len(ours.token_ids) == 32 or ours.finish_reason == "stop"
    assert "Paris" in ours.text


def _transformers_perplexity(hf, ids: list[int], context: int, stride: int) -> tuple[float, int]:
    """The sliding-window recipe of transformers' perplexity guide, with the exact token count."""
    nll_sum, n_tokens, prev_end = 0.0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + context, len(ids))
        trg_len = end - prev_end
        input_ids = torch.tensor([ids[begin:end]])
        target = input_ids.clone()
        target[:, :-trg_len] = -100
        with torch.inference_mode():
            loss = hf(input_ids, labels=target).loss
        valid = int((target[:, 1:] != -100).sum())  # the labels are shifted inside the model
        nll_sum += float(loss) * valid
        n_tokens += valid
        prev_end = end
        if end == len(ids):
            break
    return float(torch.tensor(nll_sum / n_tokens).exp()), n_tokens


def test_perplexity_equals_transformers(both, smollm2_path, tmp_path, capsys):
    """`tramontane eval --perplexity` on a fixed text equals transformers' perplexity (same windows)."""
    from tramontane.cli.main import main
    from tramontane.evaluate import perplexity

    llm, hf, hf_tok = both
    text = " ".join([TEXT] * 3)
    ids = llm.tokenizer.encode(text)
    assert ids == hf_tok(text, add_special_tokens=False)["input_ids"] and len(ids) > 300
    computed = {}
    for context, stride in ((128, 64), (256, 256)):
        ours = computed[context, stride] = perplexity(llm, ids, context, stride)
        reference, scored = _transformers_perplexity(hf, ids, context, stride)
        assert ours.tokens == scored  # (with stride == context each window's first token has no history)
        assert abs(ours.perplexity / reference - 1) < 0.005, (context, stride, ours.perplexity, reference)
    (tmp_path / "text.txt").write_text(text)
    assert (
        main(
            [
                "eval",
                str(smollm2_path),
                "--perplexity",
                str(tmp_path / "text.txt"),
                "--context",
                "128",
                "--stride",
                "64",
            ]
        )
        == 0
    )
    printed = float(capsys.readouterr().out.split()[1])
    assert abs(printed - computed[128, 64].perplexity) < 1e-3


def test_fast_default_stays_within_half_a_percent_of_the_exact_path(smollm2_path):
    """Issue 18's fidelity bound on the real model: the default integer activations (q16, with the
    interleaved layouts the loader then makes) move the perplexity of a fixed text by less than 0.5%
    from the exact float32 path, and answer the same greedy chats (3 of them, 48 tokens: the benchmark's
    figure is 10 of 128). Where the CPU has AMX-BF16, the prompts' windows take the bfloat16 tiles; on the
    integer kernels alone, q8, one int8 rounding, drifts further than q16. (The suite runs exact by
    default: conftest.py.)"""
    from tramontane.evaluate import perplexity
    from tramontane.quant import kernels

    questions = [QUESTION] + [
        [{"role": "user", "content": q}] for q in ("Write a haiku about the sea.", "Why is the sky blue?")
    ]

    def measure(setting: str, chats: bool = True, tiles: bool = True) -> tuple[float, list[list[int]]]:
        previous, was = kernels.set_activations(setting), kernels.extension().set_tiles(tiles)
        try:
            llm = tramontane.load(smollm2_path)
            ppl = perplexity(llm, llm.tokenizer.encode(" ".join([TEXT] * 3)), 128, 64).perplexity
            answers = [llm.chat(q, temperature=0, max_tokens=48).token_ids for q in questions if chats]
            return ppl, answers
        finally:
            kernels.set_activations(previous)
            kernels.extension().set_tiles(was)

    (exact, exact_answers), (fast, fast_answers) = measure("f32"), measure(kernels.DEFAULT_ACTIVATIONS)
    q16 = measure(kernels.DEFAULT_ACTIVATIONS, chats=False, tiles=False)[0]
    q8 = measure("q8", chats=False, tiles=False)[0]
    assert fast != exact  # the integer kernels (or the tiles) ran
    assert abs(fast / exact - 1) < 0.005, (fast, exact)
    assert fast_answers == exact_answers
    assert abs(q16 / exact - 1) < abs(q8 / exact - 1), (q16, q8, exact)


def test_multiple_choice_scores_equal_transformers_loglikelihood(both, smollm2_path, tmp_path, capsys):
    from tramontane.cli.main import main
    from tramontane.evaluate import continuation_logprob

    llm, hf, hf_tok = both
    question, choice = "The capital of France is", " Paris"
    whole = hf_tok(question + choice, add_special_tokens=False)["input_ids"]
    head = len(hf_tok(question, add_special_tokens=False)["input_ids"])
    with torch.inference_mode():
        logp = hf(torch.tensor([whole])).logits.float().log_softmax(-1)[0]
    reference = sum(float(logp[k - 1, whole[k]]) for k in range(head, len(whole)))
    assert abs(continuation_logprob(llm, question, choice) - reference) < 2e-3
    items = [
        {"question": "The capital of France is", "choices": ["Paris", "a banana", "blue"], "answer": 0},
        {"question": "Two plus two equals", "choices": ["seven hundred", "four"], "answer": "four"},
        {"question": "The opposite of hot is", "choices": ["cold", "purple"], "answer": 0},
    ]
    (tmp_path / "mc.jsonl").write_text("\n".join(map(__import__("json").dumps, items)))
    assert main(["eval", str(smollm2_path), "--choice", str(tmp_path / "mc.jsonl")]) == 0
    assert capsys.readouterr().out.startswith("accuracy 1.0000")
    (tmp_path / "bad.jsonl").write_text('{"question": "q", "choices": ["a"], "answer": 0}')
    assert main(["eval", str(smollm2_path), "--choice", str(tmp_path / "bad.jsonl")]) == 1
    assert "bad.jsonl:1" in capsys.readouterr().err


def test_quantized_kv_caches_stay_within_half_a_percent_of_float32(smollm2_path):
    """Issue 21's bound on the real model: a KV cache storing keys and values as q8_0 (0.27x float32's
    bytes), bf16 or f16 moves the perplexity of a fixed text by less than 0.5% from the float32 cache's
    (every window's keys go through the cache as generation reads them: Generator.score), and q8_0 does
    move it (the cache was read); so does q8_0 with the fast default activations (the compiled step then
    scores q8_0 keys against int8-rounded queries)."""
    from tramontane.api import LLM
    from tramontane.evaluate import perplexity
    from tramontane.quant import kernels

    base = tramontane.load(smollm2_path)  # one load: each type is an LLM over the same weights
    ids = base.tokenizer.encode(" ".join([TEXT] * 3))
    kvs = ("f32", "q8_0", "bf16", "f16")
    llms = {kv: LLM(base.loaded, base.tokenizer, base.dtype, kv) for kv in kvs}
    assert [llm.kv.name for llm in llms.values()] == list(kvs)
    ppl = {kv: perplexity(llm, ids, 256, 128).perplexity for kv, llm in llms.items()}
    for kv in ("q8_0", "bf16", "f16"):
        assert abs(ppl[kv] / ppl["f32"] - 1) < 0.005, ppl
    assert ppl["q8_0"] != ppl["f32"], ppl
    previous = kernels.set_activations(kernels.DEFAULT_ACTIVATIONS)  # and queries rounded to meet q8_0 keys
    try:
        fast = perplexity(tramontane.load(smollm2_path, kv_dtype="q8_0"), ids, 256, 128).perplexity
    finally:
        kernels.set_activations(previous)
    assert abs(fast / ppl["f32"] - 1) < 0.005 and fast != ppl["q8_0"], (fast, ppl)
