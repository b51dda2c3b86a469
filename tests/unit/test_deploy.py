"""deploy/ and vagrant/: what can be checked without a cluster or a VM.

- Every manifest validates offline against the Kubernetes API types: the `kubernetes` client's model
  classes, walked strictly (an unknown field anywhere is an error, as with `kubectl apply
  --validate=strict`), then deserialised (required fields, through the models' own checks); plus
  the API server's rules a schema cannot say (Bidirectional propagation only in privileged
  containers, mounts name volumes, env references exist).
- The DaemonSet: kube-proxy's shape (host network, probes on 10256, every taint tolerated), the
  capabilities exactly the documented set, each with its reason, and its command line and config
  file accepted by the real `ebpfsvc agent` command.
- The RBAC is read-only (write verbs on events only).
- Scripts pass `bash -n` and shellcheck; the Vagrantfile passes `ruby -c` and `vagrant validate`;
  the kernel-headers init script and the image entrypoint behave on fake header trees.
- As root: the capability set is enough to load, pin and attach a SCHED_CLS program, and less is
  not; the host-gw route script sets up a node's routes in a network namespace.
"""

from __future__ import annotations

import ipaddress
import os
import re
import shutil
import sys
import subprocess
from pathlib import Path

import pytest
import yaml

kubernetes = pytest.importorskip("kubernetes")
from kubernetes import client as k8s  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
VAGRANT = ROOT / "vagrant"
DOCS = ROOT / "docs" / "deploy.md"

# The agent container's capabilities: this set, no more, no less (deploy/daemonset.yaml says why).
AGENT_CAPS = {"BPF", "NET_ADMIN", "PERFMON", "SYS_RESOURCE", "SYS_ADMIN", "SYS_PTRACE"}
# Of those, what only the socket path's reset pass needs (setns, /proc/PID/ns of other users). SYS_ADMIN
# also grants BPF, NET_ADMIN and PERFMON: the TC path's own set is checked without these.
SOCKET_RESET_CAPS = {"SYS_ADMIN", "SYS_PTRACE"}
HEALTHZ_PORT = 10256
READ_VERBS = {"get", "list", "watch"}
EVENT_WRITE_VERBS = {"create", "patch"}


def load_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def manifest_files() -> list[Path]:
    files = sorted(p for p in DEPLOY.glob("*.yaml") if p.name != "kustomization.yaml")
    files += sorted((VAGRANT / "manifests").glob("*.yaml"))
    files += sorted(p for p in (VAGRANT / "ebpfsvc").glob("*.yaml") if p.name != "kustomization.yaml")
    return files


def deploy_objects() -> dict[tuple[str, str], dict]:
    """(kind, name) -> object, for everything deploy/kustomization.yaml installs."""
    kust = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
    objs = {}
    for res in kust["resources"]:
        for doc in load_docs(DEPLOY / res):
            objs[(doc["kind"], doc["metadata"]["name"])] = doc
    return objs


def daemonset() -> dict:
    return deploy_objects()[("DaemonSet", "ebpfsvc")]


def pod_spec() -> dict:
    return daemonset()["spec"]["template"]["spec"]


def agent_container() -> dict:
    (c,) = [c for c in pod_spec()["containers"] if c["name"] == "agent"]
    return c


# --- offline schema validation with the kubernetes client's models ---------------------------------

def _model_for(api_version: str, kind: str) -> str:
    group_version = api_version.split("/")[-1]            # apps/v1 -> v1
    return f"{group_version.capitalize()}{kind}"           # V1DaemonSet


def strict_walk(value, type_name: str, path: str, errors: list[str]) -> None:
    """Check `value` against the client's type `type_name`; unknown fields are errors."""
    # The client spells containers `list[X]`/`dict(str, X)` in older releases, `List[X]`/`Dict[str, X]` now.
    if m := re.fullmatch(r"(?:list|List)\[(.*)\]", type_name):
        if not isinstance(value, list):
            errors.append(f"{path}: expected a list, got {type(value).__name__}")
            return
        for i, item in enumerate(value):
            strict_walk(item, m.group(1), f"{path}[{i}]", errors)
    elif m := re.fullmatch(r"(?:dict\(|Dict\[)[^,]*, (.*)[)\]]", type_name):
        inner = m.group(1)
        if not isinstance(value, dict):
            errors.append(f"{path}: expected a mapping, got {type(value).__name__}")
            return
        for k, v in value.items():
            strict_walk(v, inner, f"{path}.{k}", errors)
    elif type_name == "str":
        if not isinstance(value, str):
            errors.append(f"{path}: expected a string, got {value!r} (quote it)")
    elif type_name == "int":
        if not isinstance(value, int) or isinstance(value, bool):
            errors.append(f"{path}: expected an integer, got {value!r}")
    elif type_name == "bool":
        if not isinstance(value, bool):
            errors.append(f"{path}: expected a boolean, got {value!r}")
    elif type_name in ("object", "datetime", "date", "float", "bytes"):
        pass                                               # IntOrString, Quantity-as-object, times
    else:
        model = getattr(k8s, type_name)
        if not isinstance(value, dict):
            errors.append(f"{path}: expected a {type_name} mapping, got {value!r}")
            return
        by_json = {json_key: attr for attr, json_key in model.attribute_map.items()}
        for key, item in value.items():
            if key not in by_json:
                errors.append(f"{path}.{key}: unknown field of {type_name}")
                continue
            strict_walk(item, model.openapi_types[by_json[key]], f"{path}.{key}", errors)


def validate(doc: dict) -> list[str]:
    type_name = _model_for(doc["apiVersion"], doc["kind"])
    assert hasattr(k8s, type_name), f"no model {type_name} for {doc['apiVersion']} {doc['kind']}"
    errors: list[str] = []
    strict_walk(doc, type_name, doc["kind"], errors)
    if not errors:
        try:      # required fields and enum checks, by the models' own constructors
            k8s.ApiClient()._ApiClient__deserialize(doc, type_name)
        except (ValueError, TypeError) as e:
            errors.append(f"{doc['kind']}: {e}")
    return errors


@pytest.mark.parametrize("path", manifest_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_manifest_validates_against_kubernetes_schema(path):
    docs = load_docs(path)
    assert docs, f"{path} has no documents"
    for doc in docs:
        assert validate(doc) == [], f"{path}: {doc['kind']} {doc['metadata']['name']}"


def test_strict_validation_catches_unknown_and_mistyped_fields():
    ds = daemonset()
    bad = yaml.safe_load(yaml.safe_dump(ds))
    bad["spec"]["template"]["spec"]["hostNetwrok"] = True
    bad["spec"]["template"]["spec"]["containers"][0]["securityContext"]["capabilities"]["add"] = "BPF"
    del bad["spec"]["template"]["spec"]["containers"][0]["name"]
    errors = validate(bad)
    assert any("hostNetwrok: unknown field" in e for e in errors)
    assert any("capabilities.add: expected a list" in e for e in errors)
    del bad["spec"]["template"]["spec"]["hostNetwrok"]
    bad["spec"]["template"]["spec"]["containers"][0]["securityContext"]["capabilities"]["add"] = ["BPF"]
    assert any("name" in e for e in validate(bad)), "a container without a name must be rejected"


def test_kustomization_lists_every_manifest_and_overlay_patches_existing_objects():
    kust = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
    on_disk = {p.name for p in DEPLOY.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kust["resources"]) == on_disk
    objs = deploy_objects()
    for obj in objs.values():
        assert obj["metadata"].get("namespace", kust["namespace"]) == kust["namespace"]

    overlay = yaml.safe_load((VAGRANT / "ebpfsvc" / "kustomization.yaml").read_text())
    assert overlay["resources"] == ["../../deploy"]
    for patch in overlay["patches"]:
        (doc,) = load_docs(VAGRANT / "ebpfsvc" / patch["path"])
        base = objs[(doc["kind"], doc["metadata"]["name"])]
        # A strategic merge patch of ConfigMap data replaces whole keys: it must name no new ones.
        assert set(doc.get("data", {})) <= set(base.get("data", {}))


# --- the DaemonSet ----------------------------------------------------------------------------------

def test_daemonset_is_shaped_like_kube_proxy():
    spec = pod_spec()
    assert spec["hostNetwork"] is True
    assert spec["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert spec["priorityClassName"] == "system-node-critical"
    assert {"operator": "Exists"} in spec["tolerations"], "must tolerate every taint"
    objs = deploy_objects()
    assert ("ServiceAccount", spec["serviceAccountName"]) in objs

    c = agent_container()
    env = {e["name"]: e for e in c["env"]}
    assert env["NODE_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}
    assert "--node-name=$(NODE_NAME)" in c["args"]
    assert c["livenessProbe"]["httpGet"] == {"path": "/livez", "port": HEALTHZ_PORT}
    assert c["startupProbe"]["httpGet"] == {"path": "/livez", "port": HEALTHZ_PORT}
    assert c["readinessProbe"]["httpGet"] == {"path": "/healthz", "port": HEALTHZ_PORT}
    assert f"--healthz-bind-address=0.0.0.0:{HEALTHZ_PORT}" in c["args"]
    assert "--metrics-bind-address=0.0.0.0:10249" in c["args"]
    assert c["resources"]["requests"] and c["resources"]["limits"]["memory"]


def test_env_and_mounts_reference_what_exists():
    spec = pod_spec()
    volumes = {v["name"]: v for v in spec["volumes"]}
    objs = deploy_objects()
    for c in spec["initContainers"] + spec["containers"]:
        for m in c.get("volumeMounts", []):
            assert m["name"] in volumes, f"{c['name']} mounts unknown volume {m['name']}"
            # The API server's rule: only privileged containers may propagate mounts back.
            if m.get("mountPropagation") == "Bidirectional":
                assert c.get("securityContext", {}).get("privileged") is True, c["name"]
        for e in c.get("env", []):
            ref = e.get("valueFrom", {}).get("configMapKeyRef")
            if ref:
                assert ref["key"] in objs[("ConfigMap", ref["name"])]["data"], ref
        names = {e["name"] for e in c.get("env", [])}
        for arg in c.get("args", []):
            for var in re.findall(r"\$\((\w+)\)", arg):
                assert var in names, f"{c['name']}: $({var}) is not defined"
    cm = volumes["config"]["configMap"]["name"]
    assert ("ConfigMap", cm) in objs
    # Pins go under the bpffs mount, so they outlive the pod.
    agent = agent_container()
    (pin_dir,) = [a.split("=", 1)[1] for a in agent["args"] if a.startswith("--pin-dir=")]
    bpffs = [m for m in agent["volumeMounts"] if m["name"] == "bpffs"][0]
    assert pin_dir.startswith(bpffs["mountPath"] + "/")
    assert volumes["bpffs"]["hostPath"]["path"] == "/sys/fs/bpf"
    # bcc's kernel headers, from the host.
    mounted = {m["mountPath"] for m in agent["volumeMounts"]}
    assert {"/lib/modules", "/usr/src", "/sys/fs/bpf", "/etc/ebpfsvc", "/tmp"} <= mounted


def test_agent_capabilities_are_exactly_the_documented_set_each_with_its_reason():
    sc = agent_container()["securityContext"]
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert set(sc["capabilities"]["add"]) == AGENT_CAPS
    assert len(sc["capabilities"]["add"]) == len(AGENT_CAPS)
    assert sc.get("privileged") is False and sc["allowPrivilegeEscalation"] is False
    assert sc["readOnlyRootFilesystem"] is True

    # Each added capability has a comment right above it saying why.
    lines = (DEPLOY / "daemonset.yaml").read_text().splitlines()
    for cap in AGENT_CAPS:
        (i,) = [n for n, line in enumerate(lines) if line.strip() == f"- {cap}"]
        assert lines[i - 1].strip().startswith("#"), f"{cap} has no comment saying why"
    # And the operator's doc names each one.
    doc = DOCS.read_text()
    for cap in AGENT_CAPS:
        assert f"CAP_{cap}" in doc, f"docs/deploy.md does not explain CAP_{cap}"


def test_the_socket_path_is_on_with_what_it_needs():
    """socket-lb on by default (issue 15), with what its programs and its reset pass need: the host's
    cgroup hierarchy (the kubelet's cgroup found in it, not named), the host's PIDs, SYS_ADMIN and
    SYS_PTRACE (docs/deploy.md says what for)."""
    (cm,) = load_docs(DEPLOY / "configmap.yaml")
    conf = yaml.safe_load(cm["data"]["config.yaml"])
    assert conf["socket-lb"] is True and conf["socket-lb-cgroup"] == "auto"
    spec = pod_spec()
    assert spec["hostPID"] is True
    volumes = {v["name"]: v for v in spec["volumes"]}
    (mount,) = [m for m in agent_container()["volumeMounts"] if m["name"] == "host-cgroup"]
    assert volumes["host-cgroup"]["hostPath"]["path"] == "/sys/fs/cgroup" and mount["readOnly"] is True
    assert not mount["mountPath"].startswith("/sys/fs/cgroup"), "the container's own cgroup mount stays"
    assert SOCKET_RESET_CAPS <= set(agent_container()["securityContext"]["capabilities"]["add"])
    doc = DOCS.read_text()
    assert "hostPID" in doc and "host-cgroup" in doc and "socket-lb" in doc


def test_only_the_bpffs_mount_runs_privileged():
    spec = pod_spec()
    privileged = [c for c in spec["initContainers"] + spec["containers"]
                  if c.get("securityContext", {}).get("privileged")]
    assert [c["name"] for c in privileged] == ["mount-bpffs"]
    (c,) = privileged
    assert c["command"][-1] == "mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf"
    for c in spec["initContainers"]:
        if c["name"] != "mount-bpffs":
            assert c["securityContext"]["capabilities"] == {"drop": ["ALL"]}


# --- the agent's command line and config file, through the real CLI --------------------------------

def _agent_command():
    cli = pytest.importorskip("ebpfsvc.cli.agent", reason="ebpfsvc agent not there yet")
    return cli


def _run_agent(cli, args, monkeypatch):
    """`ebpfsvc agent ARGS` through click, with the Agent replaced: returns the AgentConfig it built."""
    from click.testing import CliRunner

    captured = {}

    class FakeAgent:
        def __init__(self, cfg):
            captured["cfg"] = cfg

        def run_forever(self):
            pass

    monkeypatch.setattr(cli, "start_agent", FakeAgent)
    result = CliRunner().invoke(cli.agent, args)
    assert result.exit_code == 0, result.output
    return captured["cfg"]


def test_agent_accepts_the_daemonset_command_line(tmp_path, monkeypatch):
    cli = _agent_command()
    (cm,) = load_docs(DEPLOY / "configmap.yaml")
    conf = tmp_path / "config.yaml"
    conf.write_text(cm["data"]["config.yaml"])
    args = [a.replace("$(NODE_NAME)", "node-a").replace("/etc/ebpfsvc/config.yaml", str(conf))
            for a in agent_container()["args"]]
    assert args[0] == "agent"
    known = {opt for p in cli.agent.params for opt in p.opts}
    unknown = [a.split("=")[0] for a in args[1:] if a.split("=")[0] not in known]
    assert not unknown, f"ebpfsvc agent has no {unknown}"
    cfg = _run_agent(cli, args[1:], monkeypatch)
    assert cfg.node.node_name == "node-a"
    assert cfg.in_cluster and cfg.pin_dir == "/sys/fs/bpf/ebpfsvc"


def test_the_deploy_configuration_is_all_a_node_needs(tmp_path, monkeypatch):
    """Issue 10: the ConfigMap + DaemonSet arguments must work on any node. So nothing per node is
    configured (the addresses, uplinks, hairpin source and service CIDR are found), and the
    shipped `nodeport-addresses: []` means every node address, as with kube-proxy."""
    from ebpfsvc.k8s.node import parse_node
    from ebpfsvc.nodeinfo import Interface, NodeSettings, resolve

    cli = _agent_command()
    (cm,) = load_docs(DEPLOY / "configmap.yaml")
    conf = tmp_path / "config.yaml"
    conf.write_text(cm["data"]["config.yaml"])
    per_node = {"node-address", "uplink", "hairpin-address", "service-cidr", "zone", "cluster-cidr"}
    assert per_node.isdisjoint(yaml.safe_load(conf.read_text())), "a per-node (or unused) key in the ConfigMap"
    assert not [a for a in agent_container()["args"] if a.split("=")[0].lstrip("-") in per_node]
    args = [a.replace("$(NODE_NAME)", "node-a").replace("/etc/ebpfsvc/config.yaml", str(conf))
            for a in agent_container()["args"]]
    cfg = _run_agent(cli, args[1:], monkeypatch)
    assert cfg.uplinks is None and cfg.hairpin_address is None and cfg.node.service_cidr is None
    assert cfg.node.node_addresses == () and cfg.nodeport_addresses == ()
    # What the agent then makes of a node: every node address serves NodePorts.
    node = parse_node({"kind": "Node", "metadata": {"name": "node-a"}, "status": {"addresses": [
        {"type": "InternalIP", "address": "10.0.0.5"}, {"type": "ExternalIP", "address": "10.0.1.5"}]}})
    interfaces = (Interface("lo", ()), Interface("ens5", tuple(map(ipaddress.IPv4Address, ("10.0.0.5", "10.0.1.5")))))
    info = resolve(NodeSettings(nodeport_addresses=cfg.nodeport_addresses, uplinks=cfg.uplinks,
                                pod_interfaces=cfg.pod_interfaces), interfaces, node, True)
    assert [str(a) for a in info.nodeport_addresses] == ["10.0.0.5", "10.0.1.5"]
    assert info.uplinks == ("ens5",) and str(info.hairpin) == "10.0.0.5"


@pytest.mark.parametrize("configmap", [DEPLOY / "configmap.yaml", VAGRANT / "ebpfsvc" / "config.yaml"],
                         ids=["deploy", "vagrant"])
def test_agent_config_file_reaches_the_agent(configmap, tmp_path, monkeypatch):
    cli = _agent_command()
    (cm,) = load_docs(configmap)
    conf = tmp_path / "config.yaml"
    conf.write_text(cm["data"]["config.yaml"])
    wanted = yaml.safe_load(conf.read_text())
    known = {opt.lstrip("-") for p in cli.agent.params for opt in p.opts}
    assert set(wanted) <= known, f"not flags of ebpfsvc agent: {set(wanted) - known}"
    cfg = _run_agent(cli, [f"--config={conf}", "--node-name=node-a"], monkeypatch)
    assert tuple(cfg.pod_interfaces) == tuple(wanted["pod-interfaces"])
    assert cfg.nodeport_addresses == tuple(wanted["nodeport-addresses"]), "nodeport-addresses did not reach the agent"


# --- RBAC -------------------------------------------------------------------------------------------

def test_rbac_is_read_only():
    objs = deploy_objects()
    role = objs[("ClusterRole", "ebpfsvc")]
    granted = set()
    for rule in role["rules"]:
        assert "*" not in rule["verbs"] and "*" not in rule["resources"] and "*" not in rule["apiGroups"]
        for res in rule["resources"]:
            writes = set(rule["verbs"]) - READ_VERBS
            if res == "events":
                assert writes <= EVENT_WRITE_VERBS, rule
            else:
                assert not writes, f"write verbs {writes} on {res}"
            for group in rule["apiGroups"]:
                granted |= {(group, res, v) for v in rule["verbs"]}
    for group, res in [("", "services"), ("", "nodes"), ("discovery.k8s.io", "endpointslices"),
                       ("networking.k8s.io", "servicecidrs")]:
        assert {(group, res, v) for v in READ_VERBS} <= granted, res
    # What the agent does not watch from the API is not granted (v1 Endpoints reach it mirrored).
    assert not {g for g in granted if g[1] == "endpoints"}
    binding = objs[("ClusterRoleBinding", "ebpfsvc")]
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "ebpfsvc"}
    sa = objs[("ServiceAccount", "ebpfsvc")]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa["metadata"]["name"],
                                    "namespace": sa["metadata"]["namespace"]}]


# --- scripts, Vagrantfile ---------------------------------------------------------------------------

SCRIPTS = sorted((VAGRANT / "provision").glob("*.sh")) + sorted((DEPLOY / "image").glob("*.sh"))


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_script_syntax_and_shellcheck(script):
    text = script.read_text()
    shell = "sh" if text.startswith("#!/bin/sh") else "bash"
    subprocess.run([shell, "-n", str(script)], check=True)
    if shell == "bash" and script.parent.name == "provision":
        assert "set -euo pipefail" in text
    assert os.access(script, os.X_OK), f"{script} is not executable"
    if not shutil.which("shellcheck"):
        pytest.skip("shellcheck not installed (Debian package: shellcheck)")
    r = subprocess.run(["shellcheck", str(script)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout


def test_vagrantfile_ruby_syntax():
    if not shutil.which("ruby"):
        pytest.skip("ruby not installed (Debian package: ruby)")
    r = subprocess.run(["ruby", "-c", str(VAGRANT / "Vagrantfile")], capture_output=True, text=True)
    assert r.returncode == 0 and "Syntax OK" in r.stdout, r.stderr


def test_vagrant_validate(tmp_path):
    if not shutil.which("vagrant"):
        pytest.skip("vagrant not installed (Debian package: vagrant)")
    # A copy, so that the bootstrap token it makes lands in tmp_path, not in the work tree.
    copy = tmp_path / "vagrant"
    shutil.copytree(VAGRANT, copy, ignore=shutil.ignore_patterns(".vagrant"))
    env = dict(os.environ, VAGRANT_CWD=str(copy), VAGRANT_HOME=str(tmp_path / "home"),
               VAGRANT_CHECKPOINT_DISABLE="1")
    r = subprocess.run(["vagrant", "validate", "--ignore-provider"], capture_output=True, text=True,
                       env=env, cwd=copy, timeout=240)
    assert r.returncode == 0 and "validated successfully" in r.stdout, r.stdout + r.stderr
    token = (copy / ".vagrant" / "kubeadm-token").read_text().strip()
    assert re.fullmatch(r"[a-z0-9]{6}\.[a-z0-9]{16}", token)


def test_vagrant_addresses_are_in_the_benchmarking_range():
    bench = ipaddress.IPv4Network("198.18.0.0/15")
    texts = [VAGRANT / "Vagrantfile", *VAGRANT.rglob("*.sh"), *VAGRANT.rglob("*.yaml")]
    found = 0
    for path in texts:
        for m in re.finditer(r"\b(\d{1,3}(?:\.\d{1,3}){3})(?:/(\d{1,2}))?\b", path.read_text()):
            addr = ipaddress.IPv4Address(m.group(1))
            if addr.is_unspecified or addr.is_loopback or m.group(1).startswith("255."):   # netmasks
                continue
            net = ipaddress.IPv4Network(m.group(0), strict=False)
            assert net.subnet_of(bench), f"{path.relative_to(ROOT)}: {m.group(0)} is outside 198.18.0.0/15"
            found += 1
    assert found > 10


# --- the image's kernel-headers init script and entrypoint ------------------------------------------

def _headers_env(tmp_path: Path, **extra) -> dict:
    env = dict(os.environ, EBPFSVC_STATE=str(tmp_path / "state"), EBPFSVC_KERNEL_RELEASE="6.1.0-99-amd64",
               EBPFSVC_MODULES_DIR=str(tmp_path / "modules"), EBPFSVC_KHEADERS=str(tmp_path / "no-kheaders"))
    env.update(extra)
    return env


def _run_headers(env) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(DEPLOY / "image" / "kernel-headers.sh")], env=env,
                          capture_output=True, text=True)


def test_kernel_headers_merges_a_debian_split_tree_like_setup_sh(tmp_path):
    common = tmp_path / "src" / "linux-headers-6.1.0-99-common"
    arch = tmp_path / "src" / "linux-headers-6.1.0-99-amd64"
    (common / "include" / "linux").mkdir(parents=True)
    (common / "include" / "linux" / "types.h").write_text("common\n")
    (common / "Makefile").write_text("common makefile\n")
    (arch / "include" / "generated").mkdir(parents=True)
    (arch / "include" / "generated" / "autoconf.h").write_text("arch\n")
    (arch / "Makefile").write_text("arch makefile\n")
    mod = tmp_path / "modules" / "6.1.0-99-amd64"
    mod.mkdir(parents=True)
    (mod / "build").symlink_to(arch)
    (mod / "source").symlink_to(common)

    env = _headers_env(tmp_path)
    r = _run_headers(env)
    assert r.returncode == 0, r.stderr
    tree = tmp_path / "state" / "kernel-headers" / "6.1.0-99-amd64"
    assert (tree / "include" / "linux" / "types.h").read_text() == "common\n"
    assert (tree / "include" / "generated" / "autoconf.h").is_symlink()         # arch half linked over
    assert (tree / "Makefile").read_text() == "arch makefile\n"
    stamp = (tree / ".ebpfsvc-from").read_text()
    # Second run: the stamp matches, nothing is redone.
    (tree / "marker").write_text("kept")
    assert _run_headers(env).returncode == 0
    assert (tree / "marker").exists() and (tree / ".ebpfsvc-from").read_text() == stamp

    # The entrypoint hands the tree to bcc, then runs ebpfsvc with its arguments.
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "ebpfsvc").write_text('#!/bin/sh\necho "BCC_KERNEL_SOURCE=$BCC_KERNEL_SOURCE args=$*"\n')
    (fake_bin / "ebpfsvc").chmod(0o755)
    env["PATH"] = f"{fake_bin}:{env['PATH']}"
    env.pop("BCC_KERNEL_SOURCE", None)
    out = subprocess.run([str(DEPLOY / "image" / "entrypoint.sh"), "agent", "--x"], env=env,
                         capture_output=True, text=True, check=True).stdout
    assert out.strip() == f"BCC_KERNEL_SOURCE={tree} args=agent --x"


def test_kernel_headers_links_a_single_tree_and_fails_clearly_without_headers(tmp_path):
    env = _headers_env(tmp_path)
    r = _run_headers(env)
    assert r.returncode == 1
    assert "linux-headers-6.1.0-99-amd64" in r.stderr and "EBPFSVC_INSTALL_HEADERS" in r.stderr

    kheaders = tmp_path / "kheaders.tar.xz"
    kheaders.write_bytes(b"")
    assert _run_headers(_headers_env(tmp_path, EBPFSVC_KHEADERS=str(kheaders))).returncode == 0

    full = tmp_path / "usr-src" / "kernels" / "6.1.0-99-amd64"
    full.mkdir(parents=True)
    (full / "Makefile").write_text("full\n")
    mod = tmp_path / "modules" / "6.1.0-99-amd64"
    mod.mkdir(parents=True)
    (mod / "build").symlink_to(full)
    assert _run_headers(env).returncode == 0
    tree = tmp_path / "state" / "kernel-headers" / "6.1.0-99-amd64"
    assert tree.is_symlink() and tree.resolve() == full.resolve()


# --- as root: the capability set against the kernel, the host-gw routes in a namespace --------------

# Loads the real datapath (bpf/lb_pod.c) the way the agent does, pins its maps, attaches both programs.
CAP_PROBE = r"""
import sys
from pyroute2 import IPRoute
from ebpfsvc.datapath import loader, tc
dp = loader.load(sys.argv[1], cache=False)
idx = IPRoute().link_lookup(ifname="lo")[0]
tc.attach(idx, dp.programs["from_pod"].fd, "from_pod", tc.INGRESS)
tc.attach(idx, dp.programs["to_pod"].fd, "to_pod", tc.EGRESS)
print("loaded pinned attached")
"""


@pytest.fixture
def netns(unique_prefix):
    name = f"{unique_prefix}d"
    subprocess.run(["ip", "netns", "add", name], check=True)
    subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
    yield name
    subprocess.run(["ip", "netns", "del", name], check=False)


def _detach_lo(netns: str) -> None:
    """Each probe starts from a lo with none of our programs (at TCX or on clsact)."""
    from ebpfsvc.datapath import tc

    for direction in (tc.INGRESS, tc.EGRESS):
        tc.detach(1, direction, netns=netns)        # lo is ifindex 1 in every namespace
    tc.drop_empty_clsact(1, netns)


def _with_caps(netns: str, caps: set[str], pin: Path) -> subprocess.CompletedProcess:
    bounding = ",".join(["-all"] + [f"+{c.lower()}" for c in sorted(caps)])
    env = dict(os.environ, BCC_KERNEL_SOURCE=os.environ.get("BCC_KERNEL_SOURCE", "/var/lib/ebpfsvc/kernel-headers"),
               PYTHONPATH=str(ROOT))
    # nsenter, not `ip netns exec`: that one remounts /sys, hiding bpffs.
    cmd = ["nsenter", f"--net=/run/netns/{netns}", "setpriv", "--bounding-set", bounding, "--inh-caps", "-all",
           "--no-new-privs", sys.executable, "-c", CAP_PROBE, str(pin)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, cwd=pin.parent)


@pytest.mark.root
def test_documented_capabilities_load_the_datapath_and_fewer_do_not(netns, unique_prefix):
    pytest.importorskip("bcc")
    pytest.importorskip("ebpfsvc.datapath.loader")
    if not shutil.which("setpriv") or not os.path.ismount("/sys/fs/bpf"):
        pytest.skip("needs setpriv (util-linux) and bpffs at /sys/fs/bpf")
    pins = Path("/sys/fs/bpf") / unique_prefix
    pins.mkdir()
    # CAP_SYS_RESOURCE only matters before Linux 5.11 (memlock accounting): not provable here.
    tc_caps = AGENT_CAPS - SOCKET_RESET_CAPS
    try:
        ok = _with_caps(netns, tc_caps, pins / "ok")
        assert ok.returncode == 0 and "loaded pinned attached" in ok.stdout, ok.stderr[-2000:]
        _detach_lo(netns)
        # Without CAP_PERFMON the verifier rejects the datapath's variable-offset packet pointer
        # arithmetic ("prohibited for !root").
        for missing in ("BPF", "NET_ADMIN", "PERFMON"):
            r = _with_caps(netns, tc_caps - {missing}, pins / missing)
            assert r.returncode != 0, f"worked without CAP_{missing}: then it need not be granted"
            _detach_lo(netns)
    finally:
        shutil.rmtree(pins, ignore_errors=True)


@pytest.mark.root
def test_hostgw_routes_in_a_namespace(netns):
    ns = ["ip", "netns", "exec", netns]
    subprocess.run(["ip", "-n", netns, "link", "add", "eth1", "type", "veth", "peer", "name", "eth1p"], check=True)
    subprocess.run(["ip", "-n", netns, "addr", "add", "198.18.0.11/24", "dev", "eth1"], check=True)
    subprocess.run(["ip", "-n", netns, "link", "set", "eth1", "up"], check=True)
    env = dict(os.environ, NODE_IP="198.18.0.11",
               PEERS="198.18.0.10=198.18.128.0/24 198.18.0.11=198.18.129.0/24 198.18.0.12=198.18.130.0/24")
    if shutil.which("iptables"):
        env["CLUSTER_CIDR"] = "198.18.128.0/17"
    for _ in range(2):      # idempotent
        subprocess.run(ns + ["bash", str(VAGRANT / "provision" / "hostgw-routes.sh")], env=env, check=True,
                       capture_output=True)
    routes = subprocess.run(["ip", "-n", netns, "-4", "route", "show"], capture_output=True, text=True,
                            check=True).stdout
    assert "198.18.128.0/24 via 198.18.0.10 dev eth1" in routes
    assert "198.18.130.0/24 via 198.18.0.12 dev eth1" in routes
    assert "198.18.129.0/24" not in routes, "no route to this node's own pod CIDR"
    if "CLUSTER_CIDR" in env:
        nat = subprocess.run(ns + ["iptables", "-w", "-t", "nat", "-S", "POSTROUTING"], capture_output=True,
                             text=True, check=True).stdout
        assert nat.count("MASQUERADE") == 1, nat


# --- what the provisioning scripts write, rendered without a VM --------------------------------------

def _heredoc(script: Path, opener: str, env: dict[str, str]) -> str:
    """The body of the unquoted here-document on the line containing `opener`, variables expanded."""
    lines = script.read_text().splitlines()
    (start,) = [i for i, line in enumerate(lines) if opener in line and "<<CONF" in line]
    end = lines.index("CONF", start + 1)
    body = "\n".join(lines[start + 1:end])
    assert "`" not in body, "a backtick in an unquoted here-document runs a command"
    return re.sub(r"\$\{?(\w+)\}?", lambda m: env[m.group(1)], body)


def test_kubeadm_init_config_skips_kube_proxy_with_cidrs_in_the_benchmarking_range():
    env = {"KUBEADM_TOKEN": "abcdef.0123456789abcdef", "NODE_IP": "198.18.0.10", "NODE_NAME": "cp",
           "version": "v1.31.0", "CLUSTER_CIDR": "198.18.128.0/17", "SERVICE_CIDR": "198.19.0.0/16"}
    init, cluster = yaml.safe_load_all(_heredoc(VAGRANT / "provision" / "control-plane.sh", "kubeadm-init.yaml", env))
    assert init["kind"] == "InitConfiguration" and cluster["kind"] == "ClusterConfiguration"
    assert init["apiVersion"] == cluster["apiVersion"] == "kubeadm.k8s.io/v1beta4"
    assert "addon/kube-proxy" in init["skipPhases"]
    assert cluster["proxy"] == {"disabled": True}
    bench = ipaddress.IPv4Network("198.18.0.0/15")
    pods = ipaddress.IPv4Network(cluster["networking"]["podSubnet"])
    services = ipaddress.IPv4Network(cluster["networking"]["serviceSubnet"])
    assert pods.subnet_of(bench) and services.subnet_of(bench) and not pods.overlaps(services)
    # The Vagrantfile's per-node /24s sit in the pod CIDR, and nodes outside it.
    text = (VAGRANT / "Vagrantfile").read_text()
    assert f'CLUSTER_CIDR = "{pods}"' in text and f'SERVICE_CIDR = "{services}"' in text
    for ip, cidr in re.findall(r'ip: "([\d.]+)", pod_cidr: "([\d./]+)"', text):
        assert ipaddress.IPv4Network(cidr).subnet_of(pods) and ipaddress.IPv4Address(ip) not in pods


def test_cni_config_is_a_host_gw_bridge():
    import json

    conf = json.loads(_heredoc(VAGRANT / "provision" / "node.sh", "10-ebpfsvc-hostgw.conflist",
                               {"POD_CIDR": "198.18.129.0/24"}))
    bridge = conf["plugins"][0]
    assert bridge["type"] == "bridge" and bridge["isGateway"] and bridge["hairpinMode"]
    assert bridge["ipam"]["type"] == "host-local"
    assert bridge["ipam"]["ranges"] == [[{"subnet": "198.18.129.0/24"}]]
    # The overlay tells the agent the bridge plugin's veth names.
    (cm,) = load_docs(VAGRANT / "ebpfsvc" / "config.yaml")
    assert yaml.safe_load(cm["data"]["config.yaml"])["pod-interfaces"] == ["veth*"]


def test_containerfile_copies_what_exists_and_installs_debian_bcc():
    text = (DEPLOY / "Containerfile").read_text()
    assert re.search(r"^FROM docker\.io/library/debian:bookworm", text, re.M)
    assert "python3-bpfcc" in text and "--system-site-packages" in text
    assert not re.search(r"pip install[^\n]*\bbcc\b", text), "the PyPI `bcc` is an unrelated project"
    for m in re.finditer(r"^COPY (.+) \S+$", text, re.M):
        for src in m.group(1).split():
            assert (ROOT / src).exists(), f"Containerfile copies {src}, which does not exist"
    # The scripts the DaemonSet runs are where the image puts them.
    spec = pod_spec()
    (headers,) = [c for c in spec["initContainers"] if c["name"] == "kernel-headers"]
    assert f"/usr/local/bin/{Path(headers['command'][0]).name}" in text
    assert 'ENTRYPOINT ["/usr/local/bin/ebpfsvc-entrypoint"]' in text
    # Every Debian package it installs exists in bookworm (checked where apt knows the archive).
    packages = _apt_install_packages(text)
    assert "python3-bpfcc" in packages
    _assert_in_debian(packages)


def _apt_install_packages(text: str) -> list[str]:
    """The packages of the (first) multi-line `apt-get install ... \\` command in a script."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if re.search(r"apt-get install .*\\$", line))
    packages = []
    for line in lines[start + 1:]:
        if line.lstrip().startswith("&&"):
            break
        packages += [w for w in line.strip(" \\").split() if not w.startswith(">")]
        if not line.rstrip().endswith("\\"):
            break
    assert packages and all(re.fullmatch(r"[a-z0-9][a-z0-9.+-]+", p) for p in packages), packages
    return packages


def _assert_in_debian(packages: list[str]) -> None:
    if not shutil.which("apt-cache"):
        return
    for pkg in packages:
        r = subprocess.run(["apt-cache", "show", "--no-all-versions", pkg], capture_output=True, text=True)
        assert r.returncode == 0, f"Debian has no package {pkg}: {r.stderr}"


def test_vagrant_node_packages_are_debian_packages():
    packages = _apt_install_packages((VAGRANT / "provision" / "node.sh").read_text())
    assert {"containerd", "buildah"} <= set(packages)
    _assert_in_debian(packages)


@pytest.mark.root
def test_kernel_headers_init_with_no_capability_yields_a_tree_bcc_compiles_the_datapath_with(tmp_path, unique_prefix):
    """The init container's path on a Debian node, for real: this machine's Debian headers laid out
    as /lib/modules/R/{build,source}, merged by kernel-headers.sh with every capability dropped (as
    the init container runs), then the real datapath compiled and loaded against the result."""
    pytest.importorskip("bcc")
    pytest.importorskip("ebpfsvc.datapath.loader")
    commons = sorted(Path("/usr/src").glob("linux-headers-*-common"))
    if not commons or not shutil.which("setpriv"):
        pytest.skip("needs Debian's linux-headers (scripts/setup.sh installs them) and setpriv")
    common = commons[-1]
    release = common.name.removeprefix("linux-headers-").removesuffix("-common") + "-amd64"
    arch = Path("/usr/src") / f"linux-headers-{release}"
    if not arch.is_dir():
        pytest.skip(f"no {arch}")
    mod = tmp_path / "modules" / release
    mod.mkdir(parents=True)
    (mod / "build").symlink_to(arch)
    (mod / "source").symlink_to(common)
    env = _headers_env(tmp_path, EBPFSVC_KERNEL_RELEASE=release)
    r = subprocess.run(["setpriv", "--bounding-set", "-all", "--inh-caps", "-all", "--no-new-privs",
                        "bash", str(DEPLOY / "image" / "kernel-headers.sh")], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    tree = tmp_path / "state" / "kernel-headers" / release
    assert (tree / ".ebpfsvc-from").read_text().strip() == f"{common} + {arch}"

    probe = ("import sys; from ebpfsvc.datapath import loader; "
             "dp = loader.load(sys.argv[1], cache=False); print(sorted(dp.programs)); loader.unpin(sys.argv[1])")
    pins = Path("/sys/fs/bpf") / unique_prefix
    try:
        r = subprocess.run([sys.executable, "-c", probe, str(pins)], capture_output=True, text=True, timeout=240,
                           env=dict(os.environ, BCC_KERNEL_SOURCE=str(tree), PYTHONPATH=str(ROOT)), cwd=tmp_path)
        assert r.returncode == 0 and "from_pod" in r.stdout, r.stderr[-2000:]
    finally:
        shutil.rmtree(pins, ignore_errors=True)


def test_configmap_documents_the_map_size_flags_the_agent_has():
    """The ConfigMap's commented map-size keys are real flags, and every --max-* flag is in the docs."""
    import re

    cli = _agent_command()
    text = (DEPLOY / "configmap.yaml").read_text()
    shown = re.findall(r"#\s+(max-[a-z-]+):", text)
    known = {opt.lstrip("-") for p in cli.agent.params for opt in p.opts}
    assert shown and set(shown) <= known
    ops = (ROOT / "docs" / "operations.md").read_text()
    assert all(f"`{flag}`" in ops for flag, _, _ in cli.MAP_LIMIT_FLAGS)
