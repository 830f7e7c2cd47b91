"""checkov's GCP policies on infra/: no failure at all, and every skip carries a written reason.

Scanned once per example var file (checkov is the slow part of this suite): the default variables,
examples/all-features.tfvars, recreate.tfvars (instance groups) and multi-node.tfvars (node_count = 2),
because checkov does not scan resources whose count is 0.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest
from infra_support import INFRA, ROOT, VAR_FILES


def _checkov() -> str | None:
    for candidate in (os.environ.get("CPUFT_CHECKOV"), str(ROOT / ".venv-infra/checkov/bin/checkov")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return shutil.which("checkov")


@pytest.fixture(scope="module", params=sorted(VAR_FILES))
def scan(request) -> tuple[str, dict]:
    checkov = _checkov()
    if checkov is None:
        pytest.skip("checkov not installed (scripts/gcp/setup-test-env puts it in .venv-infra/checkov)")
    command = [checkov, "--directory", str(INFRA), "--framework", "terraform", "--output", "json", "--compact"]
    command += ["--skip-download"]
    if request.param != "default":
        command += ["--var-file", str(INFRA / VAR_FILES[request.param])]
    env = {**os.environ, "BC_SKIP_MAPPING": "TRUE", "CHECKOV_RUN_SCA_PACKAGE_SCAN_V2": "false"}
    proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    # checkov exits 1 when a check fails; the JSON says which.
    assert proc.returncode in (0, 1), proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    if isinstance(report, list):  # one entry per framework
        (report,) = [r for r in report if r.get("check_type") == "terraform"]
    return request.param, report


def test_no_failed_checks(scan):
    name, report = scan
    failed = [
        f"{c['check_id']} {c['resource']} ({c['file_path']}:{c['file_line_range']}): {c['check_name']}"
        for c in report["results"]["failed_checks"]
    ]
    assert not failed, f"checkov failures with the {name} variables:\n" + "\n".join(failed)


def test_every_skip_has_a_written_reason(scan):
    _name, report = scan
    for check in report["results"]["skipped_checks"]:
        reason = (check.get("check_result", {}).get("suppress_comment") or "").strip()
        assert len(reason) >= 30, f"{check['check_id']} on {check['resource']} is skipped without a real reason"


def test_the_scan_saw_the_vms_and_the_optional_resources(scan):
    name, report = scan
    checked = report["results"]["passed_checks"] + report["results"]["skipped_checks"]
    resource_types = {c["resource"].split(".")[0] for c in checked}
    assert {"google_compute_firewall", "google_compute_subnetwork"} <= resource_types
    assert report["summary"]["passed"] >= 20
    if name == "all-features":
        vms = {c["resource"] for c in checked if c["resource"].startswith("google_compute_instance.")}
        assert len(vms) == 2, f"both VMs scanned, got {vms}"
        assert "google_storage_bucket" in resource_types
    if name == "recreate":
        assert {"google_compute_instance_template", "google_project_iam_member"} <= resource_types
    if name == "multi-node":
        rules = {c["resource"] for c in checked if c["resource"].startswith("google_compute_firewall.")}
        assert "google_compute_firewall.nodes" in {r.split("[")[0] for r in rules}, f"node firewall scanned, got {rules}"
    if name != "recreate":
        assert "google_compute_instance" in resource_types
