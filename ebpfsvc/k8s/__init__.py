"""Kubernetes API objects as validated, frozen dataclasses (NamedTuples per endpoint): only what the
data plane uses.

    fields.py         path-aware field reading, Invalid / Problem (every error names its field)
    service.py        v1 Service
    endpointslice.py  discovery.k8s.io/v1 EndpointSlice
    endpoints.py      v1 Endpoints, converted to the EndpointSlice form (manual Endpoints)
    node.py           v1 Node (zone, addresses)
    servicecidr.py    networking.k8s.io/v1 ServiceCIDR (the ranges node clients are routed for)
    endpointmerge.py  all slices of a Service -> endpoints per ServicePortName (endpointslicecache)
    topology.py       which endpoints this node uses (conditions, traffic policy, zone hints)
"""

from ebpfsvc.k8s.endpointmerge import merge_endpoint_slices
from ebpfsvc.k8s.endpoints import Endpoints, parse_endpoints
from ebpfsvc.k8s.endpointslice import Endpoint, EndpointPort, EndpointSlice, parse_endpoint_slice
from ebpfsvc.k8s.fields import Invalid, Problem
from ebpfsvc.k8s.node import Node, parse_node
from ebpfsvc.k8s.service import Service, ServicePort, ServiceType, TrafficPolicy, parse_service
from ebpfsvc.k8s.servicecidr import ServiceCIDR, parse_service_cidr

__all__ = [
    "Endpoint", "EndpointPort", "EndpointSlice", "Endpoints", "Invalid", "Node", "Problem", "Service",
    "ServiceCIDR", "ServicePort", "ServiceType", "TrafficPolicy", "merge_endpoint_slices",
    "parse_endpoint_slice", "parse_endpoints", "parse_node", "parse_service",
    "parse_service_cidr",
]
