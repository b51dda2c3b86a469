"""The demo a newcomer runs first: `make demo` (= `ebpfsvc demo`).

It brings up the default two-node lab (a real kube-apiserver, etcd and
kube-controller-manager; one ebpfsvc agent per node, configured by deploy/),
applies the Services of the seed documents (examples/) and the pods behind them
(examples/lab/pods.yaml) through the API server, sends real traffic from a pod and from the external
client, and prints what happened as tables: which backend answered, how new
connections spread, that ClientIP affinity sticks, what the backends saw as
the client address.  Then it tears the lab down, also on Ctrl-C or failure.
"""

from __future__ import annotations

import collections
import json
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from ebpfsvc.lab import Lab
from ebpfsvc.lab.lab import load_documents

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
CLIENT = ["python", "-m", "ebpfsvc.demo.client"]


class Demo:
    def __init__(self, console: Console, prefix: str = "demo"):
        self.console = console
        self.prefix = prefix
        self.lab: Lab | None = None

    # -- plumbing ------------------------------------------------------------------
    def requests(self, where: str, url: str, count: int) -> dict:
        """`count` HTTP requests, one new connection each, from pod `where` (or the external client)."""
        argv = CLIENT + ["http", url, "--count", str(count), "--deadline", "60"]
        if where == "client":
            r = self.lab.external_exec("client", argv, timeout=90)
        else:
            r = self.lab.exec(where, argv, timeout=90)
        if r.returncode != 0:
            raise RuntimeError(f"client in {where} failed: {r.stderr.strip()}")
        return json.loads(r.stdout)

    def wait_reachable(self, url: str, timeout: float = 90.0) -> float:
        """Poll until the Service answers from the toolbox pod: agents compiled, synced, pods ready."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if self.requests("toolbox", url, 1)["answers"]:
                return time.monotonic() - t0
            time.sleep(0.5)
        raise RuntimeError(f"{url} not reachable after {timeout:.0f}s; see the agent logs in {self.lab.state.path}")

    def pod_node(self, pod: str) -> str:
        return self.lab.pod(pod)["spec"]["nodeName"]

    # -- the story -----------------------------------------------------------------
    def run(self) -> None:
        c = self.console
        c.rule("[bold]ebpfsvc demo: Kubernetes Services in eBPF, on a two-node lab")
        t0 = time.monotonic()
        with c.status("Building the lab: fabric, node-1 and node-2 (zones a and b), external client, and a real "
                      "control plane (etcd, kube-apiserver, kube-controller-manager); starting one ebpfsvc agent "
                      "per node with deploy/'s configuration (each compiles its datapath with bcc)..."):
            self.lab = Lab.up(None, prefix=self.prefix, agents=True)
        try:
            version = self.lab.api.request("GET", "/version").get("gitVersion", "?")
            c.print(f"[green]✓[/] lab up in {time.monotonic() - t0:.1f}s: kube-apiserver {version} at "
                    f"{self.lab.spec.control_plane.address}, nodes 198.18.0.11 / 198.18.0.12, "
                    "pod CIDRs 198.18.1.0/24 / 198.18.2.0/24, Services in 198.19.0.0/16")
            c.print(f"  kubectl works against it meanwhile: export KUBECONFIG={self.lab.kubeconfig}")
            self.apply_examples()
            self.clusterip()
            self.spread()
            self.affinity()
            self.redis()
            self.not_programmed()
            self.nodeport()
            c.rule(f"[bold]done in {time.monotonic() - t0:.0f}s")
        finally:
            with c.status("Tearing the lab down (namespaces, agents, pinned maps)..."):
                self.lab.down()
            c.print("[green]✓[/] lab removed")

    def apply_examples(self) -> None:
        c = self.console
        with c.status("Applying the seed documents' Services (examples/*.yaml) and their pods..."):
            docs = []
            for f in sorted(EXAMPLES.glob("*.yaml")):
                docs += load_documents(f)
            self.lab.apply(docs)
            self.lab.apply(load_documents(EXAMPLES / "lab" / "pods.yaml"))
            pods = [p["metadata"]["name"] for p in self.lab.pods()]
            self.lab.wait_ready(pods, timeout=60)
            waited = self.wait_reachable("http://198.19.0.20:3000/")
        services = [d for d in docs if d.get("kind") == "Service"]
        c.print(f"[green]✓[/] {len(services)} Services from the seed documents and {len(pods)} pods applied; "
                f"first Service answered {waited:.1f}s after the pods were ready")

    def clusterip(self) -> None:
        url = "http://198.19.0.20:3000/"
        out = self.requests("toolbox", url, 9)
        t = Table(title="ClusterIP service-python 198.19.0.20:3000 → targetPort 443 (pods on both nodes); "
                        "client: pod toolbox 198.18.1.x on node-1", title_justify="left")
        for col in ("request", "answered by", "backend node", "backend pod IP:port", "client address the backend saw"):
            t.add_column(col)
        for i, a in enumerate(out["answers"], 1):
            t.add_row(str(i), a["pod"], self.pod_node(a["pod"]), f'{a["podIP"]}:{a["localPort"]}', a["client"])
        self.console.print(t)
        self.console.print("  Each request is a new TCP connection: Maglev hashes its 5-tuple to a backend, "
                           "conntrack keeps the flow there, replies are reverse-NATed to come from the ClusterIP. "
                           "Pod-to-Service traffic keeps the client's own address (no SNAT).\n")

    def spread(self) -> None:
        n = 300
        out = self.requests("toolbox", "http://198.19.0.60/", n)
        counts = collections.Counter(a["pod"] for a in out["answers"])
        t = Table(title=f"Spread: {n} new connections to myapp-svc 198.19.0.60:80 (3 backends)", title_justify="left")
        t.add_column("backend")
        t.add_column("node")
        t.add_column("connections", justify="right")
        t.add_column("share", justify="right")
        t.add_column("")
        for pod, k in sorted(counts.items()):
            t.add_row(pod, self.pod_node(pod), str(k), f"{100 * k / n:.0f}%", "█" * round(40 * k / n))
        if out["errors"]:
            t.add_row("errors", "", str(len(out["errors"])), "", "")
        self.console.print(t)
        self.console.print("")

    def affinity(self) -> None:
        n = 30
        plain = collections.Counter(a["pod"] for a in self.requests("toolbox", "http://198.19.0.60/", n)["answers"])
        sticky = collections.Counter(a["pod"] for a in self.requests("toolbox", "http://198.19.0.61/", n)["answers"])
        t = Table(title=f"sessionAffinity: {n} connections from the same client pod", title_justify="left")
        t.add_column("Service")
        t.add_column("sessionAffinity")
        t.add_column("backends that answered")
        t.add_row("myapp-svc 198.19.0.60", "None", ", ".join(f"{p} ×{k}" for p, k in sorted(plain.items())))
        t.add_row("myapp-sticky 198.19.0.61", "ClientIP (timeoutSeconds 10800)",
                  ", ".join(f"{p} ×{k}" for p, k in sorted(sticky.items())))
        self.console.print(t)
        self.console.print("  Same pods, same client: with ClientIP affinity every new connection goes to the "
                           "backend the client got first, until the timeout passes unused.\n")

    def redis(self) -> None:
        t = Table(title="The seed's redis walk-through: redis-cli in pod toolbox, through Services", title_justify="left")
        t.add_column("command")
        t.add_column("Service")
        t.add_column("answer")
        steps = [
            (["redis-cli", "-h", "198.19.0.52", "-p", "6379", "set", "nmsl", "123241"],
             "mwish-bot-sticky (selector, ClientIP affinity)"),
            (["redis-cli", "-h", "198.19.0.52", "-p", "6379", "get", "nmsl"], "mwish-bot-sticky"),
            (["redis-cli", "-h", "198.19.0.51", "-p", "6379", "ping"],
             "mwish-bot-svc-redis (no selector, manual Endpoints 198.18.1.11 / 198.18.2.22)"),
            (["redis-cli", "-h", "198.19.0.50", "-p", "9527", "ping"], "mwish-bot-svc (port 9527 → 6379)"),
        ]
        for argv, svc in steps:
            r = self.lab.exec("toolbox", argv, timeout=10)
            t.add_row(" ".join(argv[1:]), svc, (r.stdout.strip() or r.stderr.strip())[:60])
        self.console.print(t)
        self.console.print("")

    def not_programmed(self) -> None:
        t = Table(title="Services the data plane leaves alone", title_justify="left")
        t.add_column("Service")
        t.add_column("why")
        t.add_row("mysql-space/mysql-balance-svc", "headless (clusterIP: None): DNS returns pod IPs, no virtual IP")
        t.add_row("service-python-externalname", "ExternalName: a DNS CNAME, nothing to balance")
        self.console.print(t)
        self.console.print("")

    def nodeport(self) -> None:
        t = Table(title="From outside the cluster: external client 198.18.0.100", title_justify="left")
        for col in ("target", "Service", "answered by", "client address the backend saw", "note"):
            t.add_column(col)
        cases = [
            ("198.18.0.11:30080", "service-python-nodeport (NodePort, externalTrafficPolicy Cluster)",
             "node-1's NodePort"),
            ("198.18.0.12:30080", "service-python-nodeport", "node-2's NodePort"),
            ("198.18.200.10:3000", "service-python-lb (LoadBalancer, externalTrafficPolicy Local)",
             "LB address routed via node-1"),
            ("198.18.200.32:80", "my-service-external-ips (externalIPs)",
             "no Pod is labelled MyApp: refused (RST), as kube-proxy rejects"),
        ]
        for target, svc, note in cases:
            out = self.requests("client", f"http://{target}/", 1)
            if out["answers"]:
                a = out["answers"][0]
                t.add_row(target, svc, f'{a["pod"]} ({self.pod_node(a["pod"])})', a["client"], note)
            else:
                t.add_row(target, svc, "[red]no answer[/]", "", note or (out["errors"] or [""])[0][:50])
        self.console.print(t)
        self.console.print("")


def main(prefix: str = "demo") -> None:
    # Wide enough for the tables when the output is a pipe or a CI log, not a terminal.
    console = Console() if Console().is_terminal else Console(width=120)
    Demo(console, prefix).run()
