"""ManifestSource: a directory of manifests delivered as list + watch events."""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path

import pytest

from ebpfsvc.config import NodeConfig
from ebpfsvc.sources.base import Event
from ebpfsvc.sources.manifests import ManifestSource
from ebpfsvc.tracker import ClusterState

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
INVALID = Path(__file__).parent / "manifests" / "invalid"


class RecordingSink:
    def __init__(self):
        self.calls: list[tuple] = []

    def on_event(self, event: Event) -> None:
        meta = event.obj["metadata"]
        self.calls.append((event.type.value, event.kind, meta.get("namespace", ""), meta["name"]))
        self.last = event

    def on_synced(self, kind: str) -> None:
        self.calls.append(("SYNCED", kind))

    def on_relist(self, kind, objects):  # pragma: no cover - a manifest source never relists
        raise AssertionError("unexpected relist")

    def take(self) -> list[tuple]:
        calls, self.calls = self.calls, []
        return calls


SYNCED_ALL = [("SYNCED", k) for k in ("Service", "EndpointSlice", "Endpoints", "Node", "ServiceCIDR")]


def svc(name: str, ip: str, port: int = 80, namespace: str | None = None) -> str:
    ns = f"\n  namespace: {namespace}" if namespace else ""
    return (f"apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}{ns}\n"
            f"spec:\n  clusterIP: {ip}\n  ports:\n  - port: {port}\n")


def write(path: Path, text: str) -> None:
    path.write_text(text)
    # Make every write visible to the (mtime, size, inode) check even on coarse-mtime filesystems.
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000 + time.monotonic_ns() % 1000))


@pytest.fixture
def sink():
    return RecordingSink()


def scan(source: ManifestSource) -> None:
    source._scan(force=False)      # one poll, deterministically, without the thread


def test_first_scan_adds_everything_then_syncs_every_kind(tmp_path, sink):
    write(tmp_path / "a.yaml", svc("web", "198.19.0.10") + "---\n" + svc("api", "198.19.0.11", namespace="prod"))
    write(tmp_path / "b.yml", "apiVersion: v1\nkind: Node\nmetadata: {name: node-1}\n---\n"
          "apiVersion: networking.k8s.io/v1\nkind: ServiceCIDR\nmetadata: {name: kubernetes}\n"
          "spec: {cidrs: [198.19.0.0/16]}\n")
    source = ManifestSource(tmp_path, sink)
    source.start()
    source.stop()
    assert sink.take() == [("ADDED", "Node", "", "node-1"), ("ADDED", "Service", "default", "web"),
                           ("ADDED", "Service", "prod", "api"), ("ADDED", "ServiceCIDR", "", "kubernetes")] + SYNCED_ALL


def test_empty_directory_still_syncs(tmp_path, sink):
    ManifestSource(tmp_path, sink).resync_now()
    assert sink.take() == SYNCED_ALL


def test_namespace_defaults_to_default(tmp_path, sink):
    write(tmp_path / "a.yaml", svc("web", "198.19.0.10"))
    ManifestSource(tmp_path, sink).resync_now()
    assert sink.last.obj["metadata"]["namespace"] == "default"
    assert sink.last.key == ("default", "web")


def test_changes_become_added_modified_deleted(tmp_path, sink):
    write(tmp_path / "a.yaml", svc("web", "198.19.0.10") + "---\n" + svc("db", "198.19.0.12"))
    source = ManifestSource(tmp_path, sink)
    scan(source)
    sink.take()
    write(tmp_path / "a.yaml", svc("web", "198.19.0.10", port=81) + "---\n" + svc("db", "198.19.0.12"))
    write(tmp_path / "b.yaml", svc("api", "198.19.0.11"))
    scan(source)
    assert sink.take() == [("ADDED", "Service", "default", "api"), ("MODIFIED", "Service", "default", "web")]
    (tmp_path / "a.yaml").unlink()
    scan(source)
    assert sink.take() == [("DELETED", "Service", "default", "db"), ("DELETED", "Service", "default", "web")]
    assert sink.last.obj["spec"]["ports"][0]["port"] == 81          # DELETED carries the last known state
    scan(source)
    assert sink.take() == []                                        # nothing changed, nothing sent


def break_one_of_two(tmp_path: Path, sink, broken: str) -> ManifestSource:
    """a.yaml (Service web) and b.yaml (Service api) listed, then a.yaml rewritten as `broken` while
    api's port changes in b.yaml: the next scan must drop neither file's objects and deliver api's."""
    write(tmp_path / "a.yaml", svc("web", "198.19.0.10"))
    write(tmp_path / "b.yaml", svc("api", "198.19.0.11"))
    source = ManifestSource(tmp_path, sink)
    scan(source)
    sink.take()
    write(tmp_path / "a.yaml", broken)
    write(tmp_path / "b.yaml", svc("api", "198.19.0.11", port=8080))
    return source


def test_yaml_error_is_one_line_and_keeps_the_files_objects(tmp_path, sink, caplog):
    source = break_one_of_two(tmp_path, sink, svc("web", "198.19.0.10") + "  - port: [81\n")
    with caplog.at_level(logging.WARNING, logger="ebpfsvc.sources.manifests"):
        scan(source)
        scan(source)                                   # unchanged broken file: not reported again
    assert sink.take() == [("MODIFIED", "Service", "default", "api")]   # the other file still counts
    (record,) = caplog.records
    assert record.getMessage().startswith(f"{tmp_path / 'a.yaml'}:9: YAML syntax error: ")
    assert record.getMessage().endswith("; keeping the 1 object(s) it held before")
    assert "\n" not in record.getMessage()
    write(tmp_path / "a.yaml", svc("web", "198.19.0.10", port=82))
    scan(source)
    assert sink.take() == [("MODIFIED", "Service", "default", "web")]


def test_broken_file_at_start_does_not_block_the_others(tmp_path, sink, caplog):
    shutil.copy(INVALID / "seed002-sticky-fragment.yaml", tmp_path / "sticky.yaml")
    write(tmp_path / "ok.yaml", svc("web", "198.19.0.10"))
    with caplog.at_level(logging.WARNING):
        ManifestSource(tmp_path, sink).resync_now()
    assert sink.take() == [("ADDED", "Service", "default", "web")] + SYNCED_ALL
    assert [r.getMessage().split(": YAML")[0] for r in caplog.records] == [f"{tmp_path / 'sticky.yaml'}:4"]


def test_unknown_field_is_refused_like_kubectl_and_the_last_good_version_kept(tmp_path, sink, caplog):
    write(tmp_path / "myapp.yaml", (EXAMPLES / "21-myapp-svc.yaml").read_text())
    source = ManifestSource(tmp_path, sink)
    scan(source)
    sink.take()
    shutil.copy(INVALID / "seed003-port-typo.yaml", tmp_path / "myapp.yaml")
    write(tmp_path / "myapp.yaml", (tmp_path / "myapp.yaml").read_text())
    with caplog.at_level(logging.WARNING):
        scan(source)
    assert sink.take() == []
    assert [r.getMessage() for r in caplog.records] == [
        f"{tmp_path / 'myapp.yaml'}: Service default/myapp-svc: unknown field(s) spec.port; keeping its previous version"]


def test_unknown_field_in_a_new_object_is_skipped(tmp_path, sink, caplog):
    shutil.copy(INVALID / "seed003-affinity-shape.yaml", tmp_path / "sticky.yaml")
    with caplog.at_level(logging.WARNING):
        ManifestSource(tmp_path, sink).resync_now()
    assert sink.take() == SYNCED_ALL
    assert caplog.records[0].getMessage().endswith("unknown field(s) spec.sessionAffinityConfig.ClientIP; skipped")


def test_lists_json_and_foreign_kinds(tmp_path, sink, caplog):
    write(tmp_path / "list.yaml", """
apiVersion: v1
kind: List
items:
- {apiVersion: v1, kind: Service, metadata: {name: a}, spec: {clusterIP: 198.19.0.1, ports: [{port: 80}]}}
- {apiVersion: v1, kind: Pod, metadata: {name: p}}
---
apiVersion: v1
kind: ServiceList
items:
- {apiVersion: v1, kind: Service, metadata: {name: b}, spec: {clusterIP: 198.19.0.2, ports: [{port: 80}]}}
---
- just a list
---
{metadata: {name: kindless}}
""")
    write(tmp_path / "c.json", json.dumps({"apiVersion": "v1", "kind": "Endpoints", "metadata": {"name": "a"},
                                           "subsets": [{"addresses": [{"ip": "198.18.1.1"}], "ports": [{"port": 80}]}]}))
    write(tmp_path / ".hidden.yaml", svc("hidden", "198.19.0.3"))
    write(tmp_path / "notes.txt", svc("text", "198.19.0.4"))
    with caplog.at_level(logging.WARNING):
        ManifestSource(tmp_path, sink).resync_now()
    assert sink.take() == [("ADDED", "Endpoints", "default", "a"), ("ADDED", "Service", "default", "a"),
                           ("ADDED", "Service", "default", "b")] + SYNCED_ALL
    messages = [r.getMessage() for r in caplog.records]
    assert messages == [f"{tmp_path / 'list.yaml'}: document 3 is not a Kubernetes object (list); skipped",
                        f"{tmp_path / 'list.yaml'}: document 4 has no kind; skipped"]


def test_json_syntax_error_names_the_line(tmp_path, sink, caplog):
    write(tmp_path / "bad.json", '{\n  "kind": "Service",\n  "metadata": {\n}')
    with caplog.at_level(logging.WARNING):
        ManifestSource(tmp_path, sink).resync_now()
    assert caplog.records[0].getMessage().startswith(f"{tmp_path / 'bad.json'}:4: JSON syntax error")


def test_same_object_in_two_files_last_file_wins(tmp_path, sink):
    write(tmp_path / "a.yaml", svc("web", "198.19.0.10"))
    write(tmp_path / "b.yaml", svc("web", "198.19.0.10", port=81))
    source = ManifestSource(tmp_path, sink)
    scan(source)
    assert sink.last.obj["spec"]["ports"][0]["port"] == 81
    sink.take()
    (tmp_path / "b.yaml").unlink()
    scan(source)
    assert sink.take() == [("MODIFIED", "Service", "default", "web")]
    assert sink.last.obj["spec"]["ports"][0]["port"] == 80


def test_resync_now_rereads_files_whose_mtime_did_not_move(tmp_path, sink):
    path = tmp_path / "a.yaml"
    write(path, svc("web", "198.19.0.10", port=80))
    source = ManifestSource(tmp_path, sink)
    scan(source)
    sink.take()
    st = path.stat()
    path.write_text(svc("web", "198.19.0.10", port=81))           # same size
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))           # same mtime
    scan(source)
    assert sink.take() == []                                      # a poll cannot see it...
    source.resync_now()
    assert sink.take() == [("MODIFIED", "Service", "default", "web")]   # ...a forced resync does


def test_missing_directory_is_empty_until_created(tmp_path, sink, caplog):
    directory = tmp_path / "later"
    source = ManifestSource(directory, sink)
    with caplog.at_level(logging.WARNING):
        scan(source)
        scan(source)
    assert sink.take() == SYNCED_ALL
    assert len(caplog.records) == 1 and "treating it as empty" in caplog.records[0].getMessage()
    directory.mkdir()
    write(directory / "a.yaml", svc("web", "198.19.0.10"))
    scan(source)
    assert sink.take() == [("ADDED", "Service", "default", "web")]


def test_watching_delivers_changes_to_the_cluster_state(tmp_path):
    state = ClusterState(NodeConfig("node-1"))
    source = ManifestSource(tmp_path, state, poll_interval=0.02)
    source.start()
    try:
        assert state.synced
        state.snapshot()
        write(tmp_path / "web.yaml", svc("web", "198.19.0.10"))
        deadline = time.monotonic() + 5
        while ("default", "web") not in state.snapshot().services:
            assert time.monotonic() < deadline, "the change was never picked up"
            state.wait_changed(0.1)
        write(tmp_path / "web.yaml", svc("web", "198.19.0.10").replace("port: 80", "port: 70000"))
        deadline = time.monotonic() + 5
        while not state.problems:
            assert time.monotonic() < deadline, "the bad update was never seen"
            time.sleep(0.02)
        assert str(state.problems[0]) == "Service default/web: spec.ports[0].port: 70000 is out of range 1-65535"
        assert state.snapshot().services["default", "web"].ports[0].port == 80     # last good stays
    finally:
        source.stop()


def test_examples_directory_loads_cleanly():
    state = ClusterState(NodeConfig("node-1"))
    ManifestSource(EXAMPLES, state).resync_now()
    snap = state.snapshot()
    assert state.problems == [] and state.synced
    assert len(snap.services) == 22
    assert {("default", "plat-dev"), ("default", "mwish-bot-svc-redis"), ("mysql-space", "mysql-balance-svc")} \
        <= set(snap.services)


def test_invalid_seed_directory_reports_each_problem(tmp_path, caplog):
    for path in INVALID.glob("*.yaml"):
        shutil.copy(path, tmp_path / path.name)
    state = ClusterState(NodeConfig("node-1"))
    with caplog.at_level(logging.WARNING):
        ManifestSource(tmp_path, state).resync_now()
    # Unknown fields are stopped at the source; the protocol typo reaches the tracker's validation.
    assert [str(p) for p in state.problems] == [
        "Service default/my-service: spec.ports[0].protocol: 'http' is not one of TCP, UDP, SCTP"]
    assert state.snapshot().services == {}
    assert len(caplog.records) == 5      # one line per broken object or file


# A "billion laughs" in a Service's annotations (kept small here: each level multiplies by 9).
ALIAS_BOMB = """apiVersion: v1
kind: Service
metadata:
  name: bomb
  annotations:
    a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]
    b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
    c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
spec:
  clusterIP: 198.19.0.12
  ports:
  - port: 80
"""


def test_yaml_aliases_are_refused_in_one_line_and_the_files_objects_kept(tmp_path, sink, caplog):
    source = break_one_of_two(tmp_path, sink, ALIAS_BOMB)
    with caplog.at_level(logging.WARNING, logger="ebpfsvc.sources.manifests"):
        scan(source)
    assert sink.take() == [("MODIFIED", "Service", "default", "api")]   # the other file still counts
    (record,) = caplog.records
    assert record.getMessage() == (
        f"{tmp_path / 'a.yaml'}:7: YAML alias *a refused: aliases can expand a few bytes into millions of "
        f"nodes; write the value out; keeping the 1 object(s) it held before")


def test_anchor_without_alias_is_fine(tmp_path, sink):
    write(tmp_path / "a.yaml", svc("web", "198.19.0.10").replace("spec:", "spec: &s", 1))
    ManifestSource(tmp_path, sink).resync_now()
    assert sink.take()[0] == ("ADDED", "Service", "default", "web")


def test_oversized_file_is_refused_in_one_line(tmp_path, sink, caplog, monkeypatch):
    from ebpfsvc.sources import manifests

    monkeypatch.setattr(manifests, "MAX_FILE_BYTES", 1024 * 1024)
    write(tmp_path / "big.yaml", svc("big", "198.19.0.10") + "# " + "x" * (1024 * 1024) + "\n")
    write(tmp_path / "ok.yaml", svc("web", "198.19.0.11"))
    with caplog.at_level(logging.WARNING, logger="ebpfsvc.sources.manifests"):
        ManifestSource(tmp_path, sink).resync_now()
    assert sink.take() == [("ADDED", "Service", "default", "web")] + SYNCED_ALL
    assert [r.getMessage() for r in caplog.records] == [
        f"{tmp_path / 'big.yaml'}: larger than 1 MiB; not read (split it into several files); "
        f"keeping the 0 object(s) it held before"]
