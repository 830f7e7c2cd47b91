"""cpuft's eager CPU fast paths: drop-in replacements for library code on the training step's hot
path, each computing the same function (tests/test_fused_lora.py, test_chunked_loss.py,
test_fused_swiglu.py prove it against the stock code) with less non-GEMM work.

- fused_lora: each LoRA linear's training pass as one autograd node (plan field `fused_lora`);
- chunked_loss: lm_head + loss at labelled positions only, in cache-sized tiles (`cpu_lm_head`);
- fused_swiglu: the MLP's SiLU-and-multiply as one node (measured in scripts/profile_step.py).

The plan (cpuft.planning.plan) decides which are on and says why; trainer assembly applies them.
This package sits low: it imports torch, PEFT, TRL and cpuft.hardware, never the planner or the
trainer, so the planner can time the same code the run will use (cpuft.planning.step_cost).
"""
