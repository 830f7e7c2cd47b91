# A batch queue on a Spot VM that comes back after a preemption: a managed instance group of
# size 1 recreates the VM, which resumes the queue from the bucket; when the queue drains the
# VM deletes its group. 8 h per VM, 24 h for the whole queue, whatever happens.
project_id     = "my-project-id"
name           = "cpuft-queue"
cpuft_pip_spec = "cpuft==0.1.0"

batch_mode             = "run"
batch_queue_file       = "examples/queue.yaml"
results_bucket         = true
recreate_on_preemption = true
max_run_hours          = 8
max_total_hours        = 24
