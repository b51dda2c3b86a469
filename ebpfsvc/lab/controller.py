"""The lab controller: kubelet, CNI and EndpointSlice controller of one lab, in one process.

Started detached by `lab up` (`python -m ebpfsvc.lab.controller STATE_DIR`), it:

- realizes Pods written to the object store: namespace, veth, routes (network.py),
  and the first container's command as a process in the pod namespace;
- probes tcpSocket readiness every 0.5 s from the pod's node (probes.py) and keeps
  each Pod's Ready condition;
- finishes deletions: a deleted Pod stays terminating (serving, not ready) for its
  grace period, then its process group is killed and its namespace removed;
- starts, stops and restarts the node agents;
- re-renders manifests/ whenever any of that changed what agents should see.

It is the parent of every pod and agent process (and a child subreaper), so it
reaps them: the lab's PID 1 may not.  Everything runs in one thread, so fork()
for new processes is safe; requests (rpc.py) are served between probe rounds.
"""

from __future__ import annotations

import argparse
import ctypes
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

from ebpfsvc.lab import agents, manifests, names, network, pods as podlib, probes, processes, rpc
from ebpfsvc.lab.processes import base_env, spawn
from ebpfsvc.lab.store import State, api_time

log = logging.getLogger("ebpfsvc.lab.controller")

PROBE_INTERVAL = 0.5
PR_SET_CHILD_SUBREAPER = 36


class Controller:
    def __init__(self, state: State):
        self.state = state
        self.spec = state.spec()
        self.exit_codes: dict[int, int] = {}   # reaped pid -> exit code (negative: killed by signal)
        self.probe_streaks: dict[tuple[str, str], int] = {}   # pod key -> +successes / -failures in a row

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

    # -- pods ----------------------------------------------------------------------------

    def reconcile(self, probe: bool) -> list[str]:
        """One pass over every Pod, then manifests/; returns errors (the Pods failed are gone)."""
        self._reap()
        results = self._probe() if probe else {}
        errors = []
        with self.state.lock():
            pods = self.state.list("Pod")
            # Stop the processes of every Pod whose grace period is over in one go, so a
            # Pod that ignores SIGTERM delays the others by its 2 s once, not each in turn.
            processes.stop([r for p in pods if self._grace_over(p) and (r := podlib.process(p))], grace=2.0)
            for pod in pods:
                try:
                    if self._reconcile_pod(pod, results):
                        self.state.put(pod)
                except Exception as exc:  # noqa: BLE001 - one bad Pod must not stop the others
                    log.exception("pod %s", podlib.label(pod))
                    errors.append(f"Pod {podlib.label(pod)}: {exc}")
            manifests.sync(self.state)
        return errors

    def _reconcile_pod(self, pod: dict[str, Any], probe_results: dict) -> bool:
        """Move one Pod towards its desired state; True if its stored object must be updated."""
        if self._grace_over(pod):
            self._remove_pod(pod)
            return False
        status = pod.setdefault("status", {})
        lab = status.setdefault("lab", {})
        changed = False
        if not lab.get("realized"):
            try:
                self._realize(pod)
            except Exception:
                # Undo the half-made pod, so that applying it again starts from scratch.
                self._remove_pod(pod)
                raise
            changed = True
        proc = podlib.process(pod)
        if proc and status.get("phase") == "Running" and not processes.alive(proc):
            self._reap()      # it may have finished since this pass began
            code = self.exit_codes.get(proc.pid)
            status["phase"] = "Succeeded" if code == 0 else "Failed"
            status["containerStatuses"] = [{"name": "main", "ready": False,
                                            "state": {"terminated": {"exitCode": code}}}]
            changed = True
        ready = self._readiness(pod, probe_results)
        if ready is not None:
            changed |= podlib.set_ready(pod, ready, api_time())
        return changed

    @staticmethod
    def _grace_over(pod: dict[str, Any]) -> bool:
        deadline = ((pod.get("status") or {}).get("lab") or {}).get("deleteAfter", 0)
        return podlib.is_terminating(pod) and time.time() >= deadline

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
        netns = names.pod_netns(self.state.prefix, namespace, name)
        host_link = names.pod_host_link(namespace, name)
        self.state.claim_namespace(netns)   # before creating: a crash must not orphan it
        lab.update({"netns": netns, "hostLink": host_link})    # from now on, ours to remove
        network.create_namespace(netns)
        network.add_pod(names.member_netns(self.state.prefix, node.name), netns, host_link,
                        status["podIP"], node.gateway)
        argv = podlib.command(pod)
        if argv:
            env = base_env()
            env.update({"POD_NAME": name, "POD_NAMESPACE": namespace, "POD_IP": status["podIP"],
                        "NODE_NAME": node.name})
            for var in (pod["spec"]["containers"][0].get("env") or []):
                if "value" in var:
                    env[var["name"]] = str(var["value"])
            log_path = self.state.log_path(names.pod_record(namespace, name))
            lab["process"] = spawn(argv, netns, log_path, env).to_dict()
            lab["log"] = str(log_path)
        status.update({"phase": "Running", "startTime": api_time()})
        lab["realized"] = True
        log.info("pod %s running on %s with IP %s", podlib.label(pod), node.name, status["podIP"])

    def _remove_pod(self, pod: dict[str, Any]) -> None:
        namespace, name = podlib.key(pod)
        proc = podlib.process(pod)
        if proc:
            processes.stop([proc], grace=2.0)
        lab = (pod.get("status") or {}).get("lab") or {}
        if lab.get("netns"):     # only what _realize claimed: never a namespace it refused
            node = names.member_netns(self.state.prefix, pod["spec"]["nodeName"])
            network.remove_link(node, lab["hostLink"])
            network.remove_namespace(lab["netns"])
        self.state.delete("Pod", namespace, name)
        self.probe_streaks.pop((namespace, name), None)
        log.info("pod %s removed", podlib.label(pod))

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
            argv = agents.command(self.state, self.spec, node_name)
            log_path = self.state.log_path(names.agent_record(node_name))
            env = {**os.environ, **base_env()}   # the lab's caller's environment (see lab.py)
            rec = spawn(argv, names.member_netns(self.state.prefix, node_name), log_path, env)
            self.state.write_pid(names.agent_record(node_name), rec)
            log.info("agent on %s started (pid %d)", node_name, rec.pid)
        elif action not in ("stop", "restart"):
            raise ValueError(f"unknown agent action {action!r} (start, stop, restart)")

    def shutdown(self) -> None:
        """Stop every agent and pod process (SIGTERM, then SIGKILL), all in parallel."""
        records = [r for n in self.spec.nodes if (r := self.state.read_pid(names.agent_record(n.name)))]
        records += [r for p in self.state.list("Pod") if (r := podlib.process(p))]
        processes.stop(records, grace=3.0)
        log.info("controller of lab %s stopped %d processes", self.state.prefix, len(records))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("state_dir", type=Path)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    state = State(args.state_dir.name, root=args.state_dir.parent)
    Controller(state).run()


if __name__ == "__main__":
    main()
