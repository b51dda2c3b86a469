"""A Service with more than 100 endpoints: several EndpointSlices merged into one backend set.

105 real listeners, one per pod (socat: a few hundred kB each, so 105 pods stay cheap), behind
one Service; the lab's EndpointSlice controller splits them into slices of at most 100.  Every
one of the 105 must be in each node's Maglev table and answer through the clusterIP.
"""

from __future__ import annotations

import pytest

from .helpers import (add_clients, answered_by, bare_pod, cluster_ip, frontend, line_get, service, table_backends,
                      wait_for, wait_programmed, wait_ready)

pytestmark = pytest.mark.root

COUNT = 105
PORT = 7000


def test_more_than_100_endpoints_over_several_slices(lab):
    pods = [f"many-{i:03d}" for i in range(COUNT)]
    # Each connection gets its pod's name and is closed: who answered, with no per-pod app.
    server = ["socat", f"TCP-LISTEN:{PORT},fork,reuseaddr", "EXEC:printenv POD_NAME"]
    lab.apply([bare_pod(name, "node-1" if i % 2 else "node-2", labels={"app": "many"}, command=server,
                        ports=[{"name": "serve", "containerPort": PORT}]) for i, name in enumerate(pods)]
              + [service("many", [{"port": 80, "targetPort": "serve"}], selector={"app": "many"})])
    add_clients(lab, {"many-client": "node-1"})
    wait_ready(lab, pods)

    slices = lab.endpoint_slices("many")
    assert sorted(len(s["endpoints"]) for s in slices) == [COUNT - 100, 100]
    wait_programmed(lab, "many", 80, backends=COUNT)
    vip = cluster_ip(lab, "many")
    addresses = {(lab.pod_ip(p), PORT) for p in pods}
    for node in ("node-1", "node-2"):
        assert table_backends(lab, node, frontend(lab, node, vip, 80)) == addresses

    # Listening? (started is ready for pods without a probe): ask each one directly once.
    for pod in pods:
        wait_for(lambda: line_get(lab, "many-client", lab.pod_ip(pod), PORT) == pod, what=f"{pod} listening")

    # Through the Service until every backend answered.  Each new connection hashes to one of
    # ~105 equal table shares; after 3000 the chance that one backend was never hit is below
    # 105 * (1 - 1/105)^3000 < 1e-10 (about 550 are needed on average).
    seen = answered_by(lambda: line_get(lab, "many-client", vip, 80), pods, limit=3000)
    assert seen == set(pods), f"{COUNT - len(seen & set(pods))} backends never answered; strangers: {seen - set(pods)}"
