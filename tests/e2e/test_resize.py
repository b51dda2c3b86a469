"""Resizing without loss (issue 11 #7): an agent restarted with other map sizes (the operator edits
the ConfigMap's --max-* keys) recreates its pinned maps and carries their entries over: a
long-lived TCP stream and a UDP flow through Services keep going, to the same backends, with no
reset and no lost exchange.  Own lab: restarting agents must not disturb other tests."""

from __future__ import annotations

import pytest
import yaml

from ebpfsvc.lab import Lab, names
from ebpfsvc.lab.agents import CONFIG_FILE

from .helpers import service, tcp_udp_chatter, wait_programmed

pytestmark = pytest.mark.root

CLIENT = "rz-client"


def test_agent_restart_with_larger_maps_keeps_streams(unique_prefix):
    with Lab.up(prefix=unique_prefix, agents=True) as lab:
        with tcp_udp_chatter(lab, "rz", CLIENT) as chatter:
            # The operator doubles the maps in the ConfigMap; the client node's agent restarts with them.
            config = lab.state.path / CONFIG_FILE
            settings = yaml.safe_load(config.read_text()) or {}
            settings.update({"max-maglev-slots": 2 * 16777216, "max-backends": 2 * 131072,
                             "max-frontends": 2 * 65536})
            config.write_text(yaml.safe_dump(settings))
            old_agent = lab.agent_record("node-1")
            lab.agent("restart", "node-1")
            assert lab.agent_record("node-1") != old_agent
            # The new agent runs with the new sizes, and serves changes.
            lab.apply([service("rz-after", [{"port": 7000}], selector={"app": "rz-tcp"})])
            wait_programmed(lab, "rz-after", 7000, backends=1, nodes=["node-1"])
            chatter.wait_rounds(5)
        assert chatter.error is None, repr(chatter.error)
        assert chatter.who_answered() == {"tcp": {"rz-tcp"}, "udp": {"rz-udp"}}
        # The maps were recreated with the new sizes, their entries carried over.
        text = lab.state.log_path(names.agent_record("node-1")).read_text()
        assert "do not match the program" in text and "carrying their entries over" in text
        assert "carried over to the resized maps: " in text
