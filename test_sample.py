"""
Tests for sample.py: it is run as a script on a tiny random checkpoint (CPU, a few seconds per run).
    python -m pytest -q test_sample.py
"""
import functools
import os
import re
import subprocess
import sys
from dataclasses import asdict

import pytest
import torch

from model import GPT, GPTConfig

HERE = os.path.dirname(os.path.abspath(__file__))
_CACHE = os.path.join(HERE, "..", "shared", "tiktoken_cache")  # the GPT-2 BPE file, for machines without network
ENV = dict(os.environ, PYTHONIOENCODING="utf-8", OMP_NUM_THREADS="1")  # one thread: far faster for a model this small
if os.path.isdir(_CACHE):
    ENV.setdefault("TIKTOKEN_CACHE_DIR", _CACHE)

CFG = GPTConfig(block_size=64, vocab_size=50304, n_embd=32, n_head=4, n_kv_head=2, n_prelude=1, n_core=1,
                n_coda=1, mean_recurrence=3, backprop_depth=2)
STATS = re.compile(r"^\[loop depth (\d+), mean loop steps per generated token ([\d.]+), "
                   r"kv cache ([\d,]+) bytes \(([\d.]+) MiB, (full|last)\)\]$", re.M)
SEP = "---------------"
PROMPT = "--start=The looped transformer"


def save_checkpoint(path, model_args=None, version=1):
    torch.manual_seed(0)
    model = GPT(CFG)
    with torch.no_grad():  # the output projections start at zero: make every block do some work
        for name, p in model.named_parameters():
            if name.endswith(("attn.o.weight", "mlp.down.weight")):
                p.normal_(0, 0.1)
    ckpt = {"model": model.state_dict(), "model_args": model_args or asdict(CFG), "optimizer": [], "iter_num": 0,
            "data_pos": [0, 0], "config": {}, "rng": [], "version": version}
    os.makedirs(path, exist_ok=True)
    torch.save(ckpt, os.path.join(path, "ckpt.pt"))
    return str(path)


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory):
    return save_checkpoint(tmp_path_factory.mktemp("out"))


@functools.cache
def sample(*args):
    """Run sample.py with these arguments (memoized: tests share identical runs)."""
    return subprocess.run([sys.executable, "sample.py", "--device=cpu", *args], cwd=HERE, env=ENV,
                          capture_output=True, text=True, timeout=120)


def samples(r):
    """[(text, depth, mean_steps, cache_bytes, mode)] from a successful run."""
    assert r.returncode == 0, r.stderr
    blocks = r.stdout.split(SEP + "\n")
    assert blocks[-1] == ""  # every sample ends with the separator
    out = []
    for block in blocks[:-1]:
        stats = list(STATS.finditer(block))
        assert len(stats) == 1 and stats[0].end() == len(block) - 1, block  # the stats line closes the sample
        depth, steps, nbytes, mib, mode = stats[0].groups()
        assert float(mib) == pytest.approx(int(nbytes.replace(",", "")) / 2**20, abs=0.01)
        out.append((block[:stats[0].start()], int(depth), float(steps), int(nbytes.replace(",", "")), mode))
    return out


def kv_bytes(core_sets, L):
    """fp32 K and V of L tokens for the prelude layer, the coda layer and core_sets core layers."""
    head_dim = CFG.n_embd // CFG.n_head
    return (CFG.n_prelude + CFG.n_coda + core_sets * CFG.n_core) * 2 * CFG.n_kv_head * L * head_dim * 4


def check_error(r, *words):
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr  # one clean line
    for w in words:
        assert w in r.stderr, r.stderr


# -----------------------------------------------------------------------------

def test_samples_with_stats(out_dir):
    got = samples(sample(f"--out_dir={out_dir}", "--num_samples=2", "--max_new_tokens=20"))
    assert len(got) == 2
    for text, depth, steps, nbytes, mode in got:
        assert text.startswith("\n") and len(text) > 1  # the default prompt, then generated text
        assert (depth, steps, mode) == (CFG.mean_recurrence, CFG.mean_recurrence, "full")  # 0 = trained depth
        # the one-token prompt and 19 generated tokens are cached (the last token is never fed back)
        assert nbytes == kv_bytes(CFG.mean_recurrence, 1 + 20 - 1)


def greedy(out_dir, *args):
    return samples(sample(f"--out_dir={out_dir}", PROMPT, "--num_samples=2", "--max_new_tokens=20",
                          "--temperature=0", *args))


def test_num_loops_is_the_test_time_depth(out_dir):
    (a, a2), (b, b2) = greedy(out_dir, "--num_loops=1"), greedy(out_dir, "--num_loops=8")
    assert a == a2 and b == b2  # greedy decoding is deterministic
    assert a[0].startswith("The looped transformer") and b[0].startswith("The looped transformer")
    assert a[0] != b[0]  # a deeper loop computes something else
    assert (a[1], a[2], b[1], b[2]) == (1, 1.0, 8, 8.0)
    # the full cache keeps one set of core K/V per loop step: 1 + 1 + T sets
    assert b[3] > a[3] and a[3] * (2 + 8) == b[3] * (2 + 1)


def test_last_step_cache_is_smaller(out_dir):
    (one, _), (last, _) = greedy(out_dir, "--num_loops=1"), greedy(out_dir, "--num_loops=4", "--cache=last")
    assert (one[4], last[4]) == ("full", "last")
    L = one[3] // kv_bytes(1, 1)  # tokens in the cache
    # one set of core K/V, each past token's last step: what the full cache holds at depth 1, not 4
    assert last[3] == one[3] == kv_bytes(1, L) < kv_bytes(4, L)


def test_adaptive_exit(out_dir):
    (s,) = samples(sample(f"--out_dir={out_dir}", PROMPT, "--num_samples=1", "--max_new_tokens=20",
                          "--num_loops=4", "--exit_criterion=latent", "--exit_threshold=1e9"))
    assert (s[1], s[2]) == (4, 1.0)  # every generated token leaves the loop after its first step


def test_long_prompt_from_file_is_cropped(out_dir, tmp_path):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("".join(f"line {i}\n" for i in range(40)))  # about 120 tokens, block_size is 64
    r = sample(f"--out_dir={out_dir}", f"--start=FILE:{prompt}", "--num_samples=1", "--max_new_tokens=10")
    (text, depth, _, nbytes, _), = samples(r)
    assert "warning" in r.stderr and "block_size=64" in r.stderr
    assert "line 39\n" in text and "line 0\n" not in text  # the left end was cropped
    assert len(text.split("line 39\n")[1]) > 1  # and text generated after the prompt
    assert nbytes == kv_bytes(depth, CFG.block_size)  # past block_size the context is the last 64 tokens


def test_missing_checkpoint(tmp_path):
    check_error(sample(f"--out_dir={tmp_path}"), "ckpt.pt", str(tmp_path), "train")


@pytest.mark.parametrize("kind", ["version", "model_args"])
def test_incompatible_checkpoint(tmp_path, kind):
    args = dict(asdict(CFG), n_loops=3) if kind == "model_args" else None
    path = save_checkpoint(tmp_path, model_args=args, version=2 if kind == "version" else 1)
    check_error(sample(f"--out_dir={path}"), "incompatible", "version 2" if kind == "version" else "n_loops")


@pytest.mark.parametrize("arg, words", [("--bogus=1", ["unknown", "bogus"]), ("--cache=half", ["cache", "half"]),
                                        ("--compile=1", ["'compile' must be True or False, got 1"]),
                                        ("--use_cache=0", ["'use_cache' must be True or False, got 0"])])
def test_bad_settings(out_dir, arg, words):
    check_error(sample(f"--out_dir={out_dir}", arg), *words)


@pytest.mark.parametrize("kind, words", [("empty", ["empty", "0 bytes"]), ("truncated", ["cannot read"])])
def test_unreadable_checkpoint(tmp_path, kind, words):
    path = save_checkpoint(tmp_path)
    blob = open(os.path.join(path, "ckpt.pt"), "rb").read()
    open(os.path.join(path, "ckpt.pt"), "wb").write(b"" if kind == "empty" else blob[:len(blob) // 2])
    check_error(sample(f"--out_dir={path}"), "ckpt.pt", *words)


@pytest.mark.parametrize("prompt", ["1984", "None", 'he said "hi"'])
def test_prompt_is_the_text_as_typed(out_dir, prompt):
    (s,) = samples(sample(f"--out_dir={out_dir}", f"--start={prompt}", "--num_samples=1", "--max_new_tokens=5"))
    assert s[0].startswith(prompt) and len(s[0]) > len(prompt)


def test_a_positional_argument_points_at_out_dir(out_dir):
    check_error(sample(out_dir), f"error: sample.py takes no config file: point it at a run with --out_dir={out_dir}")
    check_error(sample("config/tiny.py"), "--out_dir=out/tiny (the out_dir config/tiny.py sets)")


def test_a_depth_whose_cache_cannot_fit_is_refused_up_front(out_dir):
    r = sample(f"--out_dir={out_dir}", PROMPT, "--num_loops=100000000", "--max_new_tokens=8", "--num_samples=1")
    assert r.returncode != 0 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "num_loops=100000000" in r.stderr and "GiB" in r.stderr and "free" in r.stderr, r.stderr


def test_cache_estimate_is_what_the_cache_holds(out_dir):
    import decode
    model = GPT(CFG).eval()
    for mode, T in (("full", 5), ("last", 5), ("full", 1)):
        y, stats = model.generate(torch.zeros(1, 7, dtype=torch.long), 9, temperature=0, num_loops=T, cache=mode,
                                  return_stats=True)
        assert stats["cache_bytes"] == decode.cache_estimate(model, T, 7 + 9 - 1, mode)  # the last token is not cached
