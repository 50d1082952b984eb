"""
Pictures of runs, from the records train.py writes (log.jsonl, and eval.json where eval.py wrote one).

    python plot.py out/tiny                                            # -> out/tiny/plot.png
    python plot.py out/tiny out/tiny_naive out/tiny_rdm --out=assets/injections.png
    python plot.py --sweep=out/sweep --out=assets/sweep.png            # the Stability study of sweep.py
    python plot.py --sweep=out/parity --out=assets/parity.png          # its parity study

For runs, one figure of three panels and more where the records hold more: training loss against step;
val loss against step, one line per evaluated depth T (a colour per depth, a line style per run); val
loss against test-time depth T at the last evaluation, with Parcae's law L(T) = L_inf + Z exp(-z T)
fitted and drawn over it; where an --eval_only run wrote eval_only.jsonl, its depth sweep (val loss
against T, a line per eval_only evaluation, the latest solid, with the fit); and where eval.py wrote
an eval.json, its scores against depth, accuracies (0-1) in one panel and losses, bits per byte and
perplexities on a log axis in another. Several runs share the axes, named by their folders. For a
sweep: the final val loss against the learning-rate multiplier per variant (mean and range over seeds;
a run that failed is an x at the top), the largest rho and the largest loop-state RMS logged (log
scale); for a parity sweep, accuracy against test-time depth per variant (mean and range over seeds), on the
long set's last position bucket and on the id set's first. Needs matplotlib (pip install matplotlib); nothing else in nanoloop does.
"""
import sys

from configurator import exit_on_help
exit_on_help(__file__, [a for a in sys.argv[1:] if a.startswith("--")])

import json
import math
import os
import re

from configurator import configure, fit_saturating_exp

# -----------------------------------------------------------------------------
out = ""                          # the PNG to write; "" = plot.png in the first run's folder (or the sweep's)
sweep = ""                        # a sweep.py out_dir: draw its Stability or parity study instead of runs
# -----------------------------------------------------------------------------
STYLES = ["-", "--", "-.", ":"]   # a line style and marker per run (12 before a repeat); by step, a colour per depth
MARKERS = ["o", "s", "^"]
DEPTH_CMAP = "viridis"            # depths in order along it, so neighbouring depths get neighbouring colours


def read_run(run_dir):
    """(train [(iter, loss)], evals [(iter, {T: val loss})], eval.json or None, eval_only [(iter, {T: val loss})])
    of a train.py out_dir; eval_only holds the --eval_only runs' evaluations, from eval_only.jsonl, oldest first."""
    path = os.path.join(run_dir, "log.jsonl")
    if not os.path.isfile(path):
        raise ValueError(f"{run_dir} has no log.jsonl: not a train.py out_dir (or the run wrote no record yet)")
    records = read_jsonl(path)
    train = [(r["iter"], r["loss"]) for r in records if "loss" in r]
    evals = val_records(records)
    scores = None
    if os.path.isfile(os.path.join(run_dir, "eval.json")):
        with open(os.path.join(run_dir, "eval.json")) as f:
            scores = json.load(f)
    path = os.path.join(run_dir, "eval_only.jsonl")
    eval_only = val_records(read_jsonl(path)) if os.path.isfile(path) else []
    return train, evals, scores, eval_only


def val_records(records):
    """[(iter, {T: val loss})] of the evaluations among records (JSON keys are strings: T back to int)."""
    return [(r["iter"], {int(T): v for T, v in r["val"].items()}) for r in records if "val" in r]


def read_jsonl(path):
    """The records of a .jsonl file; a last line without its newline (a run still writing it) is left out."""
    with open(path) as f:
        lines = f.read().split("\n")[:-1]  # the text after the last newline is unfinished or empty
    try:
        return [json.loads(line) for line in lines if line.strip()]
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not JSON lines ({e})") from None


def save(fig, path):
    if os.path.dirname(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=100, metadata={"Software": None})  # no version stamp: the same records, the same file


def finite(v):
    return v is not None and math.isfinite(v)


def is_accuracy(metric):
    """eval.json's metrics in 0-1 (acc, acc_norm), drawn apart from losses, bpb and ppl (about 1 to 1e5)."""
    return metric.startswith("acc")


def draw_fit(ax, Ts, losses, color, name):
    """Parcae's law L(T) = L_inf + Z exp(-z T) fitted to (Ts, losses) and drawn over the depths' range."""
    L_inf, Z, z, _ = fit_saturating_exp(Ts, losses)
    grid = [Ts[0] * (Ts[-1] / Ts[0]) ** (k / 99) for k in range(100)]
    ax.plot(grid, [L_inf + Z * math.exp(-z * T) for T in grid], "-", color=color, alpha=0.6,
            label=f"{name} fit {L_inf:.3f} + {Z:.3g} e^(-{z:.3g} T)")


def plot_runs(run_dirs, path):
    """The figure of the runs in run_dirs, written to path; returns it."""
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    runs = [(os.path.basename(os.path.normpath(d)), read_run(d)) for d in run_dirs]  # a list: names may repeat
    score_keys = sorted({(task, m) for _, (_, _, s, _) in runs if s
                         for task, r in s.get("tasks", {}).items() for m in r["metrics"]})  # eval.json's, a colour each
    panels = ["train", "val", "depth"]  # and only the panels that have records
    panels += ["eval_only"] if any(e for _, (_, _, _, e) in runs) else []
    panels += ["accuracy"] if any(is_accuracy(m) for _, m in score_keys) else []
    panels += ["loss"] if any(not is_accuracy(m) for _, m in score_keys) else []
    cols = min(len(panels), 3)  # rows of three panels: a figure of six stays readable when shrunk
    rows = -(-len(panels) // cols)
    fig, grid = plt.subplots(rows, cols, figsize=(5 * cols, 4.5 * rows), squeeze=False)
    axes = grid.flatten()[:len(panels)]
    for a in grid.flatten()[len(panels):]:
        fig.delaxes(a)
    ax = dict(zip(panels, axes))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    # one colour per depth, the same in every run: a run's line style tells the runs apart
    all_depths = sorted({T for _, (_, evals, _, _) in runs for _, v in evals for T in v})
    cmap = plt.get_cmap(DEPTH_CMAP)
    depth_color = {T: cmap(k / max(1, len(all_depths) - 1) * 0.9) for k, T in enumerate(all_depths)}  # 0.9: no pale yellow
    run_handles = []
    for i, (name, (train, evals, scores, eval_only)) in enumerate(runs):
        c = colors[i % len(colors)]
        if train:
            ax["train"].plot(*zip(*train), color=c, label=name)
        style, marker = STYLES[i % 4], MARKERS[i // 4 % 3]
        for T in sorted({T for _, v in evals for T in v}):
            pts = [(it, v[T]) for it, v in evals if finite(v.get(T))]
            if pts:
                ax["val"].plot(*zip(*pts), style, color=depth_color[T], marker=marker, ms=3, label=f"{name} T={T}")
        run_handles.append(Line2D([], [], linestyle=style, marker=marker, ms=3, color="0.4", label=name))
        if evals:
            it, last = evals[-1]
            Ts = [T for T in sorted(last) if finite(last[T])]
            ax["depth"].plot(Ts, [last[T] for T in Ts], "o", color=c, label=f"{name} (iter {it})")
            if len(Ts) >= 3:
                draw_fit(ax["depth"], Ts, [last[T] for T in Ts], c, name)
        for k, (it, losses) in enumerate(eval_only):  # each --eval_only run's sweep; the latest solid, older ones faint
            latest = k == len(eval_only) - 1
            Ts = [T for T in sorted(losses) if finite(losses[T])]
            ax["eval_only"].plot(Ts, [losses[T] for T in Ts], "o-" if latest else "o--", color=c, alpha=1 if latest else 0.4,
                                 label=f"{name} eval_only {k + 1}/{len(eval_only)} (iter {it})")
            if latest and len(Ts) >= 3:
                draw_fit(ax["eval_only"], Ts, [losses[T] for T in Ts], c, name)
        for task, res in (scores or {}).get("tasks", {}).items():  # a colour per task and metric, a line style per run
            for metric, by_T in res["metrics"].items():
                pts = sorted((int(T), v) for T, v in by_T.items() if finite(v))
                if pts:
                    ax["accuracy" if is_accuracy(metric) else "loss"].plot(
                        *zip(*pts), style, marker="o", color=colors[score_keys.index((task, metric)) % len(colors)],
                        label=f"{name} {task} {metric}")
    for key, title, xlabel, ylabel in (
            ("train", "training loss", "step", "loss (nats/token)"), ("val", "val loss by loop depth T", "step", "val loss"),
            ("depth", "val loss against test-time depth", "loop depth T", "val loss"),
            ("eval_only", "eval_only depth sweep (eval_only.jsonl)", "loop depth T", "val loss"),
            ("accuracy", "eval.json accuracies", "loop depth T", "accuracy"),
            ("loss", "eval.json loss, bpb, ppl (log scale)", "loop depth T", "value")):
        if key in ax:
            ax[key].set(title=title, xlabel=xlabel, ylabel=ylabel)
            if xlabel == "loop depth T":
                ax[key].set_xscale("log", base=2)
    if "loss" in ax:
        ax["loss"].set_yscale("log")  # ppl in the hundreds (an untrained model's in the 1e4s) beside losses of a few nats
    for a in axes:
        if not a.lines:
            a.text(0.5, 0.5, "no records", ha="center", va="center", transform=a.transAxes)
        elif a is ax["val"]:  # the legend by depth (colours), then by run (line styles) where there are several
            by_T = [Line2D([], [], color=depth_color[T], label=f"T={T}") for T in all_depths]
            a.legend(handles=by_T + (run_handles if len(runs) > 1 else []), fontsize=7, ncol=2 if len(all_depths) > 8 else 1)
        else:
            a.legend(fontsize=7)
        a.grid(alpha=0.3)
    fig.tight_layout()
    save(fig, path)
    return fig


SWEEP_RUN = re.compile(r"^(.+)_x([0-9.e+-]+)_s(\d+)$")  # sweep.py's run folders: variant_xMULT_sSEED
PARITY_RUN = re.compile(r"^(.+)_s(\d+)$")  # and its parity study's: variant_sSEED


def read_sweep(sweep_dir):
    """{variant: {mult: [(final val loss or None if failed, max rho, max state RMS) per seed]}}."""
    if not os.path.isdir(sweep_dir):
        raise ValueError(f"{sweep_dir} is not a folder: give the out_dir of a sweep.py run (out/sweep by default)")
    table = {}
    for name in sorted(os.listdir(sweep_dir)):
        m = SWEEP_RUN.match(name)
        run_dir = os.path.join(sweep_dir, name)
        if not m or not os.path.isfile(os.path.join(run_dir, "status.json")):
            continue
        with open(os.path.join(run_dir, "status.json")) as f:
            ok = json.load(f).get("returncode") == 0
        log = os.path.join(run_dir, "log.jsonl")
        records = read_jsonl(log) if os.path.isfile(log) else []
        vals = [r["val"] for r in records if "val" in r and r["iter"] > 0]
        final = vals[-1][min(vals[-1], key=int)] if vals and ok else None  # at mu_rec: the first depth evaluated
        steps = [r for r in records if "loss" in r]
        # the largest value logged; inf if any was not finite (a run that blew up), None if none was logged
        rho, rms = ([r[k] for r in steps if r.get(k) is not None] for k in ("rho", "state_rms"))
        rho, rms = (None if not v else max(v) if all(map(finite, v)) else math.inf for v in (rho, rms))
        table.setdefault(m[1], {}).setdefault(float(m[2]), []).append((final if finite(final) else None, rho, rms))
    if not table:
        raise ValueError(f"{sweep_dir} holds no finished sweep.py runs (folders variant_xM_sS with a status.json)")
    return table


def read_parity(sweep_dir):
    """{variant: [the last task evaluation record of each seed that finished without error]}."""
    runs = {}
    for name in sorted(os.listdir(sweep_dir)):
        m, run_dir = PARITY_RUN.match(name), os.path.join(sweep_dir, name)
        if not m or SWEEP_RUN.match(name) or not os.path.isfile(os.path.join(run_dir, "status.json")):
            continue
        with open(os.path.join(run_dir, "status.json")) as f:
            ok = json.load(f).get("returncode") == 0
        log = os.path.join(run_dir, "log.jsonl")
        evals = [r for r in read_jsonl(log) if "task" in r] if ok and os.path.isfile(log) else []
        if evals:
            runs.setdefault(m[1], []).append(evals[-1])
    return runs


def plot_parity(runs, sweep_dir, path):
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for variant, finals in runs.items():
        for ax, name, which in ((axes[0], "long", -1), (axes[1], "id", 0)):
            depths = sorted({T for f in finals for T in f["task"][name]}, key=int)
            bucket = list(finals[0]["task"][name][depths[0]]["acc"])[which]  # digits 25-31 of the long set, 1-8 of id
            accs = {T: [a for f in finals if (a := f["task"][name].get(T, {}).get("acc", {}).get(bucket)) is not None]
                    for T in depths}  # None: no digit of that bucket in the set
            accs = {T: a for T, a in accs.items() if a}
            mean = [sum(a) / len(a) for a in accs.values()]
            lo, hi = [m - min(a) for a, m in zip(accs.values(), mean)], [max(a) - m for a, m in zip(accs.values(), mean)]
            ax.errorbar([int(T) for T in accs], mean, yerr=[lo, hi], marker="o", capsize=3,
                        label=f"{variant} ({len(finals)} seed{'s' * (len(finals) > 1)})")
            ax.set(title=f"{name} set, digits {bucket} of a segment", xlabel="test-time loop depth T",
                   ylabel="accuracy (mean; bars: lowest to highest seed)")
    chance = 1 / next(iter(runs.values()))[0]["mod"]
    for ax in axes:
        ax.axhline(chance, color="grey", ls=":", label=f"chance {chance:.2f}")
        ax.set_xscale("log", base=2)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"Running parity: accuracy against test-time depth ({sweep_dir})")
    fig.tight_layout()
    save(fig, path)
    return fig


def plot_sweep(sweep_dir, path):
    import matplotlib.pyplot as plt

    if os.path.isdir(sweep_dir) and (runs := read_parity(sweep_dir)):  # sweep.py --study=parity's folder
        return plot_parity(runs, sweep_dir, path)
    table = read_sweep(sweep_dir)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for v, (variant, by_mult) in enumerate(table.items()):
        mults = sorted(by_mult)
        for ax, k in zip(axes, range(3)):
            xs, mean, lo, hi, failed = [], [], [], [], []  # failed: no final loss, or a value past any scale
            for m in mults:
                ys = [r[k] for r in by_mult[m] if finite(r[k])]
                failed += [m] * sum(r[k] is None and k == 0 or r[k] == math.inf for r in by_mult[m])
                if ys:
                    xs.append(m)
                    mean.append(sum(ys) / len(ys))
                    lo.append(mean[-1] - min(ys))
                    hi.append(max(ys) - mean[-1])
            seeds = max(len(by_mult[m]) for m in mults)
            line = ax.errorbar(xs, mean, yerr=[lo, hi], marker="o", capsize=3, label=f"{variant} ({seeds} seeds)")
            if failed:
                ax.plot(failed, [1.0] * len(failed), "x", ms=9, color=line[0].get_color(),
                        transform=ax.get_xaxis_transform(), clip_on=False)
    for ax, title in zip(axes, ("final val loss at mu_rec (x: stopped, or not finite)", "largest rho logged (x: not finite)",
                                "largest state RMS logged (x: not finite)")):
        ax.set(title=title, xlabel="learning-rate multiplier")
        ax.set_xscale("log", base=2)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_ylabel("val loss (nats/token)")
    axes[2].set_yscale("log")
    fig.suptitle(f"Stability sweep: {sweep_dir}")
    fig.tight_layout()
    save(fig, path)
    return fig


def main(argv):
    run_dirs = [a for a in argv if not a.startswith("--")]
    configure(globals(), [a for a in argv if a.startswith("--")], config_files=False)
    if bool(run_dirs) == bool(sweep):
        raise ValueError("give run folders (python plot.py out/tiny ...) or --sweep=FOLDER, one of the two")
    try:
        import matplotlib
    except ImportError:
        raise ValueError("plot.py needs matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")  # no display needed
    path = out or os.path.join(sweep or run_dirs[0], "plot.png")
    fig = plot_sweep(sweep, path) if sweep else plot_runs(run_dirs, path)
    print(f"wrote {path} ({len(fig.axes)} panels)")


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
