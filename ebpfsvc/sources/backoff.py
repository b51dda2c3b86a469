"""Bounded exponential backoff with jitter, for retrying the Kubernetes API.

Jitter matters here: every node runs an agent, and after an API server restart
they would otherwise all re-list in lockstep, which is the load spike that keeps
a struggling API server down.
"""

from __future__ import annotations

import random


class Backoff:
    """Delays initial, initial*factor, ... capped at `maximum`; each one then
    shortened by a random fraction of up to `jitter` (so never above `maximum`)."""

    def __init__(self, initial: float, maximum: float, *, factor: float = 2.0,
                 jitter: float = 0.5, rng: random.Random | None = None) -> None:
        if not 0 < initial <= maximum:
            raise ValueError(f"backoff needs 0 < initial ({initial}) <= maximum ({maximum})")
        if not 0 <= jitter < 1:
            raise ValueError(f"jitter must be in [0, 1), got {jitter}")
        self.initial, self.maximum, self.factor, self.jitter = initial, maximum, factor, jitter
        self._rng = rng or random.Random()
        self.failures = 0      # consecutive failures since the last reset()

    def next_delay(self) -> float:
        """The delay to wait before the next attempt; counts one more failure."""
        # Cap the exponent so a long outage cannot overflow the float.
        base = min(self.maximum, self.initial * self.factor ** min(self.failures, 64))
        self.failures += 1
        return base * (1 - self.jitter * self._rng.random())

    def reset(self) -> None:
        """The API answered properly: the next failure starts again from `initial`."""
        self.failures = 0
