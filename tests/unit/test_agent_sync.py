"""Agent.sync(): snapshot -> DesiredStateBuilder -> writer, with the builder's delta; a full
apply first and then every FULL_APPLY_PERIOD (an hour, kube-proxy's FullSyncPeriod), never at
the periodic resync of every sync_period; nothing at all when nothing changed."""

from __future__ import annotations

from dataclasses import dataclass, field

from ebpfsvc import agent as agent_mod
from ebpfsvc.agent import Agent, AgentConfig
from ebpfsvc.config import NodeConfig
from ebpfsvc.datapath.writer import ApplyStats
from ebpfsvc.desired import desired_state
from ebpfsvc.sources.base import Event, EventType

NODE = NodeConfig("node-1", node_addresses=("198.18.0.11",))


def service(name, ip, port=80):
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": "default"},
            "spec": {"clusterIP": ip, "ports": [{"port": port}]}}


def endpoints(name, *ips):
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": f"{name}-1", "namespace": "default",
                         "labels": {"kubernetes.io/service-name": name}},
            "addressType": "IPv4", "ports": [{"port": 8080}],
            "endpoints": [{"addresses": [ip], "conditions": {"ready": True}} for ip in ips]}


@dataclass
class FakeWriter:
    calls: list = field(default_factory=list)
    prepared: list = field(default_factory=list)

    def prepare(self, state):
        self.prepared.append(state)

    def apply(self, state, *, full=False, delta=None, isolate=False):
        self.calls.append((state, full, delta))
        return ApplyStats(frontends_written=1)


def test_sync_passes_the_delta_and_goes_full_first_and_every_hour(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(agent_mod.time, "monotonic", lambda: now[0])
    agent = Agent(AgentConfig(node=NODE, healthz_bind_address="", metrics_bind_address="", sync_period=30.0))
    agent.writer = writer = FakeWriter()
    agent.sync()
    assert writer.calls == []                                  # nothing before both kinds have synced
    for obj in (service("a", "198.19.0.1"), endpoints("a", "198.18.2.1"), service("b", "198.19.0.2")):
        agent.state.on_event(Event(obj["kind"], EventType.ADDED, obj))
    for kind in ("Service", "EndpointSlice", "ServiceCIDR"):     # ServiceCIDR: the cluster's IP families
        agent.state.on_synced(kind)

    agent.sync()
    (first, full, _), = writer.calls
    assert full and first == desired_state(agent.state.snapshot(), NODE)
    assert writer.prepared == [first]       # the tables begun before admission (MapWriter.prepare)

    agent.sync()                                               # nothing changed: no apply at all
    assert len(writer.calls) == 1

    now[0] += 1
    agent.state.on_event(Event("EndpointSlice", EventType.MODIFIED, endpoints("a", "198.18.2.1", "198.18.2.2")))
    agent.sync()
    second, full, delta = writer.calls[-1]
    assert not full and delta.base is first and len(delta.keys) == 1
    assert second == desired_state(agent.state.snapshot(), NODE)

    # The periodic resync (every sync_period) writes nothing when nothing changed: a full apply at
    # 10,000 Services costs seconds of CPU that the node's pods would lose every 30 s.
    for _ in range(int(agent_mod.FULL_APPLY_PERIOD // 30) - 1):
        now[0] += 30
        agent.sync()
    assert len(writer.calls) == 2
    now[0] += 30                                               # an hour after the first: full again, even unchanged
    agent.sync()
    assert writer.calls[-1][0] is second and writer.calls[-1][1] is True


def test_socket_reset_pass_only_after_a_backend_left_or_changed(monkeypatch):
    """The socket path's reset pass (a socket dump per pod namespace) runs after a sync that deleted
    a backend or rewrote one (a UDP backend turning not ready), never after one that only added
    backends: a new backend cannot be one a socket must leave."""
    now = [1000.0]
    monkeypatch.setattr(agent_mod.time, "monotonic", lambda: now[0])
    agent = Agent(AgentConfig(node=NODE, healthz_bind_address="", metrics_bind_address="", sync_period=3600.0))
    answers = [ApplyStats(backends_written=1, frontends_written=1),                        # the first, full sync
               ApplyStats(backends_written=1, tables_written=1),                           # a backend added
               ApplyStats(backends_written=1, backends_changed=1),                         # one turned not ready
               ApplyStats(backends_deleted=1, tables_written=1)]                           # one removed
    agent.writer = type("W", (), {"prepare": lambda self, state: None,
                                  "apply": lambda self, state, **_: answers.pop(0)})()
    agent.socket_datapath = object()
    resets = []
    agent._reset_socket_flows = lambda: resets.append(len(answers))
    for obj in (service("a", "198.19.0.1"), endpoints("a", "198.18.2.1")):
        agent.state.on_event(Event(obj["kind"], EventType.ADDED, obj))
    for kind in ("Service", "EndpointSlice", "ServiceCIDR"):
        agent.state.on_synced(kind)
    agent.sync()
    for ips in (("198.18.2.1", "198.18.2.2"), ("198.18.2.1", "198.18.2.2", "198.18.2.3"), ("198.18.2.1",)):
        now[0] += 1
        agent.state.on_event(Event("EndpointSlice", EventType.MODIFIED, endpoints("a", *ips)))
        agent.sync()
    assert answers == [] and resets == [1, 0], "after the changed and the removed backend only"
