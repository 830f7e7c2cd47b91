"""The bench's fixed job: what each --size trains, the variants, and the settings they share.

Every variant runs the same model, LoRA settings, data, max_length, optimizer hyperparameters,
steps, seed and batch; only what the variant's name says differs (see cpuft.bench.baselines and
cpuft.bench.worker).
"""

from __future__ import annotations

from dataclasses import dataclass

from cpuft.testing.tiny_model import TinyModelSpec

VARIANTS = ("trl_defaults", "trl_tuned", "cpuft")
# Added by itself on CPUs with native bf16, so the report shows bf16 against fp32 there.
CPUFT_FP32 = "cpuft_fp32"
# Shared by every variant: the bench compares execution, not optimisation recipes.
OPTIMIZER_SETTINGS = dict(learning_rate=2e-4, lr_scheduler_type="cosine", warmup_steps=0.1, weight_decay=0.0)
LORA_SETTINGS = dict(lora_r=16, lora_alpha=32, lora_dropout=0.05, lora_target_modules="all-linear")


@dataclass(frozen=True)
class BenchSize:
    model: TinyModelSpec
    steps: int
    batch_size: int
    accumulation: int
    max_length: int
    median_reply_words: int  # the synthetic data's median assistant reply
    eval_samples: int

    @property
    def train_rows(self) -> int:
        """Exactly one epoch: every variant trains on the same rows, only their order differs."""
        return self.steps * self.batch_size * self.accumulation


SIZES = {
    # CI smoke test: seconds per variant; its timings mean little.
    "tiny": BenchSize(
        model=TinyModelSpec(vocab_size=1024, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                            intermediate_size=172),
        steps=3, batch_size=4, accumulation=1, max_length=128, median_reply_words=30, eval_samples=8,
    ),
    # The headline: ~95M parameters (12 x 768, GQA 12/4 heads, MLP 2560; the BPE trained on the
    # synthetic text stops at ~6.4k of the 8192 vocabulary asked for).
    "100m": BenchSize(
        model=TinyModelSpec(vocab_size=8192, hidden_size=768, num_layers=12, num_heads=12, num_kv_heads=4,
                            intermediate_size=2560),
        steps=8, batch_size=8, accumulation=1, max_length=512, median_reply_words=110, eval_samples=16,
    ),
}
