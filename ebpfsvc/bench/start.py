"""Agent start (issue 12): how soon a restarted agent writes its first change, and how soon a new
node's agent has its programs attached, measured from the `exec` of `python -m ebpfsvc agent`.

    python -m ebpfsvc.bench.start [--repeats 5] [--tree NAME=DIR ...]

Each agent runs alone in a network namespace of its own (no interface but `lo`, one Service from a
manifest directory, the default map sizes), with a program cache directory of its own that its first
start fills. Then, per repeat:

- **restart**: a new Service's manifest is written while the agent is down, and the agent started
  again on its pins: the time from exec until the new frontend is in the pinned `lb4_frontends`
  (polled every 2 ms, by bpf(2), from outside), and until the agent logs its programs attached;
- **new node**: an agent on an empty pin directory, the cache warm (another node of the machine
  filled it): until it logs its programs attached.

With several --tree (a source tree each, put first on PYTHONPATH), the trees run interleaved within
every repeat, in a rotated order: a before/after comparison on a shared machine. Medians with
min-max, and the load average before and after. The targets: first change within 1 s of a
restart, a new node programmed within 5 s.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from ebpfsvc.datapath import bpfsys, loader, nsenter
from ebpfsvc.lab import network

SERVICE = """\
apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: default}}
spec:
  clusterIP: {vip}
  ports: [{{name: http, port: 80}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: {name}-1
  namespace: default
  labels: {{kubernetes.io/service-name: {name}}}
addressType: IPv4
ports: [{{name: http, port: 8080, protocol: TCP}}]
endpoints:
- {{addresses: ["198.18.2.{backend}"], nodeName: node-2}}
"""
ATTACHED = "datapath loaded in"          # the agent's log line once its programs are attached
TARGETS = {"restart_first_change_s": 1.0, "new_node_attached_s": 5.0}


class Agent:
    """`python -m ebpfsvc agent` of `tree` in `netns`, its log in `log`; ended by its pid."""

    def __init__(self, tree: Path, netns: str, pin_dir: Path, manifests: Path, cache: Path, log: Path):
        env = {**os.environ, "PYTHONPATH": str(tree), "EBPFSVC_PROGRAM_CACHE": str(cache)}
        argv = [sys.executable, "-m", "ebpfsvc", "agent", "--node-name", "node-1", "--node-address", "198.18.0.11",
                "--manifests", str(manifests), "--pin-dir", str(pin_dir), "--pod-interfaces", f"{netns}-none*",
                "--healthz-bind-address", "127.0.0.1:0", "--metrics-bind-address", "127.0.0.1:0"]
        self.log = log
        self.began = time.monotonic()
        # cwd: `python -m` puts it first on sys.path, before PYTHONPATH
        self.proc = subprocess.Popen(argv, env=env, cwd=tree, stdin=subprocess.DEVNULL, stdout=open(log, "wb"),
                                     stderr=subprocess.STDOUT, preexec_fn=nsenter.preexec(netns, new_session=True))

    def wait_attached(self, timeout: float = 300.0) -> float:
        """Seconds from exec until the agent logged its programs attached."""
        deadline = self.began + timeout
        while ATTACHED not in self.log.read_text(errors="replace"):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the agent did not attach its programs; its log: {self.log}")
            time.sleep(0.01)
        return time.monotonic() - self.began

    def stop(self) -> None:
        from ebpfsvc.bench.traffic import stop_process
        stop_process(self.proc)


def frontends(pin_dir: Path) -> int:
    try:
        with bpfsys.PinnedMap.open(pin_dir / "lb4_frontends") as m:
            return m.count()
    except OSError:
        return -1       # not pinned yet


class Node:
    """One tree's node: its namespace, pins, manifests and program cache, under `work`."""

    def __init__(self, name: str, tree: Path, prefix: str, work: Path):
        self.name, self.tree, self.work = name, tree, work / name
        self.netns = f"{prefix}-{name}"[:15]
        self.pins = Path("/sys/fs/bpf") / f"{prefix}-{name}"
        self.manifests = self.work / "manifests"
        self.cache = self.work / "programs"
        self.manifests.mkdir(parents=True)
        self.cache.mkdir(mode=0o700)
        (self.manifests / "web.yaml").write_text(SERVICE.format(name="web", vip="198.18.100.1", backend=1))
        network.create_namespace(self.netns)
        self.services = 1
        self.runs = 0

    def start(self, pin_dir: Path | None = None) -> Agent:
        self.runs += 1
        return Agent(self.tree, self.netns, pin_dir or self.pins, self.manifests, self.cache,
                     self.work / f"agent-{self.runs}.log")

    def restart(self) -> tuple[float, float]:
        """(exec -> the new Service in lb4_frontends, exec -> programs attached) of a restart."""
        before = frontends(self.pins)
        self.services += 1
        n = self.services
        (self.manifests / f"svc-{n}.yaml").write_text(SERVICE.format(name=f"svc-{n}", vip=f"198.18.100.{n}",
                                                                     backend=n))
        agent = self.start()
        try:
            while frontends(self.pins) <= before:
                if agent.proc.poll() is not None or time.monotonic() - agent.began > 120:
                    raise RuntimeError(f"no first change; the agent's log: {agent.log}")
                time.sleep(0.002)
            first = time.monotonic() - agent.began
            return first, agent.wait_attached()
        finally:
            agent.stop()

    def new_node(self) -> float:
        pins = self.pins.with_name(self.pins.name + f"-new{self.runs}")
        agent = self.start(pins)
        try:
            return agent.wait_attached()
        finally:
            agent.stop()
            loader.unpin(pins)

    def close(self) -> None:
        network.remove_namespace(self.netns)
        loader.unpin(self.pins)


def summary(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} s ({min(values):.2f}-{max(values):.2f}, {len(values)} runs)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ebpfsvc.bench.start", description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tree", action="append", default=[], metavar="NAME=DIR",
                        help="a source tree to measure (repeatable; default: this one)")
    args = parser.parse_args(argv)
    trees = [t.split("=", 1) for t in args.tree] or [["this", str(Path(__file__).resolve().parents[2])]]
    prefix = f"es{uuid.uuid4().hex[:6]}"
    results: dict[str, dict[str, list[float]]] = {name: {"restart_first_change_s": [], "restart_attached_s": [],
                                                         "new_node_attached_s": []} for name, _ in trees}
    load = [os.getloadavg()[0]]
    with tempfile.TemporaryDirectory(prefix=f"{prefix}-") as tmp:
        nodes = []
        try:
            for name, tree in trees:
                nodes.append(Node(name, Path(tree), prefix, Path(tmp)))
                first = nodes[-1].start()           # fills its cache and pins: a compile
                try:
                    print(f"{name}: first start (empty cache) attached in {first.wait_attached():.1f} s", flush=True)
                finally:
                    first.stop()
            for repeat in range(args.repeats):
                order = nodes[repeat % len(nodes):] + nodes[:repeat % len(nodes)]
                for node in order:
                    first_change, attached = node.restart()
                    new = node.new_node()
                    for key, value in (("restart_first_change_s", first_change), ("restart_attached_s", attached),
                                       ("new_node_attached_s", new)):
                        results[node.name][key].append(value)
                    print(f"  repeat {repeat + 1} {node.name}: restart first change {first_change:.2f} s, attached "
                          f"{attached:.2f} s; new node attached {new:.2f} s (load {os.getloadavg()[0]:.2f})", flush=True)
        finally:
            for node in nodes:
                node.close()
    load.append(os.getloadavg()[0])
    print(f"\nload average (1 min) {load[0]:.2f} before, {load[1]:.2f} after; medians (min-max):")
    for name, figures in results.items():
        print(f"{name}:")
        for key, values in figures.items():
            target = TARGETS.get(key)
            verdict = "" if target is None else \
                f"   target ≤ {target:g} s: {'met' if statistics.median(values) <= target else 'missed'}"
            print(f"  {key:24} {summary(values)}{verdict}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
