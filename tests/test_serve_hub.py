"""The hub on a real event loop with a real publishing thread: order, filters, bounded queues."""

from __future__ import annotations

import asyncio
import gc
import json
import threading
import time

from neuroscope.hub import Dropped, Hub, LoopBatcher, Published
from neuroscope.records import Feature, GenerationComplete, TokenFeatures


def record(
    i: int, request_id: str = "chatcmpl-a", layer: int = 2, phase: str = "generation"
) -> TokenFeatures:
    return TokenFeatures(
        request_id=request_id, position=i, phase=phase, token=f"t{i}", token_id=i, layer=layer,  # type: ignore[arg-type]
        sae="sae", top_features=[Feature(index=i, activation=1.5, label=f"feature_{i}")],
        token_index=i if phase == "generation" else None,
    )  # fmt: skip


def publish_from_thread(hub: Hub, events: list) -> float:
    """Publish on another thread, as the engine does; return how long publishing took."""
    took = []

    def run() -> None:
        start = time.perf_counter()
        for event in events:
            hub.publish(event)
        took.append(time.perf_counter() - start)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    return took[0]


async def drain(sub, until: int, timeout: float = 5.0) -> list:
    items: list = []
    deadline = time.monotonic() + timeout
    while sum(1 for i in items if isinstance(i, Published)) < until:
        got = await sub.get(timeout=max(deadline - time.monotonic(), 0.01))
        assert got is not None and time.monotonic() < deadline, f"got {len(items)} of {until}"
        items.extend(got)
    return items


def test_events_from_a_thread_arrive_in_order_encoded_once_as_the_wire_json() -> None:
    async def main() -> None:
        hub = Hub()
        sub = hub.subscribe()
        events = [record(i) for i in range(300)] + [
            GenerationComplete("chatcmpl-a", "stop", 5, 300)
        ]
        publish_from_thread(hub, events)
        items = await drain(sub, len(events))
        assert [i.event for i in items] == events
        assert [json.loads(i.data) for i in items] == [e.to_dict() for e in events]
        assert [i.name for i in items] == ["feature_activation"] * 300 + ["generation_complete"]

    asyncio.run(main())


def test_a_stalled_subscriber_loses_the_oldest_is_told_how_many_and_never_blocks_the_publisher() -> (
    None
):
    async def main() -> None:
        hub = Hub(max_queue=5)
        stalled = hub.subscribe()
        keeping_up = hub.subscribe(max_queue=100_000)
        events = [record(i) for i in range(20_000)]
        took = publish_from_thread(hub, events)
        # 20k publishes while a subscriber reads nothing: the publisher never waits on it.
        assert took < 2.0
        fast = await drain(keeping_up, len(events))
        assert [i.event for i in fast] == events
        got = await stalled.get(timeout=1)
        assert got is not None
        assert got[0] == Dropped(len(events) - 5)
        assert [i.event for i in got[1:]] == events[-5:]
        assert stalled.dropped_total == len(events) - 5
        hub.publish(record(99_999))
        again = await stalled.get(timeout=1)
        assert [type(i) for i in again] == [Published]  # the drop count was reported once

    asyncio.run(main())


def test_filters_subscribers_and_close() -> None:
    async def main() -> None:
        hub = Hub()
        only_b = hub.subscribe(lambda e: e.request_id == "chatcmpl-b")
        everything = hub.subscribe()
        events = [record(0, "chatcmpl-a"), record(1, "chatcmpl-b"), record(2, "chatcmpl-a")]
        publish_from_thread(hub, events)
        assert [i.event for i in await drain(everything, 3)] == events
        assert [i.event for i in await only_b.get(timeout=1)] == [events[1]]
        assert await only_b.get(timeout=0.05) == []  # nothing new: time for a keep-alive
        hub.publish(record(3, "chatcmpl-b"))
        hub.close()
        assert [i.event.position for i in await only_b.get(timeout=1)] == [3]  # drained first
        assert await only_b.get(timeout=1) is None
        assert hub.subscriber_count == 0
        late = hub.subscribe()
        assert await late.get(timeout=1) is None

    asyncio.run(main())


def test_ten_subscribers_receive_identical_streams() -> None:
    async def main() -> None:
        hub = Hub()
        subs = [hub.subscribe() for _ in range(10)]
        events = [record(i, f"chatcmpl-{i % 3}") for i in range(500)]
        publish_from_thread(hub, events)
        streams = [[(i.name, i.data) for i in await drain(s, len(events))] for s in subs]
        assert all(s == streams[0] for s in streams)
        assert len(streams[0]) == len(events)

    asyncio.run(main())


def test_a_subscription_nobody_holds_stops_collecting() -> None:
    async def main() -> None:
        hub = Hub()
        hub.subscribe()  # e.g. a client that left before its stream started
        gc.collect()
        assert hub.subscriber_count == 0

    asyncio.run(main())


def test_batcher_after_its_loop_closed_drops_quietly() -> None:
    loop = asyncio.new_event_loop()
    got: list[list[int]] = []
    batcher: LoopBatcher[int] = LoopBatcher(loop, got.append)
    batcher.put(1)
    loop.run_until_complete(asyncio.sleep(0.01))
    assert got == [[1]]
    loop.close()
    batcher.put(2)
    batcher.put(3)  # no error, and nothing piles up
    assert batcher._items == []
