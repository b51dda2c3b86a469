"""Node agents in the lab: the one command line that starts an agent inside a node.

Each lab node runs its own `ebpfsvc agent` inside its namespace, reading the
lab's manifests/ and pinning its maps under /sys/fs/bpf/<prefix>/<node>, so a
restart finds its maps again.  The command line is built here and nowhere
else: when the agent's options change, this is the one place to adjust.

Like a DaemonSet's agent, it is told nothing about its node but the name: the
addresses, zone, uplink and hairpin source come from its Node object in
manifests/ and the namespace's interfaces, and the service CIDR from the
ServiceCIDR object there (ebpfsvc/nodeinfo.py).
The controller starts and stops agents (it is their parent and reaps them).
"""

from __future__ import annotations

import sys

from ebpfsvc.lab import names
from ebpfsvc.lab.labfile import LabSpec
from ebpfsvc.lab.store import State


def command(state: State, spec: LabSpec, node_name: str) -> list[str]:
    node = spec.node(node_name)
    return [
        sys.executable, "-m", "ebpfsvc.cli", "agent",
        "--node-name", node.name,
        "--manifests", str(state.manifests),
        "--pin-dir", str(names.pin_dir(state.prefix, node.name)),
        "--pod-interfaces", f"{names.POD_LINK_PREFIX}*",
    ]
