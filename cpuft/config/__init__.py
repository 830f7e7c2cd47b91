"""The job config: what a user may ask for, and how it is checked. The bottom layer: it imports
no other cpuft layer (TRL and PEFT only, to check their configs).

- choices.py         every enumerated value (Literal types)
- sections.py        cpuft's own keys in sections (model, data, training, adapter, hardware,
                     evaluation, output): type, default and help of each
- job.py             `SFTJobConfig` (all sections as one flat job; `config.section(...)` for one)
                     and `resolve_config` (defaults < base < YAML < flags)
- trl_config.py      `CpuftSFTConfig`: TRL's SFTConfig with cpuft's defaults and why (imports TRL)
- passthrough.py     TRL SFTConfig's fields as keys: the ones the plan and pipeline set (refused),
                     the rest typed; building SFTConfig to check the job
- peft_config.py     the PEFT config of `peft_method`: cpuft's deviations, its fields as keys,
                     its keyword arguments, building it to check the job
- library_fields.py  what both share: a dataclass's fields, `Deviation`, building a library
                     config with the user's key blamed
- reporting.py       report_to's integrations: their names, and checks they can start
- values.py          typing one value by its annotation (YAML and flags alike)
- yaml_file.py       YAML files with the line of each key
- cli_args.py        the flags and the --help-trl / --help-peft pages
"""
