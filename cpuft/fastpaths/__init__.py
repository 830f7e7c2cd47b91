"""cpuft's eager CPU fast paths: drop-in replacements for library code on the training step's hot
path, each computing the same function (tests/test_fused_lora.py, test_chunked_loss.py,
test_fused_swiglu.py prove it against the stock code) with less non-GEMM work.

- fused_lora: each LoRA linear's training pass as one autograd node (plan field `fused_lora`);
- chunked_loss: lm_head + loss at labelled positions only, in cache-sized tiles (`cpu_lm_head`);
- fused_swiglu: the MLP's SiLU-and-multiply as one node (measured in scripts/profile_step.py);
- compiled_elementwise: RMSNorm, rotary, SiLU-and-multiply and LoRA dropout as compiled
  kernels, one pass each way (`compiled_elementwise`);
- short_attention: attention over short rows as grouped batched GEMMs (`short_row_attention`;
  with the compiled kernels, rows up to 384 tokens in causal chunks).

The plan (cpuft.planning.plan) decides which are on and says why; `apply_fast_paths` applies
them, for the trainer (cpuft.train.assembly) and for the time plan's layer measurement
(cpuft.planning.step_cost) alike.
This package sits low: it imports torch, PEFT, TRL and cpuft.hardware, never the planner or the
trainer, so the planner can time the same code the run will use (cpuft.planning.step_cost).
"""


def apply_fast_paths(model, plan) -> dict[str, object]:
    """Apply to `model` (PEFT-wrapped, built for training) the CPU fast paths `plan` turns on
    (cpuft.planning.plan: `fused_lora`, `compiled_elementwise`, `short_row_attention`); what each
    did, for the log."""
    done: dict[str, object] = {}
    compiled = plan.compiled_elementwise
    if compiled:  # why: the plan's reasons["compiled_elementwise"]; proof: tests/test_compiled_elementwise.py
        from cpuft.fastpaths.compiled_elementwise import compile_elementwise

        done["compiled_elementwise"] = compile_elementwise(model)
    if plan.fused_lora:  # why: the plan's reasons["fused_lora"]; proof: tests/test_fused_lora.py
        from cpuft.fastpaths.fused_lora import fuse_lora_layers

        done["fused_lora"] = fuse_lora_layers(model, compiled=compiled)
    if plan.short_row_attention:  # why: reasons["short_row_attention"]; proof: tests/test_short_attention.py
        from cpuft.fastpaths.short_attention import use_short_row_attention

        done["short_row_attention"] = use_short_row_attention(model, compiled=compiled)
    return done
