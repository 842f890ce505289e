"""export --format gguf: the file read back by the gguf package's reader and by transformers' GGUF loader (every
tensor, the metadata, the tokenizer, logits against the merged model), the ollama Modelfile, and bad usage."""

import json
import shutil

import numpy as np
import pytest
import torch

from conftest import build_tokenizer, write_jsonl
from instructcli import gguf_export, models, modelfile, sources
from instructcli.errors import InstructError

PROMPTS = ["Say hello.", "the river runs under the stone bridge", "Name a tree, then count: 1 2 3 12345!"]
# max |logit difference| to the merged model allowed per out-type. Measured on these models (logits within +-1):
# f16 1.5e-4, bf16 9e-4 (16-wide); q8_0 3e-4 (16-wide), 1.2e-2 (64-wide, every weight quantized). Q/K rows
# left in transformers' order instead cost 6e-2 (16-wide) and 0.8 (64-wide).
LOGIT_TOL = {"f16": 1e-3, "bf16": 5e-3, "q8_0": 3e-2}
LAYER_TENSORS = ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up",
                 "ffn_down")


def sharpened(base, dest):
    """A copy of a tiny model with its Q/K weights x8: a random model's attention is near uniform, so the logits
    would barely notice Q/K rows in the wrong order; this way they do."""
    from transformers import AutoModelForCausalLM

    shutil.copytree(base, dest)
    model = AutoModelForCausalLM.from_pretrained(dest)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(8)
            layer.self_attn.k_proj.weight.mul_(8)
    model.save_pretrained(dest)
    return dest


def sft_run(base, root):
    from instructcli import config as C, sft

    demos = write_jsonl(root / "demos.jsonl", [{"prompt": "Say hello.", "response": "Hello there!"}] * 4)
    return sft.train(C.SFTConfig(data=str(demos), out=str(root / "sft"), quiet=True,
                                 model=C.ModelConfig(model=str(base)),
                                 train=C.TrainConfig(max_steps=3, batch_size=2, lr=1e-2, eval_frac=0)))


@pytest.fixture(scope="module")
def runs(tiny_dir, wide_dir, tmp_path_factory):
    """sft runs (adapter trained at lr 1e-2, so the merge moves the weights) on the 16- and 64-wide tiny models
    (sharpened), each with its merged model and tokenizer, the reference every export is compared with."""
    out = {}
    for name, base in (("tiny", tiny_dir), ("wide", wide_dir)):
        root = tmp_path_factory.mktemp(f"gguf-{name}")
        base = sharpened(base, root / "base")
        run = sft_run(base, root)
        model, tok = models.merged_model(sources.resolve(str(run)))
        out[name] = {"run": run, "base": base, "model": model, "tok": tok}
    return out


# (tiny model, out-type): q8_0 on the 16-wide model quantizes only the rows that are whole 32-value blocks
# (ffn_down) and keeps the rest f16; on the 64-wide one every 2-D weight is quantized
CASES = [("tiny", "f16"), ("tiny", "bf16"), ("tiny", "q8_0"), ("wide", "q8_0")]


@pytest.fixture(scope="module")
def exported(runs, tmp_path_factory):
    """(run dir, out dir, gguf path) per case, written once through models.export_gguf (the CLI's path)."""
    done = {}
    for name, outtype in CASES:
        out = tmp_path_factory.mktemp(f"export-{name}-{outtype}") / "gguf"
        gguf_file, mf = models.export_gguf(str(runs[name]["run"]), str(out), outtype)
        done[name, outtype] = {"out": out, "gguf": gguf_file, "modelfile": mf}
    return done


def unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's Q/K row order back to transformers' (written here, not imported, to check the writer)."""
    dim = w.shape[0] // heads // 2
    return w.reshape(heads, dim, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def expected_tensors(model) -> dict[str, str]:
    """llama.cpp name -> transformers name of every tensor the file must hold."""
    cfg = model.config
    hf = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
          "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
          "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
    out = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight"}
    if not cfg.tie_word_embeddings:
        out["output.weight"] = "lm_head.weight"
    for i in range(cfg.num_hidden_layers):
        out.update({f"blk.{i}.{t}.weight": f"model.layers.{i}.{hf[t]}.weight" for t in LAYER_TENSORS})
    return out


def check_values(got: np.ndarray, want: np.ndarray, kind: str) -> None:
    """Values equal within what the type keeps: f32 exact, f16 11 significant bits, bf16 8, q8_0 half a step of
    each 32-value block's scale (max |x| / 127, itself stored in f16)."""
    if kind == "F32":
        np.testing.assert_array_equal(got, want)
    elif kind in ("F16", "BF16"):
        rel = 2.0 ** (-11 if kind == "F16" else -8)
        assert np.all(np.abs(got - want) <= np.abs(want) * rel + 1e-7), kind
    else:
        assert kind == "Q8_0"
        blocks = want.reshape(-1, 32)
        step = np.abs(blocks).max(axis=1, keepdims=True) / 127
        assert np.all(np.abs(got.reshape(-1, 32) - blocks) <= 0.6 * step + 1e-9)


# ------------------------------------------------------------------------------ the gguf package's reader
@pytest.mark.parametrize("name,outtype", CASES)
def test_reader_finds_every_tensor_with_the_merged_values(runs, exported, name, outtype):
    import gguf

    model, cfg = runs[name]["model"], runs[name]["model"].config
    reader = gguf.GGUFReader(exported[name, outtype]["gguf"])
    want = expected_tensors(model)
    assert sorted(t.name for t in reader.tensors) == sorted(want)
    state = model.state_dict()
    kinds = set()
    for t in reader.tensors:
        ref = state[want[t.name]].float().numpy()
        got = gguf.quants.dequantize(t.data, t.tensor_type).reshape(ref.shape)
        if ".attn_q." in t.name:
            got = unpermute(got, cfg.num_attention_heads)
        elif ".attn_k." in t.name:
            got = unpermute(got, cfg.num_key_value_heads)
        kind = t.tensor_type.name
        want_kind = ("F32" if ref.ndim == 1 else {"f16": "F16", "bf16": "BF16"}.get(outtype)
                     or ("Q8_0" if ref.shape[-1] % 32 == 0 else "F16"))
        assert kind == want_kind, t.name
        check_values(got, ref, kind)
        kinds.add(kind)
    if outtype == "q8_0":  # really exercised: quantized tensors in both models, the f16 fallback in the 16-wide
        assert "Q8_0" in kinds and (("F16" in kinds) == (name == "tiny"))


@pytest.mark.parametrize("name,outtype", CASES[:2] + CASES[3:])
def test_reader_metadata(runs, exported, name, outtype):
    import gguf

    cfg, tok = runs[name]["model"].config, runs[name]["tok"]
    fields = gguf.GGUFReader(exported[name, outtype]["gguf"]).fields
    value = lambda k: fields[k].contents()  # noqa: E731
    assert value("general.architecture") == "llama" and value("general.name") == "sft"
    assert value("general.file_type") == {"f16": 1, "bf16": 32, "q8_0": 7}[outtype]
    hparams = {"context_length": cfg.max_position_embeddings, "embedding_length": cfg.hidden_size,
               "block_count": cfg.num_hidden_layers, "feed_forward_length": cfg.intermediate_size,
               "attention.head_count": cfg.num_attention_heads, "attention.head_count_kv": cfg.num_key_value_heads,
               "vocab_size": cfg.vocab_size, "rope.dimension_count": cfg.hidden_size // cfg.num_attention_heads}
    assert {k: value(f"llama.{k}") for k in hparams} == hparams
    assert value("llama.attention.layer_norm_rms_epsilon") == pytest.approx(cfg.rms_norm_eps)
    assert value("llama.rope.freq_base") == pytest.approx(cfg.rope_parameters["rope_theta"])
    assert value("tokenizer.ggml.model") == "gpt2" and value("tokenizer.ggml.pre") == "gpt-2"
    vocab = {i: t for t, i in tok.get_vocab().items()}
    assert value("tokenizer.ggml.tokens") == [vocab[i] for i in range(len(vocab))]
    special = {tok.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")}
    assert value("tokenizer.ggml.token_type") == [3 if i in special else 1 for i in range(len(vocab))]
    merges = json.loads(tok.backend_tokenizer.to_str())["model"]["merges"]
    assert value("tokenizer.ggml.merges") == [" ".join(m) for m in merges] and len(merges) > 100
    assert [value(f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos", "padding")] == [
        tok.bos_token_id, tok.eos_token_id, tok.pad_token_id]
    assert value("tokenizer.ggml.add_bos_token") is False and value("tokenizer.chat_template") == tok.chat_template


# -------------------------------------------------------------------------------- transformers' loader
def chat_text(tok, prompt: str) -> str:
    return tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)


@pytest.mark.parametrize("name,outtype", CASES)
def test_transformers_loads_the_same_tokenizer_and_close_logits(runs, exported, name, outtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ref, tok, base = runs[name]["model"], runs[name]["tok"], runs[name]["base"]
    e = exported[name, outtype]
    t2 = AutoTokenizer.from_pretrained(str(e["out"]), gguf_file=e["gguf"].name)
    assert t2.get_vocab() == tok.get_vocab()
    for p in PROMPTS:
        text = chat_text(tok, p)
        assert chat_text(t2, p) == text  # the chat template came through
        assert t2(text, add_special_tokens=False)["input_ids"] == tok(text, add_special_tokens=False)["input_ids"]
        assert t2(p)["input_ids"] == tok(p)["input_ids"]
    m = AutoModelForCausalLM.from_pretrained(str(e["out"]), gguf_file=e["gguf"].name, dtype=torch.float32)
    plain = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)  # the base, without the adapter
    worst = moved = 0.0
    with torch.no_grad():
        for p in PROMPTS:
            x = torch.tensor([tok(chat_text(tok, p), add_special_tokens=False)["input_ids"]])
            want = ref(x).logits
            worst = max(worst, (m(x).logits - want).abs().max().item())
            moved = max(moved, (plain(x).logits - want).abs().max().item())
    assert worst <= LOGIT_TOL[outtype]
    assert moved > 5 * LOGIT_TOL[outtype]  # the file holds the merged adapter: the base alone is far off


def test_tied_embeddings_write_no_output_tensor(wide_dir, tmp_path):
    import gguf
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    tok = models.load_tokenizer(sources.resolve(str(wide_dir)))
    cfg = AutoConfig.from_pretrained(wide_dir, tie_word_embeddings=True)
    torch.manual_seed(1)
    model = LlamaForCausalLM(cfg).eval()
    path = tmp_path / "tied.f16.gguf"
    gguf_export.write_gguf(model, tok, path, "f16", "tied")
    assert "output.weight" not in {t.name for t in gguf.GGUFReader(path).tensors}
    back = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name, dtype=torch.float32)
    assert back.config.tie_word_embeddings
    x = torch.tensor([AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)(PROMPTS[1])["input_ids"]])
    with torch.no_grad():
        assert (back(x).logits - model(x).logits).abs().max().item() <= LOGIT_TOL["f16"]


def test_llama3_split_round_trips_through_transformers(tmp_path):
    """A Llama-3-style pre-tokenizer (one regex split, then bytes) is written as llama-bpe, and transformers, which
    keeps its own copy of that regex, tokenizes the file's vocabulary as the original does."""
    from tokenizers import Regex, pre_tokenizers
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = build_tokenizer(tmp_path / "tok")
    tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(gguf_export.LLAMA3_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok) + 5, hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1))
    gguf_export.write_gguf(model, tok, tmp_path / "l3.gguf", "f16")
    t2 = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="l3.gguf")
    for text in ("I'll pay 12345 dollars,\n\n  they're   sure", PROMPTS[2]):
        assert t2(text)["input_ids"] == tok(text)["input_ids"]
    import gguf

    fields = gguf.GGUFReader(tmp_path / "l3.gguf").fields
    assert fields["tokenizer.ggml.pre"].contents() == "llama-bpe"
    assert fields["tokenizer.ggml.tokens"].contents()[-1] == f"[PAD{len(tok) + 4}]"  # padded embedding rows
    assert fields["tokenizer.ggml.token_type"].contents()[-1] == gguf.TokenType.UNUSED


# ------------------------------------------------------------------------------------------- Modelfile
def test_modelfile_names_the_file_the_template_and_the_stop_token(exported):
    e = exported["tiny", "f16"]
    assert sorted(p.name for p in e["out"].iterdir()) == ["Modelfile", "sft.f16.gguf"]
    text = e["modelfile"].read_text()
    lines = text.splitlines()
    assert "FROM ./sft.f16.gguf" in lines and 'PARAMETER stop "<|im_end|>"' in lines
    assert 'TEMPLATE """{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}' \
           '<|im_start|>assistant\n"""' in text
    assert "SYSTEM" not in text  # the tiny model's ChatML template has no default system prompt


SMOLLM_TEMPLATE = (  # SmolLM2-Instruct's: ChatML with a default system prompt
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
LLAMA3_TEMPLATE = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '<|im_end|>\n\n' + m['content'] }}"
                   "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant<|im_end|>\n\n' }}{% endif %}")


def test_modelfile_default_system_prompt_and_a_template_that_is_not_chatml(tiny_dir):
    tok = models.load_tokenizer(sources.resolve(str(tiny_dir)))
    tok.chat_template = SMOLLM_TEMPLATE
    text = modelfile.modelfile(tok, "m.gguf")
    assert 'SYSTEM """You are a helpful AI assistant named SmolLM, trained by Hugging Face"""' in text.splitlines()
    assert "TEMPLATE" in text
    tok.chat_template = LLAMA3_TEMPLATE  # same tokens, another layout: not translated
    warned = []
    text = modelfile.modelfile(tok, "m.gguf", warned.append)
    assert "TEMPLATE" not in text and "SYSTEM" not in text and 'PARAMETER stop "<|im_end|>"' in text
    assert len(warned) == 1 and "not ChatML" in warned[0]


# ------------------------------------------------------------------------------------------- bad usage
def leftovers(parent, name):
    return [p.name for p in parent.iterdir() if p.name.startswith(f".{name}")]


def test_bad_outtype_and_flags_of_the_other_format_exit_2_in_one_line(cli, runs, tmp_path):
    out = tmp_path / "o"
    r = cli("export", runs["tiny"]["run"], out, "--format", "gguf", "--outtype", "q4")
    assert r.code == 2 and r.err.strip() == "error: --outtype: expected one of f16 | bf16 | q8_0, got 'q4'"
    r = cli("export", runs["tiny"]["run"], out, "--format", "ggml")
    assert r.code == 2 and r.err.strip() == "error: --format: expected one of hf | gguf, got 'ggml'"
    r = cli("export", runs["tiny"]["run"], out, "--format", "gguf", "--dtype", "bfloat16")
    assert r.code == 2 and len(r.err.strip().splitlines()) == 1 and "--outtype" in r.err
    r = cli("export", runs["tiny"]["run"], out, "--outtype", "q8_0")
    assert r.code == 2 and len(r.err.strip().splitlines()) == 1 and "--format gguf" in r.err
    assert not out.exists()


def test_cli_export_writes_the_dir_and_refuses_a_non_empty_one(cli, runs, tmp_path):
    out = tmp_path / "g"
    out.mkdir()  # an empty dir is taken
    r = cli("export", runs["tiny"]["run"], out, "--format", "gguf", "--outtype", "bf16")
    assert r.code == 0, r
    assert r.out.splitlines() == [str(out / "sft.bf16.gguf"), str(out / "Modelfile")]
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    r = cli("export", runs["tiny"]["run"], out, "--format", "gguf")
    assert r.code == 2 and r.err.strip() == f"error: {out}: exists and is not empty"
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before and not leftovers(tmp_path, "g")


def test_an_interrupted_export_leaves_nothing(cli, runs, tmp_path, monkeypatch):
    calls = []

    def stop_at_third(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    real = gguf_export._array
    monkeypatch.setattr(gguf_export, "_array", stop_at_third)
    out = tmp_path / "g"
    r = cli("export", runs["tiny"]["run"], out, "--format", "gguf")
    assert r.code == 130 and not out.exists() and not leftovers(tmp_path, "g") and len(calls) == 3


def test_unsupported_models_and_tokenizers_are_refused_before_anything_is_written(cli, tmp_path):
    from transformers import AutoConfig, LlamaConfig, MistralConfig, MistralForCausalLM

    tok_dir = tmp_path / "mistral"
    tok = build_tokenizer(tok_dir)
    MistralForCausalLM(MistralConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                     num_attention_heads=2, num_key_value_heads=1)).save_pretrained(tok_dir)
    run = sft_run(tok_dir, tmp_path)
    r = cli("export", run, tmp_path / "o", "--format", "gguf")
    assert r.code == 2 and len(r.err.strip().splitlines()) == 1 and not (tmp_path / "o").exists()
    assert "mistral (MistralForCausalLM) is not supported; supported: llama" in r.err
    llama = dict(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                 num_attention_heads=2)
    for cfg, says in [(LlamaConfig(attention_bias=True, **llama), "biases"),
                      (LlamaConfig(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
                                   **llama), "RoPE type llama3"),
                      (LlamaConfig(**{**llama, "vocab_size": len(tok) - 1}), "more than the model's vocab_size")]:
        with pytest.raises(InstructError, match=says):
            gguf_export.check_supported(cfg, tok)
    from tokenizers import decoders, models as tk_models

    tok.backend_tokenizer.model = tk_models.BPE(byte_fallback=True)  # a sentencepiece-style BPE (Llama 2)
    tok.backend_tokenizer.decoder = decoders.Metaspace()
    with pytest.raises(InstructError, match="only byte-level BPE"):
        gguf_export.check_supported(AutoConfig.for_model("llama", **llama), tok)


# ------------------------------------------------------------------------------- the embedded model
@pytest.mark.slow
def test_export_of_an_sft_run_on_the_embedded_model(cli, tmp_path):
    """sft 1 step on SmolLM2-135M, then export --format gguf q8_0, all through the CLI (about 1.5 min on 2 cores).
    Q8_0 itself moves SmolLM2's logits (within +-40) by up to ~1.7: the file must give exactly the logits of the
    merged model with its 2-D weights put through Q8_0 here, and nearly always the same next token."""
    import copy

    import gguf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from conftest import SAMPLES

    r = cli("sft", SAMPLES / "demonstrations.jsonl", "--max-steps", 1, "-b", 2, "--max-len", 128, "--eval-frac", 0,
            "--save-every", 0, "-q", "-o", tmp_path / "sft")
    assert r.code == 0, r
    out = tmp_path / "gguf"
    r = cli("export", tmp_path / "sft", out, "--format", "gguf", "--outtype", "q8_0")
    assert r.code == 0, r
    path = out / "sft.q8_0.gguf"
    reader = gguf.GGUFReader(path)
    assert len(reader.tensors) == 1 + 1 + 30 * 9 and "output.weight" not in {t.name for t in reader.tensors}
    assert {t.tensor_type.name for t in reader.tensors} == {"F32", "Q8_0"}  # 576 and 1536 are whole blocks
    mf = (out / "Modelfile").read_text()
    assert "SYSTEM" in mf and "FROM ./sft.q8_0.gguf" in mf and 'PARAMETER stop "<|im_end|>"' in mf
    ref, tok = models.merged_model(sources.resolve(str(tmp_path / "sft")))
    t2 = AutoTokenizer.from_pretrained(str(out), gguf_file=path.name)
    text = chat_text(tok, PROMPTS[2])
    assert t2(text, add_special_tokens=False)["input_ids"] == tok(text, add_special_tokens=False)["input_ids"]
    q8 = copy.deepcopy(ref)
    kind = gguf.GGMLQuantizationType.Q8_0
    with torch.no_grad():
        for p in q8.parameters():
            if p.ndim == 2:
                w = p.numpy()
                p.copy_(torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(w, kind), kind).reshape(w.shape)))
    m = AutoModelForCausalLM.from_pretrained(str(out), gguf_file=path.name, dtype=torch.float32)
    x = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        want, got, merged = q8(x).logits, m(x).logits, ref(x).logits
    assert (got - want).abs().max().item() < 1e-3
    assert (got.argmax(-1) == merged.argmax(-1)).float().mean() > 0.9
    shutil.rmtree(out)
