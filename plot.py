"""
Pictures of runs, from the records train.py writes (log.jsonl, and eval.json where eval.py wrote one).

    python plot.py out/tiny                                            # -> out/tiny/plot.png
    python plot.py out/tiny out/tiny_naive out/tiny_rdm --out=assets/injections.png
    python plot.py --sweep=out/sweep --out=assets/sweep.png            # the Stability study of sweep.py

For runs, one figure of three panels (four with an eval.json): training loss against step; val loss
against step, one line per evaluated depth; val loss against test-time depth T at the last evaluation,
with Parcae's law L(T) = L_inf + Z exp(-z T) fitted and drawn over it; and each eval.json score against
depth. Several runs share the axes, named by their folders. For a sweep: the final val loss against the
learning-rate multiplier per variant (mean and range over seeds; a run that failed is an x at the top),
the largest rho and the largest loop-state RMS logged (log scale). Needs matplotlib (pip install
matplotlib); nothing else in nanoloop does.
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
sweep = ""                        # a sweep.py out_dir: draw its Stability study instead of runs
# -----------------------------------------------------------------------------
STYLES = ["-", "--", "-.", ":"]   # line and marker per evaluated depth (12 before a repeat); one color per run
MARKERS = ["o", "s", "^"]


def read_run(run_dir):
    """(train [(iter, loss)], evals [(iter, {T: val loss})], eval.json or None) of a train.py out_dir."""
    path = os.path.join(run_dir, "log.jsonl")
    if not os.path.isfile(path):
        raise ValueError(f"{run_dir} has no log.jsonl: not a train.py out_dir (or the run wrote no record yet)")
    records = read_jsonl(path)
    train = [(r["iter"], r["loss"]) for r in records if "loss" in r]
    evals = [(r["iter"], {int(T): v for T, v in r["val"].items()}) for r in records if "val" in r]
    scores = None
    if os.path.isfile(os.path.join(run_dir, "eval.json")):
        with open(os.path.join(run_dir, "eval.json")) as f:
            scores = json.load(f)
    return train, evals, scores


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


def plot_runs(run_dirs, path):
    """The figure of the runs in run_dirs, written to path; returns it."""
    import matplotlib.pyplot as plt

    runs = [(os.path.basename(os.path.normpath(d)), read_run(d)) for d in run_dirs]  # a list: names may repeat
    with_scores = any(s is not None for _, (_, _, s) in runs)
    fig, axes = plt.subplots(1, 4 if with_scores else 3, figsize=(20 if with_scores else 15, 4.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    ax_train, ax_val, ax_depth = axes[:3]
    for i, (name, (train, evals, scores)) in enumerate(runs):
        c = colors[i % len(colors)]
        if train:
            ax_train.plot(*zip(*train), color=c, label=name)
        depths = sorted({T for _, v in evals for T in v})
        for j, T in enumerate(depths):
            pts = [(it, v[T]) for it, v in evals if finite(v.get(T))]
            if pts:
                ax_val.plot(*zip(*pts), STYLES[j % 4], color=c, marker=MARKERS[j // 4 % 3], ms=3, label=f"{name} T={T}")
        if evals:
            it, last = evals[-1]
            Ts = [T for T in sorted(last) if finite(last[T])]
            ax_depth.plot(Ts, [last[T] for T in Ts], "o", color=c, label=f"{name} (iter {it})")
            if len(Ts) >= 3:
                L_inf, Z, z, _ = fit_saturating_exp(Ts, [last[T] for T in Ts])
                grid = [Ts[0] * (Ts[-1] / Ts[0]) ** (k / 99) for k in range(100)]
                ax_depth.plot(grid, [L_inf + Z * math.exp(-z * T) for T in grid], "-", color=c, alpha=0.6,
                              label=f"{name} fit {L_inf:.3f} + {Z:.3g} e^(-{z:.3g} T)")
        if scores is not None:
            for task, res in scores.get("tasks", {}).items():
                for metric, by_T in res["metrics"].items():
                    Ts = sorted(by_T, key=int)
                    axes[3].plot([int(T) for T in Ts], [by_T[T] for T in Ts], "o-", color=c, label=f"{name} {task} {metric}")
    for ax, title, ylabel in ((ax_train, "training loss", "loss (nats/token)"), (ax_val, "val loss by loop depth T", "val loss"),
                              (ax_depth, "val loss against test-time depth", "val loss")):
        ax.set_title(title)
        ax.set_ylabel(ylabel)
        ax.set_xlabel("step" if ax is not ax_depth else "loop depth T")
    ax_depth.set_xscale("log", base=2)
    if with_scores:
        axes[3].set(title="eval.json scores", xlabel="loop depth T", ylabel="score", xscale="log")
        axes[3].set_xscale("log", base=2)
    for ax in axes:
        if ax.lines:
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "no records", ha="center", va="center", transform=ax.transAxes)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    save(fig, path)
    return fig


SWEEP_RUN = re.compile(r"^(.+)_x([0-9.e+-]+)_s(\d+)$")  # sweep.py's run folders: variant_xMULT_sSEED


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


def plot_sweep(sweep_dir, path):
    import matplotlib.pyplot as plt

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
