"""The bench's fixed job: what each --size trains, the variants, and the settings they share.

`--job dpo` runs the same sizes with preference pairs in place of conversations: `steps x batch`
pairs (each two sequences, prompt + chosen and prompt + rejected, up to max_length tokens), the
batch counted in pairs, as `cpuft dpo --per-device-batch-size` counts it.

Every variant runs the same model, LoRA settings, data, max_length, optimizer hyperparameters,
steps, seed and batch; only what the variant's name says differs (see cpuft.bench.baselines and
cpuft.bench.worker).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from cpuft.config.sections import DPO_LEARNING_RATE
from cpuft.testing.architectures import PUBLISHED_MODELS, PublishedModel
from cpuft.testing.tiny_model import TinyModelSpec

JOBS = ("sft", "dpo")
VARIANTS = ("trl_defaults", "trl_tuned", "trl_best", "cpuft")
TRL_VARIANTS = tuple(v for v in VARIANTS if v.startswith("trl_"))
# `--job dpo`: plain TRL DPOTrainer with its defaults and at its best (cpuft.bench.baselines), and
# `cpuft dpo`'s stages. trl_defaults is not run unless asked: gradient checkpointing makes it the slowest.
DPO_VARIANTS = ("trl_defaults", "trl_best", "cpuft")
DPO_DEFAULT_VARIANTS = ("trl_best", "cpuft")
DPO_TRL_VARIANTS = tuple(v for v in DPO_VARIANTS if v.startswith("trl_"))
# Added by itself on CPUs with native bf16, so the report shows bf16 against fp32 there (SFT only:
# DPO's runs are the bench's longest; name it in --variants to get it).
CPUFT_FP32 = "cpuft_fp32"
# cpuft forced to bf16, only when named in --variants: where the plan measured fp32 the faster
# (small models, cpuft.planning.dtype_choice), it shows what bf16 would have given.
CPUFT_BF16 = "cpuft_bf16"
CPUFT_FORCED_DTYPES = {CPUFT_FP32: "fp32", CPUFT_BF16: "bf16"}
# `--trl-micro-batches 1,2,4`: trl_best once per micro-batch size (packed rows per micro-batch,
# the same rows per optimizer step through accumulation), each its own row; the fastest is trl_best.
TRL_BEST = "trl_best"
TRL_BEST_AT = f"{TRL_BEST}_mb"  # then the micro-batch size: trl_best's run at that size


def trl_best_at(micro_batch: int) -> str:
    """The name of trl_best's run at `micro_batch` packed rows per micro-batch."""
    return f"{TRL_BEST_AT}{micro_batch}"
# Shared by every variant: the bench compares execution, not optimisation recipes.
OPTIMIZER_SETTINGS = dict(learning_rate=2e-4, lr_scheduler_type="cosine", warmup_steps=0.1, weight_decay=0.0)
# DPO at `cpuft dpo`'s default learning rate (a LoRA adapter's DPO rate).
DPO_OPTIMIZER_SETTINGS = {**OPTIMIZER_SETTINGS, "learning_rate": DPO_LEARNING_RATE}
LORA_SETTINGS = dict(lora_r=16, lora_alpha=32, lora_dropout=0.05, lora_target_modules="all-linear")


def job_variants(job: str) -> tuple[str, ...]:
    """The variants a job can run (cpuft_fp32 aside)."""
    return DPO_VARIANTS if job == "dpo" else VARIANTS


@dataclass(frozen=True)
class PublishedShape:
    """A released model's architecture (its config.json fields, cpuft.testing.architectures) with
    random weights: nothing is downloaded.

    The model keeps the published vocabulary (embedding and lm_head cost what they cost); the
    tokenizer is the bench's small BPE (`tokenizer_vocab`), so token ids use only the low range
    of the embedding. Its special-token ids are written into the config.
    """

    hub_id: str
    tokenizer_vocab: int = 8192
    seed: int = 0

    @property
    def published(self) -> PublishedModel:
        return next(m for m in PUBLISHED_MODELS if m.hub_id == self.hub_id)

    @property
    def hidden_size(self) -> int:
        return self.published.config_fields["hidden_size"]

    @property
    def intermediate_size(self) -> int:
        return self.published.config_fields["intermediate_size"]

    @property
    def vocab_size(self) -> int:
        return self.published.config_fields["vocab_size"]

    def config(self, tokenizer=None):
        """The transformers config; token ids from `tokenizer` when given."""
        config = self.published.config()
        if tokenizer is not None:
            config.pad_token_id = tokenizer.pad_token_id
            config.bos_token_id = tokenizer.bos_token_id
            config.eos_token_id = tokenizer.eos_token_id
        return config

    def describe(self) -> dict:
        return {"architecture_of": self.hub_id, "model_type": self.published.model_type,
                **self.published.config_fields, "tokenizer_vocab": self.tokenizer_vocab, "seed": self.seed}


def describe_model(model: TinyModelSpec | PublishedShape) -> dict:
    """The bench model's defining fields, for bench.json and the rebuild check."""
    return model.describe() if isinstance(model, PublishedShape) else asdict(model)


@dataclass(frozen=True)
class BenchSize:
    model: TinyModelSpec | PublishedShape
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
    # A ~3M Llama (tied 4k vocabulary, 256 wide, 3 layers: the 4M demo model less a layer), where
    # bf16 and fp32 are close (docs/speed.md): the plan's dtype by measurement decides. About a
    # minute and a half for the default variants on 2 cores, most of it each process's start.
    "3m": BenchSize(
        model=TinyModelSpec(vocab_size=4096, hidden_size=256, num_layers=3, num_heads=4, num_kv_heads=2,
                            intermediate_size=704),
        steps=10, batch_size=8, accumulation=1, max_length=256, median_reply_words=60, eval_samples=16,
    ),
    # The headline: ~95M parameters (12 x 768, GQA 12/4 heads, MLP 2560; the BPE trained on the
    # synthetic text stops at ~6.4k of the 8192 vocabulary asked for).
    "100m": BenchSize(
        model=TinyModelSpec(vocab_size=8192, hidden_size=768, num_layers=12, num_heads=12, num_kv_heads=4,
                            intermediate_size=2560),
        steps=8, batch_size=8, accumulation=1, max_length=512, median_reply_words=110, eval_samples=16,
    ),
    # The shapes people train (random weights, full published vocabulary). Few steps: each
    # variant runs in minutes on 2 cores; 4 rows of up to 512 tokens per step.
    "qwen0.5b": BenchSize(
        model=PublishedShape("Qwen/Qwen2.5-0.5B"),
        steps=4, batch_size=4, accumulation=1, max_length=512, median_reply_words=110, eval_samples=8,
    ),
    "llama1b": BenchSize(
        model=PublishedShape("meta-llama/Llama-3.2-1B"),
        steps=4, batch_size=4, accumulation=1, max_length=512, median_reply_words=110, eval_samples=8,
    ),
}
