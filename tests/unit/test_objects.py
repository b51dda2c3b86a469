"""Parsing and validation of Service, EndpointSlice, Endpoints and Node (ebpfsvc.k8s).

Valid objects come from the seed examples (examples/); invalid ones are tables of
one-field mutations, each with the exact field path and message we promise.
"""

from __future__ import annotations

import copy
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from pathlib import Path

import pytest
import yaml

from ebpfsvc.config import NodeConfig
from ebpfsvc.k8s import (Invalid, ServiceType, TrafficPolicy, parse_endpoint_slice, parse_endpoints,
                         parse_node, parse_service)
from ebpfsvc.k8s.schema import unknown_fields
from ebpfsvc.k8s.servicecidr import cluster_ip_families, parse_service_cidr
from ebpfsvc.lbmodel import Algorithm, Protocol

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
INVALID = Path(__file__).parent / "manifests" / "invalid"
CONFIG = NodeConfig("node-1")


def example(file: str, kind: str = "Service", index: int = 0) -> dict:
    docs = [d for d in yaml.safe_load_all((EXAMPLES / file).read_text()) if d and d["kind"] == kind]
    return docs[index]


def service(**spec) -> dict:
    base = {"clusterIP": "198.19.0.10", "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}
    base.update(spec)
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": "default"},
            "spec": base}


def error_of(parse, obj) -> str:
    with pytest.raises(Invalid) as err:
        parse(obj)
    return str(err.value)


# --- Service: the seed examples --------------------------------------------------------------

def test_basic_service_defaults():
    svc = parse_service(example("01-my-service.yaml"), CONFIG)
    assert svc.key == ("default", "my-service")       # namespace defaulted like kubectl
    assert svc.type is ServiceType.CLUSTER_IP
    assert svc.cluster_ip == IPv4Address("198.19.0.10")
    assert svc.has_selector
    (port,) = svc.ports
    assert (port.name, port.protocol, port.port, port.target_port, port.node_port) == ("", Protocol.TCP, 80, 9376, 0)
    assert svc.affinity_timeout == 0
    assert svc.external_traffic_policy is svc.internal_traffic_policy is TrafficPolicy.CLUSTER


def test_named_target_port_is_kept_as_a_name():
    (port,) = parse_service(example("02-nginx-service.yaml"), CONFIG).ports
    assert port.name == "name-of-service-port"
    assert port.target_port == "http-web-svc"


def test_target_port_defaults_to_port():
    (port,) = parse_service(example("20-mwish-bot-nodeport.yaml"), CONFIG).ports
    assert (port.port, port.target_port, port.node_port) == (6379, 6379, 31234)


def test_app_protocol_is_carried():
    (port,) = parse_service(example("03-app-protocol.yaml"), CONFIG).ports
    assert port.app_protocol == "HTTP"


def test_load_balancer_with_local_policy_and_status():
    svc = parse_service(example("07-service-python-loadbalancer.yaml"), CONFIG)
    assert svc.type is ServiceType.LOAD_BALANCER
    assert svc.external_traffic_policy is TrafficPolicy.LOCAL
    assert svc.load_balancer_ips == (IPv4Address("198.18.200.10"),)
    assert svc.ports[0].node_port == 30081


def test_external_ips():
    svc = parse_service(example("10-my-service-external-ips.yaml"), CONFIG)
    assert svc.external_ips == (IPv4Address("198.18.200.32"),)


def test_headless_and_external_name_are_parsed_but_skipped():
    headless = parse_service(example("11-mysql-balance-svc-headless.yaml"), CONFIG)
    assert headless.key == ("mysql-space", "mysql-balance-svc")
    assert headless.headless and headless.cluster_ip is None
    assert headless.skip_reason(CONFIG) == "headless"
    external_name = parse_service(example("09-service-python-externalname.yaml"), CONFIG)
    assert external_name.type is ServiceType.EXTERNAL_NAME
    assert "ExternalName" in external_name.skip_reason(CONFIG)


@pytest.mark.parametrize("file,timeout", [
    ("19-mwish-bot-session-affinity.yaml", 10800),     # default timeout
    ("22-myapp-session-affinity.yaml", 10800),         # explicit
])
def test_session_affinity(file, timeout):
    assert parse_service(example(file), CONFIG).affinity_timeout == timeout


def test_every_example_service_is_valid():
    count = 0
    for path in sorted(EXAMPLES.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc["kind"] == "Namespace":      # for kubectl apply; not a data-plane object
                continue
            parse = {"Service": lambda d: parse_service(d, CONFIG), "Endpoints": parse_endpoints,
                     "EndpointSlice": parse_endpoint_slice}[doc["kind"]]
            parse(doc)
            assert unknown_fields(doc["kind"], doc) == [], path.name
            count += 1
    assert count >= 25


# --- Service: labels and annotations -----------------------------------------------------------

@pytest.mark.parametrize("annotations,expected", [
    ({}, False),
    ({"service.kubernetes.io/topology-mode": "Auto"}, True),
    ({"service.kubernetes.io/topology-mode": "auto"}, True),
    ({"service.kubernetes.io/topology-aware-hints": "auto"}, True),
    ({"service.kubernetes.io/topology-mode": "Disabled", "service.kubernetes.io/topology-aware-hints": "auto"}, False),
    ({"service.kubernetes.io/topology-mode": "", "service.kubernetes.io/topology-aware-hints": "Auto"}, True),
    ({"service.kubernetes.io/topology-aware-hints": "PreferZone"}, False),
])
def test_topology_annotations(annotations, expected):
    obj = service()
    obj["metadata"]["annotations"] = annotations
    assert parse_service(obj, CONFIG).topology_aware is expected


def test_traffic_distribution_prefer_close_means_hints():
    assert parse_service(service(trafficDistribution="PreferClose"), CONFIG).topology_aware


@pytest.mark.parametrize("value,expected", [("maglev", Algorithm.MAGLEV), ("Random", Algorithm.RANDOM)])
def test_algorithm_annotation(value, expected):
    obj = service()
    obj["metadata"]["annotations"] = {"ebpfsvc.io/lb-algorithm": value}
    assert parse_service(obj, CONFIG).algorithm is expected


def test_proxy_name_and_headless_labels():
    obj = service()
    obj["metadata"]["labels"] = {"service.kubernetes.io/service-proxy-name": "other-proxy"}
    svc = parse_service(obj, CONFIG)
    assert "service-proxy-name 'other-proxy'" in svc.skip_reason(CONFIG)
    assert svc.skip_reason(NodeConfig("n", proxy_name="other-proxy")) == ""
    assert parse_service(service(), CONFIG).skip_reason(NodeConfig("n", proxy_name="ebpfsvc")) != ""
    obj["metadata"]["labels"] = {"service.kubernetes.io/headless": ""}
    assert parse_service(obj, CONFIG).skip_reason(CONFIG) == "headless"


def test_service_proxy_name_label_with_an_empty_value_is_not_ours():
    """kube-proxy v1.37.2 watches Services with the label absent (selection.DoesNotExist): present
    with an empty value is another proxy's Service, for --proxy-name "" and for any name."""
    obj = service()
    obj["metadata"]["labels"] = {"service.kubernetes.io/service-proxy-name": ""}
    svc = parse_service(obj, CONFIG)
    assert svc.skip_reason(NodeConfig("n")) == "service-proxy-name '': not ours (unlabelled Services only)"
    assert svc.skip_reason(NodeConfig("n", proxy_name="ebpfsvc")) == \
        "service-proxy-name '': not ours (--proxy-name 'ebpfsvc')"
    assert parse_service(service(), CONFIG).skip_reason(NodeConfig("n")) == ""


def test_source_ranges_from_field_or_legacy_annotation():
    svc = parse_service(service(type="LoadBalancer", loadBalancerSourceRanges=["198.18.0.0/24", "203.0.113.7/32"],
                                ports=[{"port": 80, "nodePort": 30001}]), CONFIG)
    assert svc.source_ranges == (IPv4Network("198.18.0.0/24"), IPv4Network("203.0.113.7/32"))
    obj = service(type="LoadBalancer", ports=[{"port": 80, "nodePort": 30001}])
    obj["metadata"]["annotations"] = {"service.beta.kubernetes.io/load-balancer-source-ranges": "198.18.0.0/24, 10.1.2.3/8"}
    assert parse_service(obj, CONFIG).source_ranges == (IPv4Network("198.18.0.0/24"), IPv4Network("10.0.0.0/8"))


def test_legacy_source_ranges_annotation_ignored_as_kube_proxy_with_the_option():
    """--no-legacy-source-ranges-annotation: the annotation fences nothing (kube-proxy reads the
    field only), and a bad value in it is no error; the field still counts."""
    kube_proxy_like = NodeConfig("node-1", legacy_source_ranges=False)
    obj = service(type="LoadBalancer", ports=[{"port": 80, "nodePort": 30001}])
    obj["metadata"]["annotations"] = {"service.beta.kubernetes.io/load-balancer-source-ranges": "198.18.0.0/24"}
    assert parse_service(obj, kube_proxy_like).source_ranges == ()
    obj["metadata"]["annotations"]["service.beta.kubernetes.io/load-balancer-source-ranges"] = "not-a-cidr"
    assert parse_service(obj, kube_proxy_like).source_ranges == ()
    with pytest.raises(Invalid, match="load-balancer-source-ranges"):
        parse_service(obj, CONFIG)
    obj["spec"]["loadBalancerSourceRanges"] = ["198.18.1.0/24"]
    assert parse_service(obj, kube_proxy_like).source_ranges == (IPv4Network("198.18.1.0/24"),)


def test_load_balancer_ingress_proxy_mode_and_hostname_are_not_captured():
    obj = service(type="LoadBalancer", ports=[{"port": 80, "nodePort": 30001}])
    obj["status"] = {"loadBalancer": {"ingress": [{"ip": "198.18.200.1", "ipMode": "Proxy"},
                                                  {"hostname": "lb.example.com"},
                                                  {"ip": "198.18.200.2", "ipMode": "VIP"}]}}
    assert parse_service(obj, CONFIG).load_balancer_ips == (IPv4Address("198.18.200.2"),)


def test_ipv6_cluster_ip_in_an_ipv4_only_cluster_is_refused():
    # Issue 14: IPv6 Services are served now, where the node serves IPv6 (--ip-families); in an
    # IPv4-only cluster (the default) the API server could not have allocated one.
    assert error_of(lambda o: parse_service(o, CONFIG), service(clusterIP="fd00::10")) == (
        "spec.clusterIP: fd00::10 is an IPv6 clusterIP, but this cluster serves IPv4 only (--ip-families)")


# --- Service: dual-stack (issue 14) ----------------------------------------------------------

DUAL = NodeConfig("node-1", ip_families=("IPv4", "IPv6"))
V6_ONLY = NodeConfig("node-1", ip_families=("IPv6",))
V6_IP = "2001:2:0:ff::10"


def test_dual_stack_service_keeps_both_families_primary_first():
    obj = service(type="LoadBalancer", ipFamilyPolicy="RequireDualStack", ipFamilies=["IPv4", "IPv6"],
                  clusterIPs=["198.19.0.10", V6_IP], ports=[{"port": 80, "nodePort": 30001}],
                  externalIPs=["198.18.100.1", "2001:2:0:100::1"],
                  loadBalancerSourceRanges=["198.18.50.0/24", "2001:2:0:50::/64"])
    obj["status"] = {"loadBalancer": {"ingress": [{"ip": "198.18.200.1"}, {"ip": "2001:2:0:200::1"}]}}
    svc = parse_service(obj, DUAL)
    assert svc.cluster_ip == IPv4Address("198.19.0.10")
    assert svc.cluster_ips == (IPv4Address("198.19.0.10"), IPv6Address(V6_IP))
    assert svc.ip_families == ("IPv4", "IPv6") and svc.ip_family_policy.value == "RequireDualStack"
    assert svc.external_ips == (IPv4Address("198.18.100.1"), IPv6Address("2001:2:0:100::1"))
    assert svc.load_balancer_ips == (IPv4Address("198.18.200.1"), IPv6Address("2001:2:0:200::1"))
    assert svc.source_ranges == (IPv4Network("198.18.50.0/24"), IPv6Network("2001:2:0:50::/64"))
    assert svc.skip_reason(DUAL) == ""


def test_ipv6_primary_and_defaults_of_the_family_policy():
    # IPv6 first: clusterIP is clusterIPs[0]; two clusterIPs and no policy: RequireDualStack, as the
    # API server defaults it; one clusterIP and no policy: SingleStack.
    svc = parse_service(service(clusterIP=V6_IP, clusterIPs=[V6_IP, "198.19.0.10"]), DUAL)
    assert svc.cluster_ip == IPv6Address(V6_IP) and svc.ip_families == ("IPv6", "IPv4")
    assert svc.ip_family_policy.value == "RequireDualStack"
    single = parse_service(service(clusterIP=V6_IP), V6_ONLY)
    assert single.cluster_ips == (IPv6Address(V6_IP),) and single.ip_family_policy.value == "SingleStack"
    # PreferDualStack in a single-stack cluster: the API server allocated the one family it has.
    prefer = parse_service(service(ipFamilyPolicy="PreferDualStack", ipFamilies=["IPv4", "IPv6"]), CONFIG)
    assert prefer.cluster_ips == (IPv4Address("198.19.0.10"),)
    # Only clusterIPs (no clusterIP): the first is the primary.
    only = parse_service({**service(), "spec": {"clusterIPs": ["198.19.0.10", V6_IP], "ports": [{"port": 80}]}},
                         DUAL)
    assert only.cluster_ips == (IPv4Address("198.19.0.10"), IPv6Address(V6_IP))


INVALID_DUAL_STACK = [
    ("same family twice", DUAL, {"ipFamilyPolicy": "RequireDualStack", "clusterIPs": ["198.19.0.10", "198.19.0.11"]},
     "spec.clusterIPs[1]: 198.19.0.11 is of the same family as spec.clusterIPs[0] (IPv4): at most one clusterIP "
     "per family"),
    ("more than two", DUAL, {"clusterIPs": ["198.19.0.10", V6_IP, "198.19.0.12"]},
     "spec.clusterIPs: has 3 items, more than the limit of 2"),
    ("clusterIPs[0] is not clusterIP", DUAL, {"clusterIPs": ["198.19.0.11", V6_IP]},
     "spec.clusterIPs[0]: 198.19.0.11 must equal spec.clusterIP 198.19.0.10"),
    ("mismatch with ipFamilies", DUAL, {"ipFamilyPolicy": "PreferDualStack", "ipFamilies": ["IPv6", "IPv4"],
                                        "clusterIPs": ["198.19.0.10", V6_IP]},
     "spec.clusterIP: 198.19.0.10 is IPv4, but spec.ipFamilies[0] is IPv6"),
    ("bad second address", DUAL, {"clusterIPs": ["198.19.0.10", "2001:2::zz"]},
     "spec.clusterIPs[1]: '2001:2::zz' is not an IP address"),
    ("SingleStack with two", DUAL, {"ipFamilyPolicy": "SingleStack", "clusterIPs": ["198.19.0.10", V6_IP]},
     "spec.ipFamilyPolicy: SingleStack, but spec.clusterIPs has two; use PreferDualStack or RequireDualStack"),
    ("RequireDualStack in an IPv4-only cluster", CONFIG, {"ipFamilyPolicy": "RequireDualStack"},
     "spec.ipFamilyPolicy: RequireDualStack, but this cluster serves IPv4 only (--ip-families)"),
    ("RequireDualStack with one clusterIP", DUAL, {"ipFamilyPolicy": "RequireDualStack"},
     "spec.clusterIPs: RequireDualStack needs a clusterIP of each family"),
    ("IPv4 clusterIP in an IPv6-only cluster", V6_ONLY, {},
     "spec.clusterIP: 198.19.0.10 is an IPv4 clusterIP, but this cluster serves IPv6 only (--ip-families)"),
    ("IPv6 second clusterIP in an IPv4-only cluster", CONFIG,
     {"ipFamilyPolicy": "PreferDualStack", "clusterIPs": ["198.19.0.10", V6_IP]},
     f"spec.clusterIPs[1]: {V6_IP} is an IPv6 clusterIP, but this cluster serves IPv4 only (--ip-families)"),
    ("primary family not of the cluster", CONFIG, {"ipFamilies": ["IPv6"]},
     "spec.ipFamilies[0]: IPv6 is not a family of this cluster (IPv4: --ip-families)"),
    ("family twice", DUAL, {"ipFamilies": ["IPv4", "IPv4"]},
     "spec.ipFamilies[1]: IPv4 appears twice: at most one of each family"),
    ("unknown family", DUAL, {"ipFamilies": ["IPv5"]}, "spec.ipFamilies[0]: 'IPv5' is not one of IPv4, IPv6"),
    ("unknown policy", DUAL, {"ipFamilyPolicy": "DualStack"}, "spec.ipFamilyPolicy: 'DualStack' is not one of"),
    ("headless with a second clusterIP", DUAL, {"clusterIP": "None", "clusterIPs": ["None", V6_IP]},
     "spec.clusterIPs[1]: must not be set: a headless Service (clusterIP None) has no other clusterIP"),
    ("loopback IPv6 clusterIP", DUAL, {"clusterIPs": ["198.19.0.10", "::1"]},
     "spec.clusterIPs[1]: ::1 cannot be a clusterIP"),
]


@pytest.mark.parametrize("config,spec,message", [c[1:] for c in INVALID_DUAL_STACK],
                         ids=[c[0] for c in INVALID_DUAL_STACK])
def test_invalid_dual_stack_service_is_one_line_naming_the_field(config, spec, message):
    assert error_of(lambda o: parse_service(o, config), service(**spec)).startswith(message)


def test_irrelevant_fields_do_not_change_the_parsed_service():
    a = service()
    b = copy.deepcopy(a)
    b["metadata"].update(resourceVersion="42", uid="x", annotations={"kubectl.kubernetes.io/last-applied": "{}"})
    b["spec"]["selector"] = {"app": "web"}
    a["spec"]["selector"] = {"app": "web", "tier": "front"}
    assert parse_service(a, CONFIG) == parse_service(b, CONFIG)


# --- Service: validation errors ---------------------------------------------------------------

def _ports(*ports):
    return {"ports": list(ports)}


INVALID_SERVICES = [
    ("port out of range",
     _ports({"name": "a", "port": 80}, {"name": "b", "port": 70000}),
     "spec.ports[1].port: 70000 is out of range 1-65535"),
    ("port is a string", _ports({"port": "80"}), "spec.ports[0].port: must be an integer, not '80'"),
    ("port is a bool", _ports({"port": True}), "spec.ports[0].port: must be an integer, not True"),
    ("port missing", _ports({"name": "a"}), "spec.ports[0].port: is required"),
    ("unknown protocol", _ports({"port": 80, "protocol": "http"}),
     "spec.ports[0].protocol: 'http' is not one of TCP, UDP, SCTP"),
    ("duplicate port/protocol", _ports({"name": "a", "port": 80}, {"name": "b", "port": 80}),
     "spec.ports[1]: port 80/TCP duplicates spec.ports[0]"),
    ("duplicate port name", _ports({"name": "a", "port": 80}, {"name": "a", "port": 81}),
     "spec.ports[1].name: 'a' duplicates spec.ports[0]"),
    ("unnamed port among several", _ports({"name": "a", "port": 80}, {"port": 81}),
     "spec.ports[1].name: is required when a Service has more than one port"),
    ("too many ports", _ports(*({"name": f"p{i}", "port": i + 1} for i in range(101))),
     "spec.ports: has 101 items, more than the limit of 100"),
    ("no ports", {"ports": []}, "spec.ports: is required"),
    ("target port out of range", _ports({"port": 80, "targetPort": 65536}),
     "spec.ports[0].targetPort: 65536 is out of range 1-65535"),
    ("target port name too long", _ports({"port": 80, "targetPort": "a-very-long-port-name"}),
     "spec.ports[0].targetPort: 'a-very-long-port-name' is not a valid port name"),
    ("clusterIP loopback", {"clusterIP": "127.0.0.10"},
     "spec.clusterIP: 127.0.0.10 cannot be a clusterIP (loopback, link-local, multicast or reserved)"),
    ("clusterIP multicast", {"clusterIP": "224.0.0.10"}, "spec.clusterIP: 224.0.0.10 cannot be a clusterIP"),
    ("clusterIP unspecified", {"clusterIP": "0.0.0.0"}, "spec.clusterIP: 0.0.0.0 cannot be a clusterIP"),
    ("clusterIP not an address", {"clusterIP": "198.19.0.300"}, "spec.clusterIP: '198.19.0.300' is not an IP address"),
    ("clusterIP missing", {"clusterIP": None}, "spec.clusterIP: is required"),
    ("unknown type", {"type": "Internal"}, "spec.type: 'Internal' is not one of ClusterIP, NodePort"),
    ("nodePort outside the range", {"type": "NodePort", "ports": [{"port": 80, "nodePort": 8080}]},
     "spec.ports[0].nodePort: 8080 is out of range 30000-32767"),
    ("nodePort missing on NodePort", {"type": "NodePort", "ports": [{"port": 80}]},
     "spec.ports[0].nodePort: is required for type NodePort"),
    ("nodePort on ClusterIP", {"ports": [{"port": 80, "nodePort": 30001}]},
     "spec.ports[0].nodePort: is only allowed for type NodePort or LoadBalancer"),
    ("externalIP not an address", {"externalIPs": ["198.18.200.1", "nope"]},
     "spec.externalIPs[1]: 'nope' is not an IP address"),
    ("bad source range", {"loadBalancerSourceRanges": ["198.18.0.0/33"]},
     "spec.loadBalancerSourceRanges[0]: '198.18.0.0/33' is not a CIDR"),
    ("unknown session affinity", {"sessionAffinity": "Cookie"},
     "spec.sessionAffinity: 'Cookie' is not one of None, ClientIP"),
    ("affinity timeout 0", {"sessionAffinity": "ClientIP", "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 0}}},
     "spec.sessionAffinityConfig.clientIP.timeoutSeconds: 0 is out of range 1-86400"),
    ("affinity timeout too long",
     {"sessionAffinity": "ClientIP", "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 86401}}},
     "spec.sessionAffinityConfig.clientIP.timeoutSeconds: 86401 is out of range 1-86400"),
    ("unknown traffic policy", {"externalTrafficPolicy": "OnlyLocal"},
     "spec.externalTrafficPolicy: 'OnlyLocal' is not one of Cluster, Local"),
    ("publishNotReadyAddresses not a bool", {"publishNotReadyAddresses": "yes"},
     "spec.publishNotReadyAddresses: must be true or false, not 'yes'"),
    ("ports not a list", {"ports": {"port": 80}}, "spec.ports: must be a list"),
    ("ExternalName without a name", {"type": "ExternalName"}, "spec.externalName: is required for type ExternalName"),
]


# Names follow Kubernetes' rules (k8s/names.py): what the API server would refuse stops here, so it
# can never reach a map key, a log line or a metric label the rest of the agent relies on.
INVALID_NAMES = [
    ("colon in the Service name", {"name": "h-coll:x"},
     "metadata.name: 'h-coll:x' is not a DNS-1035 label"),
    ("slash in the Service name", {"name": "a/b"}, "metadata.name: 'a/b' is not a DNS-1035 label"),
    ("Service name starting with a digit", {"name": "1web"}, "metadata.name: '1web' is not a DNS-1035 label"),
    ("upper case", {"name": "Web"}, "metadata.name: 'Web' is not a DNS-1035 label"),
    ("Service name too long", {"name": "a" * 64}, "metadata.name: '" + "a" * 64 + "' is longer than 63"),
    ("lone surrogate in the name", {"name": "web\ud800"},
     "metadata.name: 'web\\ud800' is not a DNS-1035 label"),
    ("namespace with a dot", {"namespace": "a.b"}, "metadata.namespace: 'a.b' is not a DNS-1123 label"),
    ("creationTimestamp not a time", {"creationTimestamp": "yesterday"},
     "metadata.creationTimestamp: 'yesterday' is not an RFC 3339 time"),
    ("creationTimestamp without a zone", {"creationTimestamp": "2026-01-01T00:00:00"},
     "metadata.creationTimestamp: '2026-01-01T00:00:00' is not an RFC 3339 time"),
]


@pytest.mark.parametrize("meta,message", [c[1:] for c in INVALID_NAMES], ids=[c[0] for c in INVALID_NAMES])
def test_invalid_service_name(meta, message):
    obj = service()
    obj["metadata"].update(meta)
    assert message in error_of(lambda o: parse_service(o, CONFIG), obj)


@pytest.mark.parametrize("name,message", [
    ("x:y", "spec.ports[0].name: 'x:y' is not a DNS-1123 label"),
    ("HTTP", "spec.ports[0].name: 'HTTP' is not a DNS-1123 label"),
    ("-a", "spec.ports[0].name: '-a' is not a DNS-1123 label"),
    ("p" * 64, "spec.ports[0].name: '" + "p" * 64 + "' is longer than 63 characters"),
])
def test_invalid_service_port_name(name, message):
    assert message in error_of(lambda o: parse_service(o, CONFIG), service(ports=[{"name": name, "port": 80}]))


def test_invalid_endpoint_slice_names():
    obj = example("13-example-endpointslice.yaml", "EndpointSlice")
    bad = copy.deepcopy(obj)
    bad["metadata"]["name"] = "Slice_1"
    assert "metadata.name: 'Slice_1' is not a DNS-1123 subdomain" in error_of(parse_endpoint_slice, bad)
    bad = copy.deepcopy(obj)
    bad["ports"][0]["name"] = "a/b"
    assert "ports[0].name: 'a/b' is not a DNS-1123 label" in error_of(parse_endpoint_slice, bad)
    bad = copy.deepcopy(obj)
    bad["metadata"]["labels"]["kubernetes.io/service-name"] = "-web"
    assert "metadata.labels[kubernetes.io/service-name]: '-web' is not a label value" \
        in error_of(parse_endpoint_slice, bad)
    dotted = copy.deepcopy(obj)
    dotted["metadata"]["name"] = "web.abc12"           # subdomains may have dots
    assert parse_endpoint_slice(dotted).name == "web.abc12"


@pytest.mark.parametrize("spec,message", [c[1:] for c in INVALID_SERVICES], ids=[c[0] for c in INVALID_SERVICES])
def test_invalid_service(spec, message):
    assert message in error_of(lambda o: parse_service(o, CONFIG), service(**spec))


def test_invalid_algorithm_annotation_names_the_annotation():
    obj = service()
    obj["metadata"]["annotations"] = {"ebpfsvc.io/lb-algorithm": "round-robin"}
    assert error_of(lambda o: parse_service(o, CONFIG), obj) == \
        "metadata.annotations[ebpfsvc.io/lb-algorithm]: 'round-robin' is not one of maglev|random"


def test_invalid_kind_version_and_name():
    obj = service()
    obj["apiVersion"] = "v2"
    assert "apiVersion: 'v2' is not supported for Service" in error_of(lambda o: parse_service(o, CONFIG), obj)
    obj = service()
    del obj["metadata"]["name"]
    assert error_of(lambda o: parse_service(o, CONFIG), obj) == "metadata.name: is required"


def test_no_service_cidr_serves_every_valid_cluster_ip():
    """kube-proxy has no service CIDR flag, and a cluster can have several ServiceCIDRs: with none
    configured, a clusterIP from any range is served (issue 10: every Service was refused)."""
    for ip in ("10.96.0.10", "172.20.3.4", "198.19.0.10"):
        assert parse_service(service(clusterIP=ip), CONFIG).cluster_ip == IPv4Address(ip)


def test_node_config_limits_apply():
    narrow = NodeConfig("n", service_cidr="198.19.5.0/24", nodeport_range=(31000, 31999))
    assert "outside the service CIDR 198.19.5.0/24" in error_of(lambda o: parse_service(o, narrow), service())
    obj = service(clusterIP="198.19.5.1", type="NodePort", ports=[{"port": 80, "nodePort": 30080}])
    assert "30080 is out of range 31000-31999" in error_of(lambda o: parse_service(o, narrow), obj)


# --- the seeds' own invalid examples ----------------------------------------------------------

@pytest.mark.parametrize("file,message", [
    ("seed001-protocol-http.yaml", "spec.ports[0].protocol: 'http' is not one of TCP, UDP, SCTP"),
    ("seed003-port-typo.yaml", "spec.ports: is required"),
    ("seed003-template.yaml", "metadata.labels: must be an object"),
])
def test_seed_originals_are_rejected_by_the_parser(file, message):
    doc = yaml.safe_load((INVALID / file).read_text())
    assert message in error_of(lambda o: parse_service(o, CONFIG), doc)


@pytest.mark.parametrize("file,fields", [
    ("seed003-port-typo.yaml", ["spec.port"]),
    ("seed003-affinity-shape.yaml", ["spec.sessionAffinityConfig.ClientIP"]),
    ("seed003-template.yaml", ["metadata.annatations", "spec.clusterIp", "spec.status"]),
])
def test_seed_originals_have_unknown_fields(file, fields):
    doc = yaml.safe_load((INVALID / file).read_text())
    assert unknown_fields("Service", doc) == fields


# --- EndpointSlice ---------------------------------------------------------------------------

def test_endpoint_slice_from_the_seed():
    sl = parse_endpoint_slice(example("13-example-endpointslice.yaml", "EndpointSlice"))
    assert (sl.namespace, sl.name, sl.service_name, sl.address_type) == ("default", "example-abc", "example", "IPv4")
    (port,) = sl.ports
    assert (port.name, port.protocol, port.port) == ("http", Protocol.TCP, 80)
    (ep,) = sl.endpoints
    assert ep.address == IPv4Address("198.18.1.3")
    assert (ep.ready, ep.serving, ep.terminating, ep.node_name, ep.zone, ep.hostname) == \
        (True, True, False, "node-1", "zone-a", "pod-1")


def test_endpoint_slice_hints():
    sl = parse_endpoint_slice(example("14-topology-aware-hints.yaml", "EndpointSlice"))
    assert [ep.zone_hints for ep in sl.endpoints] == [frozenset({"zone-a"}), frozenset({"zone-b"})]


def slice_obj(endpoints, ports=({"name": "http", "port": 8080},), address_type="IPv4"):
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": "web-abc", "namespace": "default", "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": address_type, "ports": list(ports), "endpoints": list(endpoints)}


def test_endpoint_slice_node_hints():
    """hints.forNodes (trafficDistribution: PreferSameNode), at most 8 as the API allows."""
    sl = parse_endpoint_slice(slice_obj([
        {"addresses": ["198.18.1.3"], "hints": {"forNodes": [{"name": "node-1"}], "forZones": [{"name": "zone-a"}]}},
        {"addresses": ["198.18.1.4"]}]))
    assert [(ep.node_hints, ep.zone_hints) for ep in sl.endpoints] == [
        (frozenset({"node-1"}), frozenset({"zone-a"})), (frozenset(), frozenset())]
    too_many = {"forNodes": [{"name": f"node-{i}"} for i in range(9)]}
    assert "endpoints[0].hints.forNodes" in error_of(parse_endpoint_slice,
                                                     slice_obj([{"addresses": ["198.18.1.3"], "hints": too_many}]))


@pytest.mark.parametrize("conditions,expected", [
    ({}, (True, True, False)),                                       # unset = ready, serving, not terminating
    ({"ready": False}, (False, True, False)),
    ({"ready": False, "serving": True, "terminating": True}, (False, True, True)),
    ({"ready": False, "serving": False, "terminating": True}, (False, False, True)),
])
def test_endpoint_conditions_defaults(conditions, expected):
    sl = parse_endpoint_slice(slice_obj([{"addresses": ["198.18.1.5"], "conditions": conditions}]))
    ep = sl.endpoints[0]
    assert (ep.ready, ep.serving, ep.terminating) == expected


def test_fqdn_slices_are_ignored_not_errors_and_ipv6_slices_are_read():
    sl = parse_endpoint_slice(slice_obj([{"addresses": ["db.example.com"]}], address_type="FQDN"))
    assert sl.endpoints == () and sl.address_type == "FQDN"
    # Issue 14: IPv6 slices are read like IPv4 ones (they were placeholders while IPv4-only).
    sl = parse_endpoint_slice(slice_obj([{"addresses": ["2001:2::5"]}], address_type="IPv6"))
    assert sl.address_type == "IPv6" and [str(e.address) for e in sl.endpoints] == ["2001:2::5"]


INVALID_SLICES = [
    ("IPv6 address in an IPv4 slice", slice_obj([{"addresses": ["198.18.1.5"]}, {"addresses": ["fd00::1"]}]),
     "endpoints[1].addresses[0]: fd00::1 is not an IPv4 address"),
    ("IPv4 address in an IPv6 slice", slice_obj([{"addresses": ["2001:2::5", "198.18.1.5"]}], address_type="IPv6"),
     "endpoints[0].addresses[1]: 198.18.1.5 is not an IPv6 address"),
    ("not an address", slice_obj([{"addresses": ["pod-1"]}]), "endpoints[0].addresses[0]: 'pod-1' is not an IP address"),
    ("no address", slice_obj([{"addresses": []}]), "endpoints[0].addresses: needs at least one address"),
    ("too many endpoints", slice_obj([{"addresses": ["198.18.1.5"]}] * 1001),
     "endpoints: has 1001 items, more than the limit of 1000"),
    ("port out of range", slice_obj([], ports=[{"name": "http", "port": 0}]), "ports[0].port: 0 is out of range 1-65535"),
    ("unknown protocol", slice_obj([], ports=[{"name": "http", "port": 80, "protocol": "ICMP"}]),
     "ports[0].protocol: 'ICMP' is not one of TCP, UDP, SCTP"),
    ("duplicate port name", slice_obj([], ports=[{"name": "http", "port": 80}, {"name": "http", "port": 81}]),
     "ports[1].name: 'http'/TCP appears twice"),
    ("ready is a string", slice_obj([{"addresses": ["198.18.1.5"], "conditions": {"ready": "true"}}]),
     "endpoints[0].conditions.ready: must be true or false, not 'true'"),
    ("unknown address type", slice_obj([], address_type="IPv5"), "addressType: 'IPv5' is not one of IPv4, IPv6, FQDN"),
]


@pytest.mark.parametrize("obj,message", [c[1:] for c in INVALID_SLICES], ids=[c[0] for c in INVALID_SLICES])
def test_invalid_endpoint_slice(obj, message):
    assert error_of(parse_endpoint_slice, obj) == message


def test_a_thousand_endpoints_are_fine():
    sl = parse_endpoint_slice(slice_obj([{"addresses": [f"198.18.{1 + i // 250}.{1 + i % 250}"]} for i in range(1000)]))
    assert len(sl.endpoints) == 1000


# --- Endpoints (manual, selectorless Services) ------------------------------------------------

def test_manual_endpoints_become_slices():
    eps = parse_endpoints(example("12-plat-dev-manual-endpoints.yaml", "Endpoints"))
    assert eps.key == ("default", "plat-dev")
    (sl,) = eps.slices
    assert sl.service_name == "plat-dev"
    assert [(p.name, p.protocol, p.port) for p in sl.ports] == [("", Protocol.TCP, 3306)]
    assert [(e.address, e.ready) for e in sl.endpoints] == [(IPv4Address("198.18.1.109"), True)]


def test_manual_endpoints_of_both_families_become_a_slice_per_family():
    # As the EndpointSliceMirroring controller does: a slice holds one address family (issue 14).
    obj = {"apiVersion": "v1", "kind": "Endpoints", "metadata": {"name": "db"},
           "subsets": [{"addresses": [{"ip": "198.18.1.1"}, {"ip": "2001:2:0:1::1"}], "ports": [{"port": 5432}]},
                       {"addresses": [{"ip": "2001:2:0:1::2"}], "ports": [{"port": 5433}]}]}
    slices = parse_endpoints(obj).slices
    assert [(sl.name, sl.address_type, [str(e.address) for e in sl.endpoints]) for sl in slices] == [
        ("db/subsets[0]", "IPv4", ["198.18.1.1"]), ("db/subsets[0]/IPv6", "IPv6", ["2001:2:0:1::1"]),
        ("db/subsets[1]/IPv6", "IPv6", ["2001:2:0:1::2"])]


def test_not_ready_addresses_are_not_ready_nor_serving():
    obj = {"apiVersion": "v1", "kind": "Endpoints", "metadata": {"name": "db"},
           "subsets": [{"addresses": [{"ip": "198.18.1.1", "nodeName": "node-1"}],
                        "notReadyAddresses": [{"ip": "198.18.2.1"}], "ports": [{"port": 5432}]},
                       {"addresses": [{"ip": "198.18.1.2"}], "ports": [{"name": "metrics", "port": 9187}]}]}
    eps = parse_endpoints(obj)
    assert len(eps.slices) == 2
    first = eps.slices[0].endpoints
    assert [(str(e.address), e.ready, e.serving, e.node_name) for e in first] == \
        [("198.18.1.1", True, True, "node-1"), ("198.18.2.1", False, False, "")]


def test_endpoints_labelled_skip_mirror_give_no_slice_as_the_mirroring_controller():
    obj = {"apiVersion": "v1", "kind": "Endpoints", "metadata": {"name": "db"},
           "subsets": [{"addresses": [{"ip": "198.18.1.1"}], "ports": [{"port": 5432}]}]}
    assert len(parse_endpoints(obj).slices) == 1
    obj["metadata"]["labels"] = {"endpointslice.kubernetes.io/skip-mirror": "true"}
    assert parse_endpoints(obj).slices == ()
    obj["metadata"]["labels"]["endpointslice.kubernetes.io/skip-mirror"] = "false"     # only "true" skips
    assert len(parse_endpoints(obj).slices) == 1


@pytest.mark.parametrize("subsets,message", [
    ([{"addresses": [{"ip": "11.11.11"}], "ports": [{"port": 6379}]}], "subsets[0].addresses[0].ip: '11.11.11' is not an IP address"),
    ([{"addresses": [{"hostname": "a"}], "ports": [{"port": 6379}]}], "subsets[0].addresses[0].ip: is required"),
    ([{"addresses": [{"ip": "198.18.1.1"}], "ports": [{"port": 99999}]}], "subsets[0].ports[0].port: 99999 is out of range"),
    ([{"addresses": [{"ip": "198.18.1.1"}] * 600}] * 2, "subsets: hold more than 1000 addresses"),
])
def test_invalid_endpoints(subsets, message):
    obj = {"apiVersion": "v1", "kind": "Endpoints", "metadata": {"name": "db"}, "subsets": subsets}
    assert message in error_of(parse_endpoints, obj)


# --- Node ------------------------------------------------------------------------------------

def test_node_zone_and_addresses():
    node = parse_node({"apiVersion": "v1", "kind": "Node",
                       "metadata": {"name": "node-1", "labels": {"topology.kubernetes.io/zone": "zone-a"}},
                       "status": {"addresses": [{"type": "InternalIP", "address": "198.18.0.11"},
                                                {"type": "Hostname", "address": "node-1"},
                                                {"type": "InternalIP", "address": "fd00::11"}]}})
    assert (node.name, node.zone) == ("node-1", "zone-a")
    # Issue 14: a Node's IPv6 addresses are kept too (which serve is the agent's --ip-families).
    assert node.addresses == (("InternalIP", IPv4Address("198.18.0.11")), ("InternalIP", IPv6Address("fd00::11")))


def test_node_beta_zone_label_is_no_zone_as_kube_proxy_and_bad_address():
    """kube-proxy v1.37.2 reads topology.kubernetes.io/zone only (issue 17 item 4): a Node with the
    beta label alone has no zone, so zone hints are not used there; with both, the GA one counts."""
    beta = "failure-domain.beta.kubernetes.io/zone"
    node = parse_node({"kind": "Node", "metadata": {"name": "n", "labels": {beta: "z"}}})
    assert node.zone == ""
    both = parse_node({"kind": "Node", "metadata": {"name": "n", "labels": {
        beta: "z", "topology.kubernetes.io/zone": "zone-a"}}})
    assert both.zone == "zone-a"
    bad = {"kind": "Node", "metadata": {"name": "n"}, "status": {"addresses": [{"type": "InternalIP", "address": "x"}]}}
    assert error_of(parse_node, bad) == "status.addresses[0].address: 'x' is not an IP address"


# --- ServiceCIDR ---------------------------------------------------------------------------------

def service_cidr(*cidrs, name="kubernetes"):
    return {"apiVersion": "networking.k8s.io/v1", "kind": "ServiceCIDR", "metadata": {"name": name},
            "spec": {"cidrs": list(cidrs)}}


def test_service_cidr_routes_its_ranges_of_both_families():
    """Node clients reach IPv6 ClusterIPs too: hostpath.py routes both families' ranges."""
    parsed = parse_service_cidr(service_cidr("10.96.0.0/12", "fd00:10:96::/112"))
    assert parsed.key == ("", "kubernetes")
    assert parsed.cidrs == (IPv4Network("10.96.0.0/12"), IPv6Network("fd00:10:96::/112"))
    assert unknown_fields("ServiceCIDR", service_cidr("10.96.0.0/12")) == []


def test_service_cidr_ranges_of_both_families_give_the_cluster_ip_families_primary_first():
    """--ip-families auto: the `kubernetes` ServiceCIDR (kube-apiserver's range, primary family first)
    orders the families; another ServiceCIDR adds its own; none gives ()."""
    dual = parse_service_cidr(service_cidr("fd00:10:96::/112", "10.96.0.0/12"))
    assert dual.ranges == (IPv6Network("fd00:10:96::/112"), IPv4Network("10.96.0.0/12"))
    assert dual.families == ("IPv6", "IPv4") and dual.cidrs == dual.ranges
    extra = parse_service_cidr(service_cidr("10.100.0.0/16", name="added"))
    v6_only = parse_service_cidr(service_cidr("fd00:10:96::/112"))
    assert cluster_ip_families([extra, dual]) == ("IPv6", "IPv4")
    assert cluster_ip_families([extra, v6_only]) == ("IPv6", "IPv4")
    assert cluster_ip_families([extra]) == ("IPv4",) and cluster_ip_families([]) == ()


@pytest.mark.parametrize("cidrs,message", [
    (("::/0",), "spec.cidrs[0]: ::/0 is every IPv6 address, not a range of clusterIPs"),
    (("10.96.0.0/33",), "spec.cidrs[0]: '10.96.0.0/33' is not a CIDR"),
    (("0.0.0.0/0",), "spec.cidrs[0]: 0.0.0.0/0 would route every address to the node-client device"),
    (("10.96.0.0/12", "10.100.0.0/16", "fd00::/112"), "spec.cidrs: has 3 items, more than the limit of 2"),
])
def test_invalid_service_cidr_names_the_field(cidrs, message):
    assert error_of(parse_service_cidr, service_cidr(*cidrs)) == message


# --- NodeConfig ----------------------------------------------------------------------------------

def test_node_config_normalises_its_inputs():
    cfg = NodeConfig("node-1", node_addresses=["198.18.0.11"], service_cidr="198.19.0.0/16", default_algorithm="random")
    assert cfg.node_addresses == (IPv4Address("198.18.0.11"),)
    assert cfg.service_cidr == IPv4Network("198.19.0.0/16")
    assert cfg.default_algorithm is Algorithm.RANDOM
    assert hash(cfg) == hash(NodeConfig("node-1", node_addresses=(IPv4Address("198.18.0.11"),),
                                        service_cidr=IPv4Network("198.19.0.0/16"),
                                        default_algorithm=Algorithm.RANDOM))
    assert NodeConfig("node-1").service_cidr is None


@pytest.mark.parametrize("kwargs", [{"nodeport_range": (32767, 30000)}, {"nodeport_range": (0, 10)},
                                    {"node_addresses": ["node-1"]}, {"service_cidr": "198.19.0.1/16"}])
def test_node_config_rejects_nonsense(kwargs):
    with pytest.raises(ValueError):
        NodeConfig("node-1", **kwargs)
