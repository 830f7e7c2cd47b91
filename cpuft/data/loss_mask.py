"""Which tokens of a conversation the loss counts: the assistant's replies, for any chat template.

TRL's `assistant_only_loss` needs `{% generation %}` markers that released chat templates do not
have. cpuft finds the assistant tokens itself, by rendering the conversation turn by turn with
the model's own template:

- the whole conversation is rendered and tokenised once: the training row (`input_ids`), exactly
  what `tokenizer.apply_chat_template(messages, tokenize=True)` gives;
- for each assistant turn i, `messages[:i]` is rendered with the generation prompt: what the model
  sees at inference before it writes reply i. It must be a prefix of the whole conversation, text
  and tokens alike (else the model would be trained on a context it never sees) — checked;
- the reply's tokens run from its first content token to the first special token after the
  content inside the turn: its end-of-turn token (<|im_end|>, <|eot_id|>, <end_of_turn>, </s>),
  which is trained so the model learns to stop. Text the template adds after it ("\\n") is not.

Rows come out as TRL 1.16 pre-tokenised rows, {"input_ids", "assistant_masks"}: SFTTrainer folds
`assistant_masks` into `labels` (-100 where 0) whatever `completion_only_loss` says, truncates to
`max_length` and drops rows left without a trained token (trl/trainer/sft_trainer.py,
`_prepare_dataset`). With `loss_on="all"` every token is trained.

Work stays bounded by `max_length`, not by the conversation: the rendered conversation is
tokenised only as far as its first max_length tokens can reach (`tokenize_start`: a token covers
at most as many characters as the longest entry of the vocabulary, plus a margin, checked on the
offsets), and replies are located only until one starts past max_length (every later one does
too, and truncation drops them). A 50 MB row or a 2,000-turn conversation costs about what its
first max_length tokens cost, plus one render of the template.

Limits: needs a fast (Rust) tokenizer, for character offsets; message content must be a string
the template renders verbatim (trimming whitespace allowed); a template that renders earlier turns
differently once a later turn follows (e.g. one that drops earlier replies' reasoning) is refused
with a UserError naming the turn, since no mask would be faithful to it; turns that start past
max_length are not checked (nothing of them is trained) and not counted in
`turns_without_end_token`. Tool-call turns are not trained.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from cpuft.config.choices import LossOn, values
from cpuft.errors import UserError, first_line

# Tokens kept past max_length when a long text is cut before tokenising: cutting a text can change
# how the few characters before the cut tokenise (a word cut in two), never tokens this far back.
CUT_MARGIN_TOKENS = 64


@dataclass(frozen=True)
class MaskedConversation:
    input_ids: list[int]
    assistant_masks: list[int]  # 1 where the loss counts the token
    turns_without_end_token: int  # assistant turns the template closes with no special token


@dataclass(frozen=True)
class LossMaskCounts:
    """What the loss counted, for summary.json; after truncation to max_length."""

    loss_on: str
    conversations: int
    tokens: int
    loss_tokens: int
    conversations_without_loss_tokens: int  # TRL drops these (they carry no loss)
    truncated_conversations: int
    turns_without_end_token: int  # the model cannot learn to stop after these replies

    def to_dict(self) -> dict:
        return {
            "loss_on": self.loss_on,
            "conversations": self.conversations,
            "tokens": self.tokens,
            "loss_tokens": self.loss_tokens,
            "loss_token_fraction": round(self.loss_tokens / self.tokens, 4) if self.tokens else 0.0,
            "conversations_without_loss_tokens": self.conversations_without_loss_tokens,
            "truncated_conversations": self.truncated_conversations,
            "turns_without_end_token": self.turns_without_end_token,
        }

    def describe(self) -> str:
        """The console line: what the loss counts, in tokens."""
        if self.loss_on == "all":
            return f"loss on: all tokens ({self.tokens:,} tokens in {self.conversations:,} conversations)"
        share = 100 * self.loss_tokens / self.tokens if self.tokens else 0.0
        return f"loss on: assistant tokens ({self.loss_tokens:,} of {self.tokens:,} tokens, {share:.1f} %)"

    def warnings(self) -> list[str]:
        """One line per thing in the data the user may want to fix."""
        found = []
        if self.conversations_without_loss_tokens:
            found.append(
                f"{self.conversations_without_loss_tokens} of {self.conversations} conversations have no"
                " assistant token left after truncation to max_length, so they train nothing; raise"
                " max_length or shorten their prompts"
            )
        if self.turns_without_end_token:
            found.append(
                f"{self.turns_without_end_token} assistant turns end without a special end-of-turn token"
                " in this chat template, so the model cannot learn where a reply stops"
            )
        return found


def tokenize_conversations(
    conversations: Iterable[list[dict]],
    tokenizer,
    loss_on: LossOn = "assistant",
    max_length: int | None = None,
    where: Sequence[str] | None = None,
) -> tuple[list[dict], LossMaskCounts]:
    """TRL pre-tokenised rows for `conversations` (lists of {"role", "content"}) and their counts.

    `where` names each conversation in error messages ("train.jsonl:12"); rows are truncated to
    `max_length` (keeping the start, TRL's default) so the counts are what training sees.
    """
    if loss_on not in values(LossOn):
        raise UserError(f"loss_on must be one of {', '.join(values(LossOn))}, not {loss_on!r}.")
    rows: list[dict] = []
    tokens = loss_tokens = empty = truncated = open_turns = 0
    token_chars = longest_token_chars(tokenizer) if max_length is not None else None
    for index, messages in enumerate(conversations):
        name = where[index] if where is not None else f"conversation {index + 1}"
        if loss_on == "assistant":
            masked = mask_assistant_tokens(messages, tokenizer, where=name, max_length=max_length,
                                           token_chars=token_chars)
        else:
            _check_messages(messages, name)
            text = _render(tokenizer, messages, False, name, len(messages))
            ids = tokenize_start(tokenizer, text, max_length, token_chars).encoding["input_ids"]
            masked = MaskedConversation(ids, [1] * len(ids), 0)
        ids, mask = masked.input_ids, masked.assistant_masks
        if max_length is not None and len(ids) > max_length:
            ids, mask = ids[:max_length], mask[:max_length]
            truncated += 1
        rows.append({"input_ids": ids, "assistant_masks": mask})
        tokens += len(ids)
        loss_tokens += sum(mask)
        empty += not any(mask)
        open_turns += masked.turns_without_end_token
    counts = LossMaskCounts(
        loss_on=loss_on, conversations=len(rows), tokens=tokens, loss_tokens=loss_tokens,
        conversations_without_loss_tokens=empty, truncated_conversations=truncated,
        turns_without_end_token=open_turns,
    )
    return rows, counts


def mask_assistant_tokens(messages: list[dict], tokenizer, where: str = "conversation", max_length: int | None = None,
                          token_chars: int | None = None) -> MaskedConversation:
    """The conversation's tokens and a mask that is 1 on each assistant reply and its end-of-turn token.

    With `max_length`, the first max_length tokens and their mask are exactly those of the whole
    conversation, and what lies past them may be left out (see the module docstring);
    `token_chars` is `longest_token_chars(tokenizer)`, computed here when not given."""
    _check_messages(messages, where)
    if not getattr(tokenizer, "is_fast", False):
        raise UserError(
            f"{where}: assistant-only loss needs a fast tokenizer (tokenizer.json) for character"
            " offsets; this model's tokenizer is a slow one. Use --loss-on all, or save the tokenizer"
            " with a tokenizer.json."
        )
    full_text = _render(tokenizer, messages, False, where, len(messages))
    start = tokenize_start(tokenizer, full_text, max_length, token_chars)
    ids, offsets = start.encoding["input_ids"], start.encoding["offset_mapping"]
    special_ids = {i for i, token in tokenizer.added_tokens_decoder.items() if token.special}
    mask = [0] * len(ids)
    turns_without_end_token = 0
    for turn, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        span = _reply_span(tokenizer, messages, turn, full_text, start.chars, ids, offsets, special_ids, where, max_length)
        if span is None:  # this reply, and so every later one, starts past max_length
            break
        first, last, closed = span
        mask[first : last + 1] = [1] * (last + 1 - first)
        turns_without_end_token += closed is False
    return MaskedConversation(list(ids), mask, turns_without_end_token)


def _reply_span(tokenizer, messages, turn, full_text, tokenized_chars, ids, offsets, special_ids, where,
                max_length) -> tuple[int, int, bool | None] | None:
    """Token positions [first, last] of reply `turn` in the conversation's tokens `ids` (those of
    `full_text[:tokenized_chars]`), and whether a special token closes it (then `last` is that
    end-of-turn token; None when the turn runs past the tokenised text, so it is not known). None
    when the reply starts past `max_length` tokens."""
    label = f"{where}, message {turn + 1} (assistant)"
    prompt_text = _render(tokenizer, messages[:turn], True, where, len(messages))
    if not full_text.startswith(prompt_text):
        diverge = _common_prefix(prompt_text, full_text)
        raise UserError(
            f"{label}: the chat template is not prefix-stable: the conversation up to this reply,"
            f" rendered with the generation prompt, reads {prompt_text[diverge:diverge + 40]!r}"
            f" where the whole conversation reads {full_text[diverge:diverge + 40]!r}. The model"
            " would be trained on a context it never sees at inference, so cpuft cannot mask"
            " it faithfully: use a template that renders earlier turns the same way, or"
            " --loss-on all."
        )
    if max_length is not None and len(prompt_text) >= tokenized_chars:
        return None  # the prompt alone covers more than the first max_length tokens
    prompt_ids = _encode(tokenizer, prompt_text)["input_ids"]
    if max_length is not None and len(prompt_ids) >= max_length:
        return None
    if ids[: len(prompt_ids)] != prompt_ids:
        raise UserError(
            f"{label}: the generation prompt {prompt_text[-30:]!r} tokenises differently alone"
            " than inside the conversation (tokens merge across the boundary), so the model"
            " would be trained on a context it never sees at inference. End the template's"
            " generation prompt on a special token or newline, or use --loss-on all."
        )
    turn_text = _render(tokenizer, messages[: turn + 1], False, where, len(messages))
    turn_end = _common_prefix(turn_text, full_text)  # a template may close a final turn differently
    content = messages[turn]["content"]
    needle = content if full_text.find(content, len(prompt_text), turn_end) >= 0 else content.strip()
    content_start = full_text.find(needle, len(prompt_text), turn_end)
    if content_start < 0:
        raise UserError(
            f"{label}: the chat template does not render this reply's text verbatim, so cpuft"
            " cannot tell its tokens apart; use a template that writes message['content']"
            " as is (trimmed is fine), or --loss-on all."
        )
    content_end = content_start + len(needle)
    first = len(prompt_ids)
    while first < len(ids) and offsets[first][1] <= content_start:
        first += 1  # template text between the generation prompt and the reply
    last = first
    while last < len(ids) and offsets[last][0] < turn_end:
        if ids[last] in special_ids and offsets[last][0] >= content_end:
            return first, last, True
        last += 1
    if last == len(ids) and tokenized_chars < len(full_text):
        return first, last - 1, None  # the turn goes on past the tokenised start: its end is not known
    return first, last - 1, False  # no special token closes the turn: train all the turn adds


def _check_messages(messages, where: str) -> None:
    if not isinstance(messages, list) or not messages:
        raise UserError(f"{where}: a conversation must be a non-empty list of messages.")
    for number, message in enumerate(messages, start=1):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise UserError(f"{where}, message {number}: each message needs a 'role' string.")
        if not isinstance(message.get("content"), str):
            raise UserError(
                f"{where}, message {number} ({message['role']}): 'content' must be a string for the"
                " assistant-only loss mask."
            )


def _render(tokenizer, messages: list[dict], add_generation_prompt: bool, where: str, total: int) -> str:
    """The template's text for `messages` (the first of `total` messages of the conversation)."""
    if tokenizer.chat_template is None:
        raise UserError(f"{where}: the tokenizer has no chat template to render conversations with.")
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as exc:  # jinja2 errors and the template's own raise_exception(...)
        if len(messages) == total and not add_generation_prompt:
            part = "the whole conversation"
        else:
            prompt = " with the generation prompt" if add_generation_prompt else ""
            part = f"its first {len(messages)} message(s){prompt}"
        raise UserError(f"{where}: the chat template failed on {part}: {first_line(exc)}") from None


def _encode(tokenizer, text: str, offsets: bool = True, add_special_tokens: bool = False):
    # The template writes the special tokens (BOS included) itself, as apply_chat_template assumes.
    return tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=offsets)


@dataclass(frozen=True)
class TokenizedStart:
    encoding: dict  # the tokenizer's output: input_ids and offset_mapping
    chars: int  # how many characters of the text were tokenised


def longest_token_chars(tokenizer) -> int:
    """The most characters of text one token of `tokenizer` stands for: the length of its longest
    vocabulary entry (added tokens included). Byte-level tokens spell each byte as one character
    and a character takes at least one byte, so the bound holds for them too; tokenizers whose
    normalizer drops characters can exceed it, which `tokenize_start` checks for."""
    return max((len(token) for token in tokenizer.get_vocab()), default=1) or 1


def tokenize_start(tokenizer, text: str, max_length: int | None, token_chars: int | None = None,
                   add_special_tokens: bool = False) -> TokenizedStart:
    """`text` tokenised (with offsets) far enough to hold its first `max_length` tokens exactly as
    tokenising the whole text gives them; the whole text when `max_length` is None or the text is
    short.

    A cut is made CUT_MARGIN_TOKENS tokens' worth of characters past where max_length tokens can
    reach, and accepted when the offsets show token max_length ending that margin before the cut;
    else (a normalizer dropped characters, say) the cut moves 4x further out, up to the whole text.
    A slow (Python) tokenizer has no offsets to check a cut with: it gets the whole text, without
    offsets."""
    has_offsets = getattr(tokenizer, "is_fast", False)
    if max_length is None or not has_offsets:
        encoding = _encode(tokenizer, text, offsets=has_offsets, add_special_tokens=add_special_tokens)
        return TokenizedStart(encoding, len(text))
    token_chars = token_chars or longest_token_chars(tokenizer)
    margin = CUT_MARGIN_TOKENS * token_chars
    cut = _first_cut(max_length, token_chars)
    while cut < len(text):
        encoding = _encode(tokenizer, text[:cut], add_special_tokens=add_special_tokens)
        offsets = encoding["offset_mapping"]
        if len(offsets) > max_length and offsets[max_length][1] + margin <= cut:
            return TokenizedStart(encoding, cut)
        cut *= 4
    return TokenizedStart(_encode(tokenizer, text, add_special_tokens=add_special_tokens), len(text))


def text_start(tokenizer, text: str, max_length: int, token_chars: int | None = None) -> str:
    """`text` cut past the characters its first `max_length` tokens (and the CUT_MARGIN_TOKENS
    after them) come from, found by `tokenize_start`; unchanged, and not tokenised, when short.
    For rows a trainer tokenises itself and truncates to max_length; a slow tokenizer (no offsets
    to check a cut with) gets `text` whole."""
    if not getattr(tokenizer, "is_fast", False):
        return text
    token_chars = token_chars or longest_token_chars(tokenizer)
    if len(text) <= _first_cut(max_length, token_chars):
        return text
    return text[: tokenize_start(tokenizer, text, max_length, token_chars).chars]


def _first_cut(max_length: int, token_chars: int) -> int:
    """Characters past which no token of the first max_length can reach, plus the margin."""
    return (max_length + 1 + CUT_MARGIN_TOKENS) * token_chars


def _common_prefix(a: str, b: str) -> int:
    n = min(len(a), len(b))
    i, step = 0, 4096
    while i < n and a[i : i + step] == b[i : i + step]:  # whole blocks at C speed: replies run to megabytes
        i += step
    i = min(i, n)
    while i < n and a[i] == b[i]:
        i += 1
    return i
