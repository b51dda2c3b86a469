"""Coalesce bursts of changes into few syncs (kube-proxy's BoundedFrequencyRunner).

A watch can deliver hundreds of EndpointSlice updates in a second during a
rollout; programming the maps once per event would waste CPU and gain nothing,
since each sync computes the whole desired state anyway.  The runner calls its
function when asked, but never more often than `min_interval`, and at least
every `max_interval` (a periodic resync that repairs anything the diff missed).
A failing sync is retried after `retry_interval` rather than waiting for the
next change, backing off (doubling, up to `max_interval`) while it keeps failing, so a
failure that needs an operator (a map too small) never turns into a busy loop; a new
change retries at once.  The first failure of a run of them is logged with its traceback,
the next ones in one line.  A sync that did its work but for a part that failed (a Service
whose writes the kernel refused) is no failure of the loop: it asks for `retry_later()`, the
same back-off without an error.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable

log = logging.getLogger(__name__)


class BoundedFrequencyRunner:
    def __init__(self, name: str, fn: Callable[[], None], *, min_interval: float,
                 max_interval: float, retry_interval: float = 1.0,
                 clock: Callable[[], float] = time.monotonic):
        if min_interval < 0 or max_interval <= 0 or min_interval > max_interval:
            raise ValueError(f"{name}: need 0 <= min_interval ({min_interval}) <= max_interval ({max_interval})")
        self.name = name
        self._fn = fn
        self._min = min_interval
        self._max = max_interval
        self._retry = retry_interval
        self._clock = clock
        self._pending = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.runs = 0
        self.failures = 0
        self.consecutive_failures = 0
        self._retries = 0                   # retry_later() calls by the runs in a row that made them
        self._retry_at: float | None = None
        self._asked_retry = False

    @property
    def alive(self) -> bool:
        """The sync loop is running (what /livez reports)."""
        return self._thread is not None and self._thread.is_alive()

    def run(self) -> None:
        """Ask for a sync soon. Cheap and safe to call from any thread, as often as you like."""
        self._pending.set()

    def retry_later(self) -> float:
        """From inside a sync: run again after a back-off (retry_interval, doubling while the runs in
        a row keep asking, up to max_interval), or at the next change; returns the delay."""
        self._asked_retry = True
        self._retries += 1
        delay = min(self._retry * 2 ** min(self._retries - 1, 30), self._max)
        self._retry_at = self._clock() + delay
        return delay

    def start(self) -> None:
        self._thread = threading.Thread(target=self.loop, name=self.name, daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._pending.set()
        if self._thread:
            self._thread.join(timeout)

    def loop(self) -> None:
        last = None
        while not self._stop.is_set():
            # Sleep until asked, or until the periodic resync is due.
            due = self._max if last is None else max(0.0, last + self._max - self._clock())
            if self._retry_at is not None:
                due = min(due, max(0.0, self._retry_at - self._clock()))
            self._pending.wait(due)
            if self._stop.is_set():
                return
            # Too soon after the last run: wait out the rest of min_interval, so
            # every request arriving meanwhile is served by one run.
            if last is not None:
                rest = last + self._min - self._clock()
                if rest > 0 and self._stop.wait(rest):
                    return
            self._pending.clear()
            last = self._clock()
            self._asked_retry, self._retry_at = False, None
            try:
                self._fn()
                self.runs += 1
                self.consecutive_failures = 0
                if not self._asked_retry:
                    self._retries = 0
            except Exception as err:  # a sync must never kill the loop: the datapath keeps its last state
                self.failures += 1
                self.consecutive_failures += 1
                delay = min(self._retry * 2 ** min(self.consecutive_failures - 1, 30), self._max)
                if self.consecutive_failures == 1:
                    log.exception("%s: sync failed; retrying in %.1fs, or at the next change", self.name, delay)
                else:
                    log.error("%s: sync failed again (%d in a row): %s: %s; retrying in %.1fs, or at the next "
                              "change", self.name, self.consecutive_failures, type(err).__name__, err, delay)
                self._pending.wait(delay)       # a change retries at once
                if self._stop.is_set():
                    return
                self._pending.set()
