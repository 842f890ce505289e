"""Decoding over a static KV cache (`--decode static`, the default on CUDA): every tensor a decode step reads or
writes is allocated once per (rows, cache length), so on CUDA the whole step (all layers, the active LoRA
adapter, sampling) is captured as one CUDA graph and replayed per token, instead of Python launching a few
hundred small kernels one by one. Finished rows keep their slot (what they sample after their stop token is
dropped at the end), so no shape changes within a rollout. On CPU the same step runs eagerly; the tests compare
it with the eager loop (generate.generate) there.

A captured graph holds the addresses of the weights it read, so it stays valid while the optimizer updates the
adapters in place (PPO's steps); it is keyed by what it baked in (rows, cache length, sampling settings, the
active adapter and whether adapters are on) and captured again when any of these changes.
"""

from __future__ import annotations

import torch

from instructcli import batches, console, rlhf, tokens

BUCKET = 64  # cache lengths are rounded up to a multiple of this, so rollouts of similar prompts share a graph
KEEP = 4  # decoders (caches and graphs) kept per model; the oldest is freed first
CHECK_EVERY = 8  # decode steps between looks at whether every row has stopped (each look syncs with the GPU)


def cache_len(prompt_width: int, max_new_tokens: int) -> int:
    return -(-(prompt_width + max_new_tokens) // BUCKET) * BUCKET


def prefill_mask(attn: torch.Tensor, length: int, dtype) -> torch.Tensor:
    """The additive (rows, 1, P, length) mask of a left-padded (rows, P) prompt batch written at cache columns
    0..P-1: a token sees the real tokens at or before it. Each position also sees itself, so a pad position's
    row is never empty (an all-masked row would give NaN keys and values that 0-weights do not cancel)."""
    rows, width = attn.shape
    q = torch.arange(width, device=attn.device)
    see = (q[None, :] <= q[:, None])[None] & attn[:, None, :].bool()  # (rows, P, P)
    see |= torch.eye(width, dtype=torch.bool, device=attn.device)[None]
    mask = torch.full((rows, 1, width, length), torch.finfo(dtype).min, dtype=dtype, device=attn.device)
    mask[:, 0, :, :width].masked_fill_(see, 0.0)
    return mask


def active_adapter(model) -> tuple:
    """What a captured graph baked in of the adapters: the active one's name, and whether adapters are off (peft's
    disable_adapter)."""
    name = getattr(model, "active_adapter", None)
    layers = getattr(getattr(model, "base_model", None), "model", None)
    off = False
    if layers is not None and hasattr(model, "peft_config"):
        off = any(getattr(m, "disable_adapters", False) for m in layers.modules() if hasattr(m, "lora_A"))
    return (str(name), off)


class Decoder:
    """The static buffers of one (rows, cache length, sampling) shape and the decode step that touches only
    them: tok (the token each row feeds next), pos (its position), mask (additive, over cache columns), col
    (the column this step writes, in step with the cache's own write index), and the step's outputs."""

    def __init__(self, model, rows: int, length: int, temperature: float, top_p: float, device: str):
        from transformers import StaticCache

        cfg = model.config
        self.model, self.rows, self.length = model, rows, length
        self.temperature, self.top_p = temperature, top_p
        self.dtype = model.get_input_embeddings().weight.dtype
        self.cache = StaticCache(config=cfg, max_cache_len=length)
        heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.cache.early_initialization(rows, heads, head_dim, self.dtype, torch.device(device))
        self.tok = torch.zeros(rows, 1, dtype=torch.long, device=device)
        self.pos = torch.zeros(rows, 1, dtype=torch.long, device=device)
        self.mask = torch.full((rows, 1, 1, length), torch.finfo(self.dtype).min, dtype=self.dtype, device=device)
        self.col = torch.zeros(1, dtype=torch.long, device=device)
        self.logp = torch.zeros(rows, device=device)
        self.ent = torch.zeros(rows, device=device)
        self.graph = None
        self.replays = 0

    def _reset(self) -> None:
        for layer in self.cache.layers:  # in place: a captured graph holds these addresses
            layer.cumulative_length.zero_()
        self.mask.fill_(torch.finfo(self.dtype).min)

    def _sample(self, logits: torch.Tensor) -> None:
        logits = logits.float()
        if self.temperature <= 0:
            picked = logits.argmax(-1)
        else:
            picked = rlhf.sample_from(rlhf.top_p_probs(logits, self.temperature, self.top_p))
            lp = torch.log_softmax(logits / self.temperature, -1)
            self.logp.copy_(lp.gather(1, picked[:, None]).squeeze(1))
            self.ent.copy_(-(lp.exp() * lp).sum(-1))
        self.tok.copy_(picked[:, None])

    def _step(self) -> None:
        """Feed tok at column col: the column becomes visible (to this token and every later one), then the
        next token is sampled into tok."""
        self.mask.index_fill_(-1, self.col, 0.0)
        out = self.model(input_ids=self.tok, attention_mask=self.mask, position_ids=self.pos, cache=self.cache,
                         use_cache=True, logits_to_keep=1)
        self._sample(out.logits[:, -1])
        self.pos.add_(1)
        self.col.add_(1)

    def capture(self) -> None:
        """Record one decode step as a CUDA graph (after warm-up runs on a side stream, as torch asks). The
        warm-up writes garbage into the buffers; prefill resets what it reads."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._step()
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self._step()

    def prefill(self, ids: torch.Tensor, attn: torch.Tensor) -> None:
        """Write a left-padded (rows, P) prompt batch into cache columns 0..P-1 (eager: its shape varies) and
        sample each row's first token."""
        self._reset()
        width = ids.shape[1]
        pos = (attn.cumsum(1) - 1).clamp(min=0)
        out = self.model(input_ids=ids, attention_mask=prefill_mask(attn, self.length, self.dtype),
                         position_ids=pos, cache=self.cache, use_cache=True, logits_to_keep=1)
        self.mask[:, 0, 0, :width].masked_fill_(attn.bool(), 0.0)
        self.col.fill_(width)
        self.pos.copy_(pos[:, -1:] + 1)
        self._sample(out.logits[:, -1])

    def step(self) -> None:
        if self.graph is not None:
            self.graph.replay()
            self.replays += 1
        else:
            self._step()


def decoder_for(model, rows: int, length: int, temperature: float, top_p: float, device: str,
                capture: bool) -> Decoder:
    """The model's decoder for this shape, built (and, with `capture`, its step captured) on first use; a few
    are kept on the model, so PPO's rollouts reuse one graph step after step."""
    pool = model.__dict__.setdefault("_instruct_decoders", {})
    key = (rows, length, temperature, top_p, capture, active_adapter(model))
    dec = pool.pop(key, None)
    if dec is None:
        while len(pool) >= KEEP:
            pool.pop(next(iter(pool)))
        dec = Decoder(model, rows, length, temperature, top_p, device)
        if capture:
            try:
                dec.capture()
            except Exception as e:  # a kernel that syncs with the host cannot be captured: decode step by step
                dec.graph = None
                console.warn(f"decode: the step could not be captured as a CUDA graph ({type(e).__name__}: "
                             f"{str(e)[:120]}); decoding step by step on the static cache")
    pool[key] = dec  # most recently used last
    return dec


def generate(model, tok, prompt_ids: list[list[int]], n: int, temperature: float, top_p: float,
             max_new_tokens: int, device: str, logprobs: bool = False, capture: bool | None = None):
    """generate.generate's contract (n answers per prompt, each cut after its first stop token, kept; with
    `logprobs`, the (rows, longest answer) log-probs and entropies, 0 past each answer's end) over a static
    cache. `capture`: replay a CUDA graph (default: on CUDA)."""
    capture = str(device).startswith("cuda") if capture is None else capture
    rows = [q for q in prompt_ids for _ in range(n)]
    batch = batches.collate_prompts(rows, tok.pad_token_id)
    ids, attn = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    stop = torch.tensor(tokens.stop_token_ids(tok), device=device)
    with torch.no_grad():
        dec = decoder_for(model, len(rows), cache_len(ids.shape[1], max_new_tokens), temperature, top_p, device,
                          capture)
        dec.prefill(ids, attn)
        picked, lps, ents = [], [], []
        live = torch.ones(len(rows), dtype=torch.bool, device=device)
        for t in range(max_new_tokens):
            picked.append(dec.tok[:, 0].clone())
            if logprobs:
                lps.append(dec.logp.clone())
                ents.append(dec.ent.clone())
            live &= ~torch.isin(picked[-1], stop)
            if t == max_new_tokens - 1 or ((t + 1) % CHECK_EVERY == 0 and not live.any()):
                break
            dec.step()
    seq = torch.stack(picked, 1)  # (rows, T): each row's tokens, past its stop token too
    is_stop = torch.isin(seq, stop)
    first = torch.where(is_stop.any(1), is_stop.float().argmax(1) + 1, seq.shape[1])  # length with its stop
    out = [s[:k] for s, k in zip(seq.tolist(), first.tolist())]
    grouped = [out[i * n:(i + 1) * n] for i in range(len(prompt_ids))]
    if not logprobs:
        return grouped
    width = int(first.max())
    past = torch.arange(width, device=device)[None, :] >= first[:, None]
    lp = torch.stack(lps, 1)[:, :width].masked_fill(past, 0.0)
    ent = torch.stack(ents, 1)[:, :width].masked_fill(past, 0.0)
    return grouped, lp, ent
