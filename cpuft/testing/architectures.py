"""The architectures users fine-tune, as tiny random-weight models built offline, and the
published full-size configs with their published parameter counts.

`TINY_ARCHITECTURES` holds one `TinyArchitecture` per family cpuft is tested on: Llama, Qwen2,
Qwen3, Mistral, Gemma 2, Gemma 3 (text), Phi-3, GPT-NeoX (Pythia), OPT, BLOOM, Falcon, T5 (the
v1.1 / Flan-T5 layout) and mT5. Each is the real transformers config class at a tiny size
(hidden 64, 2 layers, 4 heads, MLP widths multiples of 32 as bitsandbytes' CPU kernels need)
with random weights; `build_architecture(name, out_dir)` writes a directory that
AutoModelForCausalLM / AutoModelForSeq2SeqLM and AutoTokenizer load, with a byte-level BPE
tokenizer trained on the bundled sample. Decoder models get their family's released chat
template and special tokens (cpuft/testing/chat_templates.py); base-model families without one
(Pythia, OPT, BLOOM, Falcon) get ChatML unless `chat_template=False`. Seq2seq tokenizers append
</s> to every text, as T5's does.

`PUBLISHED_MODELS` holds the fields of released config.json files that fix the parameter count,
with the count the publisher states, so a test can check cpuft's count from the config alone.

T5 and mT5 are built untied (their own output head), as Flan-T5, T0 and mT5/mt0 checkpoints
are; transformers 5 warns on loading them that it will "NOT tie" the two, as it does for the
released checkpoints.

Limits: tiny models say nothing about quality; they exercise shapes, module names, attention
classes, chat templates and the save/load paths.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from cpuft.artifacts import atomic_directory
from cpuft.testing.chat_templates import (
    CHATML,
    GEMMA2,
    GEMMA3,
    LLAMA3,
    MISTRAL,
    PHI3,
    ChatFamily,
)

TINY_VOCAB = 512
SEQ2SEQ_SPECIAL_TOKENS = ("<pad>", "</s>", "<unk>")  # T5's ids 0, 1, 2
_DECODER = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)


@dataclass(frozen=True)
class TinyArchitecture:
    name: str  # the matrix's row name
    model_type: str  # transformers' model_type of the config
    config_fields: dict = field(default_factory=dict)  # tiny sizes, on top of the class defaults
    chat_family: ChatFamily | None = CHATML  # None for seq2seq
    token_fields: tuple[str, ...] = ("pad_token_id", "bos_token_id", "eos_token_id")
    # T5 v1.1 / Flan-T5 / mT5 checkpoints store an output head apart from the input embedding.
    # transformers 5 builds every T5 tied (T5Config forces tie_word_embeddings=True) and unties
    # at load when the checkpoint holds both, so the tiny model is saved the same way.
    untied_head: bool = False

    @property
    def encoder_decoder(self) -> bool:
        return self.chat_family is None

    def config(self, tokenizer):
        """The real transformers config class at tiny size, with the tokenizer's vocabulary and ids."""
        from transformers import AutoConfig

        ids = {
            "pad_token_id": tokenizer.pad_token_id,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "decoder_start_token_id": tokenizer.pad_token_id,  # T5 starts decoding from <pad>
        }
        fields = {name: ids[name] for name in self.token_fields}
        return AutoConfig.for_model(self.model_type, vocab_size=len(tokenizer), **fields, **self.config_fields)


_SEQ2SEQ_TOKENS = ("pad_token_id", "eos_token_id", "decoder_start_token_id")
_T5_SIZES = dict(
    d_model=64, d_ff=128, d_kv=16, num_heads=4, num_layers=2, num_decoder_layers=2,
    feed_forward_proj="gated-gelu", tie_word_embeddings=False,
)

TINY_ARCHITECTURES: dict[str, TinyArchitecture] = {
    arch.name: arch
    for arch in (
        TinyArchitecture("llama", "llama", dict(_DECODER, num_key_value_heads=2), LLAMA3),
        TinyArchitecture("qwen2", "qwen2", dict(_DECODER, num_key_value_heads=2), CHATML),
        TinyArchitecture("qwen3", "qwen3", dict(_DECODER, num_key_value_heads=2, head_dim=16), CHATML),
        TinyArchitecture("mistral", "mistral", dict(_DECODER, num_key_value_heads=2), MISTRAL),
        TinyArchitecture(
            "gemma2", "gemma2",
            dict(_DECODER, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16, sliding_window=64),
            GEMMA2,
        ),
        TinyArchitecture(
            "gemma3", "gemma3_text",
            dict(_DECODER, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16, sliding_window=64),
            GEMMA3,
        ),
        TinyArchitecture("phi3", "phi3", dict(_DECODER, num_key_value_heads=2), PHI3),
        TinyArchitecture("gpt_neox", "gpt_neox", dict(_DECODER)),
        TinyArchitecture(
            "opt", "opt",
            dict(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                 word_embed_proj_dim=64, max_position_embeddings=512),
        ),
        TinyArchitecture("bloom", "bloom", dict(hidden_size=64, n_layer=2, n_head=4)),
        TinyArchitecture(
            "falcon", "falcon",
            dict(hidden_size=64, ffn_hidden_size=128, num_hidden_layers=2, num_attention_heads=4),
        ),
        TinyArchitecture("t5", "t5", dict(_T5_SIZES), None, _SEQ2SEQ_TOKENS, untied_head=True),
        TinyArchitecture("mt5", "mt5", dict(_T5_SIZES), None, _SEQ2SEQ_TOKENS, untied_head=True),
    )
}


def tiny_tokenizer(arch: TinyArchitecture, texts: Iterable[str] | None = None, chat_template: bool = True):
    """The architecture's tokenizer: its chat family's special tokens (T5's for seq2seq)."""
    from cpuft.testing.tiny_model import sample_texts, train_bpe_tokenizer

    texts = list(texts) if texts is not None else sample_texts()
    if arch.chat_family is None:
        pad, eos, _ = SEQ2SEQ_SPECIAL_TOKENS
        return train_bpe_tokenizer(texts, TINY_VOCAB, list(SEQ2SEQ_SPECIAL_TOKENS), pad, eos, append_eos=True)
    family = arch.chat_family
    return train_bpe_tokenizer(
        texts, TINY_VOCAB, list(family.special_tokens), pad_token=family.pad_token,
        eos_token=family.eos_token, bos_token=family.bos_token,
        chat_template=family.template if chat_template else None,
    )


def build_architecture(
    name: str, out_dir: str | Path, texts: Iterable[str] | None = None, chat_template: bool = True, seed: int = 0
) -> Path:
    """Write tiny random-weight `name` (a key of TINY_ARCHITECTURES) + tokenizer to `out_dir`, atomically."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    arch = TINY_ARCHITECTURES[name]
    tokenizer = tiny_tokenizer(arch, texts, chat_template)
    config = arch.config(tokenizer)
    torch.manual_seed(seed)
    auto = AutoModelForSeq2SeqLM if arch.encoder_decoder else AutoModelForCausalLM
    model = auto.from_config(config)
    if arch.untied_head:
        head = model.get_output_embeddings()
        # std d_model^-0.5 keeps the random model's first loss near ln(vocab), as a tied T5's
        # rescaled head does; T5's own init (std 1) starts a tiny model at a loss of ~35.
        head.weight = torch.nn.Parameter(torch.randn_like(head.weight) * config.d_model**-0.5)
    generation = model.generation_config
    generation.pad_token_id = tokenizer.pad_token_id
    stop = [tokenizer.eos_token_id]
    if arch.chat_family is not None and arch.chat_family.end_of_turn:
        end_of_turn = tokenizer.convert_tokens_to_ids(arch.chat_family.end_of_turn)
        stop = sorted({*stop, end_of_turn})  # Phi-3 ends turns with <|end|> but its eos is <|endoftext|>
    generation.eos_token_id = stop if len(stop) > 1 else stop[0]
    with atomic_directory(out_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return Path(out_dir)


# ----------------------------------------------------------------------------- published configs


@dataclass(frozen=True)
class PublishedModel:
    """A released model: the config.json fields that fix its parameter count, and that count."""

    hub_id: str
    model_type: str
    config_fields: dict
    parameters: int  # as published (exact where the publisher gives it exactly)
    source: str  # where the count is published

    def config(self):
        from transformers import AutoConfig

        return AutoConfig.for_model(self.model_type, **self.config_fields)


PUBLISHED_MODELS: tuple[PublishedModel, ...] = (
    PublishedModel(
        "Qwen/Qwen2.5-0.5B", "qwen2",
        dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
             num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True),
        494_032_768, "Hub model page (safetensors: 494M params); model card: 0.49B",
    ),
    PublishedModel(
        "meta-llama/Llama-3.2-1B", "llama",
        dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
             num_attention_heads=32, num_key_value_heads=8, head_dim=64, tie_word_embeddings=True),
        1_235_814_400, "Hub model page (safetensors: 1.24B params); model card: 1.23B",
    ),
    PublishedModel(
        "mistralai/Mistral-7B-v0.1", "mistral",
        dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
             num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False),
        7_241_732_096, "Hub model page (safetensors: 7.24B params)",
    ),
    PublishedModel(
        "google/gemma-2-2b", "gemma2",
        dict(vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
             num_attention_heads=8, num_key_value_heads=4, head_dim=256, tie_word_embeddings=True),
        2_614_341_888, "Hub model page (safetensors: 2.61B params)",
    ),
    PublishedModel(
        "google/gemma-3-1b-pt", "gemma3_text",
        dict(vocab_size=262144, hidden_size=1152, intermediate_size=6912, num_hidden_layers=26,
             num_attention_heads=4, num_key_value_heads=1, head_dim=256, tie_word_embeddings=True),
        999_885_952, "Hub model page (safetensors: 1000M params); model card: 1B",
    ),
    PublishedModel(
        "microsoft/Phi-3-mini-4k-instruct", "phi3",
        dict(vocab_size=32064, hidden_size=3072, intermediate_size=8192, num_hidden_layers=32,
             num_attention_heads=32, num_key_value_heads=32, tie_word_embeddings=False,
             pad_token_id=32000),
        3_821_079_552, "Hub model page (safetensors: 3.82B params); model card: 3.8B",
    ),
    PublishedModel(
        "EleutherAI/pythia-160m", "gpt_neox",
        dict(vocab_size=50304, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
             num_attention_heads=12, max_position_embeddings=2048, tie_word_embeddings=False),
        162_322_944, "Pythia README, model table: 162,322,944 total parameters",
    ),
    PublishedModel(
        "facebook/opt-125m", "opt",
        dict(vocab_size=50272, hidden_size=768, ffn_dim=3072, num_hidden_layers=12, num_attention_heads=12,
             max_position_embeddings=2048, word_embed_proj_dim=768),
        125_239_296, "Hub model page (125M params); OPT paper table 1: 125M",
    ),
    PublishedModel(
        "bigscience/bloom-560m", "bloom",
        dict(vocab_size=250880, hidden_size=1024, n_layer=24, n_head=16),
        559_214_592, "model card: 559,214,592 parameters",
    ),
    PublishedModel(
        "tiiuae/falcon-7b", "falcon",
        dict(vocab_size=65024, hidden_size=4544, num_hidden_layers=32, num_attention_heads=71,
             multi_query=True, parallel_attn=True, bias=False, new_decoder_architecture=False),
        6_921_720_704, "Hub model page (safetensors: 6.92B params); model card: 7B",
    ),
    PublishedModel(
        "google/flan-t5-base", "t5",
        dict(vocab_size=32128, d_model=768, d_ff=2048, d_kv=64, num_heads=12, num_layers=12,
             num_decoder_layers=12, feed_forward_proj="gated-gelu", tie_word_embeddings=False),
        247_577_856, "Hub model page (safetensors: 248M params)",
    ),
    PublishedModel(
        "google/mt5-small", "mt5",
        dict(vocab_size=250112, d_model=512, d_ff=1024, d_kv=64, num_heads=6, num_layers=8,
             num_decoder_layers=8, feed_forward_proj="gated-gelu", tie_word_embeddings=False),
        300_000_000, "mT5 paper (Xue et al. 2021), table 1: 300M",
    ),
)
