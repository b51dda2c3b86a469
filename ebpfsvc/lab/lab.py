"""The lab's Python API: bring a lab up, apply and delete objects, run commands in it, tear it down.

    with Lab.up(prefix="es1a2b3c", agents=False) as lab:
        lab.apply(yaml_docs)
        lab.wait_ready(["web-1"])
        out = lab.exec("client", ["curl", "-s", f"http://{lab.pod_ip('web-1')}:8080/"])

`Lab.up` builds the fabric, nodes and external clients (network.py) and starts
the controller, which from then on realizes Pods and renders manifests/.  This
class plays the API server: it validates and defaults what is applied (pod IPs,
clusterIPs, nodePorts), writes the object store and asks the controller to act.
The CLI (`ebpfsvc lab ...`) is a thin shell over the same calls.
"""

from __future__ import annotations

import copy
import ipaddress
import os
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterable

import yaml

from ebpfsvc.lab import labfile, names, network, nsenter, pods as podlib, rpc, services, teardown
from ebpfsvc.lab.processes import ProcRecord, base_env
from ebpfsvc.lab.store import State, api_time, object_key

PREFIX = re.compile(r"^[a-z0-9][a-z0-9-]{0,23}$")
APPLY_KINDS = ("Pod", "Service", "Endpoints", "EndpointSlice")


class LabError(RuntimeError):
    pass


def load_documents(path: str | Path) -> list[dict[str, Any]]:
    """The objects of a (multi-document) YAML file; `kind: List` items are flattened."""
    text = sys.stdin.read() if str(path) == "-" else Path(path).read_text()
    docs: list[dict[str, Any]] = []
    for doc in yaml.safe_load_all(text):
        if not doc:
            continue
        docs.extend(doc.get("items") or [] if doc.get("kind") == "List" else [doc])
    return docs


class Lab:
    def __init__(self, state: State, controller: subprocess.Popen | None = None):
        self.state = state
        self.spec = state.spec()
        self.prefix = state.prefix
        self._controller = controller   # set when this process started it, so it can reap it

    # -- life cycle ----------------------------------------------------------------------

    @classmethod
    def up(cls, labfile_path: str | Path | None = None, prefix: str | None = None,
           agents: bool = True) -> "Lab":
        spec = labfile.load(labfile_path)
        prefix = prefix or spec.name
        if not PREFIX.match(prefix):
            raise LabError(f"prefix {prefix!r}: lowercase letters, digits and '-', at most 24 characters")
        state = State.create(prefix, spec)
        try:
            _build(state, spec)
            lab = cls(state, _start_controller(state))
            if agents:
                for node in spec.nodes:
                    lab.agent("start", node.name)
        except BaseException:
            teardown.down(prefix)
            raise
        return lab

    @classmethod
    def open(cls, prefix: str) -> "Lab":
        return cls(State.open(prefix))

    def down(self) -> None:
        teardown.down(self.prefix, self.state.path.parent)
        if self._controller is not None:
            self._controller.wait(timeout=10)

    def __enter__(self) -> "Lab":
        return self

    def __exit__(self, *exc: object) -> None:
        self.down()

    # -- objects -------------------------------------------------------------------------

    def apply(self, docs: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
        """Create or update Pods, Services, Endpoints, EndpointSlices; returns them as stored.

        Returns once the controller has realized new Pods and manifests/ is current.
        """
        stored = []
        try:
            with self.state.lock():
                pods = self.state.list("Pod")   # kept current below: one read per apply, not per Pod
                for doc in docs:
                    obj = self._admit(doc, pods)
                    self.state.put(obj)
                    stored.append(obj)
        finally:
            # Like kubectl, what was admitted before an error stays applied: realize it now.
            self._reconcile()
        return stored

    def _admit(self, doc: dict[str, Any], pods: list[dict[str, Any]]) -> dict[str, Any]:
        """Validate and default one object, as the API server would (caller holds the lock)."""
        kind = doc.get("kind")
        if kind not in APPLY_KINDS:
            raise LabError(f"kind {kind!r} cannot be applied in the lab (only {', '.join(APPLY_KINDS)})")
        if not (doc.get("metadata") or {}).get("name"):
            raise LabError(f"{kind}: metadata.name is required")
        obj = copy.deepcopy(doc)
        obj["metadata"].setdefault("namespace", "default")
        previous = self.state.get(*object_key(obj))
        obj["metadata"]["uid"] = (previous or {}).get("metadata", {}).get("uid") or str(uuid.uuid4())
        try:
            if kind == "Pod":
                obj = self._admit_pod(obj, previous, pods)
                if previous is None:
                    pods.append(obj)
            elif kind == "Service":
                others = [s for s in self.state.list("Service") if object_key(s) != object_key(obj)]
                obj = services.admit(obj, previous, others, self.spec)
        except (podlib.PodError, services.ServiceError) as exc:
            raise LabError(str(exc)) from None
        return obj

    def _admit_pod(self, pod: dict[str, Any], previous: dict[str, Any] | None,
                   existing: list[dict[str, Any]]) -> dict[str, Any]:
        namespace, name = podlib.key(pod)
        if previous is not None:
            # Like the API server: a Pod's spec is immutable; labels and annotations are not.
            if (pod.get("spec") or {}).get("containers") != previous["spec"].get("containers"):
                raise LabError(f"Pod {podlib.label(pod)}: spec is immutable; delete the Pod and apply it again")
            previous["metadata"]["labels"] = pod["metadata"].get("labels") or {}
            previous["metadata"]["annotations"] = pod["metadata"].get("annotations") or {}
            return previous
        taken = {names.member_netns(self.prefix, n) for n in
                 [*(x.name for x in self.spec.nodes), *(x.name for x in self.spec.external)]}
        taken.add(names.fabric_netns(self.prefix))
        if names.pod_netns(self.prefix, namespace, name) in taken:
            raise LabError(f"Pod {podlib.label(pod)}: metadata.name clashes with a lab node or client name")
        node = podlib.schedule(pod, self.spec, existing)
        used = {ipaddress.IPv4Address(p["status"]["podIP"]) for p in existing
                if (p.get("status") or {}).get("podIP")}
        ip = str(podlib.allocate_ip(pod, node, used))
        podlib.probe_port(pod)   # a probe naming no container port is an error now, not later
        pod.setdefault("spec", {})["nodeName"] = node.name
        pod["metadata"]["creationTimestamp"] = api_time()
        pod["status"] = {"phase": "Pending", "podIP": ip, "podIPs": [{"ip": ip}],
                         "hostIP": str(node.address), "lab": {}}
        return pod

    def delete(self, docs: Iterable[dict[str, Any]], grace: float | None = None) -> None:
        """Delete objects. A Pod terminates: serving but not ready for its grace period
        (spec.terminationGracePeriodSeconds, or `grace`), then its process is killed."""
        missing = []
        with self.state.lock():
            for doc in docs:
                kind, namespace, name = object_key(doc)
                stored = self.state.get(kind, namespace, name)
                if stored is None:
                    missing.append(f"{kind} {namespace}/{name}")   # like kubectl: go on, report at the end
                    continue
                if kind != "Pod":
                    self.state.delete(kind, namespace, name)
                    continue
                seconds = podlib.grace_seconds(stored) if grace is None else grace
                lab = stored.setdefault("status", {}).setdefault("lab", {})
                delete_after = time.time() + seconds
                if podlib.is_terminating(stored) and lab.get("deleteAfter", delete_after) <= delete_after:
                    continue    # already terminating, sooner
                lab["deleteAfter"] = delete_after
                stored["metadata"]["deletionTimestamp"] = api_time(seconds)
                stored["metadata"]["deletionGracePeriodSeconds"] = int(seconds)
                self.state.put(stored)
        self._reconcile()
        if missing:
            raise LabError(f"not found: {', '.join(missing)}")

    def delete_object(self, kind: str, name: str, grace: float | None = None) -> None:
        namespace, name = podlib.parse_ref(name)
        self.delete([{"kind": _kind(kind), "metadata": {"name": name, "namespace": namespace}}], grace)

    def _reconcile(self) -> None:
        errors = rpc.call(self.state.path, {"op": "reconcile"}).get("errors") or []
        if errors:
            raise LabError("; ".join(errors))

    # -- reading -------------------------------------------------------------------------

    def get(self, kind: str, ref: str) -> dict[str, Any]:
        """A stored object by kind and 'name' or 'namespace/name' (Pods with their status)."""
        namespace, name = podlib.parse_ref(ref)
        obj = self.state.get(kind, namespace, name)
        if obj is None:
            raise LabError(f"no {kind} {ref!r} in lab {self.prefix}")
        return obj

    def pod(self, ref: str) -> dict[str, Any]:
        return self.get("Pod", ref)

    def pods(self) -> list[dict[str, Any]]:
        return self.state.list("Pod")

    def pod_ip(self, ref: str) -> str:
        return self.pod(ref)["status"]["podIP"]

    def service(self, ref: str) -> dict[str, Any]:
        return self.get("Service", ref)

    @property
    def manifests(self) -> Path:
        return self.state.manifests

    def endpoint_slices(self, service: str) -> list[dict[str, Any]]:
        """The EndpointSlices of a Service as agents see them in manifests/ (applied or generated)."""
        namespace, name = podlib.parse_ref(service)
        out = []
        for path in sorted(self.manifests.glob(f"endpointslice.{namespace}.*.yaml")):
            obj = yaml.safe_load(path.read_text())
            if ((obj.get("metadata") or {}).get("labels") or {}).get("kubernetes.io/service-name") == name:
                out.append(obj)
        return out

    def wait_ready(self, refs: Iterable[str], timeout: float = 30.0, ready: bool = True) -> None:
        """Wait until every pod's Ready condition is `ready` (the controller probes every 0.5 s)."""
        self._wait(refs, lambda ref: podlib.is_ready(self.pod(ref)) == ready, timeout,
                   "ready" if ready else "unready")

    def wait_gone(self, refs: Iterable[str], timeout: float = 60.0) -> None:
        """Wait until deleted pods have finished terminating and are removed."""
        self._wait(refs, lambda ref: self.state.get("Pod", *podlib.parse_ref(ref)) is None, timeout, "gone")

    @staticmethod
    def _wait(refs: Iterable[str], done: Callable[[str], bool], timeout: float, what: str) -> None:
        refs = list(refs)
        deadline = time.monotonic() + timeout
        while True:
            pending = [r for r in refs if not done(r)]
            if not pending:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"pods not {what} after {timeout}s: {pending}")
            time.sleep(0.1)

    # -- running things ------------------------------------------------------------------

    def pod_netns(self, ref: str) -> str:
        namespace, name = podlib.key(self.pod(ref))
        return names.pod_netns(self.prefix, namespace, name)

    def node_netns(self, node: str) -> str:
        return names.member_netns(self.prefix, self.spec.node(node).name)

    def external_netns(self, name: str) -> str:
        return names.member_netns(self.prefix, self.spec.external_client(name).name)

    def exec(self, pod: str, argv: list[str], timeout: float = 30.0, **kwargs: Any) -> subprocess.CompletedProcess:
        """Run argv in the pod's namespace; output captured as text unless told otherwise."""
        return _run(self.pod_netns(pod), argv, timeout, **kwargs)

    def node_exec(self, node: str, argv: list[str], timeout: float = 30.0, **kwargs: Any) -> subprocess.CompletedProcess:
        return _run(self.node_netns(node), argv, timeout, **kwargs)

    def external_exec(self, name: str, argv: list[str], timeout: float = 30.0,
                      **kwargs: Any) -> subprocess.CompletedProcess:
        return _run(self.external_netns(name), argv, timeout, **kwargs)

    def popen(self, pod: str, argv: list[str], **kwargs: Any) -> subprocess.Popen:
        """Start argv in the pod's namespace and return at once (the caller waits or kills it)."""
        return _popen(self.pod_netns(pod), argv, **kwargs)

    def node_popen(self, node: str, argv: list[str], **kwargs: Any) -> subprocess.Popen:
        """Start argv in a node's namespace (a hostNetwork process) and return at once."""
        return _popen(self.node_netns(node), argv, **kwargs)

    # -- agents --------------------------------------------------------------------------

    def agent(self, action: str, node: str) -> None:
        """start / stop / restart the agent of `node`."""
        rpc.call(self.state.path, {"op": "agent", "action": action, "node": node})

    def agent_record(self, node: str) -> ProcRecord | None:
        return self.state.read_pid(names.agent_record(node))


def _run(netns: str, argv: list[str], timeout: float, **kwargs: Any) -> subprocess.CompletedProcess:
    kwargs.setdefault("capture_output", True)
    kwargs.setdefault("text", True)
    kwargs.setdefault("env", base_env())
    return subprocess.run(podlib.interpreter(argv), preexec_fn=nsenter.preexec(netns), timeout=timeout,
                          check=False, **kwargs)


def _popen(netns: str, argv: list[str], **kwargs: Any) -> subprocess.Popen:
    kwargs.setdefault("env", base_env())
    return subprocess.Popen(podlib.interpreter(argv), preexec_fn=nsenter.preexec(netns), **kwargs)


def _build(state: State, spec: labfile.LabSpec) -> None:
    """Fabric, nodes, external clients; each namespace recorded before it is created."""
    fabric = names.fabric_netns(state.prefix)
    state.claim_namespace(fabric)
    network.build_fabric(fabric)
    prefixlen = labfile.FABRIC_CIDR.prefixlen
    for node in spec.nodes:
        netns = names.member_netns(state.prefix, node.name)
        state.claim_namespace(netns)
        network.create_namespace(netns, forwarding=True)
        network.plug_into_fabric(fabric, netns, names.fabric_port(node.name), node.address, prefixlen)
        network.add_pod_gateway(netns, node.gateway)
        network.add_routes_via(netns, [(peer.pod_cidr, peer.address) for peer in spec.nodes if peer != node])
    for ext in spec.external:
        netns = names.member_netns(state.prefix, ext.name)
        state.claim_namespace(netns)
        network.create_namespace(netns)
        network.plug_into_fabric(fabric, netns, names.fabric_port(ext.name), ext.address, prefixlen)
        network.add_routes_via(netns, [(r.to, spec.node(r.via).address) for r in ext.routes])


def _start_controller(state: State) -> subprocess.Popen:
    with open(state.log_path(names.CONTROLLER), "ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "ebpfsvc.lab.controller", str(state.path)],
                                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                # The caller's whole environment: agents inherit it from the
                                # controller (BCC_KERNEL_SOURCE and the like).
                                start_new_session=True, env={**os.environ, **base_env()})
    rec = ProcRecord.of(proc.pid)
    if rec:
        state.write_pid(names.CONTROLLER, rec)
    deadline = time.monotonic() + 15
    while True:
        try:
            rpc.call(state.path, {"op": "ping"}, timeout=5)
            return proc
        except rpc.ControllerError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise LabError(f"the lab controller did not start; see {state.log_path(names.CONTROLLER)}")
            time.sleep(0.05)


def _kind(kind: str) -> str:
    """kubectl-style kind names: pod, pods, svc, service, endpointslice(s), ep, endpoints."""
    aliases = {"pod": "Pod", "pods": "Pod", "po": "Pod", "svc": "Service", "service": "Service",
               "services": "Service", "ep": "Endpoints", "endpoints": "Endpoints",
               "endpointslice": "EndpointSlice", "endpointslices": "EndpointSlice"}
    try:
        return aliases[kind.lower()]
    except KeyError:
        raise LabError(f"unknown kind {kind!r} ({', '.join(APPLY_KINDS)})") from None
