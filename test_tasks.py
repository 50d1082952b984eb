"""Tests of tasks.py (running parity) and train.py's task data source (CPU).   python -m pytest -q test_tasks.py"""
import json
import os
import shutil
import subprocess
import sys
from contextlib import nullcontext

import pytest
import torch

import tasks
from model import GPT, GPTConfig
from tasks import BOS, DIGIT0, PAD, SEP

ROOT = os.path.dirname(os.path.abspath(__file__))
ENV = dict(os.environ, OMP_NUM_THREADS="1")
# a task run that takes seconds: 1/1/1 blocks of width 32, rows of 24 tokens
SMALL = ["--task=parity", "--block_size=24", "--task_train_len=1,4", "--task_long_len=9,12", "--task_eval_rows=32",
         "--n_embd=32", "--n_head=2", "--n_kv_head=2", "--n_prelude=1", "--n_core=1", "--n_coda=1", "--mean_recurrence=3",
         "--backprop_depth=2", "--batch_size=8", "--total_batch_size=192", "--device=cpu", "--compile=False",
         "--log_interval=1", "--eval_loops=1,3"]


def train(*args, check=True, launcher=(sys.executable,)):
    r = subprocess.run([*launcher, "train.py", *args], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    if check and r.returncode != 0:
        raise AssertionError(f"train.py failed:\n{r.stdout}\n{r.stderr}")
    return r


def read_log(out_dir, name="log.jsonl"):
    with open(os.path.join(out_dir, name)) as f:
        return [json.loads(line) for line in f]


def segments(row):
    """[(start, length)] of each segment's digits in a row, read off the tokens."""
    out, start = [], None
    for i, tok in enumerate(row + [PAD]):  # a PAD past the end closes the last segment
        if tok in (SEP, PAD) and start is not None:
            out.append((start, i - start))
            start = None
        if tok == SEP:
            start = i + 1
    return out


# the generator ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mod", [2, 3, 10])
def test_labels_are_the_running_sum_mod_m(mod):
    x, y = tasks.train_batch(7, 3, 16, 64, (1, 8), mod)
    assert x.shape == y.shape == (16, 64) and x.dtype == y.dtype == torch.int64
    for xr, yr in zip(x.tolist(), y.tolist()):
        assert xr[0] == BOS and xr[1] == SEP and yr[0] == yr[1] == -1
        total = None
        for i, (tok, label) in enumerate(zip(xr[1:], yr[1:]), 1):
            if tok == PAD:  # only in the last slot, when SEP and a digit would not fit
                assert i == 63 and xr[62] != SEP and label == -1
            elif tok == SEP:
                total = 0
                assert label == -1
            else:
                assert DIGIT0 <= tok < DIGIT0 + mod
                total = (total + tok - DIGIT0) % mod
                assert label == DIGIT0 + total
    assert set(x[x >= DIGIT0].tolist()) == set(range(DIGIT0, DIGIT0 + mod))  # every digit occurs
    assert int(x.max()) < tasks.vocab_size(mod) == 3 + mod


def test_segment_lengths_and_layout():
    x, _ = tasks.train_batch(1, 0, 32, 64, (3, 6), 2)
    for row in x.tolist():
        assert PAD not in row[:-1]  # a training row is filled to its end, or to one slot before it
        segs = segments(row)
        assert sum(1 + n for _, n in segs) == 63 - (row[-1] == PAD)  # BOS, then SEP + digits
        assert all(3 <= n <= 6 for _, n in segs[:-1]) and 1 <= segs[-1][1] <= 6  # the last one may be cut
    sets = tasks.eval_sets(0, 64, 64, (3, 6), (25, 31), 2)
    for name, lens in (("id", (3, 6)), ("long", (25, 31))):
        x, y = sets[name]
        assert x.shape == (64, 64)  # never longer than the row
        for row in x.tolist():
            segs = segments(row)
            assert segs and all(lens[0] <= n <= lens[1] for _, n in segs)  # whole segments only
            end = 1 + sum(1 + n for _, n in segs)
            assert all(t == PAD for t in row[end:]) and len(row) - end < 1 + lens[1]  # PAD only where none fits
    long_lengths = {n for row in sets["long"][0].tolist() for _, n in segments(row)}
    assert min(long_lengths) == 25 and max(long_lengths) == 31


def test_same_seed_same_data():
    a, b = tasks.train_batch(5, 9, 8, 32, (1, 8), 2), tasks.train_batch(5, 9, 8, 32, (1, 8), 2)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    for other in (tasks.train_batch(6, 9, 8, 32, (1, 8), 2), tasks.train_batch(5, 10, 8, 32, (1, 8), 2)):  # seed, batch
        assert not torch.equal(a[0], other[0])
    s, t = tasks.eval_sets(0, 16, 32, (1, 8), (20, 30), 2), tasks.eval_sets(0, 16, 32, (1, 8), (20, 30), 2)
    assert all(torch.equal(s[k][i], t[k][i]) for k in s for i in (0, 1))
    assert not torch.equal(tasks.eval_sets(1, 16, 32, (1, 8), (20, 30), 2)["id"][0], s["id"][0])


# buckets and the score -------------------------------------------------------------------------------------
def test_buckets():
    assert tasks.buckets((1, 8), (32, 32)) == [(1, 8), (9, 12), (13, 16), (17, 24), (25, 32)]
    assert tasks.buckets((1, 8), (31, 31)) == [(1, 8), (9, 12), (13, 16), (17, 24), (25, 31)]
    assert tasks.buckets((1, 16), (31, 31)) == [(1, 16), (17, 24), (25, 31)]
    assert tasks.buckets((1, 32), (62, 62)) == [(1, 32), (33, 48), (49, 62)]
    assert tasks.buckets((1, 8), (2, 5)) == [(1, 8)]


def test_score_against_a_hand_count():
    d0, d1 = DIGIT0, DIGIT0 + 1
    x = torch.tensor([[BOS, SEP, d1, d0, d1, SEP, d1, d1, PAD],
                      [BOS, SEP, d0, d0, d0, d0, d1, SEP, d0]])
    y = torch.tensor([[-1, -1, d1, d1, d0, -1, d1, d0, -1],
                      [-1, -1, d0, d0, d0, d0, d1, -1, d0]])
    assert tasks.positions(x).tolist() == [[0, 0, 1, 2, 3, 0, 1, 2, 0], [0, 0, 1, 2, 3, 4, 5, 0, 1]]
    pred = y.clone()
    pred[0, 4] = d1  # row 0, segment 1, position 3: wrong
    pred[1, 6] = d0  # row 1, segment 1, position 5: wrong
    pred[1, 5] = SEP  # row 1, segment 1, position 4: wrong (not even a digit)
    counts = tasks.score(x, y, pred, [(1, 2), (3, 4), (5, 9)])
    # positions 1-2: row 0 has 4 digits (2 + 2), row 1 has 3 (2 + 1): all right
    # positions 3-4: row 0's position 3 (wrong), row 1's 3 (right) and 4 (wrong); position 5: row 1's, wrong
    # segments: row 0 [wrong, right], row 1 [wrong, right]
    assert counts.tolist() == [[7, 7], [1, 3], [0, 1], [2, 4]]


def parrot(vocab, d=16):
    """Identity blocks, add injection, no prelude: h_T = T e and the head reads back e's token (orthogonal
    wte), so the model predicts each input token itself."""
    cfg = GPTConfig(vocab_size=vocab, block_size=64, n_embd=d, n_head=2, n_kv_head=2, n_prelude=0, n_core=1,
                    n_coda=0, injection="add", prelude_norm=False, mean_recurrence=2, state_init="zero")
    model = GPT(cfg).eval()
    with torch.no_grad():
        model.wte.weight.copy_(10 * torch.eye(vocab, d))
    return model


def test_a_model_that_reads_a_planted_label_scores_one_and_one_that_copies_is_at_chance():
    sets = tasks.eval_sets(0, 256, 64, (1, 8), (31, 31), 2)
    x, y = sets["long"]
    planted = torch.where(y >= 0, y, x)  # each digit replaced by its label: the answer is in the input
    b = tasks.buckets((1, 8), (31, 31))
    res = tasks.evaluate(parrot(5), {"planted": (planted, y), "long": (x, y)}, [1, 3], b, 64, "cpu", nullcontext())
    for T in (1, 3):
        assert all(a == 1.0 for a in res["planted"][T]["acc"].values()) and res["planted"][T]["segment"] == 1.0
        copy = res["long"][T]
        # copying the digit is right at position 1 of every segment, then right half the time: chance
        assert copy["acc"]["1-8"] > 0.5 and copy["segment"] == 0.0
        assert all(abs(copy["acc"][k] - 0.5) < 0.05 for k in ("9-12", "13-16", "17-24", "25-31")), copy["acc"]
        assert copy["state_rms"] > 0 and abs(copy["residual"] - 1 / T) < 1e-6  # h_t = t e: the step is 1/T of h_T


# train.py with a task ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arg,words", [
    ("--task=sorting", "unknown task 'sorting'"),
    ("--task_mod=1", "task_mod must be an integer >= 2"),
    ("--task_long_len=9,30", "needs a row of 32 tokens"),
    ("--task_train_len=5,2", "task_train_len must be (shortest, longest)"),
    ("--vocab_size=64", "vocab_size follows the task"),
    ("--seed=0", "seed=0 is task_eval_seed"),
    ("--seed=-1", "seed must be an integer >= 0"),
    ("--task_eval_rows=0", "task_eval_rows must be an integer >= 1"),
])
def test_bad_task_settings_are_one_line_errors(tmp_path, arg, words):
    r = train(*SMALL, f"--out_dir={tmp_path}", arg, "--max_iters=1", check=False)
    assert r.returncode != 0 and words in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("parity"))
    r = train(*SMALL, f"--out_dir={out}", "--max_iters=4", "--eval_interval=2", "--depth_sampling=sequence")
    return out, r


def test_a_task_run_logs_accuracy_by_depth_and_bucket(run):
    out, r = run
    assert "chance is 1/2 = 0.500" in r.stdout and "Bits per byte and val_tokens do not apply" in r.stdout
    assert "bpb" not in r.stdout
    evals = [rec for rec in read_log(out) if "task" in rec]
    assert [e["iter"] for e in evals] == [0, 2, 4]
    last = evals[-1]
    assert last["mod"] == 2 and last["mu"] == 3 and sorted(last["task"]) == ["id", "long"]
    for name in ("id", "long"):
        assert sorted(last["task"][name], key=int) == ["1", "3"]
        for res in last["task"][name].values():
            assert list(res["acc"]) == ["1-4", "5-6", "7-8", "9-12"]
            assert {"segment", "loss", "state_rms", "residual"} <= set(res)
    assert last["task"]["id"]["3"]["acc"]["9-12"] is None  # the id set has no digits that far: null, not NaN
    with open(os.path.join(out, "log.jsonl")) as f:
        assert not any("NaN" in line for line in f if '"task":' in line)  # strict JSON for any reader
    assert last["val"]["3"] == last["task"]["id"]["3"]["loss"]  # "val" is the id set's loss
    ckpt = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    assert ckpt["model_args"]["vocab_size"] == 5 and ckpt["model_args"]["block_size"] == 24
    assert ckpt["config"]["task"] == "parity" and ckpt["config"]["task_train_len"] == (1, 4)


def test_eval_only_on_a_task_checkpoint(run, tmp_path):
    out = shutil.copytree(run[0], tmp_path / "run")  # eval_only appends to eval_only.jsonl: leave the shared run's alone
    r = train(f"--out_dir={out}", "--eval_only=True", "--eval_loops=1,2,8")  # the task comes from the checkpoint
    for T in (1, 2, 8):
        assert f"  long  {T:>4} " in r.stdout and f"  id    {T:>4} " in r.stdout
    assert "chance 0.500" in r.stdout


@pytest.mark.parametrize("args,words", [
    (["--task_mod=3"], "task_mod=3 needs vocab_size 6"),
    (["--block_size=64", "--task_long_len=30,30"], "block_size <= 24"),
    (["--task="], "trained on the 'parity' task, not token shards"),
])
def test_a_task_checkpoint_is_evaluated_on_its_own_task(run, tmp_path, args, words):
    r = train(f"--out_dir={run[0]}", "--eval_only=True", *args, check=False)
    assert r.returncode != 0 and words in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_one_process_with_accumulation_sees_the_data_of_two(tmp_path):
    # 1 process x 2 micro-batches and 2 processes x 1 draw the same global micro-batches 0 and 1
    common = [*SMALL, "--max_iters=2", "--eval_interval=100", "--total_batch_size=384", "--depth_sampling=fixed",
              "--state_init=zero"]
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    train(*common, f"--out_dir={one}")
    train(*common, f"--out_dir={two}",
          launcher=(sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"))
    a, b = ([rec for rec in read_log(d) if "loss" in rec] for d in (one, two))
    assert a[0]["loss"] == b[0]["loss"] and abs(a[0]["grad_norm"] / b[0]["grad_norm"] - 1) < 1e-5, (a, b)
    for d in (one, two):
        assert torch.load(os.path.join(d, "ckpt.pt"), weights_only=True)["data_pos"] == [4, 0]


def test_resume_of_a_task_run_is_exact(tmp_path):
    common = [*SMALL, "--eval_interval=3", "--depth_sampling=sequence", "--state_init=random", "--decay_frac=0.0"]
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    train(*common, f"--out_dir={a}", "--max_iters=6")
    train(*common, f"--out_dir={b}", "--max_iters=3")
    train(f"--out_dir={b}", "--max_iters=6", "--init_from=resume")  # every task setting from the checkpoint
    la, lb = ({rec["iter"]: rec["loss"] for rec in read_log(d) if "loss" in rec} for d in (a, b))
    assert sorted(la) == sorted(lb) == list(range(1, 7)) and la == lb
    wa, wb = (torch.load(os.path.join(d, "ckpt.pt"), weights_only=True) for d in (a, b))
    assert wa["data_pos"] == wb["data_pos"] == [6 * 192 // (8 * 24), 0]
    assert all(torch.equal(wa["model"][k], wb["model"][k]) for k in wa["model"])


def test_two_processes_evaluate_the_same_sets(run, tmp_path):
    records = []
    for i, launcher in enumerate(((sys.executable,),
                                  (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"))):
        out = shutil.copytree(run[0], tmp_path / f"run{i}")
        train(f"--out_dir={out}", "--eval_only=True", "--eval_loops=3", "--task_eval_rows=300", "--total_batch_size=384",
              launcher=launcher)  # 300 rows: chunks of 128 split over the ranks, the last one short
        records.append(read_log(out, "eval_only.jsonl")[-1]["task"])
    one, two = records
    for name in ("id", "long"):
        a, b = one[name]["3"], two[name]["3"]
        assert a["acc"] == b["acc"] and a["segment"] == b["segment"]  # from integer counts: exactly equal
        for key in ("loss", "state_rms", "residual"):  # float sums in another order
            assert abs(a[key] - b[key]) <= 1e-9 * abs(a[key]), (name, key, a[key], b[key])


@pytest.mark.parametrize("script", ["sample.py", "eval.py"])
def test_text_tools_refuse_a_task_checkpoint(run, script):
    r = subprocess.run([sys.executable, script, f"--out_dir={run[0]}", "--device=cpu"], cwd=ROOT, env=ENV,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
    assert "trained on the 'parity' task" in r.stderr and "--eval_only=True" in r.stderr
