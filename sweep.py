"""
Two studies, each many train.py runs and then tables of mean and spread over seeds.

The stability study (studies/stability.md): naive, RDM and Parcae loops and the fixed-depth baseline with
the same blocks, each trained at several learning-rate multipliers, then one table of what happened.

    python prepare_fineweb.py --sample                 # data/sample, the default data_dir (offline, seconds)
    python sweep.py                                    # all runs (finished ones are reused), then the table
    python sweep.py --seeds=1337,1,2 --parallel=2      # three seeds, two runs at a time, one thread each
    python sweep.py --data_dir=data/fineweb10B --out_dir=out/sweep_fineweb   # after prepare_fineweb.py --num_chunks 1
    python sweep.py --summary_only=True                # just the table, from the logs in out_dir and data_dir
A run records its data_dir; a table or a reuse of runs trained on another one is refused. README's table
was made on GPT-2 shards of the Linux kernel documentation, --data_dir=data/linuxdoc.

The parity study (README "What the loop buys"): config/parity_*.py, each with every seed, then accuracy
against test-time depth per variant and position bucket on the long set.

    python sweep.py --study=parity --seeds=1337,1,2 --parallel=2
    python sweep.py --study=parity --task_args="--task_train_len=1,16" --out_dir=out/parity16

Every run is `python train.py` with the shape below and one multiplier m: muon_lr = m * 0.02 and
adam_lr = m * 8e-3 (train.py's defaults). Per run the table gives the final val loss at mu_rec and
2 mu_rec, the largest rho and loop-state RMS logged, the non-finite steps skipped, the loss spikes, and
whether it failed: it stopped on non-finite steps (diverged), or its final val loss is not finite or
worse than a unigram model of the same data (the token frequencies of the train shards, on the val prefix).
Spikes: every run reads the same batches in the same order, and one batch's loss moves by several nats
with the document it comes from. So a step's excess is its loss minus the median loss of all runs on
that batch, and a spike is a step whose excess is more than 1 nat above its median over the (up to)
10 steps before it (at least 5).
"""
import json
import math
import os
import subprocess
import sys
import time

import numpy as np

from configurator import configure, exit_on_help

# -----------------------------------------------------------------------------
study = "stability"                # "stability" (lr multipliers) or "parity" (the parity configs)
out_dir = ""                        # one folder per run: log.jsonl, train.log, status.json; "" = out/sweep or out/parity
data_dir = "data/sample"            # stability: GPT-2 token shards (*_train_*.bin, *_val_*.bin); parity: unused
variants = ""                       # which of the study's variants to run (comma-separated); "" = all of them
seeds = (1337,)                     # train.py's seed: every run once per seed
task_args = ""                      # parity: more train.py --key=value args for every run (a harder task ...)
multipliers = (0.5, 1.0, 2.0, 4.0, 8.0)  # stability: learning-rate multipliers around train.py's defaults
max_iters = 100                     # stability: optimizer steps per run (parity: the configs' own)
parallel = 1                        # runs at a time (each with one OpenMP thread)
summary_only = False                # only print the table of the runs already in out_dir
# -----------------------------------------------------------------------------
SHAPE = ["--n_embd=128", "--n_head=4", "--n_kv_head=2", "--n_prelude=1", "--n_core=1", "--n_coda=1",
         "--mean_recurrence=4", "--backprop_depth=2", "--block_size=128", "--batch_size=8", "--total_batch_size=1024",
         "--val_tokens=8192", "--log_interval=1", "--device=cpu", "--compile=False"]
VARIANTS = {  # the injection and its paper's depth sampler; the baseline is the same blocks run once
    "gpt": ["--injection=add", "--prelude_norm=False", "--mean_recurrence=1", "--backprop_depth=1",
            "--depth_sampling=fixed", "--state_init=zero", "--eval_loops=1"],
    "naive": ["--injection=add", "--prelude_norm=False", "--depth_sampling=sequence", "--eval_loops=4,8"],
    "rdm": ["--injection=concat", "--prelude_norm=False", "--depth_sampling=batch", "--eval_loops=4,8"],
    "parcae": ["--injection=diagonal", "--prelude_norm=True", "--depth_sampling=sequence", "--eval_loops=4,8"],
}
PARITY = {  # the configs of README "What the loop buys"; RDM also at a quarter of the learning rate
    "gpt": ["config/parity_gpt.py"], "gpt_deep": ["config/parity_gpt_deep.py"], "naive": ["config/parity_naive.py"],
    "rdm": ["config/parity_rdm.py"], "rdm_lr0.25": ["config/parity_rdm.py", "--muon_lr=0.005", "--adam_lr=0.002"],
    "parcae": ["config/parity_parcae.py"], "ouro": ["config/parity_ouro.py"],
}
MUON_LR, ADAM_LR = 0.02, 8e-3
SPIKE_NATS, SPIKE_WINDOW, SPIKE_MIN = 1.0, 10, 5


def unigram_loss(data_dir, val_tokens):
    """Cross-entropy (nats) of the train shards' token frequencies (add-one smoothed) on the val prefix.
    A data_dir it cannot use is a ValueError naming it: the stability study needs it before any run."""
    from prepare_fineweb import open_shard
    if not os.path.isdir(data_dir):
        raise ValueError(f"data_dir {data_dir} does not exist: make it with python prepare_fineweb.py --sample "
                         f"(data/sample), or point --data_dir at a folder of GPT-2 token shards")
    shards = lambda split: sorted(p for p in os.listdir(data_dir) if f"_{split}_" in p and p.endswith(".bin"))
    for split in ("train", "val"):
        if not shards(split):
            raise ValueError(f"no {split} shards (*_{split}_*.bin) in {data_dir}: run prepare_fineweb.py first")
    counts = sum(np.bincount(open_shard(os.path.join(data_dir, p)), minlength=2**16) for p in shards("train"))
    val = np.concatenate([open_shard(os.path.join(data_dir, p)) for p in shards("val")])[1:val_tokens + 1]
    logp = np.log((counts + 1) / (counts.sum() + len(counts)))
    return float(-logp[val].mean())


def read_records(run_dir):
    """The records of a run's log.jsonl; none if it died before writing one (its train.log says why)."""
    path = os.path.join(run_dir, "log.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f]


def train_losses(run_dir):
    return [r["loss"] for r in read_records(run_dir) if "loss" in r]


def reference_losses(run_dirs):
    """Per step, the median train loss of the runs that reached it: what the batch itself costs."""
    runs = [train_losses(d) for d in run_dirs]
    return [float(np.median([r[i] for r in runs if len(r) > i])) for i in range(max(map(len, runs), default=0))]


def summarize(run_dir, unigram, reference):
    """One table row from a run's log.jsonl, train.log and status.json; reference from reference_losses."""
    log = read_records(run_dir)
    with open(os.path.join(run_dir, "train.log")) as f:
        skipped = sum("step skipped" in line for line in f)
    with open(os.path.join(run_dir, "status.json")) as f:
        status = json.load(f)
    steps = [r for r in log if "loss" in r]
    vals = [r["val"] for r in log if "val" in r and r["iter"] > 0]
    final = vals[-1] if vals and status["returncode"] == 0 else {}
    excess = [r["loss"] - ref for r, ref in zip(steps, reference)]  # the batch's own difficulty taken out
    spikes = sum(excess[i] > np.median(excess[max(0, i - SPIKE_WINDOW):i]) + SPIKE_NATS
                 for i in range(SPIKE_MIN, len(excess)))
    depths = sorted(final, key=int)
    at_mu = final[depths[0]] if depths else float("nan")
    failed = status["returncode"] != 0 or not math.isfinite(at_mu) or at_mu > unigram  # diverged, or never learned
    return {"val_mu": at_mu, "val_2mu": final[depths[1]] if len(depths) > 1 else None,
            "max_rho": max((r["rho"] for r in steps if "rho" in r), default=float("nan")),  # none: no loop
            "max_state_rms": max((r["state_rms"] for r in steps), default=float("nan")),
            "skipped": skipped, "spikes": spikes, "steps": len(steps), "failed": failed}


def finished(run_dir):
    """A run is finished once sweep.py has written its status.json (exit code and time)."""
    return os.path.exists(os.path.join(run_dir, "status.json"))


def run_name(name, mult, seed):
    return f"{name}_s{seed}" if study == "parity" else f"{name}_x{mult:g}_s{seed}"


def start(name, mult, seed):
    run_dir = os.path.join(out_dir, run_name(name, mult, seed))
    if finished(run_dir):
        return None  # finished earlier: reuse it
    os.makedirs(run_dir, exist_ok=True)
    for old in ("log.jsonl", "ckpt.pt"):  # a half-finished earlier attempt starts over
        if os.path.exists(os.path.join(run_dir, old)):
            os.remove(os.path.join(run_dir, old))
    if study == "parity":
        cmd = [sys.executable, "train.py", *PARITY[name], *task_args.split(), f"--out_dir={run_dir}", f"--seed={seed}",
               "--device=cpu", "--compile=False"]
    else:
        cmd = [sys.executable, "train.py", *SHAPE, *VARIANTS[name], f"--data_dir={data_dir}", f"--out_dir={run_dir}",
               f"--max_iters={max_iters}", f"--eval_interval={max_iters}", f"--seed={seed}",
               f"--muon_lr={MUON_LR * mult}", f"--adam_lr={ADAM_LR * mult}"]
    out = open(os.path.join(run_dir, "train.log"), "w")
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=dict(os.environ, OMP_NUM_THREADS="1"),
                            cwd=os.path.dirname(os.path.abspath(__file__)))
    return proc, out, run_dir, time.time()


def finish(proc, out, run_dir, t0):
    out.close()
    status = {"returncode": proc.returncode, "seconds": round(time.time() - t0, 1)}
    with open(os.path.join(run_dir, "status.json"), "w") as f:
        json.dump({**status, "task_args": task_args} if study == "parity" else {**status, "data_dir": data_dir}, f)
    print(f"{run_dir}: exit {proc.returncode} after {time.time() - t0:.0f} s", flush=True)


def check_trained_on(runs):
    """Finished runs in out_dir made with another data_dir (stability) or other task_args (parity) than this
    sweep's are an error: a table would mix them with new ones, or judge them by another unigram. (Runs
    that record neither are taken as they are.)"""
    key, ours = ("task_args", task_args) if study == "parity" else ("data_dir", data_dir)
    same = (lambda a, b: a.split() == b.split()) if study == "parity" else \
        (lambda a, b: os.path.normpath(a) == os.path.normpath(b))
    for run in runs:
        path = os.path.join(out_dir, run_name(*run), "status.json")
        if os.path.exists(path):
            with open(path) as f:
                theirs = json.load(f).get(key)
            if theirs is not None and not same(theirs, ours):
                shown = (theirs, ours) if key == "data_dir" else (repr(theirs), repr(ours))
                raise ValueError(f"{os.path.dirname(path)} was {'trained on' if key == 'data_dir' else 'made with'} "
                                 f"{key} {shown[0]}, not {shown[1]}: pass --{key}={shown[0]}, or another --out_dir")


def fmt(x, spec):
    return "-" if x is None else ("nan" if isinstance(x, float) and not math.isfinite(x) else format(x, spec))


def mean_sd(xs, spec=".3f"):
    """'mean ± sd' over seeds (sample sd); one value alone; '-' for none; nan-aware."""
    xs = [x for x in xs if x is not None and x == x]  # a NaN (an empty bucket in older logs) is no value
    if not xs:
        return "-"
    if len(xs) == 1:
        return fmt(xs[0], spec)
    return f"{fmt(float(np.mean(xs)), spec)} ± {fmt(float(np.std(xs, ddof=1)), spec)}"


def parity_final(run_dir):
    """The last task evaluation record of a parity run's log.jsonl, or None."""
    evals = [r for r in read_records(run_dir) if "task" in r]
    return evals[-1] if evals else None


def parity_tables(names):
    """Markdown tables of the parity runs in out_dir: the summary, then per variant every bucket by depth."""
    runs = {n: [os.path.join(out_dir, run_name(n, 1, s)) for s in seeds] for n in names}
    runs = {n: [d for d in ds if finished(d)] for n, ds in runs.items()}
    out = []
    info = {}
    for n, ds in runs.items():
        finals, secs, steps = [], [], []
        for d in ds:
            with open(os.path.join(d, "status.json")) as f:
                st = json.load(f)
            rec = parity_final(d)
            if st["returncode"] != 0 or rec is None:  # counted in 'seeds ok' as one not ok
                continue
            finals.append(rec)
            secs.append(st["seconds"])
            steps.append(rec["iter"])
        info[n] = (finals, secs, steps, len(ds))
    every = [f for finals, *_ in info.values() for f in finals]  # runs may differ in eval_loops: take them all
    if not every:
        return "no finished parity runs in " + out_dir
    depths = sorted({T for f in every for T in f["task"]["long"]}, key=int)
    buckets = list(dict.fromkeys(b for f in every for r in f["task"]["long"].values() for b in r["acc"]))
    last = buckets[-1]
    head = ["variant", "seeds ok", "steps", "min/run", f"id {buckets[0]} at T=mu"] + [f"T={T}" for T in depths]
    out.append(f"Accuracy on the long set's digits at positions {last} by test-time depth T (chance "
               f"{1 / every[0]['mod']:.3f}), mean ± sd over seeds; 'id {buckets[0]}': the training lengths at the training depth")
    out.append("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for n, (finals, secs, steps, total) in info.items():
        if not finals:
            out.append(f"| {n} | 0/{total} | " + " | ".join(["-"] * (len(head) - 2)) + " |")
            continue
        at_mu = [f["task"]["id"].get(str(f["mu"])) for f in finals]  # None where mu was not evaluated
        row = [n, f"{len(finals)}/{total}", mean_sd(steps, ".0f"), mean_sd([s / 60 for s in secs], ".1f"),
               mean_sd([r["acc"][buckets[0]] if r else None for r in at_mu])]
        row += [mean_sd([f["task"]["long"].get(T, {}).get("acc", {}).get(last) for f in finals]) for T in depths]
        out.append("| " + " | ".join(row) + " |")
    for n, (finals, *_rest) in info.items():
        if not finals:
            continue
        out.append(f"\n{n}: accuracy by position bucket, whole segments, loop state; mean ± sd over {len(finals)} seed(s)")
        head = ["set", "T"] + buckets + ["segment", "state rms", "residual"]
        out.append("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
        for name in ("id", "long"):
            for T in depths:
                rs = [f["task"][name][T] for f in finals if T in f["task"][name]]
                if not rs:
                    continue
                accs = [mean_sd([r["acc"].get(b) for r in rs]) for b in buckets]
                out.append("| " + " | ".join([name, T, *accs, mean_sd([r["segment"] for r in rs]),
                                              mean_sd([r["state_rms"] for r in rs], ".3g"),
                                              mean_sd([r["residual"] for r in rs], ".2g")]) + " |")
    return "\n".join(out)


def stability_table(names, mults, unigram):
    """The Stability table of the runs in out_dir: per variant and multiplier, mean ± sd over the seeds that
    finished; max rho and state RMS over seeds, skipped steps summed, failures counted per seed."""
    out = [f"\n{data_dir}, {max_iters} steps of 1,024 tokens, seeds {list(seeds)}; unigram loss of the val prefix "
           f"{unigram:.3f} nats; mean ± sd over seeds"]
    head = ["variant", "lr x", "val T=mu", "val T=2mu", "max rho", "max state rms", "skipped", "spikes", "failed"]
    done = [os.path.join(out_dir, run_name(n, m, s)) for n in names for m in mults for s in seeds]
    reference = reference_losses([d for d in done if finished(d)])
    out.append("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for name in names:
        for mult in mults:
            dirs = [os.path.join(out_dir, run_name(name, mult, s)) for s in seeds]
            rs = [summarize(d, unigram, reference) for d in dirs if finished(d)]
            if not rs:
                out.append(f"| {name} | {mult:g} | not run |" + " |" * 6)
                continue
            ok = [r for r in rs if math.isfinite(r["val_mu"])]  # a diverged run has no final loss to average
            row = [name, f"{mult:g}", mean_sd([r["val_mu"] for r in ok], ".4f"), mean_sd([r["val_2mu"] for r in ok], ".4f"),
                   fmt(max(r["max_rho"] for r in rs), ".3f") if name != "gpt" else "-",
                   fmt(max(r["max_state_rms"] for r in rs), ".3g"), str(sum(r["skipped"] for r in rs)),
                   mean_sd([r["spikes"] for r in rs], ".1f"), f"{sum(r['failed'] for r in rs)}/{len(rs)}"]
            out.append("| " + " | ".join(row) + " |")
    return "\n".join(out)


if __name__ == "__main__":
    exit_on_help(__file__, sys.argv[1:])
    try:
        configure(globals(), sys.argv[1:])
        if study not in ("stability", "parity"):
            raise ValueError(f"study must be 'stability' or 'parity', got {study!r}")
        known = PARITY if study == "parity" else VARIANTS
        names = variants.split(",") if variants else list(known)
        if unknown := [n for n in names if n not in known]:
            raise ValueError(f"unknown variant(s) {unknown} for study={study}: choose from {list(known)}")
        if not seeds or not all(type(s) is int for s in seeds):
            raise ValueError(f"seeds must be integers, e.g. --seeds=1337,1,2, got {seeds!r}")
        out_dir = out_dir or ("out/parity" if study == "parity" else "out/sweep")
        mults = (1.0,) if study == "parity" else multipliers
        runs = [(n, m, s) for s in seeds for n in names for m in mults]  # seed by seed: a partial sweep gives whole tables
        if study != "parity":  # the parity runs make their data on the fly: no data_dir
            unigram = unigram_loss(data_dir, 8192)  # checks data_dir before any run starts, --summary_only too
        check_trained_on(runs)
    except (ValueError, OSError) as e:
        raise SystemExit(f"error: {e}") from None
    if not summary_only:
        t_start, todo, running = time.time(), list(runs), []
        while todo or running:
            while todo and len(running) < parallel:
                job = start(*todo.pop(0))
                if job:
                    running.append(job)
            time.sleep(1)
            for job in [j for j in running if j[0].poll() is not None]:
                running.remove(job)
                finish(*job)
        print(f"sweep took {(time.time() - t_start) / 60:.1f} min")
    if study == "parity":
        print(parity_tables(names))
        sys.exit(0)
    print(stability_table(names, mults, unigram))
