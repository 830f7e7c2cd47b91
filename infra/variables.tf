# --- Where -------------------------------------------------------------------

variable "project_id" {
  description = "GCP project to create everything in."
  type        = string
  validation {
    condition     = can(regex("^[a-z][a-z0-9-]{4,28}[a-z0-9]$", var.project_id))
    error_message = "project_id must be a GCP project ID (6-30 lowercase letters, digits, hyphens), not the project name or number."
  }
}

variable "zone" {
  description = "Zone of the VMs; the region is derived from it. C3 and G2 are in us-central1-a/b/c among others."
  type        = string
  default     = "us-central1-a"
  validation {
    condition     = can(regex("^[a-z]+-[a-z]+[0-9]+-[a-z]$", var.zone))
    error_message = "zone must look like \"us-central1-a\"."
  }
}

variable "name" {
  description = "Name prefix for every resource (VMs are <name>-cpu and <name>-gpu); also the cpuft-stack label."
  type        = string
  default     = "cpuft"
}

# --- The VMs -----------------------------------------------------------------

variable "cpu_vm" {
  description = "Create the CPU VM."
  type        = bool
  default     = true
}

variable "machine_type" {
  description = "CPU VM machine type. C3 (Sapphire Rapids), C4 and N4 have AMX; c3-standard-22 is 11 cores, 88 GB."
  type        = string
  default     = "c3-standard-22"
}

variable "gpu_vm" {
  description = "Also create a GPU VM (G2 with one NVIDIA L4 by default)."
  type        = bool
  default     = false
}

variable "gpu_machine_type" {
  description = "GPU VM machine type (a G2; g2-standard-8 has one L4)."
  type        = string
  default     = "g2-standard-8"
}

variable "gpu_image" {
  description = "GPU VM boot image; a Deep Learning VM image family with the NVIDIA driver preinstalled."
  type        = string
  default     = "deeplearning-platform-release/common-cu128-ubuntu-2204-nvidia-570"
}

variable "gpu_secure_boot" {
  description = "Secure Boot on the GPU VM. Leave on unless the image's NVIDIA driver is unsigned and refuses to load."
  type        = bool
  default     = true
}

variable "image" {
  description = "CPU VM boot image (needs Linux >= 5.16 for AMX; Debian 12 has 6.1)."
  type        = string
  default     = "debian-cloud/debian-12"
}

variable "spot" {
  description = "Spot VMs: about 80 % cheaper, may be preempted at any time (cpuft checkpoints; rerun with --resume)."
  type        = bool
  default     = true
}

variable "max_run_hours" {
  description = "Each VM deletes itself, boot disk included, after running this many hours. The worst case you pay for."
  type        = number
  default     = 8
}

variable "boot_disk_gb" {
  description = "Boot disk size. Holds the OS, torch (~1 GB), the Hugging Face cache (a 7B model is ~15 GB in bf16) and checkpoints."
  type        = number
  default     = 200
  validation {
    condition     = var.boot_disk_gb >= 50 && var.boot_disk_gb <= 4096
    error_message = "boot_disk_gb must be between 50 and 4096."
  }
}

variable "boot_disk_type" {
  description = "Boot disk type; empty picks pd-balanced, or hyperdisk-balanced on families that need it (C4, N4)."
  type        = string
  default     = ""
}

variable "labels" {
  description = "Extra labels for cost tracking (e.g. { team = \"ml\", cost-center = \"1234\" }), put on VMs, disks and the bucket."
  type        = map(string)
  default     = {}
}

variable "prices_file" {
  description = "Price table CSV to estimate the hourly cost with; empty uses cpuft/planning/gcp_prices.csv."
  type        = string
  default     = ""
}

variable "node_count" {
  description = "CPU VMs that train one job together (torch.distributed over gloo; scripts/gcp/run starts it on each). 1: one VM, <name>-cpu. More: <name>-cpu-0 ... in one compact placement policy, with a firewall rule that opens the rendezvous and gloo ports to each other only."
  type        = number
  default     = 1
}

variable "rdzv_port" {
  description = "With node_count > 1: TCP port of the rendezvous on node 0 (torchrun's default)."
  type        = number
  default     = 29500
}

variable "recreate_on_preemption" {
  description = "Each VM becomes the single member of a managed instance group: a preempted VM is recreated and resumes the batch queue from the results bucket; when the queue drains the VM deletes its group. Needs batch_mode = \"run\" and results_bucket = true."
  type        = bool
  default     = false
}

variable "max_total_hours" {
  description = "With recreate_on_preemption: the group's whole allowance. Once the group is this many hours old, the VM running then checkpoints, stops the queue and deletes the group, however often it was recreated. The worst case you pay for."
  type        = number
  default     = 24
}

# --- What runs on them -------------------------------------------------------

variable "cpuft_pip_spec" {
  description = "Pinned cpuft to install: \"cpuft==0.1.0\" or \"cpuft @ git+https://github.com/OWNER/cpuft@<commit-sha-or-tag>\"."
  type        = string
}

variable "torch_version" {
  description = "torch version installed first (CPU build on the CPU VM)."
  type        = string
  default     = "2.13.0"
}

variable "torch_cpu_index_url" {
  description = "Index with torch's CPU-only wheels."
  type        = string
  default     = "https://download.pytorch.org/whl/cpu"
}

variable "batch_mode" {
  description = "\"off\"; \"run\" runs batch_queue_file once at boot; \"timer\" installs cpuft's batch timer for it."
  type        = string
  default     = "off"
}

variable "batch_queue_file" {
  description = "Path of a cpuft batch queue YAML, absolute or relative to infra/ (where terraform runs); copied to /etc/cpuft/queue.yaml on the VMs. Needed unless batch_mode is off."
  type        = string
  default     = ""
}

# --- Access ------------------------------------------------------------------

variable "ssh_source_ranges" {
  description = "Empty (the default): SSH only through Identity-Aware Proxy, VMs get no public IP. Otherwise the CIDRs allowed to reach port 22 directly; the VMs then get a public IP. 0.0.0.0/0 and anything wider than /16 is refused."
  type        = list(string)
  default     = []
}

variable "ssh_members" {
  description = "IAM members (\"user:ana@example.com\", \"group:ml@example.com\") allowed to SSH in via OS Login and IAP. Project owners need no entry."
  type        = list(string)
  default     = []
  validation {
    condition     = alltrue([for m in var.ssh_members : can(regex("^(user|group|serviceAccount|domain):", m))])
    error_message = "ssh_members entries must start with user:, group:, serviceAccount: or domain:."
  }
}

variable "subnet_cidr" {
  description = "Address range of the stack's own subnet."
  type        = string
  default     = "10.42.0.0/24"
}

variable "enable_apis" {
  description = "Enable the Google APIs the stack uses (compute, iap, oslogin, billingbudgets). Turn off where they are managed elsewhere."
  type        = bool
  default     = true
}

# --- Results and money -------------------------------------------------------

variable "results_bucket" {
  description = "Create a private bucket the VMs copy finished runs to (cpuft-upload-results DIR)."
  type        = bool
  default     = false
}

variable "results_retention_days" {
  description = "Objects in the results bucket are deleted this many days after upload."
  type        = number
  default     = 30
  validation {
    condition     = var.results_retention_days >= 1
    error_message = "results_retention_days must be at least 1."
  }
}

variable "results_bucket_force_destroy" {
  description = "Let teardown delete the results bucket with its contents (fetch first). False makes terraform destroy stop at a non-empty bucket."
  type        = bool
  default     = true
}

variable "billing_account_id" {
  description = "Billing account (\"XXXXXX-XXXXXX-XXXXXX\") for a budget alert on this project; empty for no budget."
  type        = string
  default     = ""
  validation {
    condition     = var.billing_account_id == "" || can(regex("^[0-9A-F]{6}-[0-9A-F]{6}-[0-9A-F]{6}$", var.billing_account_id))
    error_message = "billing_account_id must look like 012345-6789AB-CDEF01."
  }
}

variable "budget_usd" {
  description = "Monthly budget for the project; billing admins get e-mail at 50 %, 90 % and 100 % (and at a forecast of 100 %). An alert, not a cap."
  type        = number
  default     = 50
  validation {
    condition     = var.budget_usd > 0
    error_message = "budget_usd must be positive."
  }
}
