"""`instruct compare`: the win rate of each model against the first, ties counted half, with a bootstrap 95 %
confidence interval; judged by a reward model, a rule, or a person (blind pairs in the label UI)."""

from __future__ import annotations

import json
import random
from pathlib import Path

from instructcli import console, data, files, generate, judge, label, loop, models, sources, stats, tokens
from instructcli.config import CompareConfig, ModelConfig
from instructcli.errors import InstructError


def _generate_answers(spec: str, prompts: data.Loaded, cfg: CompareConfig) -> tuple[dict[str, str], dict[str, bool]]:
    """id -> the model's one answer to each of --prompts (every model with the same seed), and id -> whether
    it ended on its own (False: cut off at --max-new-tokens)."""
    source = sources.resolve(spec, console.log)
    tok = models.load_tokenizer(source)
    device = models.pick_device()
    model = models.inference_model(source, ModelConfig(model=spec, quant=cfg.quant, dtype=cfg.dtype), device)
    _, outs = generate.answer_prompts(model, tok, prompts, 1, cfg, cfg.seed, device, f"compare: {spec}")
    out = {p.id: tok.decode(o[0], skip_special_tokens=True).strip() for p, o in zip(prompts.records, outs)}
    ended = {p.id: tokens.ended(tok, o[0]) for p, o in zip(prompts.records, outs)}
    model = None
    loop.free_memory()
    return out, ended


def compare(cfg: CompareConfig) -> dict:
    if cfg.out == "-":
        raise InstructError("--out: compare writes per-prompt rows to a file (stdout carries the JSON summary)", 2)
    files.check_output_file(cfg.out)
    with files.Lock(cfg.out, "--out"):  # one writer of --out (and of its .pairs/.labels files)
        return _compare(cfg)


def _compare(cfg: CompareConfig) -> dict:
    console.set_quiet(cfg.quiet)
    if len(cfg.items) < 2:
        raise InstructError("compare needs at least two models or samples files (the first is the baseline)", 2)
    if len(set(cfg.items)) < len(cfg.items):
        raise InstructError("compare: an item is given twice; each model or samples file once", 2)
    files.check_output_file(cfg.out)
    # everything that can be refused is checked before any model spends time answering
    if cfg.judge.startswith("rm:"):
        sources.require_rm(sources.resolve(cfg.judge[3:], console.log), "--judge")
    elif ".py:" in cfg.judge:
        judge.load_rule(cfg.judge)
    elif cfg.judge != "human":
        raise InstructError(f"--judge {cfg.judge}: expected rm:DIR, path/rule.py:function or human", 2)
    prompts = data.load(cfg.prompts, "prompts", cfg.skip_invalid, console.warn) if cfg.prompts else None
    samples: dict[str, data.Loaded] = {}
    for spec in cfg.items:
        if Path(spec).is_file() or spec == "-":
            samples[spec] = data.load(spec, "samples", cfg.skip_invalid, console.warn)
            continue
        if "/" in spec and not Path(spec).exists() and Path(spec).parent.is_dir():  # a typo, not a hub id
            raise InstructError(f"{spec}: no such model dir or samples file", 2)
        sources.refuse_reward_model(sources.resolve(spec, console.log))
        if prompts is None:
            raise InstructError(f"{spec}: a model needs --prompts to answer (or give a samples file)", 2)
    if prompts is not None:
        ids = [p.id for p in prompts.records]
        text = {p.id: (p.prompt, p.messages) for p in prompts.records}
    else:
        first = samples[cfg.items[0]].records
        ids = list(dict.fromkeys(s.id for s in first))
        text = {s.id: (s.prompt, s.messages or [{"role": "user", "content": s.prompt}]) for s in reversed(first)}
    ended: dict[str, dict[str, bool]] = {}  # spec -> id -> the answer ended on its own (the RM judge reads it)
    for spec, loaded in samples.items():
        ans = {s.id: s.responses[0] for s in reversed(loaded.records)}  # reversed: the first row of an id wins
        ended[spec] = {s.id: bool((s.extra.get("ended") or [True])[0]) for s in reversed(loaded.records)}
        missing = [i for i in ids if i not in ans]
        if missing:
            raise InstructError(f"{spec}: no answer for prompt id {missing[0]}"
                                + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""), 2)
        samples[spec] = ans
    for spec in cfg.items:
        if spec not in samples:
            samples[spec], ended[spec] = _generate_answers(spec, prompts, cfg)
    answers = [samples[spec] for spec in cfg.items]

    base, others = cfg.items[0], list(enumerate(cfg.items))[1:]
    per_prompt = {i: {"id": i, "prompt": text[i][0], "responses": {s: a[i] for s, a in zip(cfg.items, answers)}}
                  for i in ids}
    outcomes: dict[str, list[float]] = {s: [] for _, s in others}
    diffs: dict[str, list[float]] = {s: [] for _, s in others}
    if cfg.judge == "human":
        _human(cfg, ids, text, answers, per_prompt, outcomes)
    else:
        fn = judge.make_judge(cfg.judge, cfg.quant, console.log)
        with console.Bar(len(ids), "compare: judging") as bar:
            for i in ids:
                prompt, msgs = text[i]
                # cut-off answers are scored as cut off, as the RM was trained and as PPO scores them
                scores = fn(data.Sample(i, prompt, [a[i] for a in answers], "", msgs if len(msgs) > 1 else None,
                                        {"ended": [ended[s][i] for s in cfg.items]}))
                per_prompt[i]["scores"] = dict(zip(cfg.items, scores))
                per_prompt[i]["outcomes"] = {}
                for j, spec in others:
                    per_prompt[i]["outcomes"][spec] = stats.outcome(scores[0], scores[j])
                    outcomes[spec].append(stats.outcome(scores[0], scores[j]))
                    diffs[spec].append(scores[j] - scores[0])
                bar.update(1)
    with files.JsonlWriter(cfg.out) as w:
        for i in ids:
            w.write(per_prompt[i])

    results = []
    for _, spec in others:
        o = outcomes[spec]
        if not o:
            results.append({"model": spec, "judged": 0})
            continue
        res = {"model": spec, "judged": len(o), "wins": o.count(1.0), "ties": o.count(0.5), "losses": o.count(0.0),
               "win_rate": sum(o) / len(o), "ci95": list(stats.bootstrap_ci(o, cfg.bootstrap, cfg.seed))}
        if diffs[spec]:
            res["score_diff"] = stats.summarize(diffs[spec], cfg.bootstrap, cfg.seed)
        results.append(res)
    _table(base, results, cfg.judge)
    return {"baseline": base, "judge": cfg.judge, "prompts": len(ids), "out": cfg.out, "results": results}


def _human(cfg: CompareConfig, ids, text, answers, per_prompt, outcomes) -> None:
    """Blind pairwise judging in the label UI: each pair shown in a random order that the person cannot see
    through. The pairs and answers live beside --out, so an interrupted session resumes where it stopped."""
    pairs_path, labels_path = f"{cfg.out}.pairs.jsonl", f"{cfg.out}.labels.jsonl"
    rng = random.Random(cfg.seed)
    order = {}
    with files.JsonlWriter(pairs_path) as w:
        for i in ids:
            prompt, msgs = text[i]
            for j in range(1, len(cfg.items)):
                flip = rng.random() < 0.5
                pair = [answers[0][i], answers[j][i]][::-1 if flip else 1]
                pid = f"{i}#{j}"
                order[pid] = flip
                row = {"id": pid, "prompt": prompt, "responses": pair, "model": "(hidden)"}
                if len(msgs) > 1:
                    row["messages"] = msgs
                w.write(row)
    shown = {}
    for line in Path(pairs_path).read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        shown[row["id"]] = row["responses"]
    label.run(pairs_path, labels_path, allow_all_tied=True)
    labeled, stale = {}, 0
    if Path(labels_path).is_file():
        for n, line in enumerate(Path(labels_path).read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                pid, ranks, responses = row["id"], row["ranks"], row["responses"]
                assert isinstance(ranks, list) and len(ranks) == 2 and all(isinstance(r, int) for r in ranks)
            except (ValueError, KeyError, TypeError, AssertionError):
                raise InstructError(f"{labels_path}:{n}: not a label row written by compare", 2) from None
            if shown.get(pid) != responses:  # an answer to another pair (other models, items or --seed)
                stale += 1
                continue
            labeled[pid] = ranks
    if stale:
        console.warn(f"{labels_path}: {stale} answers were about other pairs (another --seed, other items or "
                     "answers) and are not counted; delete the file to start afresh")
    for i in ids:
        per_prompt[i]["outcomes"] = {}
        for j in range(1, len(cfg.items)):
            pid = f"{i}#{j}"
            if pid not in labeled:
                continue
            ranks = labeled[pid][::-1] if order[pid] else labeled[pid]  # back to (baseline, other)
            o = stats.outcome(-ranks[0], -ranks[1])  # rank 1 is best
            per_prompt[i]["outcomes"][cfg.items[j]] = o
            outcomes[cfg.items[j]].append(o)


def _table(base: str, results: list[dict], judge_spec: str) -> None:
    from rich.table import Table

    t = Table(title=f"win rate against {base} (judge {judge_spec}; ties count half)", title_justify="left")
    for col in ("model", "judged", "wins", "ties", "losses", "win rate", "95% CI", "mean score diff"):
        t.add_column(col, justify="left" if col == "model" else "right")
    for r in results:
        if not r["judged"]:
            t.add_row(r["model"], "0", *[""] * 6)
            continue
        d = r.get("score_diff")
        t.add_row(r["model"], str(r["judged"]), str(r["wins"]), str(r["ties"]), str(r["losses"]),
                  f"{r['win_rate']:.3f}", f"[{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}]",
                  f"{d['mean']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}]" if d else "")
    console.table(t)
