"""infra/ as evaluated for the default and the all-features var files: the promises of the README,
checked on the configuration Terraform would send to Google."""

from __future__ import annotations

import re

import pytest
from infra_support import INFRA, PRICES, outputs, resources

IAP_RANGE = "35.235.240.0/20"
BOTH = ["default", "all-features"]


def vms(config):
    return resources(config, "google_compute_instance")


def test_default_is_one_spot_c3_with_amx(configs):
    (vm,) = vms(configs["default"])
    assert vm["machine_type"] == "c3-standard-22"
    assert vm["scheduling"]["provisioning_model"] == "SPOT"
    assert vm["scheduling"]["preemptible"] is True
    assert vm["boot_disk"]["initialize_params"]["size"] >= 100, "room for models and checkpoints"
    assert vm["boot_disk"]["initialize_params"]["image"] == "debian-cloud/debian-12", "kernel 6.1 >= 5.16 for AMX"


@pytest.mark.parametrize("name", BOTH)
def test_every_vm_deletes_itself_with_its_disk(configs, name):
    for vm in vms(configs[name]):
        scheduling = vm["scheduling"]
        assert scheduling["instance_termination_action"] == "DELETE", vm["name"]
        assert 3600 <= scheduling["max_run_duration"]["seconds"] <= 7 * 24 * 3600, vm["name"]
        assert vm["boot_disk"]["auto_delete"] is True, vm["name"]
        assert vm["deletion_protection"] is False, "the reaper and max_run_duration must be able to delete it"


@pytest.mark.parametrize("name", BOTH)
def test_labels_for_cost_tracking_on_vms_disks_and_bucket(configs, name):
    config = configs[name]
    labelled = [vm["labels"] for vm in vms(config)]
    labelled += [vm["boot_disk"]["initialize_params"]["labels"] for vm in vms(config)]
    labelled += [b["labels"] for b in resources(config, "google_storage_bucket")]
    assert labelled
    for labels in labelled:
        assert labels["managed-by"] == "cpuft"
        assert labels["cpuft-stack"]
    if name == "all-features":
        assert all(labels["team"] == "ml" for labels in labelled), "user labels reach every resource"


@pytest.mark.parametrize("name", BOTH)
def test_dedicated_service_account_with_narrow_scopes(configs, name):
    config = configs[name]
    (sa,) = resources(config, "google_service_account")
    for vm in vms(config):
        account = vm["service_account"]
        assert account["email"]["__attribute__"] == "google_service_account.vm.email"
        assert "https://www.googleapis.com/auth/cloud-platform" not in account["scopes"]
        assert set(account["scopes"]) <= {
            "https://www.googleapis.com/auth/logging.write",
            "https://www.googleapis.com/auth/monitoring.write",
            "https://www.googleapis.com/auth/devstorage.read_write",
        }
    project_roles = {m["role"] for m in resources(config, "google_project_iam_member")}
    assert project_roles == {"roles/logging.logWriter", "roles/monitoring.metricWriter"}


def test_storage_scope_only_with_a_bucket(configs):
    (vm,) = vms(configs["default"])
    assert not any("devstorage" in s for s in vm["service_account"]["scopes"])
    (member,) = resources(configs["all-features"], "google_storage_bucket_iam_member")
    assert member["role"] == "roles/storage.objectUser", "write access to the results bucket only"


def test_ssh_only_through_iap_by_default(configs):
    (rule,) = resources(configs["default"], "google_compute_firewall")
    assert rule["source_ranges"] == [IAP_RANGE]
    assert rule["allow"]["ports"] == ["22"]
    assert outputs(configs["default"])["ssh_via"] == "iap"


def test_explicit_cidr_replaces_iap_and_is_never_the_internet(configs):
    (rule,) = resources(configs["all-features"], "google_compute_firewall")
    assert rule["source_ranges"] == ["203.0.113.0/24"]
    for name in BOTH:
        for rule in resources(configs[name], "google_compute_firewall"):
            assert "0.0.0.0/0" not in rule["source_ranges"] and "::/0" not in rule["source_ranges"]


@pytest.mark.parametrize("name", BOTH)
def test_os_login_shielded_vm_no_serial_port(configs, name):
    for vm in vms(configs[name]):
        assert vm["metadata"]["enable-oslogin"] == "TRUE"
        assert vm["metadata"]["block-project-ssh-keys"] == "TRUE"
        assert vm["metadata"]["serial-port-enable"] == "FALSE"
        shielded = vm["shielded_instance_config"]
        assert shielded["enable_secure_boot"] and shielded["enable_vtpm"] and shielded["enable_integrity_monitoring"]


def test_gpu_vm_is_a_g2_with_l4(configs):
    by_name = {vm["name"]: vm for vm in vms(configs["all-features"])}
    gpu = by_name["cpuft-all-gpu"]
    assert gpu["machine_type"] == "g2-standard-8"
    assert gpu["scheduling"]["on_host_maintenance"] == "TERMINATE", "GPU VMs cannot live-migrate"
    assert gpu["labels"]["cpuft-role"] == "gpu"


def test_results_bucket_is_private_and_empties_itself(configs):
    assert not resources(configs["default"], "google_storage_bucket")
    (bucket,) = resources(configs["all-features"], "google_storage_bucket")
    assert bucket["uniform_bucket_level_access"] is True
    assert bucket["public_access_prevention"] == "enforced"
    ages = [rule["condition"].get("age") for rule in bucket["lifecycle_rule"]]
    assert 14 in ages, "objects expire after results_retention_days"


def test_budget_alert_only_with_a_billing_account(configs):
    assert not resources(configs["default"], "google_billing_budget")
    (budget,) = resources(configs["all-features"], "google_billing_budget")
    assert budget["amount"]["specified_amount"] == {**budget["amount"]["specified_amount"], "currency_code": "USD", "units": "100"}
    thresholds = [rule["threshold_percent"] for rule in budget["threshold_rules"]]
    assert thresholds[:3] == [0.5, 0.9, 1.0]


def test_outputs_a_user_needs(configs):
    out = outputs(configs["default"])
    assert out["vm_name"] == "cpuft-cpu"
    assert out["zone"] == "us-central1-a"
    assert out["ssh_command"] == (
        "gcloud compute ssh cpuft-cpu --project my-project-id --zone us-central1-a --tunnel-through-iap"
    )
    assert out["hourly_usd"] == pytest.approx(0.20)
    assert out["max_cost_usd"] == pytest.approx(1.60)
    assert out["vms"]["cpu"]["hourly_usd_on_demand"] == pytest.approx(1.11)
    everything = outputs(configs["all-features"])
    assert everything["hourly_usd"] == pytest.approx(2.22 + 0.85), "on-demand c3-standard-44 + g2-standard-8"
    assert "--tunnel-through-iap" not in everything["ssh_command"]
    assert everything["results_bucket"] == "gs://my-project-id-cpuft-all-results"


def test_all_features_var_file_creates_every_optional_resource(configs):
    """checkov skips resources with count = 0, so the all-features scan must instantiate each one."""
    hcl2 = pytest.importorskip("hcl2", reason="python-hcl2 not installed (scripts/gcp/setup-test-env)")
    optional = []
    for tf_file in sorted(INFRA.glob("*.tf")):
        with tf_file.open() as handle:
            parsed = hcl2.load(handle)
        for block in parsed.get("resource", []):
            for rtype, named in block.items():
                for name, body in named.items():
                    if "count" in body or "for_each" in body:
                        optional.append((_unquote(rtype), _unquote(name)))
    assert len(optional) >= 8
    present = {
        (r["__tfmeta"]["label"], r["__tfmeta"]["path"].split(".")[1].split("[")[0])
        for rtype, items in configs["all-features"].items()
        if rtype.startswith("google_")
        for r in items
        if r.get("__tfmeta", {}).get("type") == "resource"
    }
    missing = [f"{t}.{n}" for t, n in optional if (t, n) not in present]
    assert not missing, f"all-features.tfvars leaves these out, so checkov never scans them: {missing}"


def test_provider_is_hashicorp_google_6_or_later():
    hcl2 = pytest.importorskip("hcl2", reason="python-hcl2 not installed (scripts/gcp/setup-test-env)")
    with (INFRA / "versions.tf").open() as handle:
        parsed = hcl2.load(handle)
    google = parsed["terraform"][0]["required_providers"][0]["google"]
    assert _unquote(google["source"]) == "hashicorp/google"
    assert re.match(r">= ?6\.", _unquote(google["version"]))


def test_no_cloud_platform_scope_and_no_open_ssh_anywhere():
    text = "\n".join(p.read_text() for p in INFRA.rglob("*.tf"))
    assert "auth/cloud-platform" not in text
    assert '"0.0.0.0/0"' not in text


def _unquote(value):
    # python-hcl2 8 keeps the quotes of string literals and keys.
    return value[1:-1] if isinstance(value, str) and len(value) >= 2 and value[0] == value[-1] == '"' else value


def test_readme_cost_table_matches_the_price_table():
    import csv

    readme = (INFRA / "README.md").read_text()
    with PRICES.open() as handle:
        prices = {row["machine_type"]: row for row in csv.DictReader(handle)}
    for machine in ("c3-standard-22", "c3-standard-44", "g2-standard-8"):
        row = next(line for line in readme.splitlines() if line.startswith(f"| {machine}"))
        spot = f"{float(prices[machine]['spot_usd_per_hour']):.2f}"
        on_demand = f"{float(prices[machine]['on_demand_usd_per_hour']):.2f}"
        assert f"≈ ${spot} | ≈ ${on_demand}" in row, f"README and gcp_prices.csv disagree on {machine}"

