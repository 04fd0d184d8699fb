"""What `edgeops serve` lets one request, and all requests together, cost the host."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, fields

MiB = 1024 * 1024


@dataclass(frozen=True)
class ServeLimits:
    """Bounds on requests; every one is a CLI option of `edgeops serve`.

    Attributes:
        max_body_bytes: largest request body (413 above it, before or while it is read).
        max_depth: deepest JSON nesting (400 above it, checked before the JSON is parsed).
        max_batch: most samples (or images) in one request (413 above it).
        max_in_flight_bytes: request bodies being received or parsed at once, all connections
            together; a request waits up to ``admission_timeout_s`` for room, then gets 503.
        max_image_pixels: largest uploaded image, width x height (413 above it, before decoding).
        max_connections: open connections and requests at once (uvicorn answers 503 above it).
        header_timeout_s: a connection must finish each request's headers within this time.
        body_timeout_s: a request's body must arrive within this time (408 otherwise).
        keep_alive_s: an idle keep-alive connection is closed after this time.
        admission_timeout_s: longest wait for room in the in-flight budget.
    """

    max_body_bytes: int = 8 * MiB
    max_depth: int = 8
    max_batch: int = 256
    max_in_flight_bytes: int = 32 * MiB
    max_image_pixels: int = 4_000_000
    max_connections: int = 512
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    keep_alive_s: float = 5.0
    admission_timeout_s: float = 5.0

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"serve limit {f.name} must be a positive number, got {value!r}")
        if self.max_in_flight_bytes < self.max_body_bytes:
            raise ValueError(f"serve limit max_in_flight_bytes ({self.max_in_flight_bytes}) is below "
                             f"max_body_bytes ({self.max_body_bytes}): no maximum-size body could ever be taken")


class InFlightBytes:
    """A budget of request-body bytes shared by all connections of one event loop."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._room: asyncio.Condition | None = None

    def _condition(self) -> asyncio.Condition:
        if self._room is None:        # created on first use, inside the server's event loop
            self._room = asyncio.Condition()
        return self._room

    async def acquire(self, n: int, timeout: float) -> bool:
        """Reserve ``n`` bytes, waiting up to ``timeout`` seconds for room; False if there was none."""
        room = self._condition()
        async with room:
            try:
                await asyncio.wait_for(room.wait_for(lambda: self.used + n <= self.limit), timeout)
            except asyncio.TimeoutError:
                return False
            self.used += n
            return True

    async def release(self, n: int) -> None:
        room = self._condition()
        async with room:
            self.used -= n
            room.notify_all()
