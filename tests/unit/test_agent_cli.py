"""`ebpfsvc agent --config FILE`: keys are flag names; a typo is an error, not a silent default."""

from click.testing import CliRunner

from ebpfsvc.cli import agent as agent_cli


def _run(tmp_path, monkeypatch, text, *args):
    captured = {}
    monkeypatch.setattr(agent_cli, "start_agent", lambda cfg: type("A", (), {"run_forever": lambda self: captured.update(cfg=cfg)})())
    conf = tmp_path / "c.yaml"
    conf.write_text(text)
    result = CliRunner().invoke(agent_cli.agent, [f"--config={conf}", *args])
    return result, captured.get("cfg")


def test_flag_names_reach_the_agent_and_command_line_wins(tmp_path, monkeypatch):
    result, cfg = _run(tmp_path, monkeypatch,
                       "uplink: [eth1]\nnode-address: [198.18.0.11]\nservice-cidr: 198.19.0.0/16\nmin_sync_period: 0.2\n",
                       "--node-name=n1", "--service-cidr=198.19.128.0/17")
    assert result.exit_code == 0, result.output
    assert cfg.uplinks == ("eth1",)
    assert [str(a) for a in cfg.node.node_addresses] == ["198.18.0.11"]
    assert cfg.min_sync_interval == 0.2
    assert str(cfg.node.service_cidr) == "198.19.128.0/17"     # the flag beats the file


def test_unknown_key_is_an_error_naming_it(tmp_path, monkeypatch):
    result, cfg = _run(tmp_path, monkeypatch, "uplinks: [eth1]\n", "--node-name=n1")
    assert result.exit_code != 0 and cfg is None
    assert "unknown option(s) uplinks" in result.output


# ---- one line per mistake, never a traceback ---------------------------------------------------

import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from ebpfsvc import abi  # noqa: E402
from ebpfsvc.flags import format_duration, parse_duration  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("args, line", [
    (["--nodeport-addresses", "10.0.0/33"], "--nodeport-addresses 10.0.0/33: not an IPv4 CIDR"),
    (["--node-address", "x"], "--node-address x: not an IPv4 address"),
    (["--hairpin-address", "198.18.0.300"], "--hairpin-address 198.18.0.300: not an IPv4 address"),
    (["--service-cidr", "198.19.0.1/16"], "--service-cidr 198.19.0.1/16: host bits set (did you mean 198.19.0.0/16?)"),
    (["--service-node-port-range", "30000-70000"], "--service-node-port-range 30000-70000: not a port range"),
    (["--healthz-bind-address", "0.0.0.0:http"], "--healthz-bind-address 0.0.0.0:http: not IP:PORT"),
    (["--sync-period", "30 s"], "--sync-period 30 s: not a duration"),
    (["--sync-period", "0s"], "--sync-period 0s: must be more than 0"),
    (["--conntrack-udp-timeout", "1500ms"], "--conntrack-udp-timeout 1500ms: must be whole seconds"),
    (["--conntrack-min", "-1"], "--conntrack-min: -1 is not in the range x>=0."),
    (["--uplink-mode", "ebpf"], "--uplink-mode: 'ebpf' is not one of 'tc', 'xdp'."),
])
def test_a_bad_flag_is_one_line_naming_flag_and_value(tmp_path, monkeypatch, args, line):
    result, cfg = _run(tmp_path, monkeypatch, "", "--node-name=n1", *args)
    assert result.exit_code != 0 and cfg is None
    assert result.output.startswith(f"ebpfsvc agent: {line}"), result.output
    assert result.output.count("\n") == 1 and "Traceback" not in result.output


@pytest.mark.parametrize("text, line", [
    ("nodeport-addresses: [10.0.0/33]\n", "nodeport-addresses: 10.0.0/33: not an IPv4 CIDR"),
    ("node-address: [x]\n", "node-address: x: not an IPv4 address"),
    ("uplink: [eth0\nzone: a\n", "not valid YAML: line 2, column 5: expected ',' or ']', but got ':'"),
    ("- uplink\n", "expected a mapping of option names to values, got list"),
    ("sync-period: forever\n", "sync-period: forever: not a duration (like 30s, 1m0s, 500ms, or seconds)"),
])
def test_a_bad_config_file_is_one_line_naming_file_and_key(tmp_path, monkeypatch, text, line):
    result, cfg = _run(tmp_path, monkeypatch, text, "--node-name=n1")
    assert result.exit_code != 0 and cfg is None
    assert result.output == f"ebpfsvc agent: --config {tmp_path / 'c.yaml'}: {line}\n"


def test_an_unreadable_config_file_is_one_line(tmp_path, monkeypatch):
    conf = tmp_path / "c.yaml"
    conf.write_bytes(b"uplink: [\xff]\n")         # root reads any file; undecodable text is unreadable too
    result = CliRunner().invoke(agent_cli.agent, [f"--config={conf}", "--node-name=n1"])
    assert result.exit_code != 0
    assert result.output.startswith(f"ebpfsvc agent: --config {conf}: cannot read it: ")
    assert result.output.count("\n") == 1
    missing = CliRunner().invoke(agent_cli.agent, [f"--config={tmp_path / 'nope.yaml'}"])
    assert missing.exit_code != 0
    assert missing.output == f"ebpfsvc agent: --config: File '{tmp_path / 'nope.yaml'}' does not exist.\n"


def test_the_real_command_prints_one_line_and_exits_non_zero(tmp_path):
    """`ebpfsvc agent --node-address x` as an operator runs it: stderr is the one line, no traceback."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-m", "ebpfsvc.cli", "agent", "--node-name=n1", "--node-address", "x"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    assert out.stderr == "ebpfsvc agent: --node-address x: not an IPv4 address\n"


# ---- kube-proxy's flags: durations, conntrack ---------------------------------------------------

def test_durations_as_kube_proxy_writes_them():
    assert parse_duration("30s") == 30 and parse_duration("1m0s") == 60 and parse_duration("500ms") == 0.5
    assert parse_duration("1h2m3.5s") == 3723.5 and parse_duration("250us") == 0.00025
    assert parse_duration("2") == 2 and parse_duration(0.2) == 0.2 and parse_duration("0") == 0
    for bad in ("", "s", "1d", "-1s", "1s 2s", "nan", True):
        with pytest.raises(ValueError):
            parse_duration(bad)
    assert [format_duration(s) for s in (0, 0.05, 0.5, 30, 60, 90.5, 3600, 86400)] == \
        ["0s", "50ms", "500ms", "30s", "1m0s", "1m30.5s", "1h0m0s", "24h0m0s"]


def test_sync_periods_take_durations_and_plain_seconds(tmp_path, monkeypatch):
    result, cfg = _run(tmp_path, monkeypatch, "sync-period: 1m0s\nmin-sync-period: 2\n", "--node-name=n1")
    assert result.exit_code == 0, result.output
    assert (cfg.sync_period, cfg.min_sync_interval) == (60.0, 2.0)
    result, cfg = _run(tmp_path, monkeypatch, "", "--node-name=n1", "--sync-period=45s", "--min-sync-period=500ms")
    assert (cfg.sync_period, cfg.min_sync_interval) == (45.0, 0.5)


def test_conntrack_flags_reach_the_datapath_limits(tmp_path, monkeypatch):
    from ebpfsvc.datapath import loader
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    # kube-proxy's defaults: max(32768 x 8 CPUs, 131072) flows, two ct4 entries each; lifetimes = abi.h's.
    result, cfg = _run(tmp_path, monkeypatch, "", "--node-name=n1")
    assert result.exit_code == 0, result.output
    assert cfg.limits == {"ct_entries": 2 * 262144, "ct_tcp_established_s": abi.CT_TIMEOUT_TCP_ESTABLISHED_S,
                          "ct_tcp_close_wait_s": abi.CT_TIMEOUT_TCP_CLOSE_WAIT_S, "ct_udp_s": abi.CT_TIMEOUT_UDP_S,
                          "ct_udp_stream_s": abi.CT_TIMEOUT_UDP_STREAM_S}
    result, cfg = _run(tmp_path, monkeypatch,
                       "conntrack-min: 1000000\nconntrack-udp-timeout: 10s\nconntrack-udp-timeout-stream: 3m0s\n",
                       "--node-name=n1", "--conntrack-tcp-timeout-established=1h", "--conntrack-tcp-timeout-close-wait=0")
    assert result.exit_code == 0, result.output
    assert cfg.limits == {"ct_entries": 2 * 1000000, "ct_tcp_established_s": 3600, "ct_udp_s": 10,
                          "ct_udp_stream_s": 180}         # close-wait 0: the datapath's default
    loader.Limits(**cfg.limits).defines()                # and the loader takes them as they are
    result, cfg = _run(tmp_path, monkeypatch, "", "--node-name=n1", "--conntrack-max-per-core=0")
    assert "ct_entries" not in cfg.limits                # 0: leave the table size alone (kube-proxy's meaning)


def test_service_cidr_is_optional(tmp_path, monkeypatch):
    result, cfg = _run(tmp_path, monkeypatch, "{}\n", "--node-name=n1")
    assert result.exit_code == 0, result.output
    assert cfg.node.service_cidr is None


def test_map_sizes_from_flags_and_the_config_file_reach_the_datapath_limits(tmp_path, monkeypatch):
    from ebpfsvc.datapath import loader
    result, cfg = _run(tmp_path, monkeypatch, "max-maglev-slots: 33554432\nmax-backends: 200000\n",
                       "--node-name=n1", "--max-frontends=100000", "--max-backends=300000")
    assert result.exit_code == 0, result.output
    assert (cfg.limits["maglev_slots"], cfg.limits["backends"], cfg.limits["frontends"]) == (33554432, 300000, 100000)
    defines = loader.Limits(**cfg.limits).defines()
    assert (defines["LB_MAGLEV_SLOTS_MAX"], defines["LB_BACKENDS_MAX"]) == (33554432, 300000)
    result, cfg = _run(tmp_path, monkeypatch, "", "--node-name=n1", "--max-backends=0")
    assert result.exit_code != 0 and "--max-backends" in result.output and "Traceback" not in result.output


def test_defaults_live_in_one_place():
    """The agent, `drift` and the inspection commands take --pin-dir and --service-node-port-range
    defaults from ebpfsvc.config, and parse port ranges one way."""
    from ebpfsvc import config
    from ebpfsvc.cli import agent as agent_cli, inspect as inspect_cli

    def default(cmd, name):
        return next(p.default for p in cmd.params if p.name == name)

    assert default(agent_cli.agent, "pin_dir") == default(inspect_cli.drift, "pin_dir") == config.DEFAULT_PIN_DIR
    assert default(inspect_cli.why, "pin_dir") == config.DEFAULT_PIN_DIR
    assert default(agent_cli.agent, "service_node_port_range") == default(
        inspect_cli.drift, "service_node_port_range") == "30000-32767"
    assert type(next(p for p in inspect_cli.drift.params if p.name == "service_node_port_range").type) is \
        type(next(p for p in agent_cli.agent.params if p.name == "service_node_port_range").type)
    assert config.NodeConfig("n").nodeport_range == config.parse_port_range("30000-32767") == (30000, 32767)


# ---- --ip-families (issue 14) -------------------------------------------------------------------

def test_ip_families_default_to_ipv4_and_take_dual_stack_from_flag_or_file(tmp_path, monkeypatch):
    # The default is auto: IPv4 to start with, then the families of the cluster's ServiceCIDRs.
    result, cfg = _run(tmp_path, monkeypatch, "", "--node-name=n1")
    assert result.exit_code == 0, result.output
    assert cfg.node.ip_families == ("IPv4",) and cfg.ip_families_auto
    result, cfg = _run(tmp_path, monkeypatch, "ip-families: auto\n", "--node-name=n1")
    assert result.exit_code == 0, result.output
    assert cfg.node.ip_families == ("IPv4",) and cfg.ip_families_auto
    result, cfg = _run(tmp_path, monkeypatch, "ip-families: IPv4,IPv6\n", "--node-name=n1")
    assert result.exit_code == 0, result.output
    assert cfg.node.ip_families == ("IPv4", "IPv6") and not cfg.ip_families_auto     # an override
    result, cfg = _run(tmp_path, monkeypatch, "ip-families: IPv4,IPv6\n", "--node-name=n1", "--ip-families=IPv6")
    assert cfg.node.ip_families == ("IPv6",)                         # the flag beats the file
    result, cfg = _run(tmp_path, monkeypatch, "ip-families: IPv6\n", "--node-name=n1", "--ip-families=auto")
    assert cfg.ip_families_auto and cfg.node.ip_families == ("IPv4",)


@pytest.mark.parametrize("args, line", [
    (["--ip-families", "IPv5"], "--ip-families IPv5: 'IPv5': not an IP family (IPv4, IPv6, or IPv4,IPv6)"),
    (["--ip-families", "IPv4,IPv4"], "--ip-families IPv4,IPv4: IPv4 is given twice"),
    (["--ip-families", "IPv6", "--service-cidr", "198.19.0.0/16"],
     "--service-cidr 198.19.0.0/16: an IPv4 setting, but --ip-families IPv6 serves no IPv4"),
    (["--ip-families", "IPv6", "--node-address", "198.18.0.11"],
     "--node-address 198.18.0.11: an IPv4 setting, but --ip-families IPv6 serves no IPv4"),
])
def test_a_bad_ip_family_setting_is_one_line(tmp_path, monkeypatch, args, line):
    result, cfg = _run(tmp_path, monkeypatch, "", "--node-name=n1", *args)
    assert result.exit_code != 0 and cfg is None
    assert result.output == f"ebpfsvc agent: {line}\n", result.output
