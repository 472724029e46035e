"""How much background work (embeddings, prompt scoring) a step may carry beside generating requests.

Generation comes first: while requests are generating, a step takes background tokens only up to what
keeps it within about twice a step without them, so their inter-token latency at most doubles. Both
costs are measured as moving averages: `base`, the seconds of a step with no background token, and
`per_token`, the extra seconds each background token adds.

    pace = Pace(floor=4, ceiling=512)
    pace.observe(0.050, 0)    # a decode step alone: base 50 ms
    pace.observe(0.110, 20)   # 20 background tokens added 60 ms: 3 ms each
    pace.tokens()             # 16: about base / per_token
"""

from __future__ import annotations


class Pace:
    def __init__(self, *, floor: int, ceiling: int, weight: float = 0.2) -> None:
        self.floor, self.ceiling, self.weight = floor, ceiling, weight
        self.base: float | None = None
        self.per_token: float | None = None

    def observe(self, seconds: float, background_tokens: int) -> None:
        """One step's duration and how many background tokens it carried."""
        if background_tokens == 0:
            self.base = self._average(self.base, seconds)
        elif self.base is not None:
            self.per_token = self._average(self.per_token, max(seconds - self.base, 0.0) / background_tokens)

    def tokens(self) -> int:
        """Background tokens the next step may carry beside generating requests."""
        if self.base is None or self.per_token is None:
            return self.floor  # not measured yet: a small chunk, which measures it
        allowed = int(self.base / max(self.per_token, 1e-9))
        return max(self.floor, min(self.ceiling, allowed))

    def _average(self, old: float | None, new: float) -> float:
        return new if old is None else old + self.weight * (new - old)
