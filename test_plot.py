"""Tests of plot.py (CPU; needs matplotlib, which .ci/run installs).   python -m pytest -q test_plot.py"""
import json
import os
import shutil
import struct
import subprocess
import sys

import pytest

from test_train import ENV, ROOT, TINY, data, train  # noqa: F401  (data: the sample shards fixture)

matplotlib = pytest.importorskip("matplotlib", reason="plot.py needs matplotlib: pip install matplotlib")
matplotlib.use("Agg")
import plot  # noqa: E402


def png_size(path):
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", head[16:24])  # IHDR: width, height


@pytest.fixture(scope="module")
def run(tmp_path_factory, data):  # noqa: F811
    out = str(tmp_path_factory.mktemp("run"))
    train(*TINY, f"--data_dir={data}", f"--out_dir={out}", "--max_iters=4", "--eval_interval=2", "--eval_loops=1,2,4")
    return out


def panel(fig, words):
    """The one axes of fig whose title holds words."""
    (ax,) = [ax for ax in fig.axes if words in ax.get_title()]
    return ax


def test_a_real_runs_figure(tmp_path, run):
    path = str(tmp_path / "a.png")
    fig = plot.plot_runs([run, run], path)
    assert len(fig.axes) == 3 and png_size(path) == (1500, 450)
    val = fig.axes[1]
    assert len(val.lines) == 2 * 3  # two runs x three depths
    depth = fig.axes[2]
    assert [tuple(line.get_xdata()) for line in depth.lines][0] == (1, 2, 4)  # points at the evaluated depths
    assert any("fit" in t.get_text() for t in depth.get_legend().get_texts())
    # with an eval.json: its accuracies in one panel, its perplexity (and losses) in another, on a log axis
    tasks = {"lambada": {"items": 5, "metrics": {"acc": {"1": 0.1, "2": 0.2, "4": 0.25},
                                                 "ppl": {"1": 180.0, "2": 150.0, "4": 140.0}}},
             "hellaswag": {"items": 5, "metrics": {"acc": {"1": 0.2, "2": 0.4, "4": 0.4},
                                                   "acc_norm": {"1": 0.2, "2": 0.2, "4": 0.6}}}}
    with open(os.path.join(run, "eval.json"), "w") as f:
        json.dump({"tasks": tasks}, f)
    fig = plot.plot_runs([run], path)
    os.remove(os.path.join(run, "eval.json"))
    assert len(fig.axes) == 5 and png_size(path) == (1500, 900)  # rows of three
    acc, ppl = panel(fig, "accuracies"), panel(fig, "ppl")
    drawn = {ax: {line.get_label().split(" ", 1)[1]: tuple(line.get_ydata()) for line in ax.lines} for ax in (acc, ppl)}
    want = {f"{task} {m}": tuple(by_T.values()) for task, r in tasks.items() for m, by_T in r["metrics"].items()}
    assert {**drawn[acc], **drawn[ppl]} == want  # every score drawn once, ...
    assert set(drawn[ppl]) == {"lambada ppl"} and ppl.get_yscale() == "log"  # ... the perplexity apart from the accuracies
    assert acc.get_yscale() == "linear" and max(max(y) for y in drawn[acc].values()) <= 1


def test_depths_get_their_own_colours(tmp_path, run):
    fig = plot.plot_runs([run, run], str(tmp_path / "a.png"))
    val = fig.axes[1]
    colour = {}  # depth -> the colour of its lines, in both runs
    for line in val.lines:
        colour.setdefault(line.get_label().split("T=")[1], set()).add(matplotlib.colors.to_hex(line.get_color()))
    assert sorted(colour, key=int) == ["1", "2", "4"] and all(len(c) == 1 for c in colour.values())
    assert len(set.union(*colour.values())) == 3  # a colour per depth, not per run
    assert len({line.get_linestyle() for line in val.lines}) == 2  # the two runs: a line style each
    legend = [t.get_text() for t in val.get_legend().get_texts()]
    assert legend[:3] == ["T=1", "T=2", "T=4"]


def test_the_eval_only_sweep_gets_a_panel(tmp_path, run):
    out = str(tmp_path / "run")
    shutil.copytree(run, out)  # eval_only.jsonl goes beside this copy, not into the shared run
    train(f"--out_dir={out}", "--eval_only=True", "--eval_loops=1,8")
    train(f"--out_dir={out}", "--eval_only=True", "--eval_loops=1,2,3,6,12")
    sweeps = [r for r in plot.read_jsonl(os.path.join(out, "eval_only.jsonl")) if "val" in r]
    assert len(sweeps) == 2
    path = str(tmp_path / "e.png")
    fig = plot.plot_runs([out], path)
    assert len(fig.axes) == 4 and png_size(path) == (1500, 900)
    ax = panel(fig, "eval_only")
    lines = [line for line in ax.lines if "fit" not in line.get_label()]
    assert [tuple(line.get_xdata()) for line in lines] == [tuple(int(T) for T in r["val"]) for r in sweeps]
    assert [tuple(line.get_ydata()) for line in lines] == [tuple(r["val"].values()) for r in sweeps]
    assert [line.get_linestyle() for line in lines] == ["--", "-"]  # the latest sweep solid
    fits = [line for line in ax.lines if "fit" in line.get_label()]
    assert len(fits) == 1 and (fits[0].get_xdata()[0], fits[0].get_xdata()[-1]) == pytest.approx((1, 12))
    # log.jsonl's evaluations stay in their own panels: training's depths only
    assert sorted(int(line.get_label().split("T=")[1]) for line in fig.axes[1].lines) == [1, 2, 4]


def test_the_same_records_give_the_same_file(tmp_path, run):
    a, b = str(tmp_path / "a.png"), str(tmp_path / "b.png")
    plot.plot_runs([run], a)
    plot.plot_runs([run], b)
    assert open(a, "rb").read() == open(b, "rb").read()


def test_a_run_without_evaluations(tmp_path):
    with open(tmp_path / "log.jsonl", "w") as f:
        f.write(json.dumps({"iter": 0, "run": {"commit": "x"}}) + "\n")
        for i in range(1, 4):
            f.write(json.dumps({"iter": i, "loss": 5.0 - i}) + "\n")
    fig = plot.plot_runs([str(tmp_path)], str(tmp_path / "p.png"))
    assert len(fig.axes) == 3 and len(fig.axes[0].lines) == 1 and not fig.axes[1].lines
    assert "no records" in [t.get_text() for t in fig.axes[1].texts]


def fake_sweep(root):
    for variant, mult, seed, val, rho, ok in [("parcae", 1, 1, 6.5, 0.5, True), ("parcae", 1, 2, 6.7, 0.6, True),
                                              ("parcae", 2, 1, 6.4, 0.55, True), ("rdm", 1, 1, 7.0, 1.2, True),
                                              ("rdm", 2, 1, float("nan"), 3.0, False), ("naive", 8, 1, 9.0, 1.0, True), ("gpt", 1, 1, 6.6, None, True)]:
        d = root / f"{variant}_x{mult:g}_s{seed}"
        d.mkdir()
        (d / "status.json").write_text(json.dumps({"returncode": 0 if ok else 1}))
        with open(d / "log.jsonl", "w") as f:
            rms = float("inf") if variant == "naive" else 10 * (rho or 0.1)  # naive: a state that blew up
            step = {"iter": 1, "loss": 7.0, "rho": rho, "state_rms": rms}
            if variant == "gpt":  # the fixed-depth baseline logs no rho
                del step["rho"]
            f.write(json.dumps(step) + "\n")
            f.write(json.dumps({"iter": 1, "val": {"16": val + 0.1, "4": val}}) + "\n")  # mu_rec: the smallest depth
            f.write('{"iter": 2, "loss": 6.')  # a line still being written is left out


def test_the_sweep_figure(tmp_path):
    fake_sweep(tmp_path)
    table = plot.read_sweep(str(tmp_path))
    assert table["parcae"][1.0] == [(6.5, 0.5, 5.0), (6.7, 0.6, 6.0)] and table["rdm"][2.0] == [(None, 3.0, 30.0)]
    assert table["naive"][8.0] == [(9.0, 1.0, float("inf"))] and table["gpt"][1.0][0][1] is None
    path = str(tmp_path / "s.png")
    fig = plot.plot_sweep(str(tmp_path), path)
    assert len(fig.axes) == 3 and png_size(path) == (1500, 450)
    assert fig.axes[2].get_yscale() == "log"
    marks = [line for line in fig.axes[2].lines if line.get_marker() == "x"]  # the blown-up state, at the top
    assert [tuple(line.get_xdata()) for line in marks] == [(8.0,)]


def test_the_parity_sweep_figure(tmp_path):
    # sweep.py --study=parity's folders: variant_sSEED, a status.json, log.jsonl with task evaluations (the last drawn)
    def task(long_acc):
        return {"id": {T: {"acc": {"1-8": 1.0, "9-12": None}} for T in ("1", "8")},
                "long": {T: {"acc": {"1-8": 0.9, "25-31": a}} for T, a in long_acc.items()}}
    runs = {"parcae_s1": (0, [{"1": 0.5, "8": 0.5}, {"1": 0.5, "8": 0.7, "64": 0.9}]),
            "parcae_s2": (0, [{"1": 0.4, "8": 0.9, "64": 1.0}]), "gpt_s1": (0, [{"1": 0.5, "8": 0.5}]),
            "gpt_s2": (1, [{"1": 0.0, "8": 0.0}]), "parcae_x1_s1": (0, [{"1": 0.0}])}  # failed; a stability run
    for name, (rc, evals) in runs.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "status.json").write_text(json.dumps({"returncode": rc}))
        (tmp_path / name / "log.jsonl").write_text("".join(json.dumps({"iter": 750, "task": task(e), "mod": 2}) + "\n"
                                                           for e in evals))
    assert sorted(plot.read_parity(str(tmp_path))) == ["gpt", "parcae"] and len(plot.read_parity(str(tmp_path))["gpt"]) == 1
    fig = plot.plot_sweep(str(tmp_path), str(tmp_path / "p.png"))
    assert len(fig.axes) == 2 and png_size(str(tmp_path / "p.png")) == (1200, 450)
    long, ident = panel(fig, "long set, digits 25-31"), panel(fig, "id set, digits 1-8")
    drawn = {c.get_label(): (tuple(c.lines[0].get_xdata()), tuple(c.lines[0].get_ydata())) for c in long.containers}
    assert drawn["parcae (2 seeds)"][0] == (1, 8, 64) and drawn["gpt (1 seed)"] == ((1, 8), (0.5, 0.5))
    assert drawn["parcae (2 seeds)"][1] == pytest.approx((0.45, 0.8, 0.95))  # the mean over seeds at each depth
    assert all(tuple(c.lines[0].get_ydata()) == (1.0, 1.0) for c in ident.containers)


@pytest.mark.parametrize("args,words", [(["{empty}"], "has no log.jsonl"), ([], "one of the two"),
                                        (["--sweep={empty}"], "no finished sweep.py runs"),
                                        (["--sweep={empty}/nowhere"], "is not a folder"),
                                        (["{empty}", "--colour=red"], "unknown config key 'colour'")])
def test_bad_input_is_one_line(tmp_path, args, words):
    args = [a.replace("{empty}", str(tmp_path)) for a in args]
    r = subprocess.run([sys.executable, "plot.py", *args], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and words in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_without_matplotlib_says_how_to_get_it(tmp_path, run):
    (tmp_path / "sitecustomize.py").write_text("import sys\nsys.modules['matplotlib'] = None  # as if not installed\n")
    r = subprocess.run([sys.executable, "plot.py", run], cwd=ROOT, env=dict(ENV, PYTHONPATH=str(tmp_path)),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and r.stderr.strip() == "error: plot.py needs matplotlib: pip install matplotlib", r.stderr
