"""infra/skypilot/cpuft-sft.yaml, read by SkyPilot's own loader, and its `run` script executed with a
stand-in cpuft for one and for two nodes.

SkyPilot is optional and heavy (about 460 MB): it lives in .venv-infra/sky (scripts/gcp/setup-test-env
--with-skypilot) or wherever CPUFT_SKY_PYTHON points, never in the main venv. Without it these tests
skip and say so. Not checked offline: that SkyPilot's GCP catalog lists the instance type (SkyPilot
downloads the catalog); the test compares it with infra/'s default machine type instead.
"""

from __future__ import annotations

import json
import os
import re
import subprocess

import pytest
from infra_support import INFRA, ROOT

TASK = INFRA / "skypilot" / "cpuft-sft.yaml"
LOADER = ROOT / "tests" / "infra" / "skypilot_load.py"


def sky_python() -> str:
    for candidate in (os.environ.get("CPUFT_SKY_PYTHON"), str(ROOT / ".venv-infra/sky/bin/python")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    pytest.skip("SkyPilot not installed (scripts/gcp/setup-test-env --with-skypilot, or set CPUFT_SKY_PYTHON)")


def load(*overrides: str) -> dict:
    proc = subprocess.run(
        [sky_python(), str(LOADER), str(TASK), *overrides],
        capture_output=True, text=True, timeout=300, env={**os.environ, "HOME": os.environ.get("HOME", "/tmp")},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


REQUIRED = ("BUCKET=my-bucket", "RUN_NAME=lima", "JOB_CONFIG=./my-sft.yaml")


@pytest.fixture(scope="module")
def task() -> dict:
    return load(*REQUIRED)


def test_a_managed_spot_job_that_recovers_and_resumes_after_exit_75(task):
    assert "error" not in task, task.get("error")
    assert task["cloud"] == "GCP" and task["use_spot"] is True
    assert task["job_recovery"]["strategy"] == "EAGER_NEXT_REGION"
    assert task["job_recovery"]["recover_on_exit_codes"] == [75], "cpuft's 'interrupted after a checkpoint'"
    assert task["disk_size"] == 200
    assert task["file_mounts"] == {"/cpuft/job.yaml": "./my-sft.yaml"}, "JOB_CONFIG reaches the mount"


def test_the_task_needs_a_bucket_a_run_name_and_a_config(task):
    missing = load("RUN_NAME=lima", "JOB_CONFIG=./my-sft.yaml")
    assert "BUCKET" in missing["error"] and "--env" in missing["error"]


def test_the_task_matches_infra(task):
    variables = (INFRA / "variables.tf").read_text()
    default_machine = re.search(r'variable "machine_type" \{[^}]*default\s*=\s*"([^"]+)"', variables)[1]
    default_torch = re.search(r'variable "torch_version" \{[^}]*default\s*=\s*"([^"]+)"', variables)[1]
    assert task["instance_type"] == default_machine
    assert task["envs"]["TORCH_VERSION"] == default_torch
    assert re.fullmatch(r"cpuft==[0-9][0-9A-Za-z.+-]*", task["envs"]["CPUFT_PIP_SPEC"]), "pinned, as infra/ requires"
    assert "--index-url https://download.pytorch.org/whl/cpu" in task["setup"], "the CPU build of torch"


def run_task(task: dict, tmp_path, **skypilot_env) -> str:
    """Execute the task's `run` as SkyPilot would on a node: its envs plus SkyPilot's own."""
    home = tmp_path / "home"
    (home / "cpuft-venv/bin").mkdir(parents=True, exist_ok=True)
    cpuft = home / "cpuft-venv/bin/cpuft"
    cpuft.write_text('#!/bin/bash\necho "cpuft $*"\n')
    cpuft.chmod(0o755)
    env = {"PATH": os.environ["PATH"], "HOME": str(home), **task["envs"], **skypilot_env}
    proc = subprocess.run(["bash", "-c", task["run"]], capture_output=True, text=True, env=env, timeout=30)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def test_one_node_runs_the_sync_and_resume_contract(task, tmp_path):
    line = run_task(task, tmp_path, SKYPILOT_NUM_NODES="1", SKYPILOT_NODE_RANK="0", SKYPILOT_NODE_IPS="10.0.0.5")
    assert line == (
        f"cpuft sft --config /cpuft/job.yaml --output-dir {tmp_path}/home/cpuft-run "
        "--sync-to gs://my-bucket/runs/lima --resume"
    )


def test_two_nodes_rendezvous_at_the_head_node(task, tmp_path):
    line = run_task(
        task, tmp_path, SKYPILOT_NUM_NODES="2", SKYPILOT_NODE_RANK="1", SKYPILOT_NODE_IPS="10.0.0.5\n10.0.0.6"
    )
    assert line.endswith("--resume --nnodes 2 --node-rank 1 --rdzv-endpoint 10.0.0.5:29500")
