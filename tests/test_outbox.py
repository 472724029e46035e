"""engine/outbox.py: items put from another thread reach the loop in order, none lost, with the pipe
wake-up and with the call_soon_threadsafe fallback."""

from __future__ import annotations

import asyncio
import threading

import pytest

from tramontane.engine import outbox


@pytest.mark.parametrize("pipe", [True, False])
def test_every_item_arrives_in_order(pipe, monkeypatch):
    if not pipe:
        monkeypatch.setattr(outbox, "_write", None)
    got: list[int] = []
    n = 20000

    async def main() -> None:
        box = outbox.Outbox(asyncio.get_running_loop(), got.append)
        assert (box._fds is not None) is pipe
        producer = threading.Thread(target=lambda: [box.put(i) for i in range(n)])
        producer.start()
        for _ in range(6000):  # poll (no wall-clock assertion): the loop drains as bytes arrive
            if len(got) == n:
                break
            await asyncio.sleep(0.005)
        producer.join()
        box.put(n)  # after the producer: close delivers what is still queued, then frees the pipe
        box.close()
        assert box._fds is None

    asyncio.run(main())
    assert got == list(range(n + 1))
