"""
Train a looped transformer on GPT-2 token shards.

CPU quick start (a few minutes on a laptop):
    python train.py config/parity_parcae.py     # running parity (tasks.py): no data to prepare
    python prepare_fineweb.py --sample
    python train.py config/tiny.py              # text

One GPU, or one node of 8:
    python train.py config/parcae_135m.py
    torchrun --standalone --nproc_per_node=8 train.py config/parcae_135m.py
Several nodes: the usual torchrun flags (--nnodes, --node_rank, --rdzv_endpoint ...).

Settings below can be overridden by a config file and then by --key=value:
    python train.py config/tiny.py --max_iters=100 --injection=concat
    python train.py config/tiny.py --init_from=resume           # continue from out_dir/ckpt.pt, with its settings
    python train.py config/finetune_looplm.py --init_from=looplm-135m-naive   # fine-tune a released model (pretrained.py)
    python train.py config/tiny.py --overwrite=True             # start over where a checkpoint exists
    python train.py --help                                      # every setting, its default and what it does
    python train.py config/tiny.py --eval_only=True --eval_loops=1,2,4,8,16   # test-time depth sweep
Ouro's two stages (README "Ouro"): Stage I trains everything on the exit objective, Stage II the gate alone:
    python train.py config/ouro_tiny.py
    python train.py config/ouro_tiny.py --init_from=resume --train_gate=True --max_iters=300
Training appends its records to out_dir/log.jsonl; an --eval_only=True run appends to out_dir/eval_only.jsonl.
"""
import sys

from configurator import MODEL, exit_on_help
exit_on_help(__file__, sys.argv[1:], also=(MODEL,))  # before importing torch: --help answers at once

import difflib
import importlib.util
import json
import math
import os
import signal
import time
from contextlib import nullcontext
from dataclasses import asdict, fields

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from configurator import (check_device, check_stages, configure, datasheet_peak, fit_line, flat, load_checkpoint,
                          model_from_checkpoint, restore_state, resume_settings, rng_states, run_record,
                          save_checkpoint, trim_log, user_errors)
import decode
import pretrained
import tasks
from eval import val_by_depth
from model import GPT, GPTConfig, exit_summary
from prepare_fineweb import open_data, read_batch

# -----------------------------------------------------------------------------
# I/O
out_dir = "out"                  # ckpt.pt and log.jsonl go here
data_dir = "data/fineweb10B"     # *_train_*.bin and *_val_*.bin shards
init_from = "scratch"            # "scratch", "resume" (from out_dir/ckpt.pt), or a released model to fine-tune: a short
                                 # name (python pretrained.py --list), a hub repo owner/name or a local folder
overwrite = False                # let a run from scratch replace out_dir's ckpt.pt and log.jsonl (eval_only.jsonl goes too)
eval_interval = 250              # evaluate and checkpoint every this many steps (and at the end)
eval_at_start = True             # also evaluate the initial weights (a run from scratch, before its first step)
save_interval = 0                # also checkpoint every this many steps between evaluations; 0 = only with them
log_interval = 10                # print training stats every this many steps
eval_only = False                # evaluate the checkpoint in out_dir, append the result to out_dir/eval_only.jsonl, exit
eval_loops = ()                  # loop depths to evaluate; () = 1, 2, mu/2, mu, 2 mu
val_tokens = 10_485_760          # fixed prefix of the val shard(s) used by every evaluation
# a synthetic task instead of token shards (tasks.py, README "What the loop buys")
task = ""                        # "" = the token shards in data_dir; "parity" = running sum mod task_mod over segments
task_mod = 2                     # m: each digit's label is its segment's running sum mod m (2 = parity)
task_train_len = (1, 8)          # shortest, longest segment in training rows and in the "id" eval set
task_long_len = (31, 31)         # shortest, longest segment in the "long" eval set: longer than any trained on
task_eval_rows = 256             # rows in each of the two eval sets
task_eval_seed = 0               # the eval sets' seed: the same sets in every run, none of them a training batch
# data and batch
batch_size = 16                  # micro-batch, sequences per device
block_size = 1024                # sequence length
total_batch_size = 524288        # tokens per optimizer step; gradient accumulation makes up the rest
# model: every GPTConfig field in model.py is a setting too (--injection=concat, --n_embd=256; --help lists them),
# so vocab_size, mean_recurrence, backprop_depth, exit_gate, eval_state ... below are defined here
globals().update({f.name: f.default for f in fields(GPTConfig) if f.name != "block_size"})
# Ouro's two training stages (README "Ouro")
exit_beta = 0.0                  # Stage I: loss = E_p[CE_t] - exit_beta * H(p) over the exit distribution; 0 = off
train_gate = False               # Stage II: train the exit gate alone (a new AdamW), every other weight frozen
exit_thresholds = (0.25, 0.5, 0.75, 0.9)  # q values of the Q-exit table every evaluation of a gated model prints
# optimizer: Muon for block matrices, AdamW for the rest (Parcae's recipe, README "How training works")
max_iters = 5000                 # optimizer steps; the run ends by checkpointing exactly this state
muon_lr = 0.02                   # Muon, for the matrices inside blocks
adam_lr = 8e-3                   # AdamW, for embedding, norms and injection parameters
adam_betas = (0.8, 0.95)         # AdamW betas
adam_eps = 1e-10                 # AdamW eps
weight_decay = 0.0               # decoupled, Muon matrices only
grad_clip = 1.0                  # 0 = no clipping (the norm is still computed and checked)
warmup_iters = 0                 # linear warmup steps
decay_frac = 0.5                 # the last fraction of max_iters decays ...
decay_shape = "linear"           # ... "linear" or "cosine" (half-cosine, LoopLM's) ...
min_lr_frac = 0.0                # ... to this fraction of the peak
max_bad_steps = 10               # stop after this many non-finite steps in a row
# system
device = "auto"                  # "auto", "cpu", "cuda", "cuda:1", "mps" ...
dtype = "auto"                   # "auto" (bf16 on CUDA, fp32 elsewhere), "bfloat16", "float32", "float16"
compile = None                   # torch.compile each block; None = on for CUDA, off otherwise
peak_flops = 0.0                 # device peak FLOP/s for MFU; 0 = the GPU's datasheet bf16 peak (configurator.py)
seed = 1337                      # each rank adds its rank
# Weights & Biases (optional: pip install wandb); the records of log.jsonl go there too, from rank 0
wandb_log = False                # log to wandb (WANDB_MODE=offline works without network)
wandb_project = "nanoloop"       # its project
wandb_run_name = ""              # its run name; "" = out_dir's last folder name
# -----------------------------------------------------------------------------
given = {}  # every key the config file or the command line set: where it was set
with user_errors():  # a typo in a key, a value of the wrong type: one line naming it
    cli_keys = configure(globals(), sys.argv[1:], given=given)  # given: {key: the file or "command line"}
settings = {k: v for k, v in globals().items() if not k.startswith("_") and not k.isupper()
            and isinstance(v, (int, float, bool, str, tuple, type(None)))}  # saved with the checkpoint
if decay_shape not in ("linear", "cosine"):
    raise SystemExit(f"error: config key 'decay_shape' must be linear or cosine, got {decay_shape!r}")
if not all(type(T) is int and T >= 1 for T in eval_loops):
    raise SystemExit(f"error: eval_loops must be loop depths >= 1, e.g. --eval_loops=1,2,4, got {eval_loops!r}")
for key in ("eval_interval", "log_interval", "max_iters", "batch_size", "block_size", "save_interval"):
    if globals()[key] < (key != "save_interval"):
        raise SystemExit(f"error: {key} must be >= {int(key != 'save_interval')}, got {globals()[key]}")
ckpt_path = os.path.join(out_dir, "ckpt.pt")
# where evaluations are recorded: an eval_only run's go to a file of their own, since a plot of log.jsonl would
# take an evaluation of the final weights, made later and perhaps at other depths, for one made in training
log_path, eval_only_path = os.path.join(out_dir, "log.jsonl"), os.path.join(out_dir, "eval_only.jsonl")
record_path = eval_only_path if eval_only else log_path
written_to = f" (eval_only: appended to {record_path})" if eval_only else ""  # said in each evaluation's header
if init_from != "resume" and not eval_only and os.path.exists(ckpt_path) and not overwrite:
    # a trained model is not replaced by accident: say the three ways on
    raise SystemExit(f"error: {ckpt_path} exists: continue it with --init_from=resume, start elsewhere with "
                     f"--out_dir=..., or replace it and its log.jsonl with --overwrite=True")
ckpt, from_ckpt, from_file = None, {}, {}
if init_from == "resume" or eval_only:  # checked before anything else is loaded
    with user_errors():
        ckpt = load_checkpoint(ckpt_path, need=() if eval_only else ("iter_num", "data_pos", "optimizer", "rng"))
    saved, from_ckpt, from_file = resume_settings(ckpt, settings, given)  # the run's own outrank a config file's
    globals().update(saved)
    settings.update(saved)
    ckpt_max_iters = ckpt.get("config", {}).get("max_iters")  # what the run's lr schedule was planned for
    if not eval_only and ckpt["iter_num"] >= max_iters:
        raise SystemExit(f"error: {ckpt_path} is at iter {ckpt['iter_num']}, max_iters is {max_iters}: nothing to "
                         f"train; continue with --max_iters=N above {ckpt['iter_num']}, or evaluate with --eval_only=True")
release = None  # a released model to fine-tune: the architecture is the release's, the training settings this run's
if init_from not in ("scratch", "resume"):
    if eval_only or task:
        raise SystemExit(f"error: init_from={init_from!r} fine-tunes a released text model: " +
                         ("evaluate a release with python eval.py --init_from=..." if eval_only else "drop --task"))
    try:  # its config and weights header, checked now; the weights are read when the model is built
        release = pretrained.Release(init_from, {k: globals()[k] for k in given if k in GPTConfig.__dataclass_fields__})
    except ValueError as e:  # a typo of scratch or resume is said so too
        close = difflib.get_close_matches(init_from, ("scratch", "resume"), n=1)
        raise SystemExit(f"error: {f'init_from={init_from!r}: did you mean {close[0]}? ' if close else ''}"
                         f"{' '.join(str(e).split())}") from None
    globals().update(asdict(release.config))  # the saved settings describe the model that is trained
    settings.update(asdict(release.config))
ckpt_task = None if ckpt is None else ckpt.get("config", {}).get("task", "")
if ckpt_task is not None and task != ckpt_task:  # a text model's batch position is no task's, and vice versa
    raise SystemExit(f"error: {ckpt_path} was trained on {f'the {ckpt_task!r} task' if ckpt_task else 'token shards'}, "
                     f"not {f'the {task!r} task' if task else 'token shards'}: drop --task, or use another --out_dir")
if task:  # checked here, after a checkpoint's settings: a resumed task run keeps its task
    with user_errors():
        tasks.check(task, task_mod, task_train_len, task_long_len, block_size, seed, task_eval_rows, task_eval_seed,
                    vocab_size if "vocab_size" in cli_keys else None)
    vocab_size = settings["vocab_size"] = tasks.vocab_size(task_mod)
if not eval_only and (why := check_stages(exit_gate, exit_beta, train_gate, mean_recurrence, backprop_depth,
                                         init_from, exit_thresholds)):  # Ouro's stages: what each needs, said up front
    raise SystemExit(f"error: {why}")
if wandb_log and importlib.util.find_spec("wandb") is None:  # said before anything is loaded or written
    raise SystemExit("error: wandb_log=True needs the wandb package: pip install wandb")
model_args = {f.name: globals()[f.name] for f in fields(GPTConfig)}

# distributed setup: one process per device, launched by torchrun
with user_errors():
    device, device_type, dtype = check_device(device, dtype)
ddp = int(os.environ.get("RANK", -1)) != -1
if ddp:
    dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    rank, local_rank, world = dist.get_rank(), int(os.environ["LOCAL_RANK"]), dist.get_world_size()
    if device.startswith("cuda"):
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
else:
    rank, local_rank, world = 0, 0, 1
master = rank == 0
if compile is None:
    compile = device_type == "cuda"
ctx = nullcontext() if dtype == "float32" else torch.autocast(device_type, dtype=getattr(torch, dtype))
tokens_per_micro = batch_size * block_size * world
if total_batch_size % tokens_per_micro and not eval_only:  # only training accumulates gradients
    # name a value that works: the next multiple, or a smaller micro-batch
    fix = f"--total_batch_size={-(-total_batch_size // tokens_per_micro) * tokens_per_micro}"
    fix += next((f" or --batch_size={b}" for b in range(batch_size - 1, 0, -1)
                 if total_batch_size % (b * block_size * world) == 0), "")
    raise SystemExit(f"error: total_batch_size={total_batch_size} is not a multiple of batch_size * block_size * "
                     f"processes = {batch_size} * {block_size} * {world} = {tokens_per_micro}: set {fix}")
grad_accum = total_batch_size // tokens_per_micro
torch.manual_seed(seed + rank)  # ranks draw different depths and initial states
torch.backends.cuda.matmul.allow_tf32 = True
torch.backends.cudnn.allow_tf32 = True


def log(*args):
    if master:
        print(*args, flush=True)


# data: train shards read sequentially, the val prefix read once; or a task's batches made on the fly
if task:
    task_sets = tasks.eval_sets(task_eval_seed, task_eval_rows, block_size, task_train_len, task_long_len, task_mod)
    task_buckets = tasks.buckets(task_train_len, task_long_len)
else:
    with user_errors():  # every shard checked, and each split long enough for one batch of every rank
        train_shards, val, val_seqs = open_data(data_dir, batch_size, block_size, world, val_tokens, not eval_only)
data_pos = [0, 0]  # (shard, offset) of the next global micro-batch; a task's: (global micro-batches drawn, 0)
TASK_EVAL_BATCH = max(batch_size, 128)  # rows per forward in a task's evaluation: no gradient, so larger is cheaper


def next_batch():
    """read_batch, with two checks: a token id past the embedding (an IndexError deep inside the model
    otherwise) and the data wrapping around to its start (from then on the model sees tokens again)."""
    if task:  # global micro-batch g is a function of (seed, g): the same data on any number of processes
        data_pos[0] += world  # data_pos[0]: global micro-batches drawn so far, so a resume continues the stream
        return tasks.train_batch(seed, data_pos[0] - world + rank, batch_size, block_size, task_train_len, task_mod)
    before = list(data_pos)
    x, y = read_batch(train_shards, data_pos, batch_size, block_size, rank, world)
    if data_pos == [0, world * batch_size * block_size] and before != [0, 0]:
        log(f"iter {iter_num}: the train data wrapped around to its start: every token from here on is seen again")
    if int(y.max()) >= cfg.vocab_size or int(x[0, 0]) >= cfg.vocab_size:  # y holds every token of x but x's first
        raise SystemExit(f"error: {train_shards[data_pos[0]].filename} holds token id {max(int(y.max()), int(x[0, 0]))}, "
                         f"not below vocab_size={cfg.vocab_size}: a shard of another tokenizer, or a vocab_size too small")
    return x, y

# model: from scratch or resumed
iter_num = 0
with user_errors(TypeError):  # a bad setting, or a checkpoint that does not fit this model.py
    if release is not None:
        model = release.model()
        log(f"fine-tuning {init_from} ({release.family}, {release.files.weights}): its model settings, this run's training settings")
    elif ckpt is None:
        model = GPT(GPTConfig(**model_args))
    else:
        free = {"eval_state": eval_state} if "eval_state" in cli_keys else {}  # h0 in eval: not in the weights
        changed = {k: (v, model_args.get(k)) for k, v in ckpt["model_args"].items() if model_args.get(k) != v and k not in free}
        if changed:
            log(f"using the checkpoint's model settings, not the config's: {changed}")
        model = model_from_checkpoint(ckpt, ckpt_path, free)
        iter_num, data_pos = ckpt.get("iter_num", 0), list(ckpt.get("data_pos", data_pos))
# the saved settings describe this model (block_size stays the run's: its rows may be shorter than the model's)
settings.update({k: v for k, v in asdict(model.config).items() if k in settings and k != "block_size"})
if task and (model.config.vocab_size != tasks.vocab_size(task_mod) or block_size > model.config.block_size):
    raise SystemExit(f"error: {ckpt_path} holds a model of vocab_size {model.config.vocab_size} and block_size "
                     f"{model.config.block_size}; task_mod={task_mod} needs vocab_size {tasks.vocab_size(task_mod)} and "
                     f"block_size={block_size} rows: keep the run's task_mod, and block_size <= {model.config.block_size}")
if not task and block_size > model.config.block_size:
    raise SystemExit(f"error: block_size={block_size} is longer than the model's {model.config.block_size}: "
                     f"evaluate with --block_size={model.config.block_size} or less")
model.to(device)
raw_model = model
gate_start = 0  # the iter Stage II began at: its lr schedule runs from there to max_iters
ckpt_gate = ckpt is not None and ckpt.get("config", {}).get("train_gate", False)  # the checkpoint is a Stage II run
if train_gate and not eval_only:
    if not model.config.exit_gate:
        raise SystemExit(f"error: train_gate=True trains an exit gate; the model in {ckpt_path} has none (exit_gate=False)")
    gate_start = ckpt.get("gate_start", iter_num) if ckpt_gate else iter_num
    log(f"Stage II from iter {gate_start}: {'resumed' if ckpt_gate else 'a new'} AdamW (lr {adam_lr}) over the exit "
        f"gate's {sum(p.numel() for p in model.exit_gate.parameters())} parameters, its lr schedule over iters "
        f"{gate_start}-{max_iters}; every other weight frozen")
elif ckpt_gate and not eval_only:
    raise SystemExit(f"error: {ckpt_path} is a Stage II run (train_gate=True): its optimizer state is the gate's "
                     f"alone; continue it with --train_gate=True, or resume its Stage I checkpoint")
optimizers = model.configure_optimizers(muon_lr, adam_lr, weight_decay, adam_betas, adam_eps, train_gate and not eval_only)
if ckpt is not None and not eval_only:  # Stage II starts with a new AdamW: Stage I's state is not used
    with user_errors():
        restore_state(ckpt, ckpt_path, optimizers, rank, device_type == "cuda", not (train_gate and gate_start == iter_num))
runs = [] if ckpt is None else list(ckpt.get("runs", []))  # the records of the runs that made this checkpoint
# the tokenizer of the text (sample.py and eval.py read it from the checkpoint): a release's, else GPT-2's
tokenizer = None if task else release.tokenizer_spec if release else ckpt.get("tokenizer", "gpt2") if ckpt else "gpt2"
del ckpt
if not task:  # the shards must be in the model's tokenizer: prepare_fineweb.py leaves a release's tokenizer.json beside them
    with user_errors():
        pretrained.check_shards_tokenizer(data_dir, tokenizer, init_from if release else "gpt2")
for opt, peak in zip(optimizers, (adam_lr,) if train_gate else (muon_lr, adam_lr)):
    for group in opt.param_groups:
        group["peak_lr"] = peak  # the schedule scales these; set after loading so a resumed run may change them
if compile:
    model.compile_blocks()
if ddp:
    model = DDP(model, device_ids=[local_rank] if device_type == "cuda" else None)
cfg = raw_model.config
if not task and int(val[:val_seqs * block_size + 1].max()) >= cfg.vocab_size:  # every token val_by_depth reads, checked once
    raise SystemExit(f"error: the val shards in {data_dir} hold token id {int(val.max())}, not below "
                     f"vocab_size={cfg.vocab_size}: shards of another tokenizer, or a vocab_size too small")
eval_loops = eval_loops or tuple(sorted({1, 2, max(1, cfg.mean_recurrence // 2), cfg.mean_recurrence, 2 * cfg.mean_recurrence}))
if cfg.exit_gate and not task and cfg.mean_recurrence not in eval_loops:  # the Q-exit table is read at T_max
    eval_loops = tuple(sorted({*eval_loops, cfg.mean_recurrence}))
if not peak_flops and device_type == "cuda":
    peak_flops = datasheet_peak(torch.cuda.get_device_name(device), dtype)
if eval_only:  # what the numbers are of: the checkpoint, the depths and how much data
    data = (f"{task_eval_rows} rows in each of the id and long sets, batches of {TASK_EVAL_BATCH}" if task else
            f"the first {val_seqs * block_size:,} val tokens in {data_dir}, batches of {batch_size}")
    log(f"evaluating {ckpt_path} at iter {iter_num}: {cfg.injection} model, {raw_model.get_num_params() / 1e6:.2f}M "
        f"unique parameters, loop depths {', '.join(map(str, eval_loops))}; {data}; {world} process(es), "
        f"device {device}, {dtype}, compile {compile}")
else:
    log(f"{cfg.injection} model, {raw_model.get_num_params() / 1e6:.2f}M unique parameters, "
        f"{world} process(es), grad_accum {grad_accum}, device {device}, {dtype}, compile {compile}")
if task:
    log(f"task {task} mod {task_mod}: rows of {block_size} tokens, training segments of {task_train_len[0]}-{task_train_len[1]} "
        f"digits, long set {task_long_len[0]}-{task_long_len[1]}; chance is 1/{task_mod} = {1 / task_mod:.3f}. "
        f"Bits per byte and val_tokens do not apply: the labels are digits, not text")
if from_ckpt:
    log("settings from the checkpoint (--key=value overrides them): " + ", ".join(f"{k}={v!r}" for k, v in from_ckpt.items()))
for file, keys in from_file.items():  # a config file given with a checkpoint is mostly not what runs: say which part
    log(f"{file}: {', '.join(keys)} are the checkpoint's here, not this file's (give them as --key=value to change them)")


def lr_mult(it):
    """Warmup, constant, then linear or half-cosine decay to min_lr_frac over the last decay_frac of max_iters.
    Stage II schedules its own steps, from gate_start."""
    it, max_iters_ = it - gate_start, max_iters - gate_start
    if it < warmup_iters:
        return (it + 1) / warmup_iters
    decay_start = max_iters_ * (1 - decay_frac)
    if it < decay_start:
        return 1.0
    t = (it - decay_start) / max(1, max_iters_ - decay_start)  # 0 -> 1 over the decay window
    if decay_shape == "cosine":
        t = (1 - math.cos(math.pi * t)) / 2  # the same end points, flat at both ends
    return 1 - (1 - min_lr_frac) * t


# UTF-8 bytes of every token id, for bits per byte (a loss that does not depend on the tokenizer)
token_bytes = None if task else torch.from_numpy(pretrained.make_tokenizer(tokenizer).token_bytes(cfg.vocab_size)).to(device)


def write_log(record):
    if master:
        with open(record_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if wandb_run is not None and "run" not in record:  # the run record is the wandb run's config instead
            wandb_run.log(flat({k: v for k, v in record.items() if k != "iter"}), step=record["iter"])


def report_eval():
    """Every depth in eval_loops (this rank's share, summed over ranks): printed and recorded. Returns {T: val loss}."""
    model.eval()
    if task:  # both eval sets: accuracy by position in the segment, whole segments, the loss on the digits
        res = tasks.evaluate(raw_model, task_sets, eval_loops, task_buckets, TASK_EVAL_BATCH, device, ctx, rank, world)
        log(f"step {iter_num}, {task} mod {task_mod} (chance {1 / task_mod:.3f}): accuracy per labelled digit by its "
            f"position in the segment, whole segments right, loss on the digits, loop state{written_to}\n" + tasks.table(res))
        rec = tasks.record(res, task_mod, cfg.mean_recurrence)
    else:
        losses, bpbs, states, exits = val_by_depth(raw_model, val, val_seqs, block_size, batch_size, eval_loops, token_bytes,
                                                   device, ctx, exit_thresholds, rank, world, show_bar=eval_only and master)
        log(f"step {iter_num} val loss by loop depth{written_to}:\n" + "\n".join(
            f"  T={T:<3d} {l:.4f}   bpb {bpbs[T]:.4f}   state rms {states[T][0]:.3g}   residual {states[T][1]:.3g}"
            for T, l in losses.items()))
        rec = {"val": losses, "val_bpb": bpbs, "val_state_rms": {T: s[0] for T, s in states.items()},
               "val_residual": {T: s[1] for T, s in states.items()}}
        if exits:  # a gated model: the Q-exit table
            exit_rec, text = decode.q_exit_table(exits, exit_thresholds, cfg.mean_recurrence)
            rec.update(exit_rec)
            log(text)
    model.train()
    write_log({"iter": iter_num, **rec})
    return rec["val"]


def checkpoint():
    """Every rank's RNG gathered, then rank 0 writes (configurator.save_checkpoint: atomic)."""
    rngs = rng_states(ddp, world, device_type == "cuda")
    if not master:
        return
    save_checkpoint({"model": raw_model.state_dict(), "model_args": asdict(cfg), "iter_num": iter_num, "rng": rngs,
                     "optimizer": [o.state_dict() for o in optimizers], "data_pos": list(data_pos), "config": settings,
                     "version": 1, "gate_start": gate_start, "runs": runs, "tokenizer": tokenizer}, ckpt_path)
    global saved_iter
    saved_iter = iter_num
    log(f"saved {ckpt_path} at iter {iter_num}")


if master:
    os.makedirs(out_dir, exist_ok=True)
    if init_from != "resume" and not eval_only:
        for old in (log_path, eval_only_path):  # a new run starts a new log, never appends to an old one
            if os.path.exists(old):
                os.remove(old)
    if init_from == "resume" and not eval_only and (dropped := trim_log(log_path, iter_num)):
        log(f"log.jsonl: dropped {dropped} records past iter {iter_num}, written after the last checkpoint; those "
            f"steps run again now")
# a record of what produced this run: first in log.jsonl, then one more for every resume (and eval_only)
run = run_record(device, world_size=world, dtype=dtype, compile=compile, init_from=init_from, eval_only=eval_only,
                 **({"release": release.record()} if release else {}))  # its repo, commit and files' sha256
wandb_run = None
if wandb_log and master:
    import wandb
    wandb_run = wandb.init(project=wandb_project, name=wandb_run_name or os.path.basename(os.path.abspath(out_dir)),
                           config={**settings, "run": run})
write_log({"iter": iter_num, "run": run})
if not eval_only:
    runs.append(run)  # the checkpoint keeps every run that trained it
if eval_only:
    losses = report_eval()
    if len(losses) >= 3:
        log(fit_line(losses))  # Parcae's saturating exponential in the depth
    if wandb_run is not None:
        wandb_run.finish()
    if ddp:
        dist.barrier()  # no rank tears down gloo while another still works (rank 0 writes): that aborts at exit
        dist.destroy_process_group()
    sys.exit(0)

# training loop


def interrupted(signum, frame):
    """Ctrl-C: one line saying what is on disk instead of a traceback (a save in flight leaves the old file)."""
    held = f"{ckpt_path} holds iter {saved_iter}: continue with --init_from=resume" if saved_iter is not None \
        else f"no checkpoint written yet (the first comes at iter {min(eval_interval, save_interval or max_iters, max_iters)})"
    if master:
        print(f"interrupted at iter {iter_num}; {held}", file=sys.stderr, flush=True)
    raise SystemExit(130)  # the shell's code for Ctrl-C


saved_iter = iter_num if init_from == "resume" else None
signal.signal(signal.SIGINT, interrupted)
if init_from == "resume":
    note = "" if train_gate or ckpt_max_iters in (None, max_iters) else \
        f"; max_iters changed {ckpt_max_iters} -> {max_iters}, so the lr schedule now ends at iter {max_iters}"
    log(f"resuming from {ckpt_path} at iter {iter_num} of {max_iters}, lr x{lr_mult(iter_num):.3f}{note}")
bad_steps, start_iter = 0, iter_num
t0, window, useful_flops, steps_needed, steps_run = time.time(), 0, 0, 0, 0
loss_sum, loss_steps = torch.zeros((), device=device), 0  # the logged loss: the mean over the steps since the last log
model.train()
while True:
    # a resumed run's first state was evaluated when its checkpoint was written: skip that repeat
    if (iter_num % eval_interval == 0 or iter_num == max_iters) and (iter_num > start_iter or
                                                                     (init_from != "resume" and eval_at_start)):
        report_eval()
        if iter_num > start_iter:
            checkpoint()
        t0, window, useful_flops, steps_needed, steps_run = time.time(), 0, 0, 0, 0
    elif save_interval and iter_num % save_interval == 0 and iter_num > start_iter:
        checkpoint()  # between evaluations: an interrupted run loses at most save_interval steps
        t0, window, useful_flops, steps_needed, steps_run = time.time(), 0, 0, 0, 0
    if iter_num >= max_iters:
        break
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group["peak_lr"] * lr_mult(iter_num)
    step_loss = torch.zeros((), device=device)
    for micro in range(grad_accum):
        x, y = next_batch()
        if device_type == "cuda":  # page-locked memory: the copy is then asynchronous, behind the running kernels
            x, y = x.pin_memory(), y.pin_memory()
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        sync = nullcontext() if not ddp or micro == grad_accum - 1 else model.no_sync()
        with sync:
            with ctx:
                _, loss = model(x, y, exit_beta=exit_beta, train_gate=train_gate)
            (loss / grad_accum).backward()
        step_loss += loss.detach() / grad_accum
        n, k = raw_model.last_depths  # MFU counts the loop steps each sequence needed
        useful_flops += raw_model.estimate_flops(block_size, n, k, backward=not train_gate)  # Stage II: no trunk backward
        steps_needed, steps_run = steps_needed + int((n + k).sum()), steps_run + raw_model.last_rows_run
    grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), grad_clip if grad_clip > 0 else float("inf"))
    if not torch.isfinite(grad_norm):  # the same on every rank: gradients are already averaged
        bad_steps += 1
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        log(f"step {iter_num}: non-finite grad norm, step skipped ({bad_steps} in a row)")
        if bad_steps >= max_bad_steps:
            raise SystemExit(f"{bad_steps} non-finite steps in a row: stopping (lower the lr, check the data)")
        continue
    bad_steps = 0
    loss_sum, loss_steps = loss_sum + step_loss, loss_steps + 1  # skipped steps count in neither
    for opt in optimizers:
        opt.step()
        opt.zero_grad(set_to_none=True)
    iter_num, window = iter_num + 1, window + 1
    if iter_num % log_interval == 0 or iter_num == max_iters:
        loss_sum /= loss_steps
        if ddp:
            dist.all_reduce(loss_sum, op=dist.ReduceOp.AVG)
        if device_type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.time() - t0
        work = torch.tensor([useful_flops, steps_needed, steps_run], dtype=torch.float64)
        if ddp:
            dist.all_reduce(work)
        mfu = work[0].item() / elapsed / (world * peak_flops) if peak_flops else float("nan")
        dt = elapsed / window
        loop = raw_model.loop_stats()  # rho of A-bar, and sigma_max (concat) or mean_decay (diagonal)
        state_rms, residual = (t.mean().item() for t in raw_model.last_state)  # the last micro-batch's h_T
        rec = {"iter": iter_num, "loss": loss_sum.item(), "lr_mult": lr_mult(iter_num - 1), "grad_norm": grad_norm.item(),
               "ms": dt * 1000, "tok_s": total_batch_size / dt, "mfu": mfu,
               "padded": work[2].item() / work[1].item(), **loop, "state_rms": state_rms, "residual": residual}
        rho = f"rho {loop['rho']:.4f}" if loop else "no loop"  # the fixed-depth baseline has none
        extra = ""  # what only some runs log
        if compile:  # graphs so far: at most 4 (gradient on/off x a batch of one or more); more means recompiles
            rec["compiles"] = raw_model.compiled_graphs()
            extra = f", {rec['compiles']} graphs compiled"
        if cfg.exit_gate:  # the objective is logged as loss; beside it, the last micro-batch's per-step CE, H(p), E[t]
            *ce_steps, rec["exit_entropy"], rec["exit_step"] = exit_summary(*raw_model.last_exit, y != -1).tolist()
            rec["ce_steps"] = ce_steps
            extra += (f", CE by step {'/'.join(f'{c:.3f}' for c in ce_steps)}, H(p) {rec['exit_entropy']:.3f}, "
                      f"E[t] {rec['exit_step']:.2f}")
        log(f"iter {iter_num}: {'gate loss' if train_gate else 'loss'} {rec['loss']:.4f}, lr x{rec['lr_mult']:.3f}, "
            f"grad norm {rec['grad_norm']:.3f}, {rec['ms']:.0f} ms, {rec['tok_s']:,.0f} tok/s, "
            f"MFU {f'{100 * mfu:.1f}%' if peak_flops else 'n/a'}, padded x{rec['padded']:.2f}, {rho}, "
            f"state rms {state_rms:.3g}, residual {residual:.3g}{extra}")
        write_log(rec)
        t0, window, useful_flops, steps_needed, steps_run = time.time(), 0, 0, 0, 0
        loss_sum, loss_steps = torch.zeros((), device=device), 0
if wandb_run is not None:
    wandb_run.finish()
if ddp:
    dist.barrier()  # rank 0 may still be saving: tearing down under it aborts with SIGABRT
    dist.destroy_process_group()
