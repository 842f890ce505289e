"""An ollama Modelfile for an exported GGUF: the file, the chat template as ollama's Go template, the stop
tokens, and the template's default system prompt.

Only ChatML-style templates (`<|im_start|>role\\n...<|im_end|>\\n`, as SmolLM2's) are translated, and only after
checking that the tokenizer's own template renders probe conversations exactly as ChatML does; any other
template gets no TEMPLATE line (the GGUF still carries it as tokenizer.chat_template), with a warning.
"""

from __future__ import annotations

import json
import re

from instructcli import tokens

START, END = "<|im_start|>", "<|im_end|>"

# ollama renders .Messages (the SYSTEM below is put first when a request has no system message), then the
# generation prompt, as the tokenizer's template does with add_generation_prompt
CHATML_TEMPLATE = ("{{- range .Messages }}" + START + "{{ .Role }}\n{{ .Content }}" + END + "\n{{ end }}"
                   + START + "assistant\n")


def _chatml(messages: list[dict], generation_prompt: bool) -> str:
    text = "".join(f"{START}{m['role']}\n{m['content']}{END}\n" for m in messages)
    return text + (f"{START}assistant\n" if generation_prompt else "")


def chatml_system(tok) -> tuple[bool, str | None]:
    """(whether the tokenizer's template is ChatML, the system prompt it adds to a conversation without one)."""
    probe = [{"role": "system", "content": "S1"}, {"role": "user", "content": "U1"},
             {"role": "assistant", "content": "A1"}, {"role": "user", "content": "U2"}]
    try:
        same = all(tokens.render_chat(tok, probe, g) == _chatml(probe, g) for g in (True, False))
        bare = tokens.render_chat(tok, probe[1:2], True)
    except Exception:  # noqa: BLE001 - a template that cannot render the probe is not ChatML
        return False, None
    if not same:
        return False, None
    plain = _chatml(probe[1:2], True)
    if bare == plain:
        return True, None
    m = re.fullmatch(re.escape(START) + r"system\n(.*)" + re.escape(END) + "\n", bare[:-len(plain)], re.S)
    return (True, m.group(1)) if bare.endswith(plain) and m else (False, None)


def stop_tokens(tok) -> list[str]:
    """The texts of the tokens that end an answer (EOS and the template's end-of-turn token)."""
    return [tok.convert_ids_to_tokens(i) for i in tokens.stop_token_ids(tok)]


def modelfile(tok, gguf_name: str, warn=None) -> str:
    """The Modelfile text for `gguf_name`, beside it in one directory (`ollama create NAME -f Modelfile`)."""
    chatml, system = chatml_system(tok)
    lines = ["# written by instruct export: ollama create NAME -f Modelfile (in this folder)",
             f"FROM ./{gguf_name}"]
    if chatml:
        lines.append(f'TEMPLATE """{CHATML_TEMPLATE}"""')
    elif warn:
        warn("export: the chat template is not ChatML-style; the Modelfile has no TEMPLATE (the GGUF carries the "
             "template as tokenizer.chat_template; write an ollama TEMPLATE by hand if ollama does not pick it up)")
    if system and '"""' in system:  # a Modelfile string cannot hold its own delimiter
        if warn:
            warn('export: the default system prompt contains """; the Modelfile has no SYSTEM line')
    elif system:
        lines.append(f'SYSTEM """{system}"""')
    lines += [f"PARAMETER stop {json.dumps(s, ensure_ascii=False)}" for s in stop_tokens(tok)]
    return "\n".join(lines) + "\n"
