"""Tests of sweep.py's summary of runs (no training).   python -m pytest -q test_sweep.py"""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from prepare_fineweb import write_shard
from sweep import reference_losses, summarize, unigram_loss


def fake_run(path, losses, rhos, rms, val, returncode, skipped=0):
    os.makedirs(path)
    with open(os.path.join(path, "log.jsonl"), "w") as f:
        f.write(json.dumps({"iter": 0, "val": {"4": 10.9, "8": 10.9}}) + "\n")  # the step-0 evaluation
        for i, (loss, rho, s) in enumerate(zip(losses, rhos, rms), 1):
            f.write(json.dumps({"iter": i, "loss": loss, "rho": rho, "state_rms": s}) + "\n")
        if val is not None:
            f.write(json.dumps({"iter": len(losses), "val": val}) + "\n")
    with open(os.path.join(path, "train.log"), "w") as f:
        f.write("".join(f"step {i}: non-finite grad norm, step skipped ({i} in a row)\n" for i in range(skipped)))
    with open(os.path.join(path, "status.json"), "w") as f:
        json.dump({"returncode": returncode, "seconds": 1.0}, f)
    return str(path)


def test_summary_of_a_healthy_and_a_diverged_run(tmp_path):
    # the batches' own difficulty: a hard document at steps 12-13 costs every run 3 nats more
    data = [6.0 - 0.1 * i + (3.0 if i in (12, 13) else 0.0) for i in range(20)]
    ok_dir = fake_run(tmp_path / "ok", data, [0.4] * 19 + [0.5], [1.0] * 10 + [3.0] + [1.0] * 9, {"4": 4.5, "8": 4.4}, 0)
    # two spikes of its own (steps 9 and 16, not in the other runs), then the non-finite guard stops it
    wild = [x + (2.0 if i in (9, 16) else 0.0) for i, x in enumerate(data[:18])]
    bad_dir = fake_run(tmp_path / "bad", wild, [1.0 + i for i in range(18)], [2.0] * 18, None, 1, skipped=3)
    third = fake_run(tmp_path / "third", [x + 0.2 for x in data], [0.4] * 20, [1.0] * 20, {"4": 4.7, "8": 4.6}, 0)
    reference = reference_losses([ok_dir, bad_dir, third])
    assert abs(reference[12] - data[12]) < 1e-12  # median of data[12], data[12] and data[12] + 0.2
    assert len(reference) == 20 and abs(reference[19] - (data[19] + 0.1)) < 1e-12  # two runs reached step 20

    ok = summarize(ok_dir, 7.0, reference)
    assert ok == {"val_mu": 4.5, "val_2mu": 4.4, "max_rho": 0.5, "max_state_rms": 3.0, "skipped": 0, "spikes": 0,
                  "steps": 20, "failed": False}
    bad = summarize(bad_dir, 7.0, reference)
    assert bad["spikes"] == 2 and bad["skipped"] == 3 and bad["max_rho"] == 18.0
    assert bad["failed"] and math.isnan(bad["val_mu"]) and bad["val_2mu"] is None
    # without taking out the batches' difficulty the hard document's two steps would look like spikes
    assert summarize(ok_dir, 7.0, [0.0] * 20)["spikes"] == 2


def test_a_finished_run_worse_than_unigram_counts_as_failed(tmp_path):
    flat = [0.0] * 12
    r = summarize(fake_run(tmp_path / "r", [5.0] * 12, [0.4] * 12, [1.0] * 12, {"4": 7.5, "8": 9.0}, 0), 7.0, flat)
    assert r["failed"] and r["val_mu"] == 7.5 and r["spikes"] == 0
    r = summarize(fake_run(tmp_path / "n", [5.0] * 12, [0.4] * 12, [1.0] * 12, {"4": float("nan")}, 0), 7.0, flat)
    assert r["failed"]


def test_unigram_loss_by_hand(tmp_path):
    train = np.array([1, 1, 1, 2, 2, 3])
    write_shard(str(tmp_path / "x_train_000001.bin"), train)
    write_shard(str(tmp_path / "x_val_000000.bin"), np.array([50256, 1, 2, 7]))  # the first token is never a target
    counts = np.bincount(train, minlength=2**16) + 1  # add-one smoothing over the uint16 range
    p = counts / counts.sum()
    expected = -np.mean(np.log(p[[1, 2, 7]]))
    assert abs(unigram_loss(str(tmp_path), 3) - expected) < 1e-12


def test_stability_table_gives_mean_and_spread_over_seeds(tmp_path, monkeypatch):
    import sweep
    monkeypatch.setattr(sweep, "out_dir", str(tmp_path))
    monkeypatch.setattr(sweep, "seeds", (1, 2))
    monkeypatch.setattr(sweep, "study", "stability")
    flat = [5.0] * 12
    fake_run(tmp_path / "naive_x1_s1", flat, [1.0] * 12, [2.0] * 12, {"4": 4.0, "8": 4.2}, 0)
    fake_run(tmp_path / "naive_x1_s2", flat, [1.0] * 12, [6.0] * 12, {"4": 5.0, "8": 5.2}, 0)
    fake_run(tmp_path / "parcae_x1_s1", flat, [0.5] * 12, [1.0] * 12, {"4": 4.5, "8": 4.4}, 0)
    fake_run(tmp_path / "parcae_x1_s2", flat, [0.7] * 12, [1.0] * 12, None, 1, skipped=2)  # diverged
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in
            sweep.stability_table(["naive", "parcae", "rdm"], (1.0,), 7.0).splitlines() if line.startswith("| ")}
    assert rows["naive"][2] == "4.5000 ± 0.7071" and rows["naive"][5] == "6" and rows["naive"][8] == "0/2 |"
    assert rows["parcae"][2] == "4.5000" and rows["parcae"][4] == "0.700" and rows["parcae"][6] == "2"
    assert rows["parcae"][8] == "1/2 |"  # failures are counted per seed, the diverged one has no final loss
    assert "not run" in rows["rdm"][2]


def parity_run(path, long_acc, seconds, returncode=0):
    os.makedirs(path)
    res = lambda a: {"acc": {"1-8": 1.0, "25-31": a}, "segment": a / 2, "loss": 0.1, "state_rms": 3.0, "residual": 0.01}
    rec = {"iter": 750, "val": {"8": 0.1}, "mod": 2, "mu": 8,
           "task": {"id": {"8": res(float("nan")), "32": res(float("nan"))}, "long": {"8": res(0.5), "32": res(long_acc)}}}
    with open(os.path.join(path, "log.jsonl"), "w") as f:
        f.write(json.dumps(rec) + "\n")
    with open(os.path.join(path, "status.json"), "w") as f:
        json.dump({"returncode": returncode, "seconds": seconds}, f)


def test_parity_tables_give_mean_and_spread_over_seeds(tmp_path, monkeypatch):
    import sweep
    monkeypatch.setattr(sweep, "out_dir", str(tmp_path))
    monkeypatch.setattr(sweep, "seeds", (1, 2, 3))
    monkeypatch.setattr(sweep, "study", "parity")
    parity_run(tmp_path / "parcae_s1", 0.9, 300)
    parity_run(tmp_path / "parcae_s2", 1.0, 360)
    parity_run(tmp_path / "parcae_s3", 0.2, 10, returncode=1)  # crashed: counted, not averaged
    text = sweep.parity_tables(["parcae", "naive"])
    assert "chance 0.500" in text
    summary = next(line for line in text.splitlines() if line.startswith("| parcae |"))
    assert summary == "| parcae | 2/3 | 750 ± 0 | 5.5 ± 0.7 | 1.000 ± 0.000 | 0.500 ± 0.000 | 0.950 ± 0.071 |"
    assert "| naive | 0/0 |" in text
    assert "| long | 32 | 1.000 ± 0.000 | 0.950 ± 0.071 | 0.475 ± 0.035 |" in text
    assert "| id | 32 | 1.000 ± 0.000 | - |" in text  # a bucket with no digits is '-'


ROOT = os.path.dirname(os.path.abspath(__file__))


def sweep_cli(*args):
    return subprocess.run([sys.executable, "sweep.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_default_data_dir_is_what_prepare_fineweb_makes():
    import sweep
    assert sweep.data_dir == "data/sample" and "python prepare_fineweb.py --sample" in sweep.__doc__


@pytest.mark.parametrize("summary_only", [True, False])
def test_missing_data_dir_is_one_line_before_any_run(tmp_path, summary_only):
    missing = tmp_path / "nope"
    r = sweep_cli(f"--data_dir={missing}", f"--out_dir={tmp_path / 'out'}", f"--summary_only={summary_only}")
    assert r.returncode != 0 and r.stdout == "" and r.stderr.strip() == (
        f"error: data_dir {missing} does not exist: make it with python prepare_fineweb.py --sample (data/sample), "
        f"or point --data_dir at a folder of GPT-2 token shards")
    assert not (tmp_path / "out").exists()
    r = sweep_cli(f"--data_dir={tmp_path}", f"--out_dir={tmp_path / 'out'}", "--summary_only=True")
    assert r.stderr.strip() == f"error: no train shards (*_train_*.bin) in {tmp_path}: run prepare_fineweb.py first"


def test_parity_needs_no_data_dir(tmp_path):
    r = sweep_cli("--study=parity", f"--data_dir={tmp_path / 'nope'}", f"--out_dir={tmp_path}", "--summary_only=True")
    assert r.returncode == 0 and r.stdout.strip() == f"no finished parity runs in {tmp_path}", r.stderr


def test_runs_trained_on_another_data_dir_are_refused(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    write_shard(str(data / "x_train_000001.bin"), np.arange(100))
    write_shard(str(data / "x_val_000000.bin"), np.arange(100))
    out = tmp_path / "out"
    run = fake_run(out / "parcae_x1_s1337", [5.0] * 3, [0.5] * 3, [1.0] * 3, {"4": 4.5, "8": 4.4}, 0)
    with open(os.path.join(run, "status.json"), "w") as f:
        json.dump({"returncode": 0, "seconds": 1.0, "data_dir": "data/linuxdoc"}, f)
    r = sweep_cli(f"--data_dir={data}", f"--out_dir={out}", "--variants=parcae", "--multipliers=1", "--summary_only=True")
    assert r.returncode != 0 and r.stderr.strip() == (f"error: {run} was trained on data_dir data/linuxdoc, not {data}: "
                                                      f"pass --data_dir=data/linuxdoc, or another --out_dir")
    with open(os.path.join(run, "status.json"), "w") as f:
        json.dump({"returncode": 0, "seconds": 1.0, "data_dir": str(data)}, f)
    r = sweep_cli(f"--data_dir={data}", f"--out_dir={out}", "--variants=parcae", "--multipliers=1", "--summary_only=True")
    assert r.returncode == 0 and "| parcae | 1 | 4.5000 |" in r.stdout, r.stderr


def test_parity_runs_made_with_other_task_args_are_refused(tmp_path, monkeypatch):
    import sweep
    for key, value in (("out_dir", str(tmp_path)), ("seeds", (1,)), ("study", "parity"), ("task_args", "")):
        monkeypatch.setattr(sweep, key, value)
    parity_run(tmp_path / "parcae_s1", 0.9, 300)
    with open(tmp_path / "parcae_s1" / "status.json", "w") as f:
        json.dump({"returncode": 0, "seconds": 300, "task_args": "--task_train_len=1,16"}, f)
    sweep.check_trained_on([("gpt", 1.0, 1)])  # not there: nothing to check
    try:
        sweep.check_trained_on([("parcae", 1.0, 1)])
        raise AssertionError("a run of another task was taken")
    except ValueError as e:
        assert "task_args '--task_train_len=1,16'" in str(e)
    monkeypatch.setattr(sweep, "task_args", " --task_train_len=1,16")
    sweep.check_trained_on([("parcae", 1.0, 1)])  # the same arguments


def test_a_run_that_died_before_logging_counts_as_failed(tmp_path):
    run = tmp_path / "dead"
    os.makedirs(run)
    (run / "train.log").write_text("error: cannot load GPT-2's BPE\n")
    with open(run / "status.json", "w") as f:
        json.dump({"returncode": 1, "seconds": 5.0}, f)
    ok = fake_run(tmp_path / "ok", [5.0] * 12, [0.4] * 12, [1.0] * 12, {"4": 4.5, "8": 4.4}, 0)
    reference = reference_losses([str(run), ok])
    r = summarize(str(run), 7.0, reference)
    assert r["failed"] and r["steps"] == 0 and math.isnan(r["val_mu"])
