"""Resizing without loss (issue 11 #7): an agent restarted with other map sizes (the operator edits
the ConfigMap's --max-* keys) recreates its pinned maps and carries their entries over: a
long-lived TCP stream and a UDP flow through Services keep going, to the same backends, with no
reset and no lost exchange.  Own lab: restarting agents must not disturb other tests."""

from __future__ import annotations

import pytest
import yaml

from ebpfsvc.lab import Lab, apps, names
from ebpfsvc.lab.agents import CONFIG_FILE

from .helpers import (Chatter, TcpStream, bare_pod, cluster_ip, service, udp_ask, udp_socket, wait_for,
                      wait_programmed, wait_ready)

pytestmark = pytest.mark.root

CLIENT = "rz-client"


def test_agent_restart_with_larger_maps_keeps_streams(unique_prefix):
    with Lab.up(prefix=unique_prefix, agents=True) as lab:
        lab.apply([bare_pod(CLIENT, "node-1"),
                   apps.pod("rz-tcp", "tcp-echo", 7000, node="node-2", labels={"app": "rz-tcp"}),
                   apps.pod("rz-udp", "udp-echo", 5353, node="node-2", labels={"app": "rz-udp"}),
                   service("rz-tcp", [{"port": 7000}], selector={"app": "rz-tcp"}),
                   service("rz-udp", [{"port": 53, "targetPort": 5353, "protocol": "UDP"}],
                           selector={"app": "rz-udp"})])
        wait_ready(lab, ["rz-tcp", "rz-udp"])
        wait_programmed(lab, "rz-tcp", 7000, backends=1)
        wait_programmed(lab, "rz-udp", 53, backends=1, proto="UDP")
        tcp_vip, udp_vip = cluster_ip(lab, "rz-tcp"), cluster_ip(lab, "rz-udp")
        stream = wait_for(lambda: TcpStream(lab, CLIENT, tcp_vip, 7000), what="a stream")
        udp = udp_socket(lab, CLIENT, timeout=1)
        wait_for(lambda: udp_ask(udp, udp_vip, 53), what="a UDP answer (app binding)")
        udp.settimeout(5)
        chatter = Chatter({"tcp": stream.backend, "udp": lambda: udp_ask(udp, udp_vip, 53)["pod"]})
        # The operator doubles the maps in the ConfigMap; the client node's agent restarts with them.
        config = lab.state.path / CONFIG_FILE
        settings = yaml.safe_load(config.read_text()) or {}
        settings.update({"max-maglev-slots": 2 * 16777216, "max-backends": 2 * 131072,
                         "max-frontends": 2 * 65536})
        config.write_text(yaml.safe_dump(settings))
        old_agent = lab.agent_record("node-1")
        try:
            chatter.start()
            chatter.wait_rounds(5)
            lab.agent("restart", "node-1")
            assert lab.agent_record("node-1") != old_agent
            # The new agent runs with the new sizes, and serves changes.
            lab.apply([service("rz-after", [{"port": 7000}], selector={"app": "rz-tcp"})])
            wait_programmed(lab, "rz-after", 7000, backends=1, nodes=["node-1"])
            chatter.wait_rounds(5)
        finally:
            chatter.halt()
            stream.close()
            udp.close()
        assert chatter.error is None, repr(chatter.error)
        assert chatter.who_answered() == {"tcp": {"rz-tcp"}, "udp": {"rz-udp"}}
        # The maps were recreated with the new sizes, their entries carried over.
        text = lab.state.log_path(names.agent_record("node-1")).read_text()
        assert "do not match the program" in text and "carrying their entries over" in text
        assert "carried over to the resized maps: " in text
