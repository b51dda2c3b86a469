"""The local lab itself: topology, plain pod routing, the EndpointSlice controller, clean-up.

These run without node agents: they check the lab the Service tests stand on.
Traffic is real (echo apps in pod namespaces, curl and Python sockets); every
loop is bounded in count and time, and every lab comes down in a finally.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from ebpfsvc.datapath import nsenter
from ebpfsvc.lab import Lab, LabError, apps, controlplane, labfile, names, processes
from ebpfsvc.lab.pods import READY_ANNOTATION, process as pod_process

from .helpers import wait_for

# kube-controller-manager's --max-endpoints-per-slice default.
MAX_ENDPOINTS_PER_SLICE = 100

NO_AGENTS = pytest.mark.parametrize("lab", [{"agents": False}], indirect=True)

UDP_ASK = ("import socket,sys; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(3); "
           "s.sendto(b'hi', (sys.argv[1], int(sys.argv[2]))); print(s.recvfrom(4096)[0].decode())")

TCP_TWO_LINES = ("import socket,sys; s=socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3); "
                 "f=s.makefile('rwb'); f.write(b'one\\n'); f.flush(); print(f.readline().decode().strip()); "
                 "f.write(b'two\\n'); f.flush(); print(f.readline().decode().strip())")


def curl_json(run, url: str) -> dict:
    result = run(["curl", "-sS", "--max-time", "5", url])
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def lab_leftovers(prefix: str) -> list[str]:
    """Everything of lab `prefix` that still exists on the machine."""
    left = [f"netns {n}" for n in os.listdir(nsenter.NETNS_RUN_DIR) if n.startswith(prefix + "-")] \
        if nsenter.NETNS_RUN_DIR.exists() else []
    if names.state_dir(prefix).exists():
        left.append(f"state dir {names.state_dir(prefix)}")
    if names.pin_root(prefix).exists():
        left.append(f"pin dir {names.pin_root(prefix)}")
    return left


def lab_processes(lab: Lab) -> list[processes.ProcRecord]:
    """Records of the controller, the control plane and every pod process (the kubelet's records)."""
    recs = [lab.state.read_pid(name) for name in (names.CONTROLLER, *controlplane.COMPONENTS)]
    recs += [pod_process(p) for p in lab.state.list("Pod")]
    return [r for r in recs if r]


# -- topology and routing ------------------------------------------------------------------


@pytest.mark.root
@NO_AGENTS
def test_topology(lab):
    """Nodes route, pods have eth0 with a /32 behind an lxc* veth, nothing leaks to the root netns."""
    assert {n.name for n in lab.spec.nodes} == {"node-1", "node-2"}
    lab.apply([apps.pod("web-1", "http-echo", 8080, node="node-1")])
    pod_if = lab.exec("web-1", ["ip", "-o", "-4", "addr", "show", "eth0"])
    assert f"{lab.pod_ip('web-1')}/32" in pod_if.stdout
    assert "198.18.1.1" in lab.exec("web-1", ["ip", "route", "show", "default"]).stdout
    node_links = lab.node_exec("node-1", ["ip", "-o", "link", "show"]).stdout
    assert names.pod_host_link("default", "web-1") in node_links
    assert lab.node_exec("node-1", ["cat", "/proc/sys/net/ipv4/ip_forward"]).stdout.strip() == "1"
    assert lab.node_exec("node-1", ["cat", "/proc/sys/net/ipv4/conf/all/rp_filter"]).stdout.strip() == "0"
    routes = lab.node_exec("node-1", ["ip", "route"]).stdout
    assert "198.18.2.0/24 via 198.18.0.12 dev eth0" in routes
    # A fixed pod IP (status.podIP in a lab manifest, kept as the lab.ebpfsvc.io/pod-ip annotation)
    # is honoured when it is a pod address of the node.
    fixed = apps.pod("fixed", "http-echo", 8080, node="node-2")
    lab.apply([{**fixed, "status": {"podIP": "198.18.2.50"}}])
    assert lab.pod_ip("fixed") == "198.18.2.50"
    assert "198.18.2.50/32" in lab.exec("fixed", ["ip", "-o", "-4", "addr", "show", "eth0"]).stdout
    with pytest.raises(LabError, match="pod-ip: 198.18.1.50 is not a pod address"):
        lab.apply([{**apps.pod("wrong", "http-echo", 8080, node="node-2"), "status": {"podIP": "198.18.1.50"}}])
    root_links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    assert names.pod_host_link("default", "web-1") not in root_links
    assert "198.18." not in subprocess.run(["ip", "-o", "addr"], capture_output=True, text=True).stdout


@pytest.mark.root
@NO_AGENTS
@pytest.mark.parametrize("server_node", ["node-1", "node-2"], ids=["same-node", "cross-node"])
def test_pod_to_pod_tcp_and_udp(lab, server_node):
    """Plain routing, no NAT: the echo sees the client pod's own address."""
    lab.apply([
        apps.pod("caller", "http-echo", 9000, node="node-1"),
        apps.pod("web", "http-echo", 8080, node=server_node),
        apps.pod("dns", "udp-echo", 5353, node=server_node),
        apps.pod("echo", "tcp-echo", 7000, node=server_node, namespace="team"),
    ])
    lab.wait_ready(["caller", "web", "team/echo"], timeout=20)
    client_ip = lab.pod_ip("caller")

    answer = curl_json(lambda argv: lab.exec("caller", argv), f"http://{lab.pod_ip('web')}:8080/")
    assert answer["pod"] == "web"
    assert answer["client"] == client_ip
    assert answer["localPort"] == 8080

    # tcp-echo keeps one connection open over several lines.
    tcp = lab.exec("caller", ["python", "-c", TCP_TWO_LINES, lab.pod_ip("team/echo"), "7000"], timeout=10)
    assert tcp.returncode == 0, tcp.stderr
    assert tcp.stdout.splitlines() == ["echo: one", "echo: two"]

    for _ in range(3):   # the UDP app may still be binding: a few bounded tries
        udp = lab.exec("caller", ["python", "-c", UDP_ASK, lab.pod_ip("dns"), "5353"], timeout=10)
        if udp.returncode == 0:
            break
        time.sleep(0.5)
    assert udp.returncode == 0, udp.stderr
    answer = json.loads(udp.stdout)
    assert answer["pod"] == "dns"
    assert answer["client"] == client_ip


@pytest.mark.root
@NO_AGENTS
def test_external_client_reaches_nodes_not_pods(lab):
    """The external client is outside the cluster: node addresses yes, pod IPs no."""
    lab.apply([apps.pod("web", "http-echo", 8080, node="node-2")])
    server = lab.node_popen("node-2", ["python", "-m", "ebpfsvc.lab.apps", "http-echo", "--port", "8081"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            result = lab.external_exec("client", ["curl", "-sS", "--max-time", "3", "http://198.18.0.12:8081/"])
            if result.returncode == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["client"] == "198.18.0.100"
    finally:
        server.kill()
        server.wait(timeout=5)
    to_pod = lab.external_exec("client", ["curl", "-sS", "--max-time", "2", f"http://{lab.pod_ip('web')}:8080/"])
    assert to_pod.returncode != 0
    assert "198.18.200.0/24 via 198.18.0.11" in lab.external_exec("client", ["ip", "route"]).stdout


# -- API-server and EndpointSlice emulation -------------------------------------------------

WEB_SERVICE = {
    "apiVersion": "v1", "kind": "Service",
    "metadata": {"name": "web", "annotations": {"service.kubernetes.io/topology-mode": "Auto"}},
    "spec": {"selector": {"app": "web"},
             "ports": [{"name": "http", "port": 80, "targetPort": "serve"},
                       {"name": "metrics", "port": 9090, "targetPort": 9090}]},
}


def endpoints_by_pod(lab: Lab, service: str) -> dict[str, dict]:
    return {e["targetRef"]["name"]: e for s in lab.endpoint_slices(service) for e in s["endpoints"]}


@pytest.mark.root
@NO_AGENTS
def test_endpointslices_follow_readiness_and_deletion(lab):
    lab.apply([
        apps.pod("web-1", "http-echo", 8080, node="node-1", labels={"app": "web"}, grace_seconds=8),
        apps.pod("web-2", "http-echo", 8080, node="node-2", labels={"app": "web"}),
        # Probe port 8181 is closed (the app listens on 8080): never ready.
        {**apps.pod("web-3", "http-echo", 8080, node="node-2", labels={"app": "web"}),
         "spec": {"nodeName": "node-2", "containers": [{
             "name": "c", "command": ["python", "-m", "ebpfsvc.lab.apps", "http-echo", "--port", "8080"],
             "ports": [{"name": "serve", "containerPort": 8080}, {"name": "other", "containerPort": 8181}],
             "readinessProbe": {"tcpSocket": {"port": "other"}}}]}},
        apps.pod("other", "http-echo", 8080, node="node-1", labels={"app": "other"}),
        WEB_SERVICE,
    ])
    lab.wait_ready(["web-1", "web-2"], timeout=20)
    time.sleep(1.5)   # a few probe rounds for web-3, which must stay unready
    wait_for(lambda: len(endpoints_by_pod(lab, "web")) == 3, what="three endpoints in the slice")
    slices = lab.endpoint_slices("web")
    assert len(slices) == 1
    assert slices[0]["metadata"]["labels"]["kubernetes.io/service-name"] == "web"
    assert sorted((p["name"], p["port"]) for p in slices[0]["ports"]) == [("http", 8080), ("metrics", 9090)]
    eps = endpoints_by_pod(lab, "web")
    assert set(eps) == {"web-1", "web-2", "web-3"}
    assert eps["web-1"]["conditions"] == {"ready": True, "serving": True, "terminating": False}
    assert eps["web-3"]["conditions"] == {"ready": False, "serving": False, "terminating": False}
    assert eps["web-1"]["nodeName"] == "node-1" and eps["web-1"]["zone"] == "zone-a"
    assert eps["web-2"]["hints"] == {"forZones": [{"name": "zone-b"}]}
    assert eps["web-1"]["addresses"] == [lab.pod_ip("web-1")]

    lab.delete_object("pod", "web-1")
    wait_for(lambda: endpoints_by_pod(lab, "web")["web-1"]["conditions"]["terminating"], what="web-1 terminating")
    eps = endpoints_by_pod(lab, "web")
    assert eps["web-1"]["conditions"] == {"ready": False, "serving": True, "terminating": True}
    # Terminating pods still serve: the app answers during the grace period.
    answer = curl_json(lambda argv: lab.exec("web-2", argv), f"http://{lab.pod_ip('web-1')}:8080/")
    assert answer["pod"] == "web-1"
    lab.wait_gone(["web-1"], timeout=40)
    wait_for(lambda: "web-1" not in endpoints_by_pod(lab, "web"), what="web-1 out of the slice")
    assert set(endpoints_by_pod(lab, "web")) == {"web-2", "web-3"}
    assert not nsenter.exists(names.pod_netns(lab.prefix, "default", "web-1"))

    # Re-applying with other labels is an update: web-2 leaves the Service.
    lab.apply([apps.pod("web-2", "http-echo", 8080, node="node-2", labels={"app": "moved"})])
    wait_for(lambda: "web-2" not in endpoints_by_pod(lab, "web"), what="web-2 out of the slice")
    assert set(endpoints_by_pod(lab, "web")) == {"web-3"}


@pytest.mark.root
@NO_AGENTS
def test_readiness_follows_the_probe_both_ways(lab):
    """The probe port is served by a process the test owns: start it, ready; kill it, unready."""
    pod = apps.pod("flip", "tcp-echo", 7070, node="node-2", labels={"app": "flip"})
    pod["spec"]["containers"][0]["command"] = ["sleep", "300"]
    lab.apply([pod, {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "flip"},
                     "spec": {"selector": {"app": "flip"}, "ports": [{"port": 70, "targetPort": "serve"}]}}])
    lab.wait_ready(["flip"], ready=False, timeout=10)
    listener = lab.popen("flip", ["python", "-m", "ebpfsvc.lab.apps", "tcp-echo", "--port", "7070"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        lab.wait_ready(["flip"], timeout=20)
        wait_for(lambda: endpoints_by_pod(lab, "flip").get("flip", {}).get("conditions", {}).get("ready"),
                 what="flip ready in its slice")
        assert endpoints_by_pod(lab, "flip")["flip"]["conditions"]["ready"] is True
    finally:
        listener.kill()
        listener.wait(timeout=5)
    lab.wait_ready(["flip"], ready=False, timeout=20)
    wait_for(lambda: not endpoints_by_pod(lab, "flip")["flip"]["conditions"]["ready"], what="flip unready in its slice")
    assert endpoints_by_pod(lab, "flip")["flip"]["conditions"] == {"ready": False, "serving": False,
                                                                    "terminating": False}


@pytest.mark.root
@NO_AGENTS
def test_more_than_100_endpoints_split_into_slices(lab):
    """Pods without a command have no process; their readiness comes from an annotation."""
    count = 150
    pods = [{"apiVersion": "v1", "kind": "Pod",
             "metadata": {"name": f"bulk-{i:03d}", "labels": {"app": "bulk"},
                          "annotations": {READY_ANNOTATION: "false" if i % 10 == 0 else "true"}},
             "spec": {"containers": [{"name": "none", "ports": [{"name": "serve", "containerPort": 7000}]}]}}
            for i in range(count)]
    lab.apply(pods + [{"apiVersion": "v1", "kind": "Service", "metadata": {"name": "bulk"},
                       "spec": {"selector": {"app": "bulk"}, "ports": [{"port": 80, "targetPort": "serve"}]}}])
    # The real EndpointSlice controller catches up asynchronously.
    wait_for(lambda: sum(len(s.get("endpoints") or []) for s in lab.endpoint_slices("bulk")) == count,
             what=f"{count} endpoints in the slices")
    slices = lab.endpoint_slices("bulk")
    sizes = sorted(len(s["endpoints"]) for s in slices)
    assert sizes == [count - MAX_ENDPOINTS_PER_SLICE, MAX_ENDPOINTS_PER_SLICE]
    endpoints = [e for s in slices for e in s["endpoints"]]
    assert len({e["addresses"][0] for e in endpoints}) == count
    assert sum(e["conditions"]["ready"] for e in endpoints) == count - count // 10
    # Unpinned pods are spread over the nodes (fewest pods first).
    assert {e["nodeName"] for e in endpoints} == {"node-1", "node-2"}
    assert all(s["ports"] == [{"name": "", "protocol": "TCP", "port": 7000}] for s in slices)


@pytest.mark.root
@NO_AGENTS
def test_service_defaults_and_load_balancer_status(lab):
    """The real API server defaults and allocates; the lab's cloud part fills status.loadBalancer."""
    [svc] = lab.apply([{"apiVersion": "v1", "kind": "Service",
                        "metadata": {"name": "lb", "annotations": {"lab.ebpfsvc.io/lb-ip": "198.18.200.7"}},
                        "spec": {"type": "LoadBalancer", "selector": {"app": "lb"}, "ports": [{"port": 80}]}}])
    spec = svc["spec"]
    assert spec["clusterIP"].startswith("198.19.")
    assert 30000 <= spec["ports"][0]["nodePort"] <= 32767
    assert spec["ports"][0]["targetPort"] == 80
    assert spec["externalTrafficPolicy"] == "Cluster" and spec["sessionAffinity"] == "None"
    wait_for(lambda: lab.service("lb").get("status", {}).get("loadBalancer", {}).get("ingress"),
             what="status.loadBalancer")
    assert lab.service("lb")["status"]["loadBalancer"]["ingress"][0]["ip"] == "198.18.200.7"
    # Re-apply keeps what was allocated, as the API server does.
    [again] = lab.apply([{"apiVersion": "v1", "kind": "Service", "metadata": {"name": "lb"},
                          "spec": {"type": "NodePort", "selector": {"app": "lb"}, "ports": [{"port": 80}]}}])
    assert again["spec"]["clusterIP"] == spec["clusterIP"]
    assert again["spec"]["ports"][0]["nodePort"] == spec["ports"][0]["nodePort"]
    assert not (lab.service("lb").get("status") or {}).get("loadBalancer", {}).get("ingress")
    assert {n["metadata"]["name"] for n in lab.api.list("Node")} == {"node-1", "node-2"}
    with pytest.raises(LabError, match="clusterIP"):
        lab.apply([{"apiVersion": "v1", "kind": "Service", "metadata": {"name": "bad"},
                    "spec": {"clusterIP": "10.0.0.1", "ports": [{"port": 80}]}}])


@pytest.mark.root
@NO_AGENTS
def test_bad_pods_fail_and_leave_nothing_half_made(lab):
    """A pod that cannot start fails (as kubelet reports a container that cannot run), and
    leaves no namespace behind; deleted, its name can be used again."""
    broken = apps.pod("web", "http-echo", 8080, node="node-1")
    broken["spec"]["containers"][0]["command"] = ["/nonexistent/program"]
    with pytest.raises(LabError, match="cannot start"):
        lab.apply([broken])
    assert lab.pod("web")["status"]["phase"] == "Failed"
    assert not nsenter.exists(names.pod_netns(lab.prefix, "default", "web"))
    lab.delete_object("pod", "web", grace=0)
    lab.wait_gone(["web"], timeout=10)
    lab.apply([apps.pod("web", "http-echo", 8080, node="node-1")])   # the same name works again
    lab.wait_ready(["web"], timeout=20)
    with pytest.raises(LabError, match="clashes"):
        lab.apply([apps.pod("client", "http-echo", 8080)])   # the external client's name
    with pytest.raises(LabError, match="nodeName"):
        lab.apply([apps.pod("lost", "http-echo", 8080, node="node-9")])


# -- life cycle -------------------------------------------------------------------------------


@pytest.mark.root
def test_up_down_leaves_nothing(unique_prefix):
    lab = Lab.up(prefix=unique_prefix, agents=False)
    try:
        lab.apply([apps.pod("web", "http-echo", 8080, node="node-1"),
                   apps.pod("echo", "tcp-echo", 7000, node="node-2")])
        lab.wait_ready(["web", "echo"], timeout=20)
        long_lived = lab.popen("echo", ["sleep", "300"])   # a stray exec the test forgets
        recs = lab_processes(lab)
        # The controller, etcd, kube-apiserver, kube-controller-manager, the API proxy, two pods.
        assert len(recs) == 7 and all(processes.alive(r) for r in recs)
        assert lab_leftovers(unique_prefix)
    finally:
        lab.down()
    long_lived.wait(timeout=5)
    assert lab_leftovers(unique_prefix) == []
    assert not any(processes.alive(r) for r in recs)


@pytest.mark.root
def test_down_after_controller_crash(unique_prefix):
    lab = Lab.up(prefix=unique_prefix, agents=False)
    try:
        lab.apply([apps.pod("web", "http-echo", 8080, node="node-1")])
        recs = lab_processes(lab)
        controller = lab.state.read_pid(names.CONTROLLER)
        os.kill(controller.pid, signal.SIGKILL)
        lab._controller.wait(timeout=5)
        with pytest.raises(Exception, match="does not answer"):
            lab.apply([apps.pod("web-2", "http-echo", 8080, node="node-1")])
    finally:
        # What a user runs after a crash: the CLI, in a fresh process.
        down = subprocess.run([sys.executable, "-m", "ebpfsvc.cli", "lab", "down", "--prefix", unique_prefix],
                              capture_output=True, text=True, timeout=60)
        if lab_leftovers(unique_prefix):
            lab.down()
    assert down.returncode == 0, down.stderr
    assert lab_leftovers(unique_prefix) == []
    assert not any(processes.alive(r) for r in recs)


@pytest.mark.root
def test_cli_round_trip(unique_prefix, tmp_path):
    cli = [sys.executable, "-m", "ebpfsvc.cli", "lab"]
    env = {**os.environ, "EBPFSVC_LAB_PREFIX": unique_prefix}

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([*cli, *args], capture_output=True, text=True, timeout=60, env=env)

    manifest = tmp_path / "pods.yaml"
    manifest.write_text(
        "apiVersion: v1\nkind: Pod\nmetadata: {name: web}\nspec:\n  nodeName: node-2\n  containers:\n"
        "  - {name: c, command: [python, -m, ebpfsvc.lab.apps, http-echo, --port, '8080']}\n"
        "---\napiVersion: v1\nkind: Service\nmetadata: {name: web}\n"
        "spec: {selector: {app: web}, ports: [{port: 80, targetPort: 8080}]}\n")
    try:
        assert run("up", "--no-agents").returncode == 0
        applied = run("apply", "-f", str(manifest))
        assert applied.returncode == 0, applied.stderr
        assert run("exec", "web", "--", "sh", "-c", "exit 7").returncode == 7
        status = run("status")
        assert status.returncode == 0 and "web" in status.stdout and "198.18.2.2" in status.stdout
        for _ in range(40):     # the app logs once its interpreter is up: bounded wait
            if "http-echo listening on :8080" in run("logs", "web").stdout:
                break
            time.sleep(0.25)
        assert "http-echo listening on :8080" in run("logs", "web").stdout
        missing = run("exec", "nope", "--", "true")
        assert missing.returncode == 1 and "no Pod" in missing.stderr
        assert run("delete", "pod", "web", "--grace-period", "0").returncode == 0
        assert "web " not in run("status").stdout.split("pods")[1].split("services")[0]
        deleted = run("delete", "-f", str(manifest))   # the pod is gone already: reported, service deleted
        assert deleted.returncode == 1 and "not found: Pod default/web" in deleted.stderr
        assert "web" not in run("status").stdout.split("services")[1]
    finally:
        down = run("down")
    assert down.returncode == 0, down.stderr
    assert lab_leftovers(unique_prefix) == []


# -- lab file validation (no root needed) ----------------------------------------------------


@pytest.mark.parametrize("change, field", [
    ({"serviceCIDR": "10.96.0.0/12"}, "serviceCIDR"),
    ({"nodes": [{"name": "node-1", "address": "198.18.0.11", "podCIDR": "198.18.1.0/24"},
                {"name": "b", "address": "198.18.0.12", "podCIDR": "198.18.1.128/25"}]}, r"nodes\[1\].podCIDR"),
    ({"nodes": [{"name": "node-1", "address": "192.168.0.11", "podCIDR": "198.18.1.0/24"}]},
     r"nodes\[0\].address"),
    ({"nodes": [{"name": "node-1", "address": "198.18.0.100", "podCIDR": "198.18.1.0/24"}]},
     r"external\[0\].address"),
    ({"external": [{"name": "c", "address": "198.18.0.100", "routes": [{"to": "198.18.200.0/24",
                                                                          "via": "node-9"}]}]}, r"routes\[0\].via"),
])
def test_labfile_errors_name_the_field(change, field):
    doc = labfile.load().to_dict()
    doc.update(change)
    with pytest.raises(labfile.LabFileError, match=field):
        labfile.parse(doc)


# -- agents and --all ---------------------------------------------------------------------------


@pytest.mark.root
def test_agents_start_restart_and_pins_go(unique_prefix):
    """One agent per node, inside the node, with the lab's command line (nothing about the node but
    its name, as from a DaemonSet); restart replaces it."""
    lab = Lab.up(prefix=unique_prefix, agents=True)
    try:
        first = {n.name: lab.agent_record(n.name) for n in lab.spec.nodes}
        assert all(processes.alive(r) for r in first.values())
        node1 = first["node-1"]
        cmdline = (f"/proc/{node1.pid}/cmdline")
        with open(cmdline, "rb") as f:
            argv = f.read().decode().split("\0")
        assert f"--pin-dir={names.pin_dir(unique_prefix, 'node-1')}" in argv
        assert "--node-name=node-1" in argv
        per_node = {"--node-address", "--service-cidr", "--uplink", "--hairpin-address", "--zone"}
        assert not {a.split("=")[0] for a in argv} & per_node, argv
        assert os.stat(f"/proc/{node1.pid}/ns/net").st_ino == \
            os.stat(nsenter.netns_path(lab.node_netns("node-1"))).st_ino
        assert names.pin_dir(unique_prefix, "node-1").is_dir()

        lab.agent("restart", "node-1")
        second = lab.agent_record("node-1")
        assert second != node1 and processes.alive(second) and not processes.alive(node1)
        assert processes.alive(first["node-2"])    # the other node's agent is untouched
        lab.agent("stop", "node-2")
        assert lab.agent_record("node-2") is None and not processes.alive(first["node-2"])
    finally:
        lab.down()
    assert lab_leftovers(unique_prefix) == []
    assert not any(processes.alive(r) for r in [*first.values(), second])


@pytest.mark.root
@NO_AGENTS
def test_agents_identity_is_deploys_service_account_and_read_only(lab):
    """The agents' kubeconfig carries a token of deploy/'s ServiceAccount: deploy/'s ClusterRole lets
    it read what the agent watches and write nothing (asked of the real API server's RBAC)."""
    kubeconfig = controlplane.Paths(lab.state.path).agent_kubeconfig("node-1")

    def can(*what: str) -> bool:
        r = lab.node_exec("node-1", [controlplane.binary("kubectl"), "--kubeconfig", str(kubeconfig),
                                     "auth", "can-i", *what])
        assert r.stdout.strip() in ("yes", "no"), r.stderr
        return r.stdout.strip() == "yes"

    who = lab.node_exec("node-1", [controlplane.binary("kubectl"), "--kubeconfig", str(kubeconfig),
                                   "auth", "whoami", "-o", "jsonpath={.status.userInfo.username}"])
    assert who.stdout == "system:serviceaccount:kube-system:ebpfsvc", who.stderr
    for resource in ("services", "endpointslices.discovery.k8s.io", "nodes", "servicecidrs.networking.k8s.io"):
        assert can("watch", resource, "--all-namespaces"), resource
    for verb, resource in [("create", "services"), ("update", "endpointslices.discovery.k8s.io"),
                           ("patch", "nodes"), ("delete", "pods"), ("get", "secrets"), ("list", "pods")]:
        assert not can(verb, resource, "--all-namespaces"), (verb, resource)


@pytest.mark.root
def test_down_all_removes_every_lab(unique_prefix, tmp_path):
    """--all walks the state root; a private root keeps other engineers' labs out of reach."""
    env = {**os.environ, "EBPFSVC_LAB_ROOT": str(tmp_path)}
    prefixes = [f"{unique_prefix}-a", f"{unique_prefix}-b"]

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "ebpfsvc.cli", "lab", *args],
                              capture_output=True, text=True, timeout=60, env=env)

    try:
        for prefix in prefixes:
            up = run("up", "--prefix", prefix, "--no-agents")
            assert up.returncode == 0, up.stderr
        assert all(nsenter.exists(f"{p}-fabric") for p in prefixes)
    finally:
        down = run("down", "--all")
    assert down.returncode == 0, down.stderr
    assert all(p in down.stdout for p in prefixes)
    assert list(tmp_path.iterdir()) == []
    assert not any(n.startswith(unique_prefix) for n in os.listdir(nsenter.NETNS_RUN_DIR))



# -- the CLI as scripts use it ------------------------------------------------------------------


@pytest.mark.root
def test_cli_for_scripts(unique_prefix, tmp_path):
    """`lab up`/`apply` return once the agents serve what was applied; several -f and a directory;
    status as JSON/YAML and unwrapped when piped; one-line errors; inspection of a node."""
    cli = [sys.executable, "-m", "ebpfsvc.cli", "lab"]
    env = {**os.environ, "EBPFSVC_LAB_PREFIX": unique_prefix}

    def run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
        return subprocess.run([*cli, *args], capture_output=True, text=True, timeout=180, env=env, input=stdin)

    pods, svcs = tmp_path / "pods", tmp_path / "svc.yaml"
    pods.mkdir()
    for name, node in (("web-a", "node-1"), ("web-b", "node-2")):
        (pods / f"{name}.yaml").write_text(
            f"apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, labels: {{app: web}}}}\n"
            f"spec:\n  nodeName: {node}\n  containers:\n"
            "  - {name: c, command: [python, -m, ebpfsvc.lab.apps, http-echo, --port, '8080']}\n")
    (pods / "notes.txt").write_text("not a manifest: skipped, as kubectl does")
    long_name = "a-service-name-long-enough-to-wrap-an-eighty-column-table"
    svcs.write_text(f"apiVersion: v1\nkind: Service\nmetadata: {{name: {long_name}}}\n"
                    "spec: {type: NodePort, selector: {app: web}, ports: [{port: 80, targetPort: 8080}]}\n")
    try:
        up = run("up")
        assert up.returncode == 0 and "agents in sync" in up.stdout, up.stderr
        applied = run("apply", "-f", str(pods), "-f", str(svcs))
        assert applied.returncode == 0, applied.stderr
        assert {"pod/web-a applied", "pod/web-b applied", f"service/{long_name} applied", "agents in sync"} \
            <= set(applied.stdout.splitlines())
        # In sync means served: the NodePort answers at once, no retry loop.
        report = json.loads(run("status", "-o", "json").stdout)
        port = next(s for s in report["services"] if s["service"] == long_name)["ports"][0].split()[-1]
        assert [n["sync"] for n in report["nodes"] if n["agent"] == "running"] == ["in sync", "in sync"]
        assert {p["pod"] for p in report["pods"]} == {"web-a", "web-b"}
        answer = run("node-exec", "client", "--", "curl", "-sS", "--max-time", "3", f"http://198.18.0.11:{port}/")
        assert answer.returncode == 0 and json.loads(answer.stdout)["pod"] in {"web-a", "web-b"}, answer.stderr
        assert yaml.safe_load(run("status", "-o", "yaml").stdout)["lab"] == unique_prefix
        table = run("status").stdout
        assert any(long_name in line and "NodePort" in line for line in table.splitlines()), table
        listed = run("inspect", "node-1", "service", "list")
        assert listed.returncode == 0 and long_name in listed.stdout, listed.stderr
        assert run("inspect", "node-1", "drift").returncode == 0
        # One line each, never a traceback.
        for args, stdin, rc, line in [
            (("apply", "-f", str(tmp_path / "nope.yaml")), None, 1, "nope.yaml: No such file or directory"),
            (("apply", "-f", "-"), "apiVersion: v1\nkind: Service\nmetadata: {name: bad}\nspec: {port: 80}\n",
             1, ".spec.port: field not declared in schema"),
            (("exec", "web-a", "--", "no-such-program"), None, 127, "no-such-program: command not found"),
        ]:
            r = run(*args, stdin=stdin)
            assert r.returncode == rc and line in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert run("delete", "pod", "web-a", "--grace-period", "0").stdout.strip() == "deleted"
    finally:
        down = run("down")
    assert down.returncode == 0, down.stderr
    assert lab_leftovers(unique_prefix) == []


def test_cli_never_guesses_between_several_labs(tmp_path):
    """Without --prefix and with two labs under the state root, a command asks which."""
    for name in ("es-one", "es-two"):
        (tmp_path / name).mkdir()
    env = {k: v for k, v in os.environ.items() if k != "EBPFSVC_LAB_PREFIX"}
    r = subprocess.run([sys.executable, "-m", "ebpfsvc.cli", "lab", "status"], capture_output=True, text=True,
                       timeout=60, env={**env, "EBPFSVC_LAB_ROOT": str(tmp_path)})
    assert r.returncode == 1
    assert r.stderr.strip() == "Error: 2 labs run here (es-one, es-two): say which with --prefix or $EBPFSVC_LAB_PREFIX"
