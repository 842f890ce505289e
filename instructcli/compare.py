"""`instruct compare`: the win rate of each model against the first, ties counted half, with a bootstrap 95 %
confidence interval; judged by a reward model, a rule, or a person (blind pairs in the label UI)."""

from __future__ import annotations

import json
import random
from pathlib import Path

from instructcli import (bias, console, data, evaluate, files, generate, hallucination, judge, label, loop, models,
                         sources, stats)
from instructcli.config import CompareConfig, ModelConfig
from instructcli.errors import InstructError


def _measure(spec: str, prompts: data.Loaded | None, closed: data.Loaded | None, bias_set: data.Loaded | None,
             cfg: CompareConfig, kl: bool) -> dict:
    """What one model gives, loaded once: its answer to each of --prompts (every model with the same seed) with
    whether it ended on its own, its length in tokens and, with `kl` for a run dir with an adapter, its KL to
    the run's parent (as `eval` measures it); its closed-domain answers with their support check; its bias
    readings."""
    source = sources.resolve(spec, console.log)
    tok = models.load_tokenizer(source)
    device = models.pick_device()
    model = models.inference_model(source, ModelConfig(model=spec, quant=cfg.quant, dtype=cfg.dtype), device)
    got = {}
    if prompts is not None:
        queries, outs = generate.answer_prompts(model, tok, prompts, 1, cfg, cfg.seed, device, f"compare: {spec}")
        texts, ended = generate.as_texts(tok, outs)
        got["answers"] = {p.id: t for p, t in zip(prompts.records, texts)}
        got["ended"] = {p.id: e for p, e in zip(prompts.records, ended)}
        got["tokens"] = [len(o[0]) for o in outs]
        ref_name, ref_logprobs = (evaluate.parent_reference(source, device, model, tok, cfg.batch_size) if kl
                                  else (None, None))
        if ref_logprobs:  # the KL that came with the win rate, at no cost in memory
            got["kl"] = ref_name, evaluate.answer_kls(model, tok, ref_logprobs, queries, [o[0] for o in outs], device,
                                                      cfg.batch_size, cfg.temperature)
    if closed is not None:
        texts, ended = generate.answer_texts(model, tok, hallucination.as_prompts(closed), cfg, device,
                                             f"compare: {spec} (hallucination)")
        got["hallucination"] = hallucination.rows(closed.records, texts, ended)
    if bias_set is not None:
        got["bias"] = bias.measure(model, tok, bias_set.records, device, cfg.batch_size, cfg.bootstrap, cfg.seed)
    model = None
    loop.free_memory()
    return got


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
    for flag, spec in (("--judge", cfg.judge), ("--hallucination-judge", cfg.hallucination_judge)):
        if not spec or (flag == "--hallucination-judge" and not cfg.hallucination):
            continue
        plain = "human" if flag == "--judge" else "support"  # the judge that is neither a model nor a rule
        if not spec.startswith("rm:") and ".py:" not in spec and spec != plain:
            raise InstructError(f"{flag} {spec}: expected rm:DIR, path/rule.py:function or human", 2)
        judge.check_spec(spec, flag, console.log)
    if cfg.prompts and not cfg.judge:
        raise InstructError("--prompts are answered for a win rate: give --judge too", 2)
    load = lambda path, kind: data.load_option(cfg, path, kind, console.warn)  # noqa: E731
    prompts, closed, bias_set = load(cfg.prompts, "prompts"), load(cfg.hallucination, "closed"), load(cfg.bias, "bias")
    if prompts is not None:  # answers are paired by id: a second row with an id would be judged as the first
        seen: set[str] = set()
        for p in prompts.records:
            if p.id in seen:
                raise InstructError(f"{cfg.prompts}: prompt id {p.id} given twice; compare pairs answers by id", 2)
            seen.add(p.id)
    samples: dict[str, data.Loaded] = {}
    for spec in cfg.items:
        if Path(spec).is_file() or spec == "-":
            if closed or bias_set:
                raise InstructError(f"{spec}: a samples file has no model to answer --hallucination or score --bias; "
                                    "give model or run dirs", 2)
            samples[spec] = data.load(spec, "samples", cfg.skip_invalid, console.warn)
            continue
        if "/" in spec and not Path(spec).exists() and Path(spec).parent.is_dir():  # a typo, not a hub id
            raise InstructError(f"{spec}: no such model dir or samples file", 2)
        sources.refuse_reward_model(sources.resolve(spec, console.log))
        if cfg.judge and prompts is None:
            raise InstructError(f"{spec}: a model needs --prompts to answer (or give a samples file)", 2)
    # the KL of each model after the first: the one that came with its win rate (the baseline's costs a forward
    # of every answer twice, and is eval's question)
    measured = {spec: _measure(spec, prompts, closed, bias_set, cfg, kl=spec != cfg.items[0]) for spec in cfg.items
                if spec not in samples}
    out = {"baseline": cfg.items[0], "out": cfg.out}
    rows: list[dict] = []
    if cfg.judge:
        win_rows, results, ended = _win_rates(cfg, prompts, samples, measured)
        rows += win_rows
        out.update({"judge": cfg.judge, "prompts": len(win_rows), "results": results,
                    "answers": _answers(cfg, win_rows, ended, samples, measured)})
    if closed is not None:
        h_rows, out["hallucination"] = _hallucination_side_by_side(cfg, measured)
        rows += h_rows
    if bias_set is not None:
        b_rows, out["bias"] = _bias_side_by_side(cfg, measured)
        rows += b_rows
    with files.JsonlWriter(cfg.out) as w:
        for r in rows:
            w.write(r)
    return out


def _win_rates(cfg: CompareConfig, prompts, samples: dict, measured: dict) -> tuple[list[dict], list[dict], dict]:
    """Per-prompt rows, each model's win rate against the first, by --judge, and {item: {id: whether its answer
    ended on its own}}."""
    if prompts is not None:
        ids = [p.id for p in prompts.records]
        text = {p.id: (p.prompt, p.messages) for p in prompts.records}
    else:
        first = samples[cfg.items[0]].records
        ids = list(dict.fromkeys(s.id for s in first))
        text = {s.id: (s.prompt, s.messages or [{"role": "user", "content": s.prompt}]) for s in reversed(first)}
    ended: dict[str, dict[str, bool]] = {}  # spec -> id -> the answer ended on its own (the RM judge reads it)
    by_spec: dict[str, dict[str, str]] = {}
    for spec, loaded in samples.items():
        ans = {s.id: s.responses[0] for s in reversed(loaded.records)}  # reversed: the first row of an id wins
        ended[spec] = {s.id: bool((s.extra.get("ended") or [True])[0]) for s in reversed(loaded.records)}
        missing = [i for i in ids if i not in ans]
        if missing:
            raise InstructError(f"{spec}: no answer for prompt id {missing[0]}"
                                + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""), 2)
        by_spec[spec] = ans
    for spec, got in measured.items():
        by_spec[spec], ended[spec] = got["answers"], got["ended"]
    answers = [by_spec[spec] for spec in cfg.items]

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
    return [per_prompt[i] for i in ids], results, ended


def _answers(cfg: CompareConfig, rows: list[dict], ended: dict, samples: dict, measured: dict) -> list[dict]:
    """Each item's answers to the prompts (every one, judged or, by a person, not yet): mean words, the share cut
    off at the token cap (unknown for a samples file without `ended`), and for a model its tokens and, after the
    first and with an adapter, its KL to its parent: the length and KL that came with its win rate."""
    got = []
    for spec in cfg.items:
        a = {"model": spec, "answers": len(rows),
             "words": sum(len(r["responses"][spec].split()) for r in rows) / max(len(rows), 1), "cut_off": None,
             "tokens": None, "kl": None}
        if spec in measured or all("ended" in s.extra for s in samples[spec].records):
            a["cut_off"] = sum(not ended[spec][r["id"]] for r in rows) / max(len(rows), 1)
        if spec in measured:
            m = measured[spec]
            a["tokens"] = sum(m["tokens"]) / len(m["tokens"])
            if "kl" in m:
                a["kl"] = evaluate.kl_summary(m["kl"][1], m["kl"][0], cfg.temperature, cfg.bootstrap, cfg.seed)
        got.append(a)
    _print_table("their answers (KL: to each run's parent, its adapter off; nats per answer)",
                 ("model", "words", "tokens", "cut off", "KL", "95% CI", "KL to"),
                 [(a["model"], f"{a['words']:.1f}", "" if a["tokens"] is None else f"{a['tokens']:.1f}",
                   "" if a["cut_off"] is None else f"{a['cut_off']:.0%}",
                   *(("", "", "") if a["kl"] is None else
                     (f"{a['kl']['mean']:.2f}", f"[{a['kl']['ci95'][0]:.2f}, {a['kl']['ci95'][1]:.2f}]",
                      str(a["kl"]["reference"])))) for a in got], left=("model", "KL to"))
    return got


def _print_table(title: str, columns: tuple[str, ...], rows: list[tuple], left: tuple[str, ...] = ("model",)) -> None:
    """A rich table on stderr: text columns (`left`) flush left, figures right."""
    from rich.table import Table

    t = Table(title=title, title_justify="left")
    for col in columns:
        t.add_column(col, justify="left" if col in left else "right")
    for r in rows:
        t.add_row(*r)
    console.table(t)


def _paired(cfg: CompareConfig, base: list[float], other: list[float]) -> dict:
    """The other model minus the baseline, item by item: mean and bootstrap CI of the paired differences."""
    d = stats.summarize([b - a for a, b in zip(base, other)], cfg.bootstrap, cfg.seed)
    return {"mean": d["mean"], "ci95": d["ci95"]}


def _hallucination_side_by_side(cfg: CompareConfig, measured: dict) -> tuple[list[dict], list[dict]]:
    for spec in cfg.items:
        if cfg.hallucination_judge != "support":
            judge.judge_made_up(cfg.hallucination_judge, measured[spec]["hallucination"], quant=cfg.quant,
                                log=console.log)
    base = measured[cfg.items[0]]["hallucination"]
    summaries = []
    for spec in cfg.items:
        hr = measured[spec]["hallucination"]
        s = {"model": spec, **hallucination.summarize(hr, cfg.hallucination_judge, cfg.bootstrap, cfg.seed)}
        if spec != cfg.items[0]:
            s["diff"] = _paired(cfg, [float(r["made_up"]) for r in base], [float(r["made_up"]) for r in hr])
        summaries.append(s)
    rows = [{"part": "hallucination", "id": r["id"], "task": hallucination.group(r),
             "responses": {s: measured[s]["hallucination"][k]["response"] for s in cfg.items},
             "unsupported_share": {s: measured[s]["hallucination"][k]["unsupported_share"] for s in cfg.items},
             "made_up": {s: measured[s]["hallucination"][k]["made_up"] for s in cfg.items}}
            for k, r in enumerate(base)]
    _side_table("closed-domain hallucination (made-up share; lower is better; judge "
                f"{cfg.hallucination_judge})", cfg.items[0], [(s["model"], s.get("made_up"), s.get("ci95"),
                                                               s.get("diff")) for s in summaries])
    return rows, summaries


def _bias_side_by_side(cfg: CompareConfig, measured: dict) -> tuple[list[dict], list[dict]]:
    base_rows = measured[cfg.items[0]]["bias"][1]
    summaries, rows, table = [], [], {"crows_pairs": [], "winogender": []}
    for spec in cfg.items:
        summary, brows = measured[spec]["bias"]
        s = {"model": spec, **summary}
        if spec != cfg.items[0]:
            if "bias_pairs" in brows:
                s["crows_pairs"]["diff"] = _paired(cfg, [float(r["stereotyped"]) for r in base_rows["bias_pairs"]],
                                                   [float(r["stereotyped"]) for r in brows["bias_pairs"]])
            if "winogender" in brows:
                s["winogender"]["diff"] = _paired(cfg, [r["entropy_bits"] for r in base_rows["winogender"]],
                                                  [r["entropy_bits"] for r in brows["winogender"]])
        if "crows_pairs" in s:
            c = s["crows_pairs"]
            table["crows_pairs"].append((spec, c["stereotyped"], c["ci95"], c.get("diff")))
        if "winogender" in s:
            w = s["winogender"]
            table["winogender"].append((spec, w["entropy_bits"], w["ci95"], w.get("diff")))
        summaries.append(s)
    for part, key in (("bias_pairs", "stereotyped"), ("winogender", "entropy_bits")):
        for k, r in enumerate(base_rows.get(part, [])):
            rows.append({"part": part, "id": r["id"], key: {s: measured[s]["bias"][1][part][k][key] for s in cfg.items}})
    if table["crows_pairs"]:
        _side_table("CrowS-Pairs (stereotyped sentence likelier; 0.5 = no preference)", cfg.items[0],
                    table["crows_pairs"])
    if table["winogender"]:
        _side_table("Winogender (pronoun entropy in bits; higher = less preference)", cfg.items[0],
                    table["winogender"])
    return rows, summaries


def _side_table(title: str, base: str, entries: list[tuple]) -> None:
    _print_table(title, ("model", "value", "95% CI", f"minus {base} [95% CI]"),
                 [(spec, "" if value is None else f"{value:.3f}", f"[{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "",
                   f"{diff['mean']:+.3f} [{diff['ci95'][0]:+.3f}, {diff['ci95'][1]:+.3f}]" if diff else "")
                  for spec, value, ci, diff in entries])


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
    def row(r):
        if not r["judged"]:
            return (r["model"], "0", *[""] * 6)
        d = r.get("score_diff")
        return (r["model"], str(r["judged"]), str(r["wins"]), str(r["ties"]), str(r["losses"]),
                f"{r['win_rate']:.3f}", f"[{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}]",
                f"{d['mean']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}]" if d else "")

    _print_table(f"win rate against {base} (judge {judge_spec}; ties count half)",
                 ("model", "judged", "wins", "ties", "losses", "win rate", "95% CI", "mean score diff"),
                 [row(r) for r in results])
