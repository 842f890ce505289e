"""Hostile and broken input: random bytes and mangled JSONL into every reader (hypothesis), broken or mismatched
run dirs, paths with spaces and stdin, no network, no remote code, no pickles."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from conftest import write_jsonl
from instructcli import data
from instructcli.errors import DataError, InstructError

KINDS = list(data.PARSERS)
ROOT = Path(__file__).resolve().parents[1]

# ----------------------------------------------------------------------------------------- property tests
json_leaf = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=20))
json_value = st.recursive(json_leaf, lambda c: st.one_of(st.lists(c, max_size=4),
                                                          st.dictionaries(st.text(max_size=8), c, max_size=4)),
                          max_leaves=20)
FIELDS = ["prompt", "response", "responses", "ranks", "chosen", "rejected", "messages", "text", "id", "question",
          "choices", "correct", "model"]
row_like = st.dictionaries(st.sampled_from(FIELDS), json_value, max_size=6)


def lines_strategy():
    """Lines a broken exporter might write: valid-looking rows, wrong types, junk bytes, truncations,
    NaN/Infinity literals, BOMs, CRLF, huge and deeply nested values."""
    def encode(row):
        return json.dumps(row).encode()

    line = st.one_of(
        row_like.map(encode),
        st.binary(max_size=60),
        row_like.map(encode).map(lambda b: b[: max(1, len(b) // 2)]),  # truncated
        st.sampled_from([b'{"text": NaN}', b'{"prompt": Infinity}', b'{"ranks": [1, -Infinity]}', b"\xef\xbb\xbf{}",
                         b'{"text": "a"}\r', b"[" * 5000 + b"]" * 5000, b'{"text": "' + b"x" * 200_000 + b'"}',
                         b"\xff\xfe\x00", b'{"messages": [{"role": "user", "content": "hi"}]}', b"null", b"{}"]),
    )
    return st.lists(line, max_size=8).map(lambda ls: b"\n".join(ls))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(blob=lines_strategy(), kind=st.sampled_from(KINDS), skip=st.booleans())
def test_readers_return_records_or_a_path_line_error(tmp_path_factory, blob, kind, skip):
    path = tmp_path_factory.mktemp("fuzz") / "in.jsonl"
    path.write_bytes(blob)
    try:
        got = data.load(str(path), kind, skip_invalid=skip)
    except DataError as e:
        assert e.exit_code == 2 and str(e).startswith(f"{path}:") and "\n" not in str(e)
        return
    except InstructError as e:
        assert e.exit_code == 2
        return
    assert got.records and got.rows == len(got.records)
    for r in got.records:  # what comes out is well-formed
        if kind in ("prompts", "comparisons", "demonstrations"):
            assert all(m["role"] in data.ROLES and isinstance(m["content"], str) for m in r.messages)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(blob=lines_strategy())
def test_the_cli_answers_any_file_with_exit_0_or_a_one_line_error(cli, tmp_path, blob):
    path = tmp_path / "in put.jsonl"
    path.write_bytes(blob)
    rule = tmp_path / "rule.py"
    rule.write_text("def f(prompt, response):\n    return float(len(response))\n")
    out = tmp_path / "out.jsonl"
    out.unlink(missing_ok=True)
    r = cli("label", path, "-o", out, "--judge", f"{rule}:f")
    assert r.code in (0, 2) and "Traceback" not in r.err
    if r.code == 0:  # valid samples: every row written is a valid comparison
        assert not out.exists() or data.load(str(out), "comparisons").rows == json.loads(r.out)["labeled"]
    r = cli("sft", path, "-o", tmp_path / "o", "-m", tmp_path / "no model", "-q")
    assert r.code == 2 and "Traceback" not in r.err
    assert r.err.strip().count("\n") == 0, r.err  # one line
    assert not (tmp_path / "o").exists()


# --------------------------------------------------------------------------------------- broken run dirs
@pytest.fixture(scope="module")
def runs(tiny_dir, tmp_path_factory):
    from instructcli import config as C, rm, sft

    d = tmp_path_factory.mktemp("hostile runs")  # a space in every path below
    demos = write_jsonl(d / "de mos.jsonl", [{"prompt": "Say hi.", "response": "Hi!"}] * 4)
    s = sft.train(C.SFTConfig(data=str(demos), out=str(d / "my sft"), quiet=True,
                              model=C.ModelConfig(model=str(tiny_dir)),
                              train=C.TrainConfig(max_steps=1, batch_size=2, eval_frac=0)))
    cmp = write_jsonl(d / "cmp.jsonl", [{"prompt": f"Q{i}?", "chosen": "yes", "rejected": "no"} for i in range(4)])
    r = rm.train(C.RMConfig(data=str(cmp), out=str(d / "my rm"), quiet=True, model=C.ModelConfig(model=str(s)),
                            train=C.TrainConfig(max_steps=1, batch_size=2, eval_frac=0, save_every=0)))
    prompts = write_jsonl(d / "pro mpts.jsonl", [{"prompt": "Say hi."}])
    return d, demos, s, r, prompts


def copy_run(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_broken_run_dirs_are_refused_saying_why(cli, runs, tmp_path):
    _, _, s, _, prompts = runs
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = {}
    cases["not a model dir"] = empty
    bad = copy_run(s, tmp_path / "corrupt")
    (bad / "instruct.json").write_text("{not json")
    cases["unreadable manifest"] = bad
    other = copy_run(s, tmp_path / "other format")
    (other / "instruct.json").write_text(json.dumps({"format_version": 99}))
    cases["not an instruct manifest"] = other
    noweights = copy_run(s, tmp_path / "no weights")
    (noweights / "adapter_model.safetensors").rename(noweights / "adapter_model.bin")  # a pickle is not loaded
    cases["only safetensors adapters are loaded"] = noweights
    moved = copy_run(s, tmp_path / "other base")
    m = json.loads((moved / "instruct.json").read_text())
    m["base_model"]["fingerprint"] = "0123456789abcdef"
    (moved / "instruct.json").write_text(json.dumps(m))
    cases["was trained on another base model"] = moved
    for why, d in cases.items():
        r = cli("sample", d, "-p", prompts, "-o", "-", "-q")
        assert r.code == 2 and why in r.err and "Traceback" not in r.err, (why, r)


def test_wrong_stage_dirs_are_refused(cli, runs, tmp_path):
    _, _, s, r, prompts = runs
    got = cli("ppo", "--policy", s, "--reward", s, "-p", prompts, "--ptx-coef", 0, "-o", tmp_path / "p", "-q")
    assert got.code == 2 and "not a reward model run dir (it is sft)" in got.err
    got = cli("ppo", "--policy", r, "--reward", r, "-p", prompts, "--ptx-coef", 0, "-o", tmp_path / "p", "-q")
    assert got.code == 2 and "--policy" in got.err and "a reward model run dir (stage rm), not a policy" in got.err
    got = cli("sample", r, "-p", prompts, "-o", "-", "-q")
    assert got.code == 2 and "not a policy" in got.err
    samples = write_jsonl(tmp_path / "s.jsonl", [{"prompt": "Say hi.", "responses": ["Hi"]}])
    got = cli("score", s, samples, "-q")
    assert got.code == 2 and "not a reward model run dir (it is sft)" in got.err
    got = cli("eval", s, "-p", prompts, "--reward", s, "-o", tmp_path / "e", "-q")
    assert got.code == 2 and "not a reward model run dir (it is sft)" in got.err and not (tmp_path / "e").exists()


def test_a_parent_replaced_after_training_is_detected(cli, runs, tiny_dir, tmp_path):
    d, demos, s, _, prompts = runs
    sft2 = copy_run(s, tmp_path / "sft2")
    from instructcli import config as C, rm

    cmp = write_jsonl(tmp_path / "cmp.jsonl", [{"prompt": "Q?", "chosen": "yes", "rejected": "no"}] * 2)
    r2 = rm.train(C.RMConfig(data=str(cmp), out=str(tmp_path / "rm2"), quiet=True, model=C.ModelConfig(model=str(sft2)),
                             train=C.TrainConfig(max_steps=1, batch_size=2, eval_frac=0, save_every=0)))
    got = cli("sft", demos, "-m", tiny_dir, "-o", sft2, "--max-steps", 1, "-b", 2, "--eval-frac", 0, "--overwrite", "-q")
    assert got.code == 0, got
    got = cli("ppo", "--policy", sft2, "--reward", r2, "-p", prompts, "--ptx-coef", 0, "-o", tmp_path / "p", "-q")
    assert got.code == 2 and "has been replaced since" in got.err


def test_paths_with_spaces_and_stdin(cli, runs, tmp_path):
    d, _, s, r, prompts = runs
    out = tmp_path / "sam ples.jsonl"
    got = cli("sample", s, "-p", "-", "-o", out, "--max-new-tokens", 3, "-q", stdin=prompts.read_bytes())
    assert got.code == 0, got
    assert json.loads(out.read_text())["prompt"] == "Say hi."
    got = cli("score", r, "-", "-o", "-", "-q", stdin=out.read_bytes())
    assert got.code == 0 and len(json.loads(got.out)["scores"]) == 1


# ------------------------------------------------------------------------------------------------ security
BLOCK_NET = '''
import os, socket
_real = socket.socket.connect
def _connect(self, address):
    host = address[0] if isinstance(address, tuple) else str(address)
    if host not in ("127.0.0.1", "::1", "localhost") and not str(address).startswith("/"):
        with open(os.environ["NET_LOG"], "a") as f:
            f.write(repr(address) + "\\n")
        raise OSError("network disabled by the test")
    return _real(self, address)
socket.socket.connect = _connect
'''


def run_module(args, env_extra, cwd):
    env = {**os.environ, **env_extra}
    return subprocess.run([sys.executable, "-m", "instructcli", *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=300)


def test_the_cli_runs_with_the_network_disabled(runs, tmp_path):
    _, _, s, r, prompts = runs
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(BLOCK_NET)
    log = tmp_path / "net.log"
    env = {"PYTHONPATH": f"{tmp_path / 'site'}{os.pathsep}{ROOT}", "NET_LOG": str(log), "HF_HUB_OFFLINE": "1",
           "HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9",
           "INSTRUCT_CACHE": str(tmp_path / "cache")}
    p = run_module(["sample", s, "-p", prompts, "-o", tmp_path / "s.jsonl", "--max-new-tokens", 3, "-q"], env, tmp_path)
    assert p.returncode == 0, p.stderr
    p = run_module(["score", r, tmp_path / "s.jsonl", "-o", "-", "-q"], env, tmp_path)
    assert p.returncode == 0, p.stderr
    assert not log.exists() or log.read_text() == ""
    # the guard itself works: a hub id that is not cached fails offline, in one line, without a connection
    p = run_module(["sample", "someone/not-cached-model", "-p", prompts, "-q"], env, tmp_path)
    assert p.returncode == 2 and "HF_HUB_OFFLINE=1" in p.stderr and "Traceback" not in p.stderr


def test_remote_code_does_not_run_without_the_flag(cli, tiny_dir, runs, tmp_path):
    _, _, _, _, prompts = runs
    evil = copy_run(tiny_dir, tmp_path / "evil")
    marker = tmp_path / "pwned"
    (evil / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n"
                                          "from transformers import LlamaForCausalLM as EvilModel\n")
    cfg = json.loads((evil / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilModel"}
    (evil / "config.json").write_text(json.dumps(cfg))
    r = cli("sample", evil, "-p", prompts, "-o", "-", "--max-new-tokens", 2, "-q")
    assert r.code in (0, 2) and not marker.exists()


def test_no_pickle_loading_in_the_code():
    src = "\n".join(p.read_text() for p in (ROOT / "instructcli").glob("*.py"))
    loads = [line.strip() for line in src.splitlines() if "torch.load(" in line]
    assert loads and all("weights_only=True" in line for line in loads), loads
    assert "pickle" not in src.replace("no pickle", "").replace("a pickle", "").replace("pickled", "")

