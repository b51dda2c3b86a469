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
import dataclasses
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


def maker(cls):
    """A positional constructor for the frozen dataclass `cls` that takes every field, in order,
    and gives an object equal to cls(*values) at about half the cost: a frozen dataclass's own
    __init__ sets each field through object.__setattr__, 2 us for a 9-field endpoint, paid
    100,000 times per stage in a full sync.  Only for classes without __post_init__ or __slots__
    (checked here), so there is nothing __init__ would do that this skips; no defaults either: the
    bulk paths that use it pass every field."""
    params = cls.__dataclass_params__
    if not params.frozen or hasattr(cls, "__post_init__") or "__slots__" in cls.__dict__:
        raise TypeError(f"heap.maker: {cls.__name__} is not a plain frozen dataclass")
    names = [f.name for f in dataclasses.fields(cls)]
    # Generated, as dataclasses generates __init__: one plain store per field into the new object's
    # __dict__, and the signature checks the count of values.
    body = "".join(f"    d[{n!r}] = {n}\n" for n in names)
    src = f"def make({', '.join(names)}):\n    obj = new(cls)\n    d = obj.__dict__\n{body}    return obj\n"
    scope = {"new": object.__new__, "cls": cls}
    exec(src, scope)        # noqa: S102 -- our own text, built from the dataclass's field names
    make = scope["make"]
    make.__qualname__ = f"make_{cls.__name__}"
    return make
