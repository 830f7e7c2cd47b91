"""Where a LoRA training step's time goes on CPU: torch.profiler top ops for one fwd+bwd.

    python scripts/profile_step.py MODEL_DIR [--batch 4 --seq 256 --threads 2]

MODEL_DIR: e.g. the bench's bench-results/100m/work/model-100m. Same LoRA settings as the bench
(r 16, all linear layers, dropout 0.05), fp32, SDPA, no checkpointing. Prints the ops sorted
by self CPU time and the share spent in matmuls, to say what limits MFU.
"""
import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import torch
from peft import LoraConfig, get_peft_model
from torch.profiler import ProfilerActivity, profile
from transformers import AutoModelForCausalLM

parser = argparse.ArgumentParser()
parser.add_argument("model_dir")
parser.add_argument("--batch", type=int, default=4)
parser.add_argument("--seq", type=int, default=256)
parser.add_argument("--threads", type=int, default=os.cpu_count())
args = parser.parse_args()
torch.set_num_threads(args.threads)
model = AutoModelForCausalLM.from_pretrained(args.model_dir, attn_implementation="sdpa", dtype=torch.float32)
model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear",
                                         task_type="CAUSAL_LM"))
model.train()
ids = torch.randint(10, model.config.vocab_size, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
mask = torch.ones_like(ids)
mask[: args.batch // 2, args.seq // 2:] = 0  # half the rows padded to half length, like a padded batch


def step():
    out = model(input_ids=ids, attention_mask=mask, labels=ids, use_cache=False)
    out.loss.backward()


step()  # warm-up
with profile(activities=[ProfilerActivity.CPU]) as prof:
    step()
events = prof.key_averages()
total = sum(e.self_cpu_time_total for e in events)
matmul = sum(e.self_cpu_time_total for e in events if e.key in ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul"))
print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18))
print(f"matmul share of self CPU time: {matmul / total:.1%}  (batch {args.batch} x {args.seq}, {args.threads} threads)")
