"""cluster.yaml: valid for the Ray cluster launcher, GPU workers from 0, token auth, dashboard on
localhost only, and every key commented."""

from __future__ import annotations

import os
import re

import yaml

from tests.jobs.conftest import REPO

PATH = os.path.join(REPO, "cluster.yaml")


def test_cluster_yaml_is_a_valid_launcher_config():
    from ray.autoscaler._private.util import validate_config

    with open(PATH, encoding="utf-8") as f:
        config = yaml.safe_load(f)
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
    assert any("pip install" in c and "dca-pipeline" in c for c in config["setup_commands"])


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
