locals {
  primary_vm = contains(local.vm_roles, "cpu") ? module.plan.vms["cpu"] : contains(local.vm_roles, "gpu") ? module.plan.vms["gpu"] : null
  ssh_commands = {
    for role in local.vm_roles : role =>
    "gcloud compute ssh ${module.plan.vms[role].name} --project ${var.project_id} --zone ${var.zone}${local.ssh_via == "iap" ? " --tunnel-through-iap" : ""}"
  }
}

output "vms" {
  description = "Each VM by role (\"cpu\", \"gpu\"): name, zone, machine type, hourly cost and the command to SSH in."
  value = {
    for role in local.vm_roles : role => {
      name                 = module.plan.vms[role].name
      zone                 = var.zone
      machine_type         = module.plan.vms[role].machine_type
      spot                 = var.spot
      hourly_usd           = module.plan.vms[role].hourly_usd
      hourly_usd_on_demand = module.plan.vms[role].hourly_usd_on_demand
      hourly_usd_spot      = module.plan.vms[role].hourly_usd_spot
      ssh_command          = local.ssh_commands[role]
    }
  }
}

output "vm_name" {
  description = "The CPU VM's name (the GPU VM's when there is no CPU VM); \"\" when there is no VM."
  value       = local.primary_vm == null ? "" : local.primary_vm.name
}

output "zone" {
  value = var.zone
}

output "project_id" {
  value = var.project_id
}

output "ssh_command" {
  description = "How to log in to vm_name."
  value       = local.primary_vm == null ? "" : local.ssh_commands[local.primary_vm.role]
}

output "ssh_via" {
  description = "\"iap\" (gcloud ... --tunnel-through-iap) or \"cidr\" (direct, public IP)."
  value       = local.ssh_via
}

output "hourly_usd" {
  description = "Expected cost per hour of all VMs together, from the price table (null if a machine type is missing from it)."
  value       = module.plan.hourly_usd
}

output "max_cost_usd" {
  description = "Worst case for one provisioning: all VMs running until max_run_duration deletes them."
  value       = module.plan.max_cost_usd
}

output "max_run_hours" {
  value = var.max_run_hours
}

output "spot" {
  value = var.spot
}

output "results_bucket" {
  description = "gs:// URL of the results bucket, or \"\" when there is none."
  value       = var.results_bucket ? "gs://${local.bucket_name}" : ""
}

output "stack_name" {
  value = var.name
}

output "warnings" {
  value = module.plan.warnings
}
