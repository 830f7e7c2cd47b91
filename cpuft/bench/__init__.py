"""`cpuft bench`: the same LoRA job run by plain TRL and by cpuft, each in its own process,
reported as ratios within one run.
"""
