"""rm and score on the tiny model: accuracy on a separable preference, normalisation, padding, formats."""

import json
import random

import pytest
import torch

from conftest import write_jsonl
from instructcli import batches, data, models, rm, tokens
from instructcli.config import ModelConfig

WORDS = ["sun", "tree", "river", "stone", "cloud", "bird", "road", "lamp"]


def comparisons(n, seed=0):
    """K = 4 responses; the more times 'yes' appears, the better: a preference a small RM can learn."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        counts = rng.sample(range(4), 4)
        responses = [" ".join(["yes"] * c + rng.sample(WORDS, 3 - c + 1)) for c in counts]
        ranks = [4 - c for c in counts]
        rows.append({"prompt": f"Question {i}: {rng.choice(WORDS)}?", "responses": responses, "ranks": ranks})
    return rows


@pytest.fixture(scope="module")
def rm_dir(tiny_dir, tmp_path_factory):
    from instructcli import config as C

    d = tmp_path_factory.mktemp("rm")
    path = write_jsonl(d / "cmp.jsonl", comparisons(120))
    out = rm.train(C.RMConfig(data=str(path), out=str(d / "rm"), quiet=True,
                              model=C.ModelConfig(model=str(tiny_dir), lora_r=8),
                              train=C.TrainConfig(lr=5e-3, batch_size=4, epochs=3, eval_frac=0.2, eval_every=20,
                                                  warmup=0.0, save_every=0)))
    return out, path


def test_rm_learns_a_separable_preference(rm_dir):
    out, _ = rm_dir
    man = json.loads((out / "instruct.json").read_text())
    m = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert man["stage"] == "rm" and man["metrics"]["eval_accuracy"] >= 0.8, man["metrics"]
    first_eval = next(x for x in m if "eval_accuracy" in x)
    assert m[-1]["eval_loss"] < first_eval["eval_loss"] or first_eval["eval_accuracy"] >= 0.8
    assert (out / "score_head.safetensors").exists() and (out / "adapter_model.safetensors").exists()
    # the held-out accuracy comes with its bootstrap CI over the held-out prompts, in the manifest and the metrics
    lo, hi = man["metrics"]["eval_accuracy_ci95_lo"], man["metrics"]["eval_accuracy_ci95_hi"]
    assert 0.5 < lo <= man["metrics"]["eval_accuracy"] <= hi <= 1.0
    assert (m[-1]["eval_accuracy_ci95_lo"], m[-1]["eval_accuracy_ci95_hi"]) == (lo, hi)


def test_rm_warns_when_its_held_out_accuracy_does_not_clear_chance(cli, tiny_dir, tmp_path):
    rows = comparisons(40)
    for r in rows[::2]:  # half the rankings reversed: no preference to learn
        r["ranks"] = [5 - x for x in r["ranks"]]
    path = write_jsonl(tmp_path / "cmp.jsonl", rows)
    r = cli("rm", path, "-m", tiny_dir, "-o", tmp_path / "rm", "--max-steps", 2, "-b", 4, "--eval-frac", 0.25, "-q")
    assert r.code == 0, r
    metrics = json.loads((tmp_path / "rm" / "instruct.json").read_text())["metrics"]
    lo, hi = metrics["eval_accuracy_ci95_lo"], metrics["eval_accuracy_ci95_hi"]
    assert lo <= 0.5 and lo <= metrics["eval_accuracy"] <= hi
    assert f"held-out accuracy {metrics['eval_accuracy']:.2f} [{lo:.2f}, {hi:.2f}] on 10 prompts does not show" in r.err
    assert "above chance" in r.err


def test_normalisation_makes_the_reference_mean_zero(rm_dir):
    out, cmp_path = rm_dir
    model, tok, man = models.load_reward_model(str(out), ModelConfig(), "cpu")
    assert man["reward_norm"]["bias"] != 0.0
    # the default reference: best-ranked responses of the training split
    rows = data.load(str(cmp_path), "comparisons").records
    train_idx, _ = data.split(len(rows), 0.2, 0)
    best = [(rows[i].messages, rows[i].responses[rows[i].ranks.index(1)]) for i in train_idx]
    scores = torch.tensor([models.reward_scores(model, tok, m, [r], 512)[0] for m, r in best])
    assert man["reward_norm"]["n"] == len(best)
    assert abs(scores.mean().item()) < 1e-4


def test_head_reads_the_last_real_token_under_left_and_right_padding(rm_dir):
    out, _ = rm_dir
    model, tok, _ = models.load_reward_model(str(out), ModelConfig(), "cpu")
    a, b = [5, 6, 7, 8, 9, 10], [11, 12]
    assert model.pool == "mean"  # the default: the response's mean too, from where each response starts
    with torch.no_grad():
        alone = [model(torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long), torch.tensor([1])).item()
                 for s in (a, b)]
        for side, starts in (("right", [1, 1]), ("left", [1, 5])):  # left padding moves b's start by 4
            batch = batches.collate_sequences([a, b], tok.pad_token_id, side)
            got = model(batch["input_ids"], batch["attention_mask"], torch.tensor(starts)).tolist()
            assert got == pytest.approx(alone, abs=1e-5), side


def test_equal_responses_share_one_score(rm_dir, monkeypatch):
    out, _ = rm_dir
    model, tok, _ = models.load_reward_model(str(out), ModelConfig(), "cpu")
    real = model.score
    # as on CPUs whose kernels round a batch's rows by their position: equal rows differ in the last bits
    monkeypatch.setattr(model, "score",
                        lambda ids, attn, starts: real(ids, attn, starts) + 1e-6 * torch.arange(len(ids)))
    s = models.reward_scores(model, tok, [{"role": "user", "content": "Question?"}],
                             ["yes yes sun", "sun tree river", "yes yes sun", "yes yes sun"],
                             ended=[True, True, True, False])
    assert s[0] == s[2]  # the same answer, the same score: two models' equal answers tie
    assert s[3] != s[0] and s[0] > s[1]  # cut off, it reads differently; more "yes" scores higher


def test_score_adds_one_normalised_score_per_response(cli, rm_dir, tmp_path):
    out, _ = rm_dir
    samples = write_jsonl(tmp_path / "s.jsonl", [
        {"id": "a", "prompt": "Question?", "responses": ["yes yes yes sun", "sun tree river road"], "model": "m",
         "keep": 1},
        {"id": "b", "prompt": "Other?", "responses": ["", "yes"], "model": "m"},
    ])
    r = cli("score", out, samples, "-o", "-", "-q")
    assert r.code == 0, r
    rows = [json.loads(l) for l in r.out.splitlines()]
    assert [x["id"] for x in rows] == ["a", "b"] and rows[0]["keep"] == 1
    assert all(len(x["scores"]) == len(x["responses"]) for x in rows)
    assert rows[0]["scores"][0] > rows[0]["scores"][1]  # more "yes" scores higher
    stdin = samples.read_bytes()
    r2 = cli("score", out, "-", "-q", stdin=stdin)
    assert [json.loads(l)["scores"] for l in r2.out.splitlines()] == [x["scores"] for x in rows]


def test_score_refuses_a_non_rm_dir(cli, tiny_dir, tmp_path):
    samples = write_jsonl(tmp_path / "s.jsonl", [{"prompt": "q", "responses": ["a"]}])
    r = cli("score", tiny_dir, samples)
    assert r.code == 2 and "not a reward model run dir" in r.err


def test_rm_bad_rankings_exit_2(cli, tiny_dir, tmp_path):
    bad = write_jsonl(tmp_path / "c.jsonl", [{"prompt": "q", "responses": ["a", "b", "c"], "ranks": [1, 2]}])
    r = cli("rm", bad, "-o", tmp_path / "rm", "--model", tiny_dir)
    assert r.code == 2 and "c.jsonl:1: ranks: expected 3 ranks" in r.err
    assert not (tmp_path / "rm").exists() and not (tmp_path / "rm.partial").exists()


def test_label_with_rule_and_rm_judges_writes_rows_rm_reads(cli, rm_dir, tmp_path):
    rule = tmp_path / "rule.py"
    rule.write_text("def yes_count(prompt, response):\n    return response.count('yes')\n")
    samples = write_jsonl(tmp_path / "s.jsonl", [
        {"id": "a", "prompt": "Q?", "responses": ["yes", "yes yes yes", "no", "yes yes"]},
        {"id": "b", "prompt": "R?", "responses": ["no", "yes"]},
    ])
    out = tmp_path / "c.jsonl"
    r = cli("label", samples, "-o", out, "--judge", f"{rule}:yes_count")
    assert r.code == 0, r
    assert json.loads(r.out)["labeled"] == 2
    rows = data.load(str(out), "comparisons").records
    assert [x.ranks for x in rows] == [[3, 1, 4, 2], [2, 1]]
    out2 = tmp_path / "c2.jsonl"
    r = cli("label", samples, "-o", out2, "--judge", f"rm:{rm_dir[0]}")
    assert r.code == 0, r
    got = data.load(str(out2), "comparisons").records
    assert got[0].ranks[1] < got[0].ranks[2]  # the trained RM prefers "yes yes yes" to "no"
    r = cli("label", samples, "-o", tmp_path / "c3.jsonl", "--judge", f"{rule}:nope")
    assert r.code == 2 and "has no function 'nope'" in r.err


def test_a_cut_off_answer_is_read_without_the_end_of_turn_token(rm_dir, tiny_dir):
    """The score is read at the end-of-turn token (not at what the template renders after it); an answer cut
    off at the token cap has none, so the RM can tell it from the same words ended."""
    out, _ = rm_dir
    model, tok, _ = models.load_reward_model(str(out), ModelConfig(), "cpu")
    eot = tokens.end_of_turn_id(tok)
    msgs = [{"role": "user", "content": "Question 1: sun?"}]
    ended, cut = tokens.encode_responses(tok, msgs, ["yes yes sun", "yes yes sun"], 256, "truncate",
                                       tokens.OverflowStats(), "", ended=[True, False])
    assert eot == tok.convert_tokens_to_ids("<|im_end|>") and ended[-1] == eot and ended[:-1] == cut
    full = tokens.encode_demonstration(tok, msgs + [{"role": "assistant", "content": "yes yes sun"}])[0]
    assert full[:len(ended)] == ended and len(full) > len(ended)  # the template's trailing newline is not read
    a, b = models.reward_scores(model, tok, msgs, ["yes yes sun"] * 2, ended=[True, False])
    assert a != pytest.approx(b, abs=1e-4)
    assert models.reward_scores(model, tok, msgs, ["yes yes sun"])[0] == pytest.approx(a, abs=1e-5)


def test_normalisation_gives_the_training_responses_unit_spread(rm_dir):
    """(raw - bias) x scale: the reference scores 0 on average and the training responses (the policy's own
    samples when the rankings are on-policy) have std 1, so --kl means the same against any RM."""
    out, cmp_path = rm_dir
    model, tok, man = models.load_reward_model(str(out), ModelConfig(), "cpu")
    rows = data.load(str(cmp_path), "comparisons").records
    train_idx, _ = data.split(len(rows), 0.2, 0)
    scores = []
    for i in train_idx:
        scores += models.reward_scores(model, tok, rows[i].messages, rows[i].responses, 512)
    assert man["reward_norm"]["scale"] == pytest.approx(model.scale) and model.scale != 1.0
    assert torch.tensor(scores).std().item() == pytest.approx(1.0, abs=1e-3)


def test_bad_pool_and_score_depth_exit_2_before_anything_is_written(cli, tiny_dir, tmp_path):
    cmp = write_jsonl(tmp_path / "c.jsonl", comparisons(4))
    for flags, msg in ((["--pool", "max"], "--pool: expected one of last | mean, got 'max'"),
                       (["--score-depth", 0], "--score-depth: must be in (0, 1], got 0.0"),
                       (["--score-depth", 1.5], "--score-depth: must be in (0, 1], got 1.5")):
        r = cli("rm", cmp, "-o", tmp_path / "rm", "--model", tiny_dir, *flags)
        assert r.code == 2 and r.err.strip() == f"error: {msg}" and not (tmp_path / "rm.partial").exists(), r
    from instructcli import config as C

    with pytest.raises(Exception, match="--score-depth"):  # a config built in Python too
        rm.train(C.RMConfig(data=str(cmp), out=str(tmp_path / "py"), score_depth=-1.0,
                            model=C.ModelConfig(model=str(tiny_dir))))
    assert not (tmp_path / "py.partial").exists()
