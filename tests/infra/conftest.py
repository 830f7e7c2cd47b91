"""Fixtures for the offline infrastructure tests.

These tests need the tools in .venv-infra (scripts/gcp/setup-test-env); run them with
scripts/gcp/test-infra. Under another interpreter each test that lacks a tool skips and says which.
"""

from __future__ import annotations

import os
import shutil
import sys

import pytest
from infra_support import INFRA, SCRIPTS, VAR_FILES

# scripts/gcp holds plain modules (gce.py, plan_summary.py), not a package.
sys.path.insert(0, str(SCRIPTS))

# Terraform must not phone home or read a personal config while testing.
os.environ["CHECKPOINT_DISABLE"] = "1"
os.environ["TF_CLI_CONFIG_FILE"] = "/dev/null"
# google-auth must not probe for a GCE metadata server.
os.environ["NO_GCE_CHECK"] = "True"


@pytest.fixture(scope="session")
def terraform() -> str:
    path = shutil.which("terraform")
    if path is None:
        pytest.skip("no terraform binary on PATH (no package registry ships one); fmt/test checks skipped")
    return path


@pytest.fixture(scope="session")
def configs() -> dict[str, dict]:
    """infra/ as Terraform would evaluate it, per var file (tfparse resolves variables, count,
    for_each, locals and module outputs without any provider)."""
    tfparse = pytest.importorskip("tfparse", reason="tfparse not installed (scripts/gcp/setup-test-env)")
    return {name: tfparse.load_from_path(str(INFRA), vars_paths=[path]) for name, path in VAR_FILES.items()}


@pytest.fixture(scope="session")
def _fake_compute_server():
    pytest.importorskip("gcplocal", reason="gcplocal not installed (scripts/gcp/setup-test-env)")
    pytest.importorskip("google.cloud.compute_v1", reason="google-cloud-compute not installed")
    from infra_support import FakeCompute

    server = FakeCompute()
    yield server
    server.close()


@pytest.fixture
def fake_compute(_fake_compute_server, monkeypatch):
    """A clean local Compute API; gce.py and reaper.py talk to it through CPUFT_GCE_ENDPOINT."""
    _fake_compute_server.reset()
    monkeypatch.setenv("CPUFT_GCE_ENDPOINT", _fake_compute_server.url)
    return _fake_compute_server
