"""A lab's state dir: the kubelet's pod records, the control plane's files, registries, locks.

Layout of /run/ebpfsvc-lab/<prefix>/ (see docs/lab.md):

    lab.yaml              the lab spec the lab was built from
    namespaces            every netns the lab created, one per line, recorded BEFORE creation
    lock                  flock: one writer at a time (CLI processes and the controller)
    objects/Pod/<namespace>/<name>.json
                          the kubelet's record of each Pod it runs: the API's Pod with the
                          status it reported and its own facts (status.lab: netns, veth, process)
    pki/, etcd/, kubeconfig, kubeconfig.cp, agent-<node>.kubeconfig, agent-config.yaml
                          the control plane's (controlplane.py) and the agents' (agents.py) files
    controller.pid/.sock/.log, agent-<node>.pid/.log, pod-<namespace>-<name>.log,
    etcd/kube-apiserver/kube-controller-manager/apiproxy.pid/.log

The state dir is also the registry `lab down --all` walks: it is created first
by `lab up` and removed last by `lab down`, so a crash in between leaves it behind
together with the lists of what to remove.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

import yaml

from ebpfsvc.datapath import nsenter
from ebpfsvc.lab import labfile, names
from ebpfsvc.lab.processes import ProcRecord

KINDS = ("Pod",)   # the kubelet's records; every other object lives in the API server


class LabNotFound(RuntimeError):
    pass


def atomic_write(path: Path, text: str) -> None:
    """Write via a temp file + rename, so readers see the old or the new file, never half.

    The temp name starts with '.' and ends in '.tmp': manifest readers skip it.
    """
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def api_time(offset: float = 0.0) -> str:
    """Now (+ offset seconds) as the API writes timestamps: RFC 3339, UTC, whole seconds."""
    return datetime.fromtimestamp(time.time() + offset, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_api_time(text: str) -> float:
    """An API timestamp (RFC 3339, UTC) as seconds since the epoch."""
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc).timestamp()


_Dumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


def dump(obj: Any) -> str:
    """YAML for people (lab.yaml)."""
    return yaml.dump(obj, Dumper=_Dumper, sort_keys=False, default_flow_style=False)


def object_key(obj: dict[str, Any]) -> tuple[str, str, str]:
    meta = obj.get("metadata") or {}
    return obj.get("kind", ""), meta.get("namespace") or "default", meta.get("name", "")


class State:
    def __init__(self, prefix: str, root: Path | None = None):
        self.prefix = prefix
        self.path = (root or names.STATE_ROOT) / prefix
        self.objects = self.path / "objects"

    # -- the directory itself ------------------------------------------------------------

    @classmethod
    def create(cls, prefix: str, spec: labfile.LabSpec) -> "State":
        state = cls(prefix)
        if state.path.exists():
            raise FileExistsError(f"lab {prefix!r} already exists ({state.path}); run `lab down` first")
        state.path.mkdir(parents=True)
        for kind in KINDS:
            (state.objects / kind).mkdir(parents=True)
        atomic_write(state.path / "lab.yaml", dump(spec.to_dict()))
        return state

    @classmethod
    def open(cls, prefix: str) -> "State":
        state = cls(prefix)
        if not (state.path / "lab.yaml").exists():
            raise LabNotFound(f"no lab {prefix!r} (no {state.path}/lab.yaml); start one with `ebpfsvc lab up`")
        return state

    def spec(self) -> labfile.LabSpec:
        return labfile.parse(yaml.safe_load((self.path / "lab.yaml").read_text()))

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)

    @contextmanager
    def lock(self) -> Iterator[None]:
        with open(self.path / "lock", "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    # -- objects -------------------------------------------------------------------------

    # The store is JSON (a subset of YAML): parsing it is fast enough to re-read every
    # object on each 0.5 s controller pass, which keeps the files the only truth.

    def _object_path(self, kind: str, namespace: str, name: str) -> Path:
        return self.objects / kind / namespace / f"{name}.json"

    def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return json.loads(self._object_path(kind, namespace, name).read_text())
        except FileNotFoundError:
            return None

    def put(self, obj: dict[str, Any]) -> None:
        path = self._object_path(*object_key(obj))
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, json.dumps(obj, indent=1))

    def delete(self, kind: str, namespace: str, name: str) -> None:
        self._object_path(kind, namespace, name).unlink(missing_ok=True)

    def list(self, kind: str) -> list[dict[str, Any]]:
        out = []
        for path in sorted((self.objects / kind).glob("*/*.json")):
            try:
                out.append(json.loads(path.read_text()))
            except FileNotFoundError:   # deleted while listing
                continue
        return out

    # -- registries ----------------------------------------------------------------------

    def claim_namespace(self, name: str) -> None:
        """Record a namespace the lab is about to create; refuse one that exists already.

        Recorded before creation, so a crash cannot orphan it; refused if present, so
        `lab down` can never remove a namespace this lab did not make.
        """
        if nsenter.exists(name):
            raise FileExistsError(f"network namespace {name} exists already (left over by another "
                                  f"lab?); not touching it")
        with open(self.path / "namespaces", "a") as f:
            f.write(name + "\n")

    def namespaces(self) -> list[str]:
        try:
            lines = (self.path / "namespaces").read_text().split()
        except FileNotFoundError:
            return []
        return list(dict.fromkeys(lines))

    def write_pid(self, name: str, rec: ProcRecord) -> None:
        atomic_write(self.path / f"{name}.pid", f"{rec.pid} {rec.start_time}\n")

    def read_pid(self, name: str) -> ProcRecord | None:
        try:
            pid, start = (self.path / f"{name}.pid").read_text().split()
        except (FileNotFoundError, ValueError):
            return None
        return ProcRecord(int(pid), int(start))

    def clear_pid(self, name: str) -> None:
        (self.path / f"{name}.pid").unlink(missing_ok=True)

    def pid_records(self) -> list[ProcRecord]:
        recs = []
        for path in self.path.glob("*.pid"):
            rec = self.read_pid(path.stem)
            if rec:
                recs.append(rec)
        return recs

    def log_path(self, name: str) -> Path:
        return self.path / f"{name}.log"
