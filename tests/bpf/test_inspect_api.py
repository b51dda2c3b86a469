"""Drift and health with the API server as the source (the fake API server,
spoken to by the stock kubernetes client through a kubeconfig).

- `ebpfsvc drift --kubeconfig`: no drift while the maps hold what the API says;
  exit 1, naming the backend, once the API changes and nobody programs it.
- The real agent on the API: healthy once synced; when the API goes away its
  periodic resyncs keep completing, so /healthz stays 200 (kube-proxy's
  meaning) while the body reports the source's errors; watch errors show in
  /metrics.
"""

from __future__ import annotations

import copy
import json
import urllib.error
import urllib.request

import pytest
from click.testing import CliRunner

from ebpfsvc.agent import Agent, AgentConfig
from ebpfsvc.cli import main
from ebpfsvc.config import NodeConfig
from ebpfsvc.inspect.desired import load_desired

from fakeapi import FakeApiServer  # noqa: I001 - tests/ is on sys.path (tests/conftest.py's folder)

from .test_inspect_agent import LIMITS, wait_for

pytestmark = pytest.mark.root

NODE = "node-1"
VIP = "198.19.0.50"

SERVICE = {"metadata": {"name": "api-web", "namespace": "default"},
           "spec": {"type": "ClusterIP", "clusterIP": VIP, "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]}}
SLICE = {"metadata": {"name": "api-web-1", "namespace": "default",
                      "labels": {"kubernetes.io/service-name": "api-web"}},
         "addressType": "IPv4", "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
         "endpoints": [{"addresses": ["198.18.2.50"], "nodeName": "node-2", "conditions": {"ready": True}}]}


@pytest.fixture
def api():
    with FakeApiServer() as server:
        server.create("Service", copy.deepcopy(SERVICE))
        server.create("EndpointSlice", copy.deepcopy(SLICE))
        yield server


@pytest.fixture
def kubeconfig(api, tmp_path):
    return api.write_kubeconfig(tmp_path / "kubeconfig")


def drift(pin_dir, kubeconfig):
    res = CliRunner().invoke(main, ["drift", "--pin-dir", str(pin_dir), "--kubeconfig", kubeconfig,
                                    "--node-name", NODE, "-o", "json", "--timeout", "20"])
    return res.exit_code, json.loads(res.output) if res.output.startswith("{") else res.output


def test_drift_against_the_api_server(api, kubeconfig, writer, pin_dir):
    writer.apply(load_desired(NodeConfig(node_name=NODE), kubeconfig=kubeconfig))
    code, out = drift(pin_dir, kubeconfig)
    assert code == 0 and out["drift"] is False and out["frontends"] == 1

    grown = copy.deepcopy(SLICE)
    grown["endpoints"].append({"addresses": ["198.18.2.51"], "nodeName": "node-2", "conditions": {"ready": True}})
    api.update("EndpointSlice", grown)
    code, out = drift(pin_dir, kubeconfig)
    assert code == 1 and out["drift"] is True
    (d,) = out["differences"]
    assert d["frontend"] == f"{VIP}:80/TCP (internal)" and "missing ['198.18.2.51:8080/TCP']" in d["problem"]


def get(url):
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_agent_stays_healthy_when_the_api_is_lost(api, kubeconfig, pin_dir, unique_prefix):
    from ebpfsvc.datapath import loader

    cfg = AgentConfig(node=NodeConfig(node_name=NODE), pin_dir=str(pin_dir), kubeconfig=kubeconfig,
                      pod_interfaces=(f"{unique_prefix}-none*",), limits=LIMITS,
                      healthz_bind_address="127.0.0.1:0", metrics_bind_address="127.0.0.1:0", sync_period=1.0)
    agent = Agent(cfg)
    try:
        agent.start()
        healthz = f"http://127.0.0.1:{agent.telemetry.healthz_server.port}/healthz"
        metrics = f"http://127.0.0.1:{agent.telemetry.metrics_server.port}/metrics"
        wait_for(agent.synced_once.is_set, "first sync from the API")
        assert get(healthz)[0] == 200

        api.go_down()
        lost_at = agent.telemetry.clock()
        # Syncs keep completing after the API is gone...
        wait_for(lambda: (agent.telemetry.health.last_updated or 0) > lost_at + 1.0, "a resync after API loss")
        # ...and the source reports its failures.
        body = wait_for(lambda: (r := get(healthz)) and any(
            v["errors"] for v in json.loads(r[1]).get("source", {}).values()) and r, "source errors in /healthz")
        code, text = body
        assert code == 200 and json.loads(text)["state"] == "synced"
        m = get(metrics)[1]
        errors = [ln for ln in m.splitlines() if ln.startswith("ebpfsvc_watch_errors_total{")]
        assert errors and any(float(ln.rsplit(" ", 1)[1]) > 0 for ln in errors)
        api.come_up()
    finally:
        agent.stop()
        if agent.datapath is not None:
            agent.datapath.close()
        loader.drop_cache()
