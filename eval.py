"""
Loss and bits per byte on held-out text, and zero-shot HellaSwag and LAMBADA, at several test-time loop
depths: does thinking longer help?

    python eval.py --out_dir=out/tiny
    python eval.py --out_dir=out/parcae_135m --tasks=hellaswag,lambada --eval_loops=1,2,4,8,16
    python eval.py --out_dir=out/tiny --tasks=hellaswag --max_items=500      # a quick partial run
    python eval.py --out_dir=out/tiny --eval_data_dir=assets/eval_sample --device=cpu  # offline: 5 real items a task
    python eval.py --out_dir=out/tiny --eval_data_dir=/path/to/copies       # offline, the full files copied by hand
    python eval.py --init_from=looplm-135m-naive --eval_loops=1,2,4,6,8,12   # a released model (pretrained.py)

Prints a table (one row per task and metric, one column per depth) and writes out_dir/eval.json
(for a release: out_dir/eval_<name>.json, with the release's repo, commit and file hashes).
val: the first val_tokens tokens of the val shards in data_dir (the checkpoint's own data_dir by
default; data/fineweb10B for a release), in rows of the model's block_size: loss in nats per token
and bits per byte (targets with no bytes, such as <|endoftext|>, left out of bpb).
The task data are downloaded once into eval_data_dir (resumable, checked before they are renamed into
place); a file already there is used as it is:
    hellaswag_val.jsonl   HellaSwag validation, 10,042 items {"ctx", "endings" (4), "label"}
    lambada_test.jsonl    OpenAI's LAMBADA test set, 5,153 items {"text"}

HellaSwag: the loss of each ending's tokens given the context, joined by a space; acc picks the
ending with the lowest summed loss, acc_norm the lowest mean loss per token. Chance is 0.25.
LAMBADA: the target is the last space-separated word; acc = greedy decoding reproduces all of its
tokens given the text before it; ppl = exp(mean loss of the target tokens).
The model runs in eval mode (no depth sampling, initial state 0 unless --eval_state=random), so a
score is a function of the checkpoint and the depth only. train.py's own evaluation, val_by_depth (every rank's
share, the loop state, the Q-exit sums), is here too, beside score_val. (About 480 lines: each task's reading,
download and scoring are kept beside the batched scorer they share.)
"""
import sys

from configurator import exit_on_help
if __name__ == "__main__":  # (train.py imports val_by_depth from here)
    exit_on_help(__file__, sys.argv[1:])  # before importing torch: --help answers at once

import glob
import json
import math
import os
import re
from contextlib import nullcontext

import requests
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

import decode
import numpy as np
import pretrained
from configurator import check_device, configure, load_checkpoint, model_from_checkpoint, run_record
from model import exit_summary
from prepare_fineweb import fetch, open_shard

URLS = {"hellaswag": "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl",
        "lambada": "https://openaipublic.blob.core.windows.net/gpt-2/data/lambada_test.jsonl"}

# -----------------------------------------------------------------------------
# task data


def parse_hellaswag(obj):
    """(context, endings, label) of one HellaSwag item; ValueError says what is wrong with it."""
    if not isinstance(obj, dict) or not {"ctx", "endings", "label"} <= obj.keys():
        raise ValueError("expected a JSON object with 'ctx', 'endings' and 'label'")
    ctx, endings, label = obj["ctx"], obj["endings"], obj["label"]
    if not isinstance(ctx, str):
        raise ValueError(f"'ctx' must be a string, got {type(ctx).__name__}")
    if not isinstance(endings, list) or len(endings) < 2 or not all(isinstance(e, str) for e in endings):
        raise ValueError("'endings' must be a list of at least 2 strings")
    if isinstance(label, str) and label.isdigit():
        label = int(label)  # some copies of the file store the label as a string
    if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label < len(endings):
        raise ValueError(f"label {obj['label']!r} out of range: expected an integer 0 to {len(endings) - 1}")
    return ctx, endings, label


def parse_lambada(obj):
    """(context, target word) of one LAMBADA item: the target is the last space-separated word."""
    if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
        raise ValueError("expected a JSON object with a 'text' string")
    context, _, word = obj["text"].rstrip().rpartition(" ")
    if not context or not word:
        raise ValueError("'text' needs at least two space-separated words")
    return context, word


PARSERS = {"hellaswag": parse_hellaswag, "lambada": parse_lambada}
TASKS = ("val", *PARSERS)


def read_items(task, path):
    """Every item of a task's jsonl file; a bad line is a ValueError naming the file and the line."""
    items = []
    try:
        with open(path, encoding="utf-8") as f:
            for i, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    items.append(PARSERS[task](json.loads(line)))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{i}: not valid JSON ({e.msg})") from None
                except ValueError as e:
                    raise ValueError(f"{path}:{i}: {e}") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not valid UTF-8 ({e})") from None
    if not items:
        raise ValueError(f"{path}: no {task} items in it")
    return items


def task_file(task, data_dir, url=None, **fetch_kwargs):
    """Path of the task's data in data_dir, downloaded first if it is not there."""
    url = url or URLS[task]
    path = os.path.join(data_dir, url.rsplit("/", 1)[-1])
    if os.path.exists(path):
        return path
    os.makedirs(data_dir, exist_ok=True)
    try:
        fetch(url, path, check=lambda p: read_items(task, p), **fetch_kwargs)
    except (RuntimeError, requests.RequestException) as e:
        why = " ".join(str(e).split())
        raise RuntimeError(f"cannot download {task} data ({why}): put a copy of {url} at {path}, "
                           f"or point --eval_data_dir at a folder holding one") from None
    return path


# -----------------------------------------------------------------------------
# scoring


def task_rows(task, items, tok):
    """(context tokens, continuation tokens) rows, and the item each row belongs to. Contexts start
    with the tokenizer's document start where the model is evaluated so (GPT-2: <|endoftext|>, as every
    training document; Parcae: <|bos|> for HellaSwag only, as its own evaluation); the continuation's
    leading space is tokenized with it (" dog", not " " + "dog"), as in running text."""
    rows, owner = [], []
    for i, item in enumerate(items):
        ctx = ([tok.bos] if task in tok.bos_in else []) + tok.encode(item[0])
        for cont in (item[1] if task == "hellaswag" else [item[1]]):
            rows.append((ctx, tok.encode(" " + cont)))
            owner.append(i)
    return rows, owner


@torch.no_grad()
def score_rows(model, rows, num_loops, batch_size, device="cpu", ctx=nullcontext(), owner=None, bar=None, exit=None):
    """For each row (context, continuation): (summed loss of the continuation's tokens in nats, their
    number, whether each was the argmax of its logits). batch_size rows of similar length share a
    forward. Rows longer than block_size + 1 lose context from the left, never continuation tokens
    unless the continuation alone is longer than block_size. exit (a gated model): add_exit's sums, into it."""
    block = model.config.block_size
    seqs = [((c + t)[-(block + 1):], min(len(t), block)) for c, t in rows]
    # longest first: similar lengths share a batch (little padding), and an out-of-memory shows at once
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i][0]))
    left = {}  # rows of each item still unscored, for a bar over items
    for o in owner or []:
        left[o] = left.get(o, 0) + 1
    results = [None] * len(rows)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        L = len(seqs[chunk[0]][0]) - 1
        # right padding is harmless under causal attention: real tokens never see the pad after them
        x = torch.zeros(len(chunk), L, dtype=torch.long)
        y = torch.full((len(chunk), L), -1, dtype=torch.long)  # -1: not scored (context and padding)
        for r, i in enumerate(chunk):
            s, n = seqs[i]
            x[r, :len(s) - 1] = torch.tensor(s[:-1])
            y[r, len(s) - 1 - n:len(s) - 1] = torch.tensor(s[-n:])
        x, y = x.to(device), y.to(device)
        with ctx:
            logits, _ = model(x, y, num_loops=num_loops, every_step=exit is not None)
        add_exit(model, exit, y >= 0)
        logits = logits.float()
        nll = F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-1, reduction="none").view_as(y)
        scored = y >= 0
        hit = (logits.argmax(-1) == y) | ~scored
        for r, (total, n, greedy) in enumerate(zip(nll.sum(1).tolist(), scored.sum(1).tolist(), hit.all(1).tolist())):
            results[chunk[r]] = (total, n, greedy)
            if owner is not None:
                left[owner[chunk[r]]] -= 1
                if bar is not None and not left[owner[chunk[r]]]:
                    bar.update(1)
    return results


def val_paths(data_dir):
    return sorted(glob.glob(os.path.join(data_dir, "*_val_*.bin")))


def val_tokens_of(data_dir, n):
    """The first n + 1 tokens (n targets) of the val shards in data_dir, each shard checked as train.py checks it;
    only the shards those tokens are in are read."""
    paths, parts, have = val_paths(data_dir), [], 0
    if not paths:
        raise ValueError(f"no val shards (*_val_*.bin) in {data_dir}: point --data_dir at a folder of token shards "
                         f"(python prepare_fineweb.py makes them), or leave val out: --tasks=hellaswag,lambada")
    for p in paths:
        parts.append(open_shard(p)[:n + 1 - have])
        have += len(parts[-1])
        if have == n + 1:
            break
    return torch.from_numpy(np.concatenate(parts).astype(np.int64))


def val_documents(data_dir, n, tok, block):
    """A release tokenizer's val rows: the documents of the (GPT-2) val shards in data_dir, decoded and encoded
    again with tok, each cut to block + 1 tokens, until they hold n targets; as Parcae's own val loss, a document
    a row, with no BOS. Rows as score_rows takes them: (the first token, the rest)."""
    gpt2, rows, have = pretrained.GPT2Tokenizer(), [], 0
    for p in val_paths(data_dir):
        shard = open_shard(p)
        starts = [*np.flatnonzero(shard == gpt2.eos), len(shard)]  # every document starts with <|endoftext|>
        for a, b in zip(starts, starts[1:]):
            ids = tok.encode(gpt2.decode(shard[a + 1:b].tolist()))[:block + 1]
            if len(ids) >= 2:
                rows.append((ids[:1], ids[1:n - have + 1]))
                have += len(rows[-1][1])
            if have >= n:
                return rows
    if not rows:
        raise ValueError(f"no val shards (*_val_*.bin) with a document in {data_dir}")
    return rows


def add_exit(model, exit, valid):
    """A gated model's Q-exit sums after a forward with every_step=True: exit["sums"] += CE at each valid token's
    Q-exit step and that step, for each q in exit["qs"] (decode.q_exit_sums)."""
    if exit is not None:
        exit["sums"] = exit.get("sums", 0) + decode.q_exit_sums(*model.last_exit, valid, exit["qs"]).cpu()


@torch.no_grad()
def score_val(model, tokens, num_loops, rows_per_batch, token_bytes, device="cpu", ctx=nullcontext(), bar=None,
              exit=None):
    """Loss in nats per token and bits per byte of tokens (n + 1 of them: n targets) in rows of block_size;
    targets with no bytes (specials, padding) count in the loss but not in bpb, as in train.py. exit: see
    score_rows."""
    block = model.config.block_size
    n_rows = (len(tokens) - 1) // block
    nats = nats_with_bytes = nbytes = count = 0.0
    for start in range(0, n_rows, rows_per_batch):
        r = min(rows_per_batch, n_rows - start)
        buf = tokens[start * block:(start + r) * block + 1].to(device)
        x, y = buf[:-1].view(r, block), buf[1:].view(r, block)
        with ctx:
            logits, _ = model(x, y, num_loops=num_loops, every_step=exit is not None)
        add_exit(model, exit, torch.ones_like(y, dtype=torch.bool))
        nll = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="none").double()
        b = token_bytes[y.flatten()]
        nats, count = nats + nll.sum().item(), count + nll.numel()
        nats_with_bytes, nbytes = nats_with_bytes + nll[b > 0].sum().item(), nbytes + b.sum().item()
        if bar is not None:
            bar.update(r * block)
    return nats / count, nats_with_bytes / (math.log(2) * nbytes) if nbytes else float("nan")


@torch.no_grad()
def val_by_depth(model, val, n_rows, block_size, batch_size, depths, token_bytes, device, ctx=nullcontext(), exit_qs=(),
                 rank=0, world=1, show_bar=False):
    """train.py's evaluation: val loss (nats per token) and bits per byte on the first n_rows rows of block_size of
    val (a token array) at every depth, and the loop state there (RMS of h_T, last step's relative residual): does
    it settle, drift or blow up past the training depth? bpb leaves out targets with no bytes (<|endoftext|>, padded
    ids). This rank takes batches rank, rank + world ...; the sums are over every rank's. A gated model at T_max also
    gives, for each q in exit_qs, the mean CE at each token's Q-exit step and that step, then H(p) and E[t].
    The caller puts the model in eval mode (model.eval(): no depth sampling)."""
    cfg = model.config
    losses, bpbs, states = {}, {}, {}
    exit_sums = torch.zeros(2 * len(exit_qs) + 3, device=device, dtype=torch.float64)
    n = block_size * batch_size
    sum_dtype = torch.float32 if str(device).startswith("mps") else torch.float64  # byte counts pass 2^24 in fp32
    batches = range(rank * batch_size, n_rows, world * batch_size)
    bar = tqdm(total=len(depths) * len(batches), desc="eval", unit="batch", disable=None if show_bar else True)
    for T in depths:  # an eval_only sweep may go deep: a bar on a terminal, with the time left
        total = torch.zeros(4, device=device)  # sums over batches: loss, 1, state rms, residual
        nats_bytes = torch.zeros(2, device=device, dtype=sum_dtype)  # nats of targets with bytes, their bytes
        for b in batches:
            bar.update()
            buf = torch.from_numpy(val[b * block_size:b * block_size + n + 1].astype(np.int64)).to(device)
            y = buf[1:].view(batch_size, block_size)
            with ctx:
                logits, loss = model(buf[:-1].view(batch_size, block_size), y, num_loops=T,
                                     every_step=T == cfg.mean_recurrence)  # a gate's Q-exit table: at T_max only
            total += torch.stack([loss.float(), torch.ones((), device=device), *(t.mean() for t in model.last_state)])
            if cfg.exit_gate and T == cfg.mean_recurrence:  # the gate's distribution over the T_max steps
                (ce, z), valid = model.last_exit, y >= 0
                exit_sums += torch.cat([decode.q_exit_sums(ce, z, valid, exit_qs), torch.stack(
                    [*(exit_summary(ce, z, valid)[-2:] * valid.sum()), valid.sum()]).double()])
            nll = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="none")
            nbytes = token_bytes[y.flatten()]
            nats_bytes += torch.stack([(nll * (nbytes > 0)).sum().to(sum_dtype), nbytes.sum().to(sum_dtype)])
        if world > 1:
            dist.all_reduce(total)
            dist.all_reduce(nats_bytes)
        losses[T] = (total[0] / total[1]).item()
        states[T] = (total[2:] / total[1]).tolist()
        bpbs[T] = (nats_bytes[0] / (math.log(2) * nats_bytes[1])).item() if nats_bytes[1] > 0 else float("nan")
    bar.close()
    if world > 1:
        dist.all_reduce(exit_sums)
    return losses, bpbs, states, (exit_sums[:-1] / exit_sums[-1]).tolist() if cfg.exit_gate else None


def hellaswag_metrics(items, scores):
    """acc (lowest summed loss) and acc_norm (lowest mean loss per token) over the items."""
    acc = acc_norm = 0
    at = 0
    for _, endings, label in items:
        s = scores[at:at + len(endings)]
        at += len(endings)
        acc += min(range(len(s)), key=lambda j: s[j][0]) == label
        acc_norm += min(range(len(s)), key=lambda j: s[j][0] / s[j][1]) == label
    return {"acc": acc / len(items), "acc_norm": acc_norm / len(items)}


def lambada_metrics(items, scores):
    """acc (every target token is the greedy choice) and ppl of the target tokens."""
    nats, count = sum(s[0] for s in scores), sum(s[1] for s in scores)
    return {"acc": sum(s[2] for s in scores) / len(items), "ppl": math.exp(nats / count)}


METRICS = {"hellaswag": hellaswag_metrics, "lambada": lambada_metrics}


def table(results, loops):
    """The score table's lines: one row per task and metric, one 10-wide column per depth."""
    def cell(value, digits):
        text = f"{value:.{digits}f}"
        return f" {text if len(text) <= 10 else f'{value:.3e}':>10}"  # a huge ppl (an untrained model) keeps the width
    lines = [f"{'task':<10} {'metric':<10} {'items':>8}" + "".join(f" {f'T={T}':>10}" for T in loops)]
    for task, r in results.items():
        for metric, by_depth in r["metrics"].items():
            digits = 2 if metric == "ppl" else 4
            lines.append(f"{task:<10} {metric:<10} {r['items']:>8}" + "".join(cell(by_depth[T], digits) for T in loops))
    return lines

# -----------------------------------------------------------------------------
# settings
out_dir = "out"                  # the checkpoint is out_dir/ckpt.pt; eval.json goes there too
init_from = "resume"             # "resume": that checkpoint; or a released model: a short name (python pretrained.py
                                 # --list), a hub repo owner/name[@revision], or a local folder in the release's layout
tasks = "val,hellaswag,lambada"  # comma-separated, from: val, hellaswag, lambada
eval_loops = ()                  # loop depths to evaluate; () = 1, 2, mu/2, mu, 2 mu
data_dir = ""                    # val: its *_val_*.bin shards; "" = the checkpoint's data_dir (a release: data/fineweb10B)
val_tokens = 1_048_576           # val: score the first this many tokens of the val shards
val_batch_size = 4               # val: rows of block_size tokens per forward
eval_data_dir = "data/eval"      # where the task files are (downloaded there when missing)
max_items = 0                    # score only the first max_items items of each task; 0 = all
batch_size = 32                  # rows (HellaSwag: 4 per item) per forward
device = "auto"                  # "auto" (cuda if available, else cpu), "cpu", "cuda", "cuda:1" ...
dtype = "auto"                   # "auto" (bfloat16 autocast on cuda, float32 elsewhere), "float32", "bfloat16", "float16"
eval_state = ""                  # initial loop state h0: "" = the model's own eval_state ("zero" unless trained otherwise),
                                 # "zero", or "random" (drawn at every forward, as the releases do in their own evaluation)
exit_thresholds = (0.5, 0.9)     # a gated model's val (Ouro): the loss at each token's Q-exit step for each q, and its
                                 # mean step, beside each depth (every step is run and read out)
# -----------------------------------------------------------------------------


def main(argv):
    given = {}
    configure(globals(), argv, config_files=False, given=given)  # the run's settings are in its checkpoint
    names = [t.strip() for t in tasks.split(",") if t.strip()]
    for ok, why in ((names, "tasks is empty"),
                    (all(t in TASKS for t in names),
                     f"unknown task in tasks={tasks!r}: choose from {', '.join(TASKS)}"),
                    (max_items >= 0, f"max_items must be >= 0 (0 = all), got {max_items}"),
                    (min(batch_size, val_batch_size, val_tokens) >= 1,
                     "batch_size, val_batch_size and val_tokens must be >= 1"),
                    (all(type(T) is int and T >= 1 for T in eval_loops),
                     f"eval_loops must be integers >= 1, got {eval_loops!r}"),
                    (all(isinstance(q, (int, float)) and 0 <= q <= 1 for q in exit_thresholds),
                     f"exit_thresholds must be probabilities in [0, 1], got {exit_thresholds!r}"),
                    (eval_state in ("", "zero", "random"), f"eval_state must be '', 'zero' or 'random', got {eval_state!r}")):
        if not ok:
            raise ValueError(why)

    dev, device_type, dt = check_device(device, dtype)  # before anything is loaded
    ctx = nullcontext() if dt == "float32" else torch.autocast(device_type, dtype=getattr(torch, dt))
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True

    free = {"eval_state": eval_state} if eval_state else {}  # settings that do not change the weights
    if init_from == "resume":
        source = os.path.join(out_dir, "ckpt.pt")
        ckpt = load_checkpoint(source, text=True)
        model, tok = model_from_checkpoint(ckpt, source, free), pretrained.checkpoint_tokenizer(ckpt)
        val_dir = data_dir or ckpt.get("config", {}).get("data_dir", "data/fineweb10B")
        runs = ckpt.get("runs") or [{}]  # the checkpoint's code: the commit of the run that last trained it
        about = {"checkpoint": source, "iter_num": ckpt.get("iter_num"),
                 "checkpoint_commit": runs[-1].get("commit", "unknown")}
        source, out_path = f"{source} (iter {ckpt.get('iter_num')})", os.path.join(out_dir, "eval.json")
    else:
        model, tok = pretrained.load(init_from, overrides=free)
        val_dir, source, about = data_dir or "data/fineweb10B", init_from, {"release": model.release.record()}
        name = os.path.basename(os.path.normpath(init_from)) if os.path.isdir(init_from) else init_from  # a folder: its name
        out_path = os.path.join(out_dir, f"eval_{re.sub(r'[^A-Za-z0-9_.-]+', '_', name)}.json")
    model.eval()
    model.to(dev)
    mu = model.config.mean_recurrence
    loops = eval_loops or tuple(sorted({1, 2, max(1, mu // 2), mu, 2 * mu}))

    if "val" in names and "tasks" not in given and not val_paths(val_dir):  # asked for by default only: say, go on
        print(f"note: no val shards (*_val_*.bin) in {val_dir}, so no val loss: --data_dir=FOLDER scores them",
              file=sys.stderr)
        names.remove("val")
    data = {}
    for task in names:  # every file is read and checked before the first forward
        shards = pretrained.shards_tokenizer(val_dir) if task == "val" else None
        if task == "val" and shards != tok.spec:  # GPT-2 shards for a release's own tokenizer: documents re-encoded
            if shards != "gpt2":
                raise ValueError(f"the val shards in {val_dir} were made with another tokenizer than the model's "
                                 f"({val_dir}/tokenizer.json): point --data_dir at GPT-2 shards or at the model's")
            if not val_paths(val_dir):
                val_tokens_of(val_dir, 0)  # says what is missing
            data[task] = val_documents(val_dir, val_tokens, tok, model.config.block_size)
            continue
        if task == "val":
            data[task] = val_tokens_of(val_dir, val_tokens)
            pretrained.check_ids([data[task].max().item()], model, f"the val shards in {val_dir}")
            if len(data[task]) <= model.config.block_size:
                raise ValueError(f"the val shards in {val_dir} hold fewer than one row of block_size="
                                 f"{model.config.block_size} tokens + 1")
            continue
        items = read_items(task, task_file(task, eval_data_dir))
        data[task] = items[:max_items] if max_items else items

    results = {}
    for task, items in data.items():
        if task == "val":
            qs = exit_thresholds if model.config.exit_gate else ()  # a gated model: its Q-exit beside each depth
            token_bytes = torch.as_tensor(tok.token_bytes(model.config.vocab_size), device=dev)
            if isinstance(items, list):  # documents, a row each: the summed loss of each, over all bytes
                n = sum(len(cont) for _, cont in items)
                nbytes = sum(token_bytes[torch.tensor(cont, device=dev)].sum().item() for _, cont in items)
            else:
                n = (len(items) - 1) // model.config.block_size * model.config.block_size
            results[task] = {"items": n, "metrics": {"loss": {}, "bpb": {}}}  # items: the tokens scored
            for T in loops:
                exit = {"qs": qs} if qs else None
                with tqdm(total=n, desc=f"val T={T}", unit="tok", unit_scale=True) as bar:
                    if isinstance(items, list):
                        nats = sum(s[0] for s in score_rows(model, items, T, val_batch_size, dev, ctx, exit=exit))
                        loss, bpb = nats / n, nats / (math.log(2) * nbytes)
                        bar.update(n)
                    else:
                        loss, bpb = score_val(model, items, T, val_batch_size, token_bytes, dev, ctx, bar, exit)
                results[task]["metrics"]["loss"][T], results[task]["metrics"]["bpb"][T] = loss, bpb
                for i, q in enumerate(qs):  # CE at each token's Q-exit step, and the mean of that step
                    results[task]["metrics"].setdefault(f"loss@q{q:g}", {})[T] = exit["sums"][2 * i].item() / n
                    results[task]["metrics"].setdefault(f"steps@q{q:g}", {})[T] = exit["sums"][2 * i + 1].item() / n
            continue
        rows, owner = task_rows(task, items, tok)
        pretrained.check_ids([t for c, e in rows for t in c + e], model, f"the {task} items")
        results[task] = {"items": len(items), "metrics": {}}
        for T in loops:
            with tqdm(total=len(items), desc=f"{task} T={T}", unit="item") as bar:
                scores = score_rows(model, rows, T, batch_size, dev, ctx, owner, bar)
            for metric, value in METRICS[task](items, scores).items():
                results[task]["metrics"].setdefault(metric, {})[T] = value

    print(f"{source}, score by loop depth T:")
    print("\n".join(table(results, loops)))
    out = {**about, "eval_loops": list(loops), "val_dir": val_dir if "val" in data else None, "tasks": results,
           "run": run_record(dev)}
    os.makedirs(os.path.dirname(out_path) or ".", exist_ok=True)
    with open(out_path, "w") as f:
        json.dump(out, f, indent=2)
    print(f"wrote {out_path}")


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (ValueError, OSError, RuntimeError) as e:
        raise SystemExit(f"error: {' '.join(str(e).split())}") from None
