"""The agent's Python heap: a large, long-lived state made in bulk.

A full sync at 10,000 Services makes millions of objects that live as long as the state (typed
objects, frontends, the writer's bookkeeping).  None of them is garbage, yet Python's cycle
collector runs a full collection each time the heap grew by a quarter, walking all of them: 40%
of a full sync measured (bench.controlplane).  So bulk work runs with the collector paused and
freezes what it made when it ends (gc.freeze: later collections, e.g. during an endpoint change,
skip it), and the agent freezes the heap after its first full sync (Agent.sync).  Reference
counting still frees frozen objects that are not in a cycle, which ours are not.
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
                # What was made is long-lived: frozen, the collection that would run at the next
                # allocation (the counts grew meanwhile) does not walk it, now or later.
                gc.freeze()
                gc.enable()


# Work on more objects than this (Services, slices, frontends) is bulk work: below it a section
# costs more than the few collections it would spare (an endpoint change stays out of it).
BULK_MIN = 256


def bulk_for(count: int):
    """bulk() for work on `count` objects when that is more than BULK_MIN, else a no-op section."""
    return bulk() if count > BULK_MIN else contextlib.nullcontext()
