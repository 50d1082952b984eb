"""Tests of the FLOP count behind MFU, and of bench.py end to end (CPU).   python -m pytest -q test_bench.py"""
import os
import re
import subprocess
import sys

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from conftest import cuda_only
from model import GPT, GPTConfig

HERE = os.path.dirname(os.path.abspath(__file__))


def counted_flops(fn):
    # FlopCounterMode has no formula for the CPU flash-attention kernel (it counts it as 0 FLOPs); the
    # math backend runs attention as bmm's, which it does count, at the full T^2 like estimate_flops
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@pytest.mark.parametrize("injection,mlp,mlp_hidden,ve", [("add", "relu2", 0, False), ("concat", "relu2", 0, False),
                                                         ("diagonal", "relu2", 0, False), ("add", "swiglu", 176, False),
                                                         ("diagonal", "relu2", 96, False), ("diagonal", "relu2", 0, True)])
def test_estimate_flops_matches_flop_counter(injection, mlp, mlp_hidden, ve):
    cfg = GPTConfig(block_size=64, vocab_size=512, n_embd=64, n_head=4, n_kv_head=2, n_prelude=1, n_core=2,
                    n_coda=1, mean_recurrence=4, backprop_depth=2, injection=injection, mlp=mlp, mlp_hidden=mlp_hidden,
                    value_embeds=ve)
    torch.manual_seed(0)
    model = GPT(cfg)
    B, T = 4, cfg.block_size
    idx = torch.randint(0, cfg.vocab_size, (B, T))

    # (a) forward only at a fixed depth; targets make the head run on every position, as estimate_flops counts
    model.eval()
    with torch.no_grad():
        measured = counted_flops(lambda: model(idx, idx, num_loops=5))
    n, k = model.last_depths
    assert (n + k).tolist() == [5] * B
    estimate = model.estimate_flops(T, n, k, backward=False)
    assert estimate == model.estimate_flops(T, torch.zeros(B), n + k, backward=False)  # no backward: n, k alike
    assert abs(measured / estimate - 1) < 0.05, (measured, estimate)

    # (b) forward + truncated backward with a depth per sequence
    model.train()

    def step():
        _, loss = model(idx, idx, num_loops=torch.tensor([1, 3, 6, 2]))
        loss.backward()
    measured = counted_flops(step)
    n, k = model.last_depths
    assert n.tolist() == [0, 1, 4, 0] and k.tolist() == [1, 2, 2, 2]
    # only the rows still looping run: the counter sees each sequence's own depth, what MFU counts
    useful = model.estimate_flops(T, n, k)
    assert abs(measured / useful - 1) < 0.05, (measured, useful)
    padded = model.estimate_flops(T, n.max().expand(B), k.max().expand(B))  # every row at the deepest row's depth
    assert measured < 0.8 * padded
    assert model.estimate_flops(T, n.max().expand(B), k.max().expand(B), backward=False) < padded


def test_estimate_flops_counts_every_readout_of_a_gated_model():
    # Ouro's Stage I reads out (coda, ln_f, head, gate) after every step; the readout is recomputed in backward
    # (a checkpoint keeps its logits out of memory): the counter sees that extra forward, MFU does not count it
    cfg = GPTConfig(block_size=32, vocab_size=512, n_embd=64, n_head=4, n_kv_head=2, n_prelude=0, n_core=2, n_coda=1,
                    injection="none", prelude_norm=False, loop_norm=True, exit_gate=True, depth_sampling="fixed",
                    mean_recurrence=3, backprop_depth=3)
    torch.manual_seed(0)
    model = GPT(cfg).train()
    B, L = 4, cfg.block_size
    idx = torch.randint(0, cfg.vocab_size, (B, L))
    n, k = torch.zeros(B, dtype=torch.long), torch.full((B,), 3)
    with torch.no_grad():
        measured = counted_flops(lambda: model(idx, idx, exit_beta=0.1))
    assert abs(measured / model.estimate_flops(L, n, k, backward=False) - 1) < 0.05

    def step():
        model(idx, idx, exit_beta=0.1)[1].backward()
    with torch.no_grad():  # one readout's forward: the coda block, counted, then head and gate by hand
        coda = counted_flops(lambda: model._coda(torch.randn(B, L, 64), model.cos[:L], model.sin[:L]))
    readout = coda + B * L * (2 * 64 * 512 + 2 * 64)
    measured = counted_flops(step)
    assert abs(measured / (model.estimate_flops(L, n, k) + 3 * readout) - 1) < 0.05


def run_bench(*args):
    # one thread: on a CPU shared with other jobs, spinning OpenMP threads make a run 10x slower
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "bench.py", *args], cwd=HERE, env=env, capture_output=True, text=True,
                          timeout=300)


def test_bench_runs_end_to_end_on_cpu():
    r = run_bench("config/tiny.py", "--device=cpu", "--steps=2", "--warmup=1", "--decode_tokens=2", "--compare")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert any(l.startswith("CPU: shapes shrunk") for l in lines)  # tiny's vocab and batch are shrunk

    # training table: the looped model, then the baseline, then the ratios
    head = next(i for i, l in enumerate(lines) if l.startswith("config "))
    for col in ("ms/step", "tokens/s", "MFU", "padded", "peak mem", "params"):
        assert col in lines[head]
    looped, base = lines[head + 1].split(), lines[head + 2].split()
    assert looped[0] == "tiny" and base[:2] == ["tiny", "baseline"]
    assert base[-5] == "x1.00"  # fixed depth 1: nothing padded
    assert looped[-5].startswith("x") and float(looped[-5][1:]) >= 1.0
    assert looped[6].endswith("%") and float(looped[6][:-1]) > 0  # MFU against the measured matmul peak
    assert any(l.startswith("looped / baseline: ms/step x") and "FLOPs/token x" in l for l in lines)

    # inference table: every depth (1, mu, 2 mu) with each cache mode
    head = next(i for i, l in enumerate(lines) if l.startswith("num_loops "))
    assert "decode ms/token" in lines[head] and "cache MiB" in lines[head]
    rows = {(l.split()[0], l.split()[1]): l.split() for l in lines[head + 1:head + 10]}
    assert set(rows) == {(str(t), m) for t in (1, 4, 8) for m in ("full", "last", "none")}
    assert rows[("8", "none")][-1] == "-"
    assert float(rows[("8", "full")][-1]) > float(rows[("8", "last")][-1]) > 0  # one cache per step vs one


@cuda_only
def test_bench_reports_each_models_own_peak_cuda_memory():
    # torch.cuda.max_memory_allocated, reset before each model is built: the checkpointed loop keeps one step's
    # activations instead of backprop_depth steps', and the table must show it
    peak, params = {}, None
    for ckpt in (False, True):
        r = run_bench("config/tiny.py", "--device=cuda", "--steps=2", "--warmup=1", "--inference=False",
                      "--batch_size=16", "--block_size=256", "--mean_recurrence=8", "--backprop_depth=8",
                      "--depth_sampling=fixed", f"--loop_checkpoint={ckpt}", "--compile=False")
        assert r.returncode == 0, r.stderr
        lines = r.stdout.splitlines()
        row = lines[next(i for i, l in enumerate(lines) if l.startswith("config ")) + 1].split()
        assert row[-2] == "MiB", row  # "1,234 MiB": the GPU's allocator, not the process's RSS
        peak[ckpt], params = float(row[-3].replace(",", "")), float(row[-1].rstrip("M")) * 1e6
    assert peak[True] < peak[False], peak
    assert peak[True] > 12 * params / 2**20, (peak, params)  # at least weights, gradients and optimizer state


@pytest.mark.parametrize("arg,why", [("--no_such_key=1", "unknown config key 'no_such_key'"),
                                     ("--steps=fast", "config key 'steps' expects int"),
                                     ("--steps", "expected --key=value")])
def test_bench_bad_setting_is_one_line_error(arg, why):
    r = run_bench("config/tiny.py", "--device=cpu", arg)
    assert r.returncode != 0
    assert why in r.stderr and "Traceback" not in r.stderr


def test_gpu_check_script_parses_and_names_real_configs():
    # .ci/gpu runs once, on a lent GPU, with no second chance inside the call: a typo there would cost the call
    r = subprocess.run(["bash", "-n", ".ci/gpu"], cwd=HERE, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    with open(os.path.join(HERE, ".ci", "gpu")) as f:
        names = re.findall(r"config/\w+\.py|test_\w+\.py", f.read())
    assert len(names) >= 8, names
    for name in names:
        assert os.path.exists(os.path.join(HERE, name)), name
