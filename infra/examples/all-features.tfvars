# Every optional feature on. The infrastructure tests scan this file with
# checkov, because resources with count = 0 are invisible to it otherwise.
project_id     = "my-project-id"
zone           = "us-central1-b"
name           = "cpuft-all"
cpuft_pip_spec = "cpuft @ git+https://github.com/example/cpuft@0123456789abcdef0123456789abcdef01234567"

machine_type     = "c3-standard-44"
gpu_vm           = true
gpu_machine_type = "g2-standard-8"
spot             = false
max_run_hours    = 4
boot_disk_gb     = 300
labels           = { team = "ml", cost-center = "1234" }

batch_mode       = "timer"
batch_queue_file = "examples/queue.yaml"

ssh_source_ranges = ["203.0.113.0/24"]
ssh_members       = ["user:ana@example.com"]

results_bucket         = true
results_retention_days = 14

billing_account_id = "012345-6789AB-CDEF01"
budget_usd         = 100
