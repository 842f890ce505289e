"""--report-to on the tiny model, through the real CLI: what TensorBoard's event files, W&B's offline run file and
trackio's local store hold, read back and compared with metrics.jsonl; resume, bad names, missing packages."""

import importlib
import importlib.util
import json
import os
import signal
import sqlite3
import struct
import sys
import time

import numpy as np
import pytest

from conftest import write_jsonl
from instructcli import checkpoint, checks, config as C, parallel, trackers
from instructcli.errors import InstructError

# found, not imported: trackio reads TRACKIO_DIR when first imported (the `offline` fixture sets it)
pytestmark = pytest.mark.skipif(not all(importlib.util.find_spec(p) for p in ("tensorboard", "wandb", "trackio")),
                                reason="needs the trackers: pip install 'instruct[trackers]'")

ARGS = ["--max-steps", 4, "-b", 2, "--eval-frac", 0.25, "--eval-every", 2, "--save-every", 0, "-q"]


@pytest.fixture
def demos(tmp_path):
    return write_jsonl(tmp_path / "demos.jsonl", [{"prompt": f"Say {w}.", "response": f"{w} {w}!"} for w in "abcdefgh"])


@pytest.fixture(autouse=True)
def offline(tmp_path, monkeypatch):
    """W&B offline and trackio's store under tmp: nothing leaves the test's dir, nothing needs the network."""
    for var in ("WANDB_API_KEY", "WANDB_PROJECT", "WANDB_CONSOLE", "WANDB_IDENTITY_TOKEN_FILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    for var, sub in (("WANDB_DIR", "wandb-dir"), ("WANDB_CONFIG_DIR", "wandb-config"),
                     ("WANDB_CACHE_DIR", "wandb-cache"), ("WANDB_DATA_DIR", "wandb-data")):
        (tmp_path / sub).mkdir()
        monkeypatch.setenv(var, str(tmp_path / sub))
    store = tmp_path / "trackio"
    monkeypatch.setenv("TRACKIO_DIR", str(store))  # read when trackio is first imported ...
    importlib.import_module("trackio")
    for name, mod in list(sys.modules.items()):  # ... and kept by its modules: each test its own store
        if name.startswith("trackio") and hasattr(mod, "TRACKIO_DIR"):
            monkeypatch.setattr(mod, "TRACKIO_DIR", store)
    return tmp_path


def metrics(d):
    return [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]


def f32(x):
    return float(np.float32(x))


# ------------------------------------------------------------------------------------------- readers
def tb_scalars(run_dir) -> dict:
    """{tag: [(step, value)]} as TensorBoard's own reader sees the event files."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def tb_events(run_dir) -> list:
    """Every event in the event files, in file order, with nothing dropped (no purge applied)."""
    from tensorboard.backend.event_processing.event_file_loader import LegacyEventFileLoader

    files = sorted((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    return [e for f in files for e in LegacyEventFileLoader(str(f)).Load()]


def tb_hparams(run_dir) -> tuple[dict, bool]:
    """The hparams plugin's session: ({name: value}, whether it ended)."""
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

    hp, ended = {}, False
    for e in tb_events(run_dir):
        for v in e.summary.value:
            if v.tag == "_hparams_/session_start_info":
                data = HParamsPluginData.FromString(v.metadata.plugin_data.content)
                hp = {k: getattr(x, x.WhichOneof("kind")) for k, x in data.session_start_info.hparams.items()}
            ended |= v.tag == "_hparams_/session_end_info"
    return hp, ended


def assert_tb_equals_metrics(run_dir, rows):
    scalars = tb_scalars(run_dir)
    keys = {k for r in rows for k in r} - {"step"}
    assert set(scalars) == keys
    for k in keys:
        want = [(r["step"], f32(r[k])) for r in rows if k in r]
        assert scalars[k] == want, k  # every step once, every value to float32 precision


def wandb_records(path):
    """The protobuf records of a W&B run file (LevelDB log format: 32 KiB blocks of 7-byte-headed chunks)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, buf, block = path.read_bytes(), 7, b"", 32768
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 2):  # full, first
            buf = chunk
        elif kind in (3, 4):  # middle, last
            buf += chunk
        if kind in (1, 4):
            yield pb.Record.FromString(buf)


def wandb_runs(wandb_dir, run_id) -> list[dict]:
    """Each offline run file of W&B run `run_id` (one per attempt), oldest first: its name, project, config,
    history {step: {key: value}} and exit code."""
    out = []
    for path in sorted((wandb_dir / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"),
                       key=lambda p: p.stat().st_mtime):
        run = {"config": {}, "history": {}, "exit_code": None}
        for r in wandb_records(path):
            kind = r.WhichOneof("record_type")
            if kind == "run":
                run.update(name=r.run.display_name, project=r.run.project, id=r.run.run_id)
                run["config"].update({i.key: json.loads(i.value_json) for i in r.run.config.update})
            elif kind == "history":
                items = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in r.history.item}
                run["history"][r.history.step.num] = {k: v for k, v in items.items() if not k.startswith("_")}
            elif kind == "exit":
                run["exit_code"] = r.exit.exit_code
        out.append(run)
    return out


def trackio_rows(store, run_id) -> tuple[list[tuple[int, dict]], dict]:
    """([(step, metrics)] in logged order, config) of one run in trackio's local sqlite store."""
    with sqlite3.connect(store / "instruct.db") as db:
        rows = [(s, json.loads(m)) for s, m in
                db.execute("SELECT step, metrics FROM metrics WHERE run_id = ? ORDER BY id", (run_id,))]
        (config,) = db.execute("SELECT config FROM configs WHERE run_id = ?", (run_id,)).fetchone()
    return rows, json.loads(config)


def state(run_dir) -> dict:
    return json.loads((run_dir / trackers.STATE).read_text())


# --------------------------------------------------------------------------------------------- tests
def test_sft_tensorboard_events_equal_metrics_jsonl(cli, tiny_dir, demos, tmp_path):
    out = tmp_path / "sft-tb"
    r = cli("sft", demos, "-o", out, "--model", tiny_dir, *ARGS, "--lr", 1e-3, "--report-to", "tensorboard")
    assert r.code == 0, r
    assert r.out.strip() == str(out)  # stdout holds the result only
    rows = metrics(out)
    assert [x["step"] for x in rows] == [1, 2, 3, 4] and "eval_loss" in rows[1] and "eval_loss" not in rows[0]
    assert not (tmp_path / "sft-tb.partial").exists() and list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert_tb_equals_metrics(out, rows)
    hp, ended = tb_hparams(out)
    man = json.loads((out / "instruct.json").read_text())["config"]
    assert hp["lr"] == pytest.approx(1e-3) and hp["lr"] == man["train"]["lr"]
    assert hp["lora_r"] == 16 and hp["max_steps"] == 4 and hp["model"] == str(tiny_dir)
    assert hp["report_to"] == "tensorboard" and hp["data"] == str(demos) and ended


def test_a_stopped_then_resumed_run_has_each_step_once(cli, tiny_dir, demos, tmp_path, monkeypatch):
    out = tmp_path / "sft"
    args = ["sft", demos, "-o", out, "--model", tiny_dir, "--max-steps", 8, "-b", 2, "--eval-frac", 0,
            "--save-every", 2, "-q", "--report-to", "tensorboard"]
    original = checkpoint.RunDir.save_checkpoint

    def stop_at_step_6(self, step, *a, **kw):  # killed after logging steps 5 and 6, before their checkpoint
        if step == 6:
            raise KeyboardInterrupt
        return original(self, step, *a, **kw)

    monkeypatch.setattr(checkpoint.RunDir, "save_checkpoint", stop_at_step_6)
    assert cli(*args).code == 130
    partial = tmp_path / "sft.partial"
    assert [s for s, _ in tb_scalars(partial)["loss"]] == [1, 2, 3, 4, 5, 6]
    monkeypatch.setattr(checkpoint.RunDir, "save_checkpoint", original)
    r = cli(*args, "--resume")  # from step 4: steps 5 and 6 run again
    assert r.code == 0, r
    rows = metrics(out)
    assert [x["step"] for x in rows] == list(range(1, 9))
    assert_tb_equals_metrics(out, rows)
    for tag in ("loss", "lr", "grad_norm"):  # in the files themselves, not only after TensorBoard's purge
        steps = [e.step for e in tb_events(out) for v in e.summary.value if v.tag == tag]
        assert steps == list(range(1, 9)), (tag, steps)
    hp_starts = [e for e in tb_events(out) for v in e.summary.value if v.tag == "_hparams_/session_start_info"]
    assert len(hp_starts) == 1


def test_wandb_offline_run_holds_the_rows_config_and_name(cli, tiny_dir, demos, tmp_path, offline):
    out = tmp_path / "sft-wandb"
    r = cli("sft", demos, "-o", out, "--model", tiny_dir, *ARGS, "--report-to", "wandb")
    assert r.code == 0, r
    assert r.out.strip() == str(out)
    (run,) = wandb_runs(offline / "wandb-dir", state(out)["wandb"])
    assert run["name"] == "sft-wandb" and run["project"] == "instruct" and run["exit_code"] == 0
    config = run["config"]
    assert config["lr"] == 2e-4 and config["lora_r"] == 16 and config["model"] == str(tiny_dir)
    assert config["report_to"] == "wandb" and config["max_steps"] == 4
    rows = metrics(out)
    assert run["history"] == {x["step"]: {k: v for k, v in x.items() if k != "step"} for x in rows}  # exact


def test_wandb_run_stopped_by_ctrl_c_is_continued_by_resume(cli, tiny_dir, demos, tmp_path, offline, monkeypatch):
    out = tmp_path / "sft"
    args = ["sft", demos, "-o", out, "--model", tiny_dir, "--max-steps", 4, "-b", 2, "--eval-frac", 0,
            "--save-every", 0, "-q", "--report-to", "wandb"]
    log = trackers.WandB.log

    def ctrl_c_at_step_2(self, step, values):
        log(self, step, values)
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)  # the first Ctrl-C: the step ends with a checkpoint, exit 130

    monkeypatch.setattr(trackers.WandB, "log", ctrl_c_at_step_2)
    assert cli(*args).code == 130
    monkeypatch.setattr(trackers.WandB, "log", log)
    time.sleep(1.1)  # W&B names an attempt's offline dir by its start to the second: a resume in the same second
    assert cli(*args, "--resume").code == 0  # would share it (no process starts that fast outside a test)
    first, then = wandb_runs(offline / "wandb-dir", state(out)["wandb"])  # one W&B run, two attempts
    assert sorted(first["history"]) == [1, 2] and first["exit_code"] == 130
    assert sorted(then["history"]) == [3, 4] and then["exit_code"] == 0
    rows = metrics(out)
    assert {**first["history"], **then["history"]} == {x["step"]: {k: v for k, v in x.items() if k != "step"}
                                                      for x in rows}


def test_trackio_local_store_holds_the_rows_and_config(cli, tiny_dir, demos, tmp_path, offline):
    out = tmp_path / "sft-trackio"
    r = cli("sft", demos, "-o", out, "--model", tiny_dir, *ARGS, "--report-to", "trackio")
    assert r.code == 0, r
    assert r.out.strip() == str(out)  # trackio's notices went to stderr
    logged, config = trackio_rows(offline / "trackio", state(out)["trackio"])
    rows = metrics(out)
    assert logged == [(x["step"], {k: v for k, v in x.items() if k != "step"}) for x in rows]
    assert config["lr"] == 2e-4 and config["lora_r"] == 16 and config["report_to"] == "trackio"


def test_trackio_resume_continues_the_run_without_repeating_steps(cli, tiny_dir, demos, tmp_path, offline,
                                                                   monkeypatch):
    out = tmp_path / "sft"
    args = ["sft", demos, "-o", out, "--model", tiny_dir, "--max-steps", 6, "-b", 2, "--eval-frac", 0,
            "--save-every", 2, "-q", "--report-to", "trackio"]
    original = checkpoint.RunDir.save_checkpoint

    def stop_at_step_4(self, step, *a, **kw):
        if step == 4:
            raise KeyboardInterrupt
        return original(self, step, *a, **kw)

    monkeypatch.setattr(checkpoint.RunDir, "save_checkpoint", stop_at_step_4)
    assert cli(*args).code == 130
    first = state(tmp_path / "sft.partial")["trackio"]
    monkeypatch.setattr(checkpoint.RunDir, "save_checkpoint", original)
    assert cli(*args, "--resume").code == 0
    assert state(out)["trackio"] == first  # the same trackio run went on
    logged, _ = trackio_rows(offline / "trackio", first)
    assert [s for s, _ in logged] == list(range(1, 7))


def test_a_tracker_added_on_resume_gets_the_earlier_rows_too(cli, tiny_dir, demos, tmp_path, monkeypatch):
    out = tmp_path / "sft"
    args = ["sft", demos, "-o", out, "--model", tiny_dir, "--max-steps", 8, "-b", 2, "--eval-frac", 0,
            "--save-every", 2, "-q"]
    original = checkpoint.RunDir.save_checkpoint

    def stop_at_step_6(self, step, *a, **kw):
        if step == 6:
            raise KeyboardInterrupt
        return original(self, step, *a, **kw)

    monkeypatch.setattr(checkpoint.RunDir, "save_checkpoint", stop_at_step_6)
    assert cli(*args).code == 130
    monkeypatch.setattr(checkpoint.RunDir, "save_checkpoint", original)
    assert cli(*args, "--resume", "--report-to", "tensorboard").code == 0  # from step 4
    rows = metrics(out)
    assert [x["step"] for x in rows] == list(range(1, 9))
    assert_tb_equals_metrics(out, rows)


def test_unknown_tracker_and_missing_package_are_one_line_exit_2_writing_nothing(cli, tiny_dir, demos, tmp_path,
                                                                                  monkeypatch):
    before = sorted(p.name for p in tmp_path.iterdir())
    r = cli("sft", demos, "-o", tmp_path / "x", "--model", tiny_dir, "--report-to", "tensorboard,nope")
    assert r.code == 2
    assert r.err.strip() == "error: --report-to: expected a comma-separated list of tensorboard | wandb | trackio, got 'nope'"
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if it were not installed: the import fails
    r = cli("sft", demos, "-o", tmp_path / "x", "--model", tiny_dir, "--report-to", "tensorboard, wandb")
    assert r.code == 2
    assert r.err.strip() == "error: --report-to wandb needs the wandb package: pip install 'instruct[wandb]'"
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    monkeypatch.setitem(sys.modules, "trackio", None)
    with pytest.raises(InstructError, match="instruct\\[trackio\\]") as e:  # a config built in Python too
        C.SFTConfig(data="d.jsonl", report_to="trackio")
    assert e.value.exit_code == 2
    assert C.SFTConfig(data="d.jsonl", report_to="").report_to == ""
    assert checks.report_names(" TensorBoard, wandb,,tensorboard ") == ("tensorboard", "wandb")


def test_a_package_found_but_broken_at_import_is_one_line_exit_2(cli, tiny_dir, demos, tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "wandb" else real(name, *a))
    monkeypatch.setitem(sys.modules, "wandb", None)
    r = cli("sft", demos, "-o", tmp_path / "x", "--model", tiny_dir, "--max-steps", 1, "-q", "--report-to", "wandb")
    assert r.code == 2 and len(r.err.strip().splitlines()) == 1, r
    assert r.err.startswith("error: --report-to wandb needs the wandb package (") and "instruct[wandb]" in r.err


def test_tensorboard_and_wandb_at_once(cli, tiny_dir, demos, tmp_path, offline):
    out = tmp_path / "both"
    r = cli("sft", demos, "-o", out, "--model", tiny_dir, *ARGS, "--report-to", "tensorboard,wandb")
    assert r.code == 0, r
    rows = metrics(out)
    assert_tb_equals_metrics(out, rows)
    history = wandb_runs(offline / "wandb-dir", state(out)["wandb"])[0]["history"]
    assert sorted(history) == [1, 2, 3, 4] and history[2]["eval_loss"] == rows[1]["eval_loss"]


def test_rm_rows_reach_trackio_under_the_metrics_names(cli, tiny_dir, tmp_path, offline):
    cmp = write_jsonl(tmp_path / "cmp.jsonl", [{"prompt": f"Q{i}?", "responses": ["yes yes", "yes", "no"],
                                                "ranks": [1, 2, 3]} for i in range(8)])
    out = tmp_path / "rm"
    r = cli("rm", cmp, "-m", tiny_dir, "-o", out, "--max-steps", 3, "-b", 2, "--eval-frac", 0.25, "--eval-every", 3,
            "--save-every", 0, "-q", "--report-to", "trackio")
    assert r.code == 0, r
    logged, _ = trackio_rows(offline / "trackio", state(out)["trackio"])
    rows = metrics(out)
    assert [s for s, _ in logged] == [1, 2, 3] and {"accuracy", "eval_accuracy"} <= set(logged[-1][1])
    assert [set(m) for _, m in logged] == [set(x) - {"step"} for x in rows]


def test_ppo_rows_reach_tensorboard_under_the_metrics_names(cli, tiny_dir, tmp_path):
    demos = write_jsonl(tmp_path / "demos.jsonl", [{"prompt": f"Say {w}.", "response": w} for w in "abcd"])
    assert cli("sft", demos, "-m", tiny_dir, "-o", tmp_path / "sft", "--max-steps", 1, "--eval-frac", 0, "-q").code == 0
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"Write about {w}."} for w in "abcd"])
    rule = tmp_path / "rule.py"
    rule.write_text("def count_e(prompt, response):\n    return float(response.count('e'))\n")
    out = tmp_path / "ppo"
    r = cli("ppo", "--policy", tmp_path / "sft", "--reward", f"{rule}:count_e", "-p", prompts, "--ptx-coef", 0,
            "--steps", 2, "--rollout-batch-size", 2, "--mini-batch-size", 2, "--max-new-tokens", 4, "--save-every", 0,
            "-o", out, "-q", "--report-to", "tensorboard")
    assert r.code == 0, r
    rows = metrics(out)
    assert {"score", "kl", "policy_loss", "kl_coef"} <= set(tb_scalars(out))
    assert_tb_equals_metrics(out, rows)


def test_only_the_main_process_opens_trackers(tmp_path, monkeypatch):
    cfg = C.SFTConfig(data="d.jsonl", out=str(tmp_path / "run"), report_to="tensorboard,wandb,trackio")
    (tmp_path / "run.partial").mkdir()
    monkeypatch.setattr(parallel, "main", False)
    assert trackers.open_trackers(cfg, tmp_path / "run.partial", "run", tmp_path / "m.jsonl", 0) is None
    assert list((tmp_path / "run.partial").iterdir()) == []


def test_wandb_is_offline_unless_logged_in_or_told(tmp_path, monkeypatch):
    for var in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    assert trackers.wandb_mode() == "offline"  # no credentials: never a login prompt
    (tmp_path / "netrc").write_text("machine api.wandb.ai\n  login user\n  password " + "k" * 40 + "\n")
    assert trackers.wandb_mode() == "online"  # `wandb login` wrote this
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.example.com")
    assert trackers.wandb_mode() == "offline"  # a key for another host
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    assert trackers.wandb_mode() == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert trackers.wandb_mode() == "disabled"
