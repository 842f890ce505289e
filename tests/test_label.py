"""label: ranking parsing with literal values, then the real prompt driven through StringIO, a pipe and a pty."""

from __future__ import annotations

import io
import json
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from rich.console import Console

from instructcli import data
from instructcli.errors import DataError, InstructError
from instructcli.label import add_noise, parse_ranking, ranks_from_scores, run

ROOT = Path(__file__).resolve().parent.parent

SAMPLES = [
    {"id": "s1", "prompt": "Name a colour.", "responses": ["red", "a nice blue", "green!"], "model": "m"},
    {"id": "s2", "prompt": "Say hi.", "responses": ["hi", "hello", "hey there"], "model": "m"},
    {"id": "s3", "prompt": "Count to two.", "responses": ["1 2", "one, two", "1"], "model": "m"},
]


def write_samples(path: Path, rows=SAMPLES) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def label(samples: Path, out: Path, answers: str, **kw) -> tuple[dict, str]:
    """run() through its real prompt: answers piped in, the rich output captured."""
    buf = io.StringIO()
    con = Console(file=buf, width=100, color_system=None, highlight=False)
    summary = run(str(samples), str(out), input_stream=io.StringIO(answers), output_console=con, **kw)
    return summary, buf.getvalue()


# ------------------------------------------------------------------------------------------ pure parts
def test_parse_ranking_values():
    assert parse_ranking("2 1 4 3", 4) == [2, 1, 4, 3]
    # dense ranking: 2 and 1 tie for rank 1, then 4 (rank 2), then 3 (rank 3); listed per response
    assert parse_ranking("2=1 4 3", 4) == [1, 1, 3, 2]
    assert parse_ranking(" 3 = 4  1,2 ", 4) == [2, 3, 1, 1]
    assert parse_ranking("1 2", 2) == [1, 2]
    assert parse_ranking("1=3 2=4", 4) == [1, 2, 1, 2]


@pytest.mark.parametrize("text,k,message", [
    ("1 2 3", 4, "response 4 is missing"),
    ("1 2", 4, "responses 3 and 4 are missing"),
    ("1 1 2 3", 4, "response 1 appears twice"),
    ("1 2=2 3 4", 4, "response 2 appears twice"),
    ("1 2 3 5", 4, "response 5 does not exist (K = 4)"),
    ("0 1 2 3", 4, "response 0 does not exist (K = 4)"),
    ("abc", 4, '"abc" is not a response number (1 to 4)'),
    ("1 -2 3 4", 4, '"-2" is not a response number (1 to 4)'),
    ("1== 2 3 4", 4, '"1==2": "=" must join two response numbers'),
    ("1=2=3=4", 4, "all responses are tied: nothing to learn from"),
    ("1=2", 2, "all responses are tied"),
    ("   ", 3, "no ranking given"),
])
def test_parse_ranking_errors(text, k, message):
    with pytest.raises(ValueError) as e:
        parse_ranking(text, k)
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_ranks_from_scores():
    assert ranks_from_scores([0.5, 2, 0.5, 1]) == [3, 1, 3, 2]
    assert ranks_from_scores([3, 1, 2]) == [1, 3, 2]
    assert ranks_from_scores([1.0, 1, 1]) == [1, 1, 1]
    with pytest.raises(ValueError):
        ranks_from_scores([1.0, float("nan")])


class ScriptedRng:
    def __init__(self, draws):
        self.draws = list(draws)

    def random(self):
        return self.draws.pop(0)


def test_add_noise():
    rng = random.Random(0)
    assert add_noise([2, 1, 4, 3], 0.0, rng) == [2, 1, 4, 3]
    # p = 1: one left-to-right pass swaps every adjacent pair, so the best response sinks to the end:
    # order [r0, r1, r2, r3] -> [r1, r0, ..] -> [r1, r2, r0, ..] -> [r1, r2, r3, r0]
    assert add_noise([1, 2, 3, 4], 1.0, rng) == [4, 1, 2, 3]
    # best-to-worst order of [2, 1, 4, 3] is [r1, r0, r3, r2] -> [r0, r3, r2, r1]
    assert add_noise([2, 1, 4, 3], 1.0, rng) == [1, 4, 3, 2]
    # ties keep their rank values in place; the responses move: [r0, r1 | r2] -> [r1, r2, r0]
    assert add_noise([1, 1, 2], 1.0, rng) == [2, 1, 1]
    # only the draw below p swaps: the middle pair
    assert add_noise([1, 2, 3, 4], 0.5, ScriptedRng([0.9, 0.1, 0.9])) == [1, 3, 2, 4]
    with pytest.raises(ValueError):
        add_noise([1, 2], 1.5, rng)


# -------------------------------------------------------------------------------------- the real prompt
def test_prompt_session_resume_undo_skip(tmp_path):
    samples, out = write_samples(tmp_path / "samples.jsonl"), tmp_path / "prefs.jsonl"

    summary, shown = label(samples, out, "2 1 3\n9 9\n1=2 3\nq\n")
    assert rows(out) == [
        {"prompt": "Name a colour.", "responses": ["red", "a nice blue", "green!"], "ranks": [2, 1, 3], "id": "s1"},
        {"prompt": "Say hi.", "responses": ["hi", "hello", "hey there"], "ranks": [1, 1, 2], "id": "s2"},
    ]
    assert summary == {"labeled": 2, "skipped": 0, "already": 0, "total": 3, "out": str(out), "remaining": 1,
                       "unrankable": 0}
    assert "invalid answer: response 9 does not exist (K = 3)" in shown
    assert shown.count("sample 2 of 3") == 1  # asked again without re-showing, and no row for the garbage
    assert 'rank (best first, e.g. "2 1 3", ties "2=1 3"), s=skip, u=undo, q=quit: ' in shown
    for text in ("Name a colour.", "a nice blue", "response 1", "response 3"):
        assert text in shown
    assert data.load(str(out), "comparisons").rows == 2

    # undo with nothing answered in this run: takes back the file's last row (s2) and shows that sample again
    summary, shown = label(samples, out, "u\nq\n")
    assert "undone: sample s2" in shown and shown.count("sample 2 of 3") == 1
    assert [r["id"] for r in rows(out)] == ["s1"]
    assert summary == {"labeled": 0, "skipped": 0, "already": 1, "total": 3, "out": str(out), "remaining": 2,
                       "unrankable": 0}
    assert not list(tmp_path.glob(".prefs.jsonl.*"))  # the atomic rewrite left no temp file

    # resumes at sample 2; a skip goes to the sidecar; EOF at the closing "u/q" prompt quits
    summary, shown = label(samples, out, "1 2=3\ns\n")
    assert "sample 2 of 3" in shown and "sample 3 of 3" in shown
    assert "sample 1 of 3" not in shown and "Name a colour." not in shown
    assert "1 of 3 samples already labeled" in shown
    assert [(r["id"], r["ranks"]) for r in rows(out)] == [("s1", [2, 1, 3]), ("s2", [1, 2, 2])]
    assert (tmp_path / "prefs.jsonl.skipped").read_text() == '"s3"\n'
    assert summary == {"labeled": 1, "skipped": 1, "already": 1, "total": 3, "out": str(out), "remaining": 0,
                       "unrankable": 0}
    assert shown.endswith("u=undo the last answer, q=quit: \n")

    # the skip is remembered: a run with everything labeled or skipped asks nothing
    summary, shown = label(samples, out, "1 2 3\n")
    assert "rank (" not in shown and "q=quit" not in shown and "2 of 3 samples already labeled, 1 skipped" in shown
    assert summary == {"labeled": 0, "skipped": 0, "already": 2, "total": 3, "out": str(out), "remaining": 0,
                       "unrankable": 0}
    assert len(rows(out)) == 2

    # without the sidecar, s3 is asked again
    (tmp_path / "prefs.jsonl.skipped").unlink()
    summary, shown = label(samples, out, "3 1 2\nq\n")
    assert "sample 3 of 3" in shown and rows(out)[-1] == {
        "prompt": "Count to two.", "responses": ["1 2", "one, two", "1"], "ranks": [2, 3, 1], "id": "s3"}


def test_undo_within_a_run(tmp_path):
    samples, out = write_samples(tmp_path / "samples.jsonl"), tmp_path / "prefs.jsonl"
    # rank s1, skip s2, undo the skip (s2 again), undo the s1 ranking (s1 again), re-rank both, fix s3 at the end
    answers = "1 2 3\ns\nu\nu\n3 2 1\n2 1 3\n1 2 3\nu\n1=3 2\nq\n"
    summary, shown = label(samples, out, answers)
    assert [(r["id"], r["ranks"]) for r in rows(out)] == [("s1", [3, 2, 1]), ("s2", [2, 1, 3]), ("s3", [1, 2, 1])]
    assert (tmp_path / "prefs.jsonl.skipped").read_text() == ""
    assert shown.count("undone: sample") == 3
    assert summary["labeled"] == 3 and summary["skipped"] == 0
    # nothing to undo in a fresh file
    out2 = tmp_path / "fresh.jsonl"
    _, shown = label(samples, out2, "u\nq\n")
    assert "nothing to undo" in shown and not out2.exists()


def test_all_tied_is_refused_and_chat_context_kept(tmp_path):
    chat = {"id": 7, "prompt": "and now?", "model": "m", "responses": ["a", "b", "c"],
            "messages": [{"role": "system", "content": "be [bold]brief[/bold]"}, {"role": "user", "content": "hi"},
                         {"role": "assistant", "content": "hello"}, {"role": "user", "content": "and now?"}]}
    one = {"id": "lonely", "prompt": "p", "responses": ["just one"], "model": "m"}
    samples, out = write_samples(tmp_path / "s.jsonl", [one, chat]), tmp_path / "o.jsonl"
    summary, shown = label(samples, out, "1=2=3\n3 1=2\n")
    assert "all responses are tied" in shown
    assert "sample lonely has 1 response: nothing to rank, skipped" in shown
    assert "be [bold]brief[/bold]" in shown  # content is shown literally, not as rich markup
    assert rows(out) == [{"prompt": "and now?", "responses": ["a", "b", "c"], "ranks": [2, 2, 1], "id": "7",
                          "messages": chat["messages"]}]
    comp = data.load(str(out), "comparisons").records[0]
    assert comp.messages == chat["messages"] and comp.ranks == [2, 2, 1]
    assert summary["total"] == 1 and summary["unrankable"] == 1


def test_bad_output_file_is_an_error(tmp_path):
    samples = write_samples(tmp_path / "s.jsonl")
    out = tmp_path / "o.jsonl"
    good = {"prompt": "p", "responses": ["a", "b"], "ranks": [1, 2], "id": "s1"}
    out.write_text(json.dumps(good) + "\n{not json\n")
    with pytest.raises(InstructError) as e:
        label(samples, out, "q\n")
    assert e.value.exit_code == 2 and str(e.value).startswith(f"{out}:2: invalid JSON")
    out.write_text(json.dumps(good) + "\n" + json.dumps({**good, "ranks": [1, 1]}) + "\n")
    with pytest.raises(InstructError, match=r":2: ranks: all responses are tied"):
        label(samples, out, "q\n")
    out.write_text(json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}) + "\n")
    with pytest.raises(InstructError, match=r"o.jsonl:1: id: missing"):
        label(samples, out, "q\n")
    assert out.read_text().count("\n") == 1  # nothing appended
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "x", "prompt": "p"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:1: responses: missing"):
        label(bad, tmp_path / "o2.jsonl", "q\n")
    with pytest.raises(InstructError, match="does not exist"):
        label(samples, tmp_path / "no" / "o.jsonl", "q\n")


def test_output_without_final_newline_is_appended_cleanly(tmp_path):
    samples, out = write_samples(tmp_path / "s.jsonl"), tmp_path / "o.jsonl"
    first = {"prompt": "Name a colour.", "responses": ["red", "a nice blue", "green!"], "ranks": [1, 2, 3], "id": "s1"}
    out.write_text(json.dumps(first))
    label(samples, out, "3 2 1\nq\n")
    assert [r["id"] for r in rows(out)] == ["s1", "s2"] and rows(out)[1]["ranks"] == [3, 2, 1]


def test_every_answer_is_on_disk_before_the_next_question(tmp_path, monkeypatch):
    samples, out = write_samples(tmp_path / "s.jsonl"), tmp_path / "o.jsonl"
    synced = []
    real_fsync = os.fsync

    def fsync(fd):
        real_fsync(fd)
        synced.append(len(rows(out)) if out.exists() else 0)

    monkeypatch.setattr(os, "fsync", fsync)
    seen_at_ask = []

    class Answers(io.StringIO):
        def readline(self, *a):
            seen_at_ask.append(len(rows(out)) if out.exists() else 0)
            return super().readline(*a)

    con = Console(file=io.StringIO(), width=100, color_system=None)
    run(str(samples), str(out), input_stream=Answers("1 2 3\n2 1 3\nq\n"), output_console=con)
    assert synced == [1, 2]  # one fsync per row, after the row was written
    assert seen_at_ask == [0, 1, 2]


# --------------------------------------------------------------------------------- a real process's stdin
SCRIPT = ("import json, sys; from instructcli.label import run; "
          "print(json.dumps(run(sys.argv[1], sys.argv[2])))")


def test_subprocess_with_piped_stdin(tmp_path):
    samples, out = write_samples(tmp_path / "s.jsonl"), tmp_path / "o.jsonl"
    p = subprocess.run([sys.executable, "-c", SCRIPT, str(samples), str(out)], input="3 2 1\n4 1 2\n1 2=3\nq\n",
                       capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout) == {"labeled": 2, "skipped": 0, "already": 0, "total": 3, "out": str(out),
                                    "remaining": 1, "unrankable": 0}  # stdout holds only the result
    assert "response 4 does not exist (K = 3)" in p.stderr and "Name a colour." in p.stderr
    assert [(r["id"], r["ranks"]) for r in rows(out)] == [("s1", [3, 2, 1]), ("s2", [1, 2, 2])]


@pytest.mark.skipif(not hasattr(os, "openpty"), reason="needs a pseudo-terminal")
def test_pseudo_terminal(tmp_path):
    samples, out = write_samples(tmp_path / "s.jsonl"), tmp_path / "o.jsonl"
    master, slave = os.openpty()
    env = {**os.environ, "TERM": "xterm", "COLUMNS": "100"}
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT, str(samples), str(out)], stdin=slave, stdout=slave,
                            stderr=slave, cwd=ROOT, env=env, close_fds=True)
    os.close(slave)
    seen = bytearray()

    def pump():
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError:
                return
            if not chunk:
                return
            seen.extend(chunk)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()

    def wait_for_prompts(n: int):
        deadline = time.monotonic() + 20
        while seen.count(b"q=quit: ") < n:
            assert time.monotonic() < deadline and proc.poll() is None, seen.decode(errors="replace")
            time.sleep(0.01)

    try:
        for i, answer in enumerate(["2 3 1", "7", "1 3 2", "s", "q"], start=1):
            wait_for_prompts(i)
            os.write(master, answer.encode() + b"\r")
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        reader.join(timeout=5)
        os.close(master)
    text = seen.decode(errors="replace")
    assert "response 7 does not exist (K = 3)" in text
    assert [(r["id"], r["ranks"]) for r in rows(out)] == [("s1", [3, 1, 2]), ("s2", [1, 3, 2])]
    assert (tmp_path / "o.jsonl.skipped").read_text() == '"s3"\n'


# ------------------------------------------------------------------------------------------- judge mode
def by_length(sample):
    return [len(r) for r in sample.responses]


def test_judge_ranks_by_score(tmp_path):
    rows_in = SAMPLES + [{"id": "s4", "prompt": "p", "responses": ["ab", "cd", "e"], "model": "m"},
                         {"id": "s5", "prompt": "p", "responses": ["xx", "yy"], "model": "m"}]
    samples, out = write_samples(tmp_path / "s.jsonl", rows_in), tmp_path / "o.jsonl"
    summary, shown = label(samples, out, "", judge=by_length)
    # lengths: s1 [3, 11, 6], s2 [2, 5, 9], s3 [3, 8, 1], s4 [2, 2, 1] (tie), s5 [2, 2] all tied -> skipped
    assert [(r["id"], r["ranks"]) for r in rows(out)] == [("s1", [3, 1, 2]), ("s2", [3, 2, 1]), ("s3", [2, 1, 3]),
                                                         ("s4", [1, 1, 2])]
    assert (tmp_path / "o.jsonl.skipped").read_text() == '"s5"\n'
    assert "s5: the judge scored every response the same" in shown
    assert summary == {"labeled": 4, "skipped": 1, "already": 0, "total": 5, "out": str(out), "remaining": 0,
                       "unrankable": 0}
    assert "rank (" not in shown  # no input is read


def test_judge_noise(tmp_path):
    samples = write_samples(tmp_path / "s.jsonl")
    out = tmp_path / "all_swapped.jsonl"
    label(samples, out, "", judge=by_length, noise=1.0)
    # noise 1 sinks each best response to the end: s1 [3, 1, 2] -> order r1 r2 r0 -> r2 r0 r1 -> [2, 3, 1]
    assert [r["ranks"] for r in rows(out)] == [[2, 3, 1], [2, 1, 3], [1, 3, 2]]
    with pytest.raises(InstructError):
        label(samples, tmp_path / "x.jsonl", "", judge=by_length, noise=1.5)
    with pytest.raises(InstructError, match="judge"):
        label(samples, tmp_path / "x.jsonl", "", noise=0.3)


def test_judge_resume_after_interrupt(tmp_path):
    samples, out = write_samples(tmp_path / "s.jsonl"), tmp_path / "o.jsonl"
    calls = []

    def flaky(sample):
        calls.append(sample.id)
        if sample.id == "s2":
            raise KeyboardInterrupt
        return by_length(sample)

    with pytest.raises(KeyboardInterrupt):
        label(samples, out, "", judge=flaky)
    assert [r["id"] for r in rows(out)] == ["s1"]
    calls.clear()
    summary, _ = label(samples, out, "", judge=by_length)
    assert [(r["id"], r["ranks"]) for r in rows(out)] == [("s1", [3, 1, 2]), ("s2", [3, 2, 1]), ("s3", [2, 1, 3])]
    assert summary["labeled"] == 2 and summary["already"] == 1

    # with noise, a resumed run writes what an uninterrupted one would (each sample draws from seed + id)
    whole, part = tmp_path / "whole.jsonl", tmp_path / "part.jsonl"
    label(samples, whole, "", judge=by_length, noise=0.5, seed=3)
    with pytest.raises(KeyboardInterrupt):
        label(samples, part, "", judge=flaky, noise=0.5, seed=3)
    label(samples, part, "", judge=by_length, noise=0.5, seed=3)
    assert rows(part) == rows(whole)


def test_judge_bad_scores(tmp_path):
    samples, out = write_samples(tmp_path / "s.jsonl"), tmp_path / "o.jsonl"
    with pytest.raises(InstructError, match="expected 3 finite numbers") as e:
        label(samples, out, "", judge=lambda s: [1.0, 2.0])
    assert e.value.exit_code == 1
    with pytest.raises(InstructError, match="finite"):
        label(samples, out, "", judge=lambda s: [1.0, float("inf"), 0.0])
