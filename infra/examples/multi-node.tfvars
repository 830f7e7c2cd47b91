# Two c3-standard-44 nodes training one job (torch.distributed over gloo), in one compact
# placement policy; scripts/gcp/run starts the job on both and streams node 0's log.
project_id     = "my-project-id"
name           = "cpuft-duo"
cpuft_pip_spec = "cpuft==0.1.0"

machine_type   = "c3-standard-44"
node_count     = 2
results_bucket = true # run passes --sync-to gs://BUCKET/runs/RUN, so --resume works on new nodes
