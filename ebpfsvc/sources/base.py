"""The contract every source of Kubernetes objects fulfils.

A source delivers raw API objects (the JSON dicts the API server sends, camelCase
keys as in the API) to a sink, object by object, and says once per kind when its
initial list is complete.  Parsing and validation happen downstream, in the
trackers, so every source gets the same checks and the same error messages.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Protocol


class EventType(str, enum.Enum):
    ADDED = "ADDED"
    MODIFIED = "MODIFIED"
    DELETED = "DELETED"


# The kinds the data plane reads (Endpoints for selectorless Services with manual Endpoints, in a
# manifest directory; from the API server, sources/kube.py watches fewer).
KINDS = ("Service", "EndpointSlice", "Endpoints", "Node", "ServiceCIDR")


@dataclass(frozen=True)
class Event:
    kind: str                 # one of KINDS
    type: EventType
    obj: dict[str, Any]       # the whole API object; for DELETED, its last known state

    @property
    def key(self) -> tuple[str, str]:
        """(namespace, name): what trackers index objects by."""
        meta = self.obj.get("metadata") or {}
        return (meta.get("namespace") or "", meta.get("name") or "")


class Sink(Protocol):
    """Receives events. Called from the source's thread; implementations must be thread-safe."""

    def on_event(self, event: Event) -> None: ...

    def on_synced(self, kind: str) -> None:
        """The initial list of `kind` has been delivered in full (informer HasSynced)."""
        ...

    def on_relist(self, kind: str, objects: list[dict[str, Any]]) -> None:
        """A re-list (after 410 Gone or a lost watch) replaced the whole set of `kind`:
        objects absent from `objects` are gone."""
        ...
