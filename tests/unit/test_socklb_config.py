"""--socket-lb and --socket-lb-cgroup (docs/socklb.md): where the cgroup2 hierarchy is, and
one line naming the flag for every bad value, before anything starts."""

from click.testing import CliRunner

from ebpfsvc.cli import agent as agent_cli
from ebpfsvc.datapath import socklb

HYBRID = """\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
"""
UNIFIED = "30 23 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate\n"
V1_ONLY = "32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu\n"


def test_cgroup2_mount_is_read_not_assumed(tmp_path):
    info = tmp_path / "mountinfo"
    for text, where in ((HYBRID, "/sys/fs/cgroup/unified"), (UNIFIED, "/sys/fs/cgroup")):
        info.write_text(text)
        assert str(socklb.cgroup2_mount(info)) == where
    info.write_text(V1_ONLY)
    try:
        socklb.cgroup2_mount(info)
        raise AssertionError("a machine without cgroup2 has no mount to report")
    except socklb.CgroupError as e:
        assert "no cgroup2 file system mounted" in str(e)


def _run(monkeypatch, *args):
    captured = {}
    monkeypatch.setattr(agent_cli, "start_agent",
                        lambda cfg: type("A", (), {"run_forever": lambda self: captured.update(cfg=cfg)})())
    return CliRunner().invoke(agent_cli.agent, ["--node-name=n1", *args]), captured.get("cfg")


def test_off_by_default(monkeypatch):
    result, cfg = _run(monkeypatch)
    assert result.exit_code == 0, result.output
    assert cfg.socket_lb is False and cfg.socket_lb_cgroup is None


def test_on_without_a_cgroup_is_one_line(monkeypatch):
    result, cfg = _run(monkeypatch, "--socket-lb")
    assert cfg is None and result.exit_code != 0
    assert result.output == "ebpfsvc agent: --socket-lb: needs --socket-lb-cgroup " \
                            "(the cgroup v2 directory of the node's pods)\n"


def test_the_root_or_a_missing_cgroup_is_one_line(monkeypatch):
    root = socklb.cgroup2_mount()
    for value, problem in ((str(root), "the cgroup2 root"), ("ebpfsvc-no-such-cgroup", "not a cgroup v2 directory")):
        result, cfg = _run(monkeypatch, "--socket-lb", f"--socket-lb-cgroup={value}")
        assert cfg is None and result.exit_code != 0
        assert result.output.startswith("ebpfsvc agent: --socket-lb-cgroup") and problem in result.output, result.output
        assert result.output.count("\n") == 1 and "Traceback" not in result.output


def test_auto_finds_the_kubelet_cgroup_in_the_hosts_hierarchy_mounted_last(tmp_path):
    """deploy/: the agent's container has its own cgroup2 mount and the host's, from a hostPath,
    mounted after it; `auto` takes kubepods.slice (systemd driver) or kubepods (cgroupfs) from the
    last mount that has one, and a node with neither is one line."""
    own, host = tmp_path / "own", tmp_path / "host"
    for d in (own, host / "kubepods", host / "kubepods.slice"):
        d.mkdir(parents=True)
        (d / "cgroup.procs").write_text("")
    info = tmp_path / "mountinfo"
    info.write_text(f"30 23 0:26 / {own} rw - cgroup2 cgroup2 rw\n"
                    f"31 23 0:27 / /proc rw - proc proc rw\n"
                    f"40 23 0:26 / {host} ro - cgroup2 cgroup2 rw\n")
    assert socklb.cgroup2_mounts(info) == [own, host] and socklb.cgroup2_mount(info) == own
    assert socklb.find_kubelet_cgroup(info) == host / "kubepods.slice"
    assert socklb.resolve_cgroup(socklb.AUTO, info) == host / "kubepods.slice"
    (host / "kubepods.slice" / "cgroup.procs").unlink()
    assert socklb.resolve_cgroup("auto", info) == host / "kubepods", "the cgroupfs driver's name"
    assert socklb.resolve_cgroup(host / "kubepods", info) == host / "kubepods", "an absolute path in the second mount"
    (host / "kubepods" / "cgroup.procs").unlink()
    try:
        socklb.resolve_cgroup("auto", info)
        raise AssertionError("no kubelet cgroup: nothing to attach to")
    except socklb.CgroupError as e:
        assert str(e) == f"--socket-lb-cgroup auto: no kubepods.slice or kubepods below the cgroup2 mounts ({own}, {host})"
    for root in (own, host):
        try:
            socklb.resolve_cgroup(root, info)
            raise AssertionError("a hierarchy's root is never a target")
        except socklb.CgroupError as e:
            assert "the cgroup2 root" in str(e)


def test_auto_is_resolved_when_the_agent_starts(monkeypatch):
    # At parse time `auto` stays `auto`: a node without cgroup2 or kubelet cgroup keeps the TC path
    # (the agent logs it) rather than failing to start.
    result, cfg = _run(monkeypatch, "--socket-lb", "--socket-lb-cgroup=auto")
    assert result.exit_code == 0, result.output
    assert cfg.socket_lb is True and cfg.socket_lb_cgroup == "auto"
