"""The job config: what a user may ask for, and how it is checked. The bottom layer: it imports
no other cpuft layer (TRL and PEFT only, to check their configs).

- choices.py      every enumerated value (Literal types)
- job.py          `SFTJobConfig` (cpuft's own keys) and `resolve_config` (defaults < base < YAML < flags)
- passthrough.py  TRL SFTConfig and PEFT config fields as keys; cpuft's deviations; building and
                  checking those configs
- values.py       typing one value by its annotation (YAML and flags alike)
- yaml_file.py    YAML files with the line of each key
- cli_args.py     the flags and the --help-trl / --help-peft pages
"""
