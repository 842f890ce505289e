"""A merged transformers Llama-family model and its tokenizer -> one GGUF file, as llama.cpp and ollama load it.

The gguf package does the format (writer, tensor names, quantization); what is ours is the mapping from a
transformers config and tokenizer to llama.cpp's metadata, the rotary row order of Q/K, and which tensor gets
which type. Tensors are converted and written one at a time, so the peak memory is the model plus one tensor.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import numpy as np

from instructcli import files, tokens
from instructcli.config import GGUF_OUTTYPES, check_choice
from instructcli.errors import InstructError

SUPPORTED = "llama (LlamaForCausalLM, as SmolLM2 and Llama 3.0) with default RoPE, no biases and a byte-level BPE"
ARCH = "llama"

# llama.cpp's names for a byte-level BPE's pre-tokenizer split (tokenizer.ggml.pre; it refuses a name it does not
# know, "gpt2" included), keyed by the backend's pre-tokenizer as `tokenizers` serialises it: llama.cpp splits text
# by the named regexes before the merges, so the name must match the split the model was trained with
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_BYTE_LEVEL = {"type": "ByteLevel", "use_regex": True}
PRE_TOKENIZERS = {
    "gpt-2": [_BYTE_LEVEL],
    "smollm": [{"type": "Digits", "individual_digits": True}, _BYTE_LEVEL],  # also StarCoder's split
    "llama-bpe": [{"type": "Split", "pattern": {"Regex": LLAMA3_SPLIT}, "behavior": "Isolated"},
                  {"type": "ByteLevel", "use_regex": False}],
}


# ------------------------------------------------------------------------------------------ checks
def _unsupported(config) -> str:
    """What in this config llama.cpp's llama architecture would not run as transformers does ("" if nothing)."""
    kind = getattr(config, "model_type", "?")
    archs = getattr(config, "architectures", None) or ["LlamaForCausalLM"]
    if kind != "llama" or archs != ["LlamaForCausalLM"]:
        return f"{kind} ({', '.join(archs)})"
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        return "attention or MLP biases"
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if rope.get("rope_type", "default") != "default":  # llama3/yarn scaling needs tensors we do not write
        return f"RoPE type {rope.get('rope_type')}"
    return f"activation {config.hidden_act}" if config.hidden_act != "silu" else ""


def check_supported(config, tok) -> None:
    """Refuse, in one line, a model or tokenizer this writer would turn into a broken file."""
    if problem := _unsupported(config):
        raise InstructError(f"--format gguf: {problem} is not supported; supported: {SUPPORTED} (export --format hf "
                            "writes any model)", 2)
    pre_tokenizer_name(tok)
    if len(tok) > config.vocab_size:
        raise InstructError(f"--format gguf: the tokenizer has {len(tok)} tokens, more than the model's vocab_size "
                            f"{config.vocab_size}", 2)


def _backend(tok) -> dict:
    return json.loads(tok.backend_tokenizer.to_str())


def pre_tokenizer_name(tok, backend: dict | None = None) -> str:
    """llama.cpp's name for how this byte-level BPE splits text; refuses any other tokenizer."""
    j = backend or _backend(tok)
    model, decoder = j.get("model") or {}, j.get("decoder") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback") or decoder.get("type") != "ByteLevel":
        raise InstructError("--format gguf: only byte-level BPE tokenizers (GPT-2 style, as SmolLM2 and Llama 3 "
                            f"have) are supported; this one is {model.get('type')} with a {decoder.get('type')} "
                            "decoder", 2)
    pre = j.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    for name, want in PRE_TOKENIZERS.items():
        if len(steps) == len(want) and all(all(s.get(k) == v for k, v in w.items()) for s, w in zip(steps, want)):
            return name
    raise InstructError(f"--format gguf: the tokenizer's pre-tokenizer ({' + '.join(s.get('type', '?') for s in steps)})"
                        f" has no llama.cpp equivalent here; supported: {', '.join(PRE_TOKENIZERS)}", 2)


def file_name(run_dir: str, outtype: str) -> str:
    """`<run dir name>.<outtype>.gguf`, in characters a Modelfile's FROM line and any shell take as they are."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(run_dir).resolve().name).strip(".-") or "model"
    return f"{stem}.{outtype}.gguf"


# ---------------------------------------------------------------------------------------- metadata
def _add_hparams(writer, config, name: str, outtype: str) -> None:
    import gguf

    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    rope = getattr(config, "rope_parameters", None) or {}
    writer.add_name(name)
    writer.add_type("model")
    writer.add_file_type({"f16": gguf.LlamaFileType.MOSTLY_F16, "bf16": gguf.LlamaFileType.MOSTLY_BF16,
                          "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[outtype])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_vocab_size(config.vocab_size)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads or config.num_attention_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
    writer.add_rope_dimension_count(head_dim)  # transformers reads this back as head_dim
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)


def _token_table(tok, vocab_size: int) -> tuple[list[str], list[int]]:
    """Every id's token text and llama.cpp token type: special added tokens are CONTROL (never split, not
    printed), other added tokens USER_DEFINED, ids the tokenizer lacks (a padded embedding) UNUSED."""
    from gguf import TokenType

    by_id = {i: t for t, i in tok.get_vocab().items()}
    added = tok.added_tokens_decoder
    texts, types = [], []
    for i in range(vocab_size):
        if i in added:
            texts.append(added[i].content)
            types.append(TokenType.CONTROL if added[i].special else TokenType.USER_DEFINED)
        elif i in by_id:
            texts.append(by_id[i])
            types.append(TokenType.NORMAL)
        else:
            texts.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
    return texts, [int(t) for t in types]


def _merges(backend: dict) -> list[str]:
    """The BPE merges as llama.cpp reads them: "left right", a space inside a part written as U+0120 (space
    + 256, as in the byte-level alphabet), as llama.cpp's converter does for merges stored as pairs."""
    out = []
    for m in backend["model"].get("merges") or []:
        pair = m.split(" ", 1) if isinstance(m, str) else m
        out.append(" ".join("".join(chr(ord(c) + 256) if c == " " else c for c in part) for part in pair))
    return out


def _adds(tok) -> tuple[bool, bool]:
    """Whether encoding a text puts BOS before it / EOS after it (llama.cpp does as the file says)."""
    plain = tok("a", add_special_tokens=False)["input_ids"]
    ids = tok("a")["input_ids"]
    extra = len(ids) > len(plain)
    return (extra and tok.bos_token_id is not None and ids[0] == tok.bos_token_id,
            extra and tok.eos_token_id is not None and ids[-1] == tok.eos_token_id)


def _add_tokenizer(writer, tok, vocab_size: int) -> None:
    backend = _backend(tok)
    writer.add_tokenizer_model("gpt2")  # llama.cpp's name for byte-level BPE
    writer.add_tokenizer_pre(pre_tokenizer_name(tok, backend))
    texts, types = _token_table(tok, vocab_size)
    writer.add_token_list(texts)
    writer.add_token_types(types)
    writer.add_token_merges(_merges(backend))
    for kind in ("bos", "eos", "unk", "pad"):
        if (tid := getattr(tok, f"{kind}_token_id")) is not None:
            getattr(writer, f"add_{kind}_token_id")(tid)
    eot = tokens.end_of_turn_id(tok)
    if eot is not None and eot != tok.eos_token_id:  # a chat model whose turns end on another token than EOS
        writer.add_eot_token_id(eot)
    add_bos, add_eos = _adds(tok)
    writer.add_add_bos_token(add_bos)
    writer.add_add_eos_token(add_eos)
    if tok.chat_template:
        writer.add_chat_template(tok.chat_template)


# ----------------------------------------------------------------------------------------- tensors
def interleave_rotary(w: np.ndarray, heads: int) -> np.ndarray:
    """Q/K rows from transformers' order (each head's rotary pairs split in two halves) to llama.cpp's (pairs
    adjacent), which its RoPE kernel expects; transformers' GGUF loader reverses this when reading."""
    half = w.shape[0] // heads // 2
    return w.reshape(heads, 2, half, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def tensor_type(name: str, shape: tuple[int, ...], outtype: str):
    """llama.cpp's converter's choice: 1-D tensors (norms) in f32; 2-D weights in the out-type, with q8_0
    rows that are not whole 32-value blocks in f16."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q

    if len(shape) < 2 or not name.endswith(".weight"):
        return Q.F32
    if outtype == "q8_0":
        return Q.Q8_0 if shape[-1] % GGML_QUANT_SIZES[Q.Q8_0][0] == 0 else Q.F16
    return {"f16": Q.F16, "bf16": Q.BF16}[outtype]


def _plan(model, outtype: str) -> list[tuple[str, object, object]]:
    """(llama.cpp name, transformers tensor, GGML type) of every tensor to write, in the model's order."""
    import gguf

    cfg = model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    plan = []
    for key, t in model.state_dict().items():
        if key == "lm_head.weight" and cfg.tie_word_embeddings:
            continue  # llama.cpp uses token_embd for the output when there is no output.weight
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise InstructError(f"--format gguf: no llama.cpp name for tensor {key}; supported: {SUPPORTED}", 2)
        plan.append((name, t, tensor_type(name, tuple(t.shape), outtype)))
    return plan


def _array(name: str, t, qtype, config) -> np.ndarray:
    """One tensor as the bytes (or floats) the file stores."""
    from gguf import GGMLQuantizationType as Q, quants

    w = t.detach().float().cpu().numpy()
    if ".attn_q." in name:
        w = interleave_rotary(w, config.num_attention_heads)
    elif ".attn_k." in name:
        w = interleave_rotary(w, config.num_key_value_heads or config.num_attention_heads)
    return w.astype(np.float32) if qtype == Q.F32 else quants.quantize(w, qtype)


def _add_tensor_info(writer, name: str, shape: tuple[int, ...], qtype) -> None:
    from gguf import GGMLQuantizationType as Q, quants

    if qtype in (Q.F32, Q.F16):
        dtype = np.float32 if qtype == Q.F32 else np.float16
        writer.add_tensor_info(name, shape, np.dtype(dtype), int(np.prod(shape)) * np.dtype(dtype).itemsize)
    else:  # block types are passed as their byte shape
        byte_shape = quants.quant_shape_to_byte_shape(shape, qtype)
        writer.add_tensor_info(name, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)), raw_dtype=qtype)


def write_gguf(model, tok, path: str | Path, outtype: str = "f16", name: str = "model") -> dict:
    """Write `model` (a merged LlamaForCausalLM) and `tok` to `path`; returns {GGML type name: tensor count}."""
    import gguf

    check_choice("outtype", outtype, GGUF_OUTTYPES)
    check_supported(model.config, tok)
    writer = gguf.GGUFWriter(str(path), ARCH)
    _add_hparams(writer, model.config, name, outtype)
    _add_tokenizer(writer, tok, model.config.vocab_size)
    plan = _plan(model, outtype)
    for tname, t, qtype in plan:
        _add_tensor_info(writer, tname, tuple(t.shape), qtype)
    size = sum(ti.nbytes for shard in writer.tensors for ti in shard.values())
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for tname, t, qtype in plan:  # converted one at a time: never a second copy of the whole model
            writer.write_tensor_data(_array(tname, t, qtype, model.config))
    except OSError as e:
        full = files.no_space(e, path, size)
        if full:
            raise full from None
        raise
    finally:
        writer.close()
    return dict(Counter(qtype.name for _, _, qtype in plan))
