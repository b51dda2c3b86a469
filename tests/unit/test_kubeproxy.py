"""The lab's kube-proxy command line (ebpfsvc/lab/kubeproxy.py): the real binary accepts it, and
nothing in it lets kube-proxy change a global setting."""

from __future__ import annotations

import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest

from ebpfsvc.lab import agents, controlplane, kubeproxy, labfile

CLUSTER_CIDR_LAB = Path(__file__).resolve().parents[2] / "examples" / "lab" / "cluster-cidr.yaml"


def _command(tmp_path: Path, mode: str = "iptables", args=(), lab: Path | None = None) -> list[str]:
    return kubeproxy.command(SimpleNamespace(path=tmp_path), labfile.load(lab), "node-2", mode, args)


def _binary() -> str:
    try:
        return controlplane.binary("kube-proxy")
    except controlplane.ControlPlaneError as exc:
        pytest.skip(str(exc))


def test_command_names_the_node_mode_and_its_own_identity(tmp_path, monkeypatch):
    monkeypatch.setattr(controlplane, "binary", lambda name: f"/k8s/{name}")
    argv = _command(tmp_path, "nftables", ["--v=4"])
    assert argv[0] == "/k8s/kube-proxy"
    assert f"--kubeconfig={tmp_path}/kube-proxy-node-2.kubeconfig" in argv
    assert "--hostname-override=node-2" in argv and "--proxy-mode=nftables" in argv
    # nf_conntrack_max and the module's hashsize are global: kube-proxy must not size them.
    assert "--conntrack-max-per-core=0" in argv
    assert argv[-1] == "--v=4", "extra args come last, so they win"


def test_unknown_mode_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(controlplane, "binary", lambda name: f"/k8s/{name}")
    with pytest.raises(kubeproxy.KubeProxyError, match="'ipvs'"):
        _command(tmp_path, "ipvs")


def test_a_lab_cluster_cidr_reaches_kube_proxy_and_the_agents_alike(tmp_path, monkeypatch):
    """With the lab file's clusterCIDR kube-proxy runs in its default ClusterCIDR mode and every agent
    gets the same --cluster-cidr; without one, NodeCIDR and no cluster CIDR (kubeproxy.py docstring)."""
    monkeypatch.setattr(controlplane, "binary", lambda name: f"/k8s/{name}")
    state = SimpleNamespace(path=tmp_path, prefix="t1")
    argv = _command(tmp_path, lab=CLUSTER_CIDR_LAB)
    assert "--detect-local-mode=ClusterCIDR" in argv and "--cluster-cidr=198.18.64.0/18" in argv
    assert "--detect-local-mode=NodeCIDR" not in argv
    spec = labfile.load(CLUSTER_CIDR_LAB)
    for node in spec.nodes:
        assert agents.command(state, spec, node.name)[-1] == "--cluster-cidr=198.18.64.0/18"
    default = _command(tmp_path)
    assert "--detect-local-mode=NodeCIDR" in default and not [a for a in default if a.startswith("--cluster-cidr")]
    assert not [a for a in agents.command(state, labfile.load(), "node-1") if a.startswith("--cluster-cidr")]


@pytest.mark.parametrize("lab", [None, CLUSTER_CIDR_LAB], ids=["default", "cluster-cidr"])
@pytest.mark.parametrize("mode", kubeproxy.MODES)
def test_the_real_kube_proxy_accepts_every_flag(tmp_path, mode, lab):
    """--version exits after the flags are parsed: an unknown or malformed flag fails first."""
    _binary()
    out = subprocess.run([*_command(tmp_path, mode, lab=lab), "--version"], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("Kubernetes v")


def test_zone_given_reads_only_the_running_process_lines():
    """start_knowing_zone's evidence: the proxier's "Updated proxier node topology labels" line with
    the zone, from the kube-proxy process it started (klog's header carries the pid; the log appends)."""
    earlier = ('I1205 04:09:50.101010   31000 proxier.go:909] "Updated proxier node topology labels" '
               'ipFamily="IPv4" labels={"topology.kubernetes.io/zone":"zone-a"}')
    lost = ('I1205 04:09:51.537749   31157 topology.go:209] "Ignoring same-zone topology hints for service '
            'since node is missing label" service="198.19.64.79:80/TCP" label="topology.kubernetes.io/zone"')
    given = earlier.replace("31000", "31157")
    assert not kubeproxy.zone_given("\n".join([earlier, lost]), 31157, "zone-a")
    assert kubeproxy.zone_given("\n".join([earlier, lost, given]), 31157, "zone-a")
    assert not kubeproxy.zone_given(given, 31157, "zone-b")


# Rule text as the two modes list it (iptables-save; `nft list table ip kube-proxy`), trimmed.
IPTABLES_RULES = """-A KUBE-SERVICES -d 198.19.0.10/32 -p tcp -m comment --comment "default/mig cluster IP" -m tcp --dport 7000 -j KUBE-SVC-X
-A KUBE-SEP-A -p tcp -m comment --comment "default/mig" -m tcp -j DNAT --to-destination 198.18.1.30:7000
"""
NFTABLES_RULES = """\tmap service-ips {
\t\telements = { 198.19.0.10 . tcp . 7000 : goto service-X-default/mig/tcp/ }
\t}
\tchain service-X-default/mig/tcp/ {
\t\tmeta l4proto tcp dnat ip to numgen random mod 2 map { 0 : 198.18.1.30 . 7000, 1 : 198.18.2.2 . 7000 }
\t}
"""
NFTABLES_ONE_ENDPOINT = NFTABLES_RULES.replace(
    "dnat ip to numgen random mod 2 map { 0 : 198.18.1.30 . 7000, 1 : 198.18.2.2 . 7000 }", "dnat to 198.18.1.30:7000")


@pytest.mark.parametrize("mode, rules", [("iptables", IPTABLES_RULES), ("nftables", NFTABLES_RULES),
                                         ("nftables", NFTABLES_ONE_ENDPOINT)])
def test_serves_asks_for_every_endpoint_whole(monkeypatch, mode, rules):
    """A first sync can list the ClusterIP before its last endpoint is ready: a test that waits
    for every backend must see each one, and 198.18.1.3 is not 198.18.1.30."""
    monkeypatch.setattr(kubeproxy, "ruleset", lambda lab, node, mode: rules)
    assert kubeproxy.serves(None, "node-1", mode, "198.19.0.10", 7000)
    assert kubeproxy.serves(None, "node-1", mode, "198.19.0.10", 7000, ["198.18.1.30:7000"])
    assert not kubeproxy.serves(None, "node-1", mode, "198.19.0.10", 7000, ["198.18.1.30:7000", "198.18.2.3:7000"])
    assert not kubeproxy.serves(None, "node-1", mode, "198.19.0.10", 7000, ["198.18.1.3:7000"])
    both = ["198.18.1.30:7000", "198.18.2.2:7000"]
    assert kubeproxy.serves(None, "node-1", mode, "198.19.0.10", 7000, both) == (rules is NFTABLES_RULES)
    assert not kubeproxy.serves(None, "node-1", mode, "198.19.0.1", 7000)
