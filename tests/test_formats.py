"""Data beyond our JSONL: the Hub's common schemas (each from a small file written here in that schema), the
formats `datasets` reads (parquet, JSON, arrow, save_to_disk, a hub id), `--columns`, and `instruct data`."""

import json

import pytest

from conftest import write_jsonl
from instructcli import data
from instructcli.errors import DataError, InstructError

HH_CHOSEN = "\n\nHuman: What is a good name for a cat?\n\nAssistant: How about Miso?\n\nHuman: Another one?\n\nAssistant: Pepper."
HH_REJECTED = "\n\nHuman: What is a good name for a cat?\n\nAssistant: How about Miso?\n\nHuman: Another one?\n\nAssistant: No."


# ------------------------------------------------------------------------------------------ schemas
def test_alpaca_and_sharegpt_demonstrations(tmp_path):
    f = write_jsonl(tmp_path / "a.jsonl", [
        {"instruction": "Translate to French.", "input": "Good morning", "output": "Bonjour"},
        {"instruction": "Name a colour.", "input": "", "output": "Blue"},
        {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi"},
                           {"from": "gpt", "value": "Hello!"}]}])
    got = data.load(str(f), "demonstrations")
    assert got.records[0].messages == [{"role": "user", "content": "Translate to French.\n\nGood morning"},
                                       {"role": "assistant", "content": "Bonjour"}]
    assert got.records[1].messages[0]["content"] == "Name a colour."  # an empty input adds nothing
    assert got.records[2].messages == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                                       {"role": "assistant", "content": "Hello!"}]
    assert got.schemas == {"alpaca": 2, "sharegpt": 1}
    bad = write_jsonl(tmp_path / "b.jsonl", [{"conversations": [{"from": "robot", "value": "x"}]}])
    with pytest.raises(DataError, match=r"b.jsonl:1: conversations\[0\].from: expected one of human, gpt"):
        data.load(str(bad), "demonstrations")


def test_trl_preference_rows_explicit_conversational_and_implicit(tmp_path):
    user = [{"role": "user", "content": "2+2?"}]
    f = write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": "2+2?", "chosen": "4", "rejected": "5"},
        {"prompt": user, "chosen": [{"role": "assistant", "content": "4"}],
         "rejected": [{"role": "assistant", "content": "5"}]},
        {"chosen": user + [{"role": "assistant", "content": "4"}], "rejected": user + [{"role": "assistant", "content": "5"}]}])
    recs = data.load(str(f), "comparisons").records
    for r in recs:
        assert (r.messages, r.responses, r.ranks) == (user, ["4", "5"], [1, 2])


def test_hh_rlhf_transcripts_become_the_shared_chat_and_two_answers(tmp_path):
    f = write_jsonl(tmp_path / "hh.jsonl", [{"chosen": HH_CHOSEN, "rejected": HH_REJECTED}])
    got = data.load(str(f), "comparisons")
    r = got.records[0]
    assert r.messages == [{"role": "user", "content": "What is a good name for a cat?"},
                          {"role": "assistant", "content": "How about Miso?"}, {"role": "user", "content": "Another one?"}]
    assert (r.responses, r.ranks, got.schemas) == (["Pepper.", "No."], [1, 2], {"hh-rlhf": 1})
    other = HH_REJECTED.replace("Miso", "Tom")
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"chosen": HH_CHOSEN, "rejected": other}])
    with pytest.raises(DataError, match=r"bad.jsonl:1: rejected: its turns before the last Assistant turn differ"):
        data.load(str(bad), "comparisons")


def test_ultrafeedback_ratings_become_a_k_way_ranking_with_ties(tmp_path):
    f = write_jsonl(tmp_path / "uf.jsonl", [
        {"instruction": "Write a haiku.", "completions": [
            {"response": "a", "overall_score": 6.5}, {"response": "b", "overall_score": 9.0},
            {"response": "c", "overall_score": 6.5}, {"response": "d", "overall_score": 2}]},
        {"prompt": "Say hi.", "completions": ["hi", "hello", "yo"], "ratings": [3, 5, 1]}])
    a, b = data.load(str(f), "comparisons").records
    assert a.messages == [{"role": "user", "content": "Write a haiku."}]
    assert (a.responses, a.ranks) == (["a", "b", "c", "d"], [2, 1, 2, 3])  # equal ratings share a rank
    assert (b.responses, b.ranks) == (["hi", "hello", "yo"], [2, 1, 3])
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "x", "completions": [{"response": "a"}, {"response": "b"}]}])
    with pytest.raises(DataError, match=r"bad.jsonl:1: completions\[0\]: no rating"):
        data.load(str(bad), "comparisons")


def test_prompts_from_alpaca_sharegpt_and_trl_prompt_only_rows(tmp_path):
    f = write_jsonl(tmp_path / "p.jsonl", [
        {"instruction": "Sum up.", "input": "A text.", "output": "ignored"},
        {"conversations": [{"from": "human", "value": "Q1"}, {"from": "gpt", "value": "A1"},
                           {"from": "human", "value": "Q2"}, {"from": "gpt", "value": "A2"}]},
        {"prompt": [{"role": "user", "content": "Hi"}]}])
    recs = data.load(str(f), "prompts").records
    assert recs[0].messages == [{"role": "user", "content": "Sum up.\n\nA text."}]
    assert [m["content"] for m in recs[1].messages] == ["Q1", "A1", "Q2"]  # up to the last user turn
    assert recs[2].messages == [{"role": "user", "content": "Hi"}]


def test_columns_rename_other_field_names(tmp_path):
    f = write_jsonl(tmp_path / "c.jsonl", [{"question": "Why?", "answer": "Because."}])
    got = data.load(str(f), "demonstrations", columns="prompt=question,response=answer")
    assert got.records[0].messages[1]["content"] == "Because."
    g = write_jsonl(tmp_path / "g.jsonl", [{"answer": "Because."}])
    with pytest.raises(DataError, match=r"g.jsonl:1: prompt: missing \(--columns reads it from question\)"):
        data.load(str(g), "demonstrations", columns="prompt=question,response=answer")
    with pytest.raises(InstructError, match="expected OURS=THEIRS"):
        data.load(str(f), "demonstrations", columns="prompt")


# ------------------------------------------------------------------------------------- other formats
ROWS = [{"instruction": f"Say {i}.", "input": "", "output": f"{i}!"} for i in range(5)]


@pytest.fixture
def dataset():
    import datasets

    return datasets.Dataset.from_list(ROWS)


def _check(loaded, fmt):
    assert loaded.rows == 5 and loaded.format == fmt and loaded.schemas == {"alpaca": 5}
    assert [r.messages[1]["content"] for r in loaded.records] == [f"{i}!" for i in range(5)]


def test_parquet_arrow_json_save_to_disk_and_csv(tmp_path, dataset):
    dataset.to_parquet(str(tmp_path / "d.parquet"))
    _check(data.load(str(tmp_path / "d.parquet"), "demonstrations"), "parquet")
    dataset.to_json(str(tmp_path / "d.json"), lines=False)  # a JSON array
    _check(data.load(str(tmp_path / "d.json"), "demonstrations"), "json")
    dataset.save_to_disk(str(tmp_path / "saved"))
    _check(data.load(str(tmp_path / "saved"), "demonstrations"), "save_to_disk")
    arrow = next((tmp_path / "saved").glob("*.arrow"))
    _check(data.load(str(arrow), "demonstrations"), "arrow")
    dataset.to_csv(str(tmp_path / "d.csv"), index=False)
    _check(data.load(str(tmp_path / "d.csv"), "demonstrations"), "CSV")


def test_a_dataset_dict_dir_needs_an_existing_split(tmp_path, dataset):
    import datasets

    datasets.DatasetDict({"train": dataset, "test": dataset.select(range(2))}).save_to_disk(str(tmp_path / "dd"))
    assert data.load(str(tmp_path / "dd"), "demonstrations", split="test").rows == 2
    with pytest.raises(InstructError, match=r"no split 'dev' \(it has train, test\); choose one with --split"):
        data.load(str(tmp_path / "dd"), "demonstrations", split="dev")


def test_bad_rows_in_a_parquet_file_name_the_row_and_field(tmp_path):
    import datasets

    rows = [{"prompt": "a", "response": "b"}, {"prompt": "c", "response": ""}]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "bad.parquet"))
    with pytest.raises(DataError) as e:
        data.load(str(tmp_path / "bad.parquet"), "demonstrations")
    assert str(e.value) == f"{tmp_path / 'bad.parquet'}: row 2: response: empty string"
    got = data.load(str(tmp_path / "bad.parquet"), "demonstrations", skip_invalid=True)
    assert (got.rows, got.skipped) == (1, 1)


def test_a_hub_id_not_in_the_cache_is_one_line_saying_how_to_get_it(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(InstructError) as e:
        data.load("nobody-here/no-such-dataset", "demonstrations")
    msg = str(e.value)
    assert "\n" not in msg and "not a hub dataset in the local cache" in msg
    assert "datasets.load_dataset('nobody-here/no-such-dataset')" in msg


def test_a_hub_id_is_read_with_its_split(monkeypatch, dataset):
    import datasets

    calls = []

    def fake(repo, split):
        calls.append((repo, split))
        return dataset

    monkeypatch.setattr(datasets, "load_dataset", fake)
    _check(data.load("org/name", "demonstrations", split="validation"), "hub")
    assert calls == [("org/name", "validation")]


def test_jsonl_errors_are_unchanged_through_jsonlines(tmp_path):
    f = tmp_path / "x.jsonl"
    f.write_bytes(b'\xef\xbb\xbf{"prompt": "a", "response": "b"}\r\n\n{"prompt": NaN}\n[1]\n\xff\n{"prompt": 1}\n')
    got = data.load(str(f), "demonstrations", skip_invalid=True)
    assert (got.rows, got.skipped) == (1, 4)
    for bad, msg in ((b'{"prompt": NaN}', "invalid JSON: NaN is not valid JSON"),
                     (b"[1]", "expected a JSON object, got array"), (b"\xff", "invalid UTF-8 at byte 0")):
        g = tmp_path / "one.jsonl"
        g.write_bytes(b'{"prompt": "a", "response": "b"}\r\n\n' + bad + b"\n")
        with pytest.raises(DataError) as e:
            data.load(str(g), "demonstrations")
        assert str(e.value) == f"{g}:3: {msg}"


# ------------------------------------------------------------------------------------------ commands
def test_instruct_data_shows_schema_rows_k_and_the_rendered_first_row(cli, tiny_dir, tmp_path):
    f = write_jsonl(tmp_path / "hh.jsonl", [{"chosen": HH_CHOSEN, "rejected": HH_REJECTED}] * 3)
    r = cli("data", f, "--as", "rm", "-m", tiny_dir)
    assert r.code == 0, r
    out = r.out.splitlines()
    assert out[0] == f"{f}: JSONL, 3 rows read as rm (comparisons)"
    assert out[1] == "schema: hh-rlhf (3)" and out[2] == "K: 2 (3 rows); 3 untied pairs"
    assert "<|im_start|>user\nWhat is a good name for a cat?<|im_end|>" in r.out and "Pepper." in r.out
    r = cli("data", f, "--as", "nope")
    assert r.code == 2 and "--as" in r.err


def test_hh_and_ultrafeedback_files_train_rm_unchanged(cli, tiny_dir, tmp_path):
    import datasets

    hh = write_jsonl(tmp_path / "hh.jsonl", [{"chosen": HH_CHOSEN, "rejected": HH_REJECTED.replace("No.", f"No {i}.")}
                                             for i in range(4)])
    r = cli("rm", hh, "-m", tiny_dir, "--max-steps", 2, "-b", 2, "--eval-frac", 0, "-o", tmp_path / "rm_hh", "-q")
    assert r.code == 0, r
    uf = [{"instruction": f"Q{i}?", "completions": [{"response": "yes yes", "overall_score": 8},
                                                     {"response": "no", "overall_score": 3},
                                                     {"response": "maybe", "overall_score": 3}]} for i in range(4)]
    datasets.Dataset.from_list(uf).to_parquet(str(tmp_path / "uf.parquet"))
    r = cli("rm", tmp_path / "uf.parquet", "-m", tiny_dir, "--max-steps", 2, "-b", 2, "--eval-frac", 0,
            "-o", tmp_path / "rm_uf", "-q")
    assert r.code == 0, r
    manifest = json.loads((tmp_path / "rm_uf" / "instruct.json").read_text())
    assert manifest["data"]["rows"] == 4
    # 2 untied pairs per row (8 vs 3, 8 vs 3; the 3 = 3 pair is a tie) x 4 rows: the rm logged that many
    rows = [json.loads(x) for x in (tmp_path / "rm_uf" / "metrics.jsonl").read_text().splitlines()]
    assert rows and all("loss" in x for x in rows)


@pytest.mark.slow
def test_sft_on_the_embedded_model_from_parquet_and_from_a_save_to_disk_dir(cli, tmp_path):
    import datasets

    rows = [json.loads(x) for x in open("data_samples/demonstrations.jsonl", encoding="utf-8")][:16]
    alpaca = [{"instruction": r["prompt"], "input": "", "output": r["response"]} for r in rows if "prompt" in r]
    ds = datasets.Dataset.from_list(alpaca)
    ds.to_parquet(str(tmp_path / "d.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"))
    for src, out in ((tmp_path / "d.parquet", "sft_parquet"), (tmp_path / "saved", "sft_saved")):
        r = cli("sft", src, "--max-steps", 2, "-b", 2, "--eval-frac", 0, "-o", tmp_path / out, "-q")
        assert r.code == 0, r
        m = json.loads((tmp_path / out / "instruct.json").read_text())
        assert m["data"]["rows"] == len(alpaca)


def test_a_non_finite_rating_and_a_bad_sharegpt_role_are_row_errors(tmp_path):
    f = write_jsonl(tmp_path / "r.jsonl", [{"prompt": "x", "completions": [{"response": "a", "overall_score": "nan"},
                                                                          {"response": "b", "overall_score": 3}]}])
    with pytest.raises(DataError, match=r"r.jsonl:1: completions\[0\]: rating 'nan' is not a finite number"):
        data.load(str(f), "comparisons")
    g = write_jsonl(tmp_path / "g.jsonl", [{"conversations": [{"from": {"a": 1}, "value": "x"}]}])
    with pytest.raises(DataError, match=r"g.jsonl:1: conversations\[0\].from: expected one of"):
        data.load(str(g), "demonstrations")


def test_columns_leave_other_files_fields_alone(tmp_path):
    mc = write_jsonl(tmp_path / "mc.jsonl", [{"question": "Q?", "choices": ["a", "b"], "correct": 0}])
    assert data.load(str(mc), "mc", columns="prompt=question").records[0].question == "Q?"
