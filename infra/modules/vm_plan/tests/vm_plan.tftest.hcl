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

run "two_nodes_have_ranks_fixed_addresses_and_one_rendezvous" {
  command = apply

  variables {
    node_count   = 2
    machine_type = "c3-standard-44"
  }

  assert {
    condition     = keys(output.vms) == ["cpu-0", "cpu-1"]
    error_message = "node_count = 2 plans two CPU VMs, cpu-0 and cpu-1."
  }
  assert {
    condition     = output.vms["cpu-0"].name == "cpuft-cpu-0" && output.vms["cpu-1"].name == "cpuft-cpu-1"
    error_message = "Nodes are named by rank."
  }
  assert {
    condition     = output.vms["cpu-0"].node_rank == 0 && output.vms["cpu-1"].node_rank == 1
    error_message = "Each node knows its rank."
  }
  assert {
    condition     = output.vms["cpu-0"].network_ip == "10.42.0.10" && output.vms["cpu-1"].network_ip == "10.42.0.11"
    error_message = "Nodes take hosts 10, 11, ... of the subnet."
  }
  assert {
    condition = alltrue([for vm in output.vms : vm.node_metadata == {
      "cpuft-node-rank"     = tostring(vm.node_rank)
      "cpuft-node-count"    = "2"
      "cpuft-rdzv-endpoint" = "10.42.0.10:29500"
    }])
    error_message = "Every node's metadata names its rank, the world size and node 0's rendezvous."
  }
  assert {
    condition     = output.nodes.names == ["cpuft-cpu-0", "cpuft-cpu-1"] && output.nodes.rdzv_endpoint == "10.42.0.10:29500"
    error_message = "The nodes output lists the nodes in rank order and the rendezvous endpoint."
  }
  assert {
    condition     = output.nodes.ports == ["29500", "32768-60999"] && output.nodes.network_tag == "cpuft-nodes"
    error_message = "The nodes open the rendezvous port and Linux's ephemeral range to each other, matched by their tag."
  }
  assert {
    condition     = strcontains(output.vms["cpu-1"].startup_script, "net.ipv4.ip_local_port_range=\"32768 60999\"")
    error_message = "The startup script pins the ephemeral range the firewall opens."
  }
  assert {
    condition     = strcontains(output.vms["cpu-0"].startup_script, "attributes/cpuft-node-rank") && output.vms["cpu-0"].startup_script == output.vms["cpu-1"].startup_script
    error_message = "One startup script for every node: the rank comes from metadata."
  }
  assert {
    condition     = output.hourly_usd == 0.82 && output.max_cost_usd == 0.82 * 8
    error_message = "Two Spot c3-standard-44 nodes cost twice one."
  }
}

run "one_vm_is_no_node" {
  command = apply

  assert {
    condition     = output.vms.cpu.node_rank == null && output.vms.cpu.network_ip == null && output.vms.cpu.node_metadata["cpuft-node-rank"] == ""
    error_message = "A single VM has no rank, no fixed address and empty node metadata."
  }
  assert {
    condition     = output.nodes.rdzv_endpoint == "" && output.nodes.names == ["cpuft-cpu"]
    error_message = "A single VM is its own node list, with no rendezvous."
  }
  assert {
    condition     = !strcontains(output.vms.cpu.startup_script, "cpuft-node-rank") && !strcontains(output.vms.cpu.startup_script, "instance-groups")
    error_message = "Nothing about nodes or groups in a single VM's startup script."
  }
}

run "nodes_with_a_batch_queue_are_refused" {
  command = plan

  variables {
    node_count       = 2
    batch_mode       = "run"
    batch_queue_yaml = "jobs: []\n"
  }

  expect_failures = [var.node_count]
}

run "node_count_is_bounded" {
  command = plan

  variables {
    node_count = 17
  }

  expect_failures = [var.node_count]
}

run "recreated_vm_resumes_the_queue_from_the_bucket_and_deletes_its_group" {
  command = apply

  variables {
    recreate_on_preemption = true
    batch_mode             = "run"
    batch_queue_yaml       = "jobs: []\n"
    results_bucket         = "proj-cpuft-results"
    max_total_hours        = 30
  }

  assert {
    condition     = output.vms.cpu.group_name == "cpuft-cpu"
    error_message = "The CPU VM's group is named like the VM."
  }
  assert {
    condition     = output.queue_sync_url == "gs://proj-cpuft-results/queues/cpuft"
    error_message = "The queue keeps its state under queues/<stack> in the bucket."
  }
  assert {
    condition     = strcontains(output.vms.cpu.startup_script, "cpuft batch run /etc/cpuft/queue.yaml --state-dir /var/lib/cpuft/batch \\\n  --sync-to 'gs://proj-cpuft-results/queues/cpuft'")
    error_message = "A recreated VM runs the same queue against the same state in the bucket."
  }
  assert {
    condition     = strcontains(output.vms.cpu.startup_script, "gcloud compute instance-groups managed delete \"$CPUFT_GROUP\"") && strcontains(output.vms.cpu.startup_script, "CPUFT_GROUP=cpuft-cpu")
    error_message = "The VM deletes its own group when the queue is done."
  }
  assert {
    condition     = strcontains(output.vms.cpu.startup_script, "+ 30 * 3600 ))")
    error_message = "The deadline is the group's creation time plus max_total_hours."
  }
  assert {
    condition     = !strcontains(output.vms.cpu.startup_script, "--shutdown-when-done")
    error_message = "Powering off would only make the group repair the VM; the group is deleted instead."
  }
  assert {
    condition     = output.vms.cpu.shutdown_script == "" && output.vms.cpu.instance_termination_action == "DELETE" && output.vms.cpu.max_run_duration_seconds == 8 * 3600
    error_message = "Each VM still deletes itself after max_run_hours; no shutdown copy races cpuft's own sync."
  }
  assert {
    condition     = output.worst_case_hours == 30 && output.max_cost_usd == 0.2 * 30
    error_message = "With recreation the worst case is the group's whole allowance."
  }
}

run "recreate_without_a_bucket_is_refused" {
  command = plan

  variables {
    recreate_on_preemption = true
    batch_mode             = "run"
    batch_queue_yaml       = "jobs: []\n"
  }

  expect_failures = [var.recreate_on_preemption]
}

run "recreate_without_a_queue_is_refused" {
  command = plan

  variables {
    recreate_on_preemption = true
    results_bucket         = "proj-cpuft-results"
  }

  expect_failures = [var.recreate_on_preemption]
}

run "recreate_with_nodes_is_refused" {
  command = plan

  variables {
    recreate_on_preemption = true
    batch_mode             = "run"
    batch_queue_yaml       = "jobs: []\n"
    results_bucket         = "proj-cpuft-results"
    node_count             = 2
  }

  # Recreation needs a queue, nodes refuse one: a multi-node job restarts as a whole.
  expect_failures = [var.node_count]
}

run "a_queue_with_a_bucket_syncs_without_recreation_too" {
  command = apply

  variables {
    batch_mode       = "run"
    batch_queue_yaml = "jobs: []\n"
    results_bucket   = "proj-cpuft-results"
  }

  assert {
    condition     = strcontains(output.vms.cpu.startup_script, "--sync-to 'gs://proj-cpuft-results/queues/cpuft' \\\n    --shutdown-when-done")
    error_message = "A plain VM's queue keeps its state in the bucket too, then powers off."
  }
}
