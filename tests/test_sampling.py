"""Sampling: params validation, penalties, masks vs transformers' processors, seeded sampling, logprobs."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from tramontane.decoding.sampling import (
    SamplingParams,
    apply_logit_bias,
    apply_penalties,
    compute_logprobs,
    count_tokens,
    make_generator,
    process_logits,
    sample,
)
from tramontane.errors import RequestError

V = 64


def random_logits(rows: int, vocab: int = V, seed: int = 0, scale: float = 3.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(rows, vocab, generator=gen) * scale


def assert_same_distribution(ours: torch.Tensor, ref: torch.Tensor) -> None:
    """Same surviving tokens (finite logits) and the same probabilities."""
    assert torch.equal(torch.isfinite(ours), torch.isfinite(ref))
    torch.testing.assert_close(ours.softmax(-1), ref.softmax(-1), rtol=1e-5, atol=1e-7)


def hf(processor: object, logits: torch.Tensor, input_ids: torch.Tensor | None = None) -> torch.Tensor:
    ids = torch.zeros(logits.shape[0], 1, dtype=torch.long) if input_ids is None else input_ids
    return processor(ids, logits.clone())  # type: ignore[operator]


# ---- SamplingParams validation -----------------------------------------------------------------------

BAD_FIELDS = [
    ("temperature", -0.1),
    ("temperature", math.nan),
    ("temperature", math.inf),
    ("temperature", "1"),
    ("top_p", 0.0),
    ("top_p", 1.5),
    ("top_p", math.nan),
    ("top_p", -0.2),
    ("min_p", -0.01),
    ("min_p", 1.01),
    ("min_p", math.nan),
    ("top_k", -2),
    ("top_k", 1.5),
    ("top_k", True),
    ("repetition_penalty", 0.0),
    ("repetition_penalty", -1.0),
    ("repetition_penalty", math.inf),
    ("repetition_penalty", math.nan),
    ("presence_penalty", 2.5),
    ("presence_penalty", -2.01),
    ("presence_penalty", math.nan),
    ("frequency_penalty", 2.01),
    ("frequency_penalty", -3.0),
    ("seed", 1.5),
    ("seed", 1 << 64),
    ("seed", -(1 << 63) - 1),
    ("max_tokens", 0),
    ("max_tokens", -5),
    ("max_tokens", 2.0),
    ("logprobs", -1),
    ("logprobs", 21),
    ("logprobs", 1.0),
    ("stop", ("",)),
    ("stop", ("ok", 3)),
    ("stop", tuple(f"s{i}" for i in range(17))),
    ("stop", 7),
    ("stop", ("x" * 1025,)),
    ("stop_token_ids", (-1,)),
    ("stop_token_ids", ("2",)),
    ("stop_token_ids", 5),
    ("ignore_eos", "yes"),
]


@pytest.mark.parametrize(("field", "value"), BAD_FIELDS)
def test_validation_names_field_and_value(field: str, value: object) -> None:
    with pytest.raises(RequestError) as info:
        SamplingParams(**{field: value})  # type: ignore[arg-type]
    assert field in str(info.value)
    shown = str(info.value)
    assert repr(value)[:20] in shown or any(repr(v)[:20] in shown for v in _members(value))  # long values are cut


def _members(value: object) -> list[object]:
    return list(value) if isinstance(value, tuple) else []


def test_valid_params_and_normalisation() -> None:
    p = SamplingParams(
        temperature=0,
        top_k=-1,
        min_p=1.0,
        top_p=1.0,
        seed=-3,
        max_tokens=1,
        logprobs=20,
        stop=["a", "b"],
        stop_token_ids=[2],
        presence_penalty=-2,
        frequency_penalty=2,
    )
    assert p.stop == ("a", "b") and p.stop_token_ids == (2,) and p.is_greedy
    assert SamplingParams(stop="###").stop == ("###",)
    assert not SamplingParams().is_greedy and not SamplingParams().has_penalties
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.temperature = 1.0  # type: ignore[misc]  # frozen


# ---- masks vs transformers ---------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [0.3, 0.7, 1.0, 1.8])
def test_temperature_matches_transformers(temperature: float) -> None:
    logits = random_logits(4)
    ours = process_logits(logits, [SamplingParams(temperature=temperature)] * 4)
    assert_same_distribution(ours, hf(TemperatureLogitsWarper(temperature), logits))


@pytest.mark.parametrize("top_k", [1, 2, 5, 17, V, V + 10])
def test_top_k_matches_transformers(top_k: int) -> None:
    logits = random_logits(4)
    ours = process_logits(logits, [SamplingParams(top_k=top_k)] * 4)
    assert_same_distribution(ours, hf(TopKLogitsWarper(top_k), logits))
    assert int(torch.isfinite(ours).sum(-1).max()) == min(top_k, V)


def test_top_k_keeps_ties_at_the_boundary() -> None:
    logits = torch.tensor([[1.0, 2.0, 2.0, 3.0, 0.0]])
    ours = process_logits(logits, [SamplingParams(top_k=2)])
    assert torch.isfinite(ours).tolist() == [[False, True, True, True, False]]
    assert_same_distribution(ours, hf(TopKLogitsWarper(2), logits))


@pytest.mark.parametrize("top_p", [0.05, 0.3, 0.5, 0.8, 0.95, 0.999])
def test_top_p_matches_transformers(top_p: float) -> None:
    logits = random_logits(6, seed=1)
    ours = process_logits(logits, [SamplingParams(top_p=top_p)] * 6)
    assert_same_distribution(ours, hf(TopPLogitsWarper(top_p), logits))


@pytest.mark.parametrize(("top_p", "survivors"), [(0.45, 1), (0.75, 2), (0.85, 3), (0.97, 4)])
def test_top_p_smallest_set_reaching_top_p(top_p: float, survivors: int) -> None:
    # Hand-computed: probabilities 0.5, 0.3, 0.15, 0.05 (cumulative 0.5, 0.8, 0.95, 1.0).
    logits = torch.tensor([[0.15, 0.5, 0.05, 0.3]]).log()
    ours = process_logits(logits, [SamplingParams(top_p=top_p)])
    expected = [[survivors >= 3, True, survivors >= 4, survivors >= 2]]
    assert torch.isfinite(ours).tolist() == expected


@pytest.mark.parametrize(("top_p", "survivors"), [(0.25, 1), (0.5, 2), (0.75, 3), (0.8, 4)])
def test_top_p_exact_boundary_keeps_the_set_reaching_top_p(top_p: float, survivors: int) -> None:
    # Four equal logits: probabilities are exactly 0.25 and the cumulative sums exactly 0.25 .. 1.0,
    # so a set whose mass equals top_p exactly is enough (transformers agrees on the count).
    logits = torch.zeros(1, 4)
    ours = process_logits(logits, [SamplingParams(top_p=top_p)])
    assert int(torch.isfinite(ours).sum()) == survivors
    assert int(torch.isfinite(hf(TopPLogitsWarper(top_p), logits)).sum()) == survivors


@pytest.mark.parametrize("min_p", [0.01, 0.1, 0.3, 0.9, 1.0])
def test_min_p_matches_transformers(min_p: float) -> None:
    logits = random_logits(4, seed=2)
    ours = process_logits(logits, [SamplingParams(min_p=min_p)] * 4)
    assert_same_distribution(ours, hf(MinPLogitsWarper(min_p), logits))


@pytest.mark.parametrize("penalty", [0.5, 1.3, 2.0])
def test_repetition_penalty_matches_transformers(penalty: float) -> None:
    logits = random_logits(3, seed=3)
    prompt = [[1, 2, 3, 3], [10, 11], [5]]
    output = [[4, 4, 40], [], [5, 6, 63]]
    ids = torch.tensor([[*p, *o] + [p[0]] * (7 - len(p) - len(o)) for p, o in zip(prompt, output)])
    ours = apply_penalties(logits, prompt, output, [SamplingParams(repetition_penalty=penalty)] * 3)
    ref = hf(RepetitionPenaltyLogitsProcessor(penalty), logits, ids)
    torch.testing.assert_close(ours, ref)
    assert not torch.equal(ours, logits)


def test_full_chain_per_row_matches_transformers_row_by_row() -> None:
    """Different params per row in one batch == transformers' chain (same order) run on each row alone."""
    logits = random_logits(5, seed=4)
    settings = [
        (1.2, 0.7, 10, 0.9, 0.05),
        (1.0, 1.0, 0, 1.0, 0.0),
        (0.8, 1.5, 3, 0.5, 0.2),
        (1.5, 0.4, 0, 0.8, 0.0),
        (2.0, 1.0, 20, 1.0, 0.1),
    ]
    params = [
        SamplingParams(repetition_penalty=r, temperature=t, top_k=k, top_p=p, min_p=m) for r, t, k, p, m in settings
    ]
    seen = torch.tensor([[1, 7, 9, 2, 2], [3, 3, 3, 3, 3], [0, 1, 2, 3, 4], [50, 51, 52, 0, 0], [8, 8, 9, 9, 9]])
    prompt, output = seen[:, :3].tolist(), seen[:, 3:].tolist()
    ours = process_logits(apply_penalties(logits, prompt, output, params), params)
    for row, (r, t, k, p, m) in enumerate(settings):
        chain = LogitsProcessorList(
            [RepetitionPenaltyLogitsProcessor(r), TemperatureLogitsWarper(t)]
            + ([TopKLogitsWarper(k)] if k else [])
            + [TopPLogitsWarper(p)]
            + ([MinPLogitsWarper(m)] if m else [])
        )
        ref = chain(seen[row : row + 1], logits[row : row + 1].clone())
        assert_same_distribution(ours[row : row + 1], ref)


# ---- order of the steps (hand-computed) ---------------------------------------------------------------


def survivors(logits: torch.Tensor) -> int:
    return int(torch.isfinite(logits).sum())


def test_order_top_k_before_top_p() -> None:
    # p = .4 .3 .2 .1; top_k 2 renormalises to .571 .429, so top_p .5 keeps 1.
    # (top_p first would keep .4 + .3 = 2 tokens, and top_k 2 would keep both.)
    logits = torch.tensor([[0.4, 0.3, 0.2, 0.1]]).log()
    assert survivors(process_logits(logits, [SamplingParams(top_k=2, top_p=0.5)])) == 1


def test_order_top_p_before_min_p() -> None:
    # top_p .75 on .4 .3 .2 .1 keeps 3 (cum .4, .7, .9); min_p .3 (floor .12) then keeps those 3.
    # (min_p first: .444 .333 .222 and top_p .75 would keep 2.)
    logits = torch.tensor([[0.4, 0.3, 0.2, 0.1]]).log()
    assert survivors(process_logits(logits, [SamplingParams(top_p=0.75, min_p=0.3)])) == 3


def test_order_temperature_before_top_p() -> None:
    # temperature .5 squares probabilities: .533 .3 .133 .033, so top_p .8 keeps 2 (raw would keep 3).
    logits = torch.tensor([[0.4, 0.3, 0.2, 0.1]]).log()
    out = process_logits(logits, [SamplingParams(temperature=0.5, top_p=0.8)])
    assert survivors(out) == 2
    torch.testing.assert_close(out.softmax(-1)[0, :2], torch.tensor([0.64, 0.36]))


def test_penalties_apply_before_temperature() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.5]])
    params = [SamplingParams(presence_penalty=1.0, temperature=0.5)]
    out = process_logits(apply_penalties(logits, None, [[0]], params), params)
    torch.testing.assert_close(out, torch.tensor([[(2.0 - 1.0) / 0.5, 2.0, 1.0]]))


def test_greedy_rows_are_not_scaled_and_neutral_params_are_identity() -> None:
    logits = random_logits(2)
    out = process_logits(logits, [SamplingParams(temperature=0.0), SamplingParams()])
    assert torch.equal(out, logits) and out is not logits


# ---- presence / frequency penalties (hand-computed) ---------------------------------------------------


def test_presence_and_frequency_penalties_hand_computed() -> None:
    logits = torch.tensor([[1.0, -1.0, 2.0, 0.0, 3.0], [1.0, 1.0, 1.0, 1.0, 1.0]])
    prompt = [[0, 0, 1], [4]]  # prompt tokens never count for the OpenAI penalties
    output = [[2, 2, 2, 3], [1]]
    params = [
        SamplingParams(presence_penalty=0.5, frequency_penalty=0.25),
        SamplingParams(presence_penalty=-1.0, frequency_penalty=0.0),
    ]
    out = apply_penalties(logits, prompt, output, params)
    expected = torch.tensor([[1.0, -1.0, 2.0 - 0.5 - 0.75, 0.0 - 0.5 - 0.25, 3.0], [1.0, 2.0, 1.0, 1.0, 1.0]])
    torch.testing.assert_close(out, expected)


def test_penalties_accept_count_tensors_and_combine_with_repetition() -> None:
    logits = torch.tensor([[2.0, -2.0, 4.0, 1.0]])
    prompt_counts = count_tokens([[0, 1]], 4)
    output_counts = count_tokens([[2, 2]], 4)
    assert output_counts.tolist() == [[0, 0, 2, 0]]
    params = [SamplingParams(repetition_penalty=2.0, frequency_penalty=1.0, presence_penalty=0.5)]
    out = apply_penalties(logits, prompt_counts, output_counts, params)
    # repetition on tokens 0, 1, 2 (prompt + output), then OpenAI on token 2 only: 4/2 - 2*1 - 0.5
    torch.testing.assert_close(out, torch.tensor([[1.0, -4.0, -0.5, 1.0]]))
    assert logits.tolist() == [[2.0, -2.0, 4.0, 1.0]]  # input untouched


def test_count_tokens_rejects_out_of_vocabulary_ids() -> None:
    with pytest.raises(RequestError, match="99"):
        count_tokens([[1, 99]], 10)


# ---- sampling ----------------------------------------------------------------------------------------


def test_greedy_is_argmax_and_touches_no_generator() -> None:
    logits = random_logits(3, seed=5)
    gens = [make_generator(1), make_generator(2), None]
    before = [g.get_state().clone() for g in gens[:2]]
    tokens = sample(logits, [SamplingParams(temperature=0.0)] * 3, gens)
    assert torch.equal(tokens, logits.argmax(-1))
    for g, state in zip(gens[:2], before):
        assert torch.equal(g.get_state(), state)


def test_greedy_row_in_mixed_batch_touches_only_sampling_rows_generators() -> None:
    logits = random_logits(2, seed=6)
    g_greedy, g_sample = make_generator(1), make_generator(2)
    state = g_greedy.get_state().clone()
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=1.0)]
    tokens = sample(process_logits(logits, params), params, [g_greedy, g_sample])
    assert int(tokens[0]) == int(logits[0].argmax())
    assert torch.equal(g_greedy.get_state(), state)
    assert not torch.equal(g_sample.get_state(), make_generator(2).get_state())


def test_sampling_never_uses_the_global_rng() -> None:
    torch.manual_seed(123)
    global_state = torch.get_rng_state()
    params = [SamplingParams(seed=7)]
    sample(random_logits(1), params, [make_generator(7)])
    make_generator(None)
    assert torch.equal(torch.get_rng_state(), global_state)


def draw(
    logits: torch.Tensor, params: list[SamplingParams], gens: list[torch.Generator | None], steps: int
) -> torch.Tensor:
    processed = process_logits(logits, params)
    return torch.stack([sample(processed, params, gens) for _ in range(steps)], dim=-1)  # [B, steps]


def test_seeded_sampling_repeats_exactly() -> None:
    logits = random_logits(1, seed=7, scale=1.0)
    params = [SamplingParams(seed=42, temperature=1.0)]
    a = draw(logits, params, [make_generator(42)], 50)
    b = draw(logits, params, [make_generator(42)], 50)
    c = draw(logits, params, [make_generator(43)], 50)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert len(set(a[0].tolist())) > 5  # really sampling, not a constant


def test_seeded_row_is_independent_of_batch_composition() -> None:
    row = random_logits(1, seed=8, scale=1.0)
    target = SamplingParams(seed=1234, temperature=0.9, top_p=0.95)
    alone = draw(row, [target], [make_generator(1234)], 30)
    others = random_logits(4, seed=9)
    batch = torch.cat([others[:2], row, others[2:]])
    params = [
        SamplingParams(temperature=0.0),
        SamplingParams(seed=1, top_k=5),
        target,
        SamplingParams(temperature=1.5),
        SamplingParams(seed=99, min_p=0.1),
    ]
    gens = [None, make_generator(1), make_generator(1234), make_generator(None), make_generator(99)]
    together = draw(batch, params, gens, 30)
    assert torch.equal(together[2], alone[0])


def test_sampling_row_without_generator_is_an_error() -> None:
    with pytest.raises(ValueError, match="row 0"):
        sample(random_logits(1), [SamplingParams()], [None])


def test_empirical_frequencies_match_processed_distribution() -> None:
    logits = torch.tensor([[2.0, 1.5, 1.0, 0.2, -0.5, 0.8, -3.0, 1.9]])
    params = [SamplingParams(temperature=0.8, top_k=6, top_p=0.95)]
    expected = process_logits(logits, params).softmax(-1)[0].double()  # [V]
    rows, steps = 500, 40
    gens: list[torch.Generator | None] = [make_generator(seed) for seed in range(rows)]
    tokens = draw(logits.expand(rows, -1), params * rows, gens, steps)
    counts = torch.bincount(tokens.flatten(), minlength=8).double()
    n = rows * steps
    kept = expected > 0
    assert counts[~kept].sum() == 0  # masked tokens never drawn
    chi2 = float((((counts - n * expected) ** 2)[kept] / (n * expected[kept])).sum())
    assert int(kept.sum()) == 5  # top_p removed one more token after top_k
    assert chi2 < 18.5  # df = 4: the 99.9% quantile is 18.47; fixed seeds make this deterministic


def test_make_generator_is_seed_deterministic() -> None:
    a = torch.rand(4, generator=make_generator(5))
    b = torch.rand(4, generator=make_generator(5))
    assert torch.equal(a, b)
    assert not torch.equal(torch.rand(4, generator=make_generator(None)), torch.rand(4, generator=make_generator(None)))
    assert torch.equal(
        torch.rand(2, generator=make_generator(-1)), torch.rand(2, generator=make_generator((1 << 64) - 1))
    )


# ---- logprobs ----------------------------------------------------------------------------------------


def test_logprobs_match_log_softmax_and_are_sorted() -> None:
    logits = random_logits(3, seed=10)
    tokens = torch.tensor([5, 0, 63])
    chosen, top_ids, top_lp = compute_logprobs(logits, tokens, 7)
    ref = torch.log_softmax(logits.double(), dim=-1).float()
    torch.testing.assert_close(chosen, ref[torch.arange(3), tokens])
    torch.testing.assert_close(top_lp, ref.gather(-1, top_ids))
    assert bool((top_lp[:, :-1] >= top_lp[:, 1:]).all())
    for row in range(3):
        best = sorted(range(V), key=lambda i: -float(ref[row, i]))[:7]
        assert top_ids[row].tolist() == best
    assert top_ids.shape == (3, 7) and top_ids.dtype == torch.int64


def test_logprobs_are_of_the_raw_distribution_and_top_n_zero_is_empty() -> None:
    logits = random_logits(2, seed=11)
    processed = process_logits(logits, [SamplingParams(temperature=0.5, top_k=3)] * 2)
    tokens = sample(processed, [SamplingParams(temperature=0.0)] * 2, [None, None])
    chosen, top_ids, top_lp = compute_logprobs(logits, tokens, 0)
    torch.testing.assert_close(chosen, torch.log_softmax(logits, -1).gather(-1, tokens[:, None])[:, 0])
    assert top_ids.shape == (2, 0) and top_lp.shape == (2, 0)


def test_plain_greedy_rows_pick_what_the_full_path_picks():
    """pick_tokens' shortcut for greedy rows with nothing that changes or masks their logits: the same
    tokens as temperature -> top-k/top-p -> draw, ties at the top to the first index; a row with a bias
    takes it (its token moves)."""
    from chartok import CharTokenizer

    from tramontane.decoding.sequence import SequenceState, pick_tokens

    logits = torch.randn(3, 40, generator=torch.Generator().manual_seed(3))
    logits[1, [4, 9]] = logits[1].max() + 1.0  # a tie at the top: index 4 first
    plain = SamplingParams(temperature=0.0, max_tokens=4)
    states = [SequenceState(i, [1, 2], plain, CharTokenizer(), 64) for i in range(3)]
    tokens, logprobs = pick_tokens(states, logits, CharTokenizer())
    full = sample(process_logits(logits, [plain] * 3), [plain] * 3, [None] * 3)
    assert tokens.tolist() == full.tolist() == logits.argmax(-1).tolist() and tokens[1] == 4
    assert logprobs == [None] * 3
    biased = dataclasses.replace(plain, logit_bias=((7, 100.0),))
    states[2] = SequenceState(2, [1, 2], biased, CharTokenizer(), 64)
    assert pick_tokens(states, logits, CharTokenizer())[0].tolist() == [*full[:2].tolist(), 7]
    # a batch's rows of a real vocabulary, as a view of a larger step's logits (non-contiguous too),
    # and bfloat16: the shortcut's int64 tokens are torch's argmax, a row of -inf and a NaN included
    wide = torch.randn(17, 49152, generator=torch.Generator().manual_seed(4))
    wide[2] = float("-inf")
    wide[5, 100], wide[5, 7] = float("nan"), float("nan")
    states = [SequenceState(i, [1], plain, CharTokenizer(), 64) for i in range(16)]
    for rows in (wide[:16], wide[1:][::1].t().contiguous().t()[:16], wide[:16].bfloat16()):
        tokens, _ = pick_tokens(states, rows, CharTokenizer())
        assert tokens.dtype == torch.int64 and tokens.tolist() == rows.float().argmax(-1).tolist()
    assert pick_tokens(states, wide[:16], CharTokenizer())[0][5] == 7  # the first NaN


def test_greedy_rows_with_a_logit_bias_pick_what_the_full_path_picks():
    """pick_tokens' shortcut for greedy rows whose only change is a logit_bias (a served request banning
    tokens): the tokens of apply_logit_bias -> temperature -> draw, row by row: the top banned, a token
    forced, a tie made by the bias (the first index wins), no bias beside biased rows."""
    from chartok import CharTokenizer

    from tramontane.decoding.sequence import SequenceState, pick_tokens

    logits = torch.randn(4, 49152, generator=torch.Generator().manual_seed(5))
    top = logits.argmax(-1).tolist()
    logits[2, 900], logits[2, 300] = 10.0, 8.5  # with +1.5, 300 ties 900 at the top, exactly
    plain = SamplingParams(temperature=0.0, max_tokens=4)
    biases = [
        ((top[0], -100.0), (17, -100.0)),  # the top banned: the runner-up
        ((12345, 100.0),),  # forced
        ((300, 1.5),),  # a tie with 900: 300 comes first
        (),
    ]
    params = [dataclasses.replace(plain, logit_bias=b) for b in biases]
    states = [SequenceState(i, [1], p, CharTokenizer(), 64) for i, p in enumerate(params)]
    tokens, _ = pick_tokens(states, logits, CharTokenizer())
    full = sample(process_logits(apply_logit_bias(logits, params), params), params, [None] * 4)
    assert tokens.tolist() == full.tolist()
    assert tokens[0] != top[0] and tokens[1] == 12345 and tokens[2] == 300 and tokens[3] == top[3]


def test_a_biased_row_s_argmax_from_its_plain_one_is_the_copied_row_s():
    """biased_argmax (the plain argmax, then the biased entries as its only rivals) against the row
    copied, biased with np.add.at and argmax'd, on rows built to meet each branch: the top biased, a
    biased entry tying the top before or after it, NaNs in the row or made by nothing, ties of integers,
    a banned whole row of equal values, a token named twice, a token past the row (numpy's IndexError
    either way); one row at a time and all of a bias's rows at once."""
    import numpy as np

    from tramontane.decoding.sequence import biased_argmax

    def biased_row_argmax(row, bias, top):
        return int(biased_argmax(row[None], np.array([0]), bias, np.array([top]))[0])

    def copied(row, bias):
        row = row.copy()
        np.add.at(row, np.array([t for t, _ in bias]), np.array([b for _, b in bias], np.float32))
        return int(row.argmax())

    rng = np.random.default_rng(7)
    taken = {"fast": 0, "copied": 0}
    for trial in range(400):
        n = int(rng.integers(1, 70))
        row = rng.standard_normal(n).astype(np.float32)
        if trial % 3 == 0:
            row = np.round(row * 2).astype(np.float32)  # ties everywhere
        if trial % 10 == 0:
            row[rng.integers(n)] = np.nan
        if trial % 13 == 0:
            row[:] = 1.0
        ids = sorted({int(t) for t in rng.integers(0, n, int(rng.integers(1, 4)))})
        bias = tuple((t, float(rng.choice([-100.0, -1.0, 0.0, 0.5, 1.0, 100.0]))) for t in ids)
        top = int(row.argmax())
        if trial % 4 == 1 and row[top] == row[top]:  # a biased entry lifted exactly onto the top
            t = ids[0]
            bias = ((t, float(row[top] - row[t])),) + bias[1:] if t != top else bias
        if trial % 17 == 0:
            bias = bias + ((ids[0], 0.5),)  # a token named twice: add.at sums both
        got = biased_row_argmax(row, bias, top)
        assert got == copied(row, bias), (trial, row, bias)
        fast = row[top] == row[top] and top not in ids
        taken["fast" if fast else "copied"] += 1
    assert min(taken.values()) > 40  # both branches met
    with pytest.raises(IndexError):
        biased_row_argmax(np.zeros(4, np.float32), ((9, 1.0),), 0)
    # a batch: 16 rows sharing one bias, some of them with the top banned or a NaN, at once
    rows = rng.standard_normal((16, 300)).astype(np.float32)
    bias = tuple((int(t), -100.0) for t in rng.choice(300, 17, replace=False))
    rows[3, bias[0][0]] = 50.0
    rows[7, 11] = np.nan
    rows[9, bias[1][0]] = rows[9].max() + 100.0 - 100.0 + 0.0
    at = np.arange(16)
    got = biased_argmax(rows, at, bias, rows.argmax(axis=1))
    assert got.tolist() == [copied(rows[i], bias) for i in range(16)]
