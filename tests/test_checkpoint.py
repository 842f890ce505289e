"""checkpoint: run dirs, checkpoints and resume checks."""

import json
from pathlib import Path

import pytest
import torch

from instructcli import checkpoint
from instructcli.errors import InstructError


def test_a_checkpoint_from_another_model_shape_is_refused_in_one_line(tmp_path):
    """An optimizer state that does not fit (e.g. written when one more parameter was trained) is an
    InstructError naming the checkpoint, not a raw ValueError."""

    def setup(n_params):
        net = torch.nn.Sequential(*[torch.nn.Linear(2, 2) for _ in range(n_params)])
        opt = torch.optim.AdamW(net.parameters())
        net(torch.ones(1, 2)).sum().backward()
        opt.step()
        return net, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)

    run = checkpoint.RunDir(str(tmp_path / "out"))
    run.create()
    net, opt, sch = setup(2)
    run.save_checkpoint(1, net, opt, sch, {}, 2)
    net1, opt1, sch1 = setup(2)
    for p in list(net1.parameters())[:2]:  # one parameter fewer in training now
        p.requires_grad_(False)
    opt1 = torch.optim.AdamW([p for p in net1.parameters() if p.requires_grad])
    resumed = checkpoint.RunDir(str(tmp_path / "out"), resume=True)
    with pytest.raises(InstructError, match="does not fit this model"):
        resumed.load_checkpoint(net1, opt1, sch1)


def test_resume_must_take_as_many_examples_per_step():
    checkpoint.check_resume({"examples_per_step": 8}, 8)
    with pytest.raises(InstructError, match="took 8 examples") as e:
        checkpoint.check_resume({"examples_per_step": 8}, 4)
    assert e.value.exit_code == 2


def test_epoch_order_is_a_function_of_seed_and_position():
    a, b = checkpoint.EpochOrder(5, 0), checkpoint.EpochOrder(5, 0)
    first = [a[k] for k in range(10)]
    assert sorted(first[:5]) == sorted(first[5:]) == list(range(5))  # each epoch a permutation
    assert [b[k] for k in range(9, -1, -1)] == first[::-1]  # drawn in any order, the same


# ------------------------------------------------------------------------- --resume continues only its own run
@pytest.fixture
def stopped_run(cli, tiny_dir, tmp_path, monkeypatch):
    """An sft run interrupted after step 4, with checkpoints at steps 2 and 4; returns (args, data, out)."""
    from conftest import write_jsonl

    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": f"Say {w}.", "response": f"{w}!"} for w in "abcdef"])
    args = ["--model", tiny_dir, "--max-steps", 6, "-b", 2, "--save-every", 2, "--eval-frac", 0, "-q"]
    original = checkpoint.RunDir.save_checkpoint

    def stop_after_4(self, step, *a, **kw):
        path = original(self, step, *a, **kw)
        if step == 4:
            raise KeyboardInterrupt
        return path

    monkeypatch.setattr(checkpoint.RunDir, "save_checkpoint", stop_after_4)
    out = tmp_path / "run"
    assert cli("sft", data, "-o", out, *args).code == 130
    monkeypatch.setattr(checkpoint.RunDir, "save_checkpoint", original)
    return args, data, out


def test_resume_refuses_other_data_other_settings_and_allows_a_longer_run(cli, stopped_run, tmp_path):
    args, data, out = stopped_run
    other = tmp_path / "other.jsonl"
    other.write_text(data.read_text().replace("Say a.", "Say z."))
    r = cli("sft", other, "-o", out, *args, "--resume")
    assert r.code == 2 and "--resume: " in r.err and "changed since step 4 (sha256" in r.err, r
    assert len(r.err.strip().splitlines()) == 1
    data.write_text(data.read_text() + '{"prompt": "Say g.", "response": "g!"}\n')  # the same path, edited
    r = cli("sft", data, "-o", out, *args, "--resume")
    assert r.code == 2 and f"{data} changed since step 4" in r.err, r
    data.write_text("".join(data.read_text().splitlines(keepends=True)[:-1]))  # back as it was
    r = cli("sft", data, "-o", out, *args, "--resume", "--lr", 1e-3)
    assert r.code == 2 and "--lr was 0.0002 at step 4, now 0.001" in r.err, r
    r = cli("sft", data, "-o", out, *args, "--resume", "--lora-r", 8)
    assert r.code == 2 and "--lora-r was 16" in r.err, r
    longer = [8 if a == 6 else 3 if a == 2 and args[i - 1] == "--save-every" else a for i, a in enumerate(args)]
    r = cli("sft", data, "-o", out, *longer, "--resume")
    assert r.code == 0, r  # longer, and checkpointed otherwise: the same run
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))


def test_a_damaged_newest_checkpoint_falls_back_to_the_one_before(cli, stopped_run):
    args, data, out = stopped_run
    root = Path(str(out) + ".partial") / "checkpoints"
    state = root / "step-4" / "state.pt"
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])  # cut, as a full disk leaves it
    assert checkpoint.damage(root / "step-4") and checkpoint.damage(root / "step-2") is None
    r = cli("sft", data, "-o", out, *args, "--resume")
    assert r.code == 0, r
    assert "step-4: damaged checkpoint" in r.err and "using the one before it" in r.err
    assert (root / "damaged-step-4").is_dir() or not root.exists()  # set aside; the finished run moved on
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]  # steps 3 and 4 ran again from step 2


def test_no_intact_checkpoint_is_one_line_exit_1(cli, stopped_run):
    args, data, out = stopped_run
    for ck in (Path(str(out) + ".partial") / "checkpoints").glob("step-*"):
        (ck / "trainable.safetensors").write_bytes(b"\0" * 10)
    r = cli("sft", data, "-o", out, *args, "--resume")
    assert r.code == 1 and "no intact checkpoint" in r.err and len(r.err.strip().splitlines()) == 3, r  # 2 warnings


# -------------------------------------------------------------------------------------------- disk full
def test_a_full_disk_at_a_checkpoint_keeps_the_previous_one_and_says_what_is_needed(cli, tiny_dir, tmp_path,
                                                                                     monkeypatch):
    import errno

    from conftest import write_jsonl

    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": f"Say {w}.", "response": f"{w}!"} for w in "abcdef"])
    args = ["--model", tiny_dir, "--max-steps", 6, "-b", 2, "--save-every", 2, "--eval-frac", 0, "-q"]
    real_save, calls = torch.save, []

    def fills_the_disk(obj, path, *a, **kw):
        calls.append(path)
        if len(calls) == 2:  # the second checkpoint
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, path, *a, **kw)

    monkeypatch.setattr(checkpoint.torch, "save", fills_the_disk)
    out = tmp_path / "run"
    r = cli("sft", data, "-o", out, *args)
    assert r.code == 1, r
    line = r.err.strip().splitlines()[-1]
    assert "step-4: no space left on device" in line and "MB needed" in line and "MB free" in line, r.err
    root = Path(str(out) + ".partial") / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step-2"] and checkpoint.damage(root / "step-2") is None
    monkeypatch.setattr(checkpoint.torch, "save", real_save)
    assert cli("sft", data, "-o", out, *args, "--resume").code == 0


def test_a_full_disk_at_the_final_save_leaves_the_run_resumable(cli, tiny_dir, tmp_path, monkeypatch):
    import errno

    from conftest import write_jsonl
    from instructcli import files

    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": f"Say {w}.", "response": f"{w}!"} for w in "abcd"])
    args = ["--model", tiny_dir, "--max-steps", 2, "-b", 2, "--save-every", 1, "--eval-frac", 0, "-q"]
    real = files.atomic_write_text

    def full(path, *a, **kw):
        if str(path).endswith("instruct.json"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, *a, **kw)

    monkeypatch.setattr(files, "atomic_write_text", full)
    out = tmp_path / "run"
    r = cli("sft", data, "-o", out, *args)
    assert r.code == 1 and "no space left on device" in r.err and "Traceback" not in r.err, r
    assert not out.exists() and (Path(str(out) + ".partial") / "checkpoints" / "step-1").is_dir()
