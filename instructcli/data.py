"""The only place that reads user data.

JSONL rows -> validated records, with every problem reported as `path:line: field: problem`; chat templates
via the tokenizer; response-only label masks; padding. Row formats are those of ARCHITECTURE.md.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from instructcli.errors import DataError, InstructError

ROLES = ("system", "user", "assistant")


# --------------------------------------------------------------------------------------------- records
@dataclass
class Demonstration:
    messages: list[dict]  # ends on an assistant turn; loss on every assistant turn


@dataclass
class Comparison:
    messages: list[dict]  # the context, ends on a user turn
    responses: list[str]  # K >= 2
    ranks: list[int]  # 1 = best; equal ranks are ties
    ended: list[bool] | None = None  # per response: False = cut off at the token cap (no end-of-turn); None = all ended

    @property
    def prompt(self) -> str:
        return self.messages[-1]["content"]


@dataclass
class Prompt:
    id: str
    messages: list[dict]  # ends on a user turn

    @property
    def prompt(self) -> str:
        return self.messages[-1]["content"]


@dataclass
class Text:
    text: str


@dataclass
class MultipleChoice:
    """A truthfulness question (TruthfulQA MC1 style): exactly one of `choices` is true."""

    id: str
    question: str
    choices: list[str]
    correct: int


@dataclass
class Sample:
    id: str
    prompt: str
    responses: list[str]
    model: str
    messages: list[dict] | None = None
    extra: dict = field(default_factory=dict)


@dataclass
class Loaded:
    """What a reader returns: the records plus what the manifest records about the file."""

    records: list
    path: str
    sha256: str
    rows: int  # valid rows
    skipped: int  # invalid rows skipped with --skip-invalid

    def describe(self) -> dict:
        return {"path": self.path, "sha256": self.sha256, "rows": self.rows, "skipped": self.skipped}


# ----------------------------------------------------------------------------------------- field checks
class _Bad(Exception):
    def __init__(self, field: str, problem: str):
        self.field, self.problem = field, problem


def _type_name(v: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(v), "integer" if isinstance(v, int) else "number" if isinstance(v, float) else type(v).__name__
    )


def _text(row: dict, key: str, where: str | None = None) -> str:
    name = where or key
    if key not in row:
        raise _Bad(name, "missing")
    v = row[key]
    if not isinstance(v, str):
        raise _Bad(name, f"expected a string, got {_type_name(v)}")
    if not v.strip():
        raise _Bad(name, "empty string")
    return v


def _messages(row: dict, last: str) -> list[dict]:
    v = row["messages"]
    if not isinstance(v, list):
        raise _Bad("messages", f"expected an array, got {_type_name(v)}")
    if not v:
        raise _Bad("messages", "empty array")
    out = []
    for i, m in enumerate(v):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise _Bad(where, f"expected an object, got {_type_name(m)}")
        role = m.get("role")
        if role not in ROLES:
            raise _Bad(f"{where}.role", f"expected one of {', '.join(ROLES)}, got {json.dumps(role)}")
        content = _text(m, "content", f"{where}.content")
        # system only first; then user/assistant alternate, starting with user
        first_turn = 1 if v[0].get("role") == "system" else 0
        if role == "system" and i != 0:
            raise _Bad(f"{where}.role", "system is only allowed as the first message")
        if i >= first_turn:
            want = "user" if (i - first_turn) % 2 == 0 else "assistant"
            if role != want:
                raise _Bad(f"{where}.role", f"expected {want} (turns alternate user/assistant), got {role}")
        out.append({"role": role, "content": content})
    if out[-1]["role"] != last:
        raise _Bad(f"messages[{len(out) - 1}].role", f"the last message must be {last}, got {out[-1]['role']}")
    return out


def _prompt_messages(row: dict) -> list[dict]:
    if "messages" in row:
        return _messages(row, last="user")
    return [{"role": "user", "content": _text(row, "prompt")}]


def _str_list(row: dict, key: str, min_len: int, allow_empty: bool = False) -> list[str]:
    if key not in row:
        raise _Bad(key, "missing")
    v = row[key]
    if not isinstance(v, list):
        raise _Bad(key, f"expected an array, got {_type_name(v)}")
    if len(v) < min_len:
        raise _Bad(key, f"expected at least {min_len} items, got {len(v)}")
    for i, s in enumerate(v):
        if not isinstance(s, str):
            raise _Bad(f"{key}[{i}]", f"expected a string, got {_type_name(s)}")
        if not allow_empty and not s.strip():
            raise _Bad(f"{key}[{i}]", "empty string")
    return list(v)


def parse_demonstration(row: dict) -> Demonstration:
    if "messages" in row:
        return Demonstration(_messages(row, last="assistant"))
    prompt, response = _text(row, "prompt"), _text(row, "response")
    return Demonstration([{"role": "user", "content": prompt}, {"role": "assistant", "content": response}])


def parse_comparison(row: dict) -> Comparison:
    msgs = _prompt_messages(row)
    if "responses" in row or "ranks" in row:
        responses = _str_list(row, "responses", 2)
        if "ranks" not in row:
            raise _Bad("ranks", "missing")
        ranks = row["ranks"]
        if not isinstance(ranks, list):
            raise _Bad("ranks", f"expected an array, got {_type_name(ranks)}")
        if len(ranks) != len(responses):
            raise _Bad("ranks", f"expected {len(responses)} ranks (one per response), got {len(ranks)}")
        for i, r in enumerate(ranks):
            if isinstance(r, bool) or not isinstance(r, int) or r < 1:
                raise _Bad(f"ranks[{i}]", f"expected an integer >= 1, got {json.dumps(r)}")
        if len(set(ranks)) < 2:
            raise _Bad("ranks", "all responses are tied: nothing to learn from")
        return Comparison(msgs, responses, list(ranks), _ended(row, len(responses)))
    chosen, rejected = _text(row, "chosen"), _text(row, "rejected")
    return Comparison(msgs, [chosen, rejected], [1, 2])


def _ended(row: dict, k: int) -> list[bool] | None:
    """The optional `ended` list that `instruct sample` writes: which responses ended on their own."""
    if "ended" not in row:
        return None
    v = row["ended"]
    if not isinstance(v, list) or len(v) != k or not all(isinstance(x, bool) for x in v):
        raise _Bad("ended", f"expected an array of {k} booleans (one per response), got {json.dumps(v)[:60]}")
    return list(v)


def parse_prompt(row: dict, index: int) -> Prompt:
    msgs = _prompt_messages(row)
    rid = row.get("id", index)
    if not isinstance(rid, (str, int)) or isinstance(rid, bool):
        raise _Bad("id", f"expected a string or integer, got {_type_name(rid)}")
    return Prompt(str(rid), msgs)


def parse_text(row: dict) -> Text:
    return Text(_text(row, "text"))


def parse_mc(row: dict, index: int) -> MultipleChoice:
    question = _text(row, "question")
    choices = _str_list(row, "choices", 2)
    if len(set(choices)) < len(choices):
        raise _Bad("choices", "two choices are the same text")
    if "correct" not in row:
        raise _Bad("correct", "missing")
    c = row["correct"]
    if isinstance(c, bool) or not isinstance(c, int) or not 0 <= c < len(choices):
        raise _Bad("correct", f"expected the 0-based index of the true choice (0 to {len(choices) - 1}), "
                              f"got {json.dumps(c)}")
    rid = row.get("id", index)
    if not isinstance(rid, (str, int)) or isinstance(rid, bool):
        raise _Bad("id", f"expected a string or integer, got {_type_name(rid)}")
    return MultipleChoice(str(rid), question, choices, c)


def parse_sample(row: dict, index: int) -> Sample:
    known = {"id", "prompt", "responses", "model", "messages"}
    msgs = _messages(row, last="user") if "messages" in row else None
    prompt = _text(row, "prompt")
    responses = _str_list(row, "responses", 1, allow_empty=True)  # a model may well answer nothing
    model = row.get("model", "")
    if not isinstance(model, str):
        raise _Bad("model", f"expected a string, got {_type_name(model)}")
    rid = row.get("id", index)
    if not isinstance(rid, (str, int)) or isinstance(rid, bool):
        raise _Bad("id", f"expected a string or integer, got {_type_name(rid)}")
    _ended(row, len(responses))
    return Sample(str(rid), prompt, responses, model, msgs, {k: v for k, v in row.items() if k not in known})


# index = 1-based row number among the valid rows, used as the default id
PARSERS: dict[str, Callable[[dict, int], Any]] = {
    "demonstrations": lambda row, i: parse_demonstration(row),
    "comparisons": lambda row, i: parse_comparison(row),
    "prompts": parse_prompt,
    "pretraining": lambda row, i: parse_text(row),
    "samples": parse_sample,
    "mc": parse_mc,
}


# ---------------------------------------------------------------------------------------------- files
def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def _read_bytes(path: str) -> bytes:
    if path == "-":
        return sys.stdin.buffer.read()
    if not os.path.exists(path):
        raise InstructError(f"{path}: no such file", 2)
    if os.path.isdir(path):
        raise InstructError(f"{path}: is a directory, expected a JSONL file", 2)
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise InstructError(f"{path}: cannot read: {e.strerror}", 2) from None


def iter_rows(path: str, data: bytes) -> Iterator[tuple[int, dict | DataError]]:
    """Yield (line number, parsed object or the error for that line); blank lines are skipped."""
    name = "<stdin>" if path == "-" else path
    for lineno, raw in enumerate(data.split(b"\n"), start=1):
        if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
            raw = raw[3:]  # UTF-8 byte-order mark
        raw = raw.rstrip(b"\r")
        if not raw.strip():
            continue
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            yield lineno, DataError(name, lineno, None, f"invalid UTF-8 at byte {e.start}")
            continue
        try:
            obj = json.loads(line, parse_constant=_reject_constant)
        except RecursionError:
            yield lineno, DataError(name, lineno, None, "invalid JSON: nested too deeply")
            continue
        except ValueError as e:
            yield lineno, DataError(name, lineno, None, f"invalid JSON: {e}")
            continue
        if not isinstance(obj, dict):
            yield lineno, DataError(name, lineno, None, f"expected a JSON object, got {_type_name(obj)}")
            continue
        yield lineno, obj


def load(path: str, kind: str, skip_invalid: bool = False, warn: Callable[[str], None] | None = None) -> Loaded:
    """Read and validate a whole JSONL file of one row kind. Raises DataError/InstructError (exit 2)."""
    parse = PARSERS[kind]
    if str(path) == "-":
        from instructcli import parallel

        if parallel.world > 1:  # every process would read the one pipe, each getting part of it or nothing
            raise InstructError("-: stdin cannot be shared by the processes of a launcher; give a file", 2)
    data = _read_bytes(str(path))
    name = "<stdin>" if path == "-" else str(path)
    records, skipped = [], 0
    for lineno, obj in iter_rows(str(path), data):
        if isinstance(obj, dict):
            try:
                records.append(parse(obj, len(records) + 1))
                continue
            except _Bad as bad:
                obj = DataError(name, lineno, bad.field, bad.problem)
            except RecursionError:
                obj = DataError(name, lineno, None, "nested too deeply")
        if not skip_invalid:
            raise obj
        skipped += 1
        if warn:
            warn(f"skipped {obj}")
    if not records:
        why = "no valid rows" if skipped else "empty file, expected JSONL rows"
        raise DataError(name, None, None, f"{why} ({kind})")
    return Loaded(records, name, hashlib.sha256(data).hexdigest(), len(records), skipped)


def is_finite_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)

# ------------------------------------------------------------------------------------ split and order
def split(n: int, eval_frac: float, seed: int) -> tuple[list[int], list[int]]:
    """Held-out split fixed by the seed: (train indices, eval indices); eval never takes every row."""
    import torch

    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    n_eval = min(n - 1, round(n * eval_frac)) if eval_frac > 0 else 0
    return order[n_eval:], order[:n_eval]
