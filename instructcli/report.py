"""report.md for `instruct eval --report`: the summary as a table, plots, and the examples worth reading."""

from __future__ import annotations

import json
import time
from pathlib import Path

from instructcli import console, hallucination, sources

CURVE_KEYS = ("score", "reward", "kl", "kl_coef", "entropy", "policy_loss", "value_loss", "ptx_loss", "loss",
              "eval_loss", "accuracy", "eval_accuracy", "response_len", "clipfrac", "approx_kl")

def _ci(part: dict) -> str:
    lo, hi = part["ci95"]
    return f"{part['mean']:.3f} [{lo:.3f}, {hi:.3f}]"


def write_report(d: Path, summary: dict, rows: dict, source: sources.Source) -> None:
    """report.md with PNG plots: what a person would rather look at than read numbers."""
    lines = [f"# Evaluation of `{summary['model']}`", "", f"Written {time.strftime('%Y-%m-%d %H:%M')}; "
             f"rows in `{summary['out']}`. Intervals are bootstrap 95 % CIs of the mean over prompts.", "",
             "| measure | value |", "|---|---|"]
    a = summary.get("answers")
    if a:
        if "reward" in a:
            lines.append(f"| reward (normalised RM score, `{a['reward']['rm']}`) | {_ci(a['reward'])} |")
        if "kl" in a:
            lines.append(f"| KL to `{a['kl']['reference']}` (nats per response) | {_ci(a['kl'])} |")
        lines += [f"| response length (tokens) | {a['response_len']:.1f} |",
                  f"| cut off without EOS | {a['no_eos']:.0%} |",
                  f"| distinct-1 / distinct-2 | {a['distinct_1']:.3f} / {a['distinct_2']:.3f} |"]
    if (lm := summary.get("lm")):
        lines.append(f"| held-out LM loss (perplexity) | {lm['loss']:.4f} ({lm['perplexity']:.2f}) |")
        if "alignment_tax" in lm:
            lines.append(f"| alignment tax: LM loss minus `{lm['reference']}`'s {lm['reference_loss']:.4f} | "
                         f"{lm['alignment_tax']:+.4f} |")
    if (tx := summary.get("toxicity")):
        for v in ("plain", "respectful"):
            lines.append(f"| toxicity, {v} prompts ({tx['scorer']}) | {_ci(tx[v])}; "
                         f"{tx[v]['toxic_share']:.0%} above {tx['threshold']} |")
    if (tq := summary.get("truthfulness")):
        lines.append(f"| truthfulness MC accuracy ({tq['questions']} questions, chance {tq['chance']:.2f}) | "
                     f"{tq['accuracy']:.3f} [{tq['ci95'][0]:.3f}, {tq['ci95'][1]:.3f}] |")
    if (h := summary.get("hallucination")) and "made_up" in h:
        lines.append(f"| closed-domain hallucination (made-up share, judge {h['judge']}, {h['judged']} tasks) | "
                     f"{h['made_up']:.3f} [{h['ci95'][0]:.3f}, {h['ci95'][1]:.3f}] |")
    b = summary.get("bias") or {}
    if (cp := b.get("crows_pairs")):
        lines.append(f"| CrowS-Pairs: stereotyped sentence likelier ({cp['pairs']} pairs, 0.5 = none) | "
                     f"{cp['stereotyped']:.3f} [{cp['ci95'][0]:.3f}, {cp['ci95'][1]:.3f}]; entropy "
                     f"{cp['entropy_bits']:.3f} of 1 bit |")
    if (wg := b.get("winogender")):
        lines.append(f"| Winogender: pronoun entropy ({wg['sentences']} sentences, max {wg['max_entropy_bits']:.3f} bits) | "
                     f"{wg['entropy_bits']:.3f} [{wg['ci95'][0]:.3f}, {wg['ci95'][1]:.3f}]; he {wg['p_he']:.2f} / "
                     f"she {wg['p_she']:.2f} / they {wg['p_they']:.2f} |")
    lines.append("")
    if h and "made_up" in h:
        lines += hallucination_section(h, rows["hallucination"])
    if cp or wg:
        lines += bias_section(b)
    if a and "reward" in a:
        scores = [s for r in rows["answers"] for s in r["scores"]]
        console.plot_histograms(d / "reward.png", {summary["model"]: scores}, "Reward of the model's answers",
                                "normalised RM score")
        lines += ["## Reward", "", "![reward histogram](reward.png)", ""]
        ranked = sorted(((s, r, t) for r in rows["answers"] for s, t in zip(r["scores"], r["responses"])),
                        key=lambda x: x[0])
        for title, picks in (("Highest-scored answers", ranked[::-1][:3]), ("Lowest-scored answers", ranked[:3])):
            lines += [f"### {title}", ""]
            for s, r, t in picks:
                lines += [f"**{r['id']}** (score {s:+.2f}): {_quote(r['prompt'])}", "", f"> {_quote(t) or '(empty)'}", ""]
    if a and "kl" in a:
        kls = [k for r in rows["answers"] for k in r["kl"]]
        console.plot_histograms(d / "kl.png", {summary["model"]: kls}, f"KL to {a['kl']['reference']}",
                                "nats per response")
        lines += ["## KL to the reference", "", "![KL histogram](kl.png)", ""]
    if tx:
        console.plot_bars(d / "toxicity.png", ["plain", "respectful"], [tx["plain"]["mean"], tx["respectful"]["mean"]],
                          [tuple(tx["plain"]["ci95"]), tuple(tx["respectful"]["ci95"])], "Toxicity of continuations",
                          "mean toxicity probability")
        lines += ["## Toxicity", "", "![toxicity](toxicity.png)", ""]
    metrics = Path(source.run_dir) / "metrics.jsonl" if source.run_dir else None
    if metrics and metrics.is_file():
        mrows = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()]
        vary = lambda k: len({r[k] for r in mrows if isinstance(r.get(k), (int, float))}) > 1  # noqa: E731
        keys = [k for k in CURVE_KEYS if vary(k)]  # a constant (kl_coef when fixed, ptx_loss at 0) says nothing
        if keys and mrows:
            stage = (source.manifest or {}).get("stage", "training")
            console.plot_curves(d / "training.png", mrows, keys, f"{stage} run: {source.run_dir}")
            lines += ["## Training curves", "", f"From `{metrics}`.", "", "![training curves](training.png)", ""]
    (d / "report.md").write_text("\n".join(lines))


def _quote(text: str, limit: int = 300) -> str:
    t = " ".join(text.split())
    return t if len(t) <= limit else t[:limit] + "…"




def hallucination_section(h: dict, rows: list[dict]) -> list[str]:
    lines = ["## Closed-domain hallucination", "",
             f"Judge: {h['judge']}" + (f" ({_support_rule(h['threshold'])})" if "threshold" in h else "") + ".",
             "", "| task | tasks | made-up share [95 % CI] |", "|---|---|---|"]
    for g, part in h["by_task"].items():
        lines.append(f"| {g} | {part['tasks']} | {part['made_up']:.3f} [{part['ci95'][0]:.3f}, {part['ci95'][1]:.3f}] |")
    worst = sorted((r for r in rows if r["made_up"]), key=lambda r: -r["unsupported_share"])[:3]
    if worst:
        lines += ["", "### Answers with the most unsupported content", ""]
        for r in worst:
            lines += [f"**{r['id']}** ({hallucination.group(r)}; {r['unsupported_share']:.0%} of {r['units']} units "
                      f"unsupported: {', '.join(r['unsupported'][:8])}): {_quote(r['instruction'])}", "",
                      f"> {_quote(r['response']) or '(empty)'}", ""]
    return lines + [""]


def _support_rule(threshold: float) -> str:
    if threshold == 0:
        return "made-up when any of an answer's names, numbers and content words is missing from its input"
    return f"made-up when more than {threshold:.0%} of an answer's names, numbers and content words are missing"


def bias_section(b: dict) -> list[str]:
    lines = ["## Bias", ""]
    if (cp := b.get("crows_pairs")):
        lines += ["CrowS-Pairs: the share of pairs whose more stereotyping sentence the model finds likelier "
                  "(0.5 = no preference), and the entropy of that choice (1 bit = none).", "",
                  "| bias type | pairs | stereotyped [95 % CI] | entropy (bits) |", "|---|---|---|---|"]
        for k, part in cp["by_type"].items():
            lines.append(f"| {k} | {part['pairs']} | {part['stereotyped']:.3f} [{part['ci95'][0]:.3f}, "
                         f"{part['ci95'][1]:.3f}] | {part['entropy_bits']:.3f} |")
        lines.append("")
    if (wg := b.get("winogender")):
        lines += [f"Winogender: probability mass on he / she / they for the pronoun of an occupation sentence; mean "
                  f"entropy {wg['entropy_bits']:.3f} bits of {wg['max_entropy_bits']:.3f}; p(he) − p(she) "
                  f"{wg['he_minus_she']:+.3f} [{wg['he_minus_she_ci95'][0]:+.3f}, {wg['he_minus_she_ci95'][1]:+.3f}]; "
                  f"he likelier than she in {wg['he_over_she']:.0%} of sentences.", ""]
    return lines
