"""Tests of train.py and its data path (CPU).   python -m pytest -q test_train.py"""
import glob
import json
import math
import os
import re
import shutil
import signal
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch

from prepare_fineweb import build_sample, read_batch, write_shard

ROOT = os.path.dirname(os.path.abspath(__file__))
_CACHE = os.path.join(ROOT, "..", "shared", "tiktoken_cache")
if os.path.isdir(_CACHE):  # the GPT-2 BPE file, for machines without network
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", _CACHE)
# a tiny model that trains in seconds; fixed depths and zero state make runs comparable across processes
TINY = ["--n_embd=32", "--n_head=2", "--n_kv_head=1", "--n_prelude=1", "--n_core=1", "--n_coda=1",
        "--mean_recurrence=3", "--backprop_depth=2", "--depth_sampling=fixed", "--state_init=zero", "--block_size=32", "--batch_size=4", "--val_tokens=1024",
        "--total_batch_size=128", "--compile=False", "--device=cpu", "--log_interval=1", "--warmup_iters=2", "--decay_frac=0.0"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("sample")
    build_sample(str(path))
    return str(path)


ENV = dict(os.environ, OMP_NUM_THREADS="1")  # one thread per process: far faster on a busy machine for models this small


def train(*args, check=True, launcher=(sys.executable,)):
    r = subprocess.run([*launcher, "train.py", *args], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    if check and r.returncode != 0:
        raise AssertionError(f"train.py failed:\n{r.stdout}\n{r.stderr}")
    return r


def read_log(out_dir):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def train_losses(out_dir):
    return {r["iter"]: r["loss"] for r in read_log(out_dir) if "loss" in r}


# config errors ---------------------------------------------------------------------------------
@pytest.mark.parametrize("arg,key", [("--n_embdd=64", "n_embdd"), ("--batch_size=abc", "batch_size"),
                                     ("--compile=maybe", "compile"), ("--eval_loops=oops", "eval_loops"),
                                     ("--decay_shape=step", "decay_shape")])
def test_bad_setting_names_the_key(arg, key):
    r = train(arg, check=False)
    assert r.returncode != 0 and key in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("script", ["train.py", "bench.py"])
@pytest.mark.parametrize("arg,words", [("--compile=1", "'compile' must be True, False or None"),
                                       ("--compile=0", "'compile' must be True, False or None"),
                                       ("--compile=1.0", "'compile' must be True, False or None"),
                                       ("--overwrite=1", "'overwrite' must be True or False, got 1"),
                                       ("--prelude_norm=0", "'prelude_norm' must be True or False, got 0")])
def test_a_bool_setting_is_true_or_false(tmp_path, script, arg, words):
    # 1 == True in Python: without the check --compile=1 was silently True
    r = subprocess.run([sys.executable, script, arg, "--device=cpu", f"--data_dir={tmp_path}"], cwd=ROOT, env=ENV,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert words in r.stderr, r.stderr


@pytest.mark.parametrize("script", ["train.py", "sample.py", "bench.py"])
@pytest.mark.parametrize("arg,words", [("--device=gpu", ["unknown device 'gpu'", "cuda:N"]),
                                       ("--device=cuda:99", ["cuda:99"]), ("--dtype=half", ["dtype", "half"]),
                                       ("--device=mps", ["mps", "--device=cpu"])])
def test_device_and_dtype_are_checked_first(tmp_path, script, arg, words):
    if arg == "--device=mps" and torch.backends.mps.is_available():
        arg, words = "--device=mps:0", ["unknown device 'mps:0'"]  # still an error on a Mac
    # before any data or checkpoint is read: neither exists here, yet the message is about the device
    r = subprocess.run([sys.executable, script, arg, f"--data_dir={tmp_path}" if script == "train.py" else
                        f"--out_dir={tmp_path}" if script == "sample.py" else "--steps=1"],
                       cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert all(w in r.stderr for w in words), r.stderr


def test_float16_on_cpu_warns(tmp_path):
    r = train("--device=cpu", "--dtype=float16", f"--data_dir={tmp_path}", check=False)
    assert "warning: float16 on a CPU is emulated" in r.stderr and "no train shards" in r.stderr


def settings_in(script):
    """name -> the rest of its line, from the block between the script's two dashed lines; a comment that goes on
    in indented comment lines below it is joined to it, as --help shows it."""
    src = open(os.path.join(ROOT, script)).read().split("# " + "-" * 77 + "\n")[1]
    return {name: rest + "".join(" " + c.strip().lstrip("#").strip() for c in more.splitlines() if c.strip())
            for name, rest, more in re.findall(r"^(\w+) = (.*)$((?:\n +#.*)*)", src, re.M)}


@pytest.mark.parametrize("script", ["train.py", "sample.py", "bench.py"])
@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_lists_every_setting_before_importing_torch(script, flag):
    code = ("import runpy, sys\nsys.argv = [%r, %r]\ntry:\n    runpy.run_path(%r, run_name='__main__')\n"
            "except SystemExit as e:\n    print('exit', e.code)\nprint('torch imported:', 'torch' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code % (script, flag, script)], cwd=ROOT, env=ENV,
                       capture_output=True, text=True, timeout=120)
    assert r.stdout.rstrip().endswith("exit 0\ntorch imported: False"), r.stdout + r.stderr
    doc = open(os.path.join(ROOT, script)).read().split('"""')[1].strip()
    assert r.stdout.startswith(doc.splitlines()[0])
    lines = r.stdout.splitlines()
    expect = {**settings_in(script), **(settings_in("train.py") if script == "bench.py" else {})}
    for name, rest in expect.items():
        default, _, comment = rest.partition("#")
        assert any(l.split() [:3] == [name, "=", default.split()[0]] and l.endswith(comment.strip()) for l in lines), name
    assert any(l.startswith("  overwrite = False ") and "replace" in l for l in lines) == (script != "sample.py")


@pytest.mark.parametrize("script", ["train.py", "bench.py"])
def test_help_lists_every_model_setting_once(script):
    """train.py's model settings are GPTConfig's fields (model.py), not a copy of them: --help lists each once, with
    its default and comment there (block_size once, as train.py's sequence length)."""
    from model import GPTConfig
    r = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    src = open(os.path.join(ROOT, "model.py")).read().split("class GPTConfig:")[1].split("def __post_init__")[0]
    found = re.findall(r"^    (\w+): \w+ = (\S+) +# (.*)$", src, re.M)
    assert [name for name, _, _ in found] == list(GPTConfig.__dataclass_fields__)
    for name, default, comment in found:
        hits = [l for l in r.stdout.splitlines() if l.split()[:3] == [name, "=", default]]
        assert len(hits) == 1 and (name == "block_size" or hits[0].endswith("# " + comment.strip())), (name, hits)
    assert "settings of model.py GPTConfig" in r.stdout
    if script == "train.py":  # its own section lists its settings block and nothing past it (iter_num, data_pos ...)
        own = r.stdout.split("settings of train.py")[1].split("settings of model.py")[0]
        assert re.findall(r"^  (\w+) = ", own, re.M) == list(settings_in("train.py"))


@pytest.mark.parametrize("args,fix", [(["--total_batch_size=1000"], "set --total_batch_size=1024"),
                                      (["--batch_size=3"], "set --total_batch_size=192 or --batch_size=2")])
def test_batch_size_error_names_a_value_that_works(tmp_path, args, fix):
    r = train(*TINY, *args, f"--data_dir={tmp_path}", check=False)
    assert r.returncode != 0 and "Traceback" not in r.stderr and r.stderr.strip().endswith(fix), r.stderr


def test_unknown_key_suggests_the_closest_one():
    r = train("--max_iter=100", check=False)
    assert r.returncode != 0 and r.stderr.strip() == "error: unknown config key 'max_iter' (command line): did you mean max_iters?"


def test_a_config_folder_is_one_line_error():
    r = train("config", check=False)
    assert r.returncode != 0 and r.stderr.strip() == ("error: config is a folder, not a config file: name a file in it, "
                                                      "e.g. config/tiny.py")


def test_unknown_key_in_config_file(tmp_path):
    cfg = tmp_path / "bad.py"
    cfg.write_text("n_embd = 64\nlearning_rate = 1e-3\n")
    r = train(str(cfg), check=False)
    assert r.returncode != 0 and "learning_rate" in r.stderr and "Traceback" not in r.stderr


def test_missing_data_folder_says_so(tmp_path):
    r = train(*TINY, f"--data_dir={tmp_path / 'nope'}", check=False)
    assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert r.stderr.startswith(f"error: data_dir {tmp_path / 'nope'} does not exist: make it with python "
                               f"prepare_fineweb.py (--sample writes data/sample)"), r.stderr
    r = train(*TINY, f"--data_dir={tmp_path}", check=False)  # a folder without shards: the prepare hint
    assert r.stderr.strip() == f"error: no train shards (*_train_*.bin) in {tmp_path}: run prepare_fineweb.py first"


@pytest.mark.parametrize("split", ["train", "val"])
def test_data_under_one_batch_says_what_to_lower(tmp_path, split):
    d = tmp_path / "data"
    d.mkdir()
    write_shard(str(d / "x_val_000000.bin"), np.arange(100 if split == "val" else 5000) % 50000)
    write_shard(str(d / "x_train_000001.bin"), np.arange(100 if split == "train" else 5000) % 50000)
    r = train(*TINY, f"--data_dir={d}", f"--out_dir={tmp_path / 'out'}", check=False)
    assert r.returncode != 0 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    start = (f"error: a train shard {d / 'x_train_000001.bin'} holds 100 tokens" if split == "train" else
             f"error: the val shards in {d} hold 100 tokens")
    assert r.stderr.startswith(start), r.stderr
    assert r.stderr.strip().endswith("batch_size * block_size * processes + 1 = 4 * 32 * 1 + 1 = 129: lower batch_size "
                                     "or block_size (total_batch_size with them), run fewer processes, or prepare more text")


def test_bad_shard_is_named(tmp_path, data):
    bad = tmp_path / "data"
    bad.mkdir()
    write_shard(str(bad / "x_val_000000.bin"), np.arange(5000) % 50000)
    write_shard(str(bad / "x_train_000001.bin"), np.arange(5000) % 50000)
    with open(bad / "x_train_000001.bin", "r+b") as f:
        f.truncate(1024 + 2 * 4000)  # fewer tokens than the header claims
    r = train(*TINY, f"--data_dir={bad}", f"--out_dir={tmp_path / 'out'}", check=False)
    assert r.returncode != 0 and "x_train_000001.bin" in r.stderr and "Traceback" not in r.stderr
    assert r.stderr.startswith("error: bad shard: ")


def test_resume_without_checkpoint_is_a_clear_error(tmp_path, data):
    r = train(*TINY, f"--data_dir={data}", f"--out_dir={tmp_path}", "--init_from=resume", check=False)
    assert r.returncode != 0 and "ckpt.pt" in r.stderr and "Traceback" not in r.stderr


def test_scratch_run_refuses_to_replace_a_checkpoint(tmp_path, data):
    common = [*TINY, f"--data_dir={data}", f"--out_dir={tmp_path}", "--eval_interval=100"]
    train(*common, "--max_iters=3")
    ckpt, log = (tmp_path / "ckpt.pt").read_bytes(), (tmp_path / "log.jsonl").read_text()
    r = train(*common, "--max_iters=2", check=False)
    assert r.returncode != 0 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert all(way in r.stderr for way in ("--init_from=resume", "--out_dir=", "--overwrite=True"))
    assert (tmp_path / "ckpt.pt").read_bytes() == ckpt and (tmp_path / "log.jsonl").read_text() == log
    train(*common, "--max_iters=2", "--overwrite=True")  # replaces both: the log holds the new run only
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["iter_num"] == 2
    assert [r["iter"] for r in read_log(str(tmp_path)) if "run" not in r] == [0, 1, 2, 2]
    assert [r["iter"] for r in read_log(str(tmp_path)) if "run" in r] == [0]  # this run's record, first


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data):
    """A 2-step tiny run: (its args without out_dir, its out_dir). Tests copy it before changing it."""
    out = str(tmp_path_factory.mktemp("trained"))
    args = [*TINY, f"--data_dir={data}", "--eval_interval=100", "--eval_loops=1"]
    train(*args, f"--out_dir={out}", "--max_iters=2")
    return args, out


def damage(path, kind):
    if kind == "empty":
        open(path, "wb").close()
    elif kind == "truncated":
        blob = open(path, "rb").read()
        open(path, "wb").write(blob[:len(blob) // 2])
    else:
        ckpt = torch.load(path, weights_only=True)
        if kind == "no data_pos":
            del ckpt["data_pos"]
        else:  # a weight of another shape than model_args says
            ckpt["model"]["wte.weight"] = ckpt["model"]["wte.weight"][:, :16].clone()
        torch.save(ckpt, path)


@pytest.mark.parametrize("kind,words", [("empty", ["empty", "0 bytes"]), ("truncated", ["cannot read"]),
                                        ("no data_pos", ["data_pos", "cannot be resumed"]),
                                        ("shapes", ["does not fit", "wte"])])
@pytest.mark.parametrize("mode", ["--init_from=resume", "--eval_only=True"])
def test_bad_checkpoint_is_one_line_error(tmp_path, trained, kind, words, mode):
    if kind == "no data_pos" and mode == "--eval_only=True":
        words = None  # evaluating needs only the weights
    args, src = trained
    out = tmp_path / "out"
    shutil.copytree(src, out)
    damage(str(out / "ckpt.pt"), kind)
    before = (out / "ckpt.pt").read_bytes()
    r = train(*args, f"--out_dir={out}", "--max_iters=4", mode, check=False)
    if words is None:
        assert r.returncode == 0 and "T=1 " in r.stdout, r.stderr
    else:
        assert r.returncode != 0 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert "ckpt.pt" in r.stderr and all(w in r.stderr for w in words), r.stderr
    assert (out / "ckpt.pt").read_bytes() == before  # nothing written over it


def test_resume_says_what_it_does(tmp_path, trained):
    args, src = trained
    out = tmp_path / "out"
    shutil.copytree(src, out)
    ckpt, log = (out / "ckpt.pt").read_bytes(), (out / "log.jsonl").read_text()
    for max_iters in (1, 2):  # at or below the checkpoint's iter 2: nothing to do is an error, not a silent exit 0
        r = train(*args, f"--out_dir={out}", f"--max_iters={max_iters}", "--init_from=resume", check=False)
        assert r.returncode != 0 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
        assert "at iter 2" in r.stderr and "--max_iters=N above 2" in r.stderr, r.stderr
        assert (out / "ckpt.pt").read_bytes() == ckpt and (out / "log.jsonl").read_text() == log
    # a run stopped by Ctrl-C after logging iters 3 and 4 but before its next checkpoint
    with open(out / "log.jsonl", "a") as f:
        f.write('{"iter": 3, "loss": 1.0}\n{"iter": 4, "loss": 1.0}\n')
    r = train(*args, f"--out_dir={out}", "--max_iters=4", "--init_from=resume")
    assert f"resuming from {out / 'ckpt.pt'} at iter 2 of 4, lr x" in r.stdout
    assert "max_iters changed 2 -> 4" in r.stdout  # the lr schedule moves: say so
    assert "dropped 2 records past iter 2" in r.stdout
    iters = [r["iter"] for r in read_log(str(out)) if "loss" in r]
    assert iters == [1, 2, 3, 4] and all(r["loss"] != 1.0 for r in read_log(str(out)) if "loss" in r)


def test_resume_and_eval_only_take_the_runs_settings(tmp_path, trained):
    args, src = trained
    out = tmp_path / "out"
    shutil.copytree(src, out)
    env = ["--device=cpu", "--compile=False"]
    # no config file at all: data_dir, block_size, batch sizes ... come from the checkpoint
    r = train(f"--out_dir={out}", *env, "--init_from=resume", "--max_iters=3")
    line = next(l for l in r.stdout.splitlines() if l.startswith("settings from the checkpoint"))
    assert "block_size=32" in line and "batch_size=4" in line and "data_dir=" in line
    assert "device=" not in line  # given on the command line: the command line wins
    assert [r["iter"] for r in read_log(str(out)) if "loss" in r] == [1, 2, 3]
    # a config file ranks below the checkpoint (tiny.py says block_size 128, data_dir data/sample) ...
    r = train("config/tiny.py", f"--out_dir={out}", *env, "--eval_only=True")
    assert "block_size=32" in r.stdout and "T=1 " in r.stdout and "T=4 " not in r.stdout
    # ... and the command line above both
    r = train("config/tiny.py", f"--out_dir={out}", *env, "--eval_only=True", "--eval_loops=2")
    assert "T=2 " in r.stdout and "T=1 " not in r.stdout


def test_a_config_file_overridden_by_the_checkpoint_is_named(tmp_path, trained):
    args, src = trained
    out = tmp_path / "out"
    shutil.copytree(src, out)
    r = train("config/tiny.py", f"--out_dir={out}", "--device=cpu", "--compile=False", "--eval_only=True")
    line = next(l for l in r.stdout.splitlines() if l.startswith("config/tiny.py: "))  # one line, naming the file
    assert "block_size" in line and "data_dir" in line and "the checkpoint's here" in line, line
    assert "device" not in line  # the command line's own values are kept, not overridden


def test_a_model_flag_on_resume_leaves_the_saved_settings_the_models(tmp_path, trained):
    args, src = trained
    out = tmp_path / "out"
    shutil.copytree(src, out)
    r = train(*args, f"--out_dir={out}", "--max_iters=3", "--init_from=resume", "--n_embd=64", "--block_size=16")
    assert "using the checkpoint's model settings" in r.stdout and "n_embd" in r.stdout
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["model_args"]["n_embd"] == 32 and ckpt["config"]["n_embd"] == 32  # not the flag's 64
    assert ckpt["model_args"]["block_size"] == 32 and ckpt["config"]["block_size"] == 16  # the rows it trained on
    r = train(*args, f"--out_dir={out}", "--max_iters=4", "--init_from=resume", "--block_size=16")
    assert "n_embd" not in r.stdout  # a later run: no n_embd difference to warn of


def test_eval_at_start_off_and_save_interval(tmp_path, data):
    r = train(*TINY, f"--data_dir={data}", f"--out_dir={tmp_path}", "--max_iters=4", "--eval_interval=4",
              "--eval_loops=1", "--eval_at_start=False", "--save_interval=2")
    assert [rec["iter"] for rec in read_log(str(tmp_path)) if "val" in rec] == [4]  # no evaluation at iter 0
    assert r.stdout.count("saved ") == 2 and "at iter 2" in r.stdout and "at iter 4" in r.stdout


def test_ctrl_c_says_what_the_checkpoint_holds(tmp_path, data):
    p = subprocess.Popen([sys.executable, "train.py", *TINY, f"--data_dir={data}", f"--out_dir={tmp_path}",
                          "--max_iters=100000", "--eval_interval=2", "--eval_loops=1"],
                         cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = []
    for line in p.stdout:  # wait for the first save, then press Ctrl-C
        lines.append(line)
        if line.startswith("saved "):
            break
    assert lines[-1] == f"saved {tmp_path / 'ckpt.pt'} at iter 2\n", lines
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 130 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    held = torch.load(tmp_path / "ckpt.pt", weights_only=True)["iter_num"]
    assert err.startswith("interrupted at iter ") and f"ckpt.pt holds iter {held}: continue with --init_from=resume" in err


@pytest.mark.parametrize("split", ["train", "val"])
def test_token_ids_past_vocab_size_are_named(tmp_path, split):
    d = tmp_path / "data"
    d.mkdir()
    for s in ("train", "val"):
        tokens = np.arange(5000) % 50000
        if s == split:
            tokens[700] = 50400  # fits uint16, but not the 50304-row embedding
        write_shard(str(d / f"x_{s}_00000{int(s == 'train')}.bin"), tokens)
    r = train(*TINY, f"--data_dir={d}", f"--out_dir={tmp_path / 'out'}", "--max_iters=20", "--eval_interval=100",
              "--eval_loops=1", check=False)
    assert r.returncode != 0 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "token id 50400" in r.stderr and "vocab_size=50304" in r.stderr
    assert ("x_train_000001.bin" if split == "train" else "val shards") in r.stderr


@pytest.mark.parametrize("arg", ["--eval_loops=0", "--eval_loops=1,0", "--log_interval=0"])
def test_zero_depths_and_intervals_are_one_line_errors(tmp_path, arg):
    r = train(*TINY, arg, f"--data_dir={tmp_path}", check=False)
    assert r.returncode != 0 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert arg[2:].split("=")[0] + " must be" in r.stderr, r.stderr


def test_wrap_around_is_announced(tmp_path, data):
    d = tmp_path / "data"
    d.mkdir()
    write_shard(str(d / "x_val_000000.bin"), np.arange(2000) % 50000)
    write_shard(str(d / "x_train_000001.bin"), np.arange(300) % 50000)  # two micro-batches of 128 tokens
    r = train(*TINY, f"--data_dir={d}", f"--out_dir={tmp_path / 'out'}", "--max_iters=3", "--eval_interval=100",
              "--eval_loops=1")
    wraps = [l for l in r.stdout.splitlines() if "wrapped around" in l]
    assert wraps == ["iter 2: the train data wrapped around to its start: every token from here on is seen again"]


def test_logged_train_loss_is_the_mean_over_the_interval(tmp_path, data):
    common = [*TINY, f"--data_dir={data}", "--max_iters=5", "--eval_interval=100", "--eval_loops=1"]
    every, pairs = str(tmp_path / "every"), str(tmp_path / "pairs")
    train(*common, f"--out_dir={every}", "--log_interval=1")
    train(*common, f"--out_dir={pairs}", "--log_interval=2")
    a, b = train_losses(every), train_losses(pairs)
    assert sorted(b) == [2, 4, 5]  # the last interval is one step long
    expect = {2: (a[1] + a[2]) / 2, 4: (a[3] + a[4]) / 2, 5: a[5]}
    assert all(abs(b[i] - expect[i]) < 1e-5 for i in b) and b[2] != a[2], (a, b)


# loader --------------------------------------------------------------------------------------------
def test_two_ranks_read_disjoint_slices_of_the_global_batch():
    shards = [np.arange(10_000, dtype=np.uint16), np.arange(20_000, 30_000, dtype=np.uint16)]
    pos_single, pos = [0, 0], [[0, 0], [0, 0]]
    for _ in range(40):  # long enough to cross into the second shard and wrap around
        whole_x, whole_y = read_batch(shards, pos_single, 8, 64, rank=0, world=1)
        parts = [read_batch(shards, pos[r], 4, 64, rank=r, world=2) for r in range(2)]
        assert torch.equal(torch.cat([p[0] for p in parts]), whole_x)
        assert torch.equal(torch.cat([p[1] for p in parts]), whole_y)
        assert not set(parts[0][0].flatten().tolist()) & set(parts[1][0].flatten().tolist())
        assert pos[0] == pos[1] == pos_single
        assert torch.equal(whole_y[:, :-1], whole_x[:, 1:])


# resume, checkpoint, guards --------------------------------------------------------------------------
def test_resume_is_exact(tmp_path, data):
    common = [*TINY, f"--data_dir={data}", "--eval_interval=4", "--depth_sampling=sequence", "--state_init=random"]
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    train(*common, f"--out_dir={a}", "--max_iters=8")
    train(*common, f"--out_dir={b}", "--max_iters=4")
    ckpt_b = torch.load(os.path.join(b, "ckpt.pt"), weights_only=True)
    assert ckpt_b["iter_num"] == 4
    assert {"model", "model_args", "optimizer", "iter_num", "config"} <= set(ckpt_b)
    train(*common, f"--out_dir={b}", "--max_iters=8", "--init_from=resume")
    la, lb = train_losses(a), train_losses(b)
    assert sorted(la) == sorted(lb) == list(range(1, 9))
    assert all(la[i] == lb[i] for i in la), (la, lb)
    wa = torch.load(os.path.join(a, "ckpt.pt"), weights_only=True)["model"]
    wb = torch.load(os.path.join(b, "ckpt.pt"), weights_only=True)["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not any(f.endswith(".tmp") for f in os.listdir(b))  # the atomic write left nothing behind


def test_eval_only_prints_depth_table_and_fit(tmp_path, data):
    out = str(tmp_path)
    train(*TINY, f"--data_dir={data}", f"--out_dir={out}", "--max_iters=3", "--eval_interval=3")
    r = train(*TINY, f"--data_dir={data}", f"--out_dir={out}", "--eval_only=True", "--eval_loops=1,2,4,8")
    for T in (1, 2, 4, 8):
        assert f"T={T} " in r.stdout
    assert "fit L(T)" in r.stdout and "rms residual" in r.stdout


TASK = ["--task=parity", "--block_size=24", "--task_train_len=1,4", "--task_long_len=9,12", "--task_eval_rows=32",
        "--n_embd=32", "--n_head=2", "--n_kv_head=2", "--n_prelude=1", "--n_core=1", "--n_coda=1", "--mean_recurrence=3",
        "--backprop_depth=2", "--batch_size=8", "--total_batch_size=192", "--device=cpu", "--compile=False"]


@pytest.mark.parametrize("kind", ["text", "task"])
def test_eval_only_records_go_to_their_own_file(tmp_path, data, kind):
    # log.jsonl is the training run: a plot of it must not take a later evaluation of the final weights for its own
    out = tmp_path / "run"
    common = [*TINY, f"--data_dir={data}"] if kind == "text" else TASK
    train(*common, f"--out_dir={out}", "--max_iters=2", "--eval_interval=2", "--eval_loops=1")
    log = (out / "log.jsonl").read_text()
    for loops in ("1,2", "4"):
        r = train(f"--out_dir={out}", "--eval_only=True", f"--eval_loops={loops}", "--device=cpu")
        assert (out / "log.jsonl").read_text() == log
        first = r.stdout.splitlines()[0]
        assert first.startswith(f"evaluating {out / 'ckpt.pt'} at iter 2: ") and "grad_accum" not in r.stdout, first
        assert f"loop depths {loops.replace(',', ', ')};" in first
        assert (f"the first 1,024 val tokens in {data}" if kind == "text" else "32 rows in each of the id and long sets") in first
        assert f"(eval_only: appended to {out / 'eval_only.jsonl'})" in r.stdout
    recs = [json.loads(line) for line in (out / "eval_only.jsonl").read_text().splitlines()]
    assert [rec["run"]["eval_only"] for rec in recs if "run" in rec] == [True, True]  # each eval_only run's record
    recs = [rec for rec in recs if "run" not in rec]
    assert [(rec["iter"], sorted(rec["val"])) for rec in recs] == [(2, ["1", "2"]), (2, ["4"])]
    assert ("task" in recs[0]) == (kind == "task")
    train(*common, f"--out_dir={out}", "--max_iters=1", "--overwrite=True")  # a new run: the old model's records go
    assert not (out / "eval_only.jsonl").exists()


def test_non_finite_steps_are_skipped_then_stop(tmp_path, data):
    r = train(*TINY, f"--data_dir={data}", f"--out_dir={tmp_path}", "--adam_lr=1e30", "--max_bad_steps=3",
              "--max_iters=20", "--eval_interval=100", check=False)
    assert r.returncode != 0
    assert "step skipped (3 in a row)" in r.stdout and "non-finite steps in a row" in r.stderr


# lr schedule ---------------------------------------------------------------------------------------------
def test_cosine_schedule_has_looplms_shape(tmp_path, data):
    # LoopLM's shape at 20 steps: 2 warmup steps, constant to 60% (step 12), half-cosine to 0.1x over the last 40%
    train(*TINY, f"--data_dir={data}", f"--out_dir={tmp_path}", "--max_iters=20", "--eval_interval=100",
          "--warmup_iters=2", "--decay_frac=0.4", "--min_lr_frac=0.1", "--decay_shape=cosine")
    lr = {r["iter"] - 1: r["lr_mult"] for r in read_log(tmp_path) if "lr_mult" in r}  # keyed by the step it ran
    assert sorted(lr) == list(range(20))
    assert lr[0] == 0.5 and lr[1] == 1.0  # warmup ends at full lr
    assert lr[11] == lr[12] == 1.0  # constant up to and including the start of the decay, at 60%
    cosine = lambda t: 0.1 + 0.9 * (1 + math.cos(math.pi * t)) / 2
    assert abs(lr[16] - cosine(0.5)) < 1e-12 and abs(lr[16] - 0.55) < 1e-12  # halfway down the window
    assert abs(lr[19] - cosine(7 / 8)) < 1e-12  # the last step: t = 7/8 of the window, close to 0.1
    assert all(lr[i] > lr[i + 1] for i in range(12, 19))
    assert lr[13] > 1 - 0.9 / 8  # starts flatter than the linear decay would


# DDP --------------------------------------------------------------------------------------------------
def test_ddp_two_processes_match_gradient_accumulation(tmp_path, data):
    common = [*TINY, f"--data_dir={data}", "--max_iters=4", "--eval_interval=100", "--total_batch_size=256"]
    single, multi = str(tmp_path / "single"), str(tmp_path / "ddp")
    train(*common, f"--out_dir={single}")  # 1 process, 2 micro-steps of 4 sequences
    r = train(*common, f"--out_dir={multi}",  # 2 processes, 1 micro-step of 4 sequences each
              launcher=(sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"))
    assert "2 process(es), grad_accum 1" in r.stdout
    ls, lm = train_losses(single), train_losses(multi)
    assert sorted(ls) == sorted(lm) == [1, 2, 3, 4]
    # step 1 starts from the same weights: the all-reduced gradient must equal the accumulated one
    gs, gm = ([r["grad_norm"] for r in read_log(d) if "grad_norm" in r] for d in (single, multi))
    assert ls[1] == lm[1] and abs(gs[0] / gm[0] - 1) < 1e-5, (gs, gm)
    # later steps: the two sums differ in the last fp32 bits (another summation order), and Muon's
    # Newton-Schulz iteration runs in bf16, which turns that into ~1e-4 differences in the loss
    assert all(abs(ls[i] - lm[i]) < 2e-3 for i in ls), (ls, lm)


def test_tiny_config_runs_on_two_processes(tmp_path, data):
    args = ["config/tiny.py", f"--data_dir={data}", f"--out_dir={tmp_path}", "--max_iters=1", "--eval_loops=1"]
    r = train(*args, launcher=(sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"))
    assert "2 process(es), grad_accum 1" in r.stdout and "saved" in r.stdout


# a real (short) run ------------------------------------------------------------------------------------
def test_tiny_config_lowers_val_loss(tmp_path, data):
    out = str(tmp_path)
    train("config/tiny.py", f"--data_dir={data}", f"--out_dir={out}", "--max_iters=40", "--eval_interval=20")
    vals = [r["val"] for r in read_log(out) if "val" in r]
    mu = "4"  # tiny.py's mean_recurrence (json keys are strings)
    assert len(vals) == 3 and vals[-1][mu] < vals[1][mu] < vals[0][mu] - 3


def test_value_embeds_train_like_a_model_without_them(tmp_path, data):
    """Parcae's value embeddings on (3.26M parameters, half of them tables) and off (1.65M): both runs converge,
    and the tables cost nothing in the loss (measured: 11.04 -> 6.28 without, 11.14 -> 6.22 with)."""
    final = {}
    for ve in (False, True):
        out = str(tmp_path / str(ve))
        train(*TINY, f"--data_dir={data}", f"--out_dir={out}", "--max_iters=60", "--eval_interval=60", "--eval_loops=3",
              f"--value_embeds={ve}")
        first, last = [r["val"]["3"] for r in read_log(out) if "val" in r]
        assert last < first - 4
        final[ve] = last
    assert final[True] < final[False] + 0.25


# loop telemetry in the log ----------------------------------------------------------------------------
def test_log_has_loop_telemetry(tmp_path, data):
    # at step 0 every block is the identity (zero-init output projections): with add injection, eval's h0 = 0
    # and the prelude RMSNorm, h_T = T e, so the state RMS per token is ~T and the last step's residual 1/T
    out = str(tmp_path / "add")
    train(*TINY, f"--data_dir={data}", f"--out_dir={out}", "--max_iters=2", "--eval_interval=100",
          "--injection=add", "--prelude_norm=True", "--eval_loops=1,2,4")
    log = read_log(out)
    first = log[1]  # after the run record
    assert first["iter"] == 0 and "run" in log[0]
    for T in ("1", "2", "4"):
        assert abs(first["val_state_rms"][T] / int(T) - 1) < 1e-3, first
        assert abs(first["val_residual"][T] - 1 / int(T)) < 1e-5, first
    steps = [r for r in log if "loss" in r]
    assert all({"rho", "state_rms", "residual"} <= r.keys() for r in steps)
    out = str(tmp_path / "concat")
    train(*TINY, f"--data_dir={data}", f"--out_dir={out}", "--max_iters=1", "--eval_interval=100",
          "--injection=concat", "--eval_loops=3")
    step = [r for r in read_log(out) if "loss" in r][0]
    assert step["sigma_max"] >= step["rho"] > 0 and step["state_rms"] > 0 and 0 < step["residual"]
    out = str(tmp_path / "gpt")  # the fixed-depth baseline: the log says "no loop" instead of a rho of 1
    r = train(*TINY, f"--data_dir={data}", f"--out_dir={out}", "--max_iters=1", "--eval_interval=100",
              "--injection=add", "--mean_recurrence=1", "--backprop_depth=1", "--eval_loops=1")
    assert "no loop, state rms" in r.stdout and "rho" not in [r for r in read_log(out) if "loss" in r][0]


# Ouro's two stages (README "Ouro") ------------------------------------------------------------------
OURO = [a for a in TINY if not a.startswith(("--n_prelude", "--n_coda", "--backprop_depth"))] + [
    "--injection=none", "--prelude_norm=False", "--n_prelude=0", "--n_coda=0", "--loop_norm=True", "--exit_gate=True",
    "--backprop_depth=3", "--exit_beta=0.1"]


def test_ouro_stage_one_then_stage_two_then_q_exit(tmp_path, data):
    out = str(tmp_path)
    r = train(*OURO, f"--data_dir={data}", f"--out_dir={out}", "--max_iters=3", "--eval_interval=3", "--eval_loops=1,2")
    assert "CE by step" in r.stdout and "Q-exit, all 3 steps run" in r.stdout
    log = read_log(out)
    step = next(x for x in log if "loss" in x)
    assert len(step["ce_steps"]) == 3 and 0 < step["exit_entropy"] <= math.log(3) + 1e-6 and 1 <= step["exit_step"] <= 3
    ev = [x for x in log if "val" in x][-1]
    assert sorted(ev["val"]) == ["1", "2", "3"]  # T_max added: the Q-exit table is read there
    assert set(ev["val_q_exit"]) == {"0.25", "0.5", "0.75", "0.9"}
    steps = [ev["val_q_exit"][q]["steps"] for q in ("0.25", "0.5", "0.75", "0.9")]
    assert steps == sorted(steps) and 1 <= steps[0] and steps[-1] <= 3
    before = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)["model"]
    # Stage II: the gate alone, with a new AdamW; every other weight bit-identical after real steps
    r = train(f"--out_dir={out}", "--init_from=resume", "--train_gate=True", "--max_iters=6")
    assert "gate loss" in r.stdout
    ckpt = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    after = ckpt["model"]
    assert ckpt["iter_num"] == 6 and ckpt["gate_start"] == 3 and len(ckpt["optimizer"]) == 1
    for name, t in before.items():
        assert torch.equal(t, after[name]) != name.startswith("exit_gate."), name
    assert [x["iter"] for x in read_log(out) if "loss" in x][-3:] == [4, 5, 6]
    r = train(f"--out_dir={out}", "--init_from=resume", "--max_iters=7")  # Stage II continues as Stage II
    assert "gate loss" in r.stdout
    r = train(f"--out_dir={out}", "--init_from=resume", "--train_gate=False", "--max_iters=8", check=False)
    assert r.returncode != 0 and "Stage II run" in r.stderr and "Traceback" not in r.stderr
    s = subprocess.run([sys.executable, "sample.py", f"--out_dir={out}", "--exit_criterion=gate", "--exit_threshold=0.5",
                        "--num_samples=1", "--max_new_tokens=5", "--device=cpu"], cwd=ROOT, env=ENV, capture_output=True,
                       text=True, timeout=120)
    assert s.returncode == 0 and "mean loop steps per generated token" in s.stdout, s.stderr


@pytest.mark.parametrize("args,words", [
    (["--exit_beta=0.1", "--exit_gate=False"], "set exit_gate=True"),
    (["--exit_beta=0.0"], "otherwise it stays at its init"),
    (["--backprop_depth=2"], "backprop_depth >= mean_recurrence"),
    (["--train_gate=True"], "--init_from=resume"),
    (["--exit_beta=-1.0"], "exit_beta must be >= 0"),
    (["--mean_recurrence=1", "--backprop_depth=1"], "mean_recurrence >= 2"),
    (["--depth_sampling=sequence"], "depth_sampling"),
])
def test_ouro_settings_that_cannot_work_are_one_line_errors(tmp_path, data, args, words):
    r = train(*OURO, *args, f"--data_dir={data}", f"--out_dir={tmp_path}", "--max_iters=1", check=False)
    assert r.returncode != 0 and words in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_stage_two_needs_a_gated_checkpoint(tmp_path, trained):
    args, out = trained
    shutil.copytree(out, tmp_path, dirs_exist_ok=True)
    r = train(f"--out_dir={tmp_path}", "--init_from=resume", "--train_gate=True", "--max_iters=4", check=False)
    assert r.returncode != 0 and "has none (exit_gate=False)" in r.stderr and "Traceback" not in r.stderr, r.stderr


# the record of each run, and wandb ---------------------------------------------------------------------
def test_run_record_in_log_and_checkpoint_and_each_resume_adds_one(tmp_path, data):
    out = str(tmp_path)
    train(*TINY, f"--data_dir={data}", f"--out_dir={out}", "--max_iters=2", "--eval_interval=2")
    first = read_log(out)[0]
    rec = first["run"]
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                                capture_output=True, text=True).stdout.strip())
    assert first["iter"] == 0 and rec["commit"] == head and rec["dirty"] == dirty
    assert rec["torch"] == torch.__version__ and rec["python"] == sys.version.split()[0]
    assert (rec["world_size"], rec["dtype"], rec["compile"], rec["device_count"]) == (1, "float32", False, 1)
    assert "train.py" in rec["command"] and f"--out_dir={out}" in rec["command"] and rec["init_from"] == "scratch"
    assert re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d", rec["start"])
    train(f"--out_dir={out}", "--init_from=resume", "--max_iters=4")
    runs = [r for r in read_log(out) if "run" in r]
    assert runs[0] == first and runs[1]["iter"] == 2 and runs[1]["run"]["init_from"] == "resume"
    ckpt = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    assert [r["init_from"] for r in ckpt["runs"]] == ["scratch", "resume"] and ckpt["runs"][0] == rec


def test_run_record_without_git_says_unknown(tmp_path, data):
    # a PATH without git: the record says "unknown" and the run goes on
    r = subprocess.run([sys.executable, "train.py", *TINY, f"--data_dir={data}", f"--out_dir={tmp_path}", "--max_iters=1"],
                       cwd=ROOT, env=dict(ENV, PATH=str(tmp_path)), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    rec = read_log(str(tmp_path))[0]["run"]
    assert rec["commit"] == "unknown" and rec["dirty"] == "unknown"


def wandb_records(path):
    """The protobuf records of an offline run's .wandb file: a 7-byte header, then leveldb-log records in 32 KiB
    blocks, each with a 7-byte header (crc, length, type: 1 full, 2 first, 3 middle, 4 last)."""
    from wandb.proto import wandb_internal_pb2 as pb
    with open(path, "rb") as f:
        data = f.read()
    assert data[:4] == b":W&B"
    p, records, part = 7, [], b""
    while p + 7 <= len(data):
        left = 32768 - p % 32768
        length, kind = (0, 0) if left < 7 else struct.unpack("<HB", data[p + 4:p + 7])
        if kind == 0:  # a block's zero padding
            p += left
            continue
        part, p = part + data[p + 7:p + 7 + length], p + 7 + length
        if kind in (1, 4):
            records.append(pb.Record.FromString(part))
            part = b""
    return records


def test_wandb_offline_gets_the_train_and_val_records_and_the_run_record(tmp_path, data):
    pytest.importorskip("wandb", reason="pip install wandb (.ci/run installs it)")
    out, wdir = tmp_path / "run", tmp_path / "wandb"
    wdir.mkdir()
    env = dict(ENV, WANDB_MODE="offline", WANDB_DIR=str(wdir), WANDB_SILENT="true")
    r = subprocess.run([sys.executable, "train.py", *TINY, f"--data_dir={data}", f"--out_dir={out}", "--max_iters=2",
                        "--eval_interval=2", "--wandb_log=True", "--wandb_run_name=t"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    files = glob.glob(str(wdir / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert len(files) == 1
    history, config = {}, {}
    for rec in wandb_records(files[0]):
        kind = rec.WhichOneof("record_type")
        if kind == "history":
            items = {("/".join(i.nested_key) or i.key): json.loads(i.value_json) for i in rec.history.item}
            history.setdefault(items["_step"], {}).update(items)
        elif kind == "run":
            config = {u.key: json.loads(u.value_json) for u in rec.run.config.update}
            assert rec.run.display_name == "t"
    log = read_log(str(out))
    for want in (x for x in log if "run" not in x):  # every number of every record, at its step
        got = history[want["iter"]]
        for key in ("loss", "grad_norm", "rho"):
            if key in want:
                assert got[key] == pytest.approx(want[key])
        for T, v in want.get("val", {}).items():
            assert got[f"val/{T}"] == pytest.approx(v)
    assert sorted(history) == [0, 1, 2]
    assert config["run"]["commit"] == log[0]["run"]["commit"] and config["n_embd"] == 32


def test_wandb_log_without_wandb_is_one_line(tmp_path, data):
    (tmp_path / "sitecustomize.py").write_text("import sys\nsys.modules['wandb'] = None  # as if not installed\n")
    r = subprocess.run([sys.executable, "train.py", *TINY, "--wandb_log=True", f"--data_dir={data}", f"--out_dir={tmp_path}"],
                       cwd=ROOT, env=dict(ENV, PYTHONPATH=str(tmp_path)), capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "pip install wandb" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
