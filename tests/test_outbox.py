"""engine/outbox.py: items put and flushed from another thread reach the loop in order, none lost, with
the pipe wake-up and with the call_soon_threadsafe fallback; an item put waits for its flush."""

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

        def produce() -> None:  # flushes now and then, as the engine does before each forward
            for i in range(n):
                box.put(i)
                if i % 7 == 0 or i == n - 1:
                    box.flush()

        producer = threading.Thread(target=produce)
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


@pytest.mark.parametrize("pipe", [True, False])
def test_an_item_put_waits_for_its_flush(pipe, monkeypatch):
    if not pipe:
        monkeypatch.setattr(outbox, "_write", None)
    got: list[int] = []

    async def main() -> None:
        box = outbox.Outbox(asyncio.get_running_loop(), got.append)
        await asyncio.to_thread(box.put, 1)
        for _ in range(20):  # the loop runs, and nothing woke it
            await asyncio.sleep(0)
        assert got == []
        await asyncio.to_thread(box.flush)
        for _ in range(6000):  # poll (no wall-clock assertion)
            if got:
                break
            await asyncio.sleep(0.005)
        assert got == [1]
        await asyncio.to_thread(box.flush)  # nothing put since: no wake-up, nothing delivered twice
        await asyncio.sleep(0.01)
        assert got == [1]
        box.close()

    asyncio.run(main())
