"""data.py: every row kind, every error kind (path:line: field: problem), masking token by token, overflow."""

import json

import pytest
from transformers import AutoTokenizer

from conftest import SAMPLES, write_jsonl
from instructcli import data, tokens
from instructcli.errors import DataError, InstructError

U = {"role": "user", "content": "hi"}
A = {"role": "assistant", "content": "hello"}
S = {"role": "system", "content": "be brief"}


def err(tmp_path, kind, line, name="d.jsonl"):
    p = tmp_path / name
    p.write_text(line + "\n" if isinstance(line, str) else "", encoding="utf-8")
    with pytest.raises(InstructError) as e:
        data.load(str(p), kind)
    return str(e.value).replace(str(p), "F")


@pytest.mark.parametrize("kind,row,expected", [
    ("demonstrations", '{"prompt": "x"', "F:1: invalid JSON"),
    ("demonstrations", '[1, 2]', "F:1: expected a JSON object, got array"),
    ("demonstrations", '{"prompt": "x"}', "F:1: response: missing"),
    ("demonstrations", '{"prompt": 3, "response": "y"}', "F:1: prompt: expected a string, got integer"),
    ("demonstrations", '{"prompt": "  ", "response": "y"}', "F:1: prompt: empty string"),
    ("demonstrations", '{"prompt": "x", "response": NaN}', "F:1: invalid JSON: NaN is not valid JSON"),
    ("demonstrations", json.dumps({"messages": [U]}), "F:1: messages[0].role: the last message must be assistant"),
    ("demonstrations", json.dumps({"messages": [U, A, A]}), "F:1: messages[2].role: expected user"),
    ("demonstrations", json.dumps({"messages": [U, S, A]}), "F:1: messages[1].role: system is only allowed"),
    ("demonstrations", json.dumps({"messages": [{"role": "bot", "content": "x"}]}), "F:1: messages[0].role: expected one of"),
    ("demonstrations", json.dumps({"messages": []}), "F:1: messages: empty array"),
    ("demonstrations", json.dumps({"messages": "hi"}), "F:1: messages: expected an array, got string"),
    ("demonstrations", json.dumps({"messages": [{"role": "user"}, A]}), "F:1: messages[0].content: missing"),
    ("prompts", json.dumps({"messages": [U, A]}), "F:1: messages[1].role: the last message must be user"),
    ("prompts", json.dumps({"prompt": "x", "id": [1]}), "F:1: id: expected a string or integer, got array"),
    ("comparisons", json.dumps({"prompt": "x", "chosen": "a"}), "F:1: rejected: missing"),
    ("comparisons", json.dumps({"prompt": "x", "responses": ["a", "b"], "ranks": [1]}), "F:1: ranks: expected 2 ranks"),
    ("comparisons", json.dumps({"prompt": "x", "responses": ["a", "b"], "ranks": [1, 0]}), "F:1: ranks[1]: expected an integer >= 1"),
    ("comparisons", json.dumps({"prompt": "x", "responses": ["a", "b"], "ranks": [1, 1]}), "F:1: ranks: all responses are tied"),
    ("comparisons", json.dumps({"prompt": "x", "responses": ["a"], "ranks": [1]}), "F:1: responses: expected at least 2"),
    ("comparisons", json.dumps({"prompt": "x", "responses": ["a", ""], "ranks": [1, 2]}), "F:1: responses[1]: empty string"),
    ("pretraining", json.dumps({"txt": "x"}), "F:1: text: missing"),
    ("samples", json.dumps({"prompt": "x", "responses": "y"}), "F:1: responses: expected an array, got string"),
    ("samples", json.dumps({"prompt": "x", "responses": ["a", "b"], "ended": [True]}),
     "F:1: ended: expected an array of 2 booleans (one per response), got [true]"),
    ("comparisons", json.dumps({"prompt": "x", "responses": ["a", "b"], "ranks": [1, 2], "ended": [1, 0]}),
     "F:1: ended: expected an array of 2 booleans"),
])
def test_each_error_kind_names_file_line_and_field(tmp_path, kind, row, expected):
    assert err(tmp_path, kind, row).startswith(expected)


def test_error_line_number_counts_physical_lines(tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "response": "b"}, "", {"prompt": "a"}])
    with pytest.raises(DataError) as e:
        data.load(str(p), "demonstrations")
    assert (e.value.line, e.value.field, e.value.problem) == (3, "response", "missing")


def test_invalid_utf8_empty_missing_and_directory(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_bytes(b'{"text": "ok"}\n{"text": "\xff\xfe"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: invalid UTF-8"):
        data.load(str(p), "pretraining")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match="empty file"):
        data.load(str(tmp_path / "empty.jsonl"), "pretraining")
    with pytest.raises(InstructError, match="no such file"):
        data.load(str(tmp_path / "nope.jsonl"), "pretraining")
    with pytest.raises(InstructError, match="is a directory"):
        data.load(str(tmp_path), "pretraining")


def test_bom_crlf_and_extra_keys_are_accepted(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_bytes(b'\xef\xbb\xbf{"prompt": "a", "response": "b", "task": "qa"}\r\n{"prompt": "c", "response": "d"}\r\n')
    got = data.load(str(p), "demonstrations")
    assert got.rows == 2 and got.records[1].messages[1]["content"] == "d"


def test_skip_invalid_counts_and_warns(tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "response": "b"}, "{oops", {"prompt": 1, "response": "x"}])
    warned = []
    got = data.load(str(p), "demonstrations", skip_invalid=True, warn=warned.append)
    assert (got.rows, got.skipped) == (1, 2)
    assert "d.jsonl:2" in warned[0] and "d.jsonl:3: prompt" in warned[1]
    p2 = write_jsonl(tmp_path / "e.jsonl", ["{oops"])
    with pytest.raises(DataError, match="no valid rows"):
        data.load(str(p2), "demonstrations", skip_invalid=True)


def test_pairwise_and_kway_comparisons(tmp_path):
    p = write_jsonl(tmp_path / "c.jsonl", [
        {"prompt": "q", "chosen": "good", "rejected": "bad"},
        {"prompt": "q2", "responses": ["a", "b", "c"], "ranks": [2, 1, 2]},
        {"messages": [U], "chosen": "x", "rejected": "y"},
    ])
    c = data.load(str(p), "comparisons").records
    assert (c[0].responses, c[0].ranks) == (["good", "bad"], [1, 2])
    assert c[1].ranks == [2, 1, 2] and c[1].prompt == "q2"
    assert c[2].messages == [U]


def test_prompts_ids_default_to_row_number_and_stdin(tmp_path, monkeypatch):
    import io
    import sys

    rows = b'{"prompt": "a"}\n{"id": "z", "messages": [{"role": "user", "content": "b"}]}\n'
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(rows)))
    got = data.load("-", "prompts")
    assert [(r.id, r.prompt) for r in got.records] == [("1", "a"), ("z", "b")]
    assert got.path == "<stdin>"


@pytest.mark.parametrize("name,kind", [("demonstrations.jsonl", "demonstrations"), ("prompts.jsonl", "prompts"),
                                        ("prompts_heldout.jsonl", "prompts"), ("pretrain.jsonl", "pretraining"),
                                        ("lm_heldout.jsonl", "pretraining"), ("comparisons.jsonl", "comparisons"),
                                        ("truthfulness.jsonl", "mc"), ("toxicity_prompts.jsonl", "prompts")])
def test_shipped_samples_are_valid(name, kind):
    if not (SAMPLES / name).exists():
        pytest.skip(f"{name} not shipped yet")
    got = data.load(str(SAMPLES / name), kind)
    least = {"demonstrations": 200, "pretraining": 60, "comparisons": 150, "mc": 60,
             "prompts": {"prompts.jsonl": 100, "prompts_heldout.jsonl": 30, "toxicity_prompts.jsonl": 60}.get(name)}
    assert got.skipped == 0 and got.rows >= least[kind]


def test_shipped_prompt_sets_are_disjoint():
    def prompts(name, kind):
        return {r.messages[-1]["content"].strip().lower() if kind != "demonstrations" else
                next(m["content"] for m in r.messages if m["role"] == "user").strip().lower()
                for r in data.load(str(SAMPLES / name), kind).records}
    demo = prompts("demonstrations.jsonl", "demonstrations")
    train, heldout = prompts("prompts.jsonl", "prompts"), prompts("prompts_heldout.jsonl", "prompts")
    assert not demo & train and not demo & heldout and not train & heldout
    assert not demo & prompts("comparisons.jsonl", "comparisons")
    assert not heldout & prompts("comparisons.jsonl", "comparisons")  # eval prompts the RM never saw


# ------------------------------------------------------------------------------------------ masking
@pytest.fixture(scope="module")
def tok(tiny_dir):
    return AutoTokenizer.from_pretrained(tiny_dir)


def test_response_only_mask_token_by_token(tok):
    msgs = [{"role": "user", "content": "Add 2 and 3."}, {"role": "assistant", "content": "The sum is 5."}]
    ids, labels = tokens.encode_demonstration(tok, msgs)
    text = tok.apply_chat_template(msgs, tokenize=False)
    assert tok.decode(ids) == text
    prompt_len = len(tok(tok.apply_chat_template(msgs[:1], tokenize=False, add_generation_prompt=True),
                         add_special_tokens=False)["input_ids"])
    assert labels[:prompt_len] == [tokens.IGNORE_INDEX] * prompt_len
    assert labels[prompt_len:] == ids[prompt_len:]
    assert tok.decode(ids[prompt_len:]) == "The sum is 5.<|im_end|>\n"


def test_mask_covers_every_assistant_turn_and_nothing_else(tok):
    msgs = [S, {"role": "user", "content": "one"}, {"role": "assistant", "content": "uno"},
            {"role": "user", "content": "two"}, {"role": "assistant", "content": "dos"}]
    ids, labels = tokens.encode_demonstration(tok, msgs)
    trained = tok.decode([i for i, l in zip(ids, labels) if l != tokens.IGNORE_INDEX])
    assert trained == "uno<|im_end|>\ndos<|im_end|>\n"
    assert all(l in (tokens.IGNORE_INDEX, i) for i, l in zip(ids, labels))


def test_overflow_truncate_drop_error():
    ids, labels = list(range(10)), [-100] * 4 + list(range(4, 10))
    st = tokens.OverflowStats()
    assert tokens.fit_length(ids, labels, 6, "truncate", st, "w") == (ids[:6], labels[:6])
    assert tokens.fit_length(ids, labels, 6, "drop", st, "w") is None
    assert tokens.fit_length(ids, labels, 3, "truncate", st, "w") is None  # prompt alone fills max-len
    assert tokens.fit_length(ids, None, 4, "truncate", st, "w", keep="end") == (ids[-4:], None)
    assert (st.total, st.truncated, st.dropped) == (4, 2, 2)
    with pytest.raises(InstructError, match="longer than --max-len 6"):
        tokens.fit_length(ids, labels, 6, "error", st, "f.jsonl: row 3")



