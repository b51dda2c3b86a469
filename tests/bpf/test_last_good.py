"""The last good state survives an agent restart (issue 11 #2).

A running agent keeps the last good version of a Service whose update is invalid (tracker.py).
A restarted one has nothing in memory; the pinned maps still hold that version, and it must stay
in force (admission.py, datapath/pinned.py) until the Service is valid again or gone, with `drift`
and `service list` saying so.  Two real agents, one after the other, on one pin directory; packets
through the datapath (BPF_PROG_TEST_RUN), exact bytes.
"""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from ebpfsvc.agent import Agent, AgentConfig
from ebpfsvc.cli import main
from ebpfsvc.config import NodeConfig
from ebpfsvc.datapath.testrun import prog_test_run
from ebpfsvc.lbmodel import ServicePortName

from .packets import from_pod, tcp
from .test_inspect_agent import LIMITS, wait_for

pytestmark = pytest.mark.root

NODE, NODE_IP = "node-1", "198.18.0.2"
WEB_VIP, API_VIP = "198.19.0.50", "198.19.0.51"
WEB_EP, API_EP = "198.18.1.50", "198.18.1.51"
CLIENT = "198.18.1.9"


def service(name: str, vip: str, port: int = 80, ep: str | None = None) -> str:
    """A Service's manifest with its EndpointSlice: one endpoint, `ep` (web's and api's by default)."""
    ep = ep or (WEB_EP if name == "web" else API_EP)
    return f"""\
apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: default}}
spec:
  clusterIP: {vip}
  ports: [{{port: {port}, targetPort: 8080}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: {name}-1, namespace: default, labels: {{kubernetes.io/service-name: {name}}}}}
addressType: IPv4
ports: [{{port: 8080}}]
endpoints: [{{addresses: ["{ep}"]}}]
"""


def start_agent(pin_dir, mdir, unique_prefix) -> Agent:
    cfg = AgentConfig(node=NodeConfig(node_name=NODE, node_addresses=(NODE_IP,)), pin_dir=str(pin_dir),
                      manifests=str(mdir), pod_interfaces=(f"{unique_prefix}-none*",), limits=LIMITS,
                      healthz_bind_address="", metrics_bind_address="", sync_period=5.0)
    agent = Agent(cfg)
    agent.start()
    wait_for(agent.synced_once.is_set, "the first sync")
    return agent


def syn_goes_to(agent: Agent, vip: str, ep: str, sport: int) -> bool:
    res = prog_test_run(agent.datapath.programs["from_pod"].fd, bytes(from_pod(tcp(CLIENT, vip, sport, 80, "S"))))
    return res.verdict == "TC_ACT_OK" and res.data == bytes(from_pod(tcp(CLIENT, ep, sport, 8080, "S")))


def test_invalid_service_at_restart_keeps_what_the_maps_hold_until_it_is_gone(tmp_path, pin_dir, unique_prefix):
    from ebpfsvc.datapath import loader

    mdir = tmp_path / "manifests"
    mdir.mkdir()
    (mdir / "web.yaml").write_text(service("web", WEB_VIP))
    (mdir / "api.yaml").write_text(service("api", API_VIP))
    agent = start_agent(pin_dir, mdir, unique_prefix)
    try:
        assert syn_goes_to(agent, WEB_VIP, WEB_EP, 40000)
    finally:
        agent.stop()

    # While the agent is down, web's update turns invalid (a port out of range).
    (mdir / "web.yaml").write_text(service("web", WEB_VIP, port=70000))
    agent = start_agent(pin_dir, mdir, unique_prefix)
    try:
        assert syn_goes_to(agent, WEB_VIP, WEB_EP, 40001), "the restart withdrew the last good version"
        assert syn_goes_to(agent, API_VIP, API_EP, 40002)
        assert agent.admission.reported[("default", "web")][0] == "kept"

        # `drift` says why web's frontend is there; `service list` serves it, and says so too.
        res = CliRunner().invoke(main, ["drift", "--pin-dir", str(pin_dir), "--manifests", str(mdir),
                                        "--node-name", NODE, "--node-address", NODE_IP, "-o", "json"])
        assert res.exit_code == 1, res.output
        (diff,) = json.loads(res.output)["differences"]
        assert diff["frontend"] == f"{WEB_VIP}:80/TCP (internal)"
        assert diff["problem"] == ("kept in the maps: the Service's current version is invalid (spec.ports[0].port: "
                                   "70000 is out of range 1-65535); the agent keeps its last good version")
        res = CliRunner().invoke(main, ["service", "list", "--pin-dir", str(pin_dir), "-o", "json"])
        rows = {r["service"]: r for r in json.loads(res.output)}
        assert rows["default/web/TCP"]["frontends"] and rows["default/web"]["not_programmed"].startswith("kept: ")

        # Fixed: served as the new version says; then gone from the API: withdrawn.
        (mdir / "web.yaml").write_text(service("web", WEB_VIP, port=81))
        sports = iter(range(41000, 60000))          # a new flow each time: a tracked one keeps its backend
        wait_for(lambda: not syn_goes_to(agent, WEB_VIP, WEB_EP, next(sports)), "web's old port to go")
        assert ("default", "web") not in agent.admission.reported
        (mdir / "web.yaml").unlink()
        wait_for(lambda: agent.writer.service_id(ServicePortName("default", "web")) is None, "web withdrawn")
        assert syn_goes_to(agent, API_VIP, API_EP, 40004)
    finally:
        agent.stop()
        if agent.datapath is not None:
            agent.datapath.close()
        loader.drop_cache()
