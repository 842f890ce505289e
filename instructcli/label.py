"""Ranking K responses per prompt, as the InstructGPT labelers did: by a person in the terminal or by a judge.

`run(samples, out)` shows each `samples` row (the prompt or chat, then responses 1..K) on stderr and reads
one answer per line: the response numbers best first, `=` joining ties (`2=1 4 3`), or `s` (skip),
`u` (undo), `q` (quit; end of input quits too). Ranks are *dense*: in `2=1 4 3`, responses 2 and 1 get
rank 1, response 4 rank 2, response 3 rank 3, so the row's `ranks` (per response) is `[1, 1, 3, 2]`.
A ranking with every response tied teaches nothing; it is refused and asked again, like any other malformed
answer.

Files:
- `OUT` holds one K-way comparisons row per answer, `{"prompt", "responses", "ranks", "id"}` (+ `"messages"`
  for chat samples), readable by `data.load(OUT, "comparisons")`. Each answer is appended and fsynced at
  once, so quitting, Ctrl-C or a crash loses nothing.
- `OUT.skipped` holds the ids of skipped samples, one JSON value per line, so they are not asked again.
  Delete it to be asked about them again.
- Resuming: a later run with the same OUT continues at the first sample whose id is in neither file.
  An OUT that is not a valid comparisons file written by `label` (every row has an `id`) is an error.
- Undo (`u`) takes back the latest answer of this run (a ranking or a skip: its line is removed, the file
  rewritten atomically) and shows that sample again; with nothing answered in this run yet, it takes back
  the last row of OUT (the previous run's last ranking). After the last sample, a run that answered
  anything asks once more (`u` or `q`), so the last answer can be fixed too.

Judge mode (`judge=callable(sample) -> scores`, higher = better) ranks by score (equal scores tie); with
`noise > 0`, each adjacent pair of the best-to-worst order is swapped with probability `noise` in one
left-to-right pass, like a simulated labeler. Its random stream is `random.Random(f"{seed}:{id}")` per
sample, so a resumed run writes exactly the rows an uninterrupted one would. A judge that scores every
response the same leaves nothing to rank: the sample is skipped (recorded in `OUT.skipped`) with a warning.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import sys
from typing import Callable, Sequence

from rich.console import Console
from rich.panel import Panel
from rich.text import Text

from instructcli import data, files, readers
from instructcli.errors import DataError, InstructError

SKIPPED_SUFFIX = ".skipped"


# ------------------------------------------------------------------------------------------ pure ranking
def parse_ranking(text: str, k: int, allow_all_tied: bool = False) -> list[int]:
    """`"2=1 4 3"` -> dense ranks per response, `[1, 1, 3, 2]` (1 = best). ValueError says what is wrong."""
    s = re.sub(r"\s*=\s*", "=", text.replace(",", " ").strip())
    if not s:
        raise ValueError(f"no ranking given: write the {k} response numbers best first")
    groups: list[list[int]] = []
    for tok in s.split():
        parts = tok.split("=")
        if "" in parts:
            raise ValueError(f'"{tok}": "=" must join two response numbers, e.g. "2=1"')
        nums = []
        for p in parts:
            if not (p.isascii() and p.isdigit()):
                raise ValueError(f'"{p}" is not a response number (1 to {k})')
            nums.append(int(p))
        groups.append(nums)
    seen: set[int] = set()
    for n in (n for g in groups for n in g):
        if not 1 <= n <= k:
            raise ValueError(f"response {n} does not exist (K = {k})")
        if n in seen:
            raise ValueError(f"response {n} appears twice")
        seen.add(n)
    missing = [n for n in range(1, k + 1) if n not in seen]
    if len(missing) == 1:
        raise ValueError(f"response {missing[0]} is missing")
    if missing:
        listed = ", ".join(map(str, missing[:-1])) + f" and {missing[-1]}"
        raise ValueError(f"responses {listed} are missing")
    if len(groups) < 2 and not allow_all_tied:
        raise ValueError("all responses are tied: nothing to learn from")
    ranks = [0] * k
    for rank, group in enumerate(groups, start=1):
        for n in group:
            ranks[n - 1] = rank
    return ranks


def ranks_from_scores(scores: Sequence[float]) -> list[int]:
    """Dense ranks, 1 = highest score; equal scores share a rank: [0.5, 2, 0.5, 1] -> [3, 1, 3, 2]."""
    for s in scores:
        if not data.is_finite_number(s):
            raise ValueError(f"scores must be finite numbers, got {s!r}")
    order = sorted(set(scores), reverse=True)
    rank_of = {v: i + 1 for i, v in enumerate(order)}
    return [rank_of[s] for s in scores]


def add_noise(ranks: Sequence[int], p: float, rng: random.Random) -> list[int]:
    """One left-to-right pass over the best-to-worst order (ties by response index), swapping each adjacent
    pair with probability p; the rank values stay in their places, the responses move. p = 0 is the identity;
    p = 1 moves the best response to the end: [1, 2, 3, 4] -> [4, 1, 2, 3]. One rng draw per pair."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"noise must be in [0, 1], got {p}")
    order = sorted(range(len(ranks)), key=lambda i: (ranks[i], i))
    slots = [ranks[i] for i in order]
    for j in range(len(order) - 1):
        if rng.random() < p:
            order[j], order[j + 1] = order[j + 1], order[j]
    out = [0] * len(ranks)
    for slot, i in zip(slots, order):
        out[i] = slot
    return out


# ---------------------------------------------------------------------------------------------- files
def _append_line(path: str, line: str) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(line + "\n")
        f.flush()
        os.fsync(f.fileno())


def _drop_last_line(path: str) -> str | None:
    """Remove the last non-blank line (atomically: temp sibling + os.replace); returns it, or None."""
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    if not lines:
        return None
    last = lines.pop()
    files.atomic_write_text(path, "".join(line + "\n" for line in lines), mode_of=path)
    return last


def _read_text(path: str) -> str | None:
    if not os.path.exists(path):
        return None
    if os.path.isdir(path):
        raise InstructError(f"{path}: is a directory, expected a JSONL file", 2)
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise InstructError(f"{path}: cannot read: {e.strerror}", 2) from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InstructError(f"{path}: invalid UTF-8 at byte {e.start}", 2) from None


def _labeled_ids(out: str, strict: bool = True) -> list[str]:
    """Ids of the rows already in OUT, in file order; the file must be valid comparisons with ids (with
    `strict` off, all-tied rankings are allowed: compare's pairs)."""
    text = _read_text(out)
    if text is None or not text.strip():
        return []
    if strict:
        data.load(out, "comparisons")  # raises `out:line: field: problem`
    ids = []
    for lineno, obj in readers.jsonl_rows(out, text.encode("utf-8")):
        rid = obj.get("id") if isinstance(obj, dict) else None
        if rid is None or isinstance(rid, bool) or not isinstance(rid, (str, int)):
            problem = "missing" if rid is None else "expected a string or integer"
            raise DataError(out, lineno, "id", f"{problem} (every row `label` writes has one; is this the "
                                               f"right output file?)")
        ids.append(str(rid))
    if not text.endswith("\n"):
        _append_line(out, "")  # so the next row starts on a line of its own
    return ids


def _skipped_ids(path: str) -> set[str]:
    text = _read_text(path)
    out: set[str] = set()
    for lineno, line in enumerate((text or "").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rid = json.loads(line)
        except ValueError:
            rid = None
        if isinstance(rid, bool) or not isinstance(rid, (str, int)):
            raise DataError(path, lineno, None, "expected a sample id (a JSON string) per line")
        out.add(str(rid))
    if text and not text.endswith("\n"):
        _append_line(path, "")
    return out


def _row(sample: data.Sample, ranks: list[int]) -> dict:
    row = {"prompt": sample.prompt, "responses": list(sample.responses), "ranks": ranks, "id": sample.id}
    if "ended" in sample.extra:  # so the reward model sees which answers were cut off, as PPO's scores do
        row["ended"] = sample.extra["ended"]
    if sample.messages:
        row["messages"] = sample.messages
    return row


# -------------------------------------------------------------------------------------------- display
def _show(con: Console, sample: data.Sample, n: int, total: int) -> None:
    title = f"sample {n} of {total} · id {sample.id}" + (f" · {sample.model}" if sample.model else "")
    con.rule(Text(title, style="bold"))
    turns = sample.messages or [{"role": "user", "content": sample.prompt}]
    for m in turns:
        style = {"system": "magenta", "user": "cyan", "assistant": "blue"}[m["role"]]
        name = "prompt" if m["role"] == "user" and len(turns) == 1 else m["role"]
        con.print(Panel(Text(m["content"]), title=name, title_align="left", border_style=style))
    for i, r in enumerate(sample.responses, start=1):
        body = Text(r) if r.strip() else Text("(empty response)", style="dim italic")
        con.print(Panel(body, title=f"response {i}", title_align="left", border_style="green"))


def _ask(k: int) -> str:
    if k >= 3:
        best, ties = " ".join(["2", "1"] + [str(i) for i in range(3, k + 1)]), "2=1 " + " ".join(
            str(i) for i in range(3, k + 1))
        example = f'e.g. "{best}", ties "{ties}"'
    else:
        example = 'e.g. "2 1"'
    return f"rank (best first, {example}), s=skip, u=undo, q=quit: "


def _read_line(stream, con: Console, prompt: str) -> str | None:
    """One answer line, or None at end of input."""
    con.print(prompt, end="", markup=False, highlight=False, style="bold", soft_wrap=True)
    con.file.flush()
    if stream is sys.stdin and sys.stdin.isatty() and sys.stdout.isatty():
        try:
            import readline  # noqa: F401  (line editing for input())
        except ImportError:
            pass
        try:
            return input()
        except EOFError:
            return None
    line = stream.readline()
    if line == "":
        return None
    line = line.rstrip("\r\n")
    isatty = getattr(stream, "isatty", None)
    if not (isatty and isatty()):
        con.print(line, markup=False, highlight=False, soft_wrap=True)  # piped: echo it, as a terminal does
    return line


# ------------------------------------------------------------------------------------------------ run
def parse_yes_no(text: str) -> bool:
    t = text.strip().lower()
    if t in ("y", "yes"):
        return True
    if t in ("n", "no"):
        return False
    raise ValueError("answer y (yes) or n (no)")


def run(samples_path: str, out_path: str, judge: Callable[[data.Sample], Sequence[float]] | None = None,
        noise: float = 0.0, seed: int = 0, input_stream=None, output_console: Console | None = None,
        allow_all_tied: bool = False, question: str | None = None) -> dict:
    """Label `samples_path` into `out_path` (appending, resuming); see the module docstring.

    Returns {"labeled", "skipped", "already", "total", "out", "remaining", "unrankable"}: rows written and
    samples skipped in this run (net of undos), samples labeled before it, rankable samples (>= 2 responses),
    the output path, rankable samples neither labeled nor skipped now, and samples with fewer than 2 responses.
    `allow_all_tied` accepts a ranking that ties everything (compare's blind pairs: a tie is an answer there).
    `question`: instead of a ranking, a yes/no question about each sample's one response (eval's
    hallucination check by a person); rows are then `{"id", "prompt", "response", "question", "answer"}`
    with answer "yes" or "no", resumed and undone the same way.
    """
    con = output_console or Console(stderr=True, highlight=False)

    def say(msg: str, style: str | None = None) -> None:  # one line, never rich markup
        con.print(msg, style=style, markup=False, highlight=False, soft_wrap=True)

    def warn(msg: str) -> None:
        say(f"warning: {msg}", "yellow")

    if not 0.0 <= noise <= 1.0 or math.isnan(noise):
        raise InstructError(f"noise must be in [0, 1], got {noise}", 2)
    if question and judge is not None:
        raise InstructError("a yes/no question is for a person; a judge ranks", 2)
    if noise and judge is None:
        raise InstructError("noise applies to a judge's rankings only; a person ranking needs none", 2)
    out = str(out_path)
    if out == "-":
        raise InstructError("label writes to a file it can resume from; give a path, not -", 2)
    if os.path.isdir(out):
        raise InstructError(f"{out}: is a directory, expected an output file", 2)
    folder = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(folder):
        raise InstructError(f"{out}: the folder {folder} does not exist", 2)
    if judge is None and input_stream is None and str(samples_path) == "-":
        raise InstructError("samples from stdin leave no stdin for the answers; give the samples as a file", 2)

    loaded = data.load(samples_path, "samples", warn=warn)
    rankable: list[data.Sample] = []
    seen_ids: set[str] = set()
    unrankable = 0
    for s in loaded.records:
        if question and len(s.responses) != 1:
            warn(f"sample {s.id} has {len(s.responses)} responses: the question is about one, skipped")
            unrankable += 1
        elif not question and len(s.responses) < 2:
            warn(f"sample {s.id} has {len(s.responses)} response: nothing to rank, skipped")
            unrankable += 1
        elif s.id in seen_ids:
            warn(f"sample id {s.id} appears more than once in {loaded.path}; only the first is labeled")
            unrankable += 1
        else:
            seen_ids.add(s.id)
            rankable.append(s)

    skipped_path = out + SKIPPED_SUFFIX
    done = set(_labeled_ids(out, strict=not allow_all_tied and not question))
    skipped = _skipped_ids(skipped_path)
    total = len(rankable)
    before = {s.id for s in rankable if s.id in done}  # labeled by an earlier run (less what undo took back)
    already = len(before)
    stats = {"labeled": 0, "skipped": 0}
    if already or skipped:
        n_skip = sum(s.id in skipped for s in rankable)
        say(f"resuming {out}: {already} of {total} samples already labeled, {n_skip} skipped")

    def summary() -> dict:
        left = sum(s.id not in done and s.id not in skipped for s in rankable)
        return {**stats, "already": len(before), "total": total, "out": out, "remaining": left,
                "unrankable": unrankable}

    def write(sample: data.Sample, ranks: list[int] | bool) -> None:
        row = (_row(sample, ranks) if not question else
               {"id": sample.id, "prompt": sample.prompt, "response": sample.responses[0], "question": question,
                "answer": "yes" if ranks else "no"})
        _append_line(out, json.dumps(row, ensure_ascii=False))
        done.add(sample.id)
        stats["labeled"] += 1

    def skip(sample: data.Sample) -> None:
        _append_line(skipped_path, json.dumps(sample.id, ensure_ascii=False))
        skipped.add(sample.id)
        stats["skipped"] += 1

    # ---- judge mode: no input, the same files
    if judge is not None:
        for s in rankable:
            if s.id in done or s.id in skipped:
                continue
            scores = list(judge(s))
            if len(scores) != len(s.responses) or not all(data.is_finite_number(x) for x in scores):
                raise InstructError(f"the judge gave {scores!r} for sample {s.id}: expected {len(s.responses)} "
                                    f"finite numbers, one per response", 1)
            ranks = ranks_from_scores(scores)
            if noise > 0:
                ranks = add_noise(ranks, noise, random.Random(f"{seed}:{s.id}"))
            if len(set(ranks)) < 2:
                warn(f"sample {s.id}: the judge scored every response the same; nothing to rank, skipped")
                skip(s)
                continue
            write(s, ranks)
        return summary()

    # ---- human mode
    stream = input_stream if input_stream is not None else sys.stdin
    by_id = {s.id: s for s in rankable}
    history: list[tuple[str, str]] = []  # ("label" | "skip", id), this run's answers, for undo
    forced: str | None = None  # the sample an undo went back to
    while True:
        pending = [s for s in rankable if s.id not in done and s.id not in skipped]
        if not pending:
            say(f"all {total} samples are labeled or skipped; the rows are in {out}")
            if not history:
                return summary()
            sample, prompt = None, "u=undo the last answer, q=quit: "  # a last chance to fix the last answer
        else:
            sample = by_id[forced] if forced in by_id and forced not in done | skipped else pending[0]
            forced = None
            prompt = f"{question} y=yes, n=no, s=skip, u=undo, q=quit: " if question else _ask(len(sample.responses))
            _show(con, sample, total - len(pending) + 1, total)
        while True:
            line = _read_line(stream, con, prompt)
            if line is None:
                con.print()
                return summary()
            cmd = line.strip().lower()
            if cmd in ("q", "quit"):
                return summary()
            if sample is None and cmd not in ("u", "undo"):
                say("invalid answer: nothing is left to rank; u=undo or q=quit", "red")
                continue
            if cmd in ("s", "skip"):
                skip(sample)
                history.append(("skip", sample.id))
                break
            if cmd in ("u", "undo"):
                undone = _undo(out, skipped_path, history, done, skipped, stats, before)
                if undone is None:
                    say("nothing to undo", "red")
                    continue
                say(f"undone: sample {undone}")
                forced = undone
                break
            try:
                ranks = parse_yes_no(line) if question else parse_ranking(line, len(sample.responses),
                                                                           allow_all_tied)
            except ValueError as e:
                say(f"invalid answer: {e}", "red")
                continue
            write(sample, ranks)
            history.append(("label", sample.id))
            break


def _undo(out: str, skipped_path: str, history: list[tuple[str, str]], done: set[str], skipped: set[str],
          stats: dict, before: set[str]) -> str | None:
    """Take back this run's latest answer, or else OUT's last row; returns the sample id, or None."""
    if history:
        kind, rid = history.pop()
        if kind == "skip":
            _drop_last_line(skipped_path)
            skipped.discard(rid)
            stats["skipped"] -= 1
        else:
            _drop_last_line(out)
            done.discard(rid)
            stats["labeled"] -= 1
        return rid
    last = _drop_last_line(out)
    if last is None:
        return None
    rid = str(json.loads(last)["id"])
    done.discard(rid)
    before.discard(rid)
    return rid
