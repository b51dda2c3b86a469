"""The node's NodePort addresses on the wire: an address added to a node's interface at runtime
serves NodePorts without an agent restart, as kube-proxy re-reads its --nodeport-addresses at
every sync (issue 17 item 8). The agents run with `nodeport-addresses: [198.18.0.0/24]` in the
ConfigMap (kube-proxy's CIDR form: the node's addresses inside it, whatever the Node says), and a
`sync-period` of an hour, so that no periodic full resync (which reads the interfaces again too)
happens during the test: the new address is found from the kernel's address event."""

from __future__ import annotations

import json

import pytest
import yaml
from pyroute2 import IPRoute

from ebpfsvc.datapath import nsenter
from ebpfsvc.lab import Lab, agents, apps
from ebpfsvc.lab.network import UPLINK

from .helpers import node_maps, service, wait_for, wait_programmed, wait_ready

pytestmark = pytest.mark.root

NODE1, ADDED, NODE_PORT = "198.18.0.11", "198.18.0.61", 30490


def curl(lab: Lab, url: str) -> str:
    """Who answers a GET from the external client, or curl's failure."""
    out = lab.external_exec("client", ["curl", "-sS", "--max-time", "3", url], timeout=15)
    return json.loads(out.stdout)["pod"] if out.returncode == 0 else f"curl exit {out.returncode}"


def serves(lab: Lab, node: str, address: str, port: int) -> bool:
    with node_maps(lab, node) as maps:
        fe = maps.frontend(address, port, "TCP", "external")
    return fe is not None and fe.backend_count == 1


def test_an_address_added_at_runtime_serves_nodeports(unique_prefix):
    with Lab.up(prefix=unique_prefix, agents=False) as lab:
        config = lab.state.path / agents.CONFIG_FILE
        config.write_text(yaml.safe_dump({**(yaml.safe_load(config.read_text()) or {}),
                                          "nodeport-addresses": ["198.18.0.0/24"], "sync-period": "1h"}))
        for node in ("node-1", "node-2"):
            lab.agent("start", node)
        lab.apply([apps.pod("na-a", "http-echo", 8080, node="node-2", labels={"pod": "na-a"}),
                   service("na", [{"port": 80, "targetPort": 8080, "nodePort": NODE_PORT}], selector={"pod": "na-a"},
                           type="NodePort")])
        wait_ready(lab, ["na-a"])
        wait_programmed(lab, "na", 80, backends=1)
        wait_for(lambda: curl(lab, f"http://{NODE1}:{NODE_PORT}/") == "na-a", what="the NodePort on node-1")
        assert not serves(lab, "node-1", ADDED, NODE_PORT)
        agent = lab.agent_record("node-1")

        def address(action: str) -> None:
            with IPRoute() as ipr:
                ipr.addr(action, index=ipr.link_lookup(ifname=UPLINK)[0], address=ADDED, prefixlen=24)

        netns = lab.node_netns("node-1")
        nsenter.run_in(netns, lambda: address("add"))
        try:
            wait_for(lambda: serves(lab, "node-1", ADDED, NODE_PORT), what=f"node-1 serving {ADDED}:{NODE_PORT}")
            assert curl(lab, f"http://{ADDED}:{NODE_PORT}/") == "na-a"
            assert lab.agent_record("node-1") == agent, "served by the same agent, not a restarted one"
        finally:
            nsenter.run_in(netns, lambda: address("del"))
        wait_for(lambda: not serves(lab, "node-1", ADDED, NODE_PORT), what=f"{ADDED} gone from node-1's NodePorts")
