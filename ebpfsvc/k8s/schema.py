"""Unknown-field detection for hand-written manifests, from the `kubernetes` client's API models.

`kubectl apply` validates strictly by default: `port:` where `ports:` was meant,
or `clusterIp` for `clusterIP`, is refused instead of silently ignored.  A
manifest directory has no API server to do that, and a silently ignored typo is
the worst outcome (a Service with no ports programs nothing, without a word).
So the manifest source checks every object against the API's schema, which the
`kubernetes` package ships as generated models (openapi_types + attribute_map).

Not used for objects from a real API server: those were validated there, and a
newer server may legitimately send fields this client version does not know.
"""

from __future__ import annotations

import functools
import re
from typing import Any

from kubernetes import client as k8s_client

MODELS = {"Service": "V1Service", "Endpoints": "V1Endpoints",
          "EndpointSlice": "V1EndpointSlice", "Node": "V1Node", "ServiceCIDR": "V1ServiceCIDR"}

_LIST = re.compile(r"^List\[(.+)\]$")
_DICT = re.compile(r"^Dict\[str, (.+)\]$")


@functools.cache
def _fields(model: str) -> dict[str, str] | None:
    """JSON field name -> type string of a model, or None if `model` is not a model (str, int, object...)."""
    cls = getattr(k8s_client, model, None)
    if cls is None or not hasattr(cls, "attribute_map"):
        return None
    return {cls.attribute_map[attr]: typ for attr, typ in cls.openapi_types.items()}


def unknown_fields(kind: str, obj: Any) -> list[str]:
    """Paths of fields the API schema of `kind` does not have (e.g. ['spec.port']); [] if none."""
    model = MODELS.get(kind)
    if model is None or not isinstance(obj, dict):
        return []
    out: list[str] = []
    _walk(obj, model, "", out)
    return out


def _walk(value: Any, typ: str, path: str, out: list[str]) -> None:
    if m := _LIST.match(typ):
        if isinstance(value, list):
            for i, item in enumerate(value):
                _walk(item, m.group(1), f"{path}[{i}]", out)
        return
    if m := _DICT.match(typ):
        if isinstance(value, dict):
            for key, item in value.items():
                _walk(item, m.group(1), f"{path}[{key}]", out)
        return
    fields = _fields(typ)
    if fields is None or not isinstance(value, dict):
        return          # a scalar, or a type mismatch the parsers report with a better message
    for key, item in value.items():
        sub = f"{path}.{key}" if path else str(key)
        if key not in fields:
            out.append(sub)
        else:
            _walk(item, fields[key], sub, out)
