"""Node agents in the lab: deploy/'s command line, run inside each node's namespace.

Each lab node runs its own `ebpfsvc agent` with exactly the configuration an operator
installs: the DaemonSet's arguments and the ConfigMap's config.yaml, nothing per node.
Only what a container gets from its pod spec is mapped to the lab's files:

    --config=/etc/ebpfsvc/config.yaml   the ConfigMap's config.yaml, copied to the state dir
    $(NODE_NAME)                        the node's name (the DaemonSet's fieldRef)
    --pin-dir                           /sys/fs/bpf/<prefix>/<node>: one bpffs serves every lab
                                        node, where each real node has its own
    --kubeconfig                        the API server's fabric address and a token of deploy/'s
                                        ServiceAccount (in a pod: KUBERNETES_SERVICE_HOST and the
                                        mounted token)

Like a DaemonSet's agent, it is told nothing about its node but the name: the
addresses, zone, uplink and hairpin source come from its Node object and the
namespace's interfaces, and the service CIDRs from the API's ServiceCIDR objects
(ebpfsvc/nodeinfo.py). A lab file's `clusterCIDR` (nothing in the API says it) is
passed as `--cluster-cidr`, as kube-proxy's is.

The controller starts and stops agents (it is their parent and reaps them).
"""

from __future__ import annotations

import sys

from ebpfsvc.lab import cgroups, controlplane, names
from ebpfsvc.lab.labfile import LabSpec
from ebpfsvc.lab.store import State

CONFIG_FILE = "agent-config.yaml"


def write_config(state: State) -> None:
    """The ConfigMap's config.yaml, as the DaemonSet mounts it."""
    configmap = next(d for d in controlplane.deploy_documents("configmap.yaml") if d.get("kind") == "ConfigMap")
    (state.path / CONFIG_FILE).write_text(configmap["data"]["config.yaml"])


def deploy_args() -> list[str]:
    daemonset = next(d for d in controlplane.deploy_documents("daemonset.yaml") if d.get("kind") == "DaemonSet")
    agent = next(c for c in daemonset["spec"]["template"]["spec"]["containers"] if c["name"] == "agent")
    return [str(a) for a in agent["args"]]


def command(state: State, spec: LabSpec, node_name: str) -> list[str]:
    node = spec.node(node_name)
    paths = controlplane.Paths(state.path)
    mapped = {
        "--config": str(state.path / CONFIG_FILE),
        "--pin-dir": str(names.pin_dir(state.prefix, node.name)),
    }
    argv = [sys.executable, "-m", "ebpfsvc.cli"]
    for arg in deploy_args():
        flag, sep, _ = arg.partition("=")
        if sep and flag in mapped:
            arg = f"{flag}={mapped[flag]}"
        argv.append(arg.replace("$(NODE_NAME)", node.name))
    # The node's cgroup stands for the host's cgroup root: the lab's pods and node processes are
    # below it (cgroups.py). It is where the socket path attaches when config.yaml turns it on.
    argv += [f"--kubeconfig={paths.agent_kubeconfig(node.name)}",
             f"--socket-lb-cgroup={cgroups.node_cgroup(state.prefix, node.name)}"]
    # The lab file's cluster CIDR, as an operator whose cluster has one passes it (kube-proxy's
    # --cluster-cidr; deploy/ cannot know it): the same one the lab's kube-proxy gets.
    if spec.cluster_cidr is not None:
        argv.append(f"--cluster-cidr={spec.cluster_cidr}")
    return argv
