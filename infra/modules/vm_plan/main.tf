# Everything about the VMs that can be decided without talking to Google:
# names, labels, scheduling, disk type, startup script and hourly cost.
# The root module turns this plan into google_compute_instance resources.

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

  requested = merge(
    var.cpu_vm ? { cpu = { machine_type = var.machine_type, image = var.image, torch_index_url = var.torch_cpu_index_url } } : {},
    # The GPU VM takes torch's default (CUDA) wheels from PyPI.
    var.gpu_vm ? { gpu = { machine_type = var.gpu_machine_type, image = var.gpu_image, torch_index_url = "" } } : {},
  )

  vms = {
    for role, r in local.requested : role => {
      name         = "${var.name}-${role}"
      role         = role
      machine_type = r.machine_type
      family       = split("-", r.machine_type)[0]
      amx          = contains(local.amx_families, split("-", r.machine_type)[0])
      gpu          = role == "gpu"
      image        = r.image
      boot_disk_type = (
        var.boot_disk_type != "" ? var.boot_disk_type :
        contains(local.hyperdisk_only_families, split("-", r.machine_type)[0]) ? "hyperdisk-balanced" : "pd-balanced"
      )
      labels = merge(local.base_labels, { "cpuft-role" = role })

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

      startup_script = templatefile("${path.module}/startup.sh.tftpl", {
        role            = role
        torch_version   = var.torch_version
        torch_index_url = r.torch_index_url
        cpuft_pip_spec  = var.cpuft_pip_spec
        results_bucket  = var.results_bucket
        batch_mode      = var.batch_mode
      })
      # Only with a results bucket: on shutdown or preemption, copy the runs there.
      shutdown_script = var.results_bucket == "" ? "" : templatefile("${path.module}/shutdown.sh.tftpl", {
        results_bucket = var.results_bucket
      })
    }
  }

  ssh = {
    via = length(var.ssh_source_ranges) == 0 ? "iap" : "cidr"
    # Google's documented source range of IAP TCP forwarding.
    source_ranges = length(var.ssh_source_ranges) == 0 ? ["35.235.240.0/20"] : var.ssh_source_ranges
    public_ip     = length(var.ssh_source_ranges) > 0
  }

  unpriced = [for role, vm in local.vms : vm.machine_type if vm.hourly_usd == null]
}
