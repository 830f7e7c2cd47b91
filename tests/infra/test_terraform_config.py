"""infra/ as evaluated for the default and the all-features var files: the promises of the README,
checked on the configuration Terraform would send to Google."""

from __future__ import annotations

import re

import pytest
from infra_support import INFRA, PRICES, VAR_FILES, outputs, resources

IAP_RANGE = "35.235.240.0/20"
BOTH = ["default", "all-features"]
ALL = sorted(VAR_FILES)


def vms(config):
    return resources(config, "google_compute_instance")


def templates(config):
    return resources(config, "google_compute_instance_template")


def vms_and_templates(config):
    """Every VM there will be: the plain ones, and the template each group makes its VM from."""
    return vms(config) + templates(config)


def boot_disk(vm):
    """(auto_delete, labels) of a VM's or a template's boot disk."""
    if "boot_disk" in vm:
        return vm["boot_disk"]["auto_delete"], vm["boot_disk"]["initialize_params"]["labels"]
    return vm["disk"]["auto_delete"], vm["disk"]["labels"]


def test_default_is_one_spot_c3_with_amx(configs):
    (vm,) = vms(configs["default"])
    assert vm["machine_type"] == "c3-standard-22"
    assert vm["scheduling"]["provisioning_model"] == "SPOT"
    assert vm["scheduling"]["preemptible"] is True
    assert vm["boot_disk"]["initialize_params"]["size"] >= 100, "room for models and checkpoints"
    assert vm["boot_disk"]["initialize_params"]["image"] == "debian-cloud/debian-12", "kernel 6.1 >= 5.16 for AMX"


@pytest.mark.parametrize("name", ALL)
def test_every_vm_deletes_itself_with_its_disk(configs, name):
    everything = vms_and_templates(configs[name])
    assert everything
    for vm in everything:
        label = vm.get("name") or vm["name_prefix"]
        scheduling = vm["scheduling"]
        assert scheduling["instance_termination_action"] == "DELETE", label
        assert 3600 <= scheduling["max_run_duration"]["seconds"] <= 7 * 24 * 3600, label
        assert boot_disk(vm)[0] is True, label
    for vm in vms(configs[name]):
        assert vm["deletion_protection"] is False, "the reaper and max_run_duration must be able to delete it"


@pytest.mark.parametrize("name", ALL)
def test_labels_for_cost_tracking_on_vms_disks_and_bucket(configs, name):
    config = configs[name]
    labelled = [vm["labels"] for vm in vms_and_templates(config)]
    labelled += [boot_disk(vm)[1] for vm in vms_and_templates(config)]
    labelled += [b["labels"] for b in resources(config, "google_storage_bucket")]
    assert labelled
    for labels in labelled:
        assert labels["managed-by"] == "cpuft"
        assert labels["cpuft-stack"]
    if name == "all-features":
        assert all(labels["team"] == "ml" for labels in labelled), "user labels reach every resource"


COMPUTE_SCOPE = "https://www.googleapis.com/auth/compute"


@pytest.mark.parametrize("name", ALL)
def test_dedicated_service_account_with_narrow_scopes(configs, name):
    config = configs[name]
    (sa,) = resources(config, "google_service_account")
    recreate = name == "recreate"
    for vm in vms_and_templates(config):
        account = vm["service_account"]
        assert account["email"]["__attribute__"] == "google_service_account.vm.email"
        assert "https://www.googleapis.com/auth/cloud-platform" not in account["scopes"]
        assert set(account["scopes"]) <= {
            "https://www.googleapis.com/auth/logging.write",
            "https://www.googleapis.com/auth/monitoring.write",
            "https://www.googleapis.com/auth/devstorage.read_write",
            COMPUTE_SCOPE,
        }
        assert (COMPUTE_SCOPE in account["scopes"]) == recreate, "Compute Engine only for a VM that deletes its group"
    members = resources(config, "google_project_iam_member")
    assert {m["role"] for m in members if m["role"].startswith("roles/")} == {
        "roles/logging.logWriter", "roles/monitoring.metricWriter"
    }
    assert len(members) == 2 + recreate, "with recreation, one more grant: the custom role below, nothing predefined"


def test_a_recreated_vm_may_only_read_and_delete_instance_groups(configs):
    (role,) = resources(configs["recreate"], "google_project_iam_custom_role")
    assert sorted(role["permissions"]) == ["compute.instanceGroupManagers.delete", "compute.instanceGroupManagers.get"]
    (grant,) = [m for m in resources(configs["recreate"], "google_project_iam_member") if not m["role"].startswith("roles/")]
    assert grant["role"] == role["id"], "the grant is of that custom role"
    assert grant["member"]["__attribute__"] == "google_service_account.vm.member", "to the VM's own account only"
    for name in ("default", "all-features", "multi-node"):
        assert not resources(configs[name], "google_project_iam_custom_role")


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
    for name in ALL:
        for rule in resources(configs[name], "google_compute_firewall"):
            ranges = rule.get("source_ranges") or []
            assert "0.0.0.0/0" not in ranges and "::/0" not in ranges


@pytest.mark.parametrize("name", ALL)
def test_os_login_shielded_vm_no_serial_port(configs, name):
    for vm in vms_and_templates(configs[name]):
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


def test_the_example_var_files_create_every_optional_resource(configs):
    """checkov skips resources with count = 0, so the example var files it scans must together
    instantiate each one (plain VMs and instance groups exclude each other, so one file cannot)."""
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
        for config in configs.values()
        for rtype, items in config.items()
        if rtype.startswith("google_")
        for r in items
        if r.get("__tfmeta", {}).get("type") == "resource"
    }
    missing = [f"{t}.{n}" for t, n in optional if (t, n) not in present]
    assert not missing, f"no example var file creates these, so checkov never scans them: {missing}"


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



# --- More than one machine: node_count = 2 ---------------------------------------------------


def test_two_nodes_in_one_compact_placement(configs):
    config = configs["multi-node"]
    nodes = sorted(vms(config), key=lambda vm: vm["name"])
    assert [vm["name"] for vm in nodes] == ["cpuft-duo-cpu-0", "cpuft-duo-cpu-1"]
    assert all(vm["machine_type"] == "c3-standard-44" for vm in nodes)
    (policy,) = resources(config, "google_compute_resource_policy")
    assert policy["group_placement_policy"]["collocation"] == "COLLOCATED"
    assert policy["group_placement_policy"]["vm_count"] == 2
    assert policy["region"] == "us-central1"
    for vm in nodes:
        assert vm["resource_policies"] == [policy["id"]], f"{vm['name']} is in the compact placement"
        assert vm["scheduling"]["on_host_maintenance"] == "TERMINATE", "compact placement cannot live-migrate"


def test_each_node_gets_its_rank_and_rank_0s_address_from_metadata(configs):
    nodes = sorted(vms(configs["multi-node"]), key=lambda vm: vm["name"])
    assert [vm["network_interface"]["network_ip"] for vm in nodes] == ["10.42.0.10", "10.42.0.11"]
    for rank, vm in enumerate(nodes):
        assert vm["metadata"]["cpuft-node-rank"] == str(rank)
        assert vm["metadata"]["cpuft-node-count"] == "2"
        assert vm["metadata"]["cpuft-rdzv-endpoint"] == "10.42.0.10:29500", "node 0's fixed address, torchrun's port"
    out = outputs(configs["multi-node"])
    assert out["nodes"] == ["cpuft-duo-cpu-0", "cpuft-duo-cpu-1"] and out["vm_name"] == "cpuft-duo-cpu-0"
    assert out["rdzv_endpoint"] == "10.42.0.10:29500"
    assert out["hourly_usd"] == pytest.approx(2 * 0.41) and out["max_cost_usd"] == pytest.approx(2 * 0.41 * 8)


def test_the_node_firewall_admits_only_the_nodes_themselves(configs):
    config = configs["multi-node"]
    (rule,) = [r for r in resources(config, "google_compute_firewall") if r["name"].endswith("-nodes-internal")]
    assert rule["direction"] == "INGRESS"
    assert not rule.get("source_ranges"), "no address range at all, so no public one"
    assert rule["source_tags"] == rule["target_tags"] == ["cpuft-duo-nodes"]
    assert rule["allow"]["protocol"] == "tcp" and rule["allow"]["ports"] == ["29500", "32768-60999"]
    tagged = [vm["name"] for vm in vms(config) if "cpuft-duo-nodes" in vm["tags"]]
    assert sorted(tagged) == ["cpuft-duo-cpu-0", "cpuft-duo-cpu-1"], "the tag is on the nodes and nowhere else"
    for name in ("default", "all-features", "recreate"):
        assert not resources(configs[name], "google_compute_resource_policy")
        assert [r["name"].endswith("-allow-ssh") for r in resources(configs[name], "google_compute_firewall")] == [True]


def test_a_single_vm_has_empty_node_metadata(configs):
    (vm,) = vms(configs["default"])
    assert vm["name"] == "cpuft-cpu" and vm["tags"] == ["cpuft-ssh"] and vm["resource_policies"] == []
    assert vm["metadata"]["cpuft-node-rank"] == "" and vm["metadata"]["cpuft-rdzv-endpoint"] == ""
    assert outputs(configs["default"])["nodes"] == ["cpuft-cpu"]


# --- A VM that comes back: recreate_on_preemption ---------------------------------------------


def test_recreate_makes_a_group_of_one_from_a_template_and_no_plain_vm(configs):
    config = configs["recreate"]
    assert not vms(config), "the group's VM replaces the plain one"
    (template,) = templates(config)
    (group,) = resources(config, "google_compute_instance_group_manager")
    assert group["target_size"] == 1
    assert group["name"] == group["base_instance_name"] == "cpuft-queue-cpu"
    assert group["version"]["__tfmeta"]["references"][0]["label"] == "google_compute_instance_template"
    assert template["scheduling"]["provisioning_model"] == "SPOT"
    assert template["scheduling"]["max_run_duration"]["seconds"] == 8 * 3600, "each VM still deletes itself"
    assert template["lifecycle"]["create_before_destroy"] is True, "the group always has a template to point at"
    assert group["wait_for_instances"] is False, "apply must not wait for Spot capacity"
    assert group["update_policy"]["type"] == "OPPORTUNISTIC", "a new template never kills a running job"
    assert group["instance_lifecycle_policy"]["default_action_on_failure"] == "REPAIR"


def test_recreate_outputs_and_worst_case(configs):
    out = outputs(configs["recreate"])
    assert out["vm_name"] == "" and out["instance_group"] == "cpuft-queue-cpu"
    assert out["recreate_on_preemption"] is True and out["max_total_hours"] == 24
    assert out["max_cost_usd"] == pytest.approx(0.20 * 24), "the group's whole allowance, not one VM's 8 h"
    assert out["queue_sync_url"] == "gs://my-project-id-cpuft-queue-results/queues/cpuft-queue"
    assert "instance-groups managed list-instances cpuft-queue-cpu" in out["ssh_command"]
    assert outputs(configs["default"])["instance_group"] == ""
