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
