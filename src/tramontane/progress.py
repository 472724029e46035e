"""Progress of the long jobs a user waits on (convert, merge, quantize, eval): a tqdm bar on stderr when
it is a terminal, otherwise a plain line at every tenth of the way (logs and pipes get no carriage
returns). Off unless the caller asks (`show`): library calls stay silent."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")


class Progress:
    """Counts `total` steps of `desc` (unit: what a step is); use as a context manager."""

    def __init__(self, total: int | None, desc: str, unit: str, show: bool) -> None:
        self.total, self.desc, self.unit, self.done = total, desc, unit, 0
        self._bar: Any = None
        self._plain = show and not sys.stderr.isatty()
        self._next_line = 0
        if show and not self._plain:
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=desc, unit=f" {unit}", file=sys.stderr, leave=False)

    def update(self, n: int = 1) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
        elif self._plain and (self.done >= self._next_line or self.done == self.total):
            of = f"/{self.total}" if self.total else ""
            print(f"{self.desc}: {self.done}{of} {self.unit}", file=sys.stderr, flush=True)
            step = max(1, (self.total or 500) // 10)
            self._next_line = (self.done // step + 1) * step

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def tracked(items: Iterable[T], total: int | None, desc: str, unit: str, show: bool) -> Iterator[T]:
    """`items`, counting each one as a step of `desc`."""
    with Progress(total, desc, unit, show) as progress:
        for item in items:
            yield item
            progress.update()
