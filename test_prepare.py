"""
Tests for prepare_fineweb.py. CPU only, no internet (downloads hit a local http.server).
    python -m pytest -q test_prepare.py
"""

import json
import os
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

# the GPT-2 BPE file is cached here on the dev machines; elsewhere tiktoken fetches it once
_CACHE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "shared", "tiktoken_cache")
if os.path.isdir(_CACHE):  # the GPT-2 BPE file, for machines without network
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", _CACHE)

import prepare_fineweb as pf

HERE = os.path.dirname(os.path.abspath(__file__))

def shard_bytes(tokens, magic=pf.MAGIC, version=pf.VERSION, count=None):
    header = np.zeros(256, dtype="<i4")
    header[:3] = magic, version, len(tokens) if count is None else count
    return header.tobytes() + np.asarray(tokens, dtype="<u2").tobytes()

# -----------------------------------------------------------------------------
# shard format

def test_shard_round_trip(tmp_path):
    path = str(tmp_path / "good.bin")
    tokens = np.array([pf.EOT, 0, 1, 65535, 50000], dtype=np.int64)
    pf.write_shard(path, tokens)
    assert os.path.getsize(path) == 1024 + 2 * len(tokens)
    assert not os.path.exists(path + ".tmp")
    got = pf.open_shard(path)
    assert isinstance(got, np.memmap) and got.dtype == np.uint16
    assert got.tolist() == tokens.tolist()

def test_write_shard_rejects_too_big_tokens(tmp_path):
    with pytest.raises(ValueError):
        pf.write_shard(str(tmp_path / "x.bin"), [1, 70000])

@pytest.mark.parametrize("data, why", [
    (shard_bytes([1, 2, 3], magic=12345), "bad magic"),
    (shard_bytes([1, 2, 3], version=2), "unsupported version"),
    (shard_bytes([1, 2, 3], count=10), "10 tokens claimed but 3 present"),
    (shard_bytes([1, 2, 3])[:500], "shorter than header"),
    (shard_bytes([1, 2, 3]) + b"\0\0", "trailing data"),
])
def test_open_shard_rejects_bad_files(tmp_path, data, why):
    path = tmp_path / "broken_shard.bin"
    path.write_bytes(data)
    with pytest.raises(ValueError) as e:
        pf.open_shard(str(path))
    assert "broken_shard.bin" in str(e.value) and why in str(e.value)

# -----------------------------------------------------------------------------
# --text

DOCS = [
    "Hello world.\nThis is the first document.\n",
    "Second one, with unicode: héllo wörld ✓ and a literal <|endoftext|> inside.",
    "Third\r\ndocument with CRLF line endings\r\n",
    "from jsonl line one",
    "from jsonl line two\nwith a newline",
]

def write_text_files(tmp_path):
    paths = []
    for i, doc in enumerate(DOCS[:3]):
        p = tmp_path / f"doc{i}.txt"
        p.write_bytes(doc.encode("utf-8"))
        paths.append(str(p))
    p = tmp_path / "more.jsonl"
    p.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS[3:]) + "\n", encoding="utf-8")
    paths.append(str(p))
    return paths

def decode_docs(out_dir, name):
    """Read val then train shards back and split on <|endoftext|>."""
    enc = pf.gpt2_encoding()
    def split(paths):
        tokens = np.concatenate([pf.open_shard(p) for p in sorted(paths)]).tolist()
        assert tokens[0] == pf.EOT  # every document starts with <|endoftext|>
        docs, cur = [], None
        for t in tokens:
            if t == pf.EOT:
                if cur is not None:
                    docs.append(enc.decode(cur))
                cur = []
            else:
                cur.append(t)
        return docs + [enc.decode(cur)]
    files = sorted(os.listdir(out_dir))
    val = [os.path.join(out_dir, f) for f in files if f.startswith(f"{name}_val_")]
    train = [os.path.join(out_dir, f) for f in files if f.startswith(f"{name}_train_")]
    return split(val), split(train), files

def test_text_round_trip(tmp_path):
    out = str(tmp_path / "out")
    pf.tokenize_files(write_text_files(tmp_path), out, "mine", val_docs=1, shard_size=20)
    val, train, files = decode_docs(out, "mine")
    assert val == DOCS[:1] and train == DOCS[1:]
    assert "mine_val_000000.bin" in files and "mine_train_000001.bin" in files
    assert "mine_train_000002.bin" in files  # shard_size=20 forces several train shards
    assert all(len(pf.open_shard(os.path.join(out, f))) <= 20 for f in files)
    # a rerun with bigger shards leaves no stale shards from the first run behind
    pf.tokenize_documents(pf.read_documents(write_text_files(tmp_path)), out, "mine", val_docs=1)
    val, train, files = decode_docs(out, "mine")
    assert val == DOCS[:1] and train == DOCS[1:]
    assert files == ["mine_train_000001.bin", "mine_val_000000.bin"]

def test_text_cli_round_trip(tmp_path):
    out = str(tmp_path / "out")
    cmd = [sys.executable, os.path.join(HERE, "prepare_fineweb.py"),
           "--text", *write_text_files(tmp_path), "--out_dir", out, "--name", "cli", "--val_fraction", "0.4",
           "--min_tokens", "0"]  # a few tokens a split: too few to train on, enough to check
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    val, train, files = decode_docs(out, "cli")
    assert val == DOCS[:2] and train == DOCS[2:]
    assert files == ["cli_train_000001.bin", "cli_val_000000.bin"]

def test_text_cli_missing_file_is_one_line_error(tmp_path):
    cmd = [sys.executable, os.path.join(HERE, "prepare_fineweb.py"), "--text", "nope.txt", "--out_dir", "o"]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode != 0
    assert r.stderr.strip() == "error: nope.txt: no such text file"

# -----------------------------------------------------------------------------
# downloads, against a local server

class Handler(BaseHTTPRequestHandler):
    files = {}      # name -> bytes served
    cut = set()     # names whose next transfer is cut in the middle
    ignore_range = False
    fail_first = 0  # answer this many requests with 503 first
    log = []        # (name, Range header, size of the .part at that moment)
    part_dir = None

    def do_GET(self):
        name = self.path.rsplit("/", 1)[-1]
        part = os.path.join(self.part_dir, name + ".part") if self.part_dir else ""
        rng = self.headers.get("Range")
        Handler.log.append((name, rng, os.path.getsize(part) if os.path.exists(part) else None))
        if Handler.fail_first > 0:
            Handler.fail_first -= 1
            return self.send_error(503)
        if name not in self.files:
            return self.send_error(404)
        data, start = self.files[name], 0
        if rng and not self.ignore_range:
            start = int(rng.removeprefix("bytes=").split("-")[0])
            if start >= len(data):
                return self.send_error(416)
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        if name in self.cut:
            # promise the whole file, send half, hang up
            Handler.cut.discard(name)
            self.wfile.write(data[start:len(data) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(data[start:])

    def log_message(self, *args):
        pass

@pytest.fixture
def server(tmp_path):
    good = shard_bytes(np.arange(5000) % 50257)
    Handler.files = {"good_000000.bin": good, "good_000001.bin": shard_bytes([pf.EOT, 7, 8, 9]),
                     "corrupt_000000.bin": b"<html>oops</html>" + good[17:]}
    Handler.cut, Handler.ignore_range, Handler.fail_first, Handler.log = set(), False, 0, []
    Handler.part_dir = str(tmp_path / "data")
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/files", Handler.part_dir
    httpd.shutdown()
    httpd.server_close()

def fast(**kw):
    return dict(retries=3, backoff=0.001, timeout=5, chunk_size=1024, **kw)

def test_download_resumes_after_cut(server):
    url, data_dir = server
    Handler.cut = {"good_000000.bin"}
    pf.download(["good_000000.bin"], data_dir, url, **fast())
    path = os.path.join(data_dir, "good_000000.bin")
    assert open(path, "rb").read() == Handler.files["good_000000.bin"]
    assert not os.path.exists(path + ".part")
    (_, r1, _), (_, r2, part_size) = Handler.log
    assert r1 is None and part_size > 0 and r2 == f"bytes={part_size}-"

def test_download_restarts_when_server_ignores_range(server):
    url, data_dir = server
    Handler.ignore_range = True
    os.makedirs(data_dir)
    good = Handler.files["good_000000.bin"]
    path = os.path.join(data_dir, "good_000000.bin")
    with open(path + ".part", "wb") as f:
        f.write(good[:3000])  # left over from an earlier, interrupted run
    pf.download(["good_000000.bin"], data_dir, url, **fast())
    assert Handler.log[0][1] == "bytes=3000-"
    assert open(path, "rb").read() == good

def test_download_retries_server_errors(server):
    url, data_dir = server
    Handler.fail_first = 2
    pf.download(["good_000001.bin"], data_dir, url, **fast())
    assert len(Handler.log) == 3
    assert pf.open_shard(os.path.join(data_dir, "good_000001.bin")).tolist() == [pf.EOT, 7, 8, 9]
    Handler.fail_first, Handler.log = 10, []
    with pytest.raises(RuntimeError, match="good_000000.bin: download failed after 3 tries"):
        pf.download(["good_000000.bin"], data_dir, url, **fast())
    assert len(Handler.log) == 3

def test_complete_files_are_skipped(server):
    url, data_dir = server
    names = ["good_000000.bin", "good_000001.bin"]
    pf.download(names, data_dir, url, **fast())
    assert len(Handler.log) == 2
    pf.download(names, data_dir, url, **fast())
    assert len(Handler.log) == 2  # no new requests

def test_broken_final_file_is_downloaded_again(server):
    url, data_dir = server
    os.makedirs(data_dir)
    path = os.path.join(data_dir, "good_000000.bin")
    with open(path, "wb") as f:
        f.write(Handler.files["good_000000.bin"][:2000])  # e.g. copied by hand and cut short
    pf.download(["good_000000.bin"], data_dir, url, **fast())
    assert len(Handler.log) == 1
    assert open(path, "rb").read() == Handler.files["good_000000.bin"]

def test_corrupt_download_is_not_renamed_into_place(server):
    url, data_dir = server
    with pytest.raises(ValueError, match="corrupt_000000.bin.*bad magic"):
        pf.download(["corrupt_000000.bin"], data_dir, url, **fast())
    assert not os.path.exists(os.path.join(data_dir, "corrupt_000000.bin"))

def test_404_names_the_file(server):
    url, data_dir = server
    with pytest.raises(RuntimeError, match="missing_000000.bin: not found"):
        pf.download(["good_000001.bin", "missing_000000.bin"], data_dir, url, **fast())
    assert len(Handler.log) == 2  # a 404 is not retried
    assert not os.path.exists(os.path.join(data_dir, "missing_000000.bin"))

@pytest.mark.parametrize("equals", [False, True])  # argparse's --key value, or --key=value as in every other script
def test_download_cli_404_is_one_line_error(server, tmp_path, equals):
    url, data_dir = server
    args = [("--num_chunks", "1"), ("--base_url", url), ("--data_dir", data_dir), ("--retries", "2")]
    cmd = [sys.executable, os.path.join(HERE, "prepare_fineweb.py"),
           *(a for k, v in args for a in ([f"{k}={v}"] if equals else [k, v]))]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1].startswith("error: fineweb_val_000000.bin: not found (HTTP 404)")
    assert "Traceback" not in r.stderr

def test_fineweb_names():
    names = pf.fineweb_names(2)
    assert names == ["fineweb_val_000000.bin", "fineweb_train_000001.bin", "fineweb_train_000002.bin"]
    assert pf.fineweb_names(103)[-1] == "fineweb_train_000103.bin"

# -----------------------------------------------------------------------------
# --sample

@pytest.mark.parametrize("args", [["--sample"], ["--sample=True"], ["--sample", "True"]])
def test_sample(tmp_path, args):
    r = subprocess.run([sys.executable, os.path.join(HERE, "prepare_fineweb.py"), *args],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    train = pf.open_shard(str(tmp_path / "data/sample/sample_train_000001.bin"))
    val = pf.open_shard(str(tmp_path / "data/sample/sample_val_000000.bin"))
    assert len(train) > 50_000 and len(val) > 1000
    assert train[0] == pf.EOT and val[0] == pf.EOT
    assert int(train.max()) < 50257

def run_prepare(tmp_path, *args):
    return subprocess.run([sys.executable, os.path.join(HERE, "prepare_fineweb.py"), *args], capture_output=True,
                          text=True, cwd=tmp_path, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=120)

def test_text_cli_one_long_file_is_split_by_tokens(tmp_path):
    text = "".join(f"Paragraph {i}: the quick brown fox jumps over the lazy dog.\n\n" for i in range(1000))
    (tmp_path / "book.txt").write_text(text)
    r = run_prepare(tmp_path, "--text", "book.txt", "--out_dir", "out", "--name", "book")
    assert r.returncode == 0, r.stderr
    out = tmp_path / "out"
    assert sorted(os.listdir(out)) == ["book_train_000001.bin", "book_val_000000.bin"]
    val, train = (pf.open_shard(str(out / f)) for f in ("book_val_000000.bin", "book_train_000001.bin"))
    whole = [pf.EOT] + pf.gpt2_encoding().encode_ordinary(text)
    assert train.tolist() + val.tolist()[1:] == whole and val[0] == pf.EOT  # nothing lost, nothing repeated
    assert abs(len(val) - 1 - 0.1 * (len(whole) - 1)) <= 1  # the default val_fraction of the tokens
    last_bar = [b for b in r.stderr.replace("\n", "\r").split("\r") if b.startswith("tokenizing book")][-1]
    assert "| 1/1 [" in last_bar, r.stderr  # the progress bar reaches its one document

@pytest.mark.parametrize("content", ["", "  \n\n", "\n\n"])
def test_text_cli_empty_file_is_refused_by_name(tmp_path, content):
    (tmp_path / "good.txt").write_text("Some text.")
    (tmp_path / "blank.txt").write_text(content)
    r = run_prepare(tmp_path, "--text", "good.txt", "blank.txt", "--out_dir", "out")
    assert r.returncode != 0 and r.stderr.strip() == "error: blank.txt: empty file, nothing to tokenize"
    assert not (tmp_path / "out").exists()  # no shards written

def test_text_cli_empty_jsonl_is_refused_by_name(tmp_path):
    (tmp_path / "none.jsonl").write_text("\n\n")
    r = run_prepare(tmp_path, "--text", "none.jsonl", "--out_dir", "out")
    assert r.returncode != 0 and r.stderr.strip() == "error: none.jsonl: no documents in it, nothing to tokenize"

def encode_offline(tmp_path, cache):
    """GPT-2 BPE of 'hello world' in a subprocess with only `cache` as tiktoken's cache and no network."""
    env = dict(os.environ, TIKTOKEN_CACHE_DIR=str(cache), HTTPS_PROXY="http://127.0.0.1:9", HTTP_PROXY="http://127.0.0.1:9")
    return subprocess.run([sys.executable, "-c", "import prepare_fineweb as pf; print(pf.gpt2_encoding().encode('hello world'))"],
                          cwd=HERE, env=env, capture_output=True, text=True, timeout=120)

def test_tokenizer_file_under_its_own_name_works_offline(tmp_path):
    cached = [f for f in os.listdir(os.environ["TIKTOKEN_CACHE_DIR"]) if len(f) == 40]  # sha1-named by tiktoken
    assert cached, "the test needs tiktoken's cached r50k_base file"
    (tmp_path / "r50k_base.tiktoken").write_bytes(open(os.path.join(os.environ["TIKTOKEN_CACHE_DIR"], cached[0]), "rb").read())
    r = encode_offline(tmp_path, tmp_path)
    assert r.returncode == 0 and r.stdout.strip() == "[31373, 995]", r.stderr
    assert os.listdir(tmp_path) == ["r50k_base.tiktoken"]  # nothing written next to it

def test_tokenizer_missing_or_wrong_file_is_one_line_error(tmp_path):
    r = encode_offline(tmp_path, tmp_path)  # empty cache, no network
    assert r.returncode != 0 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "r50k_base.tiktoken" in r.stderr and "TIKTOKEN_CACHE_DIR" in r.stderr
    (tmp_path / "r50k_base.tiktoken").write_text("not a BPE file\n")
    r = encode_offline(tmp_path, tmp_path)
    assert r.returncode != 0 and "sha256 differs" in r.stderr and len(r.stderr.strip().splitlines()) == 1

def test_text_cli_takes_key_equals_value_too(tmp_path):
    text = "".join(f"Paragraph {i}: the quick brown fox jumps over the lazy dog.\n\n" for i in range(200))
    (tmp_path / "a.txt").write_text(text)
    (tmp_path / "b.txt").write_text(text.upper())
    spaced = run_prepare(tmp_path, "--text", "a.txt", "b.txt", "--out_dir", "spaced", "--name", "x",
                         "--val_fraction", "0.5", "--shard_size", "100000")
    equals = run_prepare(tmp_path, "--text=a.txt", "--text=b.txt", "--out_dir=equals", "--name=x",
                         "--val_fraction=0.5", "--val_docs=None", "--shard_size=100000")
    assert spaced.returncode == equals.returncode == 0, spaced.stderr + equals.stderr
    for f in ("x_train_000001.bin", "x_val_000000.bin"):
        assert (tmp_path / "spaced" / f).read_bytes() == (tmp_path / "equals" / f).read_bytes()

@pytest.mark.parametrize("args,message", [
    (["--sample=maybe"], "error: argument --sample: expected True or False, got 'maybe'"),
    (["--num_chunks=abc"], "error: argument --num_chunks: invalid int value: 'abc'"),
    (["--sample=True", "--text=a.txt"], "error: argument --text: not allowed with argument --sample"),
])
def test_cli_misuse_is_one_line_error(tmp_path, args, message):
    r = run_prepare(tmp_path, *args)
    assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1 and r.stderr.startswith(message), r.stderr
    assert os.listdir(tmp_path) == []

def test_text_too_short_to_train_on_is_refused_with_the_numbers(tmp_path):
    (tmp_path / "short.txt").write_text("A few words. " * 60)  # 241 tokens: 24 (and <|endoftext|>) for val, 217 for train
    r = run_prepare(tmp_path, "--text", "short.txt", "--out_dir", "out")
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr  # the lines before: the tokenizing bar
    assert r.stderr.strip().splitlines()[-1] == (
        "error: too little text: the val split got 25 tokens, the train split 218; each needs 513, one micro-batch of "
        "config/tiny.py plus one (batch_size * block_size + 1 = 4 * 128 + 1) for train.py: give more text, or set "
        "--min_tokens to your batch_size * block_size * processes + 1")
    assert not (tmp_path / "out").exists()  # no shards that train.py would refuse
    # small train shards: the smallest is named
    r = run_prepare(tmp_path, "--text=short.txt", "--out_dir=out", "--shard_size=100", "--min_tokens=20")
    assert "the val split got 25 tokens, the train split 18 in its smallest shard; each needs 20 (--min_tokens)" in r.stderr
    r = run_prepare(tmp_path, "--text=short.txt", "--out_dir=out", "--min_tokens=25")
    assert r.returncode == 0 and sorted(os.listdir(tmp_path / "out")) == ["text_train_000001.bin", "text_val_000000.bin"]

def test_a_host_that_does_not_resolve_is_one_line_at_once(tmp_path):
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}  # a proxy would resolve the name
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, os.path.join(HERE, "prepare_fineweb.py"), "--num_chunks=0",
                        "--base_url=http://nonexistent.invalid/data", "--data_dir=d"],
                       capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    assert time.monotonic() - t0 < 5 and r.returncode != 0, r.stderr  # no retries: 1 + 2 + 4 + 8 s of them
    assert r.stderr.strip() == ("error: fineweb_val_000000.bin: this machine cannot reach nonexistent.invalid: its name "
                                "does not resolve, no network or no DNS here")

def test_a_refused_connection_is_still_retried(tmp_path, capsys):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(RuntimeError, match="download failed after 2 tries"):
        pf.fetch(f"http://127.0.0.1:{port}/x.bin", str(tmp_path / "x.bin"), retries=2, backoff=0.001, timeout=5)
    assert "retrying in" in capsys.readouterr().err
