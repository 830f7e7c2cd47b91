"""Generate with a loaded fine-tune: greedy or sampled settings, one reply, or a token stream.

Owns how a prompt becomes token ids (chat template with the assistant turn opened, or raw text),
which tokens end a reply (`stop_token_ids`: the one set generate, chat, stream and `cpuft serve`
stop on) and how `model.generate` is called. Loading the model is `cpuft.inference.loading`.

Limits: one prompt at a time (no batching across requests); `stream` runs generation in a
background thread and re-raises its error in the caller's thread; stop strings are not handled
here (`cpuft serve` handles them per request).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from cpuft.errors import UserError
from cpuft.inference.loading import LoadedModel, device_of

# End-of-turn tokens of common chat templates (ChatML/Qwen, Llama 3, Gemma, Phi-3): models often
# end a reply with one of these while their tokenizer's eos_token is another ("<|endoftext|>").
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>")


def stop_token_ids(tokenizer, model=None) -> tuple[int, ...]:
    """Every token id that ends a reply: the tokenizer's EOS, the ids in the model's generation
    config (often several, e.g. Llama 3's <|end_of_text|> and <|eot_id|>), and each end-of-turn
    token of END_OF_TURN_TOKENS that the chat template uses and the vocabulary holds."""
    ids = [tokenizer.eos_token_id]
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids += configured if isinstance(configured, (list, tuple)) else [configured]
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else ""
    vocabulary = tokenizer.get_vocab()
    ids += [vocabulary[token] for token in END_OF_TURN_TOKENS if token in template and token in vocabulary]
    return tuple(dict.fromkeys(i for i in ids if i is not None))  # in order, once each


@dataclass(frozen=True)
class GenerationSettings:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int = 0

    def generate_kwargs(self, tokenizer, model=None) -> dict:
        kwargs: dict[str, Any] = {
            "max_new_tokens": self.max_new_tokens,
            "pad_token_id": tokenizer.pad_token_id,
            "eos_token_id": list(stop_token_ids(tokenizer, model)),
            "repetition_penalty": self.repetition_penalty,
        }
        if self.temperature > 0:
            kwargs.update(do_sample=True, temperature=self.temperature, top_p=self.top_p)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        return kwargs


def prompt_ids(tokenizer, messages: list[dict] | None = None, text: str | None = None, device: str = "cpu"):
    """Token ids for a chat (via the chat template, with the assistant turn opened) or raw text."""
    if messages is not None:
        if not tokenizer.chat_template:
            raise UserError(
                "the tokenizer has no chat template, so a chat cannot be formatted. Use --raw to"
                " continue plain text, or a chat/instruct model."
            )
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True, return_tensors="pt")
    else:
        ids = tokenizer(text, return_tensors="pt")
    return {k: v.to(device) for k, v in ids.items() if k in ("input_ids", "attention_mask")}


def generate(loaded: LoadedModel, settings: GenerationSettings, messages=None, text=None) -> str:
    """The model's continuation (new tokens only, special tokens stripped)."""
    import torch

    inputs = prompt_ids(loaded.tokenizer, messages, text, device=device_of(loaded.model))
    torch.manual_seed(settings.seed)
    with torch.inference_mode():
        output = loaded.model.generate(**inputs, **settings.generate_kwargs(loaded.tokenizer, loaded.model))
    # A decoder-only model returns the prompt, then the reply; an encoder-decoder (T5) the reply alone.
    encoder_decoder = getattr(loaded.model.config, "is_encoder_decoder", False)
    new_tokens = output[0, 0 if encoder_decoder else inputs["input_ids"].shape[1]:].tolist()
    # generate keeps the stop token it ended on; a stop id need not be a special token (a
    # generation_config's second eos), so drop it here rather than rely on skip_special_tokens.
    if new_tokens and new_tokens[-1] in stop_token_ids(loaded.tokenizer, loaded.model):
        new_tokens = new_tokens[:-1]
    return loaded.tokenizer.decode(new_tokens, skip_special_tokens=True)


def stream(loaded: LoadedModel, settings: GenerationSettings, messages=None, text=None) -> Iterator[str]:
    """Yield text pieces as they are generated (generation runs in a background thread)."""
    import torch
    from transformers import TextIteratorStreamer

    inputs = prompt_ids(loaded.tokenizer, messages, text, device=device_of(loaded.model))
    stop_ids = torch.tensor(stop_token_ids(loaded.tokenizer, loaded.model))

    class ReplyStreamer(TextIteratorStreamer):
        """Streams the reply without the stop token that ends it (see `generate`)."""

        def put(self, value):
            if not self.next_tokens_are_prompt:
                value = value[~torch.isin(value.cpu(), stop_ids)]
            super().put(value)

    streamer = ReplyStreamer(loaded.tokenizer, skip_prompt=True, skip_special_tokens=True)
    failure: list[BaseException] = []

    def run() -> None:
        torch.manual_seed(settings.seed)
        try:
            with torch.inference_mode():
                loaded.model.generate(**inputs, **settings.generate_kwargs(loaded.tokenizer, loaded.model), streamer=streamer)
        except BaseException as exc:  # re-raised in the caller's thread below
            failure.append(exc)
            streamer.end()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    yield from streamer
    thread.join()
    if failure:
        raise failure[0]
