# Offline tests of the VM plan: `terraform test` in infra/modules/vm_plan.
# No provider is involved, so this runs where the google provider cannot be downloaded.

variables {
  name            = "cpuft"
  cpuft_pip_spec  = "cpuft==0.1.0"
  price_table_csv = file("../../../cpuft/planning/gcp_prices.csv")
}

run "defaults_are_one_self_deleting_spot_c3" {
  command = apply

  assert {
    condition     = keys(output.vms) == ["cpu"]
    error_message = "By default exactly one VM, the CPU one, is planned."
  }
  assert {
    condition     = output.vms.cpu.machine_type == "c3-standard-22" && output.vms.cpu.amx
    error_message = "The default VM is a c3-standard-22, which has AMX."
  }
  assert {
    condition     = output.vms.cpu.provisioning_model == "SPOT" && output.vms.cpu.preemptible
    error_message = "The default VM is Spot."
  }
  assert {
    condition     = output.vms.cpu.instance_termination_action == "DELETE" && output.vms.cpu.max_run_duration_seconds == 8 * 3600
    error_message = "The VM must delete itself (not stop) after max_run_hours."
  }
  assert {
    condition     = output.hourly_usd == 0.2 && output.max_cost_usd == 1.6
    error_message = "Spot c3-standard-22 costs $0.20/h in the price table, $1.60 for 8 hours."
  }
  assert {
    condition     = output.vms.cpu.labels["managed-by"] == "cpuft" && output.vms.cpu.labels["cpuft-role"] == "cpu"
    error_message = "The reaper finds VMs by the managed-by=cpuft label."
  }
  assert {
    condition     = output.vms.cpu.boot_disk_type == "pd-balanced"
    error_message = "C3 boots from pd-balanced by default."
  }
  assert {
    condition     = strcontains(output.vms.cpu.startup_script, "'torch==2.13.0' --index-url 'https://download.pytorch.org/whl/cpu'")
    error_message = "The CPU VM installs the pinned CPU build of torch."
  }
  assert {
    condition     = strcontains(output.vms.cpu.startup_script, "pip install --quiet 'cpuft==0.1.0'")
    error_message = "The startup script installs the pinned cpuft."
  }
  assert {
    condition     = !strcontains(output.vms.cpu.startup_script, "cpuft batch") && !strcontains(output.vms.cpu.startup_script, "cpuft-upload-results")
    error_message = "No batch queue and no bucket helper unless asked for."
  }
  assert {
    condition     = length(output.warnings) == 0 && length(output.unpriced_machine_types) == 0
    error_message = "The defaults raise no warning."
  }
  assert {
    condition     = output.vms.cpu.shutdown_script == ""
    error_message = "Without a bucket there is nowhere to save runs on shutdown."
  }
}

run "on_demand_with_gpu_batch_and_bucket" {
  command = apply

  variables {
    spot             = false
    machine_type     = "c3-standard-44"
    gpu_vm           = true
    max_run_hours    = 4
    batch_mode       = "timer"
    batch_queue_yaml = "jobs: []\n"
    results_bucket   = "proj-cpuft-results"
    labels           = { team = "ml", "managed-by" = "someone-else" }
  }

  assert {
    condition     = keys(output.vms) == ["cpu", "gpu"]
    error_message = "gpu_vm adds a second VM."
  }
  assert {
    condition     = output.vms.gpu.machine_type == "g2-standard-8" && output.vms.gpu.on_host_maintenance == "TERMINATE"
    error_message = "The GPU VM is a G2 and cannot live-migrate."
  }
  assert {
    condition     = output.vms.cpu.provisioning_model == "STANDARD" && output.vms.cpu.automatic_restart
    error_message = "spot = false gives on-demand VMs that restart after host events."
  }
  assert {
    condition     = alltrue([for vm in output.vms : vm.instance_termination_action == "DELETE" && vm.max_run_duration_seconds == 14400])
    error_message = "On-demand VMs delete themselves too."
  }
  assert {
    condition     = output.hourly_usd == 2.22 + 0.85
    error_message = "On-demand c3-standard-44 plus g2-standard-8."
  }
  assert {
    condition     = output.vms.cpu.labels["managed-by"] == "cpuft" && output.vms.cpu.labels["team"] == "ml"
    error_message = "User labels are kept, but cannot hide a VM from the reaper."
  }
  assert {
    condition     = !strcontains(output.vms.gpu.startup_script, "--index-url")
    error_message = "The GPU VM takes the CUDA build of torch from PyPI."
  }
  assert {
    condition     = strcontains(output.vms.cpu.startup_script, "cpuft batch install-timer /etc/cpuft/queue.yaml")
    error_message = "batch_mode = timer installs the queue's timer."
  }
  assert {
    condition     = strcontains(output.vms.cpu.startup_script, "gs://proj-cpuft-results/")
    error_message = "The bucket helper uploads to the results bucket."
  }
  assert {
    condition     = strcontains(output.vms.gpu.shutdown_script, "gcloud storage rsync --recursive \"$dir\" \"gs://proj-cpuft-results/$(hostname)/")
    error_message = "On shutdown or preemption, runs are copied to the bucket."
  }
}

run "hyperdisk_for_c4_and_a_warning_without_amx" {
  command = apply

  variables {
    machine_type = "n2d-standard-8"
  }

  assert {
    condition     = !output.vms.cpu.amx && length(output.warnings) == 1
    error_message = "An N2D (AMD) has no AMX and the plan says so."
  }
  assert {
    condition     = output.hourly_usd == null && output.unpriced_machine_types == ["n2d-standard-8"]
    error_message = "A machine type missing from the price table has no made-up price."
  }
}

run "c4_boots_from_hyperdisk" {
  command = apply

  variables {
    machine_type = "c4-standard-24"
  }

  assert {
    condition     = output.vms.cpu.boot_disk_type == "hyperdisk-balanced" && output.vms.cpu.amx
    error_message = "C4 only boots from Hyperdisk."
  }
}

run "unpinned_cpuft_is_refused" {
  command = plan

  variables {
    cpuft_pip_spec = "cpuft"
  }

  expect_failures = [var.cpuft_pip_spec]
}

run "batch_without_a_queue_is_refused" {
  command = plan

  variables {
    batch_mode = "run"
  }

  expect_failures = [var.batch_queue_yaml]
}

run "max_run_hours_is_bounded" {
  command = plan

  variables {
    max_run_hours = 0
  }

  expect_failures = [var.max_run_hours]
}

run "ssh_defaults_to_iap_without_public_ip" {
  command = apply

  assert {
    condition     = output.ssh.via == "iap" && output.ssh.source_ranges == tolist(["35.235.240.0/20"]) && !output.ssh.public_ip
    error_message = "Without ssh_source_ranges, SSH comes only from IAP's range and VMs get no public IP."
  }
}

run "ssh_from_an_explicit_cidr" {
  command = apply

  variables {
    ssh_source_ranges = ["203.0.113.7/32", "2001:db8::/48"]
  }

  assert {
    condition     = output.ssh.via == "cidr" && output.ssh.source_ranges == tolist(["203.0.113.7/32", "2001:db8::/48"]) && output.ssh.public_ip
    error_message = "Explicit CIDRs replace IAP and need a public IP."
  }
}

run "ssh_from_the_whole_internet_is_refused" {
  command = plan

  variables {
    ssh_source_ranges = ["0.0.0.0/0"]
  }

  expect_failures = [var.ssh_source_ranges]
}

run "ssh_from_a_nearly_whole_internet_is_refused" {
  command = plan

  variables {
    ssh_source_ranges = ["203.0.113.7/32", "0.0.0.0/1"]
  }

  expect_failures = [var.ssh_source_ranges]
}

run "ssh_from_all_ipv6_is_refused" {
  command = plan

  variables {
    ssh_source_ranges = ["::/0"]
  }

  expect_failures = [var.ssh_source_ranges]
}

run "ssh_from_a_non_cidr_is_refused" {
  command = plan

  variables {
    ssh_source_ranges = ["my-laptop"]
  }

  expect_failures = [var.ssh_source_ranges]
}
