output "vms" {
  description = "One entry per VM to create (keys \"cpu\", or \"cpu-0\" ... for a multi-node job, and \"gpu\") with every setting the root module needs."
  value       = local.vms
}

output "stack_labels" {
  description = "Labels for the stack's non-VM resources (network, bucket, ...)."
  value       = local.base_labels
}

output "hourly_usd" {
  description = "Expected cost per hour of all the stack's VMs together (USD, price table rates); null when a machine type has no price."
  value       = length(local.unpriced) > 0 ? null : sum(concat([0], [for vm in local.vms : vm.hourly_usd]))
}

output "max_cost_usd" {
  description = "Worst case for one provisioning: every VM running until max_run_duration deletes it, or with recreate_on_preemption until the group's max_total_hours are up."
  value       = length(local.unpriced) > 0 ? null : sum(concat([0], [for vm in local.vms : vm.hourly_usd])) * local.worst_case_hours
}

output "worst_case_hours" {
  description = "Hours the max_cost_usd figure assumes: max_run_hours, or max_total_hours with recreate_on_preemption."
  value       = local.worst_case_hours
}

output "nodes" {
  description = "The CPU nodes of one job in rank order (names), their count, the network tag the node firewall matches, node 0's rendezvous endpoint (\"\" for one node) and the TCP ports the nodes open to each other."
  value       = local.nodes
}

output "queue_sync_url" {
  description = "Where the batch queue keeps its state (cpuft batch run --sync-to), or \"\" without a bucket or queue."
  value       = local.queue_sync_url
}

output "unpriced_machine_types" {
  description = "Machine types missing from the price table (add them to cpuft/planning/gcp_prices.csv or your own copy)."
  value       = local.unpriced
}

output "warnings" {
  description = "Choices that work but probably are not what a cpuft user wants."
  value = concat(
    [for vm in local.vms : "${vm.name}: ${vm.machine_type} has no AMX; bf16 training will be slow (use c3-, c4- or n4-)." if !vm.gpu && !vm.amx],
    length(local.vms) == 0 ? ["Neither cpu_vm nor gpu_vm is set: no VM will be created."] : [],
  )
}

output "ssh" {
  description = "How SSH reaches the VMs: via (\"iap\" or \"cidr\"), the firewall's source_ranges, and whether VMs get a public IP."
  value       = local.ssh
}
