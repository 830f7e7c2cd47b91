"""The job config: `SFTJobConfig` (cpuft's own keys), the YAML file reader and the CLI flags.

Owns what a user may ask for and how it is validated; knows nothing of hardware or training.
"""
