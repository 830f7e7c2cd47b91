# The smallest var file: one Spot c3-standard-22 for at most 8 hours, SSH via IAP.
project_id     = "my-project-id"
cpuft_pip_spec = "cpuft==0.1.0"
