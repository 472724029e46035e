"""How much background work (embeddings, prompt scoring) a step may carry beside generating requests.

Generation comes first: while requests are generating, steps take background tokens only as long as a
step stays within `target` times a step without them, so their inter-token latency at most doubles.
The cost of background tokens is not linear (a step of 8 decode tokens and 4 prompt tokens may switch
the matmuls from their vector to their matrix kernels), so rather than modelling it the pace steers by
what it measures, additive increase and multiplicative decrease as TCP does:

- `base`: a moving average of the seconds of a step with no background token (one step in
  `probe_every` carries none, to keep it current);
- `allowance`: background tokens per step, +10% (at least +1) after a step within the target,
  x0.7 after one over it. Below `floor` tokens it becomes a duty cycle: a `floor`-token chunk every
  few steps, so a slow machine still makes progress.

    pace = Pace(floor=4, ceiling=512)
    pace.observe(0.050, 0)    # a decode step alone: base 50 ms
    n = pace.tokens()         # 4 to start with
    pace.observe(0.080, n)    # within 2 x 50 ms: the allowance grows
"""

from __future__ import annotations


class Pace:
    def __init__(
        self, *, floor: int, ceiling: int, target: float = 2.0, weight: float = 0.2, probe_every: int = 16
    ) -> None:
        self.floor, self.ceiling, self.target, self.weight = floor, max(floor, ceiling), target, weight
        self.probe_every = probe_every
        self.base: float | None = None
        self.allowance = float(floor)
        self._credit = 0.0  # duty cycle: fractions of a chunk saved up while the allowance is below the floor
        self._steps = 0

    def observe(self, seconds: float, background_tokens: int) -> None:
        """One step's duration (while requests were generating) and the background tokens it carried."""
        if background_tokens == 0:
            self.base = seconds if self.base is None else self.base + self.weight * (seconds - self.base)
        elif self.base is not None:
            if seconds > self.target * self.base:
                self.allowance = max(self.allowance * 0.7, self.floor / 64)
            else:
                self.allowance = min(self.allowance + max(1.0, 0.1 * self.allowance), self.ceiling)

    def tokens(self) -> int:
        """Background tokens the next step may carry beside generating requests (0: none this step)."""
        self._steps += 1
        if self.base is None or self._steps % self.probe_every == 0:
            return 0  # measure a step without background work
        if self.allowance >= self.floor:
            return int(self.allowance)
        self._credit += self.allowance
        if self._credit >= self.floor:
            self._credit -= self.floor
            return self.floor
        return 0
