"""`instruct data`: what a source will be read as, before any training: the schema recognised, the rows, K for
rankings, and the first row as the model will see it (rendered through the tokenizer's chat template)."""

from __future__ import annotations

from collections import Counter

from instructcli import console, data, models, sources
from instructcli.config import DATA_KINDS, DataConfig


def _first(kind: str, rec) -> list[dict] | str:
    """The first record as the conversation the model reads (or the text, for pretraining rows)."""
    if kind == "demonstrations":
        return rec.messages
    if kind == "comparisons":
        return rec.messages + [{"role": "assistant", "content": rec.responses[0]}]
    if kind == "prompts":
        return rec.messages
    return rec.text


def run(cfg: DataConfig) -> str:
    kind = DATA_KINDS[cfg.kind]
    loaded = data.load(cfg.path, kind, cfg.skip_invalid, console.warn, cfg.columns, cfg.split)
    found = ", ".join(f"{name} ({n})" for name, n in sorted(loaded.schemas.items(), key=lambda x: -x[1]))
    lines = [f"{loaded.path}: {loaded.format}, {loaded.rows} rows read as {cfg.kind} ({kind})"
             + (f", {loaded.skipped} invalid skipped" if loaded.skipped else ""),
             f"schema: {found}"]
    recs = loaded.records
    if kind == "comparisons":
        ks = Counter(len(r.responses) for r in recs)
        pairs = sum(sum(a != b for i, a in enumerate(r.ranks) for b in r.ranks[i + 1:]) for r in recs)
        lines.append("K: " + ", ".join(f"{k} ({n} rows)" for k, n in sorted(ks.items()))
                     + f"; {pairs} untied pairs")
    elif kind in ("demonstrations", "prompts"):
        turns = Counter(len(r.messages) for r in recs)
        lines.append("messages per row: " + ", ".join(f"{k} ({n})" for k, n in sorted(turns.items())))
    first = _first(kind, recs[0])
    if isinstance(first, str):
        lines += ["first row:", first]
    else:
        tok = models.load_tokenizer(sources.resolve(cfg.model.model, console.log), cfg.model.trust_remote_code)
        rendered = tok.apply_chat_template(first, tokenize=False, add_generation_prompt=kind == "prompts")
        lines += [f"first row, through {cfg.model.model}'s chat template:", rendered.rstrip("\n")]
    return "\n".join(lines)
