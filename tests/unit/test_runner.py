"""BoundedFrequencyRunner: bursts coalesce, failures retry, periodic resync happens."""

import threading

from ebpfsvc.runner import BoundedFrequencyRunner


def _wait_for(pred, timeout=5.0):
    ev = threading.Event()
    for _ in range(int(timeout / 0.01)):
        if pred():
            return True
        ev.wait(0.01)
    return pred()


def test_burst_of_requests_coalesces_into_few_runs():
    calls = []
    r = BoundedFrequencyRunner("t", lambda: calls.append(1), min_interval=2.0, max_interval=60.0)
    r.start()
    try:
        for _ in range(200):
            r.run()
        assert _wait_for(lambda: len(calls) >= 1)
        # Everything after the first run falls inside min_interval: at most one more run.
        threading.Event().wait(0.3)
        assert 1 <= len(calls) <= 2
    finally:
        r.stop()


def test_failed_sync_is_retried_without_a_new_request():
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("map full")

    r = BoundedFrequencyRunner("t", flaky, min_interval=0.0, max_interval=60.0, retry_interval=0.05)
    r.start()
    try:
        r.run()
        assert _wait_for(lambda: len(calls) >= 2)
        assert r.failures == 1 and r.runs >= 1
    finally:
        r.stop()


def test_periodic_resync_runs_without_requests():
    calls = []
    r = BoundedFrequencyRunner("t", lambda: calls.append(1), min_interval=0.0, max_interval=0.05)
    r.start()
    try:
        assert _wait_for(lambda: len(calls) >= 3)
    finally:
        r.stop()


def test_bad_intervals_are_rejected():
    import pytest
    with pytest.raises(ValueError, match="min_interval"):
        BoundedFrequencyRunner("t", lambda: None, min_interval=5, max_interval=1)


def test_failures_back_off_and_a_change_retries_at_once():
    """A sync that keeps failing (a map too small) is retried ever less often, not in a busy loop;
    a change asks for a retry at once.  (Counts of calls: the back-off is 1000 s, far beyond the test.)"""
    import threading as _threading

    calls = []
    gate = _threading.Event()

    def failing():
        calls.append(1)
        gate.set()
        raise RuntimeError("map full")

    r = BoundedFrequencyRunner("t", failing, min_interval=0.0, max_interval=3600.0, retry_interval=1000.0)
    r.start()
    r.run()
    try:
        assert gate.wait(5)
        gate.clear()
        # The first retry is 1000 s away: nothing happens until a change comes.
        assert not gate.wait(0.3) and len(calls) == 1
        r.run()
        assert gate.wait(5) and len(calls) == 2 and r.consecutive_failures == 2
    finally:
        r.stop()


def test_a_partial_sync_asks_for_a_retry_with_back_off_and_no_failure():
    """A sync that wrote all but one refused Service asks retry_later(): it runs again without a request,
    the delays double while the runs in a row keep asking, and a run that does not ask resets them."""
    delays = []
    r = BoundedFrequencyRunner("t", lambda: None, min_interval=0.0, max_interval=60.0, retry_interval=0.02)

    def partial():
        if len(delays) < 3:
            delays.append(r.retry_later())

    r._fn = partial
    r.start()
    try:
        r.run()
        assert _wait_for(lambda: len(delays) == 3 and r.runs >= 4)
        assert delays == [0.02, 0.04, 0.08] and r.failures == 0
        assert r._retries == 0 and r._retry_at is None          # the run that did not ask reset the back-off
    finally:
        r.stop()
