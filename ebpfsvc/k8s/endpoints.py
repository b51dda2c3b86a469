"""v1 Endpoints -> the same EndpointSlice form, for selectorless Services with manual Endpoints.

Kubernetes mirrors a hand-written Endpoints object into EndpointSlices (the
EndpointSliceMirroring controller): one slice per subset, `addresses` ready,
`notReadyAddresses` not ready, and a slice per address family, since a slice holds one
(a subset's IPv6 addresses go to a second slice).  We do the same conversion ourselves, so manual
Endpoints work even from a manifest directory or a cluster with mirroring off,
and everything downstream sees one endpoint form.  When a Service has real
EndpointSlices too, those win (the tracker decides; see ClusterState).

On an API server the agent does not read Endpoints at all (sources/kube.py AGENT_KINDS): like
kube-proxy it sees the controller's slices only. This conversion serves manifest directories, so
it skips what the controller skips: Endpoints labelled `endpointslice.kubernetes.io/skip-mirror:
"true"` give no slice.
"""

from __future__ import annotations

from dataclasses import dataclass

from ebpfsvc.k8s.endpointslice import MAX_ENDPOINTS, MAX_PORTS, Endpoint, EndpointSlice, parse_endpoint_port
from ebpfsvc.k8s.fields import Fields, Invalid, parse_ip, read_meta

MAX_SUBSETS = 100
LABEL_SKIP_MIRROR = "endpointslice.kubernetes.io/skip-mirror"     # "true": not mirrored to slices


@dataclass(frozen=True)
class Endpoints:
    namespace: str
    name: str                                # = the Service's name
    slices: tuple[EndpointSlice, ...] = ()   # one per subset, as the mirroring controller makes them

    @property
    def key(self) -> tuple[str, str]:
        return (self.namespace, self.name)


def parse_endpoints(obj: dict) -> Endpoints:
    """Validate a v1 Endpoints; raises Invalid naming the first bad field."""
    top, meta = read_meta(obj, "Endpoints", ("v1",))
    slices = []
    total = 0
    for i, subset in enumerate(top.objects("subsets", MAX_SUBSETS)):
        ports = tuple(parse_endpoint_port(p) for p in subset.objects("ports", MAX_PORTS))
        endpoints = []
        for field, ready in (("addresses", True), ("notReadyAddresses", False)):
            for addr in subset.objects(field, MAX_ENDPOINTS):
                endpoints.append(_endpoint(addr, ready))
        total += len(endpoints)
        if total > MAX_ENDPOINTS:
            raise Invalid("subsets", f"hold more than {MAX_ENDPOINTS} addresses")
        v4 = tuple(ep for ep in endpoints if ep.address.version == 4)
        v6 = tuple(ep for ep in endpoints if ep.address.version == 6)
        if v4 or not v6:
            slices.append(EndpointSlice(meta.namespace, f"{meta.name}/subsets[{i}]", meta.name, "IPv4", ports, v4))
        if v6:
            slices.append(EndpointSlice(meta.namespace, f"{meta.name}/subsets[{i}]/IPv6", meta.name, "IPv6",
                                        ports, v6))
    if meta.labels.get(LABEL_SKIP_MIRROR) == "true":
        return Endpoints(meta.namespace, meta.name)      # validated all the same: a typo is still named
    return Endpoints(meta.namespace, meta.name, tuple(slices))


def _endpoint(addr: Fields, ready: bool) -> Endpoint:
    ip = addr.raw("ip")
    if ip is None:
        raise Invalid(f"{addr.path}.ip", "is required")
    # notReadyAddresses are neither ready nor serving: v1 Endpoints cannot say "terminating".
    # (No port: the merge gives each the port of each service port, endpointmerge.py.)
    return Endpoint(address=parse_ip(ip, f"{addr.path}.ip"), ready=ready, serving=ready,
                    terminating=False, node_name=addr.str("nodeName"), hostname=addr.str("hostname"))
