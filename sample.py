"""
Sample from a trained looped transformer (out_dir/ckpt.pt, written by train.py) or a released one (pretrained.py).

    python sample.py --out_dir=out/tiny
    python sample.py --init_from=looplm-135m-naive --num_loops=6 --start="The history of"   # a released model
    python sample.py --out_dir=out/tiny --start="The meaning of life is" --num_loops=16
    python sample.py --out_dir=out/tiny --start=FILE:prompt.txt --temperature=0 --max_new_tokens=50
    python sample.py --out_dir=out/tiny --cache=last                       # a smaller KV cache
    python sample.py --out_dir=out/tiny --exit_criterion=kl --exit_threshold=5e-4   # adaptive depth
    python sample.py --out_dir=out/ouro_tiny --exit_criterion=gate --exit_threshold=0.5   # Ouro's Q-exit
    python sample.py --init_from=ouro-1.4b --exit_criterion=gate --exit_threshold=0.5
    python sample.py --init_from=ouro-1.4b-thinking --chat=True --start="Why is the sky blue?"

num_loops is the test-time depth: how many times the shared core runs per token (0 = the
depth the model was trained at, its mean_recurrence). With an exit criterion each generated
token may leave the loop earlier; prompt tokens always run num_loops steps. An exited token stops
(exit_cache=copy, the default for nanoloop's models: later tokens read its last step's K/V where
they would read a deeper one, the saving the Ouro paper measures) or runs its remaining steps for
the cache alone (compute, the default for an Ouro release: what its code does, token for token).
An Ouro release reads each token out at its Q-exit step for the release's q (early_exit_threshold,
1.0) even without an exit criterion, as its code does. chat=True wraps the prompt as one user turn
in ChatML, as the Ouro Thinking variants' chat template does, and prints the reply up to
<|im_end|>. A depth whose KV cache cannot fit in free memory is refused before anything runs, and
one far past training says what it will cost first. After each sample a line reports the depth,
the mean loop steps per generated token and the KV cache size (with
--compile=True, the graphs compiled so far: flat after the first sample, or something recompiles).

The prompt is in the model's tokenizer (GPT-2 BPE for nanoloop's models and LoopLM; a fine-tuned
release's checkpoint remembers its own); <|endoftext|> in it is the document separator, and an empty
prompt starts from <|endoftext|> alone. A prompt longer than the model's block_size is cropped from
the left to its last block_size tokens (with a warning on stderr): the model cannot see more.
Samples are printed in full, prompt included; token ids in the padded part of the vocabulary
(50257 and up, which an undertrained model may still pick) are printed as U+FFFD.
"""
import sys

from configurator import exit_on_help
exit_on_help(__file__, sys.argv[1:])  # before importing torch: --help answers at once

import os
import time
from contextlib import nullcontext

import torch

import decode
import pretrained
from configurator import check_device, configure, load_checkpoint, model_from_checkpoint

# -----------------------------------------------------------------------------
out_dir = "out"                  # the checkpoint is out_dir/ckpt.pt
init_from = "resume"             # "resume": that checkpoint; or a released model: a short name (python pretrained.py
                                 # --list), a hub repo owner/name[@revision], or a local folder in the release's layout
start = "\n"                     # the prompt, or "FILE:path" to read it from a file
num_samples = 3                  # samples to draw, one after another
max_new_tokens = 200             # tokens generated per sample
temperature = 0.8                # 1.0 = the model's distribution, lower = more conservative, 0 = greedy
top_k = 200                      # sample among the top_k most likely tokens only; 0 = all of them
seed = 1337                      # sampling is reproducible for a given seed
device = "auto"                  # "auto" (cuda if available, else cpu), "cpu", "cuda", "cuda:1" ...
dtype = "auto"                   # "auto" (bfloat16 autocast on cuda, float32 elsewhere), "float32", "bfloat16", "float16"
num_loops = 0                    # test-time loop depth; 0 = the checkpoint's mean_recurrence
use_cache = True                 # KV cache; False recomputes the whole context for every token
cache = "full"                   # "full": K/V of every loop step; "last": only each past token's last step
exit_criterion = "none"          # "none", "kl" (KL between consecutive steps' predictions), "latent" (state change), "gate" (Ouro)
exit_threshold = -1.0            # leave once kl or latent is below this (RDM: 5e-4 for kl; ~0.03 for latent), or once the
                                 # exit gate's CDF reaches it (gate: q in [0, 1]; 0 = after one step); -1: 5e-4, or for
                                 # gate the release's q (readout_q) else 0.5
exit_cache = ""                  # an exited token: "copy" stops it (its later steps' K/V reuse its last), "compute" runs
                                 # its remaining steps for the cache (Ouro's released code; exact, saves nothing);
                                 # "" = compute for a release with its own readout rule (Ouro), else copy
chat = False                     # wrap the prompt as one ChatML user turn (<|im_start|>user ... <|im_end|>, Ouro Thinking)
compile = False                  # torch.compile each block (first tokens are slow while it compiles)
eval_state = ""                  # initial loop state h0: "" = the model's own eval_state ("zero" unless trained otherwise),
                                 # "zero", or "random" (drawn at every forward, as the releases do in their own evaluation)
# -----------------------------------------------------------------------------
try:
    configure(globals(), sys.argv[1:], config_files=False)  # the run's settings are in its checkpoint
except ValueError as e:
    raise SystemExit(f"error: {e}") from None
for ok, why in ((num_samples >= 1, f"num_samples must be >= 1, got {num_samples}"),
                (max_new_tokens >= 1, f"max_new_tokens must be >= 1, got {max_new_tokens}"),
                (temperature >= 0, f"temperature must be >= 0, got {temperature}"),
                (top_k >= 0, f"top_k must be >= 0, got {top_k}"),
                (num_loops >= 0, f"num_loops must be >= 0 (0 = the checkpoint's depth), got {num_loops}"),
                (cache in ("full", "last"), f"cache must be 'full' or 'last', got {cache!r}"),
                (exit_criterion in ("none", "kl", "latent", "gate"),
                 f"exit_criterion must be 'none', 'kl', 'latent' or 'gate', got {exit_criterion!r}"),
                (exit_criterion != "gate" or 0 <= exit_threshold <= 1 or exit_threshold == -1,
                 f"exit_threshold is a probability q in [0, 1] for exit_criterion=gate, got {exit_threshold}"),
                (exit_cache in ("", "copy", "compute"), f"exit_cache must be 'copy' or 'compute', got {exit_cache!r}"),
                (exit_criterion == "none" or use_cache, "an exit criterion needs use_cache=True"),
                (eval_state in ("", "zero", "random"), f"eval_state must be '', 'zero' or 'random', got {eval_state!r}")):
    if not ok:
        raise SystemExit(f"error: {why}")
try:
    device, device_type, dtype = check_device(device, dtype)
except ValueError as e:
    raise SystemExit(f"error: {e}") from None
ctx = nullcontext() if dtype == "float32" else torch.autocast(device_type, dtype=getattr(torch, dtype))
torch.manual_seed(seed)
torch.backends.cuda.matmul.allow_tf32 = True
torch.backends.cudnn.allow_tf32 = True

# the model: a checkpoint, checked before the model is built from it, or a release
free = {"eval_state": eval_state} if eval_state else {}  # settings that do not change the weights
try:
    if init_from == "resume":
        source = os.path.join(out_dir, "ckpt.pt")
        ckpt = load_checkpoint(source, text=True)
        model, tok = model_from_checkpoint(ckpt, source, free), pretrained.checkpoint_tokenizer(ckpt)
    else:
        source = init_from
        model, tok = pretrained.load(init_from, overrides=free)
except ValueError as e:
    raise SystemExit(f"error: {' '.join(str(e).split())}") from None
if exit_criterion == "gate" and not model.config.exit_gate:
    raise SystemExit(f"error: exit_criterion=gate needs a model with an exit gate; {source} has none (exit_gate=False): "
                     f"use kl or latent")
model.eval()
model.to(device)
if compile:
    model.compile_blocks()
block_size = model.config.block_size
depth = num_loops or model.config.mean_recurrence
if exit_threshold == -1:
    exit_threshold = 5e-4 if exit_criterion != "gate" else model.config.readout_q if model.config.readout_q >= 0 else 0.5
exit_cache = exit_cache or ("compute" if model.config.readout_q >= 0 else "copy")


def free_memory():
    """Bytes the cache can still take: free GPU memory, else the system's MemAvailable (Linux; a cgroup's limit is not
    read). None where unknown (macOS, MPS): then nothing is refused."""
    if str(device).startswith("cuda"):
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            return next(int(l.split()[1]) * 1024 for l in f if l.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return None

# the prompt
if start.startswith("FILE:"):
    try:
        with open(start[5:], encoding="utf-8") as f:
            start = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise SystemExit(f"error: cannot read the prompt file: {e}") from None
if chat:
    if not {"<|im_start|>", "<|im_end|>"} <= tok.special.keys():
        raise SystemExit(f"error: chat=True wraps the prompt in ChatML; {source}'s tokenizer has no <|im_start|> and "
                         f"<|im_end|> tokens")
    start = f"<|im_start|>user\n{start}<|im_end|>\n<|im_start|>assistant\n"  # the template's one user turn
ids = ([tok.bos] if "sample" in tok.bos_in else []) + tok.encode(start, specials=True) or [tok.bos]
try:
    pretrained.check_ids(ids, model)
except ValueError as e:
    raise SystemExit(f"error: {e}") from None
# a deep loop runs the core depth times per token and keeps a cache entry per step: say what that costs, first
tokens = min(len(ids) + max_new_tokens, block_size)
autocast = getattr(torch, dtype).itemsize if dtype != "float32" else None  # K and V are then in its dtype
need = decode.cache_estimate(model, depth, tokens, cache, dtype_bytes=autocast) if use_cache else 0
free = free_memory()
if need and free is not None and need > free:
    raise SystemExit(f"error: num_loops={depth} needs a KV cache of {need / 2**30:,.1f} GiB for {tokens} tokens "
                     f"({cache}), more than the {free / 2**30:,.1f} GiB free: lower num_loops or max_new_tokens, use "
                     f"--cache=last, or --use_cache=False (slower, no cache)")
seconds, timed = 0, []
if depth > 4 * model.config.mean_recurrence:  # far past training: time what a loop step costs here
    with torch.no_grad(), ctx, torch.random.fork_rng(devices=[device] if device.startswith("cuda") else []):
        for T in (1, 1, 9):  # one token at depths 1 and 9 (the first call warms up): a step's cost and the rest's
            t0 = time.time()
            model(torch.tensor([ids[-1:]], device=device), num_loops=T)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            timed.append(time.time() - t0)
    per_step = max(timed[2] - timed[1], 0) / 8
    forwards = max_new_tokens + (1 if use_cache else max_new_tokens * tokens / 2)  # one-token forwards, roughly
    seconds = (timed[1] + per_step * (depth - 1)) * forwards
if need > 2**30 or seconds > 60:
    print(f"depth {depth}: the KV cache reaches {need / 2**30:,.2f} GiB ({cache}) at {tokens} tokens" + (
          f"; about {seconds / 60:,.1f} min a sample (a loop step of one token took {1000 * per_step:.2f} ms here)"
          if seconds else ""), flush=True)
if len(ids) > block_size:
    print(f"warning: the prompt has {len(ids)} tokens, more than block_size={block_size}: "
          f"keeping its last {block_size}", file=sys.stderr)
    ids = ids[-block_size:]
x = torch.tensor(ids, dtype=torch.long, device=device)[None, :]


for _ in range(num_samples):
    with ctx:
        y, stats = model.generate(x, max_new_tokens, temperature=temperature, top_k=top_k or None,
                                  num_loops=depth, use_cache=use_cache, cache=cache,
                                  exit_criterion=exit_criterion, exit_threshold=exit_threshold,
                                  exit_cache=exit_cache, return_stats=True)
    out = y[0].tolist()
    if chat:  # the reply, up to the end of its turn
        reply = out[len(ids):]
        end = tok.special["<|im_end|>"]
        out = out[:len(ids)] + (reply[:reply.index(end) + 1] if end in reply else reply)
    print(tok.decode(out))
    kv = (f"kv cache {stats['cache_bytes']:,} bytes ({stats['cache_bytes'] / 2**20:.2f} MiB, {cache})"
          if use_cache else "kv cache off")
    graphs = f", {model.compiled_graphs()} graphs compiled" if compile else ""
    print(f"[loop depth {depth}, mean loop steps per generated token {stats['mean_steps']:.2f}, {kv}{graphs}]")
    print("---------------")
