"""Agent start (issue 12): the maps are opened and written before the programs are compiled.

A restarted agent writes a change made while it was down into the pinned maps while its programs
still compile; the programs the previous run left attached serve it meanwhile. A new node's agent
fills its maps the same way, and /healthz says the programs are being compiled until they are loaded.
The compile is held back here (loader.load waits for the test), so what is checked is the order of
events, never how long anything takes.
"""

from __future__ import annotations

import json
import threading

import pytest
from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import Ether

from ebpfsvc.agent import Agent, AgentConfig
from ebpfsvc.config import NodeConfig
from ebpfsvc.datapath import loader
from ebpfsvc.datapath.testrun import prog_test_run
from ebpfsvc.datapath.bpfsys import PinnedMap

from .packets import from_pod, tcp
from .test_inspect_agent import LIMITS, NODE, NODE_IP, endpoint_slice, free_port, get, manifests, wait_for

pytestmark = pytest.mark.root

NEW_VIP = "198.19.0.41"
NEW_EP = "198.18.2.50"

NEW_SERVICE = f"""\
apiVersion: v1
kind: Service
metadata: {{name: api, namespace: default}}
spec:
  clusterIP: {NEW_VIP}
  ports: [{{name: http, port: 80}}]
---
{endpoint_slice("api", [f'- {{addresses: ["{NEW_EP}"], nodeName: node-2}}'])}"""


def config(pin_dir, mdir, unique_prefix) -> AgentConfig:
    return AgentConfig(node=NodeConfig(node_name=NODE, node_addresses=(NODE_IP,)), pin_dir=str(pin_dir),
                       manifests=str(mdir), pod_interfaces=(f"{unique_prefix}-none*",), limits=LIMITS,
                       healthz_bind_address="127.0.0.1:0", metrics_bind_address="", sync_period=5.0)


class HeldCompile:
    """`agent` started on a thread with loader.load replaced by one that waits until finish(): the
    programs 'compile' for as long as the test needs. Loads are uncached, so an earlier agent's
    programs stay open as they were. Returns once the agent is compiling and has synced once."""

    def __init__(self, monkeypatch, agent: Agent, who: str):
        self.entered = threading.Event()
        self._go = threading.Event()
        real = loader.load

        def held(*args, **kw):
            self.entered.set()
            assert self._go.wait(60), "the test never released the compile"
            return real(*args, **{**kw, "cache": False})

        monkeypatch.setattr(loader, "load", held)
        self.starting = start_in_background(agent)
        wait_for(self.entered.is_set, f"{who} compiling its programs")
        wait_for(agent.synced_once.is_set, f"{who}'s first sync")

    def finish(self):
        """Let the compile go on, and the start end without error."""
        self._go.set()
        self.starting.join(60)
        assert not self.starting.is_alive() and not self.starting.failed, self.starting.failed


@pytest.fixture
def agents():
    started = []
    yield started
    for a in started:
        a.stop()
        if a.datapath is not None:
            a.datapath.close()
    loader.drop_cache()


def start_in_background(agent: Agent) -> threading.Thread:
    failed = []

    def run():
        try:
            agent.start()
        except BaseException as e:      # reported by the test, not lost on a thread
            failed.append(e)

    t = threading.Thread(target=run, name="agent-start", daemon=True)
    t.failed = failed
    t.start()
    return t


def syn_to_new_service(prog_fd) -> bytes:
    return prog_test_run(prog_fd, bytes(from_pod(tcp("198.18.1.9", NEW_VIP, 41000, 80, "S")))).data


def test_a_restarted_agent_writes_the_maps_while_its_programs_compile(tmp_path, pin_dir, unique_prefix, agents,
                                                                      monkeypatch):
    mdir = tmp_path / "manifests"
    mdir.mkdir()
    (mdir / "web.yaml").write_text(manifests(free_port()))
    first = Agent(config(pin_dir, mdir, unique_prefix))
    agents.append(first)
    first.start()
    wait_for(first.synced_once.is_set, "the first agent's sync")
    attached = first.datapath.programs["from_pod"].fd      # stands for the programs left attached
    first.stop()
    assert Ether(syn_to_new_service(attached))[IP].dst == NEW_VIP          # not a Service yet: untouched

    (mdir / "api.yaml").write_text(NEW_SERVICE)                            # a change while no agent runs
    second = Agent(config(pin_dir, mdir, unique_prefix))
    agents.append(second)
    held = HeldCompile(monkeypatch, second, "the restarted agent")
    assert second.datapath is None, "synced before its programs were loaded (held until finish())"
    # The previous run's programs serve the change already.
    out = Ether(syn_to_new_service(attached))
    assert (out[IP].dst, out[TCP].dport) == (NEW_EP, 8080)
    healthz = f"http://127.0.0.1:{second.telemetry.healthz_server.port}/healthz"
    assert get(healthz)[0] == 200                  # a restart: the attached programs serve the maps

    held.finish()
    out = Ether(syn_to_new_service(second.datapath.programs["from_pod"].fd))
    assert (out[IP].dst, out[TCP].dport) == (NEW_EP, 8080)


def test_a_new_node_fills_its_maps_and_is_unhealthy_until_its_programs_load(tmp_path, pin_dir, unique_prefix,
                                                                           agents, monkeypatch):
    mdir = tmp_path / "manifests"
    mdir.mkdir()
    (mdir / "api.yaml").write_text(NEW_SERVICE)
    agent = Agent(config(pin_dir, mdir, unique_prefix))
    agents.append(agent)
    held = HeldCompile(monkeypatch, agent, "the agent")
    assert agent.datapath is None
    with PinnedMap.open(pin_dir / "lb4_frontends") as frontends:
        assert frontends.count() > 0                       # the api Service's ClusterIP, written already
    healthz = f"http://127.0.0.1:{agent.telemetry.healthz_server.port}/healthz"
    code, body = get(healthz)
    assert code == 503 and "being compiled" in json.loads(body)["reason"], body

    held.finish()
    assert wait_for(lambda: get(healthz)[0] == 200, "/healthz 200 once the programs are loaded")
    out = Ether(syn_to_new_service(agent.datapath.programs["from_pod"].fd))
    assert (out[IP].dst, out[TCP].dport) == (NEW_EP, 8080)
