"""Stop strings over streamed text.

`StopChecker` is fed the text deltas a detokenizer produces. It emits text as soon as it is certain
not to be part of a stop string, withholds any tail that could still grow into one, stops at the
earliest occurrence of any stop string (which may span several deltas), and never emits the stop
string itself, as OpenAI's API does.

"Earliest" means the first stop string to be completed as the text is read (the earliest end position;
on a tie, the one starting first), and the text is cut where that occurrence starts. This is what a
character-by-character stream would do, so the result never depends on how the text was split into
deltas. (Stop strings "cd" and "abcdef" on "xxabcdefyy": "cd" completes first, the output is "xxab".)

Worked example with stop strings ("###",):

    push("Hello #")  -> ("Hello ", False)   "#" is withheld: it may start "###"
    push("# no")     -> ("## no", False)    "## n" cannot be "###": released
    push(" ##")      -> (" ", False)        "##" withheld again
    push("#!")       -> ("", True)          "###" completed: stop, nothing after it is emitted
"""

from __future__ import annotations

from collections.abc import Sequence

from ..errors import RequestError


class StopChecker:
    """Streaming stop-string matcher. Text is counted in Python characters (code points)."""

    def __init__(self, stop_strings: Sequence[str]) -> None:
        for s in stop_strings:
            if not isinstance(s, str) or not s:
                raise RequestError(f"stop strings must be non-empty strings, got {s!r}")
        self._stops = tuple(stop_strings)
        self._held = ""
        self.stopped = False
        self.matched: str | None = None  # the stop string that ended the text, once stopped

    def push(self, delta: str) -> tuple[str, bool]:
        """Feed the next piece of text; return (text safe to emit now, whether a stop string was hit).

        After a stop every further push returns ("", True)."""
        if self.stopped:
            return "", True
        text = self._held + delta
        start, matched = _earliest_match(text, self._stops)
        if matched is not None:
            self.stopped, self.matched, self._held = True, matched, ""
            return text[:start], True
        cut = _partial_start(text, self._stops)
        self._held = text[cut:]
        return text[:cut], False

    def flush(self) -> str:
        """Release the withheld tail at the end of generation (empty after a stop)."""
        held, self._held = self._held, ""
        return "" if self.stopped else held


def _earliest_match(text: str, stops: Sequence[str]) -> tuple[int, str | None]:
    """(start, stop string) of the first occurrence to complete: least end, then least start."""
    best: tuple[int, int] | None = None
    matched = None
    for s in stops:
        i = text.find(s)  # the first occurrence of s also ends first
        if i != -1 and (best is None or (i + len(s), i) < best):
            best, matched = (i + len(s), i), s
    return (best[1] if best else len(text)), matched


def _partial_start(text: str, stops: Sequence[str]) -> int:
    """Smallest i such that text[i:] is a proper prefix of some stop string (len(text) if none)."""
    best = len(text)
    for s in stops:
        i = text.find(s[0], max(0, len(text) - len(s) + 1))
        while i != -1 and i < best:
            if s.startswith(text[i:]):
                best = i
                break
            i = text.find(s[0], i + 1)
    return best
