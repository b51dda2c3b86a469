"""A directory of Kubernetes manifests as a source: the lab, demos and users without a cluster.

Every *.yaml / *.yml / *.json file directly in the directory is read (all its
documents, `kind: List` included), and each scan is diffed against the previous
one into ADDED / MODIFIED / DELETED events, as if `kubectl apply` and `kubectl
delete` had run against an API server that a watch was following.  After the
first scan every kind counts as synced, even when no file mentions it.

Changes are found by polling each file's (mtime, size, inode): robust on every
filesystem, including bind mounts and editors that replace files by rename,
where inotify-based watching misses events.

A file that does not parse (a YAML typo mid-edit) is reported once, with its
line, and its previously loaded objects stay in force until it parses again, so
saving a half-edited file never withdraws its Services.  An object with a field
the API does not have (`port:` for `ports:`) is refused the same way, as
`kubectl apply` would refuse it (ebpfsvc.k8s.schema).  Validation of the values
happens downstream, in the tracker, as for every source.

A file is bounded before it is parsed: larger than MAX_FILE_BYTES, or holding a YAML alias
(`*name`), it is refused in one line, like a file that does not parse.  Aliases are what a "billion
laughs" document is made of: a few hundred bytes that expand to millions of nodes and stall every
manifest update behind them; Kubernetes manifests never need them.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import yaml

from ebpfsvc.k8s.fields import CLUSTER_SCOPED
from ebpfsvc.k8s.schema import unknown_fields

from .base import KINDS, Event, EventType, Sink

log = logging.getLogger(__name__)

SUFFIXES = (".yaml", ".yml", ".json")
# Far above any hand-written manifest (10,000 Services with their slices take about 8 MiB in YAML).
MAX_FILE_BYTES = 16 * 1024 * 1024
NAMESPACED = frozenset(KINDS) - CLUSTER_SCOPED

ObjectKey = tuple[str, str, str]      # (kind, namespace, name)


class ManifestError(ValueError):
    """A file or one of its documents cannot be used; the message names the file and line."""


@dataclass
class _File:
    signature: tuple[int, int, int]
    objects: dict[ObjectKey, dict[str, Any]] = field(default_factory=dict)


class ManifestSource:
    def __init__(self, directory: str | os.PathLike, sink: Sink, poll_interval: float = 0.5):
        self.directory = Path(directory)
        self.sink = sink
        self.poll_interval = poll_interval
        self._files: dict[Path, _File] = {}
        self._delivered: dict[ObjectKey, dict[str, Any]] = {}
        self._synced = False
        self._missing_logged = False
        self._lock = threading.Lock()          # one scan at a time (poller vs resync_now)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Load the directory (the initial list: events, then on_synced per kind), then watch it."""
        if self._thread is not None:
            return
        self._stop.clear()
        self._scan(force=False)
        self._thread = threading.Thread(target=self._poll, name=f"manifests:{self.directory}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def resync_now(self) -> None:
        """Re-read every file now, whatever its mtime says (mtime granularity can hide a quick edit)."""
        self._scan(force=True)

    # --- scanning -----------------------------------------------------------------------------

    def _poll(self) -> None:
        while not self._stop.wait(self.poll_interval):
            try:
                self._scan(force=False)
            except Exception:     # keep watching: the next scan may well succeed
                log.exception("scanning manifest directory %s failed", self.directory)

    def _scan(self, force: bool) -> None:
        with self._lock:
            self._refresh_files(force)
            current = self._merge()
            self._deliver(current)
            if not self._synced:
                self._synced = True
                for kind in KINDS:
                    self.sink.on_synced(kind)

    def _refresh_files(self, force: bool) -> None:
        present = self._list_files()
        for path in set(self._files) - set(present):
            del self._files[path]
        for path, signature in present.items():
            known = self._files.get(path)
            if known is not None and known.signature == signature and not force:
                continue
            try:
                objects, rejected = load_manifest_file(path)
            except ManifestError as err:
                kept = len(known.objects) if known else 0
                log.warning("%s; keeping the %d object(s) it held before", err, kept)
                self._files[path] = _File(signature, known.objects if known else {})
                continue
            except OSError as err:          # vanished or unreadable between listing and reading
                log.warning("%s: cannot read: %s", path, err.strerror or err)
                continue
            if _signature(path) != signature:
                continue                    # written while we read it: take it on the next scan, whole
            for key, message in rejected.items():
                before = known.objects.get(key) if known else None
                log.warning("%s; %s", message, "keeping its previous version" if before else "skipped")
                if before is not None:
                    objects[key] = before
            self._files[path] = _File(signature, objects)

    def _list_files(self) -> dict[Path, tuple[int, int, int]]:
        try:
            entries = sorted(self.directory.iterdir())
        except OSError as err:
            if not self._missing_logged:
                log.warning("manifest directory %s: %s; treating it as empty", self.directory, err.strerror or err)
                self._missing_logged = True
            return {}
        self._missing_logged = False
        out = {}
        for path in entries:
            # Hidden files are editor swap files and atomic-write temporaries, never manifests.
            if path.name.startswith(".") or path.suffix.lower() not in SUFFIXES:
                continue
            signature = _signature(path)
            if signature is not None:
                out[path] = signature
        return out

    def _merge(self) -> dict[ObjectKey, dict[str, Any]]:
        merged: dict[ObjectKey, dict[str, Any]] = {}
        origin: dict[ObjectKey, Path] = {}
        for path in sorted(self._files):
            for key, obj in self._files[path].objects.items():
                if key in merged and merged[key] != obj:
                    # As with `kubectl apply -f dir`, files are applied in name order: the last one wins.
                    log.debug("%s %s/%s in %s overrides %s", key[0], key[1], key[2], path, origin[key])
                merged[key] = obj
                origin[key] = path
        return merged

    def _deliver(self, current: dict[ObjectKey, dict[str, Any]]) -> None:
        previous = self._delivered
        for key in sorted(previous.keys() - current.keys()):
            self.sink.on_event(Event(key[0], EventType.DELETED, previous[key]))
        for key in sorted(current):
            if key not in previous:
                self.sink.on_event(Event(key[0], EventType.ADDED, current[key]))
            elif previous[key] != current[key]:
                self.sink.on_event(Event(key[0], EventType.MODIFIED, current[key]))
        self._delivered = current


def _signature(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


def load_manifest_file(path: Path) -> tuple[dict[ObjectKey, dict[str, Any]], dict[ObjectKey, str]]:
    """Every object of a watched kind in one file, keyed by (kind, namespace, name), and the
    objects refused for fields the API does not have (key -> message naming file, object, fields).

    Raises ManifestError (naming the file and line) when the file does not parse; documents of
    other kinds (Pods, Deployments...) are ignored, a document that is not an object is an error
    for that document only.
    """
    with open(path, "rb") as f:
        data = f.read(MAX_FILE_BYTES + 1)
    if len(data) > MAX_FILE_BYTES:
        raise ManifestError(f"{path}: larger than {MAX_FILE_BYTES // (1024 * 1024)} MiB; not read "
                            f"(split it into several files)")
    text = data.decode("utf-8", errors="replace")
    try:
        if path.suffix.lower() == ".json":
            docs = [json.loads(text)] if text.strip() else []
        else:
            docs = list(yaml.load_all(text, Loader=_NoAliasLoader))
    except _AliasRefused as err:
        raise ManifestError(f"{path}:{err.line}: YAML alias *{err.anchor} refused: aliases can expand a few "
                            f"bytes into millions of nodes; write the value out") from None
    except yaml.MarkedYAMLError as err:
        raise ManifestError(f"{path}{_yaml_error(err)}") from None
    except yaml.YAMLError as err:
        raise ManifestError(f"{path}: YAML error: {' '.join(str(err).split())}") from None
    except json.JSONDecodeError as err:
        raise ManifestError(f"{path}:{err.lineno}: JSON syntax error: {err.msg}") from None
    objects: dict[ObjectKey, dict[str, Any]] = {}
    rejected: dict[ObjectKey, str] = {}
    for index, doc in enumerate(docs):
        for obj in _expand(doc, path, index):
            keyed = _keyed(obj, path, index)
            if keyed is None:
                continue
            key, obj = keyed
            unknown = unknown_fields(key[0], obj)
            if unknown:
                # What `kubectl apply` (strict validation) would refuse; ignoring it would hide the typo.
                ref = f"{key[1]}/{key[2]}" if key[1] else key[2]
                rejected[key] = f"{path}: {key[0]} {ref}: unknown field(s) {', '.join(unknown[:5])}"
                objects.pop(key, None)
                continue
            rejected.pop(key, None)
            objects[key] = obj
    return objects, rejected


class _AliasRefused(Exception):
    def __init__(self, anchor: str, line: int):
        super().__init__(anchor)
        self.anchor, self.line = anchor, line


class _NoAliasLoader(yaml.SafeLoader):
    """yaml.SafeLoader that stops at the first alias instead of expanding it (anchors alone are
    harmless and left alone)."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise _AliasRefused(str(event.anchor), event.start_mark.line + 1)
        return super().compose_node(parent, index)


def _yaml_error(err: yaml.MarkedYAMLError) -> str:
    """':LINE: YAML syntax error: ...' on one line. The line is where the broken construct starts
    (an unclosed [ is reported by PyYAML at the end of the file, which helps nobody)."""
    mark = err.context_mark or err.problem_mark
    where = f":{mark.line + 1}" if mark is not None else ""
    text = ", ".join(str(part) for part in (err.context, err.problem) if part) or "syntax error"
    if err.context_mark and err.problem_mark and err.problem_mark.line != err.context_mark.line:
        text += f" (line {err.problem_mark.line + 1})"
    return f"{where}: YAML syntax error: {' '.join(text.split())}"


def _expand(doc: Any, path: Path, index: int) -> Iterable[dict[str, Any]]:
    """A document's objects: itself, or the items of a List."""
    if doc is None:
        return []                       # an empty document, e.g. after a trailing ---
    if not isinstance(doc, dict):
        log.warning("%s: document %d is not a Kubernetes object (%s); skipped", path, index + 1,
                    type(doc).__name__)
        return []
    kind = doc.get("kind")
    if isinstance(kind, str) and kind.endswith("List") and kind not in KINDS:
        items = doc.get("items") or []
        if not isinstance(items, list):
            log.warning("%s: document %d (%s): items is not a list; skipped", path, index + 1, kind)
            return []
        return [item for item in items if item is not None]
    return [doc]


def _keyed(obj: Any, path: Path, index: int) -> tuple[ObjectKey, dict[str, Any]] | None:
    """The object's key and the object, its namespace defaulted; None if it is not ours."""
    kind = obj.get("kind") if isinstance(obj, dict) else None
    if kind not in KINDS:
        if not isinstance(kind, str):
            log.warning("%s: document %d has no kind; skipped", path, index + 1)
        return None                     # other kinds (Pod, Deployment, ...) are not ours to serve
    meta = obj.get("metadata")
    if not isinstance(meta, dict) or not isinstance(meta.get("name"), str) or not meta["name"]:
        log.warning("%s: document %d: %s without metadata.name; skipped", path, index + 1, kind)
        return None
    if kind in NAMESPACED and not meta.get("namespace"):
        # What kubectl does for a manifest without a namespace (in the default context).
        obj = dict(obj)
        obj["metadata"] = {**meta, "namespace": "default"}
        meta = obj["metadata"]
    namespace = meta.get("namespace") if kind in NAMESPACED else ""
    return (kind, str(namespace), meta["name"]), obj
