"""What the API server does to a Service on create/update, so agents see realistic objects.

Defaults (type, protocol, targetPort = port, traffic policies, session affinity),
a clusterIP from the service CIDR and nodePorts from 30000-32767 when the manifest
leaves them out.  Allocated values are kept on re-apply, as the API server keeps
them on update.  Allocation is deterministic (a hash of namespace/name, then the
next free value), so re-creating a lab gives the same addresses.
"""

from __future__ import annotations

import copy
import hashlib
import ipaddress
from typing import Any

from ebpfsvc.lab.labfile import LAB_RANGE, LabSpec

NODE_PORT_RANGE = range(30000, 32768)
LB_IP_ANNOTATION = "lab.ebpfsvc.io/lb-ip"


class ServiceError(ValueError):
    pass


def _hash(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")


def admit(svc: dict[str, Any], previous: dict[str, Any] | None, others: list[dict[str, Any]],
          spec: LabSpec) -> dict[str, Any]:
    """The Service as the API server would store it. `others`: every other stored Service."""
    svc = copy.deepcopy(svc)
    meta = svc.setdefault("metadata", {})
    meta.setdefault("namespace", "default")
    where = f"Service {meta['namespace']}/{meta.get('name')}"
    s = svc.setdefault("spec", {})
    s.setdefault("type", "ClusterIP")
    s.setdefault("sessionAffinity", "None")
    old = (previous or {}).get("spec") or {}
    if s["type"] != "ExternalName":
        s.setdefault("internalTrafficPolicy", "Cluster")
        _cluster_ip(s, old, others, spec, where)
    for port in s.get("ports") or []:
        port.setdefault("protocol", "TCP")
        port.setdefault("targetPort", port.get("port"))
    if s["type"] in ("NodePort", "LoadBalancer"):
        s.setdefault("externalTrafficPolicy", "Cluster")
        _node_ports(s, old, others, where)
    _check_lb_ip(svc, where)
    return svc


def _cluster_ip(s: dict[str, Any], old: dict[str, Any], others: list[dict[str, Any]],
                spec: LabSpec, where: str) -> None:
    taken = {(o.get("spec") or {}).get("clusterIP") for o in others}
    wanted = s.get("clusterIP") or old.get("clusterIP")
    if wanted == "None":               # headless
        s["clusterIP"] = "None"
        s["clusterIPs"] = ["None"]
        return
    if wanted:
        try:
            ip = ipaddress.IPv4Address(wanted)
        except ValueError:
            raise ServiceError(f"{where}: spec.clusterIP: {wanted!r} is not an IPv4 address") from None
        if ip not in spec.service_cidr:
            raise ServiceError(f"{where}: spec.clusterIP: {ip} is not in the service CIDR {spec.service_cidr}")
        if str(ip) in taken:
            raise ServiceError(f"{where}: spec.clusterIP: {ip} is already allocated")
    else:
        hosts = spec.service_cidr.num_addresses - 2
        start = _hash(where) % hosts
        for step in range(hosts):
            ip = spec.service_cidr.network_address + 1 + (start + step) % hosts
            if str(ip) not in taken:
                break
        else:
            raise ServiceError(f"{where}: the service CIDR {spec.service_cidr} is full")
    s["clusterIP"] = str(ip)
    s["clusterIPs"] = [str(ip)]


def _node_ports(s: dict[str, Any], old: dict[str, Any], others: list[dict[str, Any]], where: str) -> None:
    taken = {p.get("nodePort") for o in others for p in (o.get("spec") or {}).get("ports") or []}
    kept = {(p.get("name"), p.get("port"), p.get("protocol", "TCP")): p.get("nodePort")
            for p in old.get("ports") or []}
    for i, port in enumerate(s.get("ports") or []):
        node_port = port.get("nodePort") or kept.get((port.get("name"), port.get("port"), port["protocol"]))
        if node_port:
            if node_port not in NODE_PORT_RANGE:
                raise ServiceError(f"{where}: spec.ports[{i}].nodePort: {node_port} is outside 30000-32767")
            if node_port in taken:
                raise ServiceError(f"{where}: spec.ports[{i}].nodePort: {node_port} is already allocated")
        else:
            size = len(NODE_PORT_RANGE)
            start = _hash(f"{where}/{i}") % size
            node_port = next(NODE_PORT_RANGE.start + (start + k) % size for k in range(size)
                             if NODE_PORT_RANGE.start + (start + k) % size not in taken)
        port["nodePort"] = node_port
        taken.add(node_port)


def _check_lb_ip(svc: dict[str, Any], where: str) -> None:
    value = ((svc.get("metadata") or {}).get("annotations") or {}).get(LB_IP_ANNOTATION)
    if value is None:
        return
    try:
        ip = ipaddress.IPv4Address(value)
    except ValueError:
        raise ServiceError(f"{where}: annotation {LB_IP_ANNOTATION}: {value!r} is not an IPv4 address") from None
    if ip not in LAB_RANGE:
        raise ServiceError(f"{where}: annotation {LB_IP_ANNOTATION}: {ip} is outside the lab range")


def with_load_balancer_status(svc: dict[str, Any]) -> dict[str, Any]:
    """The Service as a cloud controller would leave it: a LoadBalancer gets its lb-ip as ingress."""
    lb_ip = ((svc.get("metadata") or {}).get("annotations") or {}).get(LB_IP_ANNOTATION)
    if (svc.get("spec") or {}).get("type") != "LoadBalancer" or not lb_ip:
        return svc
    svc = copy.deepcopy(svc)
    svc.setdefault("status", {})["loadBalancer"] = {"ingress": [{"ip": lb_ip}]}
    return svc
