"""sft end to end on the tiny model, through the real CLI entry point."""

import json

import pytest
import torch

from conftest import write_jsonl
from instructcli import batches, checkpoint, forward, models, sources

ROWS = [
    {"prompt": "What colour is the sky?", "response": "Blue."},
    {"prompt": "Say hello.", "response": "Hello!"},
    {"prompt": "Two plus two?", "response": "Four."},
    {"messages": [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Capital of France?"},
                  {"role": "assistant", "content": "Paris."}]},
]


@pytest.fixture
def demos(tmp_path):
    return write_jsonl(tmp_path / "demos.jsonl", ROWS)


def metrics(d):
    return [json.loads(l) for l in (d / "metrics.jsonl").read_text().splitlines()]


def test_sft_overfits_a_handful_of_rows(cli, tiny_dir, demos, tmp_path):
    out = tmp_path / "sft"
    r = cli("sft", demos, "-o", out, "--model", tiny_dir, "--max-steps", 60, "-b", 4, "--lr", 1e-2,
            "--full", "--eval-frac", 0, "--warmup", 0, "--schedule", "constant", "--save-every", 0, "-q")
    assert r.code == 0, r
    assert r.out.strip() == str(out)
    m = metrics(out)
    assert len(m) == 60 and m[0]["loss"] > 5.0
    assert m[-1]["loss"] < 0.5, [x["loss"] for x in m[::10]]


def test_sft_manifest_and_adapter_load_with_peft(cli, tiny_dir, demos, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "sft"
    r = cli("sft", demos, "-o", out, "--model", tiny_dir, "--max-steps", 2, "-b", 2, "--eval-frac", 0.25, "-q")
    assert r.code == 0, r
    man = json.loads((out / "instruct.json").read_text())
    assert man["format_version"] == 1 and man["stage"] == "sft" and man["full"] is False
    assert man["base_model"]["source"] == str(tiny_dir) and len(man["base_model"]["fingerprint"]) == 16
    assert man["data"]["rows"] == 4 and man["data"]["path"] == str(demos) and len(man["data"]["sha256"]) == 64
    assert man["config"]["train"]["max_steps"] == 2 and man["config"]["model"]["lora_r"] == 16
    assert set(man["metrics"]) == {"step", "loss", "eval_loss"} and man["metrics"]["step"] == 2
    assert man["versions"]["torch"] == torch.__version__
    assert not (tmp_path / "sft.partial").exists()
    base = AutoModelForCausalLM.from_pretrained(tiny_dir)
    peft_model = PeftModel.from_pretrained(base, out)
    assert any("lora_A" in n for n, _ in peft_model.named_parameters())


def test_resume_after_a_crash_matches_an_uninterrupted_run(cli, tiny_dir, demos, tmp_path, monkeypatch):
    args = ["--model", tiny_dir, "--max-steps", 6, "-b", 2, "--save-every", 2, "--eval-frac", 0,
            "--lora-dropout", 0.1, "-q"]  # dropout: the RNG state must be restored too
    assert cli("sft", demos, "-o", tmp_path / "a", *args).code == 0
    original = checkpoint.RunDir.save_checkpoint

    def crash_after_step_4(self, step, *a, **kw):
        path = original(self, step, *a, **kw)
        if step == 4:
            raise KeyboardInterrupt  # killed right after the checkpoint was written
        return path

    monkeypatch.setattr(checkpoint.RunDir, "save_checkpoint", crash_after_step_4)
    r = cli("sft", demos, "-o", tmp_path / "b", *args)
    assert r.code == 130 and not (tmp_path / "b").exists() and (tmp_path / "b.partial/checkpoints/step-4").is_dir()
    monkeypatch.setattr(checkpoint.RunDir, "save_checkpoint", original)
    r = cli("sft", demos, "-o", tmp_path / "b", *args, "--resume")
    assert r.code == 0, r
    a, b = metrics(tmp_path / "a"), metrics(tmp_path / "b")
    assert [x["step"] for x in b] == [1, 2, 3, 4, 5, 6]
    for x, y in zip(a, b):
        assert y["loss"] == pytest.approx(x["loss"], abs=1e-5) and y["lr"] == pytest.approx(x["lr"])


def test_refuses_non_empty_out_dir_unless_overwrite(cli, tiny_dir, demos, tmp_path):
    out = tmp_path / "sft"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    r = cli("sft", demos, "-o", out, "--model", tiny_dir, "--max-steps", 1, "-q")
    assert r.code == 2 and "not empty" in r.err and (out / "keep.txt").exists()
    r = cli("sft", demos, "-o", out, "--model", tiny_dir, "--max-steps", 1, "-q", "--overwrite")
    assert r.code == 0 and not (out / "keep.txt").exists() and (out / "instruct.json").exists()
    r = cli("sft", demos, "-o", out, "--model", tiny_dir, "--max-steps", 1, "-q", "--resume")
    assert r.code == 2 and "is complete" in r.err


def test_bad_input_exit_2_and_nothing_written(cli, tiny_dir, tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", [ROWS[0], {"prompt": "x", "response": ""}])
    r = cli("sft", bad, "-o", tmp_path / "sft", "--model", tiny_dir)
    assert r.code == 2
    assert r.err.strip() == f"error: {bad}:2: response: empty string"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl"]
    r = cli("sft", bad, "-o", tmp_path / "sft", "--model", tiny_dir, "--max-steps", 1, "--skip-invalid", "-q")
    assert r.code == 0 and json.loads((tmp_path / "sft/instruct.json").read_text())["data"]["skipped"] == 1


def test_overflow_error_and_drop(cli, tiny_dir, demos, tmp_path):
    r = cli("sft", demos, "-o", tmp_path / "x", "--model", tiny_dir, "--max-len", 8, "--overflow", "error")
    assert r.code == 2 and "longer than --max-len 8" in r.err and not (tmp_path / "x.partial").exists()
    r = cli("sft", demos, "-o", tmp_path / "y", "--model", tiny_dir, "--max-len", 8, "--overflow", "drop")
    assert r.code == 2 and "every example was dropped" in r.err


def test_crash_during_save_leaves_no_output_dir(cli, tiny_dir, demos, tmp_path, monkeypatch):
    def boom():
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "versions", boom)  # fails inside finish(), after the weights are written
    r = cli("sft", demos, "-o", tmp_path / "sft", "--model", tiny_dir, "--max-steps", 1, "-q")
    assert r.code == 1 and "disk full" in r.err
    assert not (tmp_path / "sft").exists()


@pytest.mark.parametrize("quant", ["8bit", "4bit"])
def test_quantized_lora_training_steps_on_cpu(wide_dir, quant):
    from instructcli.config import ModelConfig
    from instructcli import rlhf, tokens
    from transformers import AutoTokenizer

    source = sources.resolve(str(wide_dir))
    model = models.trainable_model(source, ModelConfig(model=str(wide_dir), quant=quant, lora_r=4), "cpu")
    # state_dict, not parameters: on AVX512-BF16 CPUs a 4-bit weight is repacked in place at the first no-grad
    # forward, and bitsandbytes' state_dict gives its codes back in the stored layout
    quantized = {n: p.clone() for n, p in model.state_dict().items() if n.endswith(".base_layer.weight")}
    dtypes = {p.dtype for p in quantized.values()}
    assert dtypes == ({torch.int8} if quant == "8bit" else {torch.uint8})  # every base layer really quantized
    tok = AutoTokenizer.from_pretrained(wide_dir)
    batch = batches.collate([tokens.encode_demonstration(tok, [{"role": "user", "content": "hi"},
                                                          {"role": "assistant", "content": "hello there"}])], 0)
    params = [p for p in model.parameters() if p.requires_grad]
    assert params and all(p.dtype == torch.float32 and "lora_" in n for n, p in model.named_parameters()
                          if p.requires_grad)
    before = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=1e-2)
    losses = []
    for _ in range(3):
        loss, n = rlhf.lm_loss_sum(model(input_ids=batch["input_ids"]).logits, batch["labels"])
        (loss / n).backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item() / n)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]
    assert any(not torch.equal(a, b) for a, b in zip(before, params))
    after = model.state_dict()
    assert quantized and all(torch.equal(after[n], w) for n, w in quantized.items())  # the frozen base did not move
    with torch.no_grad():  # the inference path too: on AVX512-BF16 CPUs, 4-bit repacks for its fused kernel here
        model.eval()
        assert torch.isfinite(model(input_ids=batch["input_ids"]).logits).all()


@pytest.mark.parametrize("targets,quant", [("all-linear", "none"), ("q_proj,v_proj,lm_head", "none"),
                                           ("all-linear", "8bit")])
def test_loss_at_labelled_positions_only_equals_the_full_logits_loss(tiny_dir, targets, quant):
    """forward.lm_loss_sum skips the LM head where nothing is predicted; value and gradients must not change."""
    from instructcli.config import ModelConfig
    from instructcli import rlhf, tokens
    from transformers import AutoTokenizer

    torch.manual_seed(0)
    model = models.trainable_model(sources.resolve(str(tiny_dir)),
                                   ModelConfig(lora_targets=targets, lora_dropout=0.0, quant=quant), "cpu")
    for n, p in model.named_parameters():  # LoRA B starts at 0: move it so the adapter matters
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.1)
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    batch = batches.collate([tokens.encode_demonstration(tok, [{"role": "user", "content": q},
                                                          {"role": "assistant", "content": a}])
                          for q, a in [("hi", "hello there"), ("a longer question here", "ok")]], 0)
    params = [p for p in model.parameters() if p.requires_grad]
    full, n_full = rlhf.lm_loss_sum(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                                    batch["labels"])
    g_full = torch.autograd.grad(full, params)
    part, n_part = forward.lm_loss_sum(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
    g_part = torch.autograd.grad(part, params)
    assert n_part == n_full > 0
    assert part.item() == pytest.approx(full.item(), rel=1e-5)
    for a, b in zip(g_full, g_part):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)


def test_lora_layers_adapts_only_the_top_layers(tiny_dir, cli, demos, tmp_path):
    from instructcli.config import ModelConfig

    model = models.trainable_model(sources.resolve(str(tiny_dir)), ModelConfig(lora_layers=1), "cpu")
    adapted = {n.split(".layers.")[1].split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert adapted == {"1"}  # of layers 0 and 1
    r = cli("sft", demos, "-o", tmp_path / "x", "--model", tiny_dir, "--lora-layers", 3, "--max-steps", 1)
    assert r.code == 2 and "--lora-layers: expected 0 (all) to 2" in r.err and not (tmp_path / "x.partial").exists()
