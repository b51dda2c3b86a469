"""Manual v1 Endpoints reach the agents the way they reach kube-proxy: as the EndpointSlices the
real EndpointSliceMirroring controller writes from them (issue 17 item 8). kube-proxy reads
EndpointSlices only, and so does the agent on an API server: an Endpoints object with more than
1000 addresses is served as the controller's truncated slice (1000 per subset), not in full and
not refused. (`endpointslice.kubernetes.io/skip-mirror`: tests/e2e/test_oracle.py, against
kube-proxy.)"""

from __future__ import annotations

import ipaddress

import pytest

from ebpfsvc.lab import Lab

from .helpers import service, wait_for, wait_programmed

pytestmark = pytest.mark.root

ADDRESSES = 1001
FIRST = ipaddress.IPv4Address("198.18.64.1")      # an unused part of the lab's plan: nothing answers


def test_endpoints_over_1000_addresses_serve_the_mirrored_1000(unique_prefix):
    addresses = [str(FIRST + i) for i in range(ADDRESSES)]
    endpoints = {"apiVersion": "v1", "kind": "Endpoints", "metadata": {"name": "mm-big"},
                 "subsets": [{"addresses": [{"ip": a} for a in addresses], "ports": [{"port": 8080}]}]}
    with Lab.up(prefix=unique_prefix, agents=True) as lab:
        lab.apply([service("mm-big", [{"port": 80, "targetPort": 8080}]), endpoints])

        def mirrored() -> list[str]:
            return [a for sl in lab.endpoint_slices("mm-big") for ep in sl.get("endpoints") or []
                    for a in ep["addresses"]]

        wait_for(lambda: len(mirrored()) == 1000, what="the mirroring controller's 1000 endpoints of mm-big")
        assert set(mirrored()) < set(addresses)
        stored = lab.api.request("GET", "/api/v1/namespaces/default/endpoints/mm-big")
        assert len(stored["subsets"][0]["addresses"]) == ADDRESSES
        wait_programmed(lab, "mm-big", 80, backends=1000)
