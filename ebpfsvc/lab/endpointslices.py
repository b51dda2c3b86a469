"""The lab's EndpointSlice controller: Pods + Services with selectors -> EndpointSlices.

A pure function, like the generator in kube-controller-manager
(pkg/controller/endpointslice), on raw API objects:

- every Service with a selector (not ExternalName) gets slices labelled
  kubernetes.io/service-name, managed-by endpointslice-controller.k8s.io;
- each selected Pod with an IP is an endpoint; terminating Pods are kept;
- per Pod, every Service port's targetPort is resolved (a name -> the container
  port with that name and protocol); Pods that resolve to the same port set
  share slices, at most MAX_ENDPOINTS_PER_SLICE endpoints each;
- conditions as upstream: serving = Pod Ready, terminating = deletionTimestamp
  set, ready = serving and not terminating (or publishNotReadyAddresses);
- nodeName, zone and, when the Service asks for topology-aware routing,
  hints.forZones = the endpoint's own zone.

Slice names are deterministic (service + port-set hash + index) and Pods are
ordered by name, so adding one Pod rewrites only the slice it lands in.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from ebpfsvc.lab import pods as podlib

MAX_ENDPOINTS_PER_SLICE = 100   # kube-controller-manager's --max-endpoints-per-slice default
LABEL_SERVICE_NAME = "kubernetes.io/service-name"
LABEL_MANAGED_BY = "endpointslice.kubernetes.io/managed-by"
MANAGED_BY = "endpointslice-controller.k8s.io"
# Either annotation (current and pre-1.27 spelling) or trafficDistribution turns hints on.
TOPOLOGY_ANNOTATIONS = {"service.kubernetes.io/topology-mode": "auto",
                        "service.kubernetes.io/topology-aware-hints": "auto"}


def generate(services: list[dict[str, Any]], pods: list[dict[str, Any]],
             node_zones: dict[str, str]) -> list[dict[str, Any]]:
    """All generated slices for `services`, given every Pod and each node's zone."""
    slices = []
    for svc in services:
        slices.extend(for_service(svc, pods, node_zones))
    return slices


def wants_hints(svc: dict[str, Any]) -> bool:
    annotations = (svc.get("metadata") or {}).get("annotations") or {}
    if any(str(annotations.get(k, "")).lower() == v for k, v in TOPOLOGY_ANNOTATIONS.items()):
        return True
    return (svc.get("spec") or {}).get("trafficDistribution") == "PreferClose"


def for_service(svc: dict[str, Any], pods: list[dict[str, Any]],
                node_zones: dict[str, str]) -> list[dict[str, Any]]:
    spec = svc.get("spec") or {}
    selector = spec.get("selector")
    if not selector or spec.get("type") == "ExternalName":
        return []
    meta = svc["metadata"]
    namespace = meta.get("namespace") or "default"
    publish_not_ready = bool(spec.get("publishNotReadyAddresses"))
    hints = wants_hints(svc)

    # Group endpoints by their resolved port set: one port list per slice.
    groups: dict[str, tuple[list[dict[str, Any]], list[dict[str, Any]]]] = {}
    selected = sorted((p for p in pods if _selectable(p, namespace, selector)), key=podlib.key)
    for pod in selected:
        ports = _endpoint_ports(spec.get("ports") or [], pod)
        group_key = _ports_hash(ports)
        groups.setdefault(group_key, (ports, []))[1].append(
            _endpoint(pod, node_zones, publish_not_ready, hints))

    slices = []
    for group_key, (ports, endpoints) in sorted(groups.items()):
        for index in range(0, len(endpoints), MAX_ENDPOINTS_PER_SLICE):
            chunk = endpoints[index:index + MAX_ENDPOINTS_PER_SLICE]
            slices.append(_slice(svc, f"{group_key}-{index // MAX_ENDPOINTS_PER_SLICE}", ports, chunk))
    if not slices:
        # Like upstream, a selector that matches nothing still yields one empty slice,
        # so consumers can tell "no endpoints" from "not synced yet".
        slices.append(_slice(svc, "empty", [], []))
    return slices


def _selectable(pod: dict[str, Any], namespace: str, selector: dict[str, str]) -> bool:
    pod_ns, _ = podlib.key(pod)
    status = pod.get("status") or {}
    return (pod_ns == namespace and podlib.matches(selector, pod) and bool(status.get("podIP"))
            and status.get("phase") not in ("Succeeded", "Failed"))


def _endpoint_ports(service_ports: list[dict[str, Any]], pod: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for sp in service_ports:
        protocol = sp.get("protocol") or "TCP"
        target = sp.get("targetPort", sp.get("port"))
        number = podlib.container_port(pod, target, protocol)
        if number is None:
            continue     # upstream skips a port this Pod cannot resolve, keeps the others
        port = {"name": sp.get("name") or "", "protocol": protocol, "port": number}
        if sp.get("appProtocol"):
            port["appProtocol"] = sp["appProtocol"]
        out.append(port)
    return out


def _ports_hash(ports: list[dict[str, Any]]) -> str:
    canonical = json.dumps(sorted(ports, key=lambda p: (p["name"], p["protocol"])), sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()[:5]


def _endpoint(pod: dict[str, Any], node_zones: dict[str, str], publish_not_ready: bool,
              hints: bool) -> dict[str, Any]:
    namespace, name = podlib.key(pod)
    serving = podlib.is_ready(pod)
    terminating = podlib.is_terminating(pod)
    node = (pod.get("spec") or {}).get("nodeName") or ""
    endpoint: dict[str, Any] = {
        "addresses": [pod["status"]["podIP"]],
        "conditions": {"ready": publish_not_ready or (serving and not terminating),
                       "serving": serving, "terminating": terminating},
        "nodeName": node,
        "targetRef": {"kind": "Pod", "namespace": namespace, "name": name,
                      "uid": (pod.get("metadata") or {}).get("uid", "")},
    }
    zone = node_zones.get(node)
    if zone:
        endpoint["zone"] = zone
        if hints:
            endpoint["hints"] = {"forZones": [{"name": zone}]}
    return endpoint


def _slice(svc: dict[str, Any], suffix: str, ports: list[dict[str, Any]],
           endpoints: list[dict[str, Any]]) -> dict[str, Any]:
    meta = svc["metadata"]
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": f"{meta['name']}-{suffix}",
            "namespace": meta.get("namespace") or "default",
            "labels": {LABEL_SERVICE_NAME: meta["name"], LABEL_MANAGED_BY: MANAGED_BY},
            "ownerReferences": [{"apiVersion": "v1", "kind": "Service", "name": meta["name"],
                                 "uid": meta.get("uid", ""), "controller": True}],
        },
        "addressType": "IPv4",
        "endpoints": endpoints,
        "ports": ports,
    }
