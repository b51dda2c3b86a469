"""The agent's Python heap: a large, long-lived state made in bulk.

A full sync at 10,000 Services makes millions of objects that live as long as the state (typed
objects, frontends, the writer's bookkeeping).  None of them is garbage, yet Python's cycle
collector runs a full collection each time the heap grew by a quarter, walking all of them: 40%
of a full sync measured (bench.controlplane).  So bulk work runs with the collector paused, and
the agent freezes the heap after its first full sync (Agent.sync), so later collections -- during
an endpoint change -- skip it.  Reference counting still frees everything that is not a cycle.
"""

from __future__ import annotations

import contextlib
import gc
import threading

_lock = threading.Lock()
_paused = 0          # bulk() sections in progress, across threads
_was_enabled = False


@contextlib.contextmanager
def bulk():
    """No cycle collection while the block makes many long-lived objects.  Nests, and is safe
    across threads: the collector comes back (if it was on) when the last section ends."""
    global _paused, _was_enabled
    with _lock:
        if _paused == 0:
            _was_enabled = gc.isenabled()
            gc.disable()
        _paused += 1
    try:
        yield
    finally:
        with _lock:
            _paused -= 1
            if _paused == 0 and _was_enabled:
                gc.enable()
