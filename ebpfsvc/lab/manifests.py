"""The manifests/ directory node agents read: a pure rendering of the lab's object store.

It holds what a node agent would get from the API server: the applied Services
(with status.loadBalancer as a cloud controller would set it), Endpoints and
EndpointSlices, the EndpointSlices the lab's controller generates, one Node
object per lab node (zone label, InternalIP, podCIDR: what a kubelet registers,
and all an agent learns its node from), and the `kubernetes` ServiceCIDR with
the lab's service CIDR (what kube-apiserver 1.33+ creates from its
--service-cluster-ip-range).  Pods are not there: agents do not watch Pods.

Each object is one file, `<kind>.<namespace>.<name>.yaml` (cluster-scoped ones:
`<kind>.<name>.yaml`; dots cannot occur in namespace names, so the split is unambiguous),
written atomically (temp + rename) and only when its content changed, so a
watching agent sees each change once and never half a file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ebpfsvc.k8s.fields import CLUSTER_SCOPED
from ebpfsvc.lab import endpointslices, services
from ebpfsvc.lab.labfile import LabSpec
from ebpfsvc.lab.store import State, atomic_write, dump

ZONE_LABEL = "topology.kubernetes.io/zone"


def node_object(node) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": node.name,
                     "labels": {"kubernetes.io/hostname": node.name, ZONE_LABEL: node.zone}},
        "spec": {"podCIDR": str(node.pod_cidr), "podCIDRs": [str(node.pod_cidr)]},
        "status": {"addresses": [{"type": "InternalIP", "address": str(node.address)},
                                 {"type": "Hostname", "address": node.name}]},
    }


def service_cidr_object(spec: LabSpec) -> dict[str, Any]:
    return {"apiVersion": "networking.k8s.io/v1", "kind": "ServiceCIDR", "metadata": {"name": "kubernetes"},
            "spec": {"cidrs": [str(spec.service_cidr)]}}


def _file_name(obj: dict[str, Any]) -> str:
    meta = obj["metadata"]
    if obj["kind"] in CLUSTER_SCOPED:
        return f"{obj['kind'].lower()}.{meta['name']}.yaml"
    return f"{obj['kind'].lower()}.{meta.get('namespace') or 'default'}.{meta['name']}.yaml"


def render(spec: LabSpec, stored: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """File name -> object, from the lab spec and the stored objects by kind."""
    objects: list[dict[str, Any]] = [node_object(n) for n in spec.nodes] + [service_cidr_object(spec)]
    svcs = stored.get("Service", [])
    objects += [services.with_load_balancer_status(s) for s in svcs]
    objects += stored.get("Endpoints", [])
    objects += stored.get("EndpointSlice", [])
    zones = {n.name: n.zone for n in spec.nodes}
    objects += endpointslices.generate(svcs, stored.get("Pod", []), zones)
    return {_file_name(o): o for o in objects}


def sync(state: State) -> bool:
    """Bring manifests/ in line with the store (caller holds the state lock). True if changed."""
    wanted = render(state.spec(), {kind: state.list(kind) for kind in ("Service", "Endpoints",
                                                                         "EndpointSlice", "Pod")})
    changed = False
    for name, obj in wanted.items():
        path = state.manifests / name
        text = dump(obj)
        if _read(path) != text:
            atomic_write(path, text)
            changed = True
    for path in state.manifests.glob("*.yaml"):
        if path.name not in wanted:
            path.unlink(missing_ok=True)
            changed = True
    return changed


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except FileNotFoundError:
        return None
