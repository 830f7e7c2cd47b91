"""torch.compile vs eager on the tiny bench model (20 steps, varying sequence lengths).

Needs the tiny bench inputs first:  cpuft bench --size tiny --out /tmp/b7/tiny
Then:  python scripts/bench_compile.py 1; python scripts/bench_compile.py 0   (compiled, eager)
Prints total seconds, first-step seconds (includes compile) and the last 10 steps' seconds.
"""
import json
import os
import sys
import time

os.environ["HF_HUB_OFFLINE"]="1"
from datasets import Dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig, SFTTrainer

from cpuft.bench.data import read_jsonl
from cpuft.train.callbacks import MetricsCallback

compile_ = sys.argv[1]=="1"
base=os.environ.get("BENCH_TINY","/tmp/b7/tiny")
m=base+"/work/model-tiny"
tok=AutoTokenizer.from_pretrained(m); model=AutoModelForCausalLM.from_pretrained(m)
rows=read_jsonl(base+"/work/train.jsonl")*8
args=SFTConfig(output_dir="/tmp/b7/c%d"%compile_, max_steps=20, per_device_train_batch_size=4, use_cpu=True, bf16=False, gradient_checkpointing=False, logging_steps=1, save_strategy="no", report_to=[], max_length=128, torch_compile=compile_, disable_tqdm=True)
mc=MetricsCallback(__import__("pathlib").Path("/tmp/b7/c%d.jsonl"%compile_), show_progress=False)
tr=SFTTrainer(model=model,args=args,train_dataset=Dataset.from_list(rows),processing_class=tok,peft_config=LoraConfig(r=16,target_modules="all-linear",task_type="CAUSAL_LM"),callbacks=[mc])
t=time.time(); tr.train()
el=[r["elapsed_seconds"] for r in mc.records if "loss" in r]
print(json.dumps({"compile":compile_,"total":time.time()-t,"first":el[0],"last10":el[-1]-el[-11], "loss":[round(r["loss"],3) for r in mc.records if "loss" in r][-3:]}))
