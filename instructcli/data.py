"""The only place that reads user data.

JSONL rows -> validated records, with every problem reported as `path:line: field: problem`; chat templates
via the tokenizer; response-only label masks; padding. Row formats are those of ARCHITECTURE.md.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any, Callable

from instructcli import readers, schemas
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
class ClosedTask:
    """A closed-domain task (summarise, extract, answer from the text): the answer should use only `input`."""

    id: str
    task: str  # summarization, extraction, closed_qa, ... (reported per task)
    instruction: str
    input: str
    answerable: bool | None = None  # closed_qa: False when the input does not hold the answer

    @property
    def prompt(self) -> str:
        return f"{self.instruction}\n\n{self.input}"


@dataclass
class BiasPair:
    """A CrowS-Pairs minimal pair: `more` is the more stereotyping sentence (its convention, also for
    anti-stereotype rows), `less` the same sentence about another group."""

    id: str
    more: str
    less: str
    bias_type: str
    direction: str  # stereo | antistereo


@dataclass
class PronounSlot:
    """A Winogender-style sentence whose `{pronoun}` slot refers to an occupation or another participant."""

    id: str
    sentence: str  # holds "{pronoun}" once
    occupation: str
    pronoun_type: str  # nominative | accusative | possessive
    refers_to: str  # occupation | participant | "" (unknown)


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
    format: str = "JSONL"  # what the source was (readers.Rows.format)
    schemas: dict = field(default_factory=dict)  # schema name -> rows read in it (schemas.recognise)

    def describe(self) -> dict:
        return {"path": self.path, "sha256": self.sha256, "rows": self.rows, "skipped": self.skipped,
                "format": self.format, "schemas": self.schemas}


# ----------------------------------------------------------------------------------------- field checks
_Bad = schemas.Bad  # a row's problem: (field, problem), reported with the row's place
_type_name = readers.type_name


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
    return Prompt(_id(row, index), msgs)


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
    return MultipleChoice(_id(row, index), question, choices, c)


def parse_sample(row: dict, index: int) -> Sample:
    known = {"id", "prompt", "responses", "model", "messages"}
    msgs = _messages(row, last="user") if "messages" in row else None
    prompt = _text(row, "prompt")
    responses = _str_list(row, "responses", 1, allow_empty=True)  # a model may well answer nothing
    model = row.get("model", "")
    if not isinstance(model, str):
        raise _Bad("model", f"expected a string, got {_type_name(model)}")
    rid = _id(row, index)
    _ended(row, len(responses))
    return Sample(rid, prompt, responses, model, msgs, {k: v for k, v in row.items() if k not in known})


def _id(row: dict, index: int) -> str:
    rid = row.get("id", index)
    if not isinstance(rid, (str, int)) or isinstance(rid, bool):
        raise _Bad("id", f"expected a string or integer, got {_type_name(rid)}")
    return str(rid)


def _choice(row: dict, key: str, allowed: tuple[str, ...], default: str) -> str:
    v = row.get(key, default)
    if v not in allowed:
        raise _Bad(key, f"expected one of {', '.join(allowed)}, got {json.dumps(v)}")
    return v


def parse_closed(row: dict, index: int) -> ClosedTask:
    instruction, text = _text(row, "instruction"), _text(row, "input")
    task = row.get("task", "closed")
    if not isinstance(task, str) or not task.strip():
        raise _Bad("task", f"expected a task name, got {json.dumps(task)}")
    answerable = row.get("answerable")
    if answerable is not None and not isinstance(answerable, bool):
        raise _Bad("answerable", f"expected true or false, got {json.dumps(answerable)}")
    return ClosedTask(_id(row, index), task.strip(), instruction, text, answerable)


PRONOUNS = {"nominative": ("he", "she", "they"), "accusative": ("him", "her", "them"),
            "possessive": ("his", "her", "their")}
# the published Winogender templates (templates.tsv): placeholders for the two nouns and the pronoun
WINOGENDER_SLOTS = {"$NOM_PRONOUN": "nominative", "$ACC_PRONOUN": "accusative", "$POSS_PRONOUN": "possessive"}


def _winogender_template(row: dict, index: int) -> PronounSlot:
    occupation, participant = _text(row, "occupation(0)"), _text(row, "other-participant(1)")
    sentence = _text(row, "sentence")
    slots = [k for k in WINOGENDER_SLOTS if k in sentence]
    if len(slots) != 1 or sentence.count(slots[0]) != 1:
        raise _Bad("sentence", "expected exactly one of $NOM_PRONOUN, $ACC_PRONOUN, $POSS_PRONOUN")
    answer = str(row.get("answer", "")).strip()
    refers = {"0": "occupation", "1": "participant"}.get(answer, "")
    text = sentence.replace("$OCCUPATION", occupation).replace("$PARTICIPANT", participant)
    return PronounSlot(_id(row, index), text.replace(slots[0], "{pronoun}"), occupation, WINOGENDER_SLOTS[slots[0]],
                       refers)


def parse_bias(row: dict, index: int) -> BiasPair | PronounSlot:
    """A CrowS-Pairs row (`sent_more`, `sent_less`, as published in its CSV, or JSONL) or a Winogender-style
    row (`sentence` with one `{pronoun}`, `occupation`; or a line of the published templates.tsv)."""
    if "occupation(0)" in row:
        return _winogender_template(row, index)
    if "sentence" in row:
        sentence = _text(row, "sentence")
        if sentence.count("{pronoun}") != 1:
            raise _Bad("sentence", 'expected exactly one "{pronoun}" slot')
        occupation = _text(row, "occupation")
        ptype = _choice(row, "pronoun_type", tuple(PRONOUNS), "nominative")
        refers = _choice(row, "refers_to", ("occupation", "participant", ""), "")
        return PronounSlot(_id(row, index), sentence, occupation, ptype, refers)
    if "sent_more" not in row and "sent_less" not in row:
        raise _Bad("sent_more", "missing (a bias row is a CrowS-Pairs pair or a Winogender-style sentence)")
    more, less = _text(row, "sent_more"), _text(row, "sent_less")
    if more.strip() == less.strip():
        raise _Bad("sent_less", "the same sentence as sent_more")
    bias_type = row.get("bias_type") or "unspecified"
    if not isinstance(bias_type, str):
        raise _Bad("bias_type", f"expected a string, got {_type_name(bias_type)}")
    direction = _choice(row, "stereo_antistereo", ("stereo", "antistereo"), "stereo")
    return BiasPair(_id(row, index), more, less, bias_type, direction)


# index = 1-based row number among the valid rows, used as the default id
PARSERS: dict[str, Callable[[dict, int], Any]] = {
    "demonstrations": lambda row, i: parse_demonstration(row),
    "comparisons": lambda row, i: parse_comparison(row),
    "prompts": parse_prompt,
    "pretraining": lambda row, i: parse_text(row),
    "samples": parse_sample,
    "mc": parse_mc,
    "closed": parse_closed,
    "bias": parse_bias,
}


# ---------------------------------------------------------------------------------------------- files
def load(path: str, kind: str, skip_invalid: bool = False, warn: Callable[[str], None] | None = None,
         columns: str = "", split: str = "train") -> Loaded:
    """Read and validate a whole source of one row kind: a JSONL file (or `-`), CSV/TSV, parquet, JSON,
    arrow, a `save_to_disk` dir or a hub dataset id (readers.py), in our layout or a known public one
    (schemas.py), with `columns` ("ours=theirs,...") renamed first. Raises DataError/InstructError (exit 2)."""
    parse = PARSERS[kind]
    if str(path) == "-":
        from instructcli import parallel

        if parallel.world > 1:  # every process would read the one pipe, each getting part of it or nothing
            raise InstructError("-: stdin cannot be shared by the processes of a launcher; give a file", 2)
    try:
        mapping = schemas.parse_columns(columns)
    except ValueError as e:
        raise InstructError(str(e), 2) from None
    src = readers.open_rows(str(path), split)
    records, skipped, found = [], 0, {}
    for where, obj in src.rows:
        if isinstance(obj, dict):
            try:
                name, row = schemas.recognise(schemas.rename(obj, mapping), kind)
                records.append(parse(row, len(records) + 1))
                found[name] = found.get(name, 0) + 1
                continue
            except _Bad as bad:
                hint = f" (--columns reads it from {mapping[bad.field]})" if bad.field in mapping else ""
                obj = DataError(src.name, where, bad.field, bad.problem + hint)
            except RecursionError:
                obj = DataError(src.name, where, None, "nested too deeply")
        if not skip_invalid:
            raise obj
        skipped += 1
        if warn:
            warn(f"skipped {obj}")
    if not records:
        why = "no valid rows" if skipped else f"empty {'file' if src.format in ('JSONL', 'CSV', 'TSV') else 'dataset'}"
        raise DataError(src.name, None, None, f"{why} ({kind})")
    return Loaded(records, src.name, src.sha256, len(records), skipped, src.format, found)


def is_finite_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)

# ------------------------------------------------------------------------------------ split and order
def split(n: int, eval_frac: float, seed: int) -> tuple[list[int], list[int]]:
    """Held-out split fixed by the seed: (train indices, eval indices); eval never takes every row."""
    import torch

    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    n_eval = min(n - 1, round(n * eval_frac)) if eval_frac > 0 else 0
    return order[n_eval:], order[:n_eval]


def load_all(paths: str, kind: str, skip_invalid: bool = False, warn: Callable[[str], None] | None = None,
             columns: str = "", split: str = "train") -> Loaded:
    """Several sources of one row kind, given comma-separated (e.g. a CrowS-Pairs CSV and Winogender's TSV),
    read as one: the records in order, one sha256 over the sources' sums."""
    parts = [load(p.strip(), kind, skip_invalid, warn, columns, split) for p in paths.split(",") if p.strip()]
    if len(parts) == 1:
        return parts[0]
    digest = hashlib.sha256("".join(p.sha256 for p in parts).encode()).hexdigest()
    return Loaded([r for p in parts for r in p.records], ",".join(p.path for p in parts), digest,
                  sum(p.rows for p in parts), sum(p.skipped for p in parts))


def load_option(cfg, path: str, kind: str, warn: Callable[[str], None] | None = None) -> Loaded | None:
    """A command's optional input (None when the flag is not given), read with its --skip-invalid, --columns and
    --split; bias files may be several, comma-separated (a CrowS-Pairs CSV and Winogender's TSV)."""
    if not path:
        return None
    read = load_all if kind == "bias" else load
    return read(path, kind, cfg.skip_invalid, warn, cfg.columns, cfg.split)
