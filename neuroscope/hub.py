"""Fan-out of feature records from the engine thread to asyncio subscribers (SSE clients).

The engine must never wait on a subscriber. ``Hub.publish`` only appends to a list under a lock and,
at most once per burst, wakes the event loop; the loop then encodes each event to JSON once and
offers it to every subscriber. Each subscriber has a bounded queue: when it is full the oldest event
is dropped and counted, and the subscriber's next read starts with a ``Dropped`` notice saying how
many it lost. A stalled client therefore costs a bounded amount of memory and no generation time.
"""

from __future__ import annotations

import asyncio
import threading
import weakref
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from neuroscope.records import GenerationComplete, TokenFeatures
from neuroscope.steering import MonitorEvent

DEFAULT_SUBSCRIBER_QUEUE = 4096  # events; about two long prompts' worth of records

HubEvent = TokenFeatures | GenerationComplete | MonitorEvent
T = TypeVar("T")

EVENT_NAMES = {
    TokenFeatures: "feature_activation",
    GenerationComplete: "generation_complete",
    MonitorEvent: "monitor",
}


class LoopBatcher(Generic[T]):
    """Hands items put from any thread to ``deliver`` on an event loop, in order, in batches.

    Why batches: a prompt yields hundreds of records at once; waking the loop per record would cost
    a system call each. The producer pays one lock and, only when no delivery is already scheduled,
    one ``call_soon_threadsafe``.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, deliver: Callable[[list[T]], None]):
        self._loop = loop
        self._deliver = deliver
        self._lock = threading.Lock()
        self._items: list[T] = []
        self._scheduled = False
        self._dead = False

    def put(self, item: T) -> None:
        with self._lock:
            if self._dead:
                return
            self._items.append(item)
            if self._scheduled:
                return
            self._scheduled = True
        try:
            self._loop.call_soon_threadsafe(self._flush)
        except RuntimeError:  # the loop is closed: nobody will read these, so stop collecting them
            with self._lock:
                self._dead = True
                self._items.clear()

    def _flush(self) -> None:
        with self._lock:
            items, self._items = self._items, []
            self._scheduled = False
        if items:
            self._deliver(items)

    def flush_now(self) -> None:
        """Deliver what is waiting without waiting for the scheduled call (on the loop only)."""
        self._flush()


@dataclass(frozen=True, slots=True)
class Published:
    """One event as subscribers receive it: the object (to filter on) and its JSON, encoded once."""

    event: HubEvent
    name: str  # SSE event name: feature_activation | generation_complete
    data: str


@dataclass(frozen=True, slots=True)
class Dropped:
    """This many events (the oldest) were discarded because the subscriber fell behind."""

    count: int


def encode(event: HubEvent) -> Published:
    data = event.to_json()  # msgspec, compact UTF-8: no dict is built per record
    return Published(event, EVENT_NAMES[type(event)], data)


class Subscription:
    """One subscriber's bounded view of the hub. Use ``async with`` so it always unsubscribes."""

    def __init__(self, hub: Hub, accept: Callable[[HubEvent], bool], max_queue: int):
        if max_queue < 1:
            raise ValueError(f"max_queue must be at least 1, got {max_queue}.")
        self._hub = hub
        self._accept = accept
        self._queue: deque[Published] = deque()
        self._max_queue = max_queue
        self._dropped = 0
        self._closed = False
        self._ready = asyncio.Event()
        self.dropped_total = 0  # for diagnostics and tests

    def _offer(self, item: Published) -> None:
        """Called on the loop by the hub; never blocks, never grows past ``max_queue``."""
        if self._closed or not self._accept(item.event):
            return
        if len(self._queue) >= self._max_queue:
            self._queue.popleft()
            self._dropped += 1
            self.dropped_total += 1
        self._queue.append(item)
        self._ready.set()

    async def get(self, timeout: float | None = None) -> list[Published | Dropped] | None:
        """Everything queued (a ``Dropped`` notice first if events were lost).

        Returns ``[]`` if ``timeout`` passes with nothing new (time for a keep-alive) and ``None``
        once the subscription is closed and drained.
        """
        if not self._queue and not self._dropped and not self._closed:
            self._ready.clear()
            try:
                await asyncio.wait_for(self._ready.wait(), timeout)
            except asyncio.TimeoutError:
                return []
        if not self._queue and not self._dropped:
            return None
        out: list[Published | Dropped] = []
        if self._dropped:
            out.append(Dropped(self._dropped))
            self._dropped = 0
        out.extend(self._queue)
        self._queue.clear()
        return out

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Stop receiving; a pending ``get`` returns what is left, then ``None``."""
        self._closed = True
        self._ready.set()
        self._hub._remove(self)

    async def __aenter__(self) -> Subscription:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()


def accept_all(event: HubEvent) -> bool:
    return True


class Hub:
    """Publish from any thread; subscribe on one asyncio loop (the first ``subscribe`` binds it)."""

    def __init__(self, max_queue: int = DEFAULT_SUBSCRIBER_QUEUE):
        self.max_queue = max_queue
        # Weak: a subscription whose stream was dropped without closing (a client that left before
        # its response started) must not keep collecting events.
        self._subscribers: weakref.WeakSet[Subscription] = weakref.WeakSet()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._batcher: LoopBatcher[HubEvent] | None = None
        self._closed = False

    def subscribe(
        self, accept: Callable[[HubEvent], bool] = accept_all, max_queue: int | None = None
    ) -> Subscription:
        """A new subscription that sees every later event ``accept`` returns True for.

        Call on the event loop. The subscription is live when this returns: nothing published after
        this point is missed (unless dropped for lack of room, which the subscriber is told).
        """
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = loop
            self._batcher = LoopBatcher(loop, self._fan_out)
        elif loop is not self._loop:
            raise RuntimeError(
                "A Hub serves one event loop; subscribe from the loop it was bound to."
            )
        sub = Subscription(self, accept, max_queue or self.max_queue)
        if self._closed:
            sub._closed = True
        else:
            self._subscribers.add(sub)
        return sub

    def publish(self, event: HubEvent) -> None:
        """Thread-safe and non-blocking; a no-op while nobody subscribes."""
        batcher = self._batcher
        if batcher is None or not self._subscribers or self._closed:
            return
        batcher.put(event)

    def _fan_out(self, events: list[HubEvent]) -> None:
        subscribers = list(self._subscribers)
        if not subscribers:
            return
        for event in events:
            item = encode(event)
            for sub in subscribers:
                sub._offer(item)

    def _remove(self, sub: Subscription) -> None:
        self._subscribers.discard(sub)

    @property
    def subscriber_count(self) -> int:
        return len(self._subscribers)

    def close(self) -> None:
        """End every subscription (call on the loop): their streams finish what is queued and stop."""
        if self._batcher is not None:
            self._batcher.flush_now()  # events published before close still reach subscribers
        self._closed = True
        for sub in list(self._subscribers):
            sub.close()


__all__ = [
    "DEFAULT_SUBSCRIBER_QUEUE",
    "Dropped",
    "Hub",
    "HubEvent",
    "LoopBatcher",
    "Published",
    "Subscription",
    "encode",
]
