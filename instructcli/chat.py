"""`instruct chat`: a conversation with a model or any run dir, answers streamed token by token.

In a terminal: a `you>` prompt, the answer printed as it is sampled. Through a pipe: one user turn per input
line, one answer per output line (newlines in it become spaces), nothing else on stdout. Commands:
`/system TEXT` (the system message; the conversation restarts), `/reset`, `/temp X`, `/save FILE` (appends
the conversation as a `{"messages": [...]}` row, which `instruct sft` reads: a person can write
demonstrations this way), `/exit` (end of input also ends it).
"""

from __future__ import annotations

import json
import os
import sys

import torch

from instructcli import console, generate, models, sources, tokens
from instructcli.config import ChatConfig, check_sampling
from instructcli.errors import InstructError

HELP = "/system TEXT, /reset, /temp X, /save FILE, /exit"


class Chat:
    """The conversation and its settings; `turn(text)` answers one user turn."""

    def __init__(self, cfg: ChatConfig, model, tok, device: str, out=sys.stdout, live: bool = False):
        self.cfg, self.model, self.tok, self.device, self.out, self.live = cfg, model, tok, device, out, live
        self.system, self.temperature, self.turns = cfg.system, cfg.temperature, []
        self.n = 0  # answers so far: each is seeded on its own (seed + n), so a session replays exactly

    def messages(self) -> list[dict]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + self.turns

    def command(self, line: str) -> bool:
        """Run a /command; False for /exit."""
        name, _, arg = line.partition(" ")
        arg = arg.strip()
        if name == "/exit":
            return False
        if name == "/reset":
            self.turns = []
            console.log("conversation cleared")
        elif name == "/system":
            self.system, self.turns = arg, []
            console.log(f"system message {'set' if arg else 'cleared'}; conversation restarted")
        elif name == "/temp":
            try:
                value = float(arg)
                check_sampling(value, self.cfg.top_p)
            except (ValueError, InstructError):
                console.warn(f"/temp: expected a number >= 0, got {arg!r}")
            else:
                self.temperature = value
        elif name == "/save":
            self.save(arg)
        else:
            console.warn(f"{name}: not a command ({HELP})")
        return True

    def save(self, path: str) -> None:
        if not path:
            console.warn("/save: give a file, e.g. /save demos.jsonl")
        elif not any(t["role"] == "assistant" for t in self.turns):
            console.warn("/save: nothing to save yet (no answer in this conversation)")
        else:
            try:
                with open(path, "a", encoding="utf-8") as f:  # appended and fsynced: a crash keeps earlier rows
                    f.write(json.dumps({"messages": self.messages()}, ensure_ascii=False) + "\n")
                    f.flush()
                    os.fsync(f.fileno())
            except OSError as e:
                console.warn(f"/save {path}: {e.strerror}")
                return
            console.log(f"saved the conversation ({len(self.turns)} turns) to {path}")

    def turn(self, text: str) -> str:
        self.turns.append({"role": "user", "content": text})
        ids = tokens.encode_prompt(self.tok, self.messages())[-self.cfg.max_prompt_len:]
        shown = [0]

        def stream(_row, so_far_ids):
            # decode all so far and print what is new; a token that is part of a character decodes as U+FFFD
            # until the rest comes, so trailing ones wait
            so_far = self.tok.decode(so_far_ids, skip_special_tokens=True).rstrip("\ufffd")
            if len(so_far) > shown[0]:
                self.out.write(so_far[shown[0]:])
                self.out.flush()
                shown[0] = len(so_far)

        torch.manual_seed(self.cfg.seed + self.n)
        self.n += 1
        answer = generate.generate(self.model, self.tok, [ids], 1, self.temperature, self.cfg.top_p,
                                   self.cfg.max_new_tokens, self.device, on_token=stream if self.live else None)
        full = self.tok.decode(answer[0][0], skip_special_tokens=True)
        reply = full.strip()
        if self.live:
            self.out.write(full[shown[0]:].rstrip() + "\n")  # what was held back, if anything
        else:
            self.out.write(" ".join(reply.split("\n")) + "\n")
        self.out.flush()
        self.turns.append({"role": "assistant", "content": reply})
        return reply


def run(cfg: ChatConfig, stdin=None, stdout=None) -> int:
    """The session; returns the number of answers given."""
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    live = stdin.isatty() and stdout.isatty()
    mc = cfg.model
    source = sources.resolve(mc.model, console.log)
    tok = models.load_tokenizer(source, mc.trust_remote_code)
    device = models.pick_device()
    model = models.inference_model(source, mc, device)
    chat = Chat(cfg, model, tok, device, stdout, live)
    if live:
        console.log(f"chatting with {mc.model} ({HELP})")
    while True:
        if live:
            try:
                line = input("you> ")
            except EOFError:
                break
        else:
            line = stdin.readline()
            if not line:
                break
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            if not chat.command(line):
                break
            continue
        chat.turn(line)
    return chat.n
