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
from cpuft.data.chat_template import DEFAULT_CHAT_TEMPLATE, IM_END, IM_START

PAD, BOS = "<|pad|>", "<|bos|>"
# The tiny model speaks ChatML, the template cpuft gives base models (one definition).
CHAT_TEMPLATE = DEFAULT_CHAT_TEMPLATE


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
        texts = sample_texts()
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
    """Byte-level BPE (no unknown tokens) with the ChatML special tokens, wrapped for transformers."""
    return train_bpe_tokenizer(
        texts, vocab_size, special_tokens=[PAD, BOS, IM_START, IM_END],
        pad_token=PAD, bos_token=BOS, eos_token=IM_END, chat_template=CHAT_TEMPLATE,
    )


def train_bpe_tokenizer(
    texts: Iterable[str],
    vocab_size: int,
    special_tokens: list[str],
    pad_token: str,
    eos_token: str,
    bos_token: str | None = None,
    chat_template: str | None = None,
    append_eos: bool = False,
):
    """Byte-level BPE trained on `texts`, with `special_tokens` first in the vocabulary (as atomic,
    special added tokens), wrapped as a PreTrainedTokenizerFast.

    `append_eos` adds `eos_token` after every encoded text, as T5's tokenizer does for seq2seq
    inputs and targets. Every token in `special_tokens` is matched whole in text, so a chat
    template's markers (<|eot_id|>, <end_of_turn>, ...) encode to one id each, as in the real tokenizers.
    """
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer)
    if append_eos:
        backend.post_processor = processors.TemplateProcessing(
            single=f"$A {eos_token}", pair=f"$A {eos_token} $B {eos_token}",
            special_tokens=[(eos_token, backend.token_to_id(eos_token))],
        )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token=pad_token, bos_token=bos_token, eos_token=eos_token,
    )
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    return tokenizer


def sample_texts() -> list[str]:
    """Every turn of the bundled LIMA-shaped sample: enough text to train a small BPE vocabulary."""
    from cpuft.data.readers import load_rows, sample_path

    texts = []
    for row in load_rows(str(sample_path())):
        texts.extend(row.data.get("conversations", []))
    return texts
