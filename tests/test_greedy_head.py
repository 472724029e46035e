"""Greedy decoding's tokens from a Q8_0 head without every logit (quant/csrc/greedy.c): a bound pass on x
rounded once, then the exact logits of the groups that can hold the largest. The tokens must be the
argmax (numpy's: the first of equal maxima, the first NaN) of the logits the matmul computes, in every
case the bound could get wrong: near ties that the first rounding alone orders the other way, equal
rows, non-finite and extreme inputs, a corrupt scale."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from chartok import CharTokenizer
from models import hf_model, save_gguf

from tramontane.api import LLM
from tramontane.build import load_model
from tramontane.decoding.sampling import SamplingParams
from tramontane.model import ModuleBackend
from tramontane.quant import kernels
from tramontane.quant.linear import PackedLinear
from tramontane.quant.step import CompiledStep

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as QT  # noqa: E402
from gguf.quants import quantize as ref_quantize  # noqa: E402

ext = kernels._ext
pytestmark = pytest.mark.skipif(ext is None, reason="the compiled extension did not build")
ISAS = list(ext.isas()) if ext is not None else []


def buf(t: torch.Tensor) -> tuple[int, int]:
    return t.data_ptr(), t.numel() * t.element_size()


@pytest.fixture(autouse=True)
def q16():
    """The default setting (the tests' conftest picks the exact float32 activations)."""
    previous = kernels.set_activations("q16")
    yield
    kernels.set_activations(previous)


@pytest.fixture(params=ISAS or ["none"])
def isa(request):
    previous = ext.set_isa(request.param)
    yield request.param
    ext.set_isa("best")
    assert previous in ISAS


def q8_0_rows(w: np.ndarray) -> torch.Tensor:
    """float32 [n, k] -> Q8_0 rows (gguf's quantizer) [n, row_bytes] uint8."""
    return torch.from_numpy(np.ascontiguousarray(ref_quantize(w.astype(np.float32), QT.Q8_0)).view(np.uint8).copy())


def raw_q8_0(d: np.ndarray, q: np.ndarray) -> torch.Tensor:
    """Q8_0 rows from scales d [n, k/32] and quants q [n, k] (int8), as written."""
    n, k = q.shape
    blocks = np.zeros((n, k // 32, 34), np.uint8)
    blocks[:, :, :2] = d.astype(np.float16).reshape(n, k // 32, 1).view(np.uint8)
    blocks[:, :, 2:] = q.astype(np.int8).reshape(n, k // 32, 32).view(np.uint8)
    return torch.from_numpy(blocks.reshape(n, -1))


def interleaved(rows: torch.Tensor, k: int) -> tuple[torch.Tensor, int]:
    """The rows as a load lays them out on this CPU (interleaved: the best pass decides), whatever pass
    the test then runs."""
    previous = ext.set_isa("best")
    try:
        packed, qt = kernels.regroup(rows, int(QT.Q8_0), k)
    finally:
        ext.set_isa(previous)
    assert kernels.interleaved(qt)
    return packed, qt


def matmul_argmax(x: torch.Tensor, packed: torch.Tensor, qt: int, k: int, threads: int = 2) -> list[int]:
    """numpy's argmax of the logits the matmul computes (the reference the tokens must equal)."""
    y = torch.empty(x.shape[0], packed.shape[0])
    ext.matmul(buf(x), buf(packed), buf(y), x.shape[0], packed.shape[0], k, qt, threads)
    return y.numpy().argmax(axis=-1).tolist()


def greedy(
    x: torch.Tensor, packed: torch.Tensor, qt: int, k: int, threads: int = 2, bias: tuple[tuple[int, float], ...] = ()
) -> list[int] | None:
    out = torch.full((x.shape[0],), -7, dtype=torch.int64)
    ids = torch.tensor([t for t, _ in bias], dtype=torch.int64)
    values = torch.tensor([v for _, v in bias], dtype=torch.float32)
    n = packed.shape[0]
    ran = ext.greedy_rows(
        buf(x), buf(packed), buf(out), x.shape[0], n, k, qt, buf(ids), buf(values), len(bias), threads
    )
    if not ran:
        assert (out == -7).all()  # nothing written
        return None
    return out.tolist()


def biased_argmax(
    x: torch.Tensor, packed: torch.Tensor, qt: int, k: int, bias: tuple[tuple[int, float], ...]
) -> list[int]:
    """numpy's argmax of the matmul's logits with the bias added in float32."""
    y = torch.empty(x.shape[0], packed.shape[0])
    ext.matmul(buf(x), buf(packed), buf(y), x.shape[0], packed.shape[0], k, qt, 2)
    rows = y.numpy()
    for t, v in bias:
        rows[:, t] += np.float32(v)
    return rows.argmax(axis=-1).tolist()


def applies(isa: str) -> bool:
    """Where greedy_rows runs: the AVX-512 pass (VNNI) under q16, the default."""
    return isa == "avx512" and kernels.activations() == "q16"


@pytest.mark.parametrize(("n", "k"), [(8, 32), (24, 64), (528, 576), (1024, 256)])
@pytest.mark.parametrize("m", [1, 3, 8, 16, 17, 40])
def test_tokens_are_the_argmax_of_the_matmul_s_logits(isa: str, n: int, k: int, m: int) -> None:
    """Random heads and rows of any scale (an odd count of groups: 24 rows; one group alone: 8), on one
    thread and two: the matmul's argmax; nothing written where the pass has no kernel for it."""
    rng = np.random.default_rng(n + k + m)
    packed, qt = interleaved(q8_0_rows(rng.standard_normal((n, k)) * 0.05), k)
    x = torch.from_numpy((rng.standard_normal((m, k)) * 10.0 ** rng.uniform(-3, 3, (m, 1))).astype(np.float32))
    for threads in (1, 2):
        got = greedy(x, packed, qt, k, threads)
        assert (got is not None) == applies(isa)
        if got is not None:
            assert got == matmul_argmax(x, packed, qt, k), threads


def near_tie(k: int = 64) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """x and a head where x's first rounding alone ranks row b above row a but the exact logits rank a
    first: x[1] = 1 - 100/256 rounds to q1 = 1 leaving q2 = -100 (scale 1: x[0] = 127), x[2] = 120/256 to
    q1 = 0 leaving q2 = 120; row a = 10 e0, row b = a + e1 - 2 e2: P_b = P_a + 1 but L_b = L_a - 84/256.
    a is row 17 (its own group), b row 0; the other rows zero. Returns x [16, k], the rows, a, b."""
    x = np.zeros((16, k), np.float32)
    x[:, 0], x[:, 1], x[:, 2] = 127.0, 1 - 100 / 256, 120 / 256
    q = np.zeros((32, k), np.int8)
    a, b = 17, 0
    q[a, 0] = q[b, 0] = 10
    q[b, 1], q[b, 2] = 1, -2
    return torch.from_numpy(x), raw_q8_0(np.ones((32, k // 32)), q), a, b


def widest_gap(k: int = 64) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """Row a's exact logit 99% of the bound above its first look: x[1..31] = 0.498 (scale 1) rounds to q1
    = 0 leaving q2 = 127, row a = 127 there: P_a = 0, L_a = 31 * 127 * 127 / 256 = 1953.1 against E_a
    = 31 * 127 / 2 = 1968.5; row b = 15 e0: P_b = L_b = 1905, E_b = 7.5. a is the largest, though its P
    is the smallest but the zero rows': a bound 4% narrower leaves it out."""
    x = np.zeros((16, k), np.float32)
    x[:, 0], x[:, 1:32] = 127.0, 0.498
    q = np.zeros((32, k), np.int8)
    a, b = 20, 3
    q[a, 1:32], q[b, 0] = 127, 15
    return torch.from_numpy(x), raw_q8_0(np.ones((32, k // 32)), q), a, b


@pytest.mark.parametrize("make", [near_tie, widest_gap], ids=["near_tie", "widest_gap"])
def test_logits_that_the_first_rounding_orders_wrongly(isa: str, make) -> None:
    if not applies(isa):
        pytest.skip("greedy_rows runs on the AVX-512 pass")
    x, rows, a, b = make()
    packed, qt = interleaved(rows, x.shape[1])
    assert matmul_argmax(x, packed, qt, x.shape[1]) == [a] * 16
    assert greedy(x, packed, qt, x.shape[1]) == [a] * 16


def test_equal_logits_give_the_first_row(isa: str) -> None:
    """Rows 3, 37 and 100 the same bytes, x along them: their logits equal and largest; row 3 wins."""
    if not applies(isa):
        pytest.skip("greedy_rows runs on the AVX-512 pass")
    rng = np.random.default_rng(5)
    w = rng.standard_normal((128, 96)).astype(np.float32)
    w[37] = w[100] = w[3]
    rows = q8_0_rows(w)
    packed, qt = interleaved(rows, 96)
    x = torch.from_numpy(np.repeat(w[3:4] * 4, 9, axis=0) + rng.standard_normal((9, 96)).astype(np.float32) * 1e-3)
    assert matmul_argmax(x, packed, qt, 96) == [3] * 9
    assert greedy(x, packed, qt, 96) == [3] * 9


@pytest.mark.parametrize(
    "case", ["nan", "inf", "huge", "tiny", "zero", "corrupt_scale", "inf_scale_zero_block", "nan_scale"]
)
def test_non_finite_and_extreme_inputs(isa: str, case: str) -> None:
    """Rows whose bound cannot hold (a NaN or infinite x, x near float's largest or smallest, a head
    block with an infinite or NaN scale) take every logit: still the matmul's argmax, first NaN
    included; the other rows of the call keep theirs."""
    if not applies(isa):
        pytest.skip("greedy_rows runs on the AVX-512 pass")
    rng = np.random.default_rng(9)
    n, k, m = 256, 64, 12
    rows = q8_0_rows(rng.standard_normal((n, k)) * 0.1)
    x = rng.standard_normal((m, k)).astype(np.float32)
    raw = rows.numpy().reshape(n, k // 32, 34)
    if case == "nan":
        x[2, 5] = np.nan
    elif case == "inf":
        x[2, 5] = np.inf
    elif case == "huge":
        x[2] *= 3e37
    elif case == "tiny":
        x[2] *= 1e-39
    elif case == "zero":
        x[2] = 0.0
    elif case == "corrupt_scale":
        raw[70, 1, :2] = np.array([np.inf], np.float16).view(np.uint8)
    elif case == "inf_scale_zero_block":
        raw[70, 1, :2] = np.array([np.inf], np.float16).view(np.uint8)
        x[:, 32:] = 0.0
    elif case == "nan_scale":
        raw[200, 0, :2] = np.array([np.nan], np.float16).view(np.uint8)
    packed, qt = interleaved(torch.from_numpy(raw.reshape(n, -1).copy()), k)
    xt = torch.from_numpy(x)
    got = greedy(xt, packed, qt, k)
    if case in ("nan", "inf"):  # left to the matmul: its one-row and many-row kernels meet them unlike
        assert got is None
    else:
        assert got == matmul_argmax(xt, packed, qt, k)


@pytest.mark.parametrize("setting", ["f32", "q8"])
def test_other_activation_settings_are_left_to_the_matmul(setting: str) -> None:
    rng = np.random.default_rng(2)
    packed, qt = interleaved(q8_0_rows(rng.standard_normal((64, 64))), 64)
    previous = kernels.set_activations(setting)
    try:
        assert greedy(torch.randn(16, 64), packed, qt, 64) is None
    finally:
        kernels.set_activations(previous)


def test_other_types_and_short_buffers() -> None:
    rng = np.random.default_rng(3)
    rows = torch.from_numpy(
        np.ascontiguousarray(ref_quantize(rng.standard_normal((64, 64)).astype(np.float32), QT.Q4_0)).view(np.uint8)
    )
    packed, qt = kernels.regroup(rows.reshape(64, -1).clone(), int(QT.Q4_0), 64)
    assert greedy(torch.randn(16, 64), packed, qt, 64) is None
    q8, qt8 = interleaved(q8_0_rows(rng.standard_normal((64, 64))), 64)
    x, out = torch.randn(17, 64), torch.empty(16, dtype=torch.int64)
    ids, vals = torch.tensor([3, 64], dtype=torch.int64), torch.zeros(2)
    with pytest.raises(ValueError, match="greedy_rows: buffer out holds"):
        ext.greedy_rows(buf(x), buf(q8), buf(out), 17, 64, 64, qt8, buf(ids), buf(vals), 0, 2)
    with pytest.raises(ValueError, match="greedy_rows: bias token 64 out of"):
        ext.greedy_rows(buf(x), buf(q8), buf(out), 16, 64, 64, qt8, buf(ids), buf(vals), 2, 2)
    ids[1] = 3
    with pytest.raises(ValueError, match="named twice"):
        ext.greedy_rows(buf(x), buf(q8), buf(out), 16, 64, 64, qt8, buf(ids), buf(vals), 2, 2)
    with pytest.raises(ValueError, match="buffer bias_vals holds"):
        ext.greedy_rows(buf(x), buf(q8), buf(out), 16, 64, 64, qt8, buf(ids), buf(vals[:1]), 2, 2)
    head = PackedLinear(q8, qt8, 64)
    assert head.greedy(x[:16], ((3, 1.0), (3, 2.0))) is None  # a token named twice: left to the logits
    assert head.greedy(x[:16], ((64, 1.0),)) is None


def test_the_packed_head_takes_it_from_greedy_from_m_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    """PackedLinear.greedy: None below GREEDY_FROM_M rows (the matmul is faster there), else the argmax
    of its own forward."""
    if not applies(kernels.isa()):
        pytest.skip("greedy_rows runs on the AVX-512 pass")
    rng = np.random.default_rng(4)
    packed, qt = interleaved(q8_0_rows(rng.standard_normal((256, 128))), 128)
    head = PackedLinear(packed, qt, 128)
    x = torch.randn(kernels.GREEDY_FROM_M, 128)
    assert head.greedy(x[:-1]) is None
    assert head.greedy(x).tolist() == head(x).numpy().argmax(axis=-1).tolist()
    monkeypatch.setattr(kernels, "GREEDY_FROM_M", 1)
    assert head.greedy(x[:1]).tolist() == [int(head(x[:1]).argmax())]


def test_offline_greedy_decoding_takes_the_head_s_argmax(tmp_path) -> None:
    """A batch of 9 greedy prompts on a model with a Q8_0 head: the tokens come from the backend's greedy
    (counted) and equal the module path's, which computes every logit."""
    path = save_gguf(hf_model("mistral", seed=6), tmp_path / "m.gguf", "Q8_0")
    llm = LLM(load_model(path, packed=True), CharTokenizer())
    assert isinstance(llm.backend, CompiledStep)
    taken = []
    backend = llm._generator.backend
    original = backend.greedy

    def counted(hidden: torch.Tensor, bias: tuple[tuple[int, float], ...] = ()) -> torch.Tensor | None:
        tokens = original(hidden, bias)
        taken.append(tokens is not None)
        return tokens

    backend.greedy = counted  # type: ignore[method-assign]
    prompts = [[1, 5 + i, 9, 33, 7 + 2 * i] for i in range(9)]
    fast = [c.token_ids for c in llm.generate(prompts, temperature=0, max_tokens=12, ignore_eos=True)]
    assert any(taken) == applies(kernels.isa())
    llm._generator.backend = ModuleBackend(llm.model)
    plain = [c.token_ids for c in llm.generate(prompts, temperature=0, max_tokens=12, ignore_eos=True)]
    assert fast == plain and all(len(t) == 12 for t in fast)
    banned = {t: -100.0 for t in {t for ids in plain for t in ids[:3]}}  # each answer's first tokens
    taken.clear()
    llm._generator.backend = backend
    fast = [
        c.token_ids for c in llm.generate(prompts, temperature=0, max_tokens=12, ignore_eos=True, logit_bias=banned)
    ]
    assert any(taken) == applies(kernels.isa())
    llm._generator.backend = ModuleBackend(llm.model)
    plain_banned = [
        c.token_ids for c in llm.generate(prompts, temperature=0, max_tokens=12, ignore_eos=True, logit_bias=banned)
    ]
    assert fast == plain_banned and fast != plain and not set(banned) & {t for ids in fast for t in ids}
    logprobs = llm.generate(prompts, temperature=0, max_tokens=3, ignore_eos=True, logprobs=2)
    assert all(c.logprobs for c in logprobs)  # logprobs read the logits: never the head's greedy


def test_served_greedy_steps_take_the_head_s_argmax(tmp_path) -> None:
    """16 concurrent greedy requests on the engine (their decoding steps' tokens from the backend's
    greedy, counted) answer as each does alone offline, one row a step (every logit); with one of them
    asking for logprobs, the steps compute the logits, and every answer is still the same."""
    import asyncio

    from test_engine import GREEDY, collect, engine_for, prompts, sequential

    path = save_gguf(hf_model("mistral", seed=8), tmp_path / "m.gguf", "Q8_0")
    llm = LLM(load_model(path, packed=True), CharTokenizer())
    ps = prompts(16)
    want = sequential(llm, ps)
    taken: list[bool] = []
    original = CompiledStep.greedy

    def counted(self, hidden: torch.Tensor, bias: tuple[tuple[int, float], ...] = ()) -> torch.Tensor | None:
        tokens = original(self, hidden, bias)
        taken.append(tokens is not None)
        return tokens

    def served(params: list) -> list[list[int]]:
        engine = engine_for(llm, blocks=400)
        assert isinstance(engine.backend, CompiledStep)

        async def main():
            engine.start()
            try:
                return await asyncio.gather(
                    *(collect(engine, f"r{i}", p, sp) for i, (p, sp) in enumerate(zip(ps, params)))
                )
            finally:
                await engine.shutdown(1.0)

        return [tokens for tokens, _ in asyncio.run(main())]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(CompiledStep, "greedy", counted)
        assert served([GREEDY] * 16) == want
        assert any(taken) == applies(kernels.isa())
        taken.clear()
        asking = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, logprobs=2)
        assert served([GREEDY] * 15 + [asking]) == want
        assert not any(taken)
        banning = SamplingParams(
            temperature=0, max_tokens=20, ignore_eos=True, logit_bias={t: -100.0 for t in want[0][:4]}
        )
        want_banned = sequential(llm, ps, banning)
        assert want_banned != want
        assert served([banning] * 16) == want_banned
        assert any(taken) == applies(kernels.isa())


@pytest.mark.parametrize("kind", ["ban_the_top", "ban_a_far_top", "raise_a_low_one", "ban_many", "near_tie"])
def test_a_shared_logit_bias(isa: str, kind: str) -> None:
    """A logit bias every row shares, added as float32 sums: the banned top tokens of every row (the
    served benchmark's bans), a banned token far above every other (its bound's floor is no floor for
    the rest), a low token raised past them all, 300 bans, a near tie's winner banned."""
    if not applies(isa):
        pytest.skip("greedy_rows runs on the AVX-512 pass")
    rng = np.random.default_rng(12)
    n, k, m = 1024, 128, 16
    packed, qt = interleaved(q8_0_rows(rng.standard_normal((n, k)) * 0.05), k)
    x = torch.from_numpy(rng.standard_normal((m, k)).astype(np.float32))
    plain = matmul_argmax(x, packed, qt, k)
    if kind == "ban_the_top":
        bias = tuple((t, -100.0) for t in sorted(set(plain)))
    elif kind == "ban_a_far_top":
        w = rng.standard_normal((n, k)).astype(np.float32) * 0.05
        packed, qt = interleaved(q8_0_rows(w), k)
        x = torch.from_numpy(w[500] * 200 + rng.standard_normal((m, k)).astype(np.float32))
        assert matmul_argmax(x, packed, qt, k) == [500] * m
        bias = ((500, -100.0),)
    elif kind == "raise_a_low_one":
        bias = ((int(np.argmin(plain)) * 7 + 1, 100.0), (plain[0], -50.0))
    elif kind == "ban_many":
        bias = tuple((int(t), float(rng.uniform(-100, 0))) for t in rng.choice(n, 300, replace=False))
    else:
        x, rows, a, _ = near_tie()
        packed, qt = interleaved(rows, x.shape[1])
        k, bias = x.shape[1], ((a, -0.5), (5, 0.25))
    want = biased_argmax(x, packed, qt, k, bias)
    assert greedy(x, packed, qt, k, bias=bias) == want
    assert greedy(x, packed, qt, k, threads=1, bias=bias) == want
