"""The real agent (manifest source, its own pin dir, no interfaces attached):
/healthz after its first sync, /metrics over HTTP equal to packets sent through
its datapath, a healthCheckNodePort answering by local endpoints, and
`ebpfsvc drift` against the manifests. Servers bind 127.0.0.1 on free ports.

And `ebpfsvc cleanup` in a test network namespace: our TC filters and pins go,
a foreign filter stays.
"""

from __future__ import annotations

import json
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from click.testing import CliRunner
from scapy.layers.inet import IP
from scapy.layers.l2 import Ether

from ebpfsvc.agent import Agent, AgentConfig
from ebpfsvc.cli import main
from ebpfsvc.config import NodeConfig
from ebpfsvc.datapath.testrun import prog_test_run

from .packets import from_pod, tcp

pytestmark = pytest.mark.root

NODE = "node-1"
NODE_IP = "198.18.0.2"
VIP = "198.19.0.40"
LOCAL_EP = "198.18.1.40"
REMOTE_EP = "198.18.2.40"
CLIENT = "198.18.1.9"
LIMITS = dict(frontends=1024, services=1024, backends=1024, maglev_slots=1 << 16, ct_entries=4096,
              affinity_entries=1024, frag_entries=256)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def manifests(hcnp: int, local_ready: bool = True, extra_endpoint: bool = False) -> str:
    eps = [f'- {{addresses: ["{LOCAL_EP}"], nodeName: {NODE}, conditions: {{ready: {str(local_ready).lower()}}}}}',
           f'- {{addresses: ["{REMOTE_EP}"], nodeName: node-2}}']
    if extra_endpoint:
        eps.append('- {addresses: ["198.18.2.41"], nodeName: node-2}')
    return f"""\
apiVersion: v1
kind: Service
metadata: {{name: web, namespace: default}}
spec:
  type: LoadBalancer
  clusterIP: {VIP}
  externalTrafficPolicy: Local
  healthCheckNodePort: {hcnp}
  ports: [{{name: http, port: 80, nodePort: 30080}}]
---
{endpoint_slice("web", eps)}"""


def endpoint_slice(service: str, endpoints: list[str]) -> str:
    """The EndpointSlice of `service`'s port http (8080/TCP) as a manifest; `endpoints` are its
    list items, one YAML line each."""
    return f"""\
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: {service}-abc
  namespace: default
  labels: {{kubernetes.io/service-name: {service}}}
addressType: IPv4
ports: [{{name: http, port: 8080, protocol: TCP}}]
endpoints:
{chr(10).join(endpoints)}
"""


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def wait_for(cond, what: str, timeout: float = 30.0):
    """Poll until cond() is true (a readiness wait, not a timing assertion)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"gave up waiting for {what}")


def metric(text: str, line_prefix: str) -> float:
    (line,) = [ln for ln in text.splitlines() if ln.startswith(line_prefix + " ")]
    return float(line.rsplit(" ", 1)[1])


@pytest.fixture
def agent(tmp_path, pin_dir, unique_prefix):
    from ebpfsvc.datapath import loader
    mdir = tmp_path / "manifests"
    mdir.mkdir()
    hcnp = free_port()
    (mdir / "web.yaml").write_text(manifests(hcnp))
    cfg = AgentConfig(
        node=NodeConfig(node_name=NODE, node_addresses=(NODE_IP,)), pin_dir=str(pin_dir), manifests=str(mdir),
        pod_interfaces=(f"{unique_prefix}-none*",),       # attach to nothing
        limits=LIMITS, healthz_bind_address="127.0.0.1:0", metrics_bind_address="127.0.0.1:0",
        sync_period=5.0)
    a = Agent(cfg)
    a.manifest_dir, a.hcnp = mdir, hcnp
    try:
        a.start()
        yield a
    finally:
        a.stop()
        if a.datapath is not None:
            a.datapath.close()
        loader.drop_cache()


def test_agent_health_metrics_health_check_port_and_drift(agent, pin_dir):
    healthz = f"http://127.0.0.1:{agent.telemetry.healthz_server.port}"
    metrics = f"http://127.0.0.1:{agent.telemetry.metrics_server.port}/metrics"
    wait_for(agent.synced_once.is_set, "the first sync")
    code, body = get(healthz + "/healthz")
    assert code == 200 and json.loads(body)["state"] == "synced"
    assert get(healthz + "/livez")[0] == 200

    # The healthCheckNodePort answers with the one local, ready endpoint.
    code, body = wait_for(lambda: (r := get(f"http://127.0.0.1:{agent.hcnp}/"))[0] == 200 and r, "hcnp server")
    assert json.loads(body)["localEndpoints"] == 1

    # Packets through the agent's own datapath show up in its /metrics.
    sent = 0
    prog = agent.datapath.programs["from_pod"].fd
    for sport in range(40000, 40005):
        p = bytes(from_pod(tcp(CLIENT, VIP, sport, 80, "S")))
        res = prog_test_run(prog, p)
        assert Ether(res.data)[IP].dst in (LOCAL_EP, REMOTE_EP)
        sent += len(p)
    text = get(metrics)[1]
    assert metric(text, 'ebpfsvc_service_packets_total{service_port="default/web:http/TCP"}') == 5
    assert metric(text, 'ebpfsvc_service_bytes_total{service_port="default/web:http/TCP"}') == sent
    assert metric(text, "ebpfsvc_drift_frontends") == 0
    assert metric(text, "kubeproxy_sync_proxy_rules_duration_seconds_count") >= 1
    assert metric(text, "kubeproxy_network_programming_duration_seconds_count") >= 1

    # `ebpfsvc drift` with the agent's own inputs: none.
    args = ["drift", "--pin-dir", str(pin_dir), "--manifests", str(agent.manifest_dir), "--node-name", NODE,
            "--node-address", NODE_IP]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0 and "no drift" in res.output, res.output

    # The local endpoint stops being ready: the agent reprograms, the health check port says 503.
    (agent.manifest_dir / "web.yaml").write_text(manifests(agent.hcnp, local_ready=False))
    code, body = wait_for(lambda: (r := get(f"http://127.0.0.1:{agent.hcnp}/"))[0] == 503 and r, "hcnp 503")
    assert json.loads(body)["localEndpoints"] == 0

    # With the agent stopped, a new endpoint in the manifests is drift: exit 1, the backend named.
    agent.stop()
    assert wait_for(lambda: get_refused(healthz + "/healthz"), "healthz closed")
    (agent.manifest_dir / "web.yaml").write_text(manifests(agent.hcnp, local_ready=False, extra_endpoint=True))
    res = CliRunner().invoke(main, args + ["-o", "json"])
    assert res.exit_code == 1, res.output
    out = json.loads(res.output)
    assert out["drift"] is True
    assert any("198.18.2.41:8080/TCP" in d["problem"] and d["frontend"] == f"{VIP}:80/TCP (internal)"
               for d in out["differences"])


def get_refused(url: str) -> bool:
    try:
        urllib.request.urlopen(url, timeout=2)
    except urllib.error.URLError as e:
        return not isinstance(e, urllib.error.HTTPError)
    return False


# ---- cleanup --------------------------------------------------------------------------------------

@pytest.fixture
def netns(unique_prefix):
    from pyroute2 import netns as nsmod
    name = f"{unique_prefix}-cl"
    nsmod.create(name)
    try:
        yield name
    finally:
        nsmod.remove(name)


def test_cleanup_removes_our_filters_and_pins_only(datapath, pin_dir, netns, unique_prefix):
    from pyroute2 import IPRoute

    from ebpfsvc.datapath import tc

    with IPRoute(netns=netns) as ipr:
        ipr.link("add", ifname="lxcA", kind="veth", peer={"ifname": "lxcB"})
        ipr.link("add", ifname="other0", kind="veth", peer={"ifname": "other1"})   # no dummy module here
        idx = {n: ipr.link_lookup(ifname=n)[0] for n in ("lxcA", "lxcB", "other0")}
    progs = datapath.programs
    for name in ("lxcA", "lxcB"):
        tc.attach(idx[name], progs["from_pod"].fd, "from_pod", tc.INGRESS, netns=netns)
        tc.attach(idx[name], progs["to_pod"].fd, "to_pod", tc.EGRESS, netns=netns)
    # Someone else's filter on another interface, at another priority.
    tc.ensure_clsact(idx["other0"], netns=netns)
    with IPRoute(netns=netns) as ipr:
        ipr.tc("add-filter", "bpf", idx["other0"], 0x10, fd=progs["to_pod"].fd, name="foreign",
               parent=0xFFFFFFF2, prio=0x10, protocol=0x0003, direct_action=True)

    dry = CliRunner().invoke(main, ["cleanup", "--pin-dir", str(pin_dir), "--netns", netns, "--dry-run"])
    assert dry.exit_code == 0 and dry.output.count("would remove tc program") == 4, dry.output
    assert len(tc.list_filters(idx["lxcA"], netns=netns)) == 2 and Path(pin_dir, "ct4").exists()

    res = CliRunner().invoke(main, ["cleanup", "--pin-dir", str(pin_dir), "--netns", netns])
    assert res.exit_code == 0, res.output
    assert res.output.count("removed tc program") == 4 and "removed pin" in res.output
    assert tc.list_filters(idx["lxcA"], netns=netns) == [] and tc.list_filters(idx["lxcB"], netns=netns) == []
    foreign = tc.list_filters(idx["other0"], netns=netns)
    assert [(f.prio, f.name) for f in foreign] == [(0x10, "foreign")]
    assert not Path(pin_dir).exists()
    again = CliRunner().invoke(main, ["cleanup", "--pin-dir", str(pin_dir), "--netns", netns])
    assert again.exit_code == 0 and "nothing to remove" in again.output
