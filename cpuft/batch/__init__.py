"""`cpuft batch`: run a queue of fine-tuning jobs unattended, surviving preemption.

- `queue.py`   parse and validate the queue file into resolved `SFTJobConfig`s (all jobs, before
               anything runs)
- `state.py`   the SQLite state store: one row per job, every transition in one IMMEDIATE
               transaction
- `lock.py`    one scheduler per queue (flock on a file next to the state)
- `runner.py`  run each job as a `cpuft sft` child process, map its exit status to a state,
               forward SIGTERM so the child checkpoints, recover jobs a dead scheduler left
- `durable.py` the queue's copy in a store (`--sync-to`): state snapshot, per-job stores, leases
- `timer.py`   systemd service + timer (or a cron line) that starts the runner
- `report.py`  the status table
"""
