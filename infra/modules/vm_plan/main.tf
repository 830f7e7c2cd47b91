# Everything about the VMs that can be decided without talking to Google:
# names, labels, scheduling, disk type, startup script, hourly cost, and for a
# multi-node job each node's rank and address. The root module turns this plan
# into google_compute_instance resources, or into an instance template and a
# managed instance group of size 1 per VM (recreate_on_preemption).

locals {
  prices = { for row in csvdecode(var.price_table_csv) : row.machine_type => row }

  # Intel families with AMX (Sapphire Rapids and later). C3D/C4D/N4D are AMD,
  # C4A/N4A are Arm: no AMX there.
  amx_families = ["c3", "c4", "n4"]
  # These families boot only from Hyperdisk.
  hyperdisk_only_families = ["c4", "n4", "c3d", "c4d", "c4a", "n4a", "n4d"]

  base_labels = merge(var.labels, {
    "managed-by"  = "cpuft"
    "cpuft-stack" = var.name
  })

  # One CPU VM is "cpu"; the nodes of a multi-node job are "cpu-0", "cpu-1", ...
  multi_node = var.node_count > 1
  cpu_keys   = local.multi_node ? [for rank in range(var.node_count) : "cpu-${rank}"] : ["cpu"]
  cpu        = { machine_type = var.machine_type, image = var.image, torch_index_url = var.torch_cpu_index_url, role = "cpu" }
  requested = merge(
    var.cpu_vm ? { for rank, key in local.cpu_keys : key => merge(local.cpu, { rank = rank }) } : {},
    # The GPU VM takes torch's default (CUDA) wheels from PyPI.
    var.gpu_vm ? { gpu = { machine_type = var.gpu_machine_type, image = var.gpu_image, torch_index_url = "", role = "gpu", rank = 0 } } : {},
  )

  # Fixed addresses make rank 0's endpoint known before any node exists; every
  # node reads it from its metadata. gloo's own connections use the kernel's
  # ephemeral ports, pinned here and in the startup script so that the
  # firewall and the kernel agree on the range.
  node_address    = { for rank in range(var.node_count) : rank => cidrhost(var.subnet_cidr, 10 + rank) }
  rdzv_endpoint   = "${local.node_address[0]}:${var.rdzv_port}"
  ephemeral_ports = { first = 32768, last = 60999 }

  group_name     = { for key in keys(local.requested) : key => var.recreate_on_preemption ? "${var.name}-${key}" : "" }
  queue_sync_url = var.results_bucket != "" && var.batch_mode != "off" ? "gs://${var.results_bucket}/queues/${var.name}" : ""
  # What a forgotten stack can cost: one VM lifetime, or with recreation the
  # group's whole allowance (the VM running at the deadline deletes the group).
  worst_case_hours = var.recreate_on_preemption ? var.max_total_hours : var.max_run_hours

  vms = {
    for key, r in local.requested : key => {
      name         = "${var.name}-${key}"
      role         = r.role
      machine_type = r.machine_type
      family       = split("-", r.machine_type)[0]
      amx          = contains(local.amx_families, split("-", r.machine_type)[0])
      gpu          = r.role == "gpu"
      image        = r.image
      boot_disk_type = (
        var.boot_disk_type != "" ? var.boot_disk_type :
        contains(local.hyperdisk_only_families, split("-", r.machine_type)[0]) ? "hyperdisk-balanced" : "pd-balanced"
      )
      labels = merge(local.base_labels, { "cpuft-role" = r.role })

      provisioning_model = var.spot ? "SPOT" : "STANDARD"
      preemptible        = var.spot
      # Spot VMs cannot restart themselves; GPU VMs cannot live-migrate.
      automatic_restart   = !var.spot
      on_host_maintenance = "TERMINATE"
      # The whole point: when the VM is preempted or its time is up, it is
      # deleted (boot disk too), not merely stopped, so nothing keeps billing.
      instance_termination_action = "DELETE"
      max_run_duration_seconds    = var.max_run_hours * 3600

      hourly_usd_on_demand = try(tonumber(local.prices[r.machine_type].on_demand_usd_per_hour), null)
      hourly_usd_spot      = try(tonumber(local.prices[r.machine_type].spot_usd_per_hour), null)
      hourly_usd = try(tonumber(
        var.spot ? local.prices[r.machine_type].spot_usd_per_hour : local.prices[r.machine_type].on_demand_usd_per_hour
      ), null)

      # A multi-node job's node: rank, world size and rendezvous, read by the
      # startup script from instance metadata (one script for every node).
      node_rank  = local.multi_node && r.role == "cpu" ? r.rank : null
      network_ip = local.multi_node && r.role == "cpu" ? local.node_address[r.rank] : null
      # Empty strings on a VM that is not a node, so that every VM has the same keys.
      node_metadata = {
        "cpuft-node-rank"     = local.multi_node && r.role == "cpu" ? tostring(r.rank) : ""
        "cpuft-node-count"    = local.multi_node && r.role == "cpu" ? tostring(var.node_count) : ""
        "cpuft-rdzv-endpoint" = local.multi_node && r.role == "cpu" ? local.rdzv_endpoint : ""
      }

      # With recreate_on_preemption the VM is the only member of this group.
      group_name = local.group_name[key]

      startup_script = templatefile("${path.module}/startup.sh.tftpl", {
        role            = r.role
        torch_version   = var.torch_version
        torch_index_url = r.torch_index_url
        cpuft_pip_spec  = var.cpuft_pip_spec
        results_bucket  = var.results_bucket
        batch_mode      = var.batch_mode
        queue_sync_url  = local.queue_sync_url
        group_name      = local.group_name[key]
        max_total_hours = var.max_total_hours
        multi_node      = local.multi_node && r.role == "cpu"
        ephemeral_ports = "${local.ephemeral_ports.first} ${local.ephemeral_ports.last}"
      })
      # Only with a results bucket and without recreation: on shutdown or
      # preemption, copy the runs there. A recreated VM's queue syncs its own
      # checkpoints (cpuft --sync-to), which a second copy racing it would not improve.
      shutdown_script = var.results_bucket == "" || var.recreate_on_preemption ? "" : templatefile("${path.module}/shutdown.sh.tftpl", {
        results_bucket = var.results_bucket
      })
    }
  }

  nodes = {
    count         = var.node_count
    names         = [for key in local.cpu_keys : "${var.name}-${key}" if var.cpu_vm]
    network_tag   = "${var.name}-nodes"
    rdzv_endpoint = local.multi_node ? local.rdzv_endpoint : ""
    # TCP ports the nodes must reach on each other: rendezvous, then gloo's.
    ports = [tostring(var.rdzv_port), "${local.ephemeral_ports.first}-${local.ephemeral_ports.last}"]
  }

  ssh = {
    via = length(var.ssh_source_ranges) == 0 ? "iap" : "cidr"
    # Google's documented source range of IAP TCP forwarding.
    source_ranges = length(var.ssh_source_ranges) == 0 ? ["35.235.240.0/20"] : var.ssh_source_ranges
    public_ip     = length(var.ssh_source_ranges) > 0
  }

  unpriced = [for role, vm in local.vms : vm.machine_type if vm.hourly_usd == null]
}
