"""
Synthetic tasks where loop depth is the point: a data source for train.py (README "What the loop buys").

    python train.py config/parity_parcae.py                 # trains on batches made on the fly
    python train.py config/parity_parcae.py --eval_only=True --eval_loops=1,8,32,128

Running parity over segments. A row is BOS, then segments, each a SEP and a run of digits 0 .. m-1;
the label at every digit is the sum mod m of the digits of its segment so far, this one included
(m = 2: parity). A causal model sees exactly what it needs at each digit, but the answer at position p
of a segment depends on all p digits: an iterative algorithm that carries the sum one digit per step
needs about p steps, so a loop trained on short segments can solve long ones given more test-time
depth, and a fixed-depth model cannot.

Token layout, fixed so that any tool can read a checkpoint:
    0 PAD   1 BOS   2 SEP   3 .. 3+m-1 the digits 0 .. m-1     vocab_size = 3 + m
A digit's label is the digit token of the running sum; every other target is -1 (nothing predicted).

Training rows are made on the fly, global micro-batch g (rank r of world takes g = i * world + r) from
the generator seeded by (seed, 0, g): the data of a run is a function of its seed and its count of
micro-batches, whatever the number of processes, and a resume continues it exactly. They are filled to the end, the last segment
cut there (a single slot left over, too short for SEP and a digit, is PAD). The two evaluation sets are fixed by eval_seed and share no generator with training:
"id" has segments of the training lengths, "long" segments of the long lengths; each of their rows
holds whole segments and ends in PAD. They come from the generators seeded by (eval_seed, 0) and
(eval_seed, 1), which numpy pads to (eval_seed, 0, 0) and (eval_seed, 1, 0): so a run whose seed equals
eval_seed is refused, since its first training batch would be the id set.
"""
import numpy as np
import torch
import torch.distributed as dist

PAD, BOS, SEP, DIGIT0 = 0, 1, 2, 3
TASKS = ("parity",)


def vocab_size(mod):
    return DIGIT0 + mod


def check(task, mod, train_len, long_len, row_len, seed=1337, eval_rows=1, eval_seed=0, vocab=None):
    """A one-line ValueError for settings that cannot make a task; vocab: a vocab_size given (it follows the task)."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}: choose from {list(TASKS)} (or '' for token shards)")
    if type(mod) is not int or mod < 2:
        raise ValueError(f"task_mod must be an integer >= 2 (2 = parity), got {mod!r}")
    for key, lens in (("task_train_len", train_len), ("task_long_len", long_len)):
        if len(lens) != 2 or not all(type(n) is int for n in lens) or not 1 <= lens[0] <= lens[1]:
            raise ValueError(f"{key} must be (shortest, longest) segment lengths, 1 <= shortest <= longest, got {lens!r}")
        if lens[1] + 2 > row_len:  # BOS, SEP, then the digits
            raise ValueError(f"{key}={lens!r}: a segment of {lens[1]} digits needs a row of {lens[1] + 2} tokens "
                             f"(BOS, SEP, digits), block_size is {row_len}: raise block_size or shorten the segments")
    for key, value, low in (("seed", seed, 0), ("task_eval_rows", eval_rows, 1), ("task_eval_seed", eval_seed, 0)):
        if type(value) is not int or value < low:
            raise ValueError(f"{key} must be an integer >= {low} for a task (numpy seeds its generators), got {value!r}")
    if seed == eval_seed:
        raise ValueError(f"seed={seed} is task_eval_seed: the first training batch would be the id eval set; "
                         f"choose another seed or task_eval_seed")
    if vocab is not None and vocab != vocab_size(mod):
        raise ValueError(f"vocab_size follows the task: task_mod={mod} needs {vocab_size(mod)} tokens (PAD, BOS, SEP "
                         f"and {mod} digits), got --vocab_size={vocab}")


def make_rows(rng, n, row_len, lens, mod, pad):
    """(x, y) int64 arrays (n, row_len): segments with lengths uniform in lens = (lo, hi).
    pad=False fills each row to its end (the last segment cut short; one slot left over stays PAD); pad=True
    keeps whole segments and PADs the rest."""
    x = np.full((n, row_len), PAD, dtype=np.int64)
    y = np.full((n, row_len), -1, dtype=np.int64)
    for r in range(n):
        x[r, 0], p = BOS, 1
        while p < row_len - 1:
            length = int(rng.integers(lens[0], lens[1] + 1))
            if pad and p + 1 + length > row_len:
                break
            length = min(length, row_len - p - 1)
            digits = rng.integers(0, mod, length)
            x[r, p] = SEP
            x[r, p + 1:p + 1 + length] = DIGIT0 + digits
            y[r, p + 1:p + 1 + length] = DIGIT0 + np.cumsum(digits) % mod  # the running sum mod m
            p += 1 + length
    return x, y


def train_batch(seed, g, batch_size, row_len, train_len, mod):
    """Global micro-batch g: (x, y) int64 tensors (batch_size, row_len)."""
    rng = np.random.default_rng([seed, 0, g])  # for one process, what (seed, rank 0, batch g) always drew
    x, y = make_rows(rng, batch_size, row_len, train_len, mod, pad=False)
    return torch.from_numpy(x), torch.from_numpy(y)


def eval_sets(eval_seed, rows, row_len, train_len, long_len, mod):
    """{"id": (x, y), "long": (x, y)}: the held-out sets, the same for every run with these settings."""
    sets = {}
    for j, (name, lens) in enumerate((("id", train_len), ("long", long_len))):
        x, y = make_rows(np.random.default_rng([eval_seed, j]), rows, row_len, lens, mod, pad=True)
        sets[name] = (torch.from_numpy(x), torch.from_numpy(y))
    return sets


def buckets(train_len, long_len):
    """Position-in-segment buckets [(lo, hi)]: the lengths seen in training, then past them up to 1.5x, 2x,
    3x, 4x, 6x, 8x ... the longest training length, as far as the longest long length goes
    (8 and 32 give 1-8, 9-12, 13-16, 17-24, 25-32)."""
    hi, top = train_len[1], max(train_len[1], long_len[1])
    out, lo, mults = [(1, hi)], hi + 1, [1.5, 2.0]
    while lo <= top:
        edge = max(lo, min(top, int(hi * mults[len(out) - 1])))
        out.append((lo, edge))
        lo = edge + 1
        mults.append(2 * mults[-2])  # 1.5, 2, 3, 4, 6, 8 ...
    return out


def positions(x):
    """Position of each token in its segment, 1 for the segment's first digit; 0 for BOS, SEP and PAD."""
    is_sep = x == SEP
    seg = is_sep.long().cumsum(1)  # (B, L) segment index of each token
    idx = torch.arange(x.size(1), device=x.device).expand_as(x)
    sep_at = torch.where(is_sep, idx, torch.zeros_like(idx)).cummax(1).values  # index of the last SEP so far
    pos = idx - sep_at
    return torch.where((x >= DIGIT0) & (seg > 0), pos, torch.zeros_like(pos))


def score(x, y, pred, bucket_list):
    """Counts on one batch: per bucket (correct, total) digits, and (correct, total) whole segments, where a
    segment is right only if every one of its digits is. Returns a float64 tensor (len(buckets) + 1, 2)."""
    pos, right, labelled = positions(x), pred == y, y >= 0
    out = torch.zeros(len(bucket_list) + 1, 2, dtype=torch.float64)
    for b, (lo, hi) in enumerate(bucket_list):
        m = labelled & (pos >= lo) & (pos <= hi)
        out[b] = torch.stack([(right & m).sum(), m.sum()]).double()
    seg = (x == SEP).long().cumsum(1) + (x.size(1) + 1) * torch.arange(x.size(0), device=x.device)[:, None]
    wrong = torch.zeros(x.size(0) * (x.size(1) + 1), dtype=torch.long, device=x.device)  # per (row, segment)
    has = torch.zeros_like(wrong)
    wrong.index_add_(0, seg[labelled], (~right[labelled]).long())
    has.index_add_(0, seg[labelled], torch.ones_like(seg[labelled]))
    out[-1] = torch.stack([((has > 0) & (wrong == 0)).sum(), (has > 0).sum()]).double()
    return out


@torch.no_grad()
def evaluate(model, sets, depths, bucket_list, chunk, device, ctx, rank=0, world=1):
    """{set: {T: result}} for each eval set (x, y) at each loop depth T: the loss on the labelled digits, the
    accuracy per digit by position bucket, whole segments right, and the loop
    state (RMS of h_T, last step's relative residual) averaged over rows. This rank takes chunks rank, rank +
    world ...; with world > 1 (torchrun) the sums over ranks make every rank's result the whole set's.
    Accuracies with no digit to count (the id set past the training lengths) are None."""
    out = {name: {} for name in sets}
    for T in depths:
        for name, (x, y) in sets.items():
            counts = torch.zeros(len(bucket_list) + 1, 2, dtype=torch.float64)  # (correct, total): buckets, segments
            sums = torch.zeros(5, dtype=torch.float64)  # nats, labelled digits, state rms, residual, rows
            for b in range(rank * chunk, len(x), world * chunk):
                xb, yb = x[b:b + chunk].to(device), y[b:b + chunk].to(device)
                with ctx:
                    logits, loss = model(xb, yb, num_loops=T)  # loss: the mean over this chunk's labelled digits
                digits = (yb >= 0).sum().item()  # every eval row holds at least one digit
                rms, residual = model.last_state
                sums += torch.tensor([loss.item() * digits, digits, rms.double().sum().item(),
                                      residual.double().sum().item(), len(xb)], dtype=torch.float64)
                counts += score(xb.cpu(), yb.cpu(), logits.argmax(-1).cpu(), bucket_list)
            if world > 1:  # through the device: NCCL reduces only GPU tensors
                both = torch.cat([counts.flatten(), sums]).to(device)
                dist.all_reduce(both)
                both = both.cpu()
                counts, sums = both[:counts.numel()].view_as(counts), both[counts.numel():]
            acc = [c / n if n else None for c, n in counts.tolist()]  # None, not NaN: log.jsonl stays strict JSON
            nats, digits, rms_sum, residual_sum, rows = sums.tolist()
            out[name][T] = {"acc": {f"{lo}-{hi}": a for (lo, hi), a in zip(bucket_list, acc)}, "segment": acc[-1],
                            "loss": nats / digits, "state_rms": rms_sum / rows, "residual": residual_sum / rows}
    return out


def record(results, mod, mu):
    """train.py's log.jsonl record of an evaluation; "val" is the id set's loss, so every tool that reads val losses
    (sweep.py, the fit) reads a task run too."""
    return {"val": {T: r["loss"] for T, r in results["id"].items()},
            "val_state_rms": {T: r["state_rms"] for T, r in results["id"].items()},
            "val_residual": {T: r["residual"] for T, r in results["id"].items()},
            "task": results, "mod": mod, "mu": mu}


def table(results):
    """evaluate()'s results as text: a row per set and depth, a column per bucket ('-' where it holds no digit)."""
    names = list(next(iter(next(iter(results.values())).values()))["acc"])  # the bucket labels, "1-8" ...
    rows = [f"  {'set':<5} {'T':>4} " + " ".join(f"{n:>6}" for n in names) + "  segment    loss  state rms  residual"]
    for name, by_T in results.items():
        for T, r in by_T.items():
            accs = " ".join(f"{a:6.3f}" if a is not None else f"{'-':>6}" for a in r["acc"].values())
            rows.append(f"  {name:<5} {T:>4} {accs}  {r['segment']:7.3f}  {r['loss']:6.4f}  {r['state_rms']:9.3g}  "
                        f"{r['residual']:8.3g}")
    return "\n".join(rows)
