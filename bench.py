"""
Benchmark the looped transformer: training speed, MFU and padded work; inference with and without KV cache.
No data files needed: the batches are random tokens.

    python bench.py config/parcae_135m.py                  # on CPU the shapes are shrunk, see below
    python bench.py config/parcae_135m.py --compare        # also the fixed-depth baseline with the same blocks
    python bench.py config/tiny.py --steps=20 --infer_loops=1,4,16 --decode_tokens=32
    python bench.py config/parcae_135m.py --cpu_full=True  # the config's real shapes on CPU (slow)
    python bench.py --init_from=looplm-135m-naive          # a released model (pretrained.py): its load, then
                                                           # prefill and decode at its depth, cache on and off
    python bench.py --init_from=ouro-1.4b --infer_loops=1,2,3,4 --exit_thresholds=0.5 --weights_dtype=bfloat16

Takes the same config files and --key=value settings as train.py (its defaults are read from train.py),
plus the bench settings below. The training step is the micro-batch step of train.py: forward with
sampled depths, backward, clip, Muon + AdamW step. MFU = useful FLOPs/s (each sequence's own depth)
over the peak of a large matmul measured in the same run. On a CPU shared with other jobs,
OMP_NUM_THREADS=1 gives far steadier timings.
"""
import os
import sys

from configurator import MODEL, exit_on_help, script_settings
TRAIN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "train.py")  # its settings are accepted here too
exit_on_help(__file__, sys.argv[1:], also=(TRAIN, MODEL))  # before importing torch: --help answers at once

import ast
import dataclasses
import resource
import time
from contextlib import nullcontext
from dataclasses import fields

import torch

import pretrained
from configurator import check_device, configure, datasheet_peak
from model import GPT, GPTConfig


# -----------------------------------------------------------------------------
globals().update({name: ast.literal_eval(default)  # train.py's settings, its model's GPTConfig's (block_size: train.py's)
                 for name, default, _, _ in script_settings(*MODEL) + script_settings(TRAIN)})
steps = 10                # timed training steps
warmup = 3                # untimed training steps first (compilation, allocator)
compare = False           # also run the fixed-depth baseline with the same blocks
inference = True          # also run the inference benchmark
decode_tokens = 16        # tokens decoded one at a time after the prompt
prompt_len = 0            # prefill length; 0 = min(block_size // 2, 64)
infer_loops = ()          # loop depths for inference; () = 1, mu_rec, 2 mu_rec
exit_thresholds = ()      # a gated model: also decode with Q-exit at each q, its exited tokens stopped or computed
weights_dtype = "float32" # a release's parameters: "float32", or "bfloat16" (the Ouro file's own: views of it)
matmul_peak = True        # measure peak FLOP/s with a large matmul; False = use peak_flops
cpu_full = False          # on CPU keep the config's shapes instead of shrinking them
# -----------------------------------------------------------------------------
bools = {k for k, v in globals().items() if isinstance(v, bool)}
argv = [a + "=True" if a.startswith("--") and a[2:] in bools else a for a in sys.argv[1:]]  # bare --compare
given = {}  # the keys a config file or the command line set, and where
try:
    configure(globals(), argv, given=given)
except ValueError as e:
    raise SystemExit(f"bench.py: {e}")
config_name = next((os.path.splitext(os.path.basename(a))[0] for a in argv if not a.startswith("--")), "defaults")
try:
    device, device_type, dtype = check_device(device, dtype)
except ValueError as e:
    raise SystemExit(f"bench.py: {e}")
cuda = device_type == "cuda"
if compile is None:
    compile = cuda
ctx = nullcontext() if dtype == "float32" else torch.autocast(device_type, dtype=getattr(torch, dtype))
torch.backends.cuda.matmul.allow_tf32 = True
torch.backends.cudnn.allow_tf32 = True

release = None  # a released model: its load, then inference at its own shapes and depth
if init_from == "resume":
    raise SystemExit("bench.py: init_from=resume is not benchmarked: use a config's shapes, or --init_from=<release>")
if init_from != "scratch":
    rss_before, load_start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, time.perf_counter()
    try:  # the model settings are the release's: a contradicting one is an error, depths and a shorter block_size not
        release = pretrained.Release(init_from, {k: globals()[k] for k in given if k in GPTConfig.__dataclass_fields__})
    except ValueError as e:
        raise SystemExit(f"bench.py: {' '.join(str(e).split())}")
    globals().update(dataclasses.asdict(release.config))
    if "infer_loops" not in given:
        infer_loops = (mean_recurrence,)  # its own depth
if device_type == "cpu" and not cpu_full and not release:
    # keep the config's injection and depth settings, make the blocks small enough to run in seconds
    on_cli = {a[2:].split("=", 1)[0] for a in argv if a.startswith("--")}
    small = dict(n_embd=128, n_head=4, n_prelude=1, n_core=1, n_coda=1, block_size=128, batch_size=4, vocab_size=4096)
    shrunk = {k: (globals()[k], v) for k, v in small.items() if k not in on_cli and globals()[k] > v}
    if "n_head" in shrunk and "n_kv_head" not in on_cli:  # keep the grouped-query ratio
        shrunk["n_kv_head"] = (n_kv_head, max(1, small["n_head"] // (n_head // n_kv_head)))
    globals().update({k: new for k, (old, new) in shrunk.items()})
    if shrunk:
        print("CPU: shapes shrunk to run in seconds: " + ", ".join(f"{k} {a}->{b}" for k, (a, b) in shrunk.items()))
        print("     run the config's real shapes with --cpu_full=True")
prompt_len = prompt_len or min(block_size // 2, 64)
infer_loops = infer_loops or tuple(sorted({1, mean_recurrence, 2 * mean_recurrence}))
if steps < 1 or warmup < 0 or decode_tokens < 1:
    raise SystemExit("bench.py: need steps >= 1, warmup >= 0, decode_tokens >= 1")
if inference and prompt_len + decode_tokens > block_size:
    raise SystemExit(f"bench.py: prompt_len + decode_tokens = {prompt_len + decode_tokens} > block_size={block_size}")
model_args = {f.name: globals()[f.name] for f in fields(GPTConfig)}
baseline_args = dict(model_args, mean_recurrence=1, backprop_depth=1, depth_sampling="fixed", injection="add",
                     prelude_norm=False, state_init="zero")


def clock():
    if cuda:
        torch.cuda.synchronize()  # kernels run asynchronously: wait for them before reading the clock
    return time.perf_counter()


def measure_peak():
    """FLOP/s of a large matmul in the dtype the model's matmuls run in (bf16 autocast on CUDA, fp32 on CPU)."""
    n, iters = (8192, 20) if cuda else (2048, 3)
    pdtype = getattr(torch, dtype)
    a, b = torch.randn(n, n, device=device, dtype=pdtype), torch.randn(n, n, device=device, dtype=pdtype)
    for _ in range(3 if cuda else 1):
        a @ b
    t0 = clock()
    for _ in range(iters):
        a @ b
    return 2 * n ** 3 * iters / (clock() - t0), f"{str(pdtype)[6:]} {n}x{n} matmul, measured"


def peak_rss():
    """The whole process's peak resident memory so far, in bytes (it cannot be reset)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def peak_memory():
    if cuda:
        return f"{torch.cuda.max_memory_allocated() / 2**20:,.0f} MiB"
    return f"{peak_rss() / 2**20:,.0f} MiB RSS"


def build(args):
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()  # peak memory of this model alone
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**args)).to(device)
    if compile:
        model.compile_blocks()
    return model


def bench_train(model, name):
    """One table row, seconds per step and useful FLOPs per token of train.py's micro-batch step."""
    model.train()
    optimizers = model.configure_optimizers(muon_lr, adam_lr, weight_decay, adam_betas, adam_eps)
    t0 = useful = padded = needed = run = 0  # counted from the first timed step on
    for i in range(warmup + steps):
        if i == warmup:  # the timed steps start here
            t0, useful, padded, needed, run = clock(), 0, 0, 0, 0
        x = torch.randint(0, vocab_size, (batch_size, block_size + 1), device=device)
        with ctx:
            _, loss = model(x[:, :-1], x[:, 1:], exit_beta=exit_beta)  # a gated config: Stage I, as train.py
        n, k = model.last_depths  # (B,) loop steps without / with gradient per sequence
        useful += model.estimate_flops(block_size, n, k)
        padded += model.estimate_flops(block_size, n.max().expand(batch_size), k.max().expand(batch_size))
        needed, run = needed + int((n + k).sum()), run + model.last_rows_run  # loop steps needed / run
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else float("inf"))
        for opt in optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)
    dt = (clock() - t0) / steps
    row = {"config": name, "device": device, "dtype": dtype, "micro-batch": f"{batch_size}x{block_size}",
           "ms/step": f"{1000 * dt:.1f}", "tokens/s": f"{batch_size * block_size / dt:,.0f}",
           "MFU useful": f"{100 * useful / steps / dt / peak:.1f}%" if peak else "n/a",
           "padded": f"x{run / needed:.2f}", "peak mem": peak_memory(),
           "params": f"{model.get_num_params() / 1e6:.2f}M"}
    return row, dt, useful / (steps * batch_size * block_size), padded / useful


def print_table(rows):
    cols = list(rows[0])
    width = {c: max(len(c), *(len(r[c]) for r in rows)) for c in cols}
    for r in [dict(zip(cols, cols)), *rows]:
        print("  ".join(r[c].ljust(width[c]) for c in cols).rstrip())


def bench_decode(model, loops, mode, prompt, exit=()):
    """Prefill seconds, decode seconds per token (greedy, batch 1), the cache and the mean steps per decoded token;
    mode "none" = no cache; exit = (q, exit_cache) for Q-exit."""
    cache = None if mode == "none" else model.new_cache(loops, mode)
    context, idx, times, steps = prompt, prompt, [], []
    for _ in range(1 + decode_tokens):
        t0 = clock()
        with torch.no_grad(), ctx:
            if cache is None:  # recompute the whole context for every new token
                logits = model(context, num_loops=loops)[0][:, -1]
            else:
                logits, used = model.forward_cached(idx, cache, loops, *(("gate", *exit) if exit else ()))
                steps.append(used.float().mean().item())
        times.append(clock() - t0)
        idx = logits.argmax(-1, keepdim=True)
        context = torch.cat([context, idx], dim=1)
    return times[0], sum(times[1:]) / decode_tokens, cache, sum(steps[1:]) / decode_tokens if steps else loops


def bench_inference(model, loops_list):
    model.eval()
    prompt = torch.randint(0, model.config.vocab_size, (1, prompt_len), device=device)
    rows = []
    exits = [(q, how) for q in exit_thresholds for how in ("copy", "compute")] if model.config.exit_gate else []
    for loops in loops_list:
        for mode, exit in [("full", ()), ("last", ()), ("none", ()), *(("full", e) for e in exits)]:
            bench_decode(model, loops, mode, prompt, exit)  # untimed round: compilation, first-call costs
            prefill, decode, cache, steps = bench_decode(model, loops, mode, prompt, exit)
            rows.append({"num_loops": str(loops), "cache": mode, "exit": f"q={exit[0]:g}, {exit[1]}" if exit else "-",
                         "steps/token": f"{steps:.2f}", "prefill ms": f"{1000 * prefill:.1f}",
                         "prefill tokens/s": f"{prompt_len / prefill:,.0f}",
                         "decode ms/token": f"{1000 * decode:.2f}", "tokens/s": f"{1 / decode:,.1f}",
                         "cache MiB": "-" if cache is None else f"{GPT.cache_nbytes(cache) / 2**20:.2f}"})
    return rows


def bench_release(r):
    """A release's load (time, and peak memory against its file's size), then inference at its depth."""
    model = r.model(device, weights_dtype)
    if compile:
        model.compile_blocks()
    rss0 = rss_before * (1 if sys.platform == "darwin" else 1024)
    dt, size = clock() - load_start, os.path.getsize(r.files.weights)
    print(f"{init_from}: {r.family}, {model.get_num_params() / 1e6:.2f}M parameters, {r.files.weights} "
          f"{size / 2**20:,.1f} MiB ({r.dtype}), loaded as {weights_dtype} on {device} in {dt:.2f} s"
          + (" (memory-mapped: pages are read as they are first used)" if not cuda else ""))

    def rss(when):  # the whole process's peak; the weights' pages count once they are touched
        rss1 = peak_rss()
        print(f"peak RSS {when}: {rss1 / 2**20:,.0f} MiB, x{rss1 / size:.2f} the file's size; "
              f"{(rss1 - rss0) / 2**20:,.0f} MiB above the {rss0 / 2**20:,.0f} MiB before the load (Python and torch), "
              f"x{(rss1 - rss0) / size:.2f}")
    if not cuda:
        rss("after the load")
    print(f"\ninference: batch 1, prompt {prompt_len} tokens, {decode_tokens} decoded tokens, greedy")
    print_table(bench_inference(model, infer_loops))
    if not cuda:
        rss("after inference")


if release:
    try:
        bench_release(release)
    except pretrained.ReleaseError as e:
        raise SystemExit(f"bench.py: {e}")
    raise SystemExit(0)
try:
    GPTConfig(**model_args)
except ValueError as e:
    raise SystemExit(f"bench.py: {e}")
peak_how = "the peak_flops setting"
if not peak_flops and cuda:  # as train.py does
    peak_flops, peak_how = datasheet_peak(torch.cuda.get_device_name(device), dtype), "the datasheet's"
peak, peak_how = measure_peak() if matmul_peak else (peak_flops, peak_how)
print(f"{config_name}: injection {injection}, mean_recurrence {mean_recurrence}, backprop_depth {backprop_depth}, "
      f"depth_sampling {depth_sampling}, loop_checkpoint {loop_checkpoint}, compile {compile}")
print(f"peak {peak / 1e12:.3g} TFLOP/s ({peak_how})" if peak else "peak unknown: MFU n/a (set --peak_flops)")
print(f"\ntraining: {warmup} warmup + {steps} timed steps of one micro-batch (no gradient accumulation)")
if compare:  # the baseline first: on CPU the RSS column can only grow
    base_row, base_dt, base_flops_tok, _ = bench_train(build(baseline_args), f"{config_name} baseline")
model = build(model_args)
row, dt, flops_tok, padded_flops = bench_train(model, config_name)
print_table([row, base_row] if compare else [row])
print(f"running every row to the deepest row's depth (as masked execution does) would cost x{padded_flops:.2f} "
      f"the FLOPs of these steps")
if compare:
    print(f"looped / baseline: ms/step x{dt / base_dt:.2f}, useful FLOPs/token x{flops_tok / base_flops_tok:.2f}")
if not cuda:
    print("(RSS is the whole process's peak so far)")
if inference:
    print(f"\ninference: batch 1, prompt {prompt_len} tokens, {decode_tokens} decoded tokens, greedy")
    print_table(bench_inference(model, infer_loops))
if compile:  # flat in the number of steps and tokens, or something recompiles (test_compile.py)
    print(f"\ntorch.compile: {model.compiled_graphs()} graphs compiled in this process")
