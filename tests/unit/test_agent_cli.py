"""`ebpfsvc agent --config FILE`: keys are flag names; a typo is an error, not a silent default."""

from click.testing import CliRunner

from ebpfsvc import agent_cli


def _run(tmp_path, monkeypatch, text, *args):
    captured = {}
    monkeypatch.setattr(agent_cli, "Agent", lambda cfg: type("A", (), {"run_forever": lambda self: captured.update(cfg=cfg)})())
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


def test_service_cidr_is_optional(tmp_path, monkeypatch):
    result, cfg = _run(tmp_path, monkeypatch, "{}\n", "--node-name=n1")
    assert result.exit_code == 0, result.output
    assert cfg.node.service_cidr is None
