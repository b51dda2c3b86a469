"""The agent configures itself from its Node object (issue 10: no per-node flag): the datapath pieces
that need the node address (hairpin and SNAT source, uplinks, node-client routes) are configured
when the Node arrives, after start, and again when it changes. The addresses are a map the programs
read (lb_node_addrs), so a change writes it and never compiles or reloads the programs.  The kernel side is faked here: what
is checked is what the agent asks of it (the bpf and e2e tiers run the real thing)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network, IPv6Network, ip_address
from types import SimpleNamespace

import pytest

from ebpfsvc.agent import Agent, AgentConfig
from ebpfsvc.config import NodeConfig
from ebpfsvc.datapath import hostpath, loader, nodeaddrs, uplink
from ebpfsvc.datapath.nodeaddrs import NodeAddrs
from ebpfsvc.datapath.writer import ApplyStats
from ebpfsvc.nodeinfo import Interface
from ebpfsvc.sources.base import Event, EventType

INTERFACES = (Interface("lo", (IPv4Address("127.0.0.1"),)), Interface("eth0", (IPv4Address("198.18.9.5"),)),
              Interface("eth1", (IPv4Address("198.18.0.11"), IPv4Address("198.18.0.21"))),
              Interface("lxc1"))


def node_obj(*internal, zone="zone-a", bad=False):
    addresses = [{"type": "InternalIP", "address": a} for a in internal]
    if bad:
        addresses.append({"type": "ExternalIP", "address": "198.18.0.300"})
    return {"apiVersion": "v1", "kind": "Node",
            "metadata": {"name": "node-1", "labels": {"topology.kubernetes.io/zone": zone}},
            "status": {"addresses": addresses}}


def service(name, ip, node_port=None):
    port = {"port": 80, **({"nodePort": node_port} if node_port else {})}
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": "default"},
            "spec": {"clusterIP": ip, "type": "NodePort" if node_port else "ClusterIP", "ports": [port]}}


def service_cidr(*cidrs):
    return {"apiVersion": "networking.k8s.io/v1", "kind": "ServiceCIDR", "metadata": {"name": "kubernetes"},
            "spec": {"cidrs": list(cidrs)}}


@dataclass
class Kernel:
    """Records what the agent asks of loader, uplink and hostpath."""

    loads: list = field(default_factory=list)           # "pod" | "uplink": programs loaded
    node_addrs: list = field(default_factory=list)      # every NodeAddrs written to lb_node_addrs
    attached: dict = field(default_factory=dict)        # uplink name -> loads index of its programs
    detached: list = field(default_factory=list)
    host_setups: list = field(default_factory=list)
    routes: set = field(default_factory=set)
    route_sources: set = field(default_factory=set)
    links: dict = field(default_factory=lambda: {"eth0": 2, "eth1": 3})
    published: list = field(default_factory=list)        # loader.publish_options(**options) calls

    def install(self, monkeypatch):
        def pod_load(pin_dir, *, limits=None, **_):
            self.loads.append("pod")
            return SimpleNamespace(programs={}, maps={}, n=len(self.loads) - 1)

        def uplink_load(pin_dir, **_):
            self.loads.append("uplink")
            return SimpleNamespace(programs={}, maps={}, n=len(self.loads) - 1)

        def sync_routes(installed, wanted, node_addresses, netns=None, rewrite=False):
            sources = {a.version: a for a in node_addresses if a is not None}
            self.routes = {dst for dst in wanted if dst.version in sources}     # as hostpath.sync_routes
            self.route_sources.update(sources[dst.version] for dst in self.routes)
            return set(self.routes)

        monkeypatch.setattr(loader, "load", pod_load)
        # With what was attached when it was written: the options must hold from the first packet.
        monkeypatch.setattr(loader, "publish_options", lambda maps, **options: self.published.append(
            {**options, "attached then": dict(self.attached)}))
        monkeypatch.setattr(uplink, "load", uplink_load)
        monkeypatch.setattr(nodeaddrs, "write", lambda maps, addrs: self.node_addrs.append(addrs))
        monkeypatch.setattr(uplink, "ifindex_of", lambda name, netns=None: self.links.get(name))
        monkeypatch.setattr(uplink, "attach", lambda dp, ifindex, mode="tc", netns=None: self.attached.update(
            {next(n for n, i in self.links.items() if i == ifindex): dp.n}))
        monkeypatch.setattr(uplink, "detach", lambda ifindex, netns=None: self.detached.append(ifindex))
        monkeypatch.setattr(hostpath, "setup", lambda dp, addr, netns=None: self.host_setups.append(addr) or 9)
        monkeypatch.setattr(hostpath, "routes", lambda netns=None: set())
        monkeypatch.setattr(hostpath, "sync_routes", sync_routes)
        return self


class FakeWriter:
    def prepare(self, state):
        pass

    def apply(self, state, *, full=False, delta=None, isolate=False):
        return ApplyStats()


@pytest.fixture
def kernel(monkeypatch):
    return Kernel().install(monkeypatch)


def make_agent(**config):
    cfg = AgentConfig(node=config.pop("node", NodeConfig("node-1")), uplinks=config.pop("uplinks", None),
                      pod_interfaces=("lxc*",), healthz_bind_address="", metrics_bind_address="", **config)
    agent = Agent(cfg)
    agent.read_interfaces = lambda: INTERFACES
    agent.writer = FakeWriter()
    agent._refresh_node(force=True)          # what start() does before anything is listed
    return agent


def send(agent, obj, kind=None, type_=EventType.ADDED):
    agent.state.on_event(Event(kind or obj["kind"], type_, obj))


def list_all(agent, *kinds):
    for kind in kinds:
        agent.state.on_synced(kind)


def test_the_node_arriving_after_start_configures_hairpin_snat_uplinks_and_nodeports(kernel):
    agent = make_agent()
    # API mode, before the Node list: ClusterIPs from pods work, nothing node-specific is guessed.
    assert kernel.loads == ["pod"] and kernel.attached == {}
    assert kernel.node_addrs == [NodeAddrs()]
    assert agent.desired.node.node_addresses == ()

    send(agent, node_obj("198.18.0.11"))
    list_all(agent, "Node")
    agent.sync()
    node = IPv4Address("198.18.0.11")
    assert kernel.loads == ["pod", "uplink"]                             # the pod programs stay
    assert kernel.node_addrs[1:] == [NodeAddrs(hairpin4=node, snat4=node)]
    assert kernel.attached == {"eth1": 1} and kernel.host_setups == [node]
    assert agent.desired.node.node_addresses == (node,)                 # NodePorts: every node address

    agent.sync()                                                         # nothing changed: nothing redone
    assert len(kernel.loads) == 2 and len(kernel.node_addrs) == 2

    # The Node's address moves to the other address of eth1 (and a second one joins on eth0): a map
    # write, no program loaded again.
    send(agent, node_obj("198.18.0.21", "198.18.9.5"), type_=EventType.MODIFIED)
    agent.sync()
    new = IPv4Address("198.18.0.21")
    assert kernel.loads == ["pod", "uplink"]
    assert kernel.node_addrs[2:] == [NodeAddrs(hairpin4=new, snat4=new)]
    assert kernel.attached == {"eth1": 1, "eth0": 1} and kernel.host_setups[-1] == new
    assert agent.desired.node.node_addresses == (new, IPv4Address("198.18.9.5"))

    send(agent, node_obj("198.18.0.21"), type_=EventType.MODIFIED)       # eth0 is no node address any more
    agent.sync()
    assert kernel.detached == [2] and agent._uplinks_attached == {"eth1": 3}


def test_the_agent_writes_its_datapath_options_before_anything_attaches(kernel):
    """The datapath options are a word the programs read (lb_agent_config, loader.publish_options), not
    compiled in: written once after the programs load and before any uplink attaches. With
    --masquerade-external-to-local-backends and no node clients, a local pod's reply to a masqueraded
    flow is addressed to the node (bpf/lib/flow.h): the pod programs read that address from lb_node_addrs,
    written whatever the options, so neither option changes what is loaded."""
    agent = make_agent(host_clients=False, masquerade_external_to_local_backends=True,
                       reset_removed_endpoint_tcp=False, cluster_cidr=IPv4Network("198.18.64.0/18"),
                       snat_keep_client_port=False)
    send(agent, node_obj("198.18.0.11"))
    list_all(agent, "Node")
    agent.sync()
    node = IPv4Address("198.18.0.11")
    assert kernel.loads[-2:] == ["pod", "uplink"] and kernel.attached
    assert kernel.node_addrs[-1] == NodeAddrs(hairpin4=node, snat4=node)
    assert kernel.published == [{"snat_keep_client_port": False, "host_clients": False,
                                 "reset_removed_endpoint_tcp": False, "masquerade_external_to_local_backends": True,
                                 "cluster_cidr": IPv4Network("198.18.64.0/18"), "attached then": {}}]

    plain = make_agent(host_clients=False)
    send(plain, node_obj("198.18.0.11"))
    list_all(plain, "Node")
    plain.sync()
    assert kernel.node_addrs[-1] == NodeAddrs(hairpin4=node, snat4=node)
    assert len(kernel.published) == 2 and kernel.published[-1] == {
        "snat_keep_client_port": True, "host_clients": False, "reset_removed_endpoint_tcp": True,
        "masquerade_external_to_local_backends": False, "cluster_cidr": None,
        "attached then": {"eth1": 1}}      # the first agent's programs (loads[1]), none of this one's


def test_a_bad_node_is_one_log_line_and_its_last_good_version_stays(kernel, caplog):
    agent = make_agent()
    send(agent, node_obj("198.18.0.11"))
    list_all(agent, "Node")
    agent.sync()
    with caplog.at_level(logging.INFO):
        send(agent, node_obj("198.18.0.21", bad=True), type_=EventType.MODIFIED)
        agent.sync()
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert [r.getMessage() for r in warnings] == [
        "skipping invalid object (last good version stays in force): Node node-1: "
        "status.addresses[1].address: '198.18.0.300' is not an IP address"]
    assert not any(r.exc_info for r in caplog.records)
    assert agent.node_info.primary == IPv4Address("198.18.0.11")


def test_a_node_address_on_no_interface_is_named_and_the_interfaces_serve(kernel, caplog):
    agent = make_agent(manifests="/nonexistent")
    with caplog.at_level(logging.WARNING):
        send(agent, node_obj("198.18.77.7"))
        list_all(agent, "Node")
        agent.sync()
    assert "Node node-1: status.addresses: InternalIP 198.18.77.7 is on no interface of this node" in caplog.text
    assert agent.node_info.primary == IPv4Address("198.18.9.5")


def test_no_node_object_in_a_manifest_directory_uses_the_interfaces(kernel):
    agent = make_agent()
    list_all(agent, "Node", "Service", "EndpointSlice", "Endpoints", "ServiceCIDR")
    agent.sync()
    assert agent.node_info.addresses == (IPv4Address("198.18.9.5"), IPv4Address("198.18.0.11"),
                                         IPv4Address("198.18.0.21"))
    assert set(kernel.attached) == {"eth0", "eth1"}


def test_node_clients_reach_clusterips_without_any_service_cidr_then_the_servicecidrs(kernel):
    """No --service-cidr and no ServiceCIDR objects (an API before 1.33): each ClusterIP gets its
    own route; ServiceCIDR objects, once there, replace them, and are followed as they change."""
    agent = make_agent()
    send(agent, node_obj("198.18.0.11"))
    send(agent, service("a", "10.96.0.10"))
    send(agent, service("b", "172.20.0.5", node_port=30080))
    list_all(agent, "Node", "Service", "EndpointSlice", "ServiceCIDR")
    agent.sync()
    assert kernel.routes == {IPv4Network("10.96.0.10/32"), IPv4Network("172.20.0.5/32")}
    assert kernel.route_sources == {IPv4Address("198.18.0.11")}

    send(agent, service("c", "10.96.0.11"))
    agent.sync()
    assert IPv4Network("10.96.0.11/32") in kernel.routes

    send(agent, service_cidr("10.96.0.0/12"))
    agent.sync()
    assert kernel.routes == {IPv4Network("10.96.0.0/12"), IPv4Network("172.20.0.5/32")}
    send(agent, service_cidr("10.96.0.0/12", "172.20.0.0/16"), type_=EventType.MODIFIED)
    agent.sync()
    assert kernel.routes == {IPv4Network("10.96.0.0/12"), IPv4Network("172.20.0.0/16")}
    send(agent, service("b", "172.20.0.5", node_port=30080), type_=EventType.DELETED)
    send(agent, service_cidr(), type_=EventType.DELETED)
    agent.sync()
    assert kernel.routes == {IPv4Network("10.96.0.10/32"), IPv4Network("10.96.0.11/32")}


def test_the_service_cidr_flag_is_routed_when_the_api_has_no_servicecidrs(kernel):
    agent = make_agent(node=NodeConfig("node-1", service_cidr="10.96.0.0/12"))
    send(agent, node_obj("198.18.0.11"))
    send(agent, service("a", "10.96.0.10"))
    list_all(agent, "Node", "Service", "EndpointSlice", "ServiceCIDR")
    agent.sync()
    assert kernel.routes == {IPv4Network("10.96.0.0/12")}


def test_a_configured_uplink_that_does_not_exist_fails_healthz_naming_it(kernel):
    agent = make_agent(uplinks=("eth1", "bond0"))
    send(agent, node_obj("198.18.0.11"))
    list_all(agent, "Node")
    agent.sync()
    assert set(kernel.attached) == {"eth1"}
    healthy, state, reason, body = agent.telemetry.health.status()
    assert not healthy and state == "fault" and "uplink bond0 not found" in reason
    assert body["reason"] == reason

    kernel.links["bond0"] = 7                          # created later: found at the next periodic resync
    agent.read_interfaces = lambda: (*INTERFACES, Interface("bond0"))
    agent._refresh_node(force=True)
    assert set(kernel.attached) == {"eth1", "bond0"}
    assert agent.telemetry.health.faults == {}


def test_a_failed_reconfiguration_is_tried_again_at_the_next_sync(kernel, monkeypatch):
    agent = make_agent()
    real_load, calls = uplink.load, []

    def failing_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("compile failed")
        return real_load(*args, **kwargs)

    monkeypatch.setattr(uplink, "load", failing_once)
    send(agent, node_obj("198.18.0.11"))
    list_all(agent, "Node")
    with pytest.raises(RuntimeError):
        agent.sync()                            # the runner logs it and runs sync() again
    agent.sync()
    assert set(kernel.attached) == {"eth1"} and len(calls) == 2


def test_an_address_that_appears_later_serves_nodeports_from_the_next_resync(kernel):
    """Interfaces are read again at every periodic resync (sync_period): a Node address that was on no interface
    (DHCP late, a VIP moved in) starts serving NodePorts, though the Node object is unchanged."""
    agent = make_agent()
    agent.read_interfaces = lambda: INTERFACES[:2]            # eth1 not up yet
    send(agent, node_obj("198.18.0.11", "198.18.9.5"))
    send(agent, service("np", "10.96.0.20", node_port=30080))
    list_all(agent, "Node", "Service", "EndpointSlice", "ServiceCIDR")
    agent.sync()
    ports = lambda: {str(k.address) for k in agent.last_applied.frontends if k.port == 30080}  # noqa: E731
    assert ports() == {"198.18.9.5"}
    agent.read_interfaces = lambda: INTERFACES
    agent._next_resync = 0.0                                  # the periodic resync is due
    agent.sync()
    assert ports() == {"198.18.0.11", "198.18.9.5"}


def test_an_address_added_at_runtime_serves_nodeports_at_the_next_sync(kernel):
    """kube-proxy re-reads its NodePort addresses at every sync: an address added to an interface
    (here inside --nodeport-addresses' CIDR) serves NodePorts at the next sync after the kernel's
    address event, not only at the next full resync or a restart."""
    agent = make_agent(nodeport_addresses=("198.18.0.0/24",))
    agent.runner.run = lambda: None                           # the test calls sync() itself
    agent.read_interfaces = lambda: INTERFACES[:2] + (Interface("eth1", (IPv4Address("198.18.0.11"),)),)
    send(agent, node_obj("198.18.0.11"))
    send(agent, service("np", "10.96.0.20", node_port=30080))
    list_all(agent, "Node", "Service", "EndpointSlice", "ServiceCIDR")
    agent.sync()
    ports = lambda: {str(k.address) for k in agent.last_applied.frontends if k.port == 30080}  # noqa: E731
    assert ports() == {"198.18.0.11"}
    agent._next_resync = agent._next_full_apply = float("inf")   # no periodic resync in this test
    agent.read_interfaces = lambda: INTERFACES                # 198.18.0.21 added to eth1
    agent.sync()
    assert ports() == {"198.18.0.11"}, "no address event yet: the interfaces are not read again"
    agent._address_changed()                                  # the watcher's RTM_NEWADDR
    agent.sync()
    assert ports() == {"198.18.0.11", "198.18.0.21"}


def on_dual_stack_node(agent, policy: str) -> list:
    """The agent on a dual-stack node (eth1 carries both families) with a dual-stack NodePort Service
    web (ipFamilyPolicy `policy`); the list of the states it applies."""
    agent.read_interfaces = lambda: (*INTERFACES[:2], Interface("eth1", (IPv4Address("198.18.0.11"),
                                                                         ip_address("2001:2::11"))), INTERFACES[3])
    applied = []
    agent.writer.apply = lambda state, **_: applied.append(state) or ApplyStats()
    send(agent, node_obj("198.18.0.11", "2001:2::11"))
    send(agent, {**service("web", "198.19.0.10", node_port=30080), "spec": {
        "clusterIPs": ["198.19.0.10", "2001:2:0:ff::10"], "ipFamilyPolicy": policy,
        "type": "NodePort", "ports": [{"port": 80, "nodePort": 30080}]}})
    return applied


def test_a_dual_stack_node_serves_nodeports_on_its_ipv6_address_with_a_primary_of_each_family(kernel):
    """Issue 14: with --ip-families IPv4,IPv6 the Node's IPv6 address serves NodePorts beside its IPv4
    one; the datapath's hairpin and SNAT source is the primary address of each family."""
    v6 = ip_address("2001:2::11")
    agent = make_agent(node=NodeConfig("node-1", ip_families=("IPv4", "IPv6")), ip_families_auto=False)
    applied = on_dual_stack_node(agent, "RequireDualStack")
    list_all(agent, "Node", "Service", "EndpointSlice")
    agent.sync()
    node = IPv4Address("198.18.0.11")
    assert kernel.loads == ["pod", "uplink"]
    assert kernel.node_addrs[-1] == NodeAddrs(hairpin4=node, snat4=node, hairpin6=v6, snat6=v6)
    assert agent.desired.node.node_addresses == (node, v6)
    assert {(str(k.address), k.port) for k in applied[-1].frontends} == {
        ("198.19.0.10", 80), ("2001:2:0:ff::10", 80), ("198.18.0.11", 30080), ("2001:2::11", 30080)}
    assert {str(n) for n in kernel.routes} == {"198.19.0.10/32", "2001:2:0:ff::10/128"}    # node clients: both
    assert kernel.route_sources == {node, v6}                        # each from the node's address of its family


# ---- --ip-families auto: the cluster's ServiceCIDRs say which families (issue 14) -------------------

def dual_stack_agent(kernel):
    """A default agent (no --ip-families) on a dual-stack node: eth1 carries both families."""
    agent = make_agent()
    applied = on_dual_stack_node(agent, "PreferDualStack")
    send(agent, service("web6", "2001:2:0:ff::11"))
    return agent, applied


def served(applied) -> set:
    return {(str(k.address), k.port) for k in applied[-1].frontends}


def test_default_families_are_the_servicecidrs_and_need_no_flag(kernel):
    """kube-apiserver's `kubernetes` ServiceCIDR of both families: the default agent serves both, the
    IPv6 node address serves NodePorts, node-client routes cover both families' ServiceCIDRs."""
    agent, applied = dual_stack_agent(kernel)
    send(agent, service_cidr("198.19.0.0/16", "2001:2:0:ff::/108"))
    list_all(agent, "Node", "Service", "EndpointSlice", "ServiceCIDR")
    agent.sync()
    v6 = ip_address("2001:2::11")
    assert agent.config.node.ip_families == agent.desired.node.ip_families == ("IPv4", "IPv6")
    assert agent.desired.node.node_addresses == (IPv4Address("198.18.0.11"), v6)
    assert served(applied) == {("198.19.0.10", 80), ("2001:2:0:ff::10", 80), ("2001:2:0:ff::11", 80),
                               ("198.18.0.11", 30080), ("2001:2::11", 30080)}
    assert kernel.routes == {IPv4Network("198.19.0.0/16"), IPv6Network("2001:2:0:ff::/108")}
    assert agent.state.problems == []


def test_no_servicecidr_means_ipv4_and_a_new_family_is_served_when_its_servicecidr_comes(kernel):
    """An API without ServiceCIDRs (listed empty): IPv4, as before dual-stack. Nothing is written
    before the ServiceCIDR list (a restart must not drop what the previous run served for IPv6);
    an IPv6 range arriving later recomputes the desired state and adds the node's IPv6 address."""
    agent, applied = dual_stack_agent(kernel)
    list_all(agent, "Node", "Service", "EndpointSlice")
    agent.sync()
    assert applied == []                                   # the families are not known yet
    list_all(agent, "ServiceCIDR")
    agent.sync()
    assert agent.desired.node.ip_families == ("IPv4",)
    assert served(applied) == {("198.19.0.10", 80), ("198.18.0.11", 30080)}
    assert agent.desired.node.node_addresses == (IPv4Address("198.18.0.11"),)

    send(agent, service_cidr("198.19.0.0/16", "2001:2:0:ff::/108"))
    agent.sync()
    assert agent.desired.node.ip_families == ("IPv4", "IPv6")
    assert served(applied) == {("198.19.0.10", 80), ("2001:2:0:ff::10", 80), ("2001:2:0:ff::11", 80),
                               ("198.18.0.11", 30080), ("2001:2::11", 30080)}
    send(agent, service_cidr("198.19.0.0/16"), type_=EventType.MODIFIED)     # and back
    agent.sync()
    assert served(applied) == {("198.19.0.10", 80), ("198.18.0.11", 30080)}


def test_a_clusterip_of_a_family_without_servicecidr_is_one_line(kernel, caplog):
    """Auto: the API server is the judge of a clusterIP's family, so the Service is not refused; a
    clusterIP of a family no ServiceCIDR has (a manifest's) is told once, naming Service and field."""
    agent, applied = dual_stack_agent(kernel)
    list_all(agent, "Node", "Service", "EndpointSlice", "ServiceCIDR")
    with caplog.at_level(logging.WARNING, logger="ebpfsvc.agent"):
        agent.sync()
        send(agent, service("other", "198.19.0.12"))
        agent.sync()
    lines = [r.getMessage() for r in caplog.records if "not served" in r.getMessage()]
    assert lines == [
        "Service default/web: spec.clusterIPs[1]: 2001:2:0:ff::10 is IPv6, a family the cluster has no "
        "ServiceCIDR of (serving IPv4): not served",
        "Service default/web6: spec.clusterIPs[0]: 2001:2:0:ff::11 is IPv6, a family the cluster has no "
        "ServiceCIDR of (serving IPv4): not served"]
    assert agent.state.problems == [] and ("2001:2:0:ff::11", 80) not in served(applied)


def test_an_ipv6_primary_cluster_lists_ipv6_first_and_an_explicit_flag_wins(kernel):
    agent, applied = dual_stack_agent(kernel)
    send(agent, {**service_cidr("2001:2:0:ff::/108", "198.19.0.0/16")})
    list_all(agent, "Node", "Service", "EndpointSlice", "ServiceCIDR")
    agent.sync()
    assert agent.desired.node.ip_families == ("IPv6", "IPv4")

    # --ip-families IPv4: the ServiceCIDRs are not followed; an IPv6 clusterIP refuses its Service.
    fixed = make_agent(node=NodeConfig("node-1", ip_families=("IPv4",)), ip_families_auto=False)
    send(fixed, service_cidr("198.19.0.0/16", "2001:2:0:ff::/108"))
    send(fixed, service("web6", "2001:2:0:ff::11"))
    list_all(fixed, "Node", "Service", "EndpointSlice")
    fixed.sync()
    assert fixed.desired.node.ip_families == ("IPv4",)
    assert [(p.name, p.field) for p in fixed.state.problems] == [("web6", "spec.clusterIP")]
