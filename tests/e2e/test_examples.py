"""Every example manifest, applied with the real kubectl to the real API server, checked on the wire.

`kubectl apply -f examples/` and `kubectl apply -f examples/lab/pods.yaml` are what a reader of
the README types; the API server defaults and validates them, the real EndpointSlice and
mirroring controllers make the slices, and the agents (deploy/'s configuration) program them.
Each Service of examples/ is then checked from a pod or from the external client, by what it
must do: answer from one of its pods, refuse (no endpoints: RST at once), or not be programmed
at all (headless, ExternalName). A Service added to examples/ without a check fails the test.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml

from ebpfsvc.lab import Lab, controlplane

from .helpers import (connect_outcome, exchange, frontend, http_get, programmed_services, table_backends,
                      wait_for, wait_programmed)

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
PYTHON_PODS = {"pod-python-1", "pod-python-2", "pod-python-3"}
MYAPP_PODS = {"myapp-1", "myapp-2", "myapp-3"}
PING = b"PING\r\nQUIT\r\n"

# service -> (clusterIP, port, what a pod sees)
ANSWERS_HTTP = {
    "service-python": ("198.19.0.20", 3000, PYTHON_PODS),
    "myapp-svc": ("198.19.0.60", 80, MYAPP_PODS),
    "myapp-sticky": ("198.19.0.61", 80, MYAPP_PODS),
}
ANSWERS_REDIS = {
    "mwish-bot-svc": ("198.19.0.50", 9527),          # port 9527 -> targetPort 6379
    "mwish-bot-svc-redis": ("198.19.0.51", 6379),    # manual Endpoints, mirrored into a slice
    "mwish-bot-sticky": ("198.19.0.52", 6379),
}
# Selectors that match no pod: the ClusterIP refuses at once (kube-proxy's REJECT).
REFUSES = {
    "my-service": ("198.19.0.10", 80), "nginx-service": ("198.19.0.11", 80),
    "app-protocol-http": ("198.19.0.12", 8080), "named-port-http": ("198.19.0.13", 8080),
    "my-service-aws": ("198.19.0.23", 80), "my-service-external-ips": ("198.19.0.24", 80),
    "my-app-service": ("198.19.0.40", 80), "my-app-external-ips": ("198.19.0.41", 80),
}
# Hand-written endpoints at addresses no lab pod has: programmed with exactly those backends.
PROGRAMMED_ONLY = {
    "plat-dev": ("198.19.0.30", 3306, {("198.18.1.109", 3306)}),
    "example": ("198.19.0.31", 80, {("198.18.1.3", 80)}),
    "example-hints": ("198.19.0.32", 80, None),      # backends as its slice says (checked in unit tests)
}
NOT_PROGRAMMED = {"service-python-externalname", "mysql-balance-svc"}
# From the external client, which routes 198.18.200.0/24 via node-1.
NORTH_SOUTH = {
    "service-python-nodeport": ("198.18.0.11", 30080, "http", PYTHON_PODS),
    "service-python-lb": ("198.18.200.10", 3000, "http", {"pod-python-1"}),   # Local: node-1's pod only
    "mwish-bot-nodeport": ("198.18.0.12", 31234, "redis", None),
}
EXTERNAL_REFUSES = {"my-service-external-ips": ("198.18.200.32", 80), "my-app-external-ips": ("198.18.200.12", 80)}


def example_services() -> set[str]:
    names = set()
    for path in EXAMPLES.glob("*.yaml"):
        names |= {d["metadata"]["name"] for d in yaml.safe_load_all(path.read_text()) if d and d["kind"] == "Service"}
    return names


def test_every_example_service_has_a_check():
    checked = {*ANSWERS_HTTP, *ANSWERS_REDIS, *REFUSES, *PROGRAMMED_ONLY, *NOT_PROGRAMMED, *NORTH_SOUTH}
    assert checked == example_services()


def kubectl(lab: Lab, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([controlplane.binary("kubectl"), "--kubeconfig", str(lab.kubeconfig), *args],
                          capture_output=True, text=True, timeout=60)


def external_http(lab: Lab, host: str, port: int) -> dict:
    r = lab.external_exec("client", ["curl", "-sS", "--max-time", "3", f"http://{host}:{port}/"])
    assert r.returncode == 0, f"{host}:{port}: {r.stderr}"
    return json.loads(r.stdout)


@pytest.mark.root
def test_examples_applied_with_kubectl_work_on_the_wire(lab: Lab):
    applied = kubectl(lab, "apply", "-f", str(EXAMPLES))
    assert applied.returncode == 0, applied.stderr
    pods = kubectl(lab, "apply", "-f", str(EXAMPLES / "lab" / "pods.yaml"))
    assert pods.returncode == 0, pods.stderr
    pod_names = [p["metadata"]["name"] for p in yaml.safe_load((EXAMPLES / "lab" / "pods.yaml").read_text())["items"]]
    lab.wait_ready(pod_names, timeout=60)
    wait_programmed(lab, "service-python", 3000, 3)
    wait_programmed(lab, "mwish-bot-svc-redis", 6379, 2)

    for svc, (vip, port, expected) in ANSWERS_HTTP.items():
        seen = {http_get(lab, "toolbox", vip, port)["pod"] for _ in range(6)}
        assert seen <= expected, svc
        if svc.endswith("sticky"):
            assert len(seen) == 1, f"{svc}: ClientIP affinity, yet {seen}"
    for svc, (vip, port) in ANSWERS_REDIS.items():
        assert b"+PONG" in exchange(lab, "toolbox", vip, port, PING), svc
    for svc, (vip, port) in REFUSES.items():
        wait_for(lambda: frontend(lab, "node-1", vip, port) is not None, what=f"{svc} programmed")
        assert connect_outcome(lab, "toolbox", vip, port) == "refused", svc
    for svc, (vip, port, backends) in PROGRAMMED_ONLY.items():
        wait_for(lambda: frontend(lab, "node-1", vip, port) is not None, what=f"{svc} programmed")
        if backends is not None:
            assert table_backends(lab, "node-1", frontend(lab, "node-1", vip, port)) == backends, svc
    programmed = {name.split("/")[1].split(":")[0] for name in programmed_services(lab, "node-1")}
    assert not programmed & NOT_PROGRAMMED

    for svc, (host, port, kind, expected) in NORTH_SOUTH.items():
        if kind == "http":
            seen = {wait_for(lambda: _try(lambda: external_http(lab, host, port)), what=svc)["pod"]
                    for _ in range(4)}
            assert seen <= expected, svc
        else:
            r = lab.external_exec("client", ["redis-cli", "-h", host, "-p", str(port), "ping"])
            assert r.stdout.strip() == "PONG", f"{svc}: {r.stdout} {r.stderr}"
    for svc, (host, port) in EXTERNAL_REFUSES.items():
        r = lab.external_exec("client", ["curl", "-sS", "--max-time", "3", f"http://{host}:{port}/"])
        assert r.returncode == 7, f"{svc}: curl exit {r.returncode} ({r.stderr.strip()}), not refused"


def _try(fn):
    try:
        return fn()
    except AssertionError:
        return None
