"""A circuit breaker per external connection.

A dead upstream should cost one timeout, not one per request: after ``threshold`` consecutive
failures the circuit opens and requests fail at once (so stale content is served immediately);
after ``cooldown`` one probe request is let through (half-open) and its outcome decides.
"""

from __future__ import annotations

import time
from collections.abc import Callable


class CircuitOpen(Exception):
    """The upstream is being skipped until its cooldown ends."""

    def __init__(self, retry_in: float) -> None:
        super().__init__(f"circuit open, next probe in {retry_in:.1f}s")
        self.retry_in = retry_in


class CircuitBreaker:
    """Closed → open after N failures → half-open after the cooldown → closed on success."""

    def __init__(self, threshold: int, cooldown: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._threshold = threshold
        self._cooldown = cooldown
        self._clock = clock
        self._failures = 0
        self._opened_at: float | None = None
        self._probing = False

    @property
    def state(self) -> str:
        if self._opened_at is None:
            return "closed"
        if self._clock() - self._opened_at >= self._cooldown:
            return "half-open"
        return "open"

    def before_request(self) -> None:
        """Raise :class:`CircuitOpen` unless a request may go out now."""
        if self._opened_at is None:
            return
        waited = self._clock() - self._opened_at
        if waited < self._cooldown:
            raise CircuitOpen(self._cooldown - waited)
        if self._probing:
            raise CircuitOpen(0.0)
        self._probing = True

    def record_success(self) -> None:
        self._failures = 0
        self._opened_at = None
        self._probing = False

    def record_failure(self) -> None:
        self._failures += 1
        if self._probing or self._failures >= self._threshold:
            self._opened_at = self._clock()
        self._probing = False
