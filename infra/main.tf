# cpuft on GCP: self-deleting Spot VMs (C3 with AMX by default, optionally a
# G2 with an L4) in their own network, reachable only over IAP (or an explicit
# CIDR), running as a dedicated least-privilege service account.
#
# Teardown guarantees, from strongest to weakest:
#   1. scheduling.max_run_duration + instance_termination_action = "DELETE":
#      Compute Engine deletes each VM and its boot disk after max_run_hours,
#      and on Spot preemption; nothing is merely stopped.
#   2. scripts/gcp/teardown (terraform destroy).
#   3. scripts/gcp/reaper.py deletes cpuft-labelled VMs older than N hours,
#      stopped ones included (a stopped VM's run-time clock is reset and its
#      disk still bills), and unattached cpuft-labelled disks.
#   4. The optional budget alert e-mails the billing admins.
#
# With recreate_on_preemption each VM is instead the single member of a managed
# instance group: a preempted VM is recreated and resumes the queue from the
# bucket; max_run_duration still deletes each VM after max_run_hours (and the
# group replaces it); the VM itself deletes the group when the queue drains or
# the group is max_total_hours old (infra/README.md explains the choice).
#
# With node_count > 1 the CPU VM is N nodes of one torch.distributed job in a
# compact placement policy, open to each other on the rendezvous and gloo
# ports only.

locals {
  region    = regex("^(.*)-[a-z]$", var.zone)[0]
  ssh_tag   = "${var.name}-ssh"
  ssh_via   = module.plan.ssh.via
  public_ip = module.plan.ssh.public_ip

  # The price table cpuft's own time/cost plan reads too (shipped inside the Python package).
  prices_file = var.prices_file != "" ? var.prices_file : "${path.module}/../cpuft/planning/gcp_prices.csv"

  batch_queue_yaml = var.batch_queue_file != "" ? file(var.batch_queue_file) : ""
  bucket_name      = "${var.project_id}-${var.name}-results"
  stack_labels     = module.plan.stack_labels

  # Narrow OAuth scopes instead of cloud-platform: even if someone later
  # grants the service account more roles, the VM cannot use them. The compute
  # scope comes only with recreation, where IAM limits it to reading and
  # deleting instance groups (google_project_iam_custom_role.vm_deletes_its_group).
  vm_scopes = concat(
    [
      "https://www.googleapis.com/auth/logging.write",
      "https://www.googleapis.com/auth/monitoring.write",
    ],
    var.results_bucket ? ["https://www.googleapis.com/auth/devstorage.read_write"] : [],
    var.recreate_on_preemption ? ["https://www.googleapis.com/auth/compute"] : [],
  )

  # Keys of module.plan.vms, spelled out from the variables so that static
  # analysers (checkov, tfparse) can expand the VM resources too.
  cpu_keys = var.node_count > 1 ? [for rank in range(var.node_count) : "cpu-${rank}"] : ["cpu"]
  vm_keys  = toset(concat(var.cpu_vm ? local.cpu_keys : [], var.gpu_vm ? ["gpu"] : []))
  # Each VM is either a plain instance or the template of its own group.
  instance_keys = var.recreate_on_preemption ? toset([]) : local.vm_keys
  group_keys    = var.recreate_on_preemption ? local.vm_keys : toset([])
  multi_node    = var.node_count > 1 && var.cpu_vm

  vm_tags = {
    for key in local.vm_keys : key => concat([local.ssh_tag], module.plan.vms[key].node_rank == null ? [] : [module.plan.nodes.network_tag])
  }

  apis = var.enable_apis ? toset(concat(
    ["compute.googleapis.com", "iap.googleapis.com", "oslogin.googleapis.com"],
    var.billing_account_id != "" ? ["billingbudgets.googleapis.com"] : [],
  )) : toset([])
}

module "plan" {
  source = "./modules/vm_plan"

  name             = var.name
  cpu_vm           = var.cpu_vm
  machine_type     = var.machine_type
  gpu_vm           = var.gpu_vm
  gpu_machine_type = var.gpu_machine_type
  gpu_image        = var.gpu_image
  image            = var.image
  spot             = var.spot
  max_run_hours    = var.max_run_hours
  boot_disk_type   = var.boot_disk_type
  labels           = var.labels
  price_table_csv  = file(local.prices_file)

  cpuft_pip_spec      = var.cpuft_pip_spec
  torch_version       = var.torch_version
  torch_cpu_index_url = var.torch_cpu_index_url
  batch_mode          = var.batch_mode
  batch_queue_yaml    = local.batch_queue_yaml
  results_bucket      = var.results_bucket ? local.bucket_name : ""
  ssh_source_ranges   = var.ssh_source_ranges

  node_count             = var.node_count
  subnet_cidr            = var.subnet_cidr
  rdzv_port              = var.rdzv_port
  recreate_on_preemption = var.recreate_on_preemption
  max_total_hours        = var.max_total_hours
}

resource "google_project_service" "api" {
  for_each = local.apis

  project            = var.project_id
  service            = each.value
  disable_on_destroy = false # other things in the project may use them
}

# --- Network: private subnet, NAT for package downloads, SSH from IAP only ---

resource "google_compute_network" "this" {
  name                    = "${var.name}-net"
  auto_create_subnetworks = false
  routing_mode            = "REGIONAL"

  depends_on = [google_project_service.api]
}

resource "google_compute_subnetwork" "this" {
  # checkov:skip=CKV_GCP_26: VPC flow logs bill per GB and a single short-lived training VM has no traffic worth auditing; turn them on for shared projects.
  name                     = "${var.name}-subnet"
  region                   = local.region
  network                  = google_compute_network.this.id
  ip_cidr_range            = var.subnet_cidr
  private_ip_google_access = true
}

# The VMs have no public IP (unless SSH goes to an explicit CIDR), so pip and
# the Hugging Face hub are reached through Cloud NAT.
resource "google_compute_router" "this" {
  name    = "${var.name}-router"
  region  = local.region
  network = google_compute_network.this.id
}

resource "google_compute_router_nat" "this" {
  name                               = "${var.name}-nat"
  router                             = google_compute_router.this.name
  region                             = local.region
  nat_ip_allocate_option             = "AUTO_ONLY"
  source_subnetwork_ip_ranges_to_nat = "LIST_OF_SUBNETWORKS"

  subnetwork {
    name                    = google_compute_subnetwork.this.id
    source_ip_ranges_to_nat = ["ALL_IP_RANGES"]
  }

  log_config {
    enable = true
    filter = "ERRORS_ONLY"
  }
}

resource "google_compute_firewall" "ssh" {
  name          = "${var.name}-allow-ssh"
  network       = google_compute_network.this.id
  direction     = "INGRESS"
  priority      = 1000
  description   = "SSH to cpuft VMs from ${local.ssh_via == "iap" ? "Identity-Aware Proxy only" : "the CIDRs in ssh_source_ranges"}."
  source_ranges = module.plan.ssh.source_ranges
  target_tags   = [local.ssh_tag]

  allow {
    protocol = "tcp"
    ports    = ["22"]
  }

  log_config {
    metadata = "INCLUDE_ALL_METADATA"
  }
}

# Multi-node jobs: torch.distributed's rendezvous on node 0 and gloo's
# connections (ephemeral ports) between the nodes. The source is the nodes'
# own network tag, so nothing outside this job's VMs matches, not even other
# VMs of the stack.
resource "google_compute_firewall" "nodes" {
  count = local.multi_node ? 1 : 0

  name        = "${var.name}-nodes-internal"
  network     = google_compute_network.this.id
  direction   = "INGRESS"
  priority    = 1000
  description = "torch.distributed between the ${var.node_count} nodes of one cpuft job: rendezvous (TCP ${var.rdzv_port}) and gloo (TCP ephemeral ports), from those nodes only."
  source_tags = [module.plan.nodes.network_tag]
  target_tags = [module.plan.nodes.network_tag]

  allow {
    protocol = "tcp"
    ports    = module.plan.nodes.ports
  }

  log_config {
    metadata = "EXCLUDE_ALL_METADATA"
  }
}

# Compact placement puts the nodes close together in the zone (fewer hops for
# the all-reduce). Google supports it on C3 (and C2, C2D, C3D, C4, N2, N2D,
# H3, A2/A3, G2 among others); VMs must not live-migrate, which
# on_host_maintenance = "TERMINATE" already ensures.
resource "google_compute_resource_policy" "nodes" {
  count = local.multi_node ? 1 : 0

  name        = "${var.name}-nodes"
  region      = local.region
  description = "Compact placement of the ${var.node_count} nodes of one cpuft job."

  group_placement_policy {
    vm_count    = var.node_count
    collocation = "COLLOCATED"
  }

  depends_on = [google_project_service.api]
}

# --- Identity: a service account that can write logs and, if asked, results -

resource "google_service_account" "vm" {
  account_id   = "${var.name}-vm"
  display_name = "cpuft training VM (${var.name})"
  description  = "Runs cpuft VMs: writes logs and metrics, and finished runs to the results bucket. Nothing else."

  depends_on = [google_project_service.api]
}

resource "google_project_iam_member" "vm" {
  for_each = toset(["roles/logging.logWriter", "roles/monitoring.metricWriter"])

  project = var.project_id
  role    = each.value
  member  = google_service_account.vm.member
}

# With recreate_on_preemption the VM deletes its own group when the queue
# drains. Compute Engine has no per-group IAM policy (instanceGroupManagers
# has no setIamPolicy, unlike instances and templates), and IAM Conditions do
# not list instance groups among the resource types whose name they can test,
# so the narrowest grant is a custom role with exactly two permissions on the
# project: read an instance group (its creation time is the run's clock) and
# delete one. Both can only ever stop spending: the VM cannot create, resize,
# start or reconfigure anything, nor touch instances, disks or data.
resource "google_project_iam_custom_role" "vm_deletes_its_group" {
  count = var.recreate_on_preemption ? 1 : 0

  project     = var.project_id
  role_id     = "${replace(var.name, "-", "_")}_vm_deletes_its_group"
  title       = "cpuft ${var.name}: VM deletes its instance group"
  description = "Lets a cpuft VM read and delete managed instance groups, so that it can delete its own when its queue is done. Nothing else."
  permissions = ["compute.instanceGroupManagers.delete", "compute.instanceGroupManagers.get"]
}

resource "google_project_iam_member" "vm_deletes_its_group" {
  count = var.recreate_on_preemption ? 1 : 0

  project = var.project_id
  role    = google_project_iam_custom_role.vm_deletes_its_group[0].id
  member  = google_service_account.vm.member
}

# OS Login needs the caller to be able to act as the VM's service account.
resource "google_service_account_iam_member" "ssh_members" {
  for_each = toset(var.ssh_members)

  service_account_id = google_service_account.vm.name
  role               = "roles/iam.serviceAccountUser"
  member             = each.value
}

# --- The VMs -----------------------------------------------------------------

resource "google_compute_instance" "vm" {
  # checkov:skip=CKV_GCP_38: Disks use Google-managed encryption at rest; customer-supplied keys would have to live on the operator's laptop and be passed at every start of a throwaway VM.
  # checkov:skip=CKV_GCP_40: A public IP is added only when ssh_source_ranges lists explicit CIDRs (opt-in); the default is IAP with no public IP.
  for_each = local.instance_keys

  name         = module.plan.vms[each.key].name
  zone         = var.zone
  machine_type = module.plan.vms[each.key].machine_type
  labels       = module.plan.vms[each.key].labels
  tags         = local.vm_tags[each.key]
  description  = "cpuft ${module.plan.vms[each.key].role} VM; deletes itself after ${var.max_run_hours} h."

  resource_policies = module.plan.vms[each.key].node_rank == null ? [] : google_compute_resource_policy.nodes[*].id

  # Must stay deletable: the reaper, teardown and max_run_duration all delete it.
  deletion_protection       = false
  allow_stopping_for_update = true

  boot_disk {
    auto_delete = true
    initialize_params {
      image  = module.plan.vms[each.key].image
      size   = var.boot_disk_gb
      type   = module.plan.vms[each.key].boot_disk_type
      labels = module.plan.vms[each.key].labels
    }
  }

  network_interface {
    subnetwork = google_compute_subnetwork.this.id
    nic_type   = "GVNIC" # C3 supports no other NIC
    # Fixed for the nodes of a multi-node job (rank 0's is the rendezvous
    # endpoint); null lets Compute Engine pick.
    network_ip = module.plan.vms[each.key].network_ip

    dynamic "access_config" {
      for_each = local.public_ip ? [1] : []
      content {
        network_tier = "PREMIUM"
      }
    }
  }

  service_account {
    email  = google_service_account.vm.email
    scopes = local.vm_scopes
  }

  shielded_instance_config {
    enable_secure_boot          = module.plan.vms[each.key].gpu ? var.gpu_secure_boot : true
    enable_vtpm                 = true
    enable_integrity_monitoring = true
  }

  # Literal, not built in locals: checkov reads only literal metadata maps.
  metadata = {
    "enable-oslogin"         = "TRUE"
    "block-project-ssh-keys" = "TRUE"
    "serial-port-enable"     = "FALSE"
    "startup-script"         = module.plan.vms[each.key].startup_script
    "shutdown-script"        = module.plan.vms[each.key].shutdown_script
    # Read by the startup script when batch_mode is not "off".
    "cpuft-batch-queue" = local.batch_queue_yaml
    # Read by the startup script on the nodes of a multi-node job ("" elsewhere).
    "cpuft-node-rank"     = module.plan.vms[each.key].node_metadata["cpuft-node-rank"]
    "cpuft-node-count"    = module.plan.vms[each.key].node_metadata["cpuft-node-count"]
    "cpuft-rdzv-endpoint" = module.plan.vms[each.key].node_metadata["cpuft-rdzv-endpoint"]
  }

  scheduling {
    provisioning_model          = module.plan.vms[each.key].provisioning_model
    preemptible                 = module.plan.vms[each.key].preemptible
    automatic_restart           = module.plan.vms[each.key].automatic_restart
    on_host_maintenance         = module.plan.vms[each.key].on_host_maintenance
    instance_termination_action = module.plan.vms[each.key].instance_termination_action

    max_run_duration {
      seconds = module.plan.vms[each.key].max_run_duration_seconds
    }
  }

  depends_on = [google_project_iam_member.vm, google_compute_router_nat.this]
}

# --- Or: each VM as the single member of a managed instance group ----------
# The template holds exactly what google_compute_instance.vm holds (same plan,
# metadata, scopes, Shielded VM, self-deletion after max_run_hours); the group
# keeps one VM alive from it. infra/README.md, "A VM that comes back", says why
# a group and not a scheduler or a stopped VM.

resource "google_compute_instance_template" "vm" {
  # checkov:skip=CKV_GCP_38: Disks use Google-managed encryption at rest; customer-supplied keys would have to live on the operator's laptop and be passed at every start of a throwaway VM.
  # checkov:skip=CKV_GCP_40: A public IP is added only when ssh_source_ranges lists explicit CIDRs (opt-in); the default is IAP with no public IP.
  for_each = local.group_keys

  name_prefix  = "${module.plan.vms[each.key].name}-"
  machine_type = module.plan.vms[each.key].machine_type
  labels       = module.plan.vms[each.key].labels
  tags         = local.vm_tags[each.key]
  description  = "cpuft ${module.plan.vms[each.key].role} VM of group ${module.plan.vms[each.key].group_name}; each VM deletes itself after ${var.max_run_hours} h, the group after ${var.max_total_hours} h."

  disk {
    boot         = true
    auto_delete  = true
    source_image = module.plan.vms[each.key].image
    disk_size_gb = var.boot_disk_gb
    disk_type    = module.plan.vms[each.key].boot_disk_type
    labels       = module.plan.vms[each.key].labels
  }

  network_interface {
    subnetwork = google_compute_subnetwork.this.id
    nic_type   = "GVNIC"

    dynamic "access_config" {
      for_each = local.public_ip ? [1] : []
      content {
        network_tier = "PREMIUM"
      }
    }
  }

  service_account {
    email  = google_service_account.vm.email
    scopes = local.vm_scopes
  }

  shielded_instance_config {
    enable_secure_boot          = module.plan.vms[each.key].gpu ? var.gpu_secure_boot : true
    enable_vtpm                 = true
    enable_integrity_monitoring = true
  }

  # Literal, not built in locals: checkov reads only literal metadata maps.
  metadata = {
    "enable-oslogin"         = "TRUE"
    "block-project-ssh-keys" = "TRUE"
    "serial-port-enable"     = "FALSE"
    "startup-script"         = module.plan.vms[each.key].startup_script
    "shutdown-script"        = module.plan.vms[each.key].shutdown_script
    # Read by the startup script when batch_mode is not "off".
    "cpuft-batch-queue" = local.batch_queue_yaml
    # Read by the startup script on the nodes of a multi-node job ("" elsewhere).
    "cpuft-node-rank"     = module.plan.vms[each.key].node_metadata["cpuft-node-rank"]
    "cpuft-node-count"    = module.plan.vms[each.key].node_metadata["cpuft-node-count"]
    "cpuft-rdzv-endpoint" = module.plan.vms[each.key].node_metadata["cpuft-rdzv-endpoint"]
  }

  scheduling {
    provisioning_model          = module.plan.vms[each.key].provisioning_model
    preemptible                 = module.plan.vms[each.key].preemptible
    automatic_restart           = module.plan.vms[each.key].automatic_restart
    on_host_maintenance         = module.plan.vms[each.key].on_host_maintenance
    instance_termination_action = module.plan.vms[each.key].instance_termination_action

    max_run_duration {
      seconds = module.plan.vms[each.key].max_run_duration_seconds
    }
  }

  # The group points at the template, so a changed template is created first.
  lifecycle {
    create_before_destroy = true
  }
}

resource "google_compute_instance_group_manager" "vm" {
  for_each = local.group_keys

  name               = module.plan.vms[each.key].group_name
  zone               = var.zone
  base_instance_name = module.plan.vms[each.key].name
  description        = "Keeps one cpuft ${module.plan.vms[each.key].role} VM running its queue; the VM deletes this group when the queue drains or after ${var.max_total_hours} h."
  target_size        = 1
  # A Spot VM may wait for capacity; apply must not.
  wait_for_instances = false

  version {
    name              = "cpuft"
    instance_template = google_compute_instance_template.vm[each.key].self_link_unique
  }

  # A new template (say, another cpuft pin) reaches the next VM the group
  # creates; a VM in the middle of a job is not replaced under it.
  update_policy {
    type                  = "OPPORTUNISTIC"
    minimal_action        = "REPLACE"
    replacement_method    = "RECREATE"
    max_surge_fixed       = 0
    max_unavailable_fixed = 1
  }

  instance_lifecycle_policy {
    default_action_on_failure = "REPAIR"
    force_update_on_repair    = "YES"
  }

  depends_on = [
    google_project_iam_member.vm,
    google_project_iam_member.vm_deletes_its_group,
    google_storage_bucket_iam_member.vm_writes_results,
    google_compute_router_nat.this,
  ]
}

# Instance-level grants exist only for named VMs: members of a group come and
# go with generated names (README: grant roles/compute.osAdminLogin yourself).
resource "google_compute_instance_iam_member" "ssh_members" {
  for_each = {
    for pair in setproduct(tolist(local.instance_keys), var.ssh_members) : "${pair[0]} ${pair[1]}" => { vm = pair[0], member = pair[1] }
  }

  zone          = var.zone
  instance_name = google_compute_instance.vm[each.value.vm].name
  role          = "roles/compute.osLogin"
  member        = each.value.member
}

# Granted in "cidr" mode too: it is useless there (the firewall admits only the
# listed CIDRs, not IAP's range) and keeps one code path.
resource "google_iap_tunnel_instance_iam_member" "ssh_members" {
  for_each = {
    for pair in setproduct(tolist(local.instance_keys), var.ssh_members) : "${pair[0]} ${pair[1]}" => { vm = pair[0], member = pair[1] }
  }

  zone     = var.zone
  instance = google_compute_instance.vm[each.value.vm].name
  role     = "roles/iap.tunnelResourceAccessor"
  member   = each.value.member
}
