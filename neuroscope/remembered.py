"""The token ids of the last requests, by request id, so a feature record can be explained later
(``Session.attribute(record, feature)``, ``POST /v1/features/attribute`` with ``request_id``).

Bounded (least recently used first out): a server keeps a few hundred KB at most, never the
history of every request.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from neuroscope.errors import ConfigError
from neuroscope.records import TokenFeatures

DEFAULT_REMEMBERED = 64
_UNKNOWN = -1  # a position no record has told us about yet


class RequestForgotten(ConfigError):
    """The request id is unknown here, or its tokens were dropped to make room."""


class RememberedRequests:
    """``request id -> token ids`` of the last ``capacity`` requests (prompt and generated)."""

    def __init__(self, capacity: int = DEFAULT_REMEMBERED):
        if capacity < 1:
            raise ConfigError(f"capacity must be at least 1, got {capacity}.")
        self.capacity = capacity
        self._ids: OrderedDict[str, list[int]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._ids

    def start(self, request_id: str, prompt_ids: Sequence[int]) -> None:
        """A new request: its prompt ids (generated tokens come in through ``observe``)."""
        self._ids[request_id] = [int(t) for t in prompt_ids]
        self._ids.move_to_end(request_id)
        while len(self._ids) > self.capacity:
            self._ids.popitem(last=False)

    def observe(self, record: Any) -> None:
        """A feature record: the token at its position (a generated one extends the request)."""
        if not isinstance(record, TokenFeatures):
            return
        ids = self._ids.get(record.request_id)
        if ids is None:
            return
        if record.position >= len(ids):
            ids.extend([_UNKNOWN] * (record.position + 1 - len(ids)))
        ids[record.position] = record.token_id

    def watch(self, events: Iterable[Any]) -> Iterator[Any]:
        """``events`` unchanged, observing the records that pass."""
        for event in events:
            self.observe(event)
            yield event

    def ids(self, request_id: str, position: int | None = None) -> list[int]:
        """The known token ids of ``request_id`` (through ``position`` at least, when given).

        Raises ``RequestForgotten`` saying what to do when they are not here."""
        ids = self._ids.get(request_id)
        if ids is None:
            raise RequestForgotten(
                f"Request {request_id!r} is not remembered here (only the last {self.capacity} "
                "requests of this session or server are); attribute its text instead."
            )
        self._ids.move_to_end(request_id)
        known = ids.index(_UNKNOWN) if _UNKNOWN in ids else len(ids)
        if position is not None and not 0 <= position < known:
            raise RequestForgotten(
                f"position {position} is outside request {request_id!r}, whose known tokens are "
                f"positions 0..{known - 1}."
            )
        return list(ids[:known])


__all__ = ["DEFAULT_REMEMBERED", "RememberedRequests", "RequestForgotten"]
