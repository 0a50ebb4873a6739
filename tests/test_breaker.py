"""The per-upstream circuit breaker, driven by a fake clock."""

from __future__ import annotations

import pytest

from proxy.upstream.breaker import CircuitBreaker, CircuitOpen


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def breaker(clock: FakeClock) -> CircuitBreaker:
    return CircuitBreaker(threshold=3, cooldown=30.0, clock=clock)


def fail(breaker: CircuitBreaker, times: int) -> None:
    for _ in range(times):
        breaker.before_request()
        breaker.record_failure()


def test_starts_closed_and_lets_requests_through(breaker: CircuitBreaker) -> None:
    assert breaker.state == "closed"
    for _ in range(10):
        breaker.before_request()
        breaker.record_success()
    assert breaker.state == "closed"


def test_opens_after_threshold_consecutive_failures(breaker: CircuitBreaker) -> None:
    fail(breaker, 2)
    assert breaker.state == "closed"
    breaker.before_request()  # still allowed below the threshold
    breaker.record_failure()
    assert breaker.state == "open"
    with pytest.raises(CircuitOpen) as info:
        breaker.before_request()
    assert info.value.retry_in == pytest.approx(30.0)
    assert "circuit open" in str(info.value)


def test_open_circuit_refuses_until_cooldown(breaker: CircuitBreaker, clock: FakeClock) -> None:
    fail(breaker, 3)
    clock.advance(10.0)
    with pytest.raises(CircuitOpen) as info:
        breaker.before_request()
    assert info.value.retry_in == pytest.approx(20.0)
    clock.advance(19.9)
    assert breaker.state == "open"
    with pytest.raises(CircuitOpen):
        breaker.before_request()
    clock.advance(0.1)
    assert breaker.state == "half-open"


def test_half_open_lets_exactly_one_probe_through(breaker: CircuitBreaker, clock: FakeClock) -> None:
    fail(breaker, 3)
    clock.advance(30.0)
    assert breaker.state == "half-open"
    breaker.before_request()  # the probe
    with pytest.raises(CircuitOpen) as info:  # a concurrent caller while the probe is out
        breaker.before_request()
    assert info.value.retry_in == 0.0
    clock.advance(5.0)
    with pytest.raises(CircuitOpen):
        breaker.before_request()


def test_successful_probe_closes(breaker: CircuitBreaker, clock: FakeClock) -> None:
    fail(breaker, 3)
    clock.advance(31.0)
    breaker.before_request()
    breaker.record_success()
    assert breaker.state == "closed"
    breaker.before_request()
    breaker.before_request()  # closed: concurrent requests are fine again
    breaker.record_success()
    # the failure count was reset too: it takes a full threshold to open again
    fail(breaker, 2)
    assert breaker.state == "closed"
    fail(breaker, 1)
    assert breaker.state == "open"


def test_failed_probe_reopens_for_a_full_cooldown(breaker: CircuitBreaker, clock: FakeClock) -> None:
    fail(breaker, 3)
    clock.advance(30.0)
    breaker.before_request()
    clock.advance(2.0)  # the probe took a while to fail
    breaker.record_failure()
    assert breaker.state == "open"
    with pytest.raises(CircuitOpen) as info:
        breaker.before_request()
    assert info.value.retry_in == pytest.approx(30.0)
    clock.advance(29.0)
    with pytest.raises(CircuitOpen):
        breaker.before_request()
    clock.advance(1.0)
    assert breaker.state == "half-open"
    breaker.before_request()  # a new probe is allowed
    breaker.record_success()
    assert breaker.state == "closed"


def test_threshold_of_one(clock: FakeClock) -> None:
    breaker = CircuitBreaker(threshold=1, cooldown=5.0, clock=clock)
    fail(breaker, 1)
    assert breaker.state == "open"
    clock.advance(5.0)
    breaker.before_request()
    breaker.record_success()
    assert breaker.state == "closed"
    # after closing, the failure count restarts: one failure opens again (threshold 1)
    fail(breaker, 1)
    assert breaker.state == "open"


def test_success_resets_the_failure_count(breaker: CircuitBreaker) -> None:
    for _ in range(5):
        fail(breaker, 2)
        breaker.before_request()
        breaker.record_success()
    assert breaker.state == "closed"
    fail(breaker, 2)
    assert breaker.state == "closed"
    fail(breaker, 1)
    assert breaker.state == "open"


def test_default_clock_is_monotonic() -> None:
    breaker = CircuitBreaker(threshold=1, cooldown=3600.0)
    breaker.record_failure()
    with pytest.raises(CircuitOpen) as info:
        breaker.before_request()
    assert 3599.0 < info.value.retry_in <= 3600.0
