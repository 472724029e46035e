"""StopChecker: streaming stop strings, checked against a whole-text reference."""

from __future__ import annotations

import random

import pytest

from tramontane.decoding.stops import StopChecker
from tramontane.errors import RequestError


def run(stops: list[str], deltas: list[str]) -> tuple[list[str], bool, str]:
    """Feed every delta; return the emitted pieces, whether it stopped, and the full emitted text."""
    checker = StopChecker(stops)
    pieces, stopped = [], False
    for delta in deltas:
        text, stopped = checker.push(delta)
        pieces.append(text)
        if stopped:
            break
    if not stopped:
        pieces.append(checker.flush())
    return pieces, stopped, "".join(pieces)


def reference(stops: list[str], text: str) -> tuple[str, bool]:
    """Whole-text answer, by brute force over prefixes: the first prefix that contains a stop string
    is cut at the earliest start of a stop string inside it."""
    for end in range(len(text) + 1):
        starts = [i for s in stops if (i := text[:end].find(s)) != -1]
        if starts:
            return text[: min(starts)], True
    return text, False


def test_stop_string_spanning_several_deltas() -> None:
    pieces, stopped, text = run(["STOP"], ["abc S", "T", "O", "P tail"])
    assert stopped and text == "abc "
    assert pieces == ["abc ", "", "", ""]


def test_partial_prefix_is_withheld_then_released() -> None:
    checker = StopChecker(["###"])
    assert checker.push("Hello #") == ("Hello ", False)
    assert checker.push("#") == ("", False)
    assert checker.push(" no") == ("## no", False)
    assert checker.push(" ##") == (" ", False)
    assert checker.flush() == "##"
    assert checker.flush() == ""


def test_multiple_stop_strings_earliest_wins() -> None:
    _, stopped, text = run(["world", "lo w"], ["hel", "lo wor", "ld"])
    assert stopped and text == "hel"
    checker = StopChecker(["bc", "abcd"])
    assert checker.push("xab") == ("x", False)  # "ab" could still become "abcd"
    assert checker.push("c") == ("xa"[1:], True)  # "bc" completes first: emits "a"
    assert checker.matched == "bc"


def test_first_completed_stop_wins_within_one_delta() -> None:
    checker = StopChecker(["cd", "abcdef"])
    assert checker.push("xxabcdefyy") == ("xxab", True)
    assert checker.matched == "cd"
    checker = StopChecker(["bcd", "ab"])
    assert checker.push("zabcd") == ("z", True)
    assert checker.matched == "ab"
    checker = StopChecker(["bc", "abc"])  # both complete at the same character: cut at the earlier start
    assert checker.push("xabcz") == ("x", True)
    assert checker.matched == "abc"


def test_result_does_not_depend_on_delta_boundaries() -> None:
    text, stops = "xxabcdefyy", ["cd", "abcdef"]
    for split in range(len(text) + 1):
        assert run(stops, [text[:split], text[split:]])[1:] == (True, "xxab")
    assert run(stops, list(text))[1:] == (True, "xxab")


def test_stop_at_the_very_start() -> None:
    assert run(["<end>"], ["<end>", "more"])[1:] == (True, "")
    assert run(["<end>"], ["<e", "nd>more"])[1:] == (True, "")


def test_pushes_after_a_stop_emit_nothing() -> None:
    checker = StopChecker(["x"])
    assert checker.push("axb") == ("a", True)
    assert checker.push("more") == ("", True)
    assert checker.flush() == "" and checker.stopped


def test_unicode_stop_strings() -> None:
    _, stopped, text = run(["🛑 fin", "終わり"], ["Bonjour 🛑", " fi", "n! encore"])
    assert stopped and text == "Bonjour "
    _, stopped, text = run(["終わり"], ["物語は終", "わ", "りです"])
    assert stopped and text == "物語は"
    checker = StopChecker(["é!"])
    assert checker.push("café") == ("caf", False)
    assert checker.push("s") == ("és", False)


def test_no_stop_strings_passes_everything_through() -> None:
    assert run([], ["a", "b", ""]) == (["a", "b", "", ""], False, "ab")


def test_false_start_inside_a_withheld_prefix() -> None:
    # "aba" is a prefix of "abac"; when "bac" arrives the stop begins at the second "a".
    checker = StopChecker(["abac"])
    assert checker.push("aba") == ("", False)
    assert checker.push("bac!") == ("ab", True)


def test_empty_stop_string_rejected() -> None:
    with pytest.raises(RequestError):
        StopChecker(["ok", ""])


@pytest.mark.parametrize("seed", range(5))
def test_random_streams_match_whole_text_reference(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(200):
        text = "".join(rng.choice("abcé🙂 ") for _ in range(rng.randint(0, 30)))
        stops = ["".join(rng.choice("abcé🙂") for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(0, 3))]
        cuts = sorted(rng.sample(range(len(text) + 1), k=min(len(text) + 1, rng.randint(0, 6))))
        deltas = [text[i:j] for i, j in zip([0, *cuts], [*cuts, len(text)])]
        _, stopped, emitted = run(stops, deltas)
        assert (emitted, stopped) == reference(stops, text), (stops, deltas)
