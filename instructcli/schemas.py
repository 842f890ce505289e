"""The Hub's common row layouts, rewritten into ours before validation, so a user's data needs no conversion:

- sft: Alpaca (`instruction`, `input`, `output`), ShareGPT (`conversations` of `{from, value}`), OpenAI-style
  `messages`, prompt/completion pairs;
- rm: TRL's preference rows (`prompt`/`chosen`/`rejected`, strings or message lists, the prompt implicit or
  not), Anthropic HH-RLHF (`chosen`/`rejected` transcripts of `\\n\\nHuman:` / `\\n\\nAssistant:` turns: the
  shared turns become the chat, the last assistant turns the two responses), UltraFeedback-style ratings (a
  prompt with several completions and numeric ratings: a K-way ranking, equal ratings tied);
- prompts: Alpaca instructions, ShareGPT conversations (up to their last user turn), TRL prompt-only rows.

`recognise(row, kind)` returns (schema name, the row in our layout); a problem in the source layout raises
`Bad(field, problem)` naming the source's own field. `--columns ours=theirs,...` renames first.
"""

from __future__ import annotations

import math
import re

from instructcli.readers import type_name


class Bad(Exception):
    def __init__(self, field: str, problem: str):
        self.field, self.problem = field, problem


def parse_columns(spec: str) -> dict[str, str]:
    """`prompt=instruction,response=output` -> {"prompt": "instruction", "response": "output"}."""
    out = {}
    for part in filter(None, (p.strip() for p in (spec or "").split(","))):
        ours, eq, theirs = part.partition("=")
        if not eq or not ours.strip() or not theirs.strip():
            raise ValueError(f"--columns {spec}: expected OURS=THEIRS pairs, e.g. prompt=instruction,response=output")
        out[ours.strip()] = theirs.strip()
    return out


def rename(row: dict, columns: dict[str, str]) -> dict:
    """The row with each mapped column under our name (a command's files share one mapping: a file without
    the column keeps its own fields)."""
    if not columns:
        return row
    out = dict(row)  # the source's own field stays too: another file of the command may need it by that name
    for ours, theirs in columns.items():
        if theirs in row:
            out[ours] = row[theirs]
    return out


# --------------------------------------------------------------------------------------- turn layouts
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant",
                  "bard": "assistant", "bing": "assistant", "model": "assistant", "system": "system"}


def _sharegpt(turns, key: str = "conversations") -> list[dict]:
    if not isinstance(turns, list):
        raise Bad(key, f"expected an array, got {type_name(turns)}")
    out = []
    for i, t in enumerate(turns):
        if not isinstance(t, dict):
            raise Bad(f"{key}[{i}]", f"expected an object, got {type_name(t)}")
        who = t.get("from", t.get("role"))
        if not isinstance(who, str) or who not in SHAREGPT_ROLES:
            raise Bad(f"{key}[{i}].from", f"expected one of human, gpt, system, got {who!r}")
        out.append({"role": SHAREGPT_ROLES[who], "content": t.get("value", t.get("content"))})
    return out


def _alpaca_prompt(row: dict) -> str:
    extra = row.get("input")
    if extra is not None and not isinstance(extra, str):
        raise Bad("input", f"expected a string, got {type_name(extra)}")
    inst = row["instruction"]
    return f"{inst}\n\n{extra}" if isinstance(inst, str) and extra and extra.strip() else inst


def _as_messages(v, key: str, role: str) -> list[dict]:
    """A string or a list of {role, content} messages (TRL's conversational rows)."""
    if isinstance(v, str):
        return [{"role": role, "content": v}]
    if isinstance(v, list) and all(isinstance(m, dict) for m in v):
        return [{"role": m.get("role"), "content": m.get("content")} for m in v]
    raise Bad(key, f"expected a string or an array of messages, got {type_name(v)}")


def _until_last_user(msgs: list[dict], key: str) -> list[dict]:
    """A conversation as a prompt: up to its last user turn (a dataset of chats names no prompt as such)."""
    last = max((i for i, m in enumerate(msgs) if m.get("role") == "user"), default=None)
    if last is None:
        raise Bad(key, "no user turn to answer")
    return msgs[:last + 1]


_HH_TURN = re.compile(r"\n\n(Human|Assistant): ")


def hh_turns(text, key: str) -> list[dict]:
    """`\\n\\nHuman: a\\n\\nAssistant: b` -> [{"role": "user", "content": "a"}, {"role": "assistant", ...}]."""
    if not isinstance(text, str):
        raise Bad(key, f"expected a string, got {type_name(text)}")
    parts = _HH_TURN.split(text if text.startswith("\n\n") else "\n\n" + text.lstrip("\n"))
    if len(parts) < 3 or parts[0].strip():
        raise Bad(key, 'expected "\\n\\nHuman: ..." / "\\n\\nAssistant: ..." turns')
    return [{"role": "user" if who == "Human" else "assistant", "content": body.strip()}
            for who, body in zip(parts[1::2], parts[2::2])]


def _hh(row: dict) -> dict:
    chosen, rejected = hh_turns(row["chosen"], "chosen"), hh_turns(row["rejected"], "rejected")
    for key, turns in (("chosen", chosen), ("rejected", rejected)):
        if turns[-1]["role"] != "assistant":
            raise Bad(key, "the transcript does not end on an Assistant turn")
    if chosen[:-1] != rejected[:-1]:
        raise Bad("rejected", "its turns before the last Assistant turn differ from chosen's")
    return {"messages": chosen[:-1], "chosen": chosen[-1]["content"], "rejected": rejected[-1]["content"]}


def _trl_preference(row: dict) -> dict:
    """TRL's explicit-prompt and implicit-prompt (whole conversations) preference rows, strings or messages."""
    chosen = _as_messages(row["chosen"], "chosen", "assistant")
    rejected = _as_messages(row["rejected"], "rejected", "assistant")
    if "prompt" in row:
        prompt = _as_messages(row["prompt"], "prompt", "user")
    else:  # implicit prompt: the shared turns of the two conversations
        n = 0
        while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
            n += 1
        prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
    for key, msgs in (("chosen", chosen), ("rejected", rejected)):
        if len(msgs) != 1 or msgs[0]["role"] != "assistant":
            raise Bad(key, "expected one assistant message (the response)")
    return {"messages": prompt, "chosen": chosen[0]["content"], "rejected": rejected[0]["content"]}


SCORE_KEYS = ("overall_score", "fine-grained_score", "score", "rating")


def _ratings(row: dict) -> dict:
    """A prompt with several completions and numeric ratings -> a K-way ranking (higher rating = better rank,
    equal ratings tied)."""
    prompt = row.get("prompt", row.get("instruction"))
    comps = row["completions"]
    if not isinstance(comps, list) or len(comps) < 2:
        raise Bad("completions", f"expected an array of 2 or more completions, got {type_name(comps)}")
    responses, scores = [], []
    for i, c in enumerate(comps):
        if isinstance(c, dict):
            text = c.get("response", c.get("text", c.get("completion")))
            key = next((k for k in SCORE_KEYS if k in c), None)
            if key is None:
                raise Bad(f"completions[{i}]", f"no rating (looked for {', '.join(SCORE_KEYS)})")
            score = c[key]
        else:
            text = c
            ratings = row.get("ratings", row.get("scores"))
            if not isinstance(ratings, list) or len(ratings) != len(comps):
                raise Bad("ratings", f"expected {len(comps)} numbers, one per completion")
            score = ratings[i]
        try:
            score = float(score) if not isinstance(score, bool) else math.nan
        except (TypeError, ValueError):
            score = math.nan
        if not math.isfinite(score):
            raise Bad(f"completions[{i}]", f"rating {c[key] if isinstance(c, dict) else ratings[i]!r} is not a finite "
                                           "number")
        responses.append(text)
        scores.append(score)
    order = sorted(set(scores), reverse=True)
    ranks = [order.index(s) + 1 for s in scores]  # dense: equal ratings share a rank
    messages = _as_messages(prompt, "prompt" if "prompt" in row else "instruction", "user")
    return {"messages": messages, "responses": responses, "ranks": ranks}


# ------------------------------------------------------------------------------------------ recognise
def recognise(row: dict, kind: str) -> tuple[str, dict]:
    """(schema name, row in our layout) for one row of a `kind` file; unknown layouts pass through as ours."""
    if kind == "demonstrations":
        if "messages" in row:
            return "messages", row
        if "conversations" in row:
            return "sharegpt", {"messages": _sharegpt(row["conversations"])}
        if "instruction" in row and "output" in row:
            return "alpaca", {"prompt": _alpaca_prompt(row), "response": row["output"]}
        if "prompt" in row and "completion" in row:
            return "prompt-completion", {"messages": _as_messages(row["prompt"], "prompt", "user")
                                         + _as_messages(row["completion"], "completion", "assistant")}
        return "prompt-response", row
    if kind == "comparisons":
        if "completions" in row:
            return "ratings", _ratings(row)
        if "responses" in row or "ranks" in row:
            return "k-way", row
        if "chosen" in row and "rejected" in row:
            if "prompt" not in row and "messages" not in row and isinstance(row["chosen"], str):
                return "hh-rlhf", _hh(row)
            if "messages" in row or (isinstance(row.get("prompt"), str) and isinstance(row["chosen"], str)):
                return "chosen-rejected", row
            return "trl-preference", _trl_preference(row)
        return "chosen-rejected", row
    if kind == "prompts":
        if "messages" in row:  # ours: it must end on the user turn to answer
            return "messages", row
        if "conversations" in row:
            return "sharegpt", {**row, "messages": _until_last_user(_sharegpt(row["conversations"]), "conversations")}
        if "instruction" in row and "prompt" not in row:
            return "alpaca", {**row, "prompt": _alpaca_prompt(row)}
        if isinstance(row.get("prompt"), list):
            return "trl-prompt", {**row, "messages": _as_messages(row["prompt"], "prompt", "user")}
        return "prompt", row
    return kind, row
