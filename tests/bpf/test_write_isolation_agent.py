"""A real agent whose map writes the kernel refuses for one Service (issue 11, isolation): every other
Service is programmed, the refused one keeps its last good version, is named with the map in the log,
the metrics, /healthz's detail and `ebpfsvc service list`, and is programmed by a retry with back-off
once the map takes it, with no change in the cluster to trigger it.  Packets through the datapath
(BPF_PROG_TEST_RUN), exact bytes."""

from __future__ import annotations

import errno
import ipaddress
import json
import logging

import pytest
from click.testing import CliRunner
from prometheus_client import generate_latest

from ebpfsvc import abi
from ebpfsvc.cli import main
from ebpfsvc.datapath import writer as writer_mod

from .test_inspect_agent import wait_for
from .test_last_good import service as last_good_service, start_agent, syn_goes_to

pytestmark = pytest.mark.root

REFUSED = "198.18.1.99"         # the backend lb4_backends refuses (ENOSPC), as a map full at that key


def service(name: str, vip: str, ep: str) -> str:
    return last_good_service(name, vip, ep=ep)


def test_a_refused_service_costs_only_itself_and_is_retried(tmp_path, pin_dir, unique_prefix, monkeypatch,
                                                           caplog):
    from ebpfsvc.datapath import loader

    mdir = tmp_path / "manifests"
    mdir.mkdir()
    for i in range(1, 4):
        (mdir / f"s{i}.yaml").write_text(service(f"s{i}", f"198.19.0.6{i}", f"198.18.1.6{i}"))
    refusing = {"on": True}
    real = writer_mod._update_records
    bad = abi.be32(ipaddress.IPv4Address(REFUSED))

    def update_records(table, keys, values):
        # A backend entry (BackendEntry's four fields, address first) for the refused address.
        if refusing["on"] and any(type(v) is not bytes and len(v) == 4 and v[0] == bad for v in values):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(table, keys, values)

    monkeypatch.setattr(writer_mod, "_update_records", update_records)
    caplog.set_level(logging.INFO)
    agent = start_agent(pin_dir, mdir, unique_prefix)
    try:
        assert syn_goes_to(agent, "198.19.0.62", "198.18.1.62", 40000)
        # s2's endpoint moves to the refused backend, s3's to another, s4 is new: one sync.
        (mdir / "s2.yaml").write_text(service("s2", "198.19.0.62", REFUSED))
        (mdir / "s3.yaml").write_text(service("s3", "198.19.0.63", "198.18.1.73"))
        (mdir / "s4.yaml").write_text(service("s4", "198.19.0.64", "198.18.1.64"))
        sports = iter(range(41000, 60000))
        wait_for(lambda: syn_goes_to(agent, "198.19.0.64", "198.18.1.64", next(sports)), "s4 programmed")
        wait_for(lambda: ("default", "s2") in agent.admission.reported, "s2 reported")
        assert syn_goes_to(agent, "198.19.0.63", "198.18.1.73", next(sports))
        assert syn_goes_to(agent, "198.19.0.61", "198.18.1.61", next(sports))
        assert syn_goes_to(agent, "198.19.0.62", "198.18.1.62", next(sports)), "s2's last good version is gone"
        reason, detail = agent.admission.reported[("default", "s2")]
        assert (reason, detail) == ("failure", "lb4_backends: No space left on device; its last good version stays")
        lines = [r.getMessage() for r in caplog.records if "default/s2" in r.getMessage()]
        assert lines == [f"Service default/s2 not programmed (failure): {detail}"], lines
        metrics = generate_latest(agent.telemetry.metrics.registry).decode()
        assert 'ebpfsvc_map_write_failures_total{map="lb4_backends"} 1.0' in metrics
        assert 'ebpfsvc_services_not_programmed{reason="failure"} 1.0' in metrics
        assert agent.admission.details()["notProgrammed"] == {"default/s2": f"failure: {detail}"}
        res = CliRunner().invoke(main, ["service", "list", "--pin-dir", str(pin_dir), "-o", "json"])
        rows = {r["service"]: r for r in json.loads(res.output)}
        assert rows["default/s2"]["not_programmed"] == f"failure: {detail}", rows
        assert agent.runner.failures == 0       # no failed sync: the others went through

        # The map takes it now: the back-off's retry programs s2 with nothing changed in the cluster.
        refusing["on"] = False
        wait_for(lambda: syn_goes_to(agent, "198.19.0.62", REFUSED, next(sports)), "s2 retried")
        wait_for(lambda: ("default", "s2") not in agent.admission.reported, "s2's report cleared")
        res = CliRunner().invoke(main, ["service", "list", "--pin-dir", str(pin_dir), "-o", "json"])
        assert "default/s2" not in {r["service"] for r in json.loads(res.output)}
    finally:
        agent.stop()
        if agent.datapath is not None:
            agent.datapath.close()
        loader.drop_cache()
