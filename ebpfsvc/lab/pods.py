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
# A fixed pod IP, or one per family comma-separated (manual Endpoints name pods by address);
# `status.podIP` / `status.podIPs` in a lab manifest become this annotation, since the API
# server ignores status on apply.
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


def pod_ips(pod: dict[str, Any]) -> list[str]:
    """status.podIPs (every family, the primary first), else status.podIP."""
    status = pod.get("status") or {}
    ips = [p["ip"] for p in status.get("podIPs") or [] if p.get("ip")]
    return ips or ([status["podIP"]] if status.get("podIP") else [])


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
    status = pod.pop("status", None) or {}
    wanted = [str(p.get("ip")) for p in status.get("podIPs") or [] if isinstance(p, dict) and p.get("ip")]
    wanted = wanted or ([str(status["podIP"])] if status.get("podIP") else [])
    if wanted:
        pod["metadata"].setdefault("annotations", {})[POD_IP_ANNOTATION] = ",".join(wanted)
    for container in _containers(pod):
        container.setdefault("image", LAB_IMAGE)
    probe_port(pod)
    if (pod.get("spec") or {}).get("nodeName"):
        schedule(pod, spec, [])
    return pod


def allocate_ips(pod: dict[str, Any], node: NodeSpec, used: set) -> list:
    """One address per pod CIDR of the node (per lab family, the primary first): the
    lab.ebpfsvc.io/pod-ip annotation's address of that family if it names one (it must be a
    pod address of the node's CIDR), else the lowest free address from .2 / ::2 up (.1 / ::1
    are kept for the node's gateway)."""
    wanted: dict[int, Any] = {}
    raw = ((pod.get("metadata") or {}).get("annotations") or {}).get(POD_IP_ANNOTATION)
    for text in (raw.split(",") if raw else []):
        try:
            ip = ipaddress.ip_address(text.strip())
        except ValueError:
            raise PodError(f"Pod {label(pod)}: {POD_IP_ANNOTATION}: {text.strip()!r} is not an IP address") from None
        cidr = node.pod_cidr_of(ip.version)
        if cidr is None or ip not in cidr or ip in node.reserved(cidr):
            where = f"{cidr}" if cidr is not None else f"no IPv{ip.version} pod CIDR"
            raise PodError(f"Pod {label(pod)}: {POD_IP_ANNOTATION}: {ip} is not a pod address of "
                           f"node {node.name} ({where})")
        if ip.version in wanted:
            raise PodError(f"Pod {label(pod)}: {POD_IP_ANNOTATION}: two IPv{ip.version} addresses")
        if ip in used:
            raise PodError(f"Pod {label(pod)}: {POD_IP_ANNOTATION}: {ip} is already in use")
        wanted[ip.version] = ip
    ips = []
    for cidr in node.pod_cidrs:
        if cidr.version in wanted:
            ips.append(wanted[cidr.version])
            continue
        reserved = node.reserved(cidr)
        free = next((ip for ip in cidr.hosts() if ip not in reserved and ip not in used), None)
        if free is None:
            raise PodError(f"Pod {label(pod)}: node {node.name}'s pod CIDR {cidr} is full")
        ips.append(free)
    return ips
