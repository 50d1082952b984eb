"""Tests of eval.py and of bits per byte in train.py (CPU, offline).   python -m pytest -q test_eval.py"""
import glob
import json
import math
import os
import subprocess
import sys
import threading
import time
from http.server import ThreadingHTTPServer

import numpy as np
import pytest
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.abspath(__file__))
_CACHE = os.path.join(ROOT, "..", "shared", "tiktoken_cache")
if os.path.isdir(_CACHE):  # the GPT-2 BPE file, for machines without network
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", _CACHE)
os.environ.setdefault("OMP_NUM_THREADS", "1")  # subprocesses: two OpenMP threads on a busy machine crawl

import eval as ev  # noqa: E402
import prepare_fineweb as pf  # noqa: E402
from pretrained import GPT2Tokenizer  # noqa: E402
from configurator import load_checkpoint, model_from_checkpoint  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402
from test_prepare import Handler  # noqa: E402  the local HTTP server's handler (cuts, ranges, 404)

GPT2 = GPT2Tokenizer()  # what eval.py tokenizes with for a GPT-2 model

# fixtures in the real formats. In the hellaswag items the right ending repeats the context's last word,
# which the "parrot" model below prefers; the LAMBADA texts ending in a repeated word are the ones it gets.
HELLASWAG = [
    {"ind": 4, "activity_label": "Walking the dog", "ctx_a": "A man is outside.", "ctx_b": "he",
     "ctx": "A man is outside. he walks the dog", "endings": ["dog dog dog", "is eating a sandwich in the kitchen.",
     "jumps into the pool and swims away.", "starts to sing a song."], "source_id": "x", "split": "val",
     "split_type": "indomain", "label": 0},
    {"ind": 7, "activity_label": "Cats", "ctx_a": "A woman opens a box.", "ctx_b": "she",
     "ctx": "A woman opens a box. she finds a small cat", "endings": ["then leaves the room quickly.", "cat cat",
     "drives a car down the road.", "plays the piano for a while, smiling."], "source_id": "y", "split": "val",
     "split_type": "indomain", "label": 1},
    {"ind": 9, "activity_label": "Cooking", "ctx_a": "", "ctx_b": "",
     "ctx": "In a long kitchen with white cupboards, wooden floors and a large window, a chef chops the onion",
     "endings": ["and the crowd cheers loudly.", "while a dog barks outside the door.", "onion onion onion onion",
     "then paints the fence blue."], "source_id": "z", "split": "val", "split_type": "zeroshot", "label": 2},
    {"ind": 12, "activity_label": "Music", "ctx_a": "", "ctx_b": "",
     "ctx": "A band plays on a stage. the drummer hits the drum", "endings": ["and everyone goes home.",
     "a bird flies over the lake.", "the man reads a newspaper.", "drum drum drum"], "source_id": "w",
     "split": "val", "split_type": "zeroshot", "label": 3},
]
LAMBADA = [{"text": "he threw the ball to the dog and the dog ran after the dog dog"},
           {"text": "she sat on the mat and looked at the cat"},
           {"text": "`` where is it ? '' she asked , pointing at the old red house house"}]


def jsonl(objs):
    return "".join(json.dumps(o) + "\n" for o in objs).encode()


def write_eval_data(folder, hellaswag=HELLASWAG, lambada=LAMBADA):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "hellaswag_val.jsonl"), "wb") as f:
        f.write(hellaswag if isinstance(hellaswag, bytes) else jsonl(hellaswag))
    with open(os.path.join(folder, "lambada_test.jsonl"), "wb") as f:
        f.write(jsonl(lambada))
    return str(folder)


def tiny_config(**kw):
    return GPTConfig(**{**dict(block_size=64, n_embd=32, n_head=2, n_kv_head=1, n_prelude=1, n_core=1, n_coda=1,
                               mean_recurrence=2, backprop_depth=1), **kw})


def parrot():
    """A model that predicts its input token again. Fresh init: every block is the identity, so with
    additive injection, no prelude norm and h0 = 0 the logits are RMSNorm(T e) @ wte^T, largest at the
    input token itself; scaling wte up makes that choice confident."""
    torch.manual_seed(0)
    model = GPT(tiny_config(n_embd=64, injection="add", prelude_norm=False, state_init="zero"))
    with torch.no_grad():
        model.wte.weight.mul_(10)
    return model.eval()


def random_model():
    """Blocks perturbed away from the identity, so attention (and any padding leak) changes the losses."""
    torch.manual_seed(1)
    model = GPT(tiny_config(block_size=24))  # short enough that the long fixture items get cropped
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def items_of(task, objs):
    return [ev.PARSERS[task](o) for o in objs]


# scoring ---------------------------------------------------------------------------------------
def plain_loss(model, context, continuation, T):
    """The continuation's summed loss and greedy hit from one forward over this (context, ending) alone."""
    enc = pf.gpt2_encoding()
    ctx, cont = [pf.EOT] + enc.encode_ordinary(context), enc.encode_ordinary(" " + continuation)
    seq = (ctx + cont)[-(model.config.block_size + 1):]
    x, y = torch.tensor(seq[:-1])[None], torch.tensor(seq[1:])[None]
    logits = model(x, y, num_loops=T)[0][0]
    logp = F.log_softmax(logits.double(), -1)
    pos = range(len(seq) - 1 - len(cont), len(seq) - 1)
    return -sum(logp[p, seq[p + 1]].item() for p in pos), all(logits[p].argmax().item() == seq[p + 1] for p in pos)


@pytest.mark.parametrize("T", [1, 3])
def test_batched_scorer_equals_one_row_at_a_time(T):
    model, enc = random_model(), pf.gpt2_encoding()
    hs, lb = items_of("hellaswag", HELLASWAG), items_of("lambada", LAMBADA)
    assert max(len(r[0]) + len(r[1]) for r in ev.task_rows("hellaswag", hs, GPT2)[0]) > 25  # cropping is exercised
    with torch.no_grad():
        plain_hs = [[plain_loss(model, c, e, T)[0] for e in endings] for c, endings, _ in hs]
        plain_lb = [plain_loss(model, c, w, T) for c, w in lb]
    # 3 rows per forward: items share batches with rows of other lengths, padded
    scores = ev.score_rows(model, ev.task_rows("hellaswag", hs, GPT2)[0], T, batch_size=3)
    got = [[s[0] for s in scores[4 * i:4 * i + 4]] for i in range(len(hs))]
    np.testing.assert_allclose(got, plain_hs, rtol=1e-5)
    n_tokens = [len(enc.encode_ordinary(" " + e)) for _, endings, _ in hs for e in endings]
    assert [s[1] for s in scores] == n_tokens
    acc = np.mean([np.argmin(p) == label for p, (_, _, label) in zip(plain_hs, hs)])
    acc_norm = np.mean([np.argmin(np.array(p) / n_tokens[4 * i:4 * i + 4]) == label
                        for i, (p, (_, _, label)) in enumerate(zip(plain_hs, hs))])
    assert ev.hellaswag_metrics(hs, scores) == {"acc": acc, "acc_norm": acc_norm}
    lb_scores = ev.score_rows(model, ev.task_rows("lambada", lb, GPT2)[0], T, batch_size=2)
    np.testing.assert_allclose([s[0] for s in lb_scores], [p[0] for p in plain_lb], rtol=1e-5)
    assert [s[2] for s in lb_scores] == [p[1] for p in plain_lb]


def test_a_model_that_prefers_the_right_ending_scores_1():
    model = parrot()
    hs, lb = items_of("hellaswag", HELLASWAG), items_of("lambada", LAMBADA)
    for T in (1, 2):
        scores = ev.score_rows(model, ev.task_rows("hellaswag", hs, GPT2)[0], T, batch_size=5)
        assert ev.hellaswag_metrics(hs, scores) == {"acc": 1.0, "acc_norm": 1.0}
        m = ev.lambada_metrics(lb, ev.score_rows(model, ev.task_rows("lambada", lb, GPT2)[0], T, batch_size=2))
        assert m["acc"] == pytest.approx(2 / 3)  # "cat" does not follow "the": that item is missed
    # the same items with the labels moved: the right ending is no longer the labelled one
    moved = [(c, e, (label + 1) % 4) for c, e, label in hs]
    assert ev.hellaswag_metrics(moved, scores) == {"acc": 0.0, "acc_norm": 0.0}


def test_lambada_target_is_the_last_word():
    assert ev.parse_lambada({"text": "a b c  dog"}) == ("a b c ", "dog")
    rows, owner = ev.task_rows("lambada", [("the big", "dog")], GPT2)
    enc = pf.gpt2_encoding()
    assert rows == [([pf.EOT] + enc.encode_ordinary("the big"), enc.encode_ordinary(" dog"))] and owner == [0]


# bits per byte --------------------------------------------------------------------------------
def test_token_byte_lengths():
    enc = pf.gpt2_encoding()
    lengths = pf.token_byte_lengths(50304)
    assert lengths.shape == (50304,)
    assert lengths[pf.EOT] == 0 and not lengths[50257:].any()  # no text behind these ids
    (the,) = enc.encode_ordinary(" the")
    assert lengths[the] == 4
    check = enc.encode_ordinary("✓")  # 3 UTF-8 bytes split over two tokens
    assert len(check) == 2 and lengths[check].tolist() == [2, 1]
    assert lengths[:50256].min() >= 1


TINY = ["--n_embd=32", "--n_head=2", "--n_kv_head=1", "--n_prelude=1", "--n_core=1", "--n_coda=1",
        "--mean_recurrence=2", "--backprop_depth=1", "--depth_sampling=fixed", "--state_init=zero",
        "--block_size=32", "--batch_size=4", "--val_tokens=1024", "--total_batch_size=128", "--compile=False",
        "--device=cpu", "--log_interval=1", "--max_iters=3", "--eval_interval=3", "--eval_loops=1,3"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A checkpoint and log from a 3-step train.py run on the offline sample."""
    data, out = tmp_path_factory.mktemp("sample"), tmp_path_factory.mktemp("run")
    pf.build_sample(str(data))
    r = subprocess.run([sys.executable, "train.py", *TINY, f"--data_dir={data}", f"--out_dir={out}"],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    return str(data), str(out), r.stdout


def test_train_logs_bits_per_byte(trained):
    data, out, stdout = trained
    with open(os.path.join(out, "log.jsonl")) as f:
        rec = [json.loads(line) for line in f if '"val"' in line][-1]
    assert rec["iter"] == 3 and set(rec["val_bpb"]) == set(rec["val"]) == {"1", "3"}
    # recompute from the checkpoint (written at iter 3, right after this evaluation) and the val shard
    path = os.path.join(out, "ckpt.pt")
    model = model_from_checkpoint(load_checkpoint(path), path).eval()
    val = np.concatenate([pf.open_shard(p) for p in sorted(glob.glob(os.path.join(data, "*_val_*.bin")))])
    tokens = torch.from_numpy(val[:1025].astype(np.int64))  # val_tokens=1024: 32 rows of 32
    x, y = tokens[:-1].view(32, 32), tokens[1:].view(32, 32)
    enc = pf.gpt2_encoding()
    nbytes = torch.tensor([len(enc.decode_single_token_bytes(t)) if t < 50256 else 0 for t in y.flatten().tolist()])
    assert (nbytes == 0).any() and (nbytes > 0).any()  # the fixture has <|endoftext|> targets to leave out
    for T in (1, 3):
        with torch.no_grad():
            nll = -F.log_softmax(model(x, y, num_loops=T)[0].double(), -1).gather(-1, y[..., None]).flatten()
        assert rec["val"][str(T)] == pytest.approx(nll.mean().item(), rel=1e-5)
        bpb = nll[nbytes > 0].sum().item() / (math.log(2) * nbytes.sum().item())
        assert rec["val_bpb"][str(T)] == pytest.approx(bpb, rel=1e-5)
        assert f"bpb {rec['val_bpb'][str(T)]:.4f}" in stdout  # the depth table shows it too


def test_table_columns_keep_their_width():
    loops = (1, 4, 16, 64, 256)
    ppl = dict(zip(loops, [1.5, 1e6, 12345678.9, 3.2e120, float("inf")]))
    results = {"hellaswag": {"items": 10042, "metrics": {"acc": dict.fromkeys(loops, 0.25)}},
               "lambada": {"items": 5153, "metrics": {"acc": dict.fromkeys(loops, 0.0), "ppl": ppl}}}
    lines = ev.table(results, loops)
    assert len({len(line) for line in lines}) == 1, lines  # every column ends where the header's does
    cells = lines[-1].split()[3:]
    assert cells == ["1.50", "1000000.00", "1.235e+07", "3.200e+120", "inf"], cells


# eval.py end to end ---------------------------------------------------------------------------
def run_eval(*args):
    return subprocess.run([sys.executable, "eval.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_eval_end_to_end(trained, tmp_path):
    _, out, _ = trained
    data = write_eval_data(tmp_path / "evaldata")
    r = run_eval(f"--out_dir={out}", f"--eval_data_dir={data}", "--eval_loops=1,3", "--batch_size=5", "--device=cpu")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert any(line.split()[:3] == ["hellaswag", "acc_norm", "4"] for line in lines)
    assert any(line.split()[:3] == ["lambada", "ppl", "3"] for line in lines)
    with open(os.path.join(out, "eval.json")) as f:
        res = json.load(f)
    assert res["iter_num"] == 3 and res["checkpoint"].endswith("ckpt.pt") and res["eval_loops"] == [1, 3]
    assert res["tasks"]["hellaswag"]["items"] == 4 and res["tasks"]["lambada"]["items"] == 3
    # the numbers are those of the scorer on the checkpoint's model
    path = os.path.join(out, "ckpt.pt")
    model = model_from_checkpoint(load_checkpoint(path), path).eval()
    lb = items_of("lambada", LAMBADA)
    for T in (1, 3):
        want = ev.lambada_metrics(lb, ev.score_rows(model, ev.task_rows("lambada", lb, GPT2)[0], T, 4))
        assert res["tasks"]["lambada"]["metrics"]["ppl"][str(T)] == pytest.approx(want["ppl"], rel=1e-5)
        assert res["tasks"]["lambada"]["metrics"]["acc"][str(T)] == want["acc"]
        assert set(res["tasks"]["hellaswag"]["metrics"]) == {"acc", "acc_norm"}
    r = run_eval(f"--out_dir={out}", f"--eval_data_dir={data}", "--tasks=lambada", "--max_items=2",
                 "--eval_loops=2", "--device=cpu")
    assert r.returncode == 0, r.stderr
    with open(os.path.join(out, "eval.json")) as f:
        res = json.load(f)["tasks"]
    assert list(res) == ["lambada"] and res["lambada"]["items"] == 2
    assert {m: list(v) for m, v in res["lambada"]["metrics"].items()} == {"acc": ["2"], "ppl": ["2"]}


def test_the_shipped_sample_runs_offline(trained):
    """eval.py's docstring example on assets/eval_sample, the real items shipped for an offline try: each task's
    items are scored from the files there, with no download and nothing written into the folder."""
    _, out, _ = trained
    (line,) = [l for l in ev.__doc__.splitlines() if "--eval_data_dir=assets/eval_sample" in l]
    args = [a for a in line.split("#")[0].split()[2:] if not a.startswith("--out_dir=")]  # after "python eval.py"
    sample = os.path.join(ROOT, "assets", "eval_sample")
    before = sorted(os.listdir(sample))
    items = {}
    for task, url in ev.URLS.items():  # read here first: a missing file must fail, not be downloaded into the repo
        path = os.path.join(sample, url.rsplit("/", 1)[-1])
        items[task] = len(ev.read_items(task, path))
        with open(path) as f:
            objs = [json.loads(l) for l in f]
        if task == "hellaswag":  # the real file's fields: ctx is ctx_a and ctx_b joined, from the val split
            assert all(o["split"] == "val" and o["ctx"] == f"{o['ctx_a']} {o['ctx_b']}".strip() for o in objs)
    assert min(items.values()) >= 3
    r = run_eval(f"--out_dir={out}", *args)
    assert r.returncode == 0, r.stderr
    with open(os.path.join(out, "eval.json")) as f:
        res = json.load(f)
    for task, n in items.items():
        assert res["tasks"][task]["items"] == n
        assert any(l.split()[:3] == [task, "acc", str(n)] for l in r.stdout.splitlines()), r.stdout
        for metric, by_T in res["tasks"][task]["metrics"].items():
            assert list(by_T) == [str(T) for T in res["eval_loops"]] and all(math.isfinite(v) for v in by_T.values())
    assert sorted(os.listdir(sample)) == before


BAD = {"label": dict(HELLASWAG[0], label=7)}


@pytest.mark.parametrize("case,want", [
    ("task", "unknown task in tasks='hellaswag,mmlu'"),
    ("ckpt", "no checkpoint at"),
    ("json", "hellaswag_val.jsonl:3: not valid JSON"),
    ("range", "hellaswag_val.jsonl:2: label 7 out of range"),
])
def test_bad_input_is_one_line_error(trained, tmp_path, case, want):
    _, out, _ = trained
    hellaswag = HELLASWAG
    if case == "json":
        hellaswag = jsonl(HELLASWAG[:2]) + b'{"ctx": "cut off\n' + jsonl(HELLASWAG[2:])
    if case == "range":
        hellaswag = HELLASWAG[:1] + [BAD["label"]] + HELLASWAG[1:]
    data = write_eval_data(tmp_path / "evaldata", hellaswag)
    args = [f"--out_dir={tmp_path if case == 'ckpt' else out}", f"--eval_data_dir={data}", "--device=cpu"]
    r = run_eval(*args, *(["--tasks=hellaswag,mmlu"] if case == "task" else []))
    assert r.returncode != 0
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.startswith("error: ") and want in r.stderr


def test_a_positional_argument_points_at_out_dir(trained):
    _, out, _ = trained
    r = run_eval(out)
    assert r.returncode != 0 and r.stderr.strip() == f"error: eval.py takes no config file: point it at a run with --out_dir={out}"


# downloads, against a local server ------------------------------------------------------------
@pytest.fixture
def server():
    Handler.files = {"hellaswag_val.jsonl": jsonl(HELLASWAG * 20), "lambada_test.jsonl": jsonl(LAMBADA),
                     "broken.jsonl": jsonl(HELLASWAG) + b"<html>rate limited</html>\n"}
    Handler.cut, Handler.ignore_range, Handler.fail_first, Handler.log, Handler.part_dir = set(), False, 0, [], None
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/data"
    httpd.shutdown()
    httpd.server_close()


FAST = dict(retries=3, backoff=0.001, timeout=5, chunk_size=256)


def test_download_resumes_after_cut_and_is_used_once(server, tmp_path):
    Handler.cut = {"hellaswag_val.jsonl"}
    folder = str(tmp_path / "eval")
    path = ev.task_file("hellaswag", folder, f"{server}/hellaswag_val.jsonl", **FAST)
    assert path == os.path.join(folder, "hellaswag_val.jsonl") and not os.path.exists(path + ".part")
    assert open(path, "rb").read() == Handler.files["hellaswag_val.jsonl"]
    (_, r1, _), (_, r2, _) = Handler.log
    assert r1 is None and r2.startswith("bytes=") and int(r2[6:-1]) > 0  # the second request resumed
    assert len(ev.read_items("hellaswag", path)) == 80
    ev.task_file("hellaswag", folder, f"{server}/hellaswag_val.jsonl", **FAST)
    assert len(Handler.log) == 2  # already there: no new request


def test_malformed_download_is_not_renamed_into_place(server, tmp_path):
    folder = str(tmp_path / "eval")
    with pytest.raises(ValueError, match=r"broken.jsonl: downloaded file failed its check.*:5: not valid JSON"):
        ev.task_file("hellaswag", folder, f"{server}/broken.jsonl", **FAST)
    assert os.listdir(folder) == []


def test_failed_download_says_where_to_put_a_copy(server, tmp_path):
    folder = str(tmp_path / "eval")
    del Handler.files["lambada_test.jsonl"]
    with pytest.raises(RuntimeError) as e:
        ev.task_file("lambada", folder, f"{server}/missing/lambada_test.jsonl", **FAST)
    assert "not found (HTTP 404)" in str(e.value)
    assert f"put a copy of {server}/missing/lambada_test.jsonl at {os.path.join(folder, 'lambada_test.jsonl')}" \
        in str(e.value)


def test_a_host_that_does_not_resolve_fails_at_once(tmp_path, monkeypatch):
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(var, raising=False)  # a proxy would resolve the name, not this machine
    url = "http://nonexistent.invalid/x/lambada_test.jsonl"  # .invalid never resolves
    t0 = time.monotonic()
    with pytest.raises(RuntimeError) as e:
        ev.task_file("lambada", str(tmp_path / "eval"), url)  # the default 5 tries would wait 1 + 2 + 4 + 8 s
    assert time.monotonic() - t0 < 5
    assert str(e.value) == (f"cannot download lambada data (lambada_test.jsonl: this machine cannot reach nonexistent.invalid: "
                            f"its name does not resolve, no network or no DNS here): put a copy of {url} at "
                            f"{tmp_path / 'eval' / 'lambada_test.jsonl'}, or point --eval_data_dir at a folder holding one")
