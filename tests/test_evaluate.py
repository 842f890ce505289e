"""eval and compare: measurements against direct computations, the commands' files."""

import io
import json
import math
import sys

import pytest
import torch

from conftest import write_jsonl
from instructcli import data, evaluate, models, sources, tokens
from instructcli.config import ModelConfig


# --------------------------------------------------------------------------------------- measurements
@pytest.fixture(scope="module")
def tiny(tiny_dir):
    src = sources.resolve(str(tiny_dir))
    return models.inference_model(src, ModelConfig(), "cpu"), models.load_tokenizer(src)


def test_text_nll_matches_the_model_loss(tiny):
    model, tok = tiny
    texts = ["the river runs under the stone bridge", "a bird", "lamps and clouds and roads and trees"]
    got = evaluate.text_nll(model, tok, texts, 1024, "cpu", batch_size=2)  # padded batches
    for t, (nll, n) in zip(texts, got):
        ids = torch.tensor([tokens.encode_text(tok, t)])
        with torch.no_grad():
            loss = model(input_ids=ids, labels=ids).loss.item()
        assert n == ids.shape[1] - 1
        assert nll / n == pytest.approx(loss, rel=1e-4)


def test_choice_logprobs_match_a_direct_computation(tiny):
    model, tok = tiny
    q = data.MultipleChoice("1", "Which is it?", ["the sun", "a river of stone", "tree"], 0)
    got = evaluate.choice_logprobs(model, tok, [q], "cpu")[0]
    prompt = tokens.encode_prompt(tok, [{"role": "user", "content": q.question}])
    for c, lp in zip(q.choices, got):
        cont = tokens.encode_continuation(tok, c)
        ids = torch.tensor([prompt + cont])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
        want = sum(logp[len(prompt) - 1 + i, t].item() for i, t in enumerate(cont))
        assert lp == pytest.approx(want, rel=1e-4)


def test_truthfulness_picks_the_likeliest_choice(cli, uniform_dir, tmp_path):
    """A model whose next-token distribution is uniform (final norm zeroed): every token costs log V, so the
    choice with the fewest tokens is the likeliest. It is right when `correct` points at it, wrong otherwise."""
    uniform = uniform_dir
    choices = ["sun", "river stone bird lamp road", "tree cloud lamp"]
    mc = write_jsonl(tmp_path / "mc.jsonl", [{"question": "Which?", "choices": choices, "correct": 0},
                                             {"question": "And?", "choices": choices, "correct": 1}])
    r = cli("eval", uniform, "--truthfulness", mc, "-o", tmp_path / "ev", "-q")
    assert r.code == 0, r
    s = json.loads(r.out)["truthfulness"]
    assert s["accuracy"] == 0.5 and s["questions"] == 2 and s["chance"] == pytest.approx(1 / 3)
    rows = [json.loads(x) for x in (tmp_path / "ev" / "truthfulness.jsonl").read_text().splitlines()]
    assert [x["pick"] for x in rows] == [0, 0] and [x["right"] for x in rows] == [True, False]
    v = len(tokens.encode_continuation(models.load_tokenizer(sources.resolve(str(uniform))), "sun"))
    vocab = json.loads((uniform / "config.json").read_text())["vocab_size"]
    assert rows[0]["loglik"][0] == pytest.approx(-v * math.log(vocab), rel=1e-4)


def test_toxicity_scorer_ranks_a_toxic_sentence_above_a_benign_one():
    benign, toxic, empty = evaluate.toxicity_scores(["Thank you so much, this was a lovely afternoon.",
                                                     "Shut up, you stupid worthless idiot.", ""])
    assert toxic > 0.5 > benign and toxic > benign + 0.5 and empty == 0.0


# ------------------------------------------------------------------------------------------- commands
@pytest.fixture(scope="module")
def runs(tiny_dir, tmp_path_factory):
    """A tiny sft run (on the tiny base) and a tiny rm run (on the sft run)."""
    from instructcli import config as C, rm, sft

    d = tmp_path_factory.mktemp("evalruns")
    demos = write_jsonl(d / "demos.jsonl", [{"prompt": "Say hello.", "response": "Hello there!"}] * 4)
    s = sft.train(C.SFTConfig(data=str(demos), out=str(d / "sft"), quiet=True,
                              model=C.ModelConfig(model=str(tiny_dir)),
                              train=C.TrainConfig(max_steps=3, batch_size=2, lr=1e-2, eval_frac=0)))
    cmp = write_jsonl(d / "cmp.jsonl", [{"prompt": f"Q{i}?", "chosen": "yes yes", "rejected": "no"}
                                        for i in range(6)])
    r = rm.train(C.RMConfig(data=str(cmp), out=str(d / "rm"), quiet=True, model=C.ModelConfig(model=str(s)),
                            train=C.TrainConfig(max_steps=2, batch_size=2, eval_frac=0, save_every=0)))
    prompts = write_jsonl(d / "prompts.jsonl", [{"id": "a", "prompt": "Say hello."}, {"id": "b", "prompt": "Count."},
                                                {"id": "c", "prompt": "Name a tree."}])
    text = write_jsonl(d / "text.jsonl", [{"text": "the river runs under the stone bridge"}, {"text": "a bird sings"}])
    return {"sft": s, "rm": r, "prompts": prompts, "text": text}


def test_eval_writes_summary_rows_and_report(cli, runs, tmp_path):
    tox = write_jsonl(tmp_path / "tox.jsonl", [{"id": "t1", "prompt": "The referee was so bad that he"}])
    out, rep = tmp_path / "ev", tmp_path / "report"
    r = cli("eval", runs["sft"], "-p", runs["prompts"], "--reward", runs["rm"], "--lm-data", runs["text"],
            "--toxicity", tox, "--report", rep, "-o", out, "-n", 2, "--max-new-tokens", 6, "-q")
    assert r.code == 0, r
    s = json.loads(r.out)
    a = s["answers"]
    assert a["prompts"] == 3 and a["samples_per_prompt"] == 2 and 0 < a["response_len"] <= 6
    assert a["kl"]["reference"] == s["lm"]["reference"] and math.isfinite(a["kl"]["mean"])
    assert a["reward"]["n"] == 3 and a["reward"]["ci95"][0] <= a["reward"]["mean"] <= a["reward"]["ci95"][1]
    assert s["lm"]["alignment_tax"] == pytest.approx(s["lm"]["loss"] - s["lm"]["reference_loss"])
    assert set(s["toxicity"]) >= {"plain", "respectful"} and 0 <= s["toxicity"]["plain"]["mean"] <= 1
    rows = [json.loads(x) for x in (out / "answers.jsonl").read_text().splitlines()]
    assert [x["id"] for x in rows] == ["a", "b", "c"] and all(len(x["scores"]) == 2 == len(x["kl"]) for x in rows)
    mean = sum(sum(x["scores"]) / 2 for x in rows) / 3
    assert a["reward"]["mean"] == pytest.approx(mean)
    tox_rows = [json.loads(x) for x in (out / "toxicity.jsonl").read_text().splitlines()]
    assert [x["variant"] for x in tox_rows] == ["plain", "respectful"]
    assert json.loads((out / "summary.json").read_text())["config"]["n"] == 2
    for f in ("report.md", "reward.png", "kl.png", "toxicity.png", "training.png"):
        assert (rep / f).is_file() and (rep / f).stat().st_size > 100, f
    md = (rep / "report.md").read_text()
    assert "![reward histogram](reward.png)" in md and "alignment tax" in md
    assert (rep / "reward.png").read_bytes()[:4] == b"\x89PNG"


def test_kl_of_a_model_against_itself_is_zero(cli, runs, tmp_path):
    r = cli("eval", runs["sft"], "-p", runs["prompts"], "--ref", runs["sft"], "--lm-data", runs["text"],
            "-o", tmp_path / "ev", "--max-new-tokens", 5, "-q")
    assert r.code == 0, r
    s = json.loads(r.out)
    assert s["answers"]["kl"]["mean"] == pytest.approx(0.0, abs=1e-5)
    assert s["lm"]["alignment_tax"] == pytest.approx(0.0, abs=1e-6)
    # the default reference is the parent (adapter off): another model, so KL is not 0
    r = cli("eval", runs["sft"], "-p", runs["prompts"], "-o", tmp_path / "ev2", "--max-new-tokens", 5, "-q")
    assert r.code == 0, r
    assert abs(json.loads(r.out)["answers"]["kl"]["mean"]) > 1e-3


def test_eval_refuses_bad_input_before_writing(cli, runs, tmp_path):
    bad = write_jsonl(tmp_path / "mc.jsonl", [{"question": "Q?", "choices": ["a", "b"], "correct": 2}])
    r = cli("eval", runs["sft"], "--truthfulness", bad, "-o", tmp_path / "ev", "-q")
    assert r.code == 2 and f"{bad}:1: correct:" in r.err and not (tmp_path / "ev").exists()
    r = cli("eval", runs["sft"], "-o", tmp_path / "ev")
    assert r.code == 2 and "nothing to evaluate" in r.err
    r = cli("eval", runs["sft"], "--reward", runs["rm"], "--lm-data", runs["text"], "-o", tmp_path / "ev")
    assert r.code == 2 and "--prompts" in r.err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep")
    r = cli("eval", runs["sft"], "--lm-data", runs["text"], "-o", tmp_path / "full", "-q")
    assert r.code == 2 and "--overwrite" in r.err and (tmp_path / "full" / "x").read_text() == "keep"


def _samples(path, responses):
    return write_jsonl(path, [{"id": i, "prompt": f"Prompt {i}", "responses": [r], "model": path.stem}
                              for i, r in zip("abcd", responses)])


def test_compare_rule_judge_counts_wins_ties_losses(cli, tmp_path):
    rule = tmp_path / "rule.py"
    rule.write_text("def longer(prompt, response):\n    return len(response)\n")
    base = _samples(tmp_path / "base.jsonl", ["xx", "xx", "xx", "xx"])
    other = _samples(tmp_path / "other.jsonl", ["xxx", "xxxx", "xx", "x"])  # win win tie loss: 2.5 / 4
    best = _samples(tmp_path / "best.jsonl", ["xxx"] * 4)
    out = tmp_path / "cmp.jsonl"
    r = cli("compare", base, other, best, "--judge", f"{rule}:longer", "-o", out, "--bootstrap", 2000)
    assert r.code == 0, r
    s = json.loads(r.out)
    o, b = s["results"]
    assert (o["wins"], o["ties"], o["losses"], o["win_rate"]) == (2, 1, 1, 0.625)
    assert o["ci95"][0] < 0.625 < o["ci95"][1] and o["score_diff"]["mean"] == pytest.approx(0.5)  # (1 + 2 + 0 - 1) / 4
    assert b["win_rate"] == 1.0 and b["ci95"] == [1.0, 1.0]
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [x["outcomes"][str(other)] for x in rows] == [1.0, 1.0, 0.5, 0.0]
    assert rows[0]["responses"][str(best)] == "xxx" and rows[3]["scores"][str(other)] == 1
    assert "win rate against" in r.err and "0.625" in r.err


def test_compare_refuses_missing_answers_and_bad_judges(cli, tmp_path):
    base = _samples(tmp_path / "base.jsonl", ["a", "b", "c", "d"])
    short = write_jsonl(tmp_path / "short.jsonl", [{"id": "a", "prompt": "Prompt a", "responses": ["z"]}])
    rule = tmp_path / "rule.py"
    rule.write_text("def f(prompt, response):\n    return 1.0\n")
    r = cli("compare", base, short, "--judge", f"{rule}:f", "-o", tmp_path / "c.jsonl")
    assert r.code == 2 and "no answer for prompt id b (and 2 more)" in r.err and not (tmp_path / "c.jsonl").exists()
    r = cli("compare", base, short, "--judge", "gpt4", "-o", tmp_path / "c.jsonl")
    assert r.code == 2 and "--judge gpt4" in r.err
    r = cli("compare", base, tmp_path / "nope" / "model", "--judge", f"{rule}:f")
    assert r.code == 2 and "no such" in r.err


def test_compare_models_with_an_rm_judge(cli, runs, tmp_path):
    import shutil

    out, twin = tmp_path / "cmp.jsonl", tmp_path / "twin"
    shutil.copytree(runs["sft"], twin)
    r = cli("compare", runs["sft"], twin, "-p", runs["prompts"], "--judge", f"rm:{runs['rm']}", "-o", out,
            "--max-new-tokens", 5, "-q")
    assert r.code == 0, r
    res = json.loads(r.out)["results"][0]
    # the same model with the same seed gives the same answers: every prompt is a tie
    assert (res["ties"], res["win_rate"], res["score_diff"]["mean"]) == (3, 0.5, 0.0)
    base, other = json.loads(r.out)["answers"]  # the KL of the model after the baseline, to its parent only
    assert base["kl"] is None and other["kl"]["n"] == 3 and base["tokens"] == other["tokens"]


def test_compare_reports_the_kl_and_length_that_came_with_the_win_rate(cli, runs, tmp_path):
    """Each model's KL to its parent and its length, measured on the answers compare judged, equal eval's on
    the same prompts and seed (the same answers, the same forwards); a samples file has its words, and no KL,
    tokens or cut-off share without `ended`."""
    rule = tmp_path / "rule.py"
    rule.write_text("def words(prompt, response):\n    return len(response.split())\n")
    fixed = write_jsonl(tmp_path / "fixed.jsonl", [{"id": i, "prompt": "?", "responses": ["one two three"]}
                                                  for i in "abc"])
    r = cli("compare", fixed, runs["sft"], "-p", runs["prompts"], "--judge", f"{rule}:words", "-o",
            tmp_path / "cmp.jsonl", "--max-new-tokens", 5)
    assert r.code == 0, r
    f, m = json.loads(r.out)["answers"]
    assert f == {"model": str(fixed), "answers": 3, "words": 3.0, "cut_off": None, "tokens": None, "kl": None}
    assert "KL to" in r.err and f"{m['kl']['mean']:.2f}" in r.err  # the table on stderr
    r = cli("eval", runs["sft"], "-p", runs["prompts"], "-o", tmp_path / "ev", "--max-new-tokens", 5, "-q")
    assert r.code == 0, r
    e = json.loads(r.out)["answers"]
    assert abs(e["kl"]["mean"]) > 1e-3 and m["kl"] == e["kl"]  # mean, CI, reference, unit, temperature
    assert (m["tokens"], m["cut_off"]) == (e["response_len"], e["no_eos"])
    rows = [json.loads(x) for x in (tmp_path / "ev" / "answers.jsonl").read_text().splitlines()]
    assert m["words"] == pytest.approx(sum(len(x["responses"][0].split()) for x in rows) / 3)
    # a samples file that says which answers ended has a cut-off share
    cut = write_jsonl(tmp_path / "cut.jsonl", [{"id": i, "prompt": "?", "responses": ["a b"], "ended": [i != "b"]}
                                              for i in "abc"])
    r = cli("compare", fixed, cut, "--judge", f"{rule}:words", "-o", tmp_path / "cmp2.jsonl", "-q")
    assert r.code == 0, r
    assert json.loads(r.out)["answers"][1]["cut_off"] == pytest.approx(1 / 3)
    # answers are paired by prompt id: a prompts file with an id twice is refused before any model answers
    twice = write_jsonl(tmp_path / "twice.jsonl", [{"id": "a", "prompt": "One?"}, {"id": "a", "prompt": "Two?"}])
    r = cli("compare", fixed, runs["sft"], "-p", twice, "--judge", f"{rule}:words", "-o", tmp_path / "c3.jsonl")
    assert r.code == 2 and "prompt id a given twice" in r.err and not (tmp_path / "c3.jsonl").exists()


def test_compare_rm_judge_scores_a_cut_off_answer_as_cut_off(cli, runs, tmp_path):
    """The RM reads its score at the end-of-turn token, which an answer cut off at the token cap does not
    have: compare must score the same words differently when one copy ended and the other was cut off,
    exactly as `instruct score` does with `ended`."""
    from instructcli.config import ModelConfig

    rows = [{"id": f"p{i}", "prompt": f"Question {i}?", "responses": [f"An answer of {i} words"]} for i in range(3)]
    ended = write_jsonl(tmp_path / "ended.jsonl", [{**r, "ended": [True]} for r in rows])
    cut = write_jsonl(tmp_path / "cut.jsonl", [{**r, "ended": [False]} for r in rows])
    out = tmp_path / "cmp.jsonl"
    r = cli("compare", ended, cut, "--judge", f"rm:{runs['rm']}", "-o", out, "-q")
    assert r.code == 0, r
    rm, tok, _ = models.load_reward_model(str(runs["rm"]), ModelConfig(), "cpu")
    for row, src in zip((json.loads(x) for x in out.read_text().splitlines()), rows):
        msgs = [{"role": "user", "content": src["prompt"]}]
        want = [models.reward_scores(rm, tok, msgs, src["responses"], ended=[e])[0] for e in (True, False)]
        assert [row["scores"][str(ended)], row["scores"][str(cut)]] == pytest.approx(want, abs=1e-5)
        assert want[0] != pytest.approx(want[1], abs=1e-4)  # the two readings differ: the test can fail


class SimulatedPerson(io.StringIO):
    """Answers the label UI as a person who always prefers the response containing GOOD: it reads which pair is
    on screen from the pairs file and the answers written so far."""

    def __init__(self, pairs, labels):
        super().__init__()
        self.pairs, self.labels, self.asked = pairs, labels, 0

    def readline(self, *_):
        pairs = [json.loads(x) for x in self.pairs.read_text().splitlines()]
        done = len(self.labels.read_text().splitlines()) if self.labels.exists() else 0
        if done >= len(pairs):
            return "q\n"
        first_good = "GOOD" in pairs[done]["responses"][0]
        return "1 2\n" if first_good else "2 1\n"


def test_compare_human_judge_is_blind_and_maps_answers_back(cli, tmp_path, monkeypatch):
    base = write_jsonl(tmp_path / "base.jsonl", [{"id": str(i), "prompt": f"P{i}", "responses": [f"plain {i}"]}
                                                 for i in range(12)])
    good = write_jsonl(tmp_path / "good.jsonl", [{"id": str(i), "prompt": f"P{i}", "responses": [f"GOOD {i}"]}
                                                 for i in range(12)])
    out = tmp_path / "cmp.jsonl"
    monkeypatch.setattr(sys, "stdin", SimulatedPerson(tmp_path / "cmp.jsonl.pairs.jsonl",
                                                      tmp_path / "cmp.jsonl.labels.jsonl"))
    r = cli("compare", base, good, "--judge", "human", "-o", out, "--seed", 5)
    assert r.code == 0, r
    res = json.loads(r.out)["results"][0]
    assert (res["judged"], res["wins"], res["win_rate"]) == (12, 12, 1.0)
    pairs = [json.loads(x) for x in (tmp_path / "cmp.jsonl.pairs.jsonl").read_text().splitlines()]
    shown_first = ["GOOD" in p["responses"][0] for p in pairs]
    assert any(shown_first) and not all(shown_first)  # both orders occur: the person cannot tell which is which
    assert all(p["model"] == "(hidden)" for p in pairs)


def test_compare_human_tie_counts_half_and_stale_answers_are_not_reused(cli, tmp_path, monkeypatch):
    base = write_jsonl(tmp_path / "base.jsonl", [{"id": str(i), "prompt": f"P{i}", "responses": [f"plain {i}"]}
                                                 for i in range(3)])
    other = write_jsonl(tmp_path / "other.jsonl", [{"id": str(i), "prompt": f"P{i}", "responses": [f"other {i}"]}
                                                   for i in range(3)])
    out = tmp_path / "cmp.jsonl"
    r = cli("compare", base, other, "--judge", "human", "-o", out, stdin=b"1=2\n1=2\n1=2\nq\n")
    assert r.code == 0, r
    res = json.loads(r.out)["results"][0]
    assert (res["ties"], res["win_rate"]) == (3, 0.5)
    # another seed shows other orders: the old answers are about other pairs only if the responses differ;
    # a changed answer set makes every stored answer stale
    changed = write_jsonl(tmp_path / "changed.jsonl", [{"id": str(i), "prompt": f"P{i}",
                                                        "responses": [f"new {i}"]} for i in range(3)])
    r = cli("compare", base, changed, "--judge", "human", "-o", out, stdin=b"q\n")
    assert r.code == 0, r
    assert json.loads(r.out)["results"][0]["judged"] == 0 and "not counted" in r.err


def test_compare_refuses_duplicates_and_reads_a_baseline_from_stdin(cli, tmp_path):
    base = _samples(tmp_path / "base.jsonl", ["xx", "xx", "xx", "xx"])
    other = _samples(tmp_path / "other.jsonl", ["xxx", "x", "xx", "xxx"])
    rule = tmp_path / "rule.py"
    rule.write_text("def longer(prompt, response):\n    return len(response)\n")
    r = cli("compare", base, other, base, "--judge", f"{rule}:longer", "-o", tmp_path / "c.jsonl")
    assert r.code == 2 and "given twice" in r.err
    r = cli("compare", "-", other, "--judge", f"{rule}:longer", "-o", tmp_path / "c.jsonl",
            stdin=base.read_bytes())
    assert r.code == 0, r
    assert json.loads(r.out)["results"][0]["win_rate"] == 0.625


def test_eval_overwrite_only_replaces_its_own_results(cli, runs, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "precious.txt").write_text("keep")
    r = cli("eval", runs["sft"], "--lm-data", runs["text"], "-o", "mine", "--overwrite", "-q")
    assert r.code == 2 and "not a results directory" in r.err and (tmp_path / "mine" / "precious.txt").exists()
    r = cli("eval", runs["sft"], "--lm-data", runs["text"], "-o", ".", "--overwrite", "-q")
    assert r.code == 2 and "current one" in r.err
    r = cli("eval", runs["sft"], "--lm-data", runs["text"], "-o", "ev", "--report", "ev", "-q")
    assert r.code == 2 and "two separate directories" in r.err
    r = cli("eval", runs["sft"], "--lm-data", runs["text"], "-o", "ev", "-q")
    assert r.code == 0 and (tmp_path / "ev" / "summary.json").exists()
    r = cli("eval", runs["sft"], "--lm-data", runs["text"], "-o", "ev", "--overwrite", "-q")
    assert r.code == 0, r
