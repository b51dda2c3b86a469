"""Typed, path-aware reading of raw API objects, so every validation error names its field.

The API server never stores an object that fails its own validation, but our
objects also come from hand-written manifests, where `port: "80"` or
`protocol: http` are ordinary typos.  Every parser in this package reads its
object through `Fields`, which knows the path it is at (`spec.ports[1]`), so an
error says exactly where the bad value is:

    Service default/web: spec.ports[1].port: 70000 is out of range 1-65535

A parser raises `Invalid` at the first bad field; the tracker turns it into a
`Problem` (kind, namespace/name, field, message), skips the object and keeps
the last good version in force.
"""

from __future__ import annotations

import datetime
import ipaddress
import re
import socket
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, NamedTuple

from ebpfsvc.k8s.names import name_problem


class Invalid(ValueError):
    """A field of an API object failed validation."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}" if field else message)
        self.field = field
        self.message = message


@dataclass(frozen=True, order=True)
class Problem:
    """A validation problem with one object, as shown in logs and metrics."""

    kind: str
    namespace: str
    name: str
    field: str
    message: str

    @property
    def object_ref(self) -> str:
        ref = f"{self.namespace}/{self.name}" if self.namespace else self.name
        # A name the API would refuse may not even be encodable (a lone surrogate): the one line
        # that reports it must still print, so such characters are shown escaped.
        return ref.encode("utf-8", "backslashreplace").decode("utf-8")

    def __str__(self) -> str:
        where = f"{self.field}: " if self.field else ""
        return f"{self.kind} {self.object_ref}: {where}{self.message}"


def _describe(value: Any) -> str:
    text = repr(value) if isinstance(value, str) else str(value)
    return text if len(text) <= 60 else text[:57] + "..."


class Fields:
    """One mapping inside an API object, with the path that leads to it."""

    def __init__(self, data: Any, path: str = ""):
        if data is None:
            data = {}
        # A dict (what every source hands in) first: the Mapping check goes through the ABC
        # machinery, a microsecond per object at 100,000 endpoints.
        if type(data) is not dict and not isinstance(data, Mapping):
            raise Invalid(path, f"must be an object, not {_describe(data)}")
        self._data = data
        self.path = path

    def _sub(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def raw(self, key: str, default: Any = None) -> Any:
        value = self._data.get(key)
        return default if value is None else value

    def has(self, key: str) -> bool:
        return self._data.get(key) is not None

    def obj(self, key: str) -> "Fields":
        return Fields(self._data.get(key), self._sub(key))

    def str(self, key: str, default: str = "", choices: tuple[str, ...] = ()) -> str:
        value = self._data.get(key)
        if value is None:
            return default
        if not isinstance(value, str):
            raise Invalid(self._sub(key), f"must be a string, not {_describe(value)}")
        if choices and value not in choices:
            raise Invalid(self._sub(key), f"{_describe(value)} is not one of {', '.join(choices)}")
        return value

    def int(self, key: str, lo: int, hi: int, default: int | None = None) -> int | None:
        value = self._data.get(key)
        if value is None:
            return default
        return check_int(value, self._sub(key), lo, hi)

    def bool(self, key: str, default: bool) -> bool:
        value = self._data.get(key)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise Invalid(self._sub(key), f"must be true or false, not {_describe(value)}")
        return value

    def list(self, key: str, limit: int) -> list[tuple[str, Any]]:
        """Items of a list field with their paths; absent = empty; more than `limit` is refused."""
        value = self._data.get(key)
        if value is None:
            return []
        path = self._sub(key)
        if not isinstance(value, list):
            raise Invalid(path, f"must be a list, not {_describe(value)}")
        if len(value) > limit:
            raise Invalid(path, f"has {len(value)} items, more than the limit of {limit}")
        return [(f"{path}[{i}]", item) for i, item in enumerate(value)]

    def objects(self, key: str, limit: int) -> Iterator["Fields"]:
        for path, item in self.list(key, limit):
            yield Fields(item, path)

    def name(self, key: str, rule: str) -> str:
        """A name field (k8s/names.py RULES); absent = ""."""
        value = self.str(key)
        if value:
            check_name(value, self._sub(key), rule)
        return value

    def string_map(self, key: str) -> dict[str, str]:
        """labels / annotations / selector: a map of strings."""
        path = self._sub(key)
        out = {}
        for k, v in self.obj(key)._data.items():
            if not isinstance(v, str):
                raise Invalid(f"{path}[{k}]", f"must be a string, not {_describe(v)}")
            out[str(k)] = v
        return out


def check_name(value: str, path: str, rule: str) -> str:
    """`value` if it follows Kubernetes' naming `rule` (k8s/names.py), else Invalid naming `path`."""
    problem = name_problem(value, rule)
    if problem:
        raise Invalid(path, problem)
    return value


def check_int(value: Any, path: str, lo: int, hi: int) -> int:
    # bool is an int in Python; `port: true` is a typo, not 1.
    if isinstance(value, bool) or not isinstance(value, int):
        raise Invalid(path, f"must be an integer, not {_describe(value)}")
    if not lo <= value <= hi:
        raise Invalid(path, f"{value} is out of range {lo}-{hi}")
    return value


def _parse_text(value: Any, path: str, parse: Callable[[str], Any], what: str) -> Any:
    if not isinstance(value, str):
        raise Invalid(path, f"must be {what} string, not {_describe(value)}")
    try:
        return parse(value.strip())
    except ValueError:
        raise Invalid(path, f"{_describe(value)} is not {what}") from None


def parse_ip(value: Any, path: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """An IP address of either family (callers decide what IPv6 means for them)."""
    return _parse_text(value, path, ip_address, "an IP address")


def ip_address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """ipaddress.ip_address, with dotted quads parsed in C first: inet_pton takes exactly what
    ipaddress takes for IPv4 (four decimal octets, none over 255, no leading zero).  Not cached:
    a starting agent parses 100,000 distinct addresses, and filling a cache with them cost more
    than parsing them (85 of 350 ms at 10,000 x 10); a changed slice re-parses its own addresses
    only, a few microseconds.  Raises ValueError (TypeError for what is not a str), as
    ipaddress.ip_address does: parse_ip is what names the field."""
    try:
        return ipaddress.IPv4Address(socket.inet_pton(socket.AF_INET, text))
    except OSError:
        return ipaddress.ip_address(text)


def parse_ipv4(value: Any, path: str) -> ipaddress.IPv4Address:
    addr = parse_ip(value, path)
    if not isinstance(addr, ipaddress.IPv4Address):
        raise Invalid(path, f"{value} is not an IPv4 address")
    return addr


def parse_cidr(value: Any, path: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    # strict=False like the API server: "10.0.0.1/8" means 10.0.0.0/8.
    return _parse_text(value, path, lambda text: ipaddress.ip_network(text, strict=False), "a CIDR")


@dataclass(frozen=True)
class ObjectMeta:
    """The parts of metadata the data plane uses (resourceVersion etc. deliberately left out,
    so that an update touching only those compares equal and wakes nobody)."""

    namespace: str
    name: str
    labels: Mapping[str, str]
    annotations: Mapping[str, str]
    created: str = ""       # creationTimestamp as UTC "YYYY-MM-DDTHH:MM:SSZ" (sorts by age); "" = absent


def parse_timestamp(value: Any, path: str) -> str:
    """An RFC 3339 time (the API's metav1.Time) as UTC "YYYY-MM-DDTHH:MM:SSZ", so strings sort by time."""
    # What the API server writes is already that form (every object's creationTimestamp): then a
    # check that it is a real time is all there is to do (a full sync reads 20,000 of them).
    if type(value) is str and _UTC_SECONDS.fullmatch(value):
        try:
            datetime.datetime.fromisoformat(value[:-1])
            return value
        except ValueError:
            pass                # (not a real time: the general path below names the problem)
    return _parse_text(value, path, _utc_seconds, "an RFC 3339 time")


def _utc_seconds(text: str) -> str:
    when = datetime.datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    if when.tzinfo is None:
        raise ValueError(text)
    return when.astimezone(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# "YYYY-MM-DDTHH:MM:SSZ" with a four-digit year from 1000 (strftime writes a shorter one as fewer digits).
_UTC_SECONDS = re.compile(r"[1-9][0-9]{3}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}Z")


def read_meta(obj: Any, kind: str, api_versions: tuple[str, ...], namespaced: bool = True,
              name_rule: str = "dns1123-subdomain") -> tuple[Fields, ObjectMeta]:
    """Check kind/apiVersion and read metadata; returns the object's top-level Fields.
    The name must follow `name_rule` (k8s/names.py: the rule the API server applies to `kind`),
    the namespace is a DNS-1123 label."""
    top = Fields(obj)
    got_kind = top.str("kind", kind)
    if got_kind != kind:
        raise Invalid("kind", f"{got_kind!r} is not {kind}")
    version = top.str("apiVersion", api_versions[0])
    if version not in api_versions:
        raise Invalid("apiVersion", f"{version!r} is not supported for {kind} (want {' or '.join(api_versions)})")
    meta = top.obj("metadata")
    name = meta.str("name")
    if not name:
        raise Invalid("metadata.name", "is required")
    check_name(name, "metadata.name", name_rule)
    # kubectl defaults an absent namespace to "default"; manifests rely on that.
    namespace = (meta.str("namespace") or "default") if namespaced else ""
    if namespace:
        check_name(namespace, "metadata.namespace", "dns1123-label")
    created = meta.raw("creationTimestamp")
    created = parse_timestamp(created, "metadata.creationTimestamp") if created is not None else ""
    return top, ObjectMeta(namespace, name, meta.string_map("labels"), meta.string_map("annotations"), created)


class PlainMeta(NamedTuple):
    """What plain_meta reads: ObjectMeta's fields, without copying the maps."""

    namespace: str
    name: str
    labels: dict            # the object's own maps, not copies: read them, never change them
    annotations: dict
    created: str


def plain_meta(obj: Any, kind: str, api_version: str, name_rule: str) -> PlainMeta | None:
    """read_meta's metadata for an object of the usual shape, or None for anything else, which
    read_meta then reads (or rejects, naming the field): this only decides what it would decide.

    The usual shape: a dict whose kind and apiVersion are absent or `kind` and `api_version`, whose
    metadata is a dict with a valid name, a valid or absent namespace, labels and annotations that
    are absent or maps of strings, and a valid or absent creationTimestamp.  The bulk paths of a
    full sync (_plain_service, _plain_slice) start here: it costs about 60% of read_meta (1.8
    against 2.9 µs for a Service as the API server returns it)."""
    if type(obj) is not dict:
        return None
    got_kind, version, meta = obj.get("kind"), obj.get("apiVersion"), obj.get("metadata")
    if (got_kind is not None and got_kind != kind) or (version is not None and version != api_version) \
            or type(meta) is not dict:
        return None
    name, namespace = meta.get("name"), meta.get("namespace")
    if type(name) is not str or not name or name_problem(name, name_rule):
        return None
    if namespace is None or namespace == "":
        namespace = "default"
    elif type(namespace) is not str or name_problem(namespace, "dns1123-label"):
        return None
    labels, annotations = meta.get("labels"), meta.get("annotations")
    labels = {} if labels is None else labels           # absent is empty, as string_map reads it
    annotations = {} if annotations is None else annotations
    if (type(labels) is not dict or type(annotations) is not dict
            or not all(type(k) is str and type(v) is str for k, v in labels.items())
            or not all(type(k) is str and type(v) is str for k, v in annotations.items())):
        return None
    created = meta.get("creationTimestamp")
    if created is None:
        created = ""
    else:
        try:
            created = parse_timestamp(created, "")
        except Invalid:
            return None
    return PlainMeta(namespace, name, labels, annotations, created)


# Kinds without a namespace: their key is ("", name).
CLUSTER_SCOPED = frozenset({"Node", "ServiceCIDR"})


def object_key(kind: str, obj: Any) -> tuple[str, str]:
    """(namespace, name) of a raw object, defaulted like read_meta, for indexing even invalid objects."""
    # type() first: isinstance against typing.Mapping takes the ABC machinery, microseconds per object
    # (a full sync keys 20,000 dicts); each field is read once.
    meta = obj.get("metadata") if type(obj) is dict or isinstance(obj, Mapping) else None
    if not (type(meta) is dict or isinstance(meta, Mapping)):
        meta = {}
    name = meta.get("name")
    name = name if isinstance(name, str) else ""
    if kind in CLUSTER_SCOPED:
        return ("", name)
    ns = meta.get("namespace")
    return (ns if isinstance(ns, str) and ns else "default", name)
