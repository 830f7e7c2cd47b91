"""Build a small Llama-style model with random weights and a BPE tokenizer, fully offline.

No hub is reachable on CI or on many build machines, so the demo and the tests need a model
they can make: the tokenizer is trained with `tokenizers` on the bundled sample (or any texts),
gets a ChatML-style chat template with `{% generation %}` markers (so assistant-only loss works),
and both are saved with save_pretrained as a plain Hugging Face model directory.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cpuft.artifacts import atomic_directory

PAD, BOS, IM_START, IM_END = "<|pad|>", "<|bos|>", "<|im_start|>", "<|im_end|>"

# ChatML layout. Newlines are emitted inside expressions because transformers renders templates
# with trim_blocks, which would swallow a newline after a block tag.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- generation %}{{- message['content'] + '<|im_end|>' }}{%- endgeneration %}"
    "{{- '\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


@dataclass(frozen=True)
class TinyModelSpec:
    vocab_size: int = 4096
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2  # grouped-query attention, as in Llama 3
    # A multiple of 32: bitsandbytes' CPU NF4 inference kernel (AVX-512-BF16 CPUs) needs
    # out_features % 32 == 0, as every released model has.
    intermediate_size: int = 704
    max_position_embeddings: int = 2048
    seed: int = 0


def build_tiny_model(out_dir: str | Path, texts: Iterable[str] | None = None, spec: TinyModelSpec = TinyModelSpec()) -> Path:
    """Write a tokenizer + random-init LlamaForCausalLM to `out_dir` (atomically). Returns the path."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if texts is None:
        texts = _sample_texts()
    tokenizer = train_tokenizer(texts, spec.vocab_size)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        max_position_embeddings=spec.max_position_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(spec.seed)
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    with atomic_directory(out_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return Path(out_dir)


def train_tokenizer(texts: Iterable[str], vocab_size: int):
    """Byte-level BPE (no unknown tokens) with the chat special tokens, wrapped for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, BOS, IM_START, IM_END],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token=PAD, bos_token=BOS, eos_token=IM_END,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _sample_texts() -> list[str]:
    from cpuft.data.prepare import load_rows, sample_path

    texts = []
    for row in load_rows(str(sample_path())):
        texts.extend(row.data.get("conversations", []))
    return texts
