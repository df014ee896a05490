"""Fan-out of feature records from the engine thread to asyncio subscribers (SSE clients).

The engine must never wait on a subscriber. ``Hub.publish`` only appends to a list under a lock and,
at most once per burst, wakes the event loop; the loop then encodes each event to JSON once and
offers it to every subscriber. Each subscriber has a bounded queue: when it is full the oldest event
is dropped and counted, and the subscriber's next read starts with a ``Dropped`` notice saying how
many it lost. A stalled client therefore costs a bounded amount of memory and no generation time.

Every event gets a hub-wide id, increasing by one per published event, and the hub keeps the last
``replay`` events (a bounded ring, kept even while nobody subscribes). A subscriber that names the last
id it saw (SSE ``Last-Event-ID``) first receives the events after it that are still in the ring and
pass its filter, then the live ones; if the ring no longer reaches back that far, a ``Dropped`` notice
says how many events it missed. Hub-wide ids (rather than per subscriber) are what lets a *new*
connection resume where an old one stopped.
"""

from __future__ import annotations

import asyncio
import threading
import weakref
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from neuroscope.anomaly import AnomalyEvent
from neuroscope.records import GenerationComplete, TokenFeatures
from neuroscope.steering import MonitorEvent

DEFAULT_SUBSCRIBER_QUEUE = 4096  # events; about two long prompts' worth of records
DEFAULT_REPLAY = 4096  # events kept hub-wide for subscribers that reconnect with Last-Event-ID

HubEvent = TokenFeatures | GenerationComplete | MonitorEvent | AnomalyEvent
T = TypeVar("T")

EVENT_NAMES = {
    TokenFeatures: "feature_activation",
    GenerationComplete: "generation_complete",
    MonitorEvent: "monitor",
    AnomalyEvent: "anomaly",
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
    name: str  # SSE event name: feature_activation | generation_complete | monitor
    data: str
    id: int = 0  # hub-wide, increasing; the SSE ``id:``


@dataclass(frozen=True, slots=True)
class Dropped:
    """This many events (the oldest) were discarded because the subscriber fell behind."""

    count: int
    last_id: int = field(default=0, compare=False)  # the newest lost event's id


def encode(event: HubEvent, id: int = 0) -> Published:
    data = event.to_json()  # msgspec, compact UTF-8: no dict is built per record
    return Published(event, EVENT_NAMES[type(event)], data, id)


class _Entry:
    """An event in the replay ring; encoded once, when first fanned out or replayed."""

    __slots__ = ("event", "id", "published")

    def __init__(self, id: int, event: HubEvent):
        self.id = id
        self.event = event
        self.published: Published | None = None

    def encoded(self) -> Published:
        if self.published is None:
            self.published = encode(self.event, self.id)
        return self.published


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
        self._dropped_last_id = 0
        self._newest_id = 0  # the newest event offered: replayed events are not offered twice
        self._closed = False
        self._ready = asyncio.Event()
        self.dropped_total = 0  # for diagnostics and tests

    def _offer(self, item: Published) -> None:
        """Called on the loop by the hub; never blocks, never grows past ``max_queue``."""
        if self._closed or item.id <= self._newest_id or not self._accept(item.event):
            return
        self._newest_id = item.id
        if len(self._queue) >= self._max_queue:
            self._dropped_last_id = self._queue.popleft().id
            self._dropped += 1
            self.dropped_total += 1
        self._queue.append(item)
        self._ready.set()

    def _missed(self, count: int, last_id: int) -> None:
        """Events before the replay ring that a resuming subscriber can no longer get."""
        self._dropped += count
        self._dropped_last_id = max(self._dropped_last_id, last_id)
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
            out.append(Dropped(self._dropped, self._dropped_last_id))
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

    def __init__(self, max_queue: int = DEFAULT_SUBSCRIBER_QUEUE, replay: int = DEFAULT_REPLAY):
        if replay < 0:
            raise ValueError(f"replay must be at least 0, got {replay}.")
        self.max_queue = max_queue
        # Weak: a subscription whose stream was dropped without closing (a client that left before
        # its response started) must not keep collecting events.
        self._subscribers: weakref.WeakSet[Subscription] = weakref.WeakSet()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._batcher: LoopBatcher[_Entry] | None = None
        self._closed = False
        self._lock = threading.Lock()  # ids and the ring: the engine thread writes, the loop reads
        self._last_id = 0
        self._ring: deque[_Entry] = deque(maxlen=replay)

    @property
    def last_id(self) -> int:
        """The id of the newest published event (0 before the first)."""
        return self._last_id

    def subscribe(
        self,
        accept: Callable[[HubEvent], bool] = accept_all,
        max_queue: int | None = None,
        *,
        after: int | None = None,
    ) -> Subscription:
        """A new subscription that sees every later event ``accept`` returns True for.

        Call on the event loop. The subscription is live when this returns: nothing published after
        this point is missed (unless dropped for lack of room, which the subscriber is told). With
        ``after`` (a ``Last-Event-ID``), the events after that id still in the replay ring come
        first; an ``after`` newer than any event (a previous server's id) replays nothing.
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
        with self._lock:
            replay = list(self._ring) if after is not None and after < self._last_id else []
            if self._closed:
                sub._closed = True
            else:
                self._subscribers.add(sub)
        if replay:
            assert after is not None
            if replay[0].id > after + 1:
                sub._missed(replay[0].id - after - 1, replay[0].id - 1)
            for entry in replay:
                if entry.id > after:
                    sub._offer(entry.encoded())
        return sub

    def publish(self, event: HubEvent) -> None:
        """Thread-safe and non-blocking: gives the event its id, keeps it for replay, and hands it
        to the loop when someone subscribes."""
        with self._lock:
            if self._closed:
                return
            self._last_id += 1
            entry = _Entry(self._last_id, event)
            self._ring.append(entry)
            batcher = self._batcher
            if batcher is not None and self._subscribers:
                batcher.put(entry)

    def _fan_out(self, entries: list[_Entry]) -> None:
        subscribers = list(self._subscribers)
        if not subscribers:
            return
        for entry in entries:
            item = entry.encoded()
            for sub in subscribers:
                sub._offer(item)

    def _remove(self, sub: Subscription) -> None:
        with self._lock:
            self._subscribers.discard(sub)

    @property
    def subscriber_count(self) -> int:
        return len(self._subscribers)

    def close(self) -> None:
        """End every subscription (call on the loop): their streams finish what is queued and stop."""
        if self._batcher is not None:
            self._batcher.flush_now()  # events published before close still reach subscribers
        with self._lock:
            self._closed = True
            subscribers = list(self._subscribers)
        for sub in subscribers:
            sub.close()


__all__ = [
    "DEFAULT_REPLAY",
    "DEFAULT_SUBSCRIBER_QUEUE",
    "Dropped",
    "Hub",
    "HubEvent",
    "LoopBatcher",
    "Published",
    "Subscription",
    "encode",
]
