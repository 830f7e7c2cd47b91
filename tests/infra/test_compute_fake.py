"""The provisioning client (gce.py) and the reaper against a local fake of the Compute API.

The VM is created from the very configuration Terraform would send (infra/ evaluated by tfparse),
then a crashed job is simulated, the reaper runs as a user would run it, and nothing cpuft-labelled
may be left.
"""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys

import pytest
from infra_support import SCRIPTS, resources

PROJECT = "my-project-id"


def instance_from_terraform(vm: dict, project: str = PROJECT):
    """The Compute API request google_compute_instance would make for this evaluated resource."""
    from google.cloud import compute_v1

    zone = vm["zone"]
    params = vm["boot_disk"]["initialize_params"]
    scheduling = vm["scheduling"]
    nic = compute_v1.NetworkInterface(
        subnetwork=f"projects/{project}/regions/{zone[:-2]}/subnetworks/cpuft-subnet", nic_type=vm["network_interface"]["nic_type"]
    )
    return compute_v1.Instance(
        name=vm["name"],
        machine_type=f"zones/{zone}/machineTypes/{vm['machine_type']}",
        labels=vm["labels"],
        tags=compute_v1.Tags(items=vm["tags"]),
        disks=[
            compute_v1.AttachedDisk(
                boot=True,
                auto_delete=vm["boot_disk"]["auto_delete"],
                device_name=vm["name"],
                initialize_params=compute_v1.AttachedDiskInitializeParams(
                    source_image=f"projects/{params['image'].replace('/', '/global/images/family/')}",
                    disk_size_gb=params["size"],
                    disk_type=f"zones/{zone}/diskTypes/{params['type']}",
                    labels=params["labels"],
                ),
            )
        ],
        network_interfaces=[nic],
        service_accounts=[
            compute_v1.ServiceAccount(email=f"cpuft-vm@{project}.iam.gserviceaccount.com", scopes=vm["service_account"]["scopes"])
        ],
        shielded_instance_config=compute_v1.ShieldedInstanceConfig(
            enable_secure_boot=vm["shielded_instance_config"]["enable_secure_boot"],
            enable_vtpm=vm["shielded_instance_config"]["enable_vtpm"],
            enable_integrity_monitoring=vm["shielded_instance_config"]["enable_integrity_monitoring"],
        ),
        metadata=compute_v1.Metadata(
            items=[compute_v1.Items(key=k, value=v or "") for k, v in vm["metadata"].items()]
        ),
        scheduling=compute_v1.Scheduling(
            provisioning_model=scheduling["provisioning_model"],
            preemptible=scheduling["preemptible"],
            automatic_restart=scheduling["automatic_restart"],
            on_host_maintenance=scheduling["on_host_maintenance"],
            instance_termination_action=scheduling["instance_termination_action"],
            max_run_duration=compute_v1.Duration(seconds=scheduling["max_run_duration"]["seconds"]),
        ),
    )


def provision(fake, instance, zone):
    """What `terraform apply` does to the VM, through the same client library."""
    import gce

    compute = gce.Compute(PROJECT)
    compute.instances.insert(project=PROJECT, zone=zone, instance_resource=instance).result(timeout=30)
    return compute


def hours_ago(hours: float) -> str:
    return (dt.datetime.now(dt.timezone.utc) - dt.timedelta(hours=hours)).isoformat(timespec="milliseconds")


def run_script(script: str, *args: str) -> subprocess.CompletedProcess:
    """Run a script as a user would; it reaches the fake through CPUFT_GCE_ENDPOINT."""
    return subprocess.run(
        [sys.executable, str(SCRIPTS / script), *args], capture_output=True, text=True, timeout=120, env=os.environ.copy()
    )


def test_provision_crash_reap_leaves_nothing(configs, fake_compute, capsys):
    import gce
    import reaper

    (cpu_vm,) = resources(configs["default"], "google_compute_instance")
    zone = cpu_vm["zone"]
    compute = provision(fake_compute, instance_from_terraform(cpu_vm), zone)
    assert fake_compute.instances(PROJECT) == [(zone, "cpuft-cpu")]
    assert fake_compute.disks(PROJECT) == ["cpuft-cpu"], "the boot disk came with the VM"

    # The provisioning client reads the VM back: it will delete itself and is locked down.
    assert gce.main(["verify", "--project", PROJECT, "--zone", zone, "--name", "cpuft-cpu"]) == 0
    assert "deletes itself (boot disk included) after 8 h" in capsys.readouterr().out

    # The job crashed and the VM was left behind: 30 h later it is still there (say max_run_duration
    # was removed by hand). A second cpuft VM was stopped a day ago: stopped VMs never reach
    # max_run_duration and their disks bill. One disk survived a VM deleted with auto_delete off.
    fake_compute.edit_instance(PROJECT, zone, "cpuft-cpu", creationTimestamp=hours_ago(30))
    (gpu_vm,) = [vm for vm in resources(configs["all-features"], "google_compute_instance") if vm["name"].endswith("-gpu")]
    provision(fake_compute, instance_from_terraform(gpu_vm), gpu_vm["zone"])
    fake_compute.edit_instance(PROJECT, gpu_vm["zone"], gpu_vm["name"], status="TERMINATED", creationTimestamp=hours_ago(26))
    fake_compute.put_disk(PROJECT, zone, "cpuft-cpu-old-disk", labels=cpu_vm["labels"], created=hours_ago(40))
    # Not to be touched: a fresh cpuft VM (a job running right now) and somebody else's old VM.
    fresh = instance_from_terraform({**cpu_vm, "name": "cpuft-fresh"})
    provision(fake_compute, fresh, zone)
    foreign = instance_from_terraform({**cpu_vm, "name": "web-server", "labels": {"team": "web"}})
    provision(fake_compute, foreign, zone)
    fake_compute.edit_instance(PROJECT, zone, "web-server", creationTimestamp=hours_ago(500))

    capsys.readouterr()
    assert gce.main(["--project", PROJECT, "--older-than-hours", "12", "--dry-run"], parser=reaper.build_parser()) == 0
    assert capsys.readouterr().out.count("would delete") == 3
    assert len(fake_compute.instances(PROJECT)) == 4, "a dry run deletes nothing"

    reaped = run_script("reaper.py", "--project", PROJECT, "--older-than-hours", "12")
    assert reaped.returncode == 0, reaped.stdout + reaped.stderr
    assert f"deleting VM {zone}/cpuft-cpu (RUNNING, 30.0 h old)" in reaped.stdout
    assert f"deleting VM {gpu_vm['zone']}/cpuft-all-gpu (TERMINATED, 26.0 h old)" in reaped.stdout
    assert f"deleting unattached disk {zone}/cpuft-cpu-old-disk" in reaped.stdout
    assert fake_compute.instances(PROJECT) == [(zone, "cpuft-fresh"), (zone, "web-server")]

    # The end of the day: reap everything cpuft, however young. Nothing of ours is left billing.
    assert gce.main(["--project", PROJECT, "--older-than-hours", "0", "--zone", zone], parser=reaper.build_parser()) == 0
    assert fake_compute.instances(PROJECT) == [(zone, "web-server")]
    assert fake_compute.disks(PROJECT) == ["web-server"]
    assert [vm.name for vm in compute.list_vms()] == []
    capsys.readouterr()
    assert gce.reap(compute, older_than_hours=0) == 0
    assert "nothing to reap" in capsys.readouterr().out


def test_verify_refuses_a_vm_that_would_only_stop(configs, fake_compute, capsys):
    import gce

    (vm,) = resources(configs["default"], "google_compute_instance")
    instance = instance_from_terraform(vm)
    instance.scheduling.instance_termination_action = "STOP"
    instance.scheduling.max_run_duration = None
    instance.service_accounts[0].email = "123456789-compute@developer.gserviceaccount.com"
    provision(fake_compute, instance, vm["zone"])

    assert gce.main(["verify", "--project", PROJECT, "--zone", vm["zone"], "--name", vm["name"]]) == 1
    out = capsys.readouterr().out
    assert "NOT safe to leave unattended" in out
    assert "not 'DELETE'" in out and "no max_run_duration" in out and "default compute service account" in out


def test_verify_of_a_missing_vm_is_bad_input(fake_compute, capsys):
    import gce

    assert gce.main(["verify", "--project", PROJECT, "--zone", "us-central1-a", "--name", "nope"]) == 2
    assert "not found" in capsys.readouterr().err


@pytest.mark.parametrize(
    "args, message",
    [
        (["--older-than-hours", "-1", "--project", PROJECT], "hours cannot be negative"),
        (["--older-than-hours", "soon", "--project", PROJECT], "not a number of hours"),
        (["--older-than-hours", "1"], "no project"),
    ],
)
def test_reaper_bad_input_exits_2(fake_compute, monkeypatch, args, message):
    monkeypatch.delenv("CLOUDSDK_CORE_PROJECT", raising=False)
    monkeypatch.delenv("GOOGLE_CLOUD_PROJECT", raising=False)
    proc = run_script("reaper.py", *args)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr


# --- Instance groups (recreate_on_preemption) -------------------------------------------------


def template_from_terraform(template: dict, project: str = PROJECT):
    """The Compute API request google_compute_instance_template would make for this evaluated resource."""
    from google.cloud import compute_v1

    disk = template["disk"]
    scheduling = template["scheduling"]
    return compute_v1.InstanceTemplate(
        name=template["name_prefix"] + "20250101000000000000000001",  # terraform appends a timestamp-based suffix
        properties=compute_v1.InstanceProperties(
            machine_type=template["machine_type"],
            labels=template["labels"],
            tags=compute_v1.Tags(items=template["tags"]),
            disks=[
                compute_v1.AttachedDisk(
                    boot=disk["boot"],
                    auto_delete=disk["auto_delete"],
                    initialize_params=compute_v1.AttachedDiskInitializeParams(
                        source_image=disk["source_image"], disk_size_gb=disk["disk_size_gb"],
                        disk_type=disk["disk_type"], labels=disk["labels"],
                    ),
                )
            ],
            network_interfaces=[compute_v1.NetworkInterface(nic_type=template["network_interface"]["nic_type"])],
            service_accounts=[
                compute_v1.ServiceAccount(
                    email=f"cpuft-vm@{project}.iam.gserviceaccount.com", scopes=template["service_account"]["scopes"]
                )
            ],
            shielded_instance_config=compute_v1.ShieldedInstanceConfig(
                enable_secure_boot=template["shielded_instance_config"]["enable_secure_boot"],
                enable_vtpm=template["shielded_instance_config"]["enable_vtpm"],
                enable_integrity_monitoring=template["shielded_instance_config"]["enable_integrity_monitoring"],
            ),
            # tfparse does not render templatefile(); the group's own startup script stands in
            # (verify --group looks for the command that deletes the group in it).
            metadata=compute_v1.Metadata(items=[
                compute_v1.Items(key=k, value=v or "gcloud compute instance-groups managed delete \"$CPUFT_GROUP\"")
                if k == "startup-script" else compute_v1.Items(key=k, value=v or "")
                for k, v in template["metadata"].items()
            ]),
            scheduling=compute_v1.Scheduling(
                provisioning_model=scheduling["provisioning_model"],
                preemptible=scheduling["preemptible"],
                automatic_restart=scheduling["automatic_restart"],
                on_host_maintenance=scheduling["on_host_maintenance"],
                instance_termination_action=scheduling["instance_termination_action"],
                max_run_duration=compute_v1.Duration(seconds=scheduling["max_run_duration"]["seconds"]),
            ),
        ),
    )


def provision_group(configs, template_edit=None, target_size=None, name=None):
    """What `terraform apply` does for recreate.tfvars: the template, then the group that uses it."""
    import gce
    from google.cloud import compute_v1

    (template,) = resources(configs["recreate"], "google_compute_instance_template")
    (group,) = resources(configs["recreate"], "google_compute_instance_group_manager")
    request = template_from_terraform(template)
    if name:
        request.name = name + "-template"
    if template_edit:
        template_edit(request)
    compute = gce.Compute(PROJECT)
    compute.templates.insert(project=PROJECT, instance_template_resource=request).result(timeout=30)
    link = compute.templates.get(project=PROJECT, instance_template=request.name).self_link
    compute.groups.insert(
        project=PROJECT,
        zone=group["zone"],
        instance_group_manager_resource=compute_v1.InstanceGroupManager(
            name=name or group["name"],
            base_instance_name=name or group["base_instance_name"],
            target_size=group["target_size"] if target_size is None else target_size,
            versions=[compute_v1.InstanceGroupManagerVersion(name=group["version"]["name"], instance_template=link)],
        ),
    ).result(timeout=30)
    return compute, group["zone"], name or group["name"]


def test_the_reaper_deletes_a_group_not_just_its_vm(configs, fake_compute, capsys):
    import gce
    import reaper

    compute, zone, group = provision_group(configs)
    ((vm_zone, vm_name),) = fake_compute.instances(PROJECT)
    assert vm_zone == zone and vm_name.startswith(f"{group}-")
    assert fake_compute.disks(PROJECT) == [vm_name]

    # provision's check reads the group and its template back: one VM that deletes itself.
    assert gce.main(["verify", "--project", PROJECT, "--zone", zone, "--group", group]) == 0
    assert "each deletes itself (boot disk included) after 8 h" in capsys.readouterr().out

    # The reaper's view of the VM: cpuft's, and a member of the group.
    (vm,) = compute.list_vms()
    assert vm.group == (zone, group)

    # A day and a half later nothing ended the queue (say its VM could not reach the API). Deleting
    # the VM alone is what the reaper used to do; the group would put a new one in its place.
    fake_compute.edit_group(PROJECT, zone, group, creationTimestamp=hours_ago(36))
    fake_compute.edit_instance(PROJECT, zone, vm_name, creationTimestamp=hours_ago(30))
    # Not to be touched: somebody else's old group, whose template has no cpuft label.
    provision_group(configs, name="web", template_edit=lambda t: t.properties.labels.clear())
    fake_compute.edit_group(PROJECT, zone, "web", creationTimestamp=hours_ago(500))

    capsys.readouterr()
    assert gce.main(["--project", PROJECT, "--older-than-hours", "12", "--dry-run"], parser=reaper.build_parser()) == 0
    out = capsys.readouterr().out
    assert f"would delete instance group {zone}/{group} and its VMs" in out
    assert "would delete VM" not in out, "the group's VM goes with its group, never alone"

    reaped = run_script("reaper.py", "--project", PROJECT, "--older-than-hours", "12")
    assert reaped.returncode == 0, reaped.stdout + reaped.stderr
    assert fake_compute.groups(PROJECT) == ["web"]
    ((_z, left),) = fake_compute.instances(PROJECT)
    assert left.startswith("web-"), "only the foreign group's VM is left"
    assert not any(d.startswith(f"{group}-") for d in fake_compute.disks(PROJECT)), "the VM's disk went with it"


def test_the_reaper_finds_a_group_waiting_for_capacity(configs, fake_compute):
    # No VM at all (Spot capacity ran out after a preemption): only the group's template says it is
    # cpuft's, and the group would create a VM the moment capacity comes back.
    _compute, zone, group = provision_group(configs, target_size=0)
    assert fake_compute.instances(PROJECT) == []
    fake_compute.edit_group(PROJECT, zone, group, creationTimestamp=hours_ago(40))
    reaped = run_script("reaper.py", "--project", PROJECT, "--older-than-hours", "24", "--stack", "cpuft-queue")
    assert reaped.returncode == 0, reaped.stdout + reaped.stderr
    assert f"deleting instance group {zone}/{group}" in reaped.stdout
    assert fake_compute.groups(PROJECT) == []


def test_a_young_group_is_left_alone_and_listed(configs, fake_compute, capsys):
    import gce
    import reaper

    _compute, zone, group = provision_group(configs)
    fake_compute.edit_group(PROJECT, zone, group, creationTimestamp=hours_ago(3))
    capsys.readouterr()
    assert gce.main(["--project", PROJECT, "--older-than-hours", "12"], parser=reaper.build_parser()) == 0
    assert "nothing to reap" in capsys.readouterr().out
    assert fake_compute.groups(PROJECT) == [group]
    assert gce.main(["list", "--project", PROJECT]) == 0
    listed = capsys.readouterr().out
    assert f"{zone}/{group}\tinstance group of 1" in listed
    assert f"in group {group}" in listed


def test_verify_refuses_a_group_whose_vms_would_only_stop(configs, fake_compute, capsys):
    import gce

    def stop_instead(template):
        template.properties.scheduling.instance_termination_action = "STOP"

    _compute, zone, group = provision_group(configs, template_edit=stop_instead, target_size=2)
    assert gce.main(["verify", "--project", PROJECT, "--zone", zone, "--group", group]) == 1
    out = capsys.readouterr().out
    assert "not 'DELETE'" in out and "target size is 2, not 1" in out
    assert gce.main(["verify", "--project", PROJECT, "--zone", zone]) == 2, "--name or --group is needed"
