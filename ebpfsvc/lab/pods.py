"""Reading and defaulting v1 Pod manifests the way kubelet and the CNI would.

The lab runs `spec.containers[0]` (command + args) as one process in the pod's
namespace; it needs, from a Pod object: its node, its IP, its command, its
readiness probe port and its named container ports (for named targetPorts).
The lab's runtime facts (host veth, process record) live under `status.lab`.
"""

from __future__ import annotations

import ipaddress
import sys
from typing import Any

from ebpfsvc.lab.labfile import LabSpec, NodeSpec
from ebpfsvc.lab.processes import ProcRecord

# Annotation that fixes a pod's readiness by hand: for pods without a process (the
# EndpointSlice scale tests need hundreds of endpoints, not hundreds of processes).
READY_ANNOTATION = "lab.ebpfsvc.io/ready"
# A fixed pod IP (manual Endpoints name pods by address); `status.podIP` in a lab manifest
# becomes this annotation, since the API server ignores status on apply.
POD_IP_ANNOTATION = "lab.ebpfsvc.io/pod-ip"
# Lab pods run a command in a namespace: no image is pulled, but the API requires a name.
LAB_IMAGE = "lab.ebpfsvc.io/process"
DEFAULT_GRACE_SECONDS = 30


class PodError(ValueError):
    pass


def key(pod: dict[str, Any]) -> tuple[str, str]:
    meta = pod.get("metadata") or {}
    return meta.get("namespace") or "default", meta["name"]


def label(pod: dict[str, Any]) -> str:
    namespace, name = key(pod)
    return name if namespace == "default" else f"{namespace}/{name}"


def parse_ref(ref: str) -> tuple[str, str]:
    """'name' or 'namespace/name' -> (namespace, name)."""
    if "/" in ref:
        namespace, name = ref.split("/", 1)
        return namespace, name
    return "default", ref


def _containers(pod: dict[str, Any]) -> list[dict[str, Any]]:
    return ((pod.get("spec") or {}).get("containers")) or []


def command(pod: dict[str, Any]) -> list[str] | None:
    """The first container's command + args, or None for a pod with no process."""
    containers = _containers(pod)
    if not containers:
        return None
    argv = [str(a) for a in (containers[0].get("command") or []) + (containers[0].get("args") or [])]
    return interpreter(argv) if argv else None


def interpreter(argv: list[str]) -> list[str]:
    """`python`/`python3` as the program means the lab's own interpreter (the venv with ebpfsvc)."""
    if argv and argv[0] in ("python", "python3"):
        return [sys.executable, *argv[1:]]
    return list(argv)


def container_port(pod: dict[str, Any], port: int | str, protocol: str = "TCP") -> int | None:
    """Resolve a targetPort: a number is itself, a name is the container port with that name."""
    if isinstance(port, int):
        return port
    if isinstance(port, str) and port.isdigit():
        return int(port)
    for container in _containers(pod):
        for cport in container.get("ports") or []:
            if cport.get("name") == port and (cport.get("protocol") or "TCP") == protocol:
                return int(cport["containerPort"])
    return None


def probe_port(pod: dict[str, Any]) -> int | None:
    """The tcpSocket readiness probe's port (resolved if named), or None without a probe."""
    containers = _containers(pod)
    if not containers:
        return None
    probe = (containers[0].get("readinessProbe") or {}).get("tcpSocket")
    if not probe or "port" not in probe:
        return None
    port = container_port(pod, probe["port"])
    if port is None:
        raise PodError(f"Pod {label(pod)}: readinessProbe.tcpSocket.port {probe['port']!r} names no container port")
    return port


def probe_thresholds(pod: dict[str, Any]) -> tuple[int, int]:
    """(successThreshold, failureThreshold) of the readiness probe; Kubernetes defaults 1 and 3.

    A single lost probe on a loaded machine must not flap an endpoint, as in a cluster.
    """
    containers = _containers(pod)
    probe = (containers[0].get("readinessProbe") or {}) if containers else {}
    return max(1, int(probe.get("successThreshold") or 1)), max(1, int(probe.get("failureThreshold") or 3))


def grace_seconds(pod: dict[str, Any]) -> float:
    value = (pod.get("spec") or {}).get("terminationGracePeriodSeconds")
    return float(DEFAULT_GRACE_SECONDS if value is None else value)


def ready_override(pod: dict[str, Any]) -> bool | None:
    value = ((pod.get("metadata") or {}).get("annotations") or {}).get(READY_ANNOTATION)
    if value is None:
        return None
    return str(value).lower() == "true"


def is_ready(pod: dict[str, Any]) -> bool:
    for cond in (pod.get("status") or {}).get("conditions") or []:
        if cond.get("type") == "Ready":
            return cond.get("status") == "True"
    return False


def set_ready(pod: dict[str, Any], ready: bool, now: str) -> bool:
    """Set the Ready and ContainersReady conditions; True if that changed anything."""
    if is_ready(pod) == ready and (pod.get("status") or {}).get("conditions"):
        return False
    value = "True" if ready else "False"
    status = pod.setdefault("status", {})
    status["conditions"] = [{"type": t, "status": value, "lastTransitionTime": now}
                            for t in ("Ready", "ContainersReady")]
    return True


def process(pod: dict[str, Any]) -> ProcRecord | None:
    """The record of the Pod's process (status.lab.process), if it has one."""
    return ProcRecord.from_dict(((pod.get("status") or {}).get("lab") or {}).get("process"))


def is_terminating(pod: dict[str, Any]) -> bool:
    return bool((pod.get("metadata") or {}).get("deletionTimestamp"))


def matches(selector: dict[str, str], pod: dict[str, Any]) -> bool:
    labels = (pod.get("metadata") or {}).get("labels") or {}
    return all(labels.get(k) == v for k, v in selector.items())


def schedule(pod: dict[str, Any], spec: LabSpec, existing: list[dict[str, Any]]) -> NodeSpec:
    """spec.nodeName's node; without one, the node with the fewest pods (ties: lab-file order)."""
    name = (pod.get("spec") or {}).get("nodeName")
    if name:
        try:
            return spec.node(name)
        except KeyError as exc:
            raise PodError(f"Pod {label(pod)}: spec.nodeName: {exc.args[0]}") from None
    counts = {n.name: 0 for n in spec.nodes}
    for other in existing:
        node = (other.get("spec") or {}).get("nodeName")
        if node in counts:
            counts[node] += 1
    return min(spec.nodes, key=lambda n: counts[n.name])


def admit(pod: dict[str, Any], prefix: str, spec: LabSpec) -> dict[str, Any]:
    """What the lab needs of a Pod before the API server sees it (the caller's copy is changed):
    an image, a fixed IP as the annotation, a name that is not a lab node's, a probe that names
    a port, and a nodeName that is a lab node."""
    from ebpfsvc.lab import names

    namespace, name = key(pod)
    members = [*(n.name for n in spec.nodes), *(e.name for e in spec.external), names.CONTROL_PLANE, "fabric"]
    if names.pod_netns(prefix, namespace, name) in {names.member_netns(prefix, m) for m in members}:
        raise PodError(f"Pod {label(pod)}: metadata.name clashes with a lab node or client name")
    wanted = (pod.pop("status", None) or {}).get("podIP")
    if wanted:
        pod["metadata"].setdefault("annotations", {})[POD_IP_ANNOTATION] = str(wanted)
    for container in _containers(pod):
        container.setdefault("image", LAB_IMAGE)
    probe_port(pod)
    if (pod.get("spec") or {}).get("nodeName"):
        schedule(pod, spec, [])
    return pod


def allocate_ip(pod: dict[str, Any], node: NodeSpec, used: set[ipaddress.IPv4Address]) -> ipaddress.IPv4Address:
    """The lab.ebpfsvc.io/pod-ip annotation if the manifest sets one (it must be in the node's
    pod CIDR), else the lowest free address from .2 up (.1 is the node's gateway)."""
    wanted = ((pod.get("metadata") or {}).get("annotations") or {}).get(POD_IP_ANNOTATION)
    if wanted:
        try:
            ip = ipaddress.IPv4Address(wanted)
        except ValueError:
            raise PodError(f"Pod {label(pod)}: {POD_IP_ANNOTATION}: {wanted!r} is not an IPv4 address") from None
        if ip not in node.pod_cidr or ip in (node.gateway, node.pod_cidr.broadcast_address):
            raise PodError(f"Pod {label(pod)}: {POD_IP_ANNOTATION}: {ip} is not a pod address of "
                           f"node {node.name} ({node.pod_cidr})")
        if ip in used:
            raise PodError(f"Pod {label(pod)}: {POD_IP_ANNOTATION}: {ip} is already in use")
        return ip
    for ip in node.pod_cidr.hosts():
        if ip != node.gateway and ip not in used:
            return ip
    raise PodError(f"Pod {label(pod)}: node {node.name}'s pod CIDR {node.pod_cidr} is full")
