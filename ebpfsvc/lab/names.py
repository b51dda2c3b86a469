"""Names of everything a lab creates, derived from its prefix, in one place.

`lab down` must find every object a lab made, also after a crash, so no name
may be invented anywhere else: namespaces, links, pin and state paths all come
from here.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

# Overridable so tests of `lab down --all` can use a private registry of labs.
STATE_ROOT = Path(os.environ.get("EBPFSVC_LAB_ROOT", "/run/ebpfsvc-lab"))
BPFFS = Path("/sys/fs/bpf")
POD_LINK_PREFIX = "lxc"   # the agent attaches its pod-side programs to `lxc*` links


def state_dir(prefix: str) -> Path:
    return STATE_ROOT / prefix


def fabric_netns(prefix: str) -> str:
    return f"{prefix}-fabric"


def member_netns(prefix: str, name: str) -> str:
    """A node's or external client's namespace."""
    return f"{prefix}-{name}"


def pod_netns(prefix: str, namespace: str, name: str) -> str:
    # '_' is legal in neither namespace nor pod names, so the two forms never collide.
    if namespace == "default":
        return f"{prefix}-{name}"
    return f"{prefix}-{namespace}_{name}"


def pod_host_link(namespace: str, name: str) -> str:
    """The host side of a pod's veth: `lxc` + 8 hex of the pod's key (15-byte link name limit)."""
    digest = hashlib.sha256(f"{namespace}/{name}".encode()).hexdigest()
    return POD_LINK_PREFIX + digest[:8]


def fabric_port(name: str) -> str:
    """The bridge port, in the fabric namespace, of a node's or client's uplink."""
    port = f"to-{name}"
    if len(port) <= 15:
        return port
    return "to-" + hashlib.sha256(name.encode()).hexdigest()[:12]


def pin_root(prefix: str) -> Path:
    return BPFFS / prefix


def pin_dir(prefix: str, node: str) -> Path:
    return pin_root(prefix) / node


# Names of pid records and logs in the state dir (<name>.pid, <name>.log).
CONTROLLER = "controller"
# The control plane's namespace is the member namespace of this name (`<prefix>-cp`).
CONTROL_PLANE = "cp"


def agent_record(node: str) -> str:
    return f"agent-{node}"


def kube_proxy_record(node: str) -> str:
    """The real kube-proxy on a node (kubeproxy.py): migration test and benchmark."""
    return f"kube-proxy-{node}"


def pod_record(namespace: str, name: str) -> str:
    return f"pod-{namespace}-{name}"
