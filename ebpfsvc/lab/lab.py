"""The lab's Python API: bring a lab up, apply and delete objects, run commands in it, tear it down.

    with Lab.up(prefix="es1a2b3c", agents=False) as lab:
        lab.apply(yaml_docs)
        lab.wait_ready(["web-1"])
        out = lab.exec("client", ["curl", "-s", f"http://{lab.pod_ip('web-1')}:8080/"])

`Lab.up` builds the fabric, nodes, external clients and the control plane's namespace
(network.py), starts the controller, which runs the real etcd, kube-apiserver and
kube-controller-manager (controlplane.py) and acts as every node's kubelet, registers the
Nodes, installs deploy/'s ServiceAccount and RBAC, and starts one agent per node with
deploy/'s configuration (agents.py).  From then on the API server is the only store of
objects: `apply` sends them there (server-side apply), so defaulting, validation and
allocation are the real ones, and the real EndpointSlice controller makes the slices the
agents watch.  The CLI (`ebpfsvc lab ...`) is a thin shell over the same calls, and
`kubectl --kubeconfig $(ebpfsvc lab kubeconfig)` works against the same lab.
"""

from __future__ import annotations

import copy
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import yaml

from ebpfsvc.lab import (agents as agentlib, cgroups, controlplane, labfile, names, network, pods as podlib, processes,
                         rpc, teardown)
from ebpfsvc.lab.api import RESOURCES, APIError, LabAPI
from ebpfsvc.lab.kubeproxy import HEALTHZ_PORT      # the agent binds kube-proxy's (deploy/)
from ebpfsvc.lab.processes import ProcRecord, base_env
from ebpfsvc.lab.store import State, object_key

PREFIX = re.compile(r"^[a-z0-9][a-z0-9-]{0,23}$")
APPLY_KINDS = ("Namespace", "Pod", "Service", "Endpoints", "EndpointSlice")


class LabError(RuntimeError):
    pass


MANIFEST_SUFFIXES = (".yaml", ".yml", ".json")


def load_documents(*paths: str | Path) -> list[dict[str, Any]]:
    """The objects of (multi-document) YAML files, in order; `kind: List` items are flattened.
    A directory means its *.yaml, *.yml and *.json files in name order (not recursive, as kubectl's
    -f DIR); "-" is standard input. A missing or unreadable file or bad YAML is a LabError."""
    docs: list[dict[str, Any]] = []
    for path in paths:
        if str(path) != "-" and Path(path).is_dir():
            files = sorted(p for p in Path(path).iterdir() if p.suffix in MANIFEST_SUFFIXES)
            docs += load_documents(*files)
            continue
        try:
            text = sys.stdin.read() if str(path) == "-" else Path(path).read_text()
            loaded = list(yaml.safe_load_all(text))
        except OSError as exc:
            raise LabError(f"{path}: {exc.strerror or exc}") from None
        except yaml.YAMLError as exc:
            raise LabError(f"{path}: not valid YAML: {' '.join(str(exc).split())}") from None
        for doc in loaded:
            if not doc:
                continue
            if not isinstance(doc, dict):
                raise LabError(f"{path}: a document is not an object: {doc!r:.60}")
            docs.extend(doc.get("items") or [] if doc.get("kind") == "List" else [doc])
    return docs


class Lab:
    def __init__(self, state: State, controller: subprocess.Popen | None = None):
        self.state = state
        self.spec = state.spec()
        self.prefix = state.prefix
        self._controller = controller   # set when this process started it, so it can reap it
        self._api: LabAPI | None = None
        self._namespaces: set[str] = set()
        self._pod_namespaces: set[str] = set()     # whose `default` ServiceAccount exists

    @property
    def kubeconfig(self) -> Path:
        """The admin kubeconfig: `kubectl --kubeconfig` this, from the host."""
        return controlplane.Paths(self.state.path).kubeconfig

    @property
    def api(self) -> LabAPI:
        if self._api is None:
            self._api = LabAPI(str(self.kubeconfig))
        return self._api

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
            paths = controlplane.Paths(state.path)
            controlplane.make_pki(paths, spec.control_plane.addresses, spec.service_cidr.network_address + 1)
            lab = cls(state, _start_controller(state))
            controlplane.wait_ready(lab.api, log_hint=f"; see {state.path}/kube-apiserver.log")
            controlplane.register_nodes(lab.api, spec)
            controlplane.install_agent_identity(lab.api, paths, spec, spec.control_plane.address)
            agentlib.write_config(state)
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
        if self._api is not None:
            self._api.close()
        teardown.down(self.prefix, self.state.path.parent)
        if self._controller is not None:
            self._controller.wait(timeout=10)

    def __enter__(self) -> "Lab":
        return self

    def __exit__(self, *exc: object) -> None:
        self.down()

    # -- objects -------------------------------------------------------------------------

    def apply(self, docs: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
        """Apply objects to the API server (server-side apply); returns them as stored.

        Returns once the lab's kubelet has realized new Pods.  Like kubectl, what was
        applied before an error stays applied.
        """
        stored = []
        try:
            for doc in docs:
                obj = self._admit(doc)
                try:
                    stored.append(self.api.apply(obj))
                except APIError as exc:
                    raise LabError(str(exc)) from None
        finally:
            self._reconcile()
        self._raise_cannot_run(stored)
        return stored

    def _raise_cannot_run(self, stored: list[dict[str, Any]]) -> None:
        """A new Pod the kubelet could not start is this apply's error, whichever of the
        controller's passes found it: its periodic pass may realize the Pod before our
        reconcile request arrives, and then reports the failure only in its log."""
        for obj in stored:
            if obj.get("kind") != "Pod":
                continue
            meta = obj["metadata"]
            pod = self.api.get("Pod", meta["namespace"], meta["name"])
            status = (pod or {}).get("status") or {}
            if pod and pod["metadata"]["uid"] == meta["uid"] and status.get("reason") == "ContainerCannotRun":
                raise LabError(f"Pod {meta['namespace']}/{meta['name']}: {status.get('message', '')}")

    def _admit(self, doc: dict[str, Any]) -> dict[str, Any]:
        """The lab's own checks before the API server's: what a lab pod can be."""
        kind = doc.get("kind")
        if kind not in APPLY_KINDS:
            raise LabError(f"kind {kind!r} cannot be applied with `lab apply` (only {', '.join(APPLY_KINDS)}); "
                           f"use kubectl --kubeconfig {self.kubeconfig}")
        if not (doc.get("metadata") or {}).get("name"):
            raise LabError(f"{kind}: metadata.name is required")
        obj = copy.deepcopy(doc)
        if RESOURCES[kind][2]:      # namespaced
            obj["metadata"].setdefault("namespace", "default")
            self._ensure_namespace(obj)
        if kind == "Pod":
            try:
                obj = podlib.admit(obj, self.prefix, self.spec)
            except podlib.PodError as exc:
                raise LabError(str(exc)) from None
        return obj

    def _ensure_namespace(self, obj: dict[str, Any]) -> None:
        """The lab creates a namespace on first use (kubectl would ask for it first)."""
        namespace = obj["metadata"]["namespace"]
        if namespace not in self._namespaces:
            if self.api.get("Namespace", None, namespace) is None:
                self.api.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}})
            self._namespaces.add(namespace)
        if obj["kind"] == "Pod" and namespace not in self._pod_namespaces:
            self._wait_default_service_account(namespace)
            self._pod_namespaces.add(namespace)

    def _wait_default_service_account(self, namespace: str, timeout: float = 120.0) -> None:
        """The API server's ServiceAccount admission refuses a Pod until the namespace's `default`
        ServiceAccount exists, which kube-controller-manager creates a moment after the namespace
        (also `default`'s own, just after `lab up`): wait for it, as a fresh cluster's user would.
        Generous: on a shared machine at load 20 the controller manager took over 30 s to start."""
        deadline = time.monotonic() + timeout
        while self.api.get("ServiceAccount", namespace, "default") is None:
            if time.monotonic() >= deadline:
                raise LabError(f"namespace {namespace}: no `default` ServiceAccount after {timeout:.0f} s "
                               f"(is kube-controller-manager running? `lab status`)")
            time.sleep(0.2)

    def delete(self, docs: Iterable[dict[str, Any]], grace: float | None = None) -> None:
        """Delete objects. A Pod terminates: serving but not ready for its grace period
        (spec.terminationGracePeriodSeconds, or `grace`), then its process is killed."""
        missing = []
        for doc in docs:
            kind, namespace, name = object_key(doc)
            try:
                if not self.api.delete(kind, namespace, name, grace=grace if kind == "Pod" else None):
                    missing.append(f"{kind} {namespace}/{name}")   # like kubectl: go on, report at the end
            except APIError as exc:
                raise LabError(str(exc)) from None
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
        """An object from the API server by kind and 'name' or 'namespace/name'."""
        namespace, name = podlib.parse_ref(ref)
        obj = self.api.get(kind, namespace, name)
        if obj is None:
            raise LabError(f"no {kind} {ref!r} in lab {self.prefix}")
        return obj

    def pod(self, ref: str) -> dict[str, Any]:
        return self.get("Pod", ref)

    def pods(self) -> list[dict[str, Any]]:
        return self.api.list("Pod")

    def pod_ip(self, ref: str) -> str:
        ip = (self.pod(ref).get("status") or {}).get("podIP")
        if not ip:
            raise LabError(f"Pod {ref!r} has no IP yet")
        return ip

    def service(self, ref: str) -> dict[str, Any]:
        return self.get("Service", ref)

    def endpoint_slices(self, service: str) -> list[dict[str, Any]]:
        """The EndpointSlices of a Service, from the API server (the controller's and any applied)."""
        namespace, name = podlib.parse_ref(service)
        return self.api.list("EndpointSlice", namespace, label_selector=f"kubernetes.io/service-name={name}")

    def wait_ready(self, refs: Iterable[str], timeout: float = 30.0, ready: bool = True) -> None:
        """Wait until every pod's Ready condition is `ready` (the kubelet probes every 0.5 s)."""
        self._wait(refs, lambda ref: podlib.is_ready(self.pod(ref)) == ready, timeout,
                   "ready" if ready else "unready")

    def wait_gone(self, refs: Iterable[str], timeout: float = 60.0) -> None:
        """Wait until deleted pods have finished terminating and are removed."""
        self._wait(refs, lambda ref: self.api.get("Pod", *podlib.parse_ref(ref)) is None, timeout, "gone")

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

    # -- agents in sync ------------------------------------------------------------------

    def drift(self, node: str) -> list[dict[str, Any]]:
        """How `node`'s maps differ from what the API server says that node should serve, computed
        as `ebpfsvc drift` does (the agent's own trackers and desired state): [] = in sync."""
        from ebpfsvc.config import NodeConfig
        from ebpfsvc.inspect import views
        from ebpfsvc.inspect.desired import load_desired
        from ebpfsvc.inspect.node import NodeMaps
        from ebpfsvc.nodeinfo import NodeSettings

        desired = load_desired(NodeConfig(node_name=node), kubeconfig=str(self.kubeconfig), settings=NodeSettings(),
                               netns=self.node_netns(node), ip_families_auto=True)     # deploy/'s default
        try:
            maps = NodeMaps.open(names.pin_dir(self.prefix, node))
        except (OSError, ValueError):
            return [{"frontend": "", "service": "", "problem": "no datapath yet (the agent is starting)"}]
        with maps:
            return views.drift(desired, maps)

    def wait_synced(self, timeout: float = 90.0) -> None:
        """Until every running agent serves exactly what the API says, twice in a row 0.3 s apart
        (the EndpointSlice controller may still be catching up with the first)."""
        deadline = time.monotonic() + timeout
        settled = 0
        while True:
            nodes = [n.name for n in self.spec.nodes if processes.alive(self.agent_record(n.name))]
            behind = {node: diffs for node in nodes if (diffs := self.drift(node))}
            behind.update({node: [{"service": "", "frontend": "(every frontend)", "problem": "programs compiling"}]
                           for node in nodes if node not in behind and self.programs_compiling(node)})
            settled = 0 if behind else settled + 1
            if settled >= 2:
                return
            if time.monotonic() > deadline:
                node, diffs = next(iter(behind.items()))
                first = diffs[0]
                raise LabError(f"agents not in sync after {timeout:.0f}s: {node}: {len(diffs)} frontend(s) differ, "
                               f"e.g. {first['service'] or first['frontend']}: {first['problem']} "
                               f"(see `ebpfsvc lab logs agent/{node}`)")
            time.sleep(0.3)

    def programs_compiling(self, node: str) -> bool:
        """Whether the agent of `node`, new on it, is still compiling its programs. It writes its
        maps meanwhile (agent.py), so drift can be nil while nothing attached serves them yet;
        its /healthz says so. An agent not answering yet counts as compiling."""
        import http.client
        import json

        from ebpfsvc.agent import PROGRAMS_COMPILING
        from ebpfsvc.datapath import nsenter

        def reason() -> str:
            conn = http.client.HTTPConnection("127.0.0.1", HEALTHZ_PORT, timeout=2)
            try:
                conn.request("GET", "/healthz")
                return json.loads(conn.getresponse().read() or b"{}").get("reason", "")
            finally:
                conn.close()

        try:
            return PROGRAMS_COMPILING in nsenter.run_in(self.node_netns(node), reason)
        except (OSError, ValueError):
            return True

    # -- running things ------------------------------------------------------------------

    def pod_netns(self, ref: str) -> str:
        namespace, name = podlib.key(self.pod(ref))
        return names.pod_netns(self.prefix, namespace, name)

    def node_netns(self, node: str) -> str:
        return names.member_netns(self.prefix, self.spec.node(node).name)

    def external_netns(self, name: str) -> str:
        return names.member_netns(self.prefix, self.spec.external_client(name).name)

    def pod_cgroup(self, ref: str) -> Path:
        """The pod's cgroup v2 directory, below its node's (cgroups.py): where its processes run."""
        pod = self.pod(ref)
        return cgroups.pod_cgroup(self.prefix, pod["spec"]["nodeName"], *podlib.key(pod))

    def host_cgroup(self, node: str) -> Path:
        return cgroups.host_cgroup(self.prefix, self.spec.node(node).name)

    def exec(self, pod: str, argv: list[str], timeout: float = 30.0, **kwargs: Any) -> subprocess.CompletedProcess:
        """Run argv in the pod's namespace and cgroup, as `kubectl exec` runs in the pod's
        containers; output captured as text unless told otherwise."""
        return _run(self.pod_netns(pod), argv, timeout, cgroup=self.pod_cgroup(pod), **kwargs)

    def node_exec(self, node: str, argv: list[str], timeout: float = 30.0, **kwargs: Any) -> subprocess.CompletedProcess:
        """Run argv in the node's namespace, in the node's cgroup (its own processes)."""
        return _run(self.node_netns(node), argv, timeout, cgroup=self.host_cgroup(node), **kwargs)

    def external_exec(self, name: str, argv: list[str], timeout: float = 30.0,
                      **kwargs: Any) -> subprocess.CompletedProcess:
        return _run(self.external_netns(name), argv, timeout, **kwargs)

    def popen(self, pod: str, argv: list[str], **kwargs: Any) -> subprocess.Popen:
        """Start argv in the pod's namespace and cgroup and return at once (the caller waits or kills it)."""
        return _popen(self.pod_netns(pod), argv, cgroup=self.pod_cgroup(pod), **kwargs)

    def node_popen(self, node: str, argv: list[str], **kwargs: Any) -> subprocess.Popen:
        """Start argv in a node's namespace and cgroup (a hostNetwork process) and return at once."""
        return _popen(self.node_netns(node), argv, cgroup=self.host_cgroup(node), **kwargs)

    # -- agents --------------------------------------------------------------------------

    def agent(self, action: str, node: str) -> None:
        """start / stop / restart the agent of `node`."""
        rpc.call(self.state.path, {"op": "agent", "action": action, "node": node})

    def agent_record(self, node: str) -> ProcRecord | None:
        return self.state.read_pid(names.agent_record(node))

    # -- control plane -------------------------------------------------------------------

    def control_plane(self, action: str, component: str) -> None:
        """start / stop / restart one control-plane component: etcd, kube-apiserver or
        kube-controller-manager (API-fault tests). Returns once it is stopped or started,
        not once it is ready: see wait_api_ready()."""
        rpc.call(self.state.path, {"op": "control-plane", "action": action, "component": component})

    def wait_api_ready(self, timeout: float = 90.0) -> None:
        """Until the API server answers /readyz (etcd reachable, bootstrap done)."""
        controlplane.wait_ready(self.api, timeout, log_hint=f"; see {self.state.path}/kube-apiserver.log")


def _run(netns: str, argv: list[str], timeout: float, cgroup: Path | None = None,
         **kwargs: Any) -> subprocess.CompletedProcess:
    kwargs.setdefault("capture_output", True)
    kwargs.setdefault("text", True)
    kwargs.setdefault("env", base_env())
    return subprocess.run(podlib.interpreter(argv), preexec_fn=cgroups.preexec(netns, cgroup), timeout=timeout,
                          check=False, **kwargs)


def _popen(netns: str, argv: list[str], cgroup: Path | None = None, **kwargs: Any) -> subprocess.Popen:
    kwargs.setdefault("env", base_env())
    return subprocess.Popen(podlib.interpreter(argv), preexec_fn=cgroups.preexec(netns, cgroup), **kwargs)


def _build(state: State, spec: labfile.LabSpec) -> None:
    """Fabric, nodes, external clients; each namespace recorded before it is created.
    Every family of the lab gets the same wiring: addresses, routes via the peer's address
    of the same family."""
    fabric = names.fabric_netns(state.prefix)
    state.claim_namespace(fabric)
    ipv6 = spec.has_ipv6
    network.build_fabric(fabric, ipv6=ipv6)

    def on_fabric(addresses) -> list:
        return [(a, labfile.FABRIC_CIDRS[a.version].prefixlen) for a in addresses]

    def via(node: labfile.NodeSpec, to) -> tuple:
        return (to, node.address_of(to.version))

    for node in spec.nodes:
        netns = names.member_netns(state.prefix, node.name)
        state.claim_namespace(netns)
        network.create_namespace(netns, forwarding=True, ipv6=ipv6)
        network.plug_into_fabric(fabric, netns, names.fabric_port(node.name), on_fabric(node.addresses))
        if node.gateway is not None:
            network.add_pod_gateway(netns, node.gateway)
        network.add_routes_via(netns, [via(peer, cidr) for peer in spec.nodes if peer != node for cidr in peer.pod_cidrs])
    cp = names.member_netns(state.prefix, names.CONTROL_PLANE)
    state.claim_namespace(cp)
    network.create_namespace(cp, ipv6=ipv6)
    network.plug_into_fabric(fabric, cp, names.fabric_port(names.CONTROL_PLANE), on_fabric(spec.control_plane.addresses))
    # Pods reach the API server through the `kubernetes` Service, so it must route back to them.
    network.add_routes_via(cp, [via(node, cidr) for node in spec.nodes for cidr in node.pod_cidrs])
    for ext in spec.external:
        netns = names.member_netns(state.prefix, ext.name)
        state.claim_namespace(netns)
        network.create_namespace(netns, ipv6=ipv6)
        network.plug_into_fabric(fabric, netns, names.fabric_port(ext.name), on_fabric(ext.addresses))
        routes = [via(spec.node(r.via), r.to) for r in ext.routes]
        # IPv6 pod addresses are routed from outside the cluster, as an upstream router that
        # learns each node's IPv6 pod CIDR (BGP, static routes) makes them: there is no NAT66,
        # so in IPv6 clusters pods are commonly reachable directly. IPv4 pod CIDRs stay private.
        routes += [via(node, cidr) for node in spec.nodes for cidr in node.pod_cidrs if cidr.version == 6]
        network.add_routes_via(netns, routes)


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
    # The controller answers once it has spawned the control plane (controller.run): on a loaded
    # machine (load 11 on 2 cores) that took more than a 5 s ping, so a silent ping is "not yet"
    # as long as the controller lives, within a deadline that still ends a hung start.
    deadline = time.monotonic() + 60
    while True:
        try:
            rpc.call(state.path, {"op": "ping"}, timeout=5)
            return proc
        except (rpc.ControllerError, TimeoutError):
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
