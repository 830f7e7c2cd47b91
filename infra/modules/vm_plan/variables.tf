variable "name" {
  description = "Name prefix of the stack; VM names are \"<name>-cpu\" and \"<name>-gpu\"."
  type        = string
  validation {
    condition     = can(regex("^[a-z][a-z0-9-]{0,39}[a-z0-9]$", var.name))
    error_message = "name must be 2-41 characters of lowercase letters, digits and hyphens, start with a letter and not end with a hyphen."
  }
}

variable "cpu_vm" {
  description = "Create the CPU VM."
  type        = bool
  default     = true
}

variable "machine_type" {
  description = "Machine type of the CPU VM. C3, C4 and N4 (Intel Sapphire/Emerald/Granite Rapids) have AMX."
  type        = string
  default     = "c3-standard-22"
  validation {
    condition     = can(regex("^[a-z][a-z0-9]*-[a-z]+-[0-9]+(-lssd)?$", var.machine_type))
    error_message = "machine_type must look like \"c3-standard-22\"."
  }
}

variable "gpu_vm" {
  description = "Also create a GPU VM (G2 with NVIDIA L4) to compare against."
  type        = bool
  default     = false
}

variable "gpu_machine_type" {
  description = "Machine type of the GPU VM. G2 machine types come with their L4 GPUs attached."
  type        = string
  default     = "g2-standard-8"
  validation {
    condition     = startswith(var.gpu_machine_type, "g2-")
    error_message = "gpu_machine_type must be a G2 machine type (g2-standard-4 ... g2-standard-96); other GPU families need a guest_accelerator block this stack does not write."
  }
}

variable "spot" {
  description = "Use Spot provisioning (about 80 % cheaper; Google may preempt the VM at any time)."
  type        = bool
  default     = true
}

variable "max_run_hours" {
  description = "Hard ceiling: Compute Engine deletes each VM, boot disk included, after it has run this long."
  type        = number
  default     = 8
  validation {
    condition     = var.max_run_hours >= 1 && var.max_run_hours <= 168 && floor(var.max_run_hours) == var.max_run_hours
    error_message = "max_run_hours must be a whole number from 1 to 168 (one week)."
  }
}

variable "boot_disk_type" {
  description = "Boot disk type; empty picks one the machine family supports (hyperdisk-balanced for C4/N4, pd-balanced otherwise)."
  type        = string
  default     = ""
}

variable "image" {
  description = "Boot image of the CPU VM (Linux >= 5.16 is needed for AMX)."
  type        = string
  default     = "debian-cloud/debian-12"
}

variable "gpu_image" {
  description = "Boot image of the GPU VM; a Deep Learning VM image family ships the NVIDIA driver."
  type        = string
  default     = "deeplearning-platform-release/common-cu128-ubuntu-2204-nvidia-570"
}

variable "labels" {
  description = "Extra labels for cost tracking, merged over the stack's own labels."
  type        = map(string)
  default     = {}
  validation {
    condition = alltrue([
      for k, v in var.labels : can(regex("^[a-z][a-z0-9_-]{0,62}$", k)) && can(regex("^[a-z0-9_-]{0,63}$", v))
    ])
    error_message = "Label keys must match ^[a-z][a-z0-9_-]{0,62}$ and values ^[a-z0-9_-]{0,63}$ (GCP rules)."
  }
}

variable "price_table_csv" {
  description = "Contents of a price table CSV (columns machine_type, on_demand_usd_per_hour, spot_usd_per_hour)."
  type        = string
}

variable "cpuft_pip_spec" {
  description = "Pinned pip requirement for cpuft on the VM: \"cpuft==X.Y.Z\" or \"cpuft @ git+https://...@<commit-sha or tag>\"."
  type        = string
  validation {
    condition = (
      can(regex("^cpuft(\\[[a-z0-9,_-]+\\])?==[0-9][0-9A-Za-z.+-]*$", var.cpuft_pip_spec)) ||
      can(regex("^cpuft(\\[[a-z0-9,_-]+\\])? @ git\\+https://[^ @]+@[0-9A-Za-z._-]+$", var.cpuft_pip_spec))
    )
    error_message = "cpuft_pip_spec must be pinned: \"cpuft==0.1.0\" or \"cpuft @ git+https://github.com/OWNER/cpuft@<commit-sha-or-tag>\"."
  }
}

variable "torch_version" {
  description = "torch version installed before cpuft (pinned; an unpinned torch drags in a multi-GB CUDA build)."
  type        = string
  default     = "2.13.0"
  validation {
    condition     = can(regex("^[0-9]+\\.[0-9]+\\.[0-9]+$", var.torch_version))
    error_message = "torch_version must be an exact version such as 2.13.0."
  }
}

variable "torch_cpu_index_url" {
  description = "Package index holding torch's CPU-only wheels, used on the CPU VM."
  type        = string
  default     = "https://download.pytorch.org/whl/cpu"
}

variable "batch_mode" {
  description = "What the startup script does with batch_queue_yaml: \"off\", \"run\" (run the queue once at boot) or \"timer\" (install the systemd timer)."
  type        = string
  default     = "off"
  validation {
    condition     = contains(["off", "run", "timer"], var.batch_mode)
    error_message = "batch_mode must be \"off\", \"run\" or \"timer\"."
  }
}

variable "batch_queue_yaml" {
  description = "Contents of a cpuft batch queue file, written to /etc/cpuft/queue.yaml on the VM."
  type        = string
  default     = ""
  validation {
    condition     = var.batch_mode == "off" || trimspace(var.batch_queue_yaml) != ""
    error_message = "batch_mode is \"${var.batch_mode}\" but batch_queue_yaml is empty; give the queue file's contents, e.g. batch_queue_yaml = file(\"queue.yaml\")."
  }
  validation {
    condition     = length(var.batch_queue_yaml) <= 200000
    error_message = "batch_queue_yaml must stay under 200 kB (instance metadata is limited to 256 kB)."
  }
}

variable "results_bucket" {
  description = "Name of the results bucket the VM copies finished runs to; empty for none."
  type        = string
  default     = ""
}

variable "ssh_source_ranges" {
  description = "Empty: SSH only through Identity-Aware Proxy and no public IP. Otherwise the CIDRs allowed to reach port 22 directly (the VMs then get a public IP)."
  type        = list(string)
  default     = []
  validation {
    condition     = alltrue([for c in var.ssh_source_ranges : can(cidrhost(c, 0))])
    error_message = "Every ssh_source_ranges entry must be a CIDR such as \"203.0.113.7/32\"."
  }
  validation {
    condition = alltrue([
      for c in var.ssh_source_ranges : try(tonumber(split("/", c)[1]) >= (strcontains(c, ":") ? 32 : 16), false)
    ])
    error_message = "ssh_source_ranges must not open SSH to the internet: 0.0.0.0/0, ::/0 and anything wider than an IPv4 /16 or IPv6 /32 are refused. Leave it empty to go through IAP."
  }
}

variable "node_count" {
  description = "CPU VMs that train one job together (torch.distributed over gloo). 1: a single VM named <name>-cpu. More: <name>-cpu-0 ... in one compact placement policy, ranked by instance metadata."
  type        = number
  default     = 1
  validation {
    condition     = var.node_count >= 1 && var.node_count <= 16 && floor(var.node_count) == var.node_count
    error_message = "node_count must be a whole number from 1 to 16."
  }
  validation {
    condition     = var.node_count == 1 || var.cpu_vm
    error_message = "node_count > 1 needs cpu_vm = true: the nodes are CPU VMs."
  }
  validation {
    condition     = var.node_count == 1 || var.batch_mode == "off"
    error_message = "node_count > 1 needs batch_mode = \"off\" (so no recreate_on_preemption either): every node would run the whole queue on its own, and a multi-node job restarts as a whole. Start multi-node jobs with scripts/gcp/run."
  }
}

variable "subnet_cidr" {
  description = "The stack's subnet; with node_count > 1 the nodes get fixed addresses from it (host 10, 11, ...), so rank 0's address is known before it exists."
  type        = string
  default     = "10.42.0.0/24"
  validation {
    condition     = can(cidrhost(var.subnet_cidr, 10 + 16))
    error_message = "subnet_cidr must be an IPv4 CIDR with room for host numbers 10-26, e.g. \"10.42.0.0/24\"."
  }
}

variable "rdzv_port" {
  description = "TCP port of torch.distributed's rendezvous on node 0 (torchrun's default is 29500)."
  type        = number
  default     = 29500
  validation {
    condition     = var.rdzv_port >= 1024 && var.rdzv_port < 32768 && floor(var.rdzv_port) == var.rdzv_port
    error_message = "rdzv_port must be a whole number from 1024 to 32767 (below the ephemeral range that gloo's own connections use)."
  }
}

variable "recreate_on_preemption" {
  description = "Run each VM as a managed instance group of size 1: a preempted (or expired) VM is recreated from the template and resumes the queue from the bucket; when the queue drains the VM deletes its group."
  type        = bool
  default     = false
  validation {
    condition     = !var.recreate_on_preemption || (var.batch_mode == "run" && var.results_bucket != "")
    error_message = "recreate_on_preemption needs batch_mode = \"run\" and a results bucket: a recreated VM knows what to do only from the queue file, and what is done only from the bucket."
  }
}

variable "max_total_hours" {
  description = "With recreate_on_preemption: hours after the group's creation at which the VM running then stops the queue (checkpoint first) and deletes the group, however many times it was recreated."
  type        = number
  default     = 24
  validation {
    condition     = var.max_total_hours >= 1 && var.max_total_hours <= 720 && floor(var.max_total_hours) == var.max_total_hours
    error_message = "max_total_hours must be a whole number from 1 to 720 (30 days)."
  }
}
