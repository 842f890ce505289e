"""instruct chat: through a pipe (one turn per line, one answer per line) and through a pseudo-terminal
(a prompt, answers streamed), the commands, and /save writing rows that sft reads."""

import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path

from instructcli import data

ROOT = Path(__file__).resolve().parents[1]


def chat(tiny_dir, tmp_path, stdin: str, *flags):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "INSTRUCT_CACHE": str(tmp_path / "c")}
    return subprocess.run([sys.executable, "-m", "instructcli", "chat", str(tiny_dir), "--max-new-tokens", "8",
                           *flags], input=stdin, capture_output=True, text=True, env=env, timeout=300)


def test_a_pipe_gets_one_answer_per_turn_and_save_writes_demonstrations(tiny_dir, tmp_path):
    saved = tmp_path / "demos.jsonl"
    script = f"hello\n\n/temp 0\nwhat now?\n/nope\n/save {saved}\n/reset\n/save {saved}\nagain\n/exit\nignored\n"
    r = chat(tiny_dir, tmp_path, script)
    assert r.returncode == 0, r.stderr
    answers = r.stdout.splitlines()
    assert len(answers) == 3  # three user turns; /commands, blank lines and what follows /exit print nothing
    assert "/nope: not a command" in r.stderr
    assert "nothing to save yet" in r.stderr  # after /reset
    rows = data.load(str(saved), "demonstrations").records  # what sft reads
    assert len(rows) == 1
    assert [m["role"] for m in rows[0].messages] == ["user", "assistant", "user", "assistant"]
    assert rows[0].messages[0]["content"] == "hello" and rows[0].messages[2]["content"] == "what now?"
    assert " ".join(rows[0].messages[3]["content"].split("\n")) == answers[1]


def test_greedy_answers_repeat_and_the_system_message_is_used(tiny_dir, tmp_path):
    a = chat(tiny_dir, tmp_path, "hi\nhi\n", "--temperature", "0")
    b = chat(tiny_dir, tmp_path, "hi\nhi\n", "--temperature", "0")
    assert a.returncode == b.returncode == 0 and a.stdout == b.stdout and len(a.stdout.splitlines()) == 2
    saved = tmp_path / "s.jsonl"
    r = chat(tiny_dir, tmp_path, f"/system Be brief.\nhi\n/save {saved}\n", "--temperature", "0")
    assert r.returncode == 0, r.stderr
    assert data.load(str(saved), "demonstrations").records[0].messages[0] == {"role": "system",
                                                                                "content": "Be brief."}
    bad = chat(tiny_dir, tmp_path, "/temp -1\nhi\n", "--temperature", "0")
    assert bad.returncode == 0 and "/temp: expected a number >= 0" in bad.stderr and bad.stdout == a.stdout.split(
        "\n")[0] + "\n"  # the bad /temp is refused: still greedy


def test_a_terminal_gets_a_prompt_and_a_streamed_answer(tiny_dir, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "INSTRUCT_CACHE": str(tmp_path / "c")}
    pid, fd = pty.fork()
    if pid == 0:  # the child: stdin, stdout and stderr are the pseudo-terminal
        os.execvpe(sys.executable, [sys.executable, "-m", "instructcli", "chat", str(tiny_dir), "--max-new-tokens",
                                    "8", "--temperature", "0"], env)
    seen = b""

    def read_until(marker: bytes, timeout: float = 120) -> None:
        nonlocal seen
        t0 = time.time()
        while marker not in seen and time.time() - t0 < timeout:
            if select.select([fd], [], [], 0.5)[0]:
                try:
                    seen += os.read(fd, 4096)
                except OSError:
                    break

    read_until(b"you> ")
    assert b"chatting with" in seen and b"/save FILE" in seen
    start = len(seen)
    os.write(fd, b"hello\n")
    t0 = time.time()
    while seen[start:].count(b"you> ") < 1 and time.time() - t0 < 120:
        if select.select([fd], [], [], 0.5)[0]:
            try:
                seen += os.read(fd, 4096)
            except OSError:
                break
    after = seen[start:].split(b"you> ")[0].replace(b"\r", b"")
    echo, _, answer = after.partition(b"\n")  # the terminal echoes the typed turn, then the answer streams
    assert echo.strip() == b"hello", seen
    want = chat(tiny_dir, tmp_path, "hello\n", "--temperature", "0").stdout.strip().encode()
    assert want and answer.strip() == want, (answer, want)  # the same greedy answer as through a pipe
    os.write(fd, b"/exit\n")
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 0
