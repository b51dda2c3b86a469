"""The lab controller: the node-side half of a lab, in one process.

Started detached by `lab up` (`python -m ebpfsvc.lab.controller STATE_DIR`), it:

- starts the lab's real control plane (etcd, kube-apiserver, kube-controller-manager:
  controlplane.py) in the cp namespace, and the loopback API proxy for the host;
- is the kubelet and CNI of every lab node: it realizes the API's Pods bound to a lab
  node (namespace, veth, routes: network.py, and the first container's command as a
  process in the pod namespace), and reports their status (podIP, phase, Ready) to the
  API, where the real EndpointSlice controller picks them up;
- probes tcpSocket readiness every 0.5 s from the pod's node (probes.py);
- finishes deletions: a deleted Pod stays terminating (serving, not ready) until its
  deletionTimestamp, then its process group is killed, its namespace removed, and the
  Pod object deleted for good;
- is the scheduler for Pods created without a node, and the cloud controller for
  LoadBalancer Services (status.loadBalancer from the lab.ebpfsvc.io/lb-ip annotation);
- starts, stops and restarts the node agents.

It is the parent of every lab process (and a child subreaper), so it reaps them:
the lab's PID 1 may not.  Everything runs in one thread, so fork() for new processes
is safe; requests (rpc.py) are served between probe rounds.
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import ipaddress
import json
import logging
import os
import select
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

from ebpfsvc.lab import agents, cgroups, controlplane, kubeproxy, names, network, pods as podlib, probes, processes, rpc
from ebpfsvc.lab.api import APIError, LabAPI, path_of as api_path
from ebpfsvc.lab.processes import base_env, spawn
from ebpfsvc.lab.store import State, api_time, parse_api_time

log = logging.getLogger("ebpfsvc.lab.controller")

PROBE_INTERVAL = 0.5
# The address a LoadBalancer Service gets from the lab's "cloud" (externalTrafficPolicy and
# loadBalancerSourceRanges tests route an external client to it).
LB_IP_ANNOTATION = "lab.ebpfsvc.io/lb-ip"
LB_INTERVAL = 5.0       # seconds between the cloud controller's passes outside of applies
PR_SET_CHILD_SUBREAPER = 36


class Controller:
    def __init__(self, state: State):
        self.state = state
        self.spec = state.spec()
        self.exit_codes: dict[int, int] = {}   # reaped pid -> exit code (negative: killed by signal)
        self.probe_streaks: dict[tuple[str, str], int] = {}   # pod key -> +successes / -failures in a row
        self.api: LabAPI | None = None                          # set by start_control_plane()
        self._next_lb_pass = 0.0
        self.held: set[str] = set()      # control-plane components stopped on request (control_plane())

    # -- main loop -----------------------------------------------------------------------

    def run(self) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
        path = rpc.socket_path(self.state.path)
        path.unlink(missing_ok=True)
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.bind(str(path))
        server.listen(16)
        owner = os.getpid()
        # pyroute2 forks helpers (netns creation) and ends them with SIGTERM: in such a
        # child, unwinding into this loop's `finally` would delete the live socket.
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0) if os.getpid() == owner else os._exit(0))
        log.info("controller of lab %s running (pid %d)", self.state.prefix, os.getpid())
        self.start_control_plane()
        next_probe = 0.0
        try:
            while self.state.path.exists():
                readable, _, _ = select.select([server], [], [], max(0.0, next_probe - time.monotonic()))
                if readable and not self._serve(server):
                    break
                if time.monotonic() >= next_probe:
                    try:
                        for error in self.reconcile(probe=True):
                            log.error("%s", error)
                    except Exception:  # noqa: BLE001 - a lab without its controller is worse
                        if not self.state.path.exists():
                            break      # torn down under our feet (`lab down --all`)
                        log.exception("reconcile failed; retrying")
                    next_probe = time.monotonic() + PROBE_INTERVAL
        finally:
            if os.getpid() == owner:
                server.close()
                path.unlink(missing_ok=True)

    def _serve(self, server: socket.socket) -> bool:
        """Answer one request; False when it was the request to shut down."""
        conn, _ = server.accept()
        keep_running = True
        with conn:
            conn.settimeout(10)
            try:
                request = json.loads(rpc.read_line(conn) or b"{}")
                op = request.get("op")
                answer: dict[str, Any] = {"ok": True}
                if op == "reconcile":
                    answer["errors"] = self.reconcile(probe=False)
                elif op == "agent":
                    self.agent(request["action"], request["node"])
                elif op == "kube-proxy":
                    self.kube_proxy(request["action"], request["node"], request.get("mode", "iptables"),
                                    request.get("args") or [])
                elif op == "control-plane":
                    self.control_plane(request["action"], request["component"])
                elif op == "shutdown":
                    self.shutdown()
                    keep_running = False
                elif op != "ping":
                    answer = {"ok": False, "error": f"unknown request {op!r}"}
            except Exception as exc:  # noqa: BLE001 - reported to the caller, the loop goes on
                log.exception("request failed")
                answer = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
            try:
                rpc.reply(conn, answer)
            except OSError:
                pass
        return keep_running

    # -- control plane -------------------------------------------------------------------

    def start_control_plane(self) -> None:
        """etcd, kube-apiserver, kube-controller-manager and the API proxy, in the cp namespace.

        The proxy's listening socket is made here, in the root namespace, on loopback, and
        inherited by the proxy process, which itself runs inside the lab (apiproxy.py).
        """
        paths = controlplane.Paths(self.state.path)
        cp = self.spec.control_plane
        netns = names.member_netns(self.state.prefix, names.CONTROL_PLANE)
        env = base_env()
        for component, argv in controlplane.commands(paths, cp.address, self.spec.service_cidrs).items():
            self._start(component, argv, netns, env)
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)
        listener.set_inheritable(True)
        port = listener.getsockname()[1]
        self._start(controlplane.API_PROXY, [sys.executable, "-m", "ebpfsvc.lab.apiproxy", str(listener.fileno()),
                                             controlplane.host_port(cp.address, controlplane.API_PORT)], netns, env)
        listener.close()
        token = paths.admin_token.read_text().strip()
        controlplane.write_kubeconfig(paths.kubeconfig, f"https://127.0.0.1:{port}", paths.ca, token,
                                      controlplane.ADMIN_USER)
        self.api = LabAPI(str(paths.kubeconfig))

    def control_plane(self, action: str, component: str) -> None:
        """stop / start / restart one of etcd, kube-apiserver, kube-controller-manager (API-fault tests).

        Same command line and pid record as at `lab up`, so etcd comes back on its data dir and
        `lab down` finds whatever runs.  Returns once the process is gone or started; waiting for
        the API to be ready again is the caller's job (Lab.wait_api_ready)."""
        paths = controlplane.Paths(self.state.path)
        argvs = controlplane.commands(paths, self.spec.control_plane.address, self.spec.service_cidrs)
        if component not in argvs:
            raise ValueError(f"unknown control-plane component {component!r} ({', '.join(argvs)})")
        if action not in ("start", "stop", "restart"):
            raise ValueError(f"unknown control-plane action {action!r} (start, stop, restart)")
        if action in ("stop", "restart"):
            self.held.add(component)
            rec = self.state.read_pid(component)
            if rec:
                processes.stop([rec], grace=10.0)     # etcd and the API server shut down gracefully
                self.state.clear_pid(component)
                log.info("%s stopped", component)
        if action in ("start", "restart"):
            if not processes.alive(self.state.read_pid(component)):
                netns = names.member_netns(self.state.prefix, names.CONTROL_PLANE)
                self._start(component, argvs[component], netns, base_env())
            self.held.discard(component)

    def _start(self, component: str, argv: list[str], netns: str, env: dict[str, str]) -> None:
        rec = spawn(argv, netns, self.state.log_path(component), env)
        self.state.write_pid(component, rec)
        log.info("%s started (pid %d)", component, rec.pid)

    # -- pods: the kubelet and CNI of every lab node ---------------------------------------

    def reconcile(self, probe: bool) -> list[str]:
        """One pass over the API's Pods (and LoadBalancer Services); returns errors.

        The API server holds the Pods; the state dir keeps, per Pod, what only this node
        knows (namespace, veth, process: `status.lab`) and the status it reported.
        """
        self._reap()
        if self.held & {controlplane.ETCD, controlplane.APISERVER}:
            # Stopped on purpose (an API-fault test): skip the API calls, which would hang on a
            # storage-less API server (4 x 30 s per call) and keep requests, such as the one to
            # start it again, waiting. Pods keep running; status is reported once it is back.
            return []
        try:
            api_pods = self.api.list("Pod")
            # The LoadBalancer Services are listed for that: after an apply, and otherwise only now
            # and then.
            if not probe or time.monotonic() >= self._next_lb_pass:
                self._load_balancers()
                self._next_lb_pass = time.monotonic() + LB_INTERVAL
        except APIError as exc:
            return [f"API server: {exc}"]
        results = self._probe() if probe else {}
        errors = []
        nodes = {n.name for n in self.spec.nodes}
        with self.state.lock():
            local = {podlib.key(p): p for p in self.state.list("Pod")}
            current = {}
            for api_pod in api_pods:
                if not (api_pod.get("spec") or {}).get("nodeName"):
                    try:
                        api_pod = self._bind(api_pod, api_pods)
                    except (APIError, podlib.PodError) as exc:
                        errors.append(f"Pod {podlib.label(api_pod)}: {exc}")
                        continue
                if api_pod["spec"]["nodeName"] in nodes:
                    current[podlib.key(api_pod)] = api_pod
            # Gone from the API (force-deleted) or replaced by a namesake: stop the old one.
            for key, rec in local.items():
                api_pod = current.get(key)
                if api_pod is None or api_pod["metadata"]["uid"] != rec["metadata"].get("uid"):
                    self._remove_pod(rec)
            pods = [_with_local_status(p, local.get(k)) for k, p in current.items()]
            # Stop the processes of every Pod whose grace period is over in one go, so a
            # Pod that ignores SIGTERM delays the others by its 2 s once, not each in turn.
            processes.stop([r for p in pods if self._grace_over(p) and (r := podlib.process(p))], grace=2.0)
            for pod in pods:
                try:
                    if self._reconcile_pod(pod, results):
                        self.state.put(pod)
                        self._report(pod)
                except podlib.PodError as exc:     # its message names the Pod
                    log.error("%s", exc)
                    errors.append(str(exc))
                except Exception as exc:  # noqa: BLE001 - one bad Pod must not stop the others
                    log.exception("pod %s", podlib.label(pod))
                    errors.append(f"Pod {podlib.label(pod)}: {exc}")
        return errors

    def _bind(self, pod: dict[str, Any], pods: list[dict[str, Any]]) -> dict[str, Any]:
        """The scheduler's part: bind an unscheduled Pod to the lab node with fewest pods."""
        node = podlib.schedule(pod, self.spec, pods)
        namespace, name = podlib.key(pod)
        self.api.request("POST", api_path("Pod", namespace, name, "binding"),
                         {"apiVersion": "v1", "kind": "Binding", "metadata": {"name": name},
                          "target": {"apiVersion": "v1", "kind": "Node", "name": node.name}})
        pod["spec"]["nodeName"] = node.name
        return pod

    def _report(self, pod: dict[str, Any]) -> None:
        """The Pod's status as kubelet reports it (the lab's own bookkeeping stays here)."""
        status = {k: v for k, v in pod["status"].items() if k != "lab"}
        namespace, name = podlib.key(pod)
        try:
            self.api.patch_status("Pod", namespace, name, status)
        except APIError as exc:
            if exc.status != 404:    # deleted meanwhile: nothing to report to
                raise

    def _load_balancers(self) -> None:
        """The cloud controller's part: a LoadBalancer Service gets its lab.ebpfsvc.io/lb-ip.

        Only those Services are listed (the API server filters on spec.type): listing every one
        every LB_INTERVAL cost this process a quarter of a core and the API server 8% at the
        benchmark's 50,000 Services, for every datapath measured there (2026-12-04)."""
        for svc in self.api.list("Service", field_selector="spec.type=LoadBalancer"):
            wanted = _load_balancer_status(svc)
            if wanted is not None and (svc.get("status") or {}).get("loadBalancer") != wanted:
                meta = svc["metadata"]
                self.api.patch_status("Service", meta["namespace"], meta["name"], {"loadBalancer": wanted})

    def _reconcile_pod(self, pod: dict[str, Any], probe_results: dict) -> bool:
        """Move one Pod towards its desired state; True if its status changed."""
        if self._grace_over(pod):
            self._remove_pod(pod)
            namespace, name = podlib.key(pod)
            self.api.delete("Pod", namespace, name, grace=0, uid=pod["metadata"]["uid"])
            return False
        status = pod["status"]
        lab = status["lab"]
        changed = False
        if not lab.get("realized") and not lab.get("failed"):
            try:
                self._realize(pod)
            except Exception as exc:
                # Undo the half-made pod and report it failed, as kubelet does a container
                # that cannot run; it is not tried again (delete it and apply it anew).
                self._stop_pod(pod)
                pod["status"] = {"phase": "Failed", "reason": "ContainerCannotRun", "message": str(exc),
                                 "lab": {"failed": True}}
                self.state.put(pod)
                self._report(pod)
                raise
            changed = True
        proc = podlib.process(pod)
        if proc and status.get("phase") == "Running" and not processes.alive(proc):
            self._reap()      # it may have finished since this pass began
            code = self.exit_codes.get(proc.pid)
            status["phase"] = "Succeeded" if code == 0 else "Failed"
            status["containerStatuses"] = [_container_status(pod, False, {"terminated": {"exitCode": code}})]
            changed = True
        ready = self._readiness(pod, probe_results)
        if ready is not None and podlib.set_ready(pod, ready, api_time()):
            if status.get("phase") == "Running":
                status["containerStatuses"] = [_container_status(pod, ready, {"running": {
                    "startedAt": status.get("startTime")}})]
            changed = True
        return changed

    @staticmethod
    def _grace_over(pod: dict[str, Any]) -> bool:
        """Deleted, and its grace period (the API's deletionTimestamp) is over."""
        deadline = (pod.get("metadata") or {}).get("deletionTimestamp")
        return bool(deadline) and time.time() >= parse_api_time(deadline)

    def _readiness(self, pod: dict[str, Any], probe_results: dict) -> bool | None:
        """Ready per annotation, else per probe (None: no result yet), else running = ready."""
        if pod["status"].get("phase") != "Running":
            return False
        override = podlib.ready_override(pod)
        if override is not None:
            return override
        if podlib.probe_port(pod) is None:
            return True
        key = podlib.key(pod)
        if key not in probe_results:
            return None
        # Consecutive results, as kubelet counts them: +n successes, -n failures.
        streak = self.probe_streaks.get(key, 0)
        if probe_results[key]:
            streak = streak + 1 if streak > 0 else 1
        else:
            streak = streak - 1 if streak < 0 else -1
        self.probe_streaks[key] = streak
        successes, failures = podlib.probe_thresholds(pod)
        if streak >= successes:
            return True
        if -streak >= failures or not podlib.is_ready(pod):
            return False
        return None     # a failure below the threshold: keep the current state

    def _realize(self, pod: dict[str, Any]) -> None:
        namespace, name = podlib.key(pod)
        node = self.spec.node(pod["spec"]["nodeName"])
        status = pod["status"]
        lab = status["lab"]
        used = {ipaddress.ip_address(ip) for p in self.state.list("Pod") if p["spec"].get("nodeName") == node.name
                for ip in podlib.pod_ips(p)}
        ips = [str(ip) for ip in podlib.allocate_ips(pod, node, used)]
        ip = ips[0]      # the primary, of the lab's first family
        netns = names.pod_netns(self.state.prefix, namespace, name)
        host_link = names.pod_host_link(namespace, name)
        self.state.claim_namespace(netns)   # before creating: a crash must not orphan it
        lab.update({"netns": netns, "hostLink": host_link})    # from now on, ours to remove
        status.update({"podIP": ip, "podIPs": [{"ip": i} for i in ips], "hostIP": str(node.address),
                       "hostIPs": [{"ip": str(a)} for a in node.addresses]})
        self.state.put(pod)
        network.create_namespace(netns, ipv6=self.spec.has_ipv6)
        network.add_pod(names.member_netns(self.state.prefix, node.name), netns, host_link, ips, node.gateway,
                        node.addresses)
        argv = podlib.command(pod)
        if argv:
            env = base_env()
            # POD_IPS: what the downward API's status.podIPs gives a container (every family).
            env.update({"POD_NAME": name, "POD_NAMESPACE": namespace, "POD_IP": ip, "POD_IPS": ",".join(ips),
                        "NODE_NAME": node.name})
            for var in (pod["spec"]["containers"][0].get("env") or []):
                if "value" in var:
                    env[var["name"]] = str(var["value"])
            log_path = self.state.log_path(names.pod_record(namespace, name))
            cgroup = cgroups.pod_cgroup(self.state.prefix, node.name, namespace, name)
            lab["process"] = spawn(argv, netns, log_path, env, cgroup=cgroup).to_dict()
            lab["log"] = str(log_path)
        status.update({"phase": "Running", "startTime": api_time()})
        status["conditions"] = [{"type": "PodScheduled", "status": "True"}, {"type": "Initialized", "status": "True"}]
        lab["realized"] = True
        log.info("pod %s running on %s with IP %s", podlib.label(pod), node.name, ", ".join(ips))

    def _remove_pod(self, pod: dict[str, Any]) -> None:
        self._stop_pod(pod)
        namespace, name = podlib.key(pod)
        self.state.delete("Pod", namespace, name)
        self.probe_streaks.pop((namespace, name), None)
        log.info("pod %s removed", podlib.label(pod))

    def _stop_pod(self, pod: dict[str, Any]) -> None:
        """End the pod's process, remove its veth and namespace."""
        proc = podlib.process(pod)
        if proc:
            processes.stop([proc], grace=2.0)
        lab = (pod.get("status") or {}).get("lab") or {}
        if lab.get("netns"):     # only what _realize claimed: never a namespace it refused
            node = names.member_netns(self.state.prefix, pod["spec"]["nodeName"])
            network.remove_link(node, lab["hostLink"])
            network.remove_namespace(lab["netns"])
            cgroups.remove_dir(cgroups.pod_cgroup(self.state.prefix, pod["spec"]["nodeName"], *podlib.key(pod)))

    def _probe(self) -> dict:
        targets = {}
        for pod in self.state.list("Pod"):
            status = pod.get("status") or {}
            if status.get("phase") != "Running" or podlib.ready_override(pod) is not None:
                continue
            try:
                port = podlib.probe_port(pod)
            except podlib.PodError:
                continue
            if port is not None:
                node_ns = names.member_netns(self.state.prefix, pod["spec"]["nodeName"])
                targets[podlib.key(pod)] = (node_ns, status["podIP"], port)
        return probes.probe_all(targets) if targets else {}

    def _reap(self) -> None:
        for pid, wait_status in processes.reap():
            self.exit_codes[pid] = os.waitstatus_to_exitcode(wait_status)

    # -- agents --------------------------------------------------------------------------

    def agent(self, action: str, node_name: str) -> None:
        self.spec.node(node_name)   # KeyError names the nodes there are
        if action in ("stop", "restart"):
            rec = self.state.read_pid(names.agent_record(node_name))
            if rec:
                processes.stop([rec], grace=5.0)
                self.state.clear_pid(names.agent_record(node_name))
        if action in ("start", "restart"):
            rec = self.state.read_pid(names.agent_record(node_name))
            if processes.alive(rec):
                return
            names.pin_dir(self.state.prefix, node_name).mkdir(parents=True, exist_ok=True)
            cgroups.create(cgroups.node_cgroup(self.state.prefix, node_name))   # --socket-lb-cgroup
            argv = agents.command(self.state, self.spec, node_name)
            log_path = self.state.log_path(names.agent_record(node_name))
            env = {**os.environ, **base_env()}   # the lab's caller's environment (see lab.py)
            rec = spawn(argv, names.member_netns(self.state.prefix, node_name), log_path, env)
            self.state.write_pid(names.agent_record(node_name), rec)
            log.info("agent on %s started (pid %d)", node_name, rec.pid)
        elif action not in ("stop", "restart"):
            raise ValueError(f"unknown agent action {action!r} (start, stop, restart)")

    def kube_proxy(self, action: str, node_name: str, mode: str, args: list[str]) -> None:
        """Start or stop the real kube-proxy in a node's namespace (kubeproxy.py builds its argv)."""
        self.spec.node(node_name)
        name = names.kube_proxy_record(node_name)
        rec = self.state.read_pid(name)
        if action == "stop":
            if rec:
                processes.stop([rec], grace=5.0)
                self.state.clear_pid(name)
            return
        if action != "start":
            raise ValueError(f"unknown kube-proxy action {action!r} (start, stop)")
        if processes.alive(rec):
            return
        argv = kubeproxy.command(self.state, self.spec, node_name, mode, [str(a) for a in args])
        rec = spawn(argv, names.member_netns(self.state.prefix, node_name), self.state.log_path(name),
                    kubeproxy.environment(self.state))
        self.state.write_pid(name, rec)
        log.info("kube-proxy (%s) on %s started (pid %d)", mode, node_name, rec.pid)

    def shutdown(self) -> None:
        """Stop every agent, kube-proxy and pod process (SIGTERM, then SIGKILL), all in parallel."""
        records = [r for n in self.spec.nodes for name in (names.agent_record(n.name), names.kube_proxy_record(n.name))
                   if (r := self.state.read_pid(name))]
        records += [r for p in self.state.list("Pod") if (r := podlib.process(p))]
        processes.stop(records, grace=3.0)
        # The control plane last, so nothing above saw its API vanish while stopping, and one
        # component at a time: an API server whose etcd went first retries it for minutes.
        control_plane = [r for c in reversed(controlplane.COMPONENTS) if (r := self.state.read_pid(c))]
        for rec in control_plane:
            processes.stop([rec], grace=3.0)
        log.info("controller of lab %s stopped %d processes", self.state.prefix, len(records) + len(control_plane))


def _load_balancer_status(svc: dict[str, Any]) -> dict[str, Any] | None:
    lb_ip = ((svc.get("metadata") or {}).get("annotations") or {}).get(LB_IP_ANNOTATION)
    if (svc.get("spec") or {}).get("type") != "LoadBalancer" or not lb_ip:
        return None
    return {"ingress": [{"ip": lb_ip, "ipMode": "VIP"}]}


def _with_local_status(api_pod: dict[str, Any], local: dict[str, Any] | None) -> dict[str, Any]:
    """The API's Pod (metadata, spec) with the status this kubelet keeps for it."""
    pod = copy.deepcopy(api_pod)
    if local is not None and local["metadata"].get("uid") == api_pod["metadata"]["uid"]:
        pod["status"] = local["status"]
    else:
        pod["status"] = {"phase": "Pending", "lab": {}}
    return pod


def _container_status(pod: dict[str, Any], ready: bool, state: dict[str, Any]) -> dict[str, Any]:
    container = pod["spec"]["containers"][0]
    return {"name": container["name"], "image": container.get("image", ""), "imageID": "",
            "ready": ready, "restartCount": 0, "started": "running" in state, "state": state}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("state_dir", type=Path)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    state = State(args.state_dir.name, root=args.state_dir.parent)
    Controller(state).run()


if __name__ == "__main__":
    main()
