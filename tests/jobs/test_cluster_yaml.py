"""cluster.yaml: valid for the Ray cluster launcher, GPU workers from 0, token auth, dashboard on
localhost only, Ray on the nodes' internal IPs with every port pinned and covered by the documented
firewall rule, the versions of constraints/*.txt installed, and every key commented."""

from __future__ import annotations

import os
import re
import shlex

import pytest
import yaml

from tests.jobs.conftest import REPO

PATH = os.path.join(REPO, "cluster.yaml")
DOCS = os.path.join(REPO, "docs", "cluster.md")
CONSTRAINTS = os.path.join(REPO, "constraints")
HEAD_ONLY_PORTS = {"port", "ray_client_server_port", "dashboard_port"}
# Pinned but never opened to other hosts: Ray Client is unused, the dashboard is on 127.0.0.1.
CLOSED_PORTS = {"ray_client_server_port", "dashboard_port"}


def _config() -> dict:
    with open(PATH, encoding="utf-8") as f:
        return yaml.safe_load(f)


def test_cluster_yaml_is_a_valid_launcher_config():
    from ray.autoscaler._private.util import validate_config

    config = _config()
    validate_config(config)
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    workers = [t for name, t in config["available_node_types"].items() if name != config["head_node_type"]]
    assert len(workers) == 1 and workers[0]["resources"]["GPU"] == 2 and workers[0]["min_workers"] == 0
    assert workers[0]["node_config"]["machineType"] == "a2-ultragpu-2g"  # 2 x A100 80GB
    start = " ".join(config["head_start_ray_commands"])
    assert "RAY_AUTH_MODE=token" in start and "--dashboard-host=127.0.0.1" in start
    assert "RAY_AUTH_MODE=token" in " ".join(config["worker_start_ray_commands"])
    assert "~/.ray/auth_token" in config["file_mounts"]
    for kind in ("head_setup_commands", "worker_setup_commands"):
        assert any("pip install" in c and "-e ~/dca-pipeline" in c for c in config[kind]), kind


# ----------------------------------------------------------------------------------- network


def _ray_start_params(command: str) -> dict:
    """The parameters of the `ray start` in one start command, parsed by Ray's own CLI definition
    (so a misspelt or unknown flag fails here, as it would on the node)."""
    from ray.scripts.scripts import start

    statements = [s.strip() for s in command.split(";")]
    starts = [s for s in statements if s.startswith("ray start")]
    assert len(starts) == 1, command
    args = shlex.split(starts[0])[2:]
    return start.make_context("start", args).params


def _port_options() -> set[str]:
    """Every port option of the installed `ray start` (a new one in a later Ray fails the test
    until it is pinned here and in the firewall rule)."""
    from ray.scripts.scripts import start

    # Not --worker-port-list (an alternative to the min/max range) nor hidden legacy options.
    return {p.name for p in start.params if p.name.endswith("port") and not p.hidden}


def _start_params(config: dict, kind: str) -> tuple[dict, str]:
    commands = [c for c in config[kind] if "ray start" in c]
    assert len(commands) == 1, kind
    return _ray_start_params(commands[0]), commands[0]


@pytest.mark.parametrize("kind", ["head_start_ray_commands", "worker_start_ray_commands"])
def test_ray_starts_on_the_internal_ip_with_every_port_pinned(kind):
    config = _config()
    params, command = _start_params(config, kind)
    # The internal IP of nic0, from the GCE metadata server, and a failed lookup stops the start.
    assert params["node_ip_address"] == "$NODE_IP"
    assert "NODE_IP=$(curl -sf -H Metadata-Flavor:Google http://metadata.google.internal/computeMetadata/v1/" \
           "instance/network-interfaces/0/ip)" in command
    assert 'test -n "$NODE_IP" ||' in command and "exit 1" in command
    expected = _port_options() if kind.startswith("head") else _port_options() - HEAD_ONLY_PORTS
    unpinned = sorted(name for name in expected if not isinstance(params[name], int) or params[name] <= 0)
    assert not unpinned, f"{kind}: ports left to Ray's choice: {unpinned}"
    if kind.startswith("head"):
        assert params["head"] and params["dashboard_host"] == "127.0.0.1"
    else:
        assert params["address"] == f"$RAY_HEAD_IP:{_start_params(config, 'head_start_ray_commands')[0]['port']}"


def test_head_and_workers_use_the_same_ports():
    config = _config()
    head, _ = _start_params(config, "head_start_ray_commands")
    worker, _ = _start_params(config, "worker_start_ray_commands")
    for name in _port_options() - HEAD_ONLY_PORTS:
        assert head[name] == worker[name], name


def _gcloud_commands(text: str) -> dict[str, str]:
    """{rule name: command} of the `gcloud compute firewall-rules create` lines in a text."""
    found = {}
    for line in text.splitlines():
        line = line.lstrip("# ").strip()
        if line.startswith("gcloud compute firewall-rules create "):
            found[line.split()[4]] = line
    return found


def _flag(command: str, name: str) -> str:
    values = [a.split("=", 1)[1] for a in shlex.split(command) if a.startswith(f"--{name}=")]
    assert len(values) == 1, (name, command)
    return values[0]


def _tcp_ports(rules: str) -> set[int]:
    ports: set[int] = set()
    for rule in rules.split(","):
        proto, _, span = rule.partition(":")
        assert proto == "tcp", rule
        low, _, high = span.partition("-")
        ports.update(range(int(low), int(high or low) + 1))
    return ports


def test_firewall_rules_open_exactly_the_pinned_ports_to_the_cluster_only():
    config = _config()
    rules = _gcloud_commands(open(PATH, encoding="utf-8").read())
    assert set(rules) == {"dca-pipeline-ray-internal", "dca-pipeline-ssh", "dca-pipeline-deny-other"}
    tag = "dca-pipeline"
    for node_type in config["available_node_types"].values():
        assert tag in node_type["node_config"]["tags"]["items"]

    head, _ = _start_params(config, "head_start_ray_commands")
    pinned = {name: head[name] for name in _port_options()}
    must_open = {port for name, port in pinned.items() if name not in CLOSED_PORTS and "worker_port" not in name}
    must_open |= set(range(pinned["min_worker_port"], pinned["max_worker_port"] + 1))
    ray = rules["dca-pipeline-ray-internal"]
    assert _flag(ray, "action") == "ALLOW" and _flag(ray, "direction") == "INGRESS"
    assert _flag(ray, "source-tags") == tag and _flag(ray, "target-tags") == tag
    assert "--source-ranges" not in ray  # only the cluster's own nodes
    assert _tcp_ports(_flag(ray, "rules")) == must_open
    assert not {pinned[name] for name in CLOSED_PORTS} & _tcp_ports(_flag(ray, "rules"))

    ssh = rules["dca-pipeline-ssh"]
    assert _flag(ssh, "rules") == "tcp:22" and _flag(ssh, "target-tags") == tag
    deny = rules["dca-pipeline-deny-other"]
    assert _flag(deny, "action") == "DENY" and _flag(deny, "rules") == "all"
    assert _flag(deny, "source-ranges") == "0.0.0.0/0" and _flag(deny, "target-tags") == tag
    # Lower number wins: the allows beat the deny, which beats the default network's allows (65534).
    assert int(_flag(ray, "priority")) < int(_flag(deny, "priority")) < 65534
    assert int(_flag(ssh, "priority")) < int(_flag(deny, "priority"))


def test_docs_give_the_same_firewall_rules():
    with open(DOCS, encoding="utf-8") as f:
        docs = f.read()
    assert _gcloud_commands(docs) == _gcloud_commands(open(PATH, encoding="utf-8").read())


# ----------------------------------------------------------------------------------- versions


def _constraints(name: str) -> dict[str, str]:
    """{package: version} pinned (==) by a constraints file, following its `-c` includes."""
    pins: dict[str, str] = {}
    path = os.path.join(CONSTRAINTS, name)
    for line in open(path, encoding="utf-8").read().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        if line.startswith("-c "):
            for package, version in _constraints(line[3:].strip()).items():
                pins.setdefault(package, version)
            continue
        package, sep, version = line.partition("==")
        assert sep and re.fullmatch(r"[A-Za-z0-9_.\-]+", package), f"{name}: not a pin: {line}"
        pins[package.lower()] = version  # a later line overrides an included one
    return pins


def _pip_installs(commands: list[str]) -> list[dict]:
    """Each `pip install` of a command list: its constraints file, index and requirements."""
    found = []
    for command in commands:
        for statement in re.split(r"&&|\|\||;", command):
            words = shlex.split(statement)
            if len(words) < 3 or not words[0].endswith("/pip") or words[1] != "install":
                continue
            install = {"constraints": None, "index": None, "editable": [], "requirements": [], "command": command}
            args = iter(words[2:])
            for arg in args:
                if arg in ("-c", "--constraint"):
                    install["constraints"] = os.path.basename(next(args))
                elif arg == "--index-url":
                    install["index"] = next(args)
                elif arg == "-e":
                    install["editable"].append(next(args))
                elif arg.startswith("-"):
                    assert arg in ("-q", "--no-deps", "--no-build-isolation", "--upgrade"), arg
                else:
                    install["requirements"].append(arg)
            found.append(install)
    return found


@pytest.mark.parametrize("kind, constraints", [("head_setup_commands", "cpu.txt"), ("worker_setup_commands", "gpu.txt")])
def test_nodes_install_the_tested_versions(kind, constraints):
    config = _config()
    installs = _pip_installs(config["setup_commands"]) + _pip_installs(config[kind])
    pins = _constraints(constraints)
    assert installs and any(i["editable"] == ["~/dca-pipeline"] for i in installs)
    for install in installs:
        if install["editable"] or "torch" in install["requirements"]:
            assert install["constraints"] == constraints, install["command"]
        for requirement in install["requirements"]:
            name = re.split(r"[=<>!~\[]", requirement, maxsplit=1)[0].lower()
            pinned = "==" in requirement or (install["constraints"] and name in _constraints(install["constraints"]))
            assert pinned, f"{kind}: unpinned install of {requirement!r}: {install['command']}"
    # torch comes first, from PyTorch's index for the node's device, matching the pinned build.
    torch = [i for i in installs if "torch" in i["requirements"]]
    assert len(torch) == 1 and installs.index(torch[0]) < next(
        n for n, i in enumerate(installs) if i["editable"])
    build = pins["torch"].partition("+")[2] or "cpu"
    assert torch[0]["index"] == f"https://download.pytorch.org/whl/{build}"
    assert build == ("cpu" if kind.startswith("head") else "cu128")


def test_gpu_constraints_are_the_cpu_ones_with_a_cuda_torch():
    cpu, gpu = _constraints("cpu.txt"), _constraints("gpu.txt")
    assert {"torch", "transformers", "ray", "deepspeed", "pyarrow", "accelerate", "gguf"} <= set(cpu)
    for package, version in cpu.items():
        if package == "torch":
            assert re.fullmatch(re.escape(version) + r"\+cu\d+", gpu["torch"]), gpu["torch"]
        else:
            assert gpu[package] == version, package
    assert set(gpu) - set(cpu) == {"flash-attn"}


def test_nodes_run_python_3_11():
    # transformers 5.24 and pyarrow 26 need Python >= 3.11; Ubuntu 22.04's python3 is 3.10.
    config = _config()
    assert any("python3.11 -m venv ~/dca-venv" in c for c in config["setup_commands"])
    for node_type in config["available_node_types"].values():
        image = node_type["node_config"]["disks"][0]["initializeParams"]["sourceImage"]
        assert "ubuntu-2204" in image, image  # python3.11 comes from Ubuntu 22.04's archive


def test_every_key_is_commented():
    lines = open(PATH, encoding="utf-8").read().splitlines()
    key = re.compile(r"^\s*(- )?[A-Za-z_\"~][^:#]*:(\s|$)")
    uncommented = []
    for i, line in enumerate(lines):
        if not key.match(line) or line.lstrip().startswith("#"):
            continue
        above = lines[i - 1].strip() if i else ""
        if "#" not in line and not above.startswith("#"):
            uncommented.append(f"{i + 1}: {line.strip()}")
    assert not uncommented, "keys without a comment:\n" + "\n".join(uncommented)
