"""The lab file's clusterCIDR (ebpfsvc/lab/labfile.py): it must hold every node's pods and nothing
else of the lab; each violation is one line naming the field."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from ebpfsvc.lab import labfile

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "lab" / "cluster-cidr.yaml"


def _doc(**change) -> dict:
    doc = labfile.load(EXAMPLE).to_dict()
    doc.update(change)
    return doc


def test_the_example_has_a_cluster_cidr_holding_every_pod_cidr():
    spec = labfile.load(EXAMPLE)
    assert spec.cluster_cidr == ipaddress.IPv4Network("198.18.64.0/18")
    assert [n.name for n in spec.nodes] == ["node-1", "node-2", "node-3"]
    assert all(n.pod_cidr.subnet_of(spec.cluster_cidr) for n in spec.nodes)
    assert labfile.parse(spec.to_dict()) == spec, "the state dir's lab.yaml keeps it"


def test_no_cluster_cidr_by_default():
    spec = labfile.load()
    assert spec.cluster_cidr is None and "clusterCIDR" not in spec.to_dict()


@pytest.mark.parametrize("change, message", [
    ({"clusterCIDR": "198.18.0.0/16"}, "clusterCIDR: 198.18.0.0/16 overlaps the fabric 198.18.0.0/24"),
    ({"clusterCIDR": "198.19.0.0/16"}, r"clusterCIDR: 198.19.0.0/16 overlaps serviceCIDR \(198.19.0.0/16\)"),
    ({"clusterCIDR": "198.18.64.0/18", "serviceCIDR": "198.18.96.0/20"},
     r"clusterCIDR: 198.18.64.0/18 overlaps serviceCIDR \(198.18.96.0/20\)"),
    ({"clusterCIDR": "198.18.64.0/23"},
     r"nodes\[1\].podCIDR: 198.18.66.0/24 is outside clusterCIDR \(198.18.64.0/23\)"),
    ({"clusterCIDR": "10.0.0.0/8"}, "clusterCIDR: 10.0.0.0/8 is outside the lab range"),
    ({"clusterCIDR": "198.18.64.0/33"}, "clusterCIDR: '198.18.64.0/33' is not a CIDR"),
    ({"clusterCIDR": "2001:2:0:40::/58"}, "clusterCIDR: 2001:2:0:40::/58 is not IPv4"),
])
def test_cluster_cidr_errors_are_one_line_naming_the_field(change, message):
    with pytest.raises(labfile.LabFileError, match=message) as err:
        labfile.parse(_doc(**change))
    assert "\n" not in str(err.value)


def test_an_ipv6_only_lab_has_no_ipv4_cluster_cidr():
    doc = labfile.load(EXAMPLE.parent / "ipv6.yaml").to_dict()
    doc["clusterCIDR"] = "198.18.64.0/18"
    with pytest.raises(labfile.LabFileError, match="clusterCIDR: .* the lab's ipFamilies have no IPv4"):
        labfile.parse(doc)


def test_a_dual_stack_lab_checks_the_ipv4_pod_cidrs():
    doc = _doc(ipFamilies=["IPv4", "IPv6"])
    doc.pop("serviceCIDR")
    spec = labfile.parse(doc)
    assert spec.cluster_cidr == ipaddress.IPv4Network("198.18.64.0/18") and spec.has_ipv6
