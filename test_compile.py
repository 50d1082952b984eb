"""Tests of the path a GPU run takes by default, torch.compile of the blocks under bf16 autocast, on the CPU (and on
a GPU where there is one: the tests with a device parameter).   python -m pytest -q test_compile.py

Graphs are counted with GPT.compiled_graphs() (dynamo's unique_graphs), the count train.py logs."""
import copy
import os
import subprocess
import sys

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from conftest import DEVICES
from model import GPT
from test_model import grads, randomized, tiny
from test_train import ENV, ROOT, data, read_log, train  # noqa: F401 (data is a fixture)

# bf16 keeps 8 significant bits: each matmul input is rounded by up to 2^-8 (0.4%) of itself. The loss is a mean
# over 1,024 tokens, where those roundings average out: measured, it stays within 2.5e-4 (relative) of fp32 over
# 8 steps. Half of bf16's unit roundoff, 2^-9 = 2e-3, leaves an 8x margin and is far below what a real fault moves.
BF16_LOSS_RTOL = 2 ** -9


def close(a, b, rel):
    """Equal to within rel of b's largest entry: fp32 rounding, not a relative error per entry near zero."""
    return (a - b).abs().max().item() <= rel * b.abs().max().item()


def fresh_counts():
    torch._dynamo.reset()  # forget graphs an earlier test compiled for the same shapes
    counters.clear()


def graphs():
    return GPT.compiled_graphs()


# the model on its own, compiled against eager ---------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
def test_compiled_compacted_batch_matches_eager(device):
    # The core runs only the rows still looping, so its batch shrinks to a new size at nearly every step: one graph
    # with a symbolic batch size serves them all. The first two depth lists hold every variant there is (gradient
    # on and off, a batch of one with and without); the last two only batch sizes not seen yet.
    eager = randomized(tiny("diagonal", mean_recurrence=4, backprop_depth=2), seed=1).to(device).train()
    compiled = copy.deepcopy(eager)
    fresh_counts()
    compiled.compile_blocks()
    torch.manual_seed(2)
    seen = []
    for depths in ([6, 1, 3, 2, 5, 1], [1, 1, 3, 1, 1, 1], [2, 2, 4, 1, 3, 3], [7, 5, 1, 1, 2, 4]):
        idx = torch.randint(0, 64, (6, 16), device=device)
        h0 = torch.randn(6, 16, 32, device=device) * 0.1
        out = []
        for model in (eager, compiled):
            model.zero_grad()
            logits, loss = model(idx, idx, num_loops=torch.tensor(depths), h0=h0)
            loss.backward()
            out.append((logits, grads(model), model.last_rows_run))
        (logits_e, grads_e, run_e), (logits_c, grads_c, run_c) = out
        assert run_c == run_e == sum(depths)  # compacted: no padded steps under compile either
        # fp32 rounds differently in fused kernels: both are ~3e-6 of the largest logit off an fp64 forward
        assert close(logits_c, logits_e, 2e-5)
        for name in grads_e:
            assert close(grads_c[name], grads_e[name], 2e-5), name
        seen.append(graphs())
    assert 0 < seen[1] == seen[-1] <= 6, seen  # new sizes in the last two calls, and no new graph
    assert not counters["graph_break"], dict(counters["graph_break"])


@pytest.mark.parametrize("device", DEVICES)
def test_compiled_cached_decoding_matches_eager(device):
    # The KV cache grows by one token per call: its length must be symbolic too, or every token compiles a graph
    # (and past dynamo's limit of 8 the rest runs eager). Both caches, and an exit criterion that runs the coda
    # without storing, at every step.
    eager = randomized(tiny("diagonal", block_size=40), seed=5).to(device).eval()
    compiled = copy.deepcopy(eager)
    fresh_counts()
    compiled.compile_blocks()
    prompt = torch.randint(0, 64, (1, 6), device=device)
    for mode, criterion in (("full", "none"), ("last", "none"), ("full", "kl")):
        caches = [model.new_cache(4, mode) for model in (eager, compiled)]
        idx, seen, steps = prompt, [], []
        for t in range(16):
            # KL between steps runs from about 0.1 to past 3 in this model: 0.3 makes tokens exit early, and no KL is near
            # enough to it for rounding to flip an exit
            outs = [model.forward_cached(idx, cache, 4, criterion, 0.3)
                    for model, cache in zip((eager, compiled), caches)]
            (logits_e, steps_e), (logits_c, steps_c) = outs
            assert close(logits_c, logits_e, 2e-5), (mode, criterion, t)
            assert torch.equal(steps_c, steps_e)
            steps.append(int(steps_e))
            idx = logits_e.argmax(-1, keepdim=True)
            if t == 0:  # then 3 tokens on a filled cache: the explicit causal mask over cache + chunk
                idx = torch.cat([idx, torch.randint(0, 64, (1, 2), device=device)], 1)
            seen.append(graphs())
        assert seen[4] == seen[-1], (mode, criterion, seen)  # 11 more tokens, no new graph
        assert min(steps) < 4 if criterion == "kl" else set(steps) == {4}, steps  # the exit path ran
    # a fresh or a filled cache, one token or several, storing or not
    assert graphs() <= 8 and not counters["graph_break"], (graphs(), dict(counters["graph_break"]))


# bf16 autocast -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("injection", ["add", "concat", "diagonal", "none"])
def test_loop_state_and_residual_stream_stay_fp32_under_autocast(device, injection):
    # Under bf16 autocast a Linear returns bf16. The loop state must not: a step that changes it by less than
    # 2^-9 of itself (near a fixed point, every step does) would be rounded away.
    model = GPT(tiny(injection)).to(device).train()
    seen = []
    for block in (*model.prelude, *model.core, *model.coda):
        block.register_forward_pre_hook(lambda _, args: seen.append(args[0].dtype))
    idx = torch.randint(0, 64, (2, 8), device=device)
    with torch.autocast(device, dtype=torch.bfloat16):
        _, loss = model(idx, idx, num_loops=3)
    assert seen and set(seen) == {torch.float32}, seen
    assert loss.dtype == torch.float32


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_training_steps_track_fp32(device):
    # train.py's step (Muon + AdamW, clip) at fixed per-row depths, in fp32 and under bf16 autocast
    torch.manual_seed(0)
    base = GPT(tiny("diagonal", vocab_size=512, block_size=64, n_embd=64)).to(device)
    losses = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = copy.deepcopy(base).train()
        optimizers = model.configure_optimizers(0.02, 8e-3, 0.0, (0.8, 0.95), 1e-10)
        torch.manual_seed(1)
        idx = torch.randint(0, 512, (8, 65), device=device)  # one batch, learnt by heart
        losses[dtype] = []
        for step in range(6):
            with torch.autocast(device, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
                _, loss = model(idx[:, :-1], idx[:, 1:], num_loops=torch.tensor([6, 1, 3, 2, 5, 1, 4, 4]))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            for opt in optimizers:
                opt.step()
                opt.zero_grad(set_to_none=True)
            losses[dtype].append(loss.item())
    fp32, bf16 = (torch.tensor(losses[d]) for d in (torch.float32, torch.bfloat16))
    assert fp32[-1] < fp32[0] - 0.1  # the steps train
    assert torch.allclose(bf16, fp32, rtol=BF16_LOSS_RTOL, atol=0), (fp32.tolist(), bf16.tolist())


# train.py and sample.py with --compile=True, on the CPU -----------------------------------------------------------
@pytest.fixture(scope="module")
def runs(tmp_path_factory, data):
    """config/tiny.py for 8 steps, compiled in bf16 and eager in fp32, same seed: shared by the tests below (the
    compile costs tens of seconds). Depths are drawn per sequence, so the core's batch sizes change every step."""
    out = {}
    for name, flags in (("compiled", ["--compile=True", "--dtype=bfloat16"]),
                        ("eager", ["--compile=False", "--dtype=float32"])):
        out_dir = str(tmp_path_factory.mktemp(name))
        r = train("config/tiny.py", *flags, f"--data_dir={data}", f"--out_dir={out_dir}", "--device=cpu",
                  "--max_iters=8", "--eval_interval=8", "--log_interval=1", "--val_tokens=2048")
        out[name] = (read_log(out_dir), r, out_dir)
    return out


def test_compiled_bf16_run_tracks_fp32_eager(runs):
    (compiled, _, _), (eager, _, _) = runs["compiled"], runs["eager"]
    train_c, train_e = ([r for r in log if "loss" in r] for log in (compiled, eager))
    assert [r["iter"] for r in train_c] == [r["iter"] for r in train_e] == list(range(1, 9))
    for c, e in zip(train_c, train_e):
        assert abs(c["loss"] - e["loss"]) <= BF16_LOSS_RTOL * e["loss"], (c["iter"], c["loss"], e["loss"])
    val_c, val_e = ([r for r in log if "val" in r][-1] for log in (compiled, eager))
    assert val_c["iter"] == 8 and max(val_c["val"].values()) < train_c[0]["loss"] - 1  # it trained
    for T, loss in val_e["val"].items():
        assert abs(val_c["val"][T] - loss) <= BF16_LOSS_RTOL * loss, T


def test_compiled_run_compiles_a_bounded_number_of_graphs(runs):
    log, r, _ = runs["compiled"]
    counts = [rec["compiles"] for rec in log if "loss" in rec]
    # gradient on and off, a batch of one or more: at most 4 graphs, whatever the number of steps. This seed's run
    # makes 3 in its first step and no more (a single row in the gradient phase, the 4th, is rare: iter 35 of 50
    # in one run of config/tiny.py)
    assert 0 < counts[0] and counts[3] == counts[-1] <= 4, counts
    assert "recompile_limit" not in r.stderr and "graphs compiled" in r.stdout
    assert all("compiles" not in rec for rec in runs["eager"][0])


def test_sample_compiled_decodes_without_falling_back(runs):
    _, _, out_dir = runs["compiled"]
    r = subprocess.run([sys.executable, "sample.py", f"--out_dir={out_dir}", "--device=cpu", "--compile=True",
                        "--dtype=bfloat16", "--max_new_tokens=40", "--num_samples=2", "--seed=3"],
                       cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    stats = [line for line in r.stdout.splitlines() if line.startswith("[loop depth")]
    assert len(stats) == 2 and all("graphs compiled" in s for s in stats), r.stdout
    counts = [int(s.rsplit(", ", 1)[1].split()[0]) for s in stats]
    assert counts[0] == counts[1] <= 8, stats  # 80 tokens, each at a new cache length: no graph per token
    assert "recompile_limit" not in r.stderr, r.stderr
