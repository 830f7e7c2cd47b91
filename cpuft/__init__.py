"""cpuft: CPU-first LoRA/QLoRA supervised fine-tuning on the Hugging Face stack.

The flow is config -> probe -> plan -> data -> train -> artefacts, one module each.
"""

__version__ = "0.1.0"
