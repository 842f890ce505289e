"""Text to token ids: chat templates, response-only label masks, end-of-turn and stop tokens, lengths.

What a tokenizer makes of the records data.py reads: the one place that knows how a conversation, a ranked
response or a plain text becomes ids, and where an assistant turn ends.
"""

from __future__ import annotations

from dataclasses import dataclass

from instructcli.errors import InstructError

IGNORE_INDEX = -100  # label value that the LM loss skips (prompt tokens, padding)


def render_chat(tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def _ids(tokenizer, text: str) -> list[int]:
    # the rendered template already holds every special token it wants (BOS included)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def encode_demonstration(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """input_ids and labels; labels are IGNORE_INDEX except on the assistant turns (end-of-turn included).

    Each assistant turn is located by rendering the conversation up to it with and without the turn, so any
    chat template whose renderings are prefixes of each other works; chunks are tokenised separately so the
    mask boundary falls exactly between tokens.
    """
    chunks: list[tuple[str, bool]] = []
    done = 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = render_chat(tokenizer, messages[:i], add_generation_prompt=True)
        upto = render_chat(tokenizer, messages[: i + 1], add_generation_prompt=False)
        if not upto.startswith(before) or not before.startswith(_consumed(chunks)):
            raise InstructError("the tokenizer's chat template does not render conversations as prefixes of each "
                                "other; response-only masking needs one that does", 2)
        chunks.append((before[done:], False))
        chunks.append((upto[len(before):], True))
        done = len(upto)
    input_ids, labels = [], []
    for text, train in chunks:
        ids = _ids(tokenizer, text) if text else []
        input_ids += ids
        labels += ids if train else [IGNORE_INDEX] * len(ids)
    return input_ids, labels


def _consumed(chunks: list[tuple[str, bool]]) -> str:
    return "".join(t for t, _ in chunks)


def end_of_turn_id(tokenizer) -> int | None:
    """The special token the chat template closes an assistant turn with (`<|im_end|>`, `<|eot_id|>`,
    `<end_of_turn>`, ...), found by rendering one; None when the template closes turns with plain text."""
    if not getattr(tokenizer, "chat_template", None):  # no template: nothing but EOS ends an answer
        return None
    if not hasattr(tokenizer, "_instruct_eot"):
        mark = "@@instruct-mark@@"
        text = render_chat(tokenizer, [{"role": "user", "content": "q"}, {"role": "assistant", "content": mark}],
                           add_generation_prompt=False)
        after = _ids(tokenizer, text[text.rfind(mark) + len(mark):]) if mark in text else []
        special = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
        tokenizer._instruct_eot = after[0] if after and after[0] in special else None
    return tokenizer._instruct_eot


def stop_token_ids(tokenizer) -> list[int]:
    """What ends a generated answer: EOS and the template's end-of-turn token (they differ for many chat
    models, whose answers would otherwise all run to the token cap)."""
    return sorted({t for t in (tokenizer.eos_token_id, end_of_turn_id(tokenizer)) if t is not None})


def ended(tokenizer, ids: list[int]) -> bool:
    """Whether a generated answer ended on its own (on a stop token) rather than at the token cap."""
    return bool(ids) and ids[-1] in stop_token_ids(tokenizer)


def encode_responses(tokenizer, messages: list[dict], responses: list[str], max_len: int, overflow: str,
                     stats: OverflowStats, where: str, ended: list[bool] | None = None) -> list[list[int]] | None:
    """Token ids of each full conversation (context + one response), as a reward model reads it; None if
    --overflow drop drops one of them (a ranking is kept whole or not at all).

    The conversation stops at the response's end-of-turn token, where the score is read (what the template
    renders after it is not part of the answer); a response that did not end (`ended` False: cut off at the
    token cap) has no end-of-turn token, so the reward model sees that it was cut off, as in PPO's rollouts."""
    eot, out = end_of_turn_id(tokenizer), []
    for i, r in enumerate(responses):
        ids, _ = encode_demonstration(tokenizer, messages + [{"role": "assistant", "content": r}])
        if eot is not None and eot in ids:
            last = len(ids) - 1 - ids[::-1].index(eot)
            ids = ids[:last + 1] if ended is None or ended[i] else ids[:last]
        fitted = fit_length(ids, None, max_len, overflow, stats, where)
        if fitted is None:
            return None
        out.append(fitted[0])
    return out


def encode_prompt(tokenizer, messages: list[dict]) -> list[int]:
    return _ids(tokenizer, render_chat(tokenizer, messages, add_generation_prompt=True))


def encode_prompts(tokenizer, prompts, max_prompt_len: int) -> tuple[list[list[int]], int]:
    """Generation prompts of a prompts file; longer ones keep their end (the generation prompt). Returns
    (ids per prompt, how many were cut)."""
    stats, out = OverflowStats(), []
    for p in prompts.records:
        out.append(fit_length(encode_prompt(tokenizer, p.messages), None, max_prompt_len, "truncate", stats,
                              f"{prompts.path}: id {p.id}", keep="end")[0])
    return out, stats.truncated


def encode_continuation(tokenizer, text: str) -> list[int]:
    """Text that continues an already-encoded prompt (a multiple-choice answer after the generation prompt)."""
    return _ids(tokenizer, text)


def encode_text(tokenizer, text: str) -> list[int]:
    ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    if tokenizer.eos_token_id is not None:
        ids = ids + [tokenizer.eos_token_id]
    return ids


@dataclass
class OverflowStats:
    total: int = 0
    truncated: int = 0
    dropped: int = 0

    def summary(self) -> str:
        return f"{self.total} examples, {self.truncated} truncated, {self.dropped} dropped (longer than max-len)"


def fit_length(ids: list[int], labels: list[int] | None, max_len: int, overflow: str, stats: OverflowStats,
               where: str, keep: str = "start") -> tuple[list[int], list[int] | None] | None:
    """Apply --overflow to one example: returns it (maybe cut to max_len) or None when dropped.

    keep="start" cuts the end (demonstrations, text); keep="end" cuts the beginning (prompts, so the
    generation prompt survives). An example left with no trained token is dropped.
    """
    stats.total += 1
    if len(ids) <= max_len:
        return ids, labels
    if overflow == "error":
        raise InstructError(f"{where}: {len(ids)} tokens, longer than --max-len {max_len} (--overflow error)", 2)
    if overflow == "drop":
        stats.dropped += 1
        return None
    sl = slice(0, max_len) if keep == "start" else slice(len(ids) - max_len, None)
    ids, labels = ids[sl], (labels[sl] if labels is not None else None)
    if labels is not None and all(x == IGNORE_INDEX for x in labels):
        stats.dropped += 1  # the prompt alone fills max_len: nothing left to learn from
        return None
    stats.truncated += 1
    return ids, labels
