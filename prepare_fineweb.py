"""
Prepare GPT-2 token shards for nanoloop.

Download FineWeb 10B, already tokenized (kjj0/fineweb10B-gpt2 on Hugging Face):
    python prepare_fineweb.py                    # val + first 9 train shards (900M train tokens)
    python prepare_fineweb.py --num_chunks 103   # the full 10B tokens
Interrupted downloads resume where they stopped; finished files are skipped.

Tokenize your own UTF-8 text (one document per file, .jsonl: one {"text": ...} per line):
    python prepare_fineweb.py --text a.txt b.jsonl --name mydata   # -> data/mydata/
    python prepare_fineweb.py --text a.txt --name mydata_parcae --tokenizer=parcae-140m   # a release's tokenizer
A single document (one long .txt, like nanoGPT's Shakespeare) is split by tokens: the last
--val_fraction of them become val. Val, and every train shard, must hold one micro-batch of train.py:
--min_tokens (default 513, config/tiny.py's 4 x 128 tokens plus one).

Offline sample built from the Python docs that ship with Python (seconds; the only thing
it may fetch is tiktoken's GPT-2 BPE file, once, unless TIKTOKEN_CACHE_DIR has it):
    python prepare_fineweb.py --sample           # -> data/sample/

Options take --key value or, as in the other scripts, --key=value (--num_chunks=103, --sample=True).

Shard format: 1024-byte header of 256 little-endian int32 (magic 20240520, version 1,
token count), then the uint16 tokens. Every document starts with <|endoftext|> (50256).

Why one file of this size: the shard format has one writer and one reader, and both are here (train.py
reads with open_data and read_batch), with the three ways to make shards: download, your text, the sample.
"""

import argparse
import base64
import glob
import hashlib
import json
import os
import socket
import sys
import time
import urllib.parse

import numpy as np
import requests
import tiktoken
from tqdm import tqdm

MAGIC = 20240520
VERSION = 1
HEADER_BYTES = 256 * 4
EOT = 50256  # <|endoftext|> in the GPT-2 vocabulary
SHARD_SIZE = 10**8  # tokens per shard, same as the FineWeb shards
MIN_TOKENS = 4 * 128 + 1  # --text: fewest tokens in val or a train shard; one micro-batch of config/tiny.py + 1
BASE_URL = "https://huggingface.co/datasets/kjj0/fineweb10B-gpt2/resolve/main"

# -----------------------------------------------------------------------------
# shard files

def check_header(header, path, file_size):
    """Validate a shard header (bytes) against the file's size; return the token count."""
    if file_size < HEADER_BYTES or len(header) < HEADER_BYTES:
        raise ValueError(f"{path}: file shorter than header ({file_size} < {HEADER_BYTES} bytes)")
    magic, version, count = np.frombuffer(header[:HEADER_BYTES], dtype="<i4")[:3].tolist()
    if magic != MAGIC:
        raise ValueError(f"{path}: bad magic {magic} (expected {MAGIC}), not a token shard")
    if version != VERSION:
        raise ValueError(f"{path}: unsupported version {version} (expected {VERSION})")
    present = (file_size - HEADER_BYTES) // 2
    if count < 0 or file_size < HEADER_BYTES + 2 * count:
        raise ValueError(f"{path}: truncated: {count} tokens claimed but {present} present")
    if file_size > HEADER_BYTES + 2 * count:
        raise ValueError(f"{path}: trailing data: {count} tokens claimed but file is {file_size} bytes")
    return count

def check_shard(path):
    """Check a shard file on disk (header and size) and return its token count."""
    with open(path, "rb") as f:
        header = f.read(HEADER_BYTES)
    return check_header(header, path, os.path.getsize(path))

def write_shard(path, tokens):
    """Write header + uint16 tokens. Atomic, so a crash never leaves a half shard behind."""
    tokens = np.asarray(tokens)
    assert tokens.ndim == 1, "tokens must be a 1-D array"
    if tokens.size and (tokens.min() < 0 or tokens.max() >= 2**16):
        raise ValueError(f"{path}: token values must be in [0, 65536) to fit in uint16")
    header = np.zeros(256, dtype="<i4")
    header[:3] = MAGIC, VERSION, len(tokens)
    tmp = str(path) + ".tmp"
    with open(tmp, "wb") as f:
        f.write(header.tobytes())
        f.write(tokens.astype("<u2").tobytes())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)

def open_shard(path):
    """Check a shard and memory-map its tokens (no copy: shards are 200MB each)."""
    count = check_shard(path)
    if count == 0:  # mmap refuses zero-length maps
        return np.zeros(0, dtype=np.uint16)
    return np.memmap(path, dtype=np.uint16, mode="r", offset=HEADER_BYTES, shape=(count,))

def open_split(data_dir, split):
    """Every *_{split}_*.bin shard of data_dir, opened and checked (train.py); what is missing is one ValueError line."""
    if not os.path.isdir(data_dir):
        if os.path.exists(data_dir):
            raise ValueError(f"data_dir {data_dir} is a file, not a folder of token shards: point --data_dir at the "
                             f"folder that holds it")
        raise ValueError(f"data_dir {data_dir} does not exist: make it with python prepare_fineweb.py (--sample "
                         f"writes data/sample), or point --data_dir at a folder of *_train_*.bin and *_val_*.bin shards")
    paths = sorted(glob.glob(os.path.join(data_dir, f"*_{split}_*.bin")))
    if not paths:
        raise ValueError(f"no {split} shards (*_{split}_*.bin) in {data_dir}: run prepare_fineweb.py first")
    try:
        return [open_shard(p) for p in paths]  # checks every header and size up front
    except ValueError as e:
        raise ValueError(f"bad shard: {e}") from None


def open_data(data_dir, batch_size, block_size, world, val_tokens, train=True):
    """train.py's text: (train shards, the val tokens, the val rows every evaluation reads: the first val_tokens in
    whole batches of every rank), each checked to hold one micro-batch of every rank; a ValueError says what to lower."""
    need = batch_size * block_size * world
    smaller = (f"batch_size * block_size * processes + 1 = {batch_size} * {block_size} * {world} + 1 = {need + 1}: lower "
               f"batch_size or block_size (total_batch_size with them), run fewer processes, or prepare more text")
    train_shards = open_split(data_dir, "train") if train else []
    short = min(train_shards, key=len, default=None)
    if short is not None and len(short) < need + 1:  # +1: the last target
        where = getattr(short, "filename", None) or f"in {data_dir}"  # an empty shard is no memmap: no name
        raise ValueError(f"a train shard {where} holds {len(short)} tokens, fewer than one micro-batch needs, {smaller}")
    val = np.concatenate(open_split(data_dir, "val"))
    val_seqs = min(val_tokens, len(val) - 1) // need * batch_size * world
    if val_seqs == 0 and val_tokens < need:
        raise ValueError(f"val_tokens={val_tokens} is less than one batch of every rank, "
                         f"batch_size * block_size * processes = {need}: raise val_tokens")
    if val_seqs == 0:
        raise ValueError(f"the val shards in {data_dir} hold {len(val)} tokens, fewer than one batch of every rank "
                         f"needs, {smaller}")
    return train_shards, val, val_seqs


def read_batch(shards, pos, batch_size, block_size, rank=0, world=1):
    """The next global micro-batch of world * batch_size sequences, read sequentially from pos =
    [shard, offset] (advanced in place). Rank r gets the r-th contiguous slice as (x, y) int64 tensors
    of shape (batch_size, block_size); y is x shifted by one token. A shard too short for what is
    left moves on to the next one, the last one wraps around to the first."""
    import torch  # only the training side needs torch
    n = batch_size * block_size
    if pos[1] + world * n + 1 > len(shards[pos[0]]):
        pos[0], pos[1] = (pos[0] + 1) % len(shards), 0
    start = pos[1] + rank * n
    buf = torch.from_numpy(shards[pos[0]][start:start + n + 1].astype(np.int64))
    pos[1] += world * n
    return buf[:-1].view(batch_size, block_size), buf[1:].view(batch_size, block_size)

# -----------------------------------------------------------------------------
# downloading the FineWeb shards

class RetryableError(Exception):
    pass

# errors worth another try: the network or the server may be fine a moment later
TRANSIENT = (RetryableError, requests.ConnectionError, requests.Timeout,
             requests.exceptions.ChunkedEncodingError)

def cannot_resolve(e):
    """Whether a network error is a host name that does not resolve (offline, no DNS, a mistyped host): unlike
    a dropped connection or a busy server, trying again in a few seconds does not help."""
    seen = []
    while e is not None and not any(e is s for s in seen):  # requests wraps urllib3's error, which wraps socket's
        seen.append(e)
        if isinstance(e, socket.gaierror):
            return True
        e = getattr(e, "reason", None) or e.__cause__ or e.__context__ or \
            next((a for a in getattr(e, "args", ()) if isinstance(a, BaseException)), None)
    text = " ".join(str(s) for s in seen)  # and by its message, where some layer kept only that
    return any(m in text for m in ("Name or service not known", "Temporary failure in name resolution",
                                   "nodename nor servname", "getaddrinfo failed", "Failed to resolve"))

def fineweb_names(num_chunks):
    if not 0 <= num_chunks <= 103:
        raise ValueError(f"--num_chunks must be between 0 and 103, got {num_chunks}")
    return ["fineweb_val_000000.bin"] + [f"fineweb_train_{i:06d}.bin" for i in range(1, num_chunks + 1)]

def fetch_once(url, part, timeout, chunk_size):
    """One HTTP request, appending to `part` from where it stopped last time."""
    name = os.path.basename(part)[:-len(".part")]
    have = os.path.getsize(part) if os.path.exists(part) else 0
    headers = {"Range": f"bytes={have}-"} if have else {}
    with requests.get(url, headers=headers, stream=True, timeout=timeout) as r:
        if r.status_code == 416 and have:
            return  # nothing past what we have: .part is probably complete, the check decides
        if r.status_code == 404:
            raise RuntimeError(f"{name}: not found (HTTP 404) at {url}")
        if r.status_code == 429 or r.status_code >= 500:
            raise RetryableError(f"HTTP {r.status_code}")
        if r.status_code >= 400:
            raise RuntimeError(f"{name}: HTTP {r.status_code} at {url}")
        if have and r.status_code == 206:
            if not r.headers.get("Content-Range", "").startswith(f"bytes {have}-"):
                os.remove(part)  # server sent some other range: start over rather than guess
                raise RetryableError(f"unexpected Content-Range {r.headers.get('Content-Range')!r}")
        elif have:
            have = 0  # server ignored the Range header and sends the whole file: start over
        expected = int(r.headers["Content-Length"]) if "Content-Length" in r.headers else None
        got = 0
        with open(part, "ab" if have else "wb") as f, \
             tqdm(desc=name, total=expected and have + expected, initial=have,
                  unit="B", unit_scale=True, unit_divisor=1024) as bar:
            for chunk in r.iter_content(chunk_size):
                f.write(chunk)
                got += len(chunk)
                bar.update(len(chunk))
        if expected is not None and got < expected:
            raise RetryableError(f"connection closed after {got} of {expected} bytes")

def fetch(url, path, retries=5, backoff=1.0, timeout=60, chunk_size=1 << 20, check=check_shard):
    """Download url to path via path.part, resuming and retrying; rename only a file that passes
    check(part), which raises ValueError on a bad file (default: a token shard's header and size)."""
    name, part = os.path.basename(path), path + ".part"
    for attempt in range(retries):
        try:
            fetch_once(url, part, timeout, chunk_size)
            break
        except TRANSIENT as e:
            if isinstance(e, requests.ConnectionError) and cannot_resolve(e):
                host = urllib.parse.urlsplit(url).hostname
                raise RuntimeError(f"{name}: this machine cannot reach {host}: its name does not resolve, "
                                   f"no network or no DNS here") from None
            if attempt == retries - 1:
                raise RuntimeError(f"{name}: download failed after {retries} tries: {e}") from None
            delay = backoff * 2**attempt
            print(f"{name}: {e}; retrying in {delay:.1f}s", file=sys.stderr)
            time.sleep(delay)
    try:
        check(part)
    except ValueError as e:
        os.remove(part)  # a corrupt file must not be resumed from or renamed into place
        raise ValueError(f"{name}: downloaded file failed its check, removed it ({e})") from None
    os.replace(part, path)

def download(names, data_dir, base_url=BASE_URL, retries=5, backoff=1.0, timeout=60, chunk_size=1 << 20,
             check=check_shard):
    """Fetch each file in `names` from base_url into data_dir, skipping ones that already pass check."""
    os.makedirs(data_dir, exist_ok=True)
    for name in names:
        path = os.path.join(data_dir, name)
        if os.path.exists(path):
            try:
                check(path)
                print(f"{name}: already complete, skipping")
                continue
            except ValueError as e:
                print(f"{e}; downloading it again", file=sys.stderr)
                os.remove(path)
        fetch(f"{base_url.rstrip('/')}/{name}", path, retries, backoff, timeout, chunk_size, check)

# -----------------------------------------------------------------------------
# tokenizing local text

def read_documents(paths):
    """One document per text file; .jsonl files hold one document per line in a 'text' field."""
    docs = []
    for p in paths:
        if not os.path.isfile(p):
            raise FileNotFoundError(f"{p}: no such text file")
        try:
            # newline="" keeps the text byte-exact (no \r\n -> \n translation)
            with open(p, encoding="utf-8", newline="") as f:
                if not p.endswith(".jsonl"):
                    docs.append(f.read())
                    if not docs[-1].strip():
                        raise ValueError(f"{p}: empty file, nothing to tokenize")
                    continue
                n = len(docs)
                for i, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        docs.append(json.loads(line)["text"])
                    except (json.JSONDecodeError, KeyError, TypeError):
                        raise ValueError(f"{p}:{i}: expected a JSON object with a 'text' field") from None
                if len(docs) == n:
                    raise ValueError(f"{p}: no documents in it, nothing to tokenize")
        except UnicodeDecodeError as e:
            raise ValueError(f"{p}: not valid UTF-8 ({e})") from None
    return docs

R50K_URL = "https://openaipublic.blob.core.windows.net/encodings/r50k_base.tiktoken"
R50K_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"

def gpt2_encoding():
    # tiktoken's "r50k_base" is the GPT-2 BPE (same ranks, regex and <|endoftext|>) stored as
    # one file instead of "gpt2"'s two, so one cached file is enough to work offline
    cache = os.environ.get("TIKTOKEN_CACHE_DIR", "")
    plain = os.path.join(cache, "r50k_base.tiktoken")
    if cache and os.path.isfile(plain):
        # tiktoken's cache wants the file named by the sha1 of its URL; a copy fetched by hand keeps its
        # own name, so read that one here: lines of "base64(token bytes) rank"
        with open(plain, "rb") as f:
            data = f.read()
        if hashlib.sha256(data).hexdigest() != R50K_SHA256:
            raise SystemExit(f"error: {plain} is not tiktoken's r50k_base.tiktoken (its sha256 differs): "
                             f"fetch it again from {R50K_URL}")
        from tiktoken_ext.openai_public import r50k_pat_str
        ranks = {base64.b64decode(tok): int(rank) for tok, rank in (line.split() for line in data.splitlines() if line)}
        return tiktoken.Encoding("r50k_base", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                                 special_tokens={"<|endoftext|>": EOT}, explicit_n_vocab=EOT + 1)
    try:
        return tiktoken.get_encoding("r50k_base")
    except Exception as e:  # offline without the cached file: say what to do, not a traceback
        raise SystemExit(f"error: cannot load GPT-2's BPE (tiktoken r50k_base): {type(e).__name__}. Offline? "
                         f"Put r50k_base.tiktoken ({R50K_URL}) in a folder and set TIKTOKEN_CACHE_DIR to it") from None

def token_byte_lengths(vocab_size):
    """UTF-8 bytes of each GPT-2 token id, (vocab_size,) int64, for bits per byte. <|endoftext|> and the
    ids past the tokenizer's vocabulary (padding up to vocab_size) stand for no text: 0 bytes."""
    enc = gpt2_encoding()
    lengths = np.zeros(vocab_size, dtype=np.int64)
    for t in range(min(vocab_size, enc.n_vocab)):
        if t != EOT:
            # a token may hold part of a multi-byte character: count its bytes, not characters
            lengths[t] = len(enc.decode_single_token_bytes(t))
    return lengths

def write_shards(token_arrays, out_dir, prefix, first_index, shard_size):
    """Pack token arrays into shards of at most shard_size tokens; return [(path, count)]."""
    written, buf, n = [], [], 0
    def flush(tokens):
        path = os.path.join(out_dir, f"{prefix}_{first_index + len(written):06d}.bin")
        write_shard(path, tokens)
        written.append((path, len(tokens)))
    for toks in token_arrays:
        buf.append(toks)
        n += len(toks)
        while n >= shard_size:  # documents may straddle shards, like in FineWeb
            flat = np.concatenate(buf)
            flush(flat[:shard_size])
            buf, n = [flat[shard_size:]], n - shard_size
    if n:
        flush(np.concatenate(buf))
    # drop shards left over from an earlier, bigger run so they don't get mixed in
    for old in glob.glob(os.path.join(out_dir, f"{prefix}_*.bin")):
        if old not in {p for p, _ in written}:
            os.remove(old)
    return written

def tokenize_documents(docs, out_dir, name="text", val_fraction=0.1, val_docs=None, shard_size=SHARD_SIZE,
                       min_tokens=0, tokenizer="gpt2"):
    """Tokenize docs into NAME_val_000000.bin (first docs) and NAME_train_000001.bin ..., each document after its
    document start (GPT-2: <|endoftext|>). One document alone is split by tokens instead: its last val_fraction goes
    to val. min_tokens: fewer tokens in val (all its shards) or in a train shard is a ValueError, and no shards are
    left. tokenizer: "gpt2", or a released model whose own tokenizer to use (pretrained.py; its tokenizer.json is
    copied beside the shards, so train.py knows them for that model's)."""
    if not docs:
        raise ValueError("no documents to tokenize")
    if shard_size < 1:
        raise ValueError(f"shard_size must be positive, got {shard_size}")
    import pretrained
    tok = pretrained.release_tokenizer(tokenizer)
    if tok.n_vocab > 65536:
        raise ValueError(f"the tokenizer has {tok.n_vocab:,} ids: a uint16 shard holds ids below 65,536")
    os.makedirs(out_dir, exist_ok=True)
    marker = os.path.join(out_dir, "tokenizer.json")
    if tok.spec == "gpt2" and os.path.exists(marker):
        raise ValueError(f"{out_dir} holds shards of another tokenizer ({marker}): use another --data_dir")
    if tok.spec != "gpt2":
        with open(marker, "w", encoding="utf-8") as f:
            json.dump(tok.spec, f)
    bar = tqdm(total=len(docs), desc=f"tokenizing {name}", unit="doc")
    def tokens(ds):
        for d in ds:
            # a literal special token in the text ("<|endoftext|>") stays plain text
            toks = np.array([tok.bos] + tok.encode(d), dtype=np.uint16)
            bar.update(1)  # before the yield: one document alone is taken with next(), which never comes back here
            yield toks
    if len(docs) == 1:  # one long text: val is its tail, which starts with <|endoftext|> like every document
        whole = next(tokens(docs))
        if len(whole) < 3:
            raise ValueError(f"the text is {len(whole) - 1} token(s) long, too short to split into val and train")
        cut = len(whole) - min(max(round((len(whole) - 1) * val_fraction), 1), len(whole) - 2)
        val, train = [np.concatenate([[tok.bos], whole[cut:]]).astype(np.uint16)], [whole[:cut]]
        counts = {"val": "the last part of 1 document", "train": "the rest of it"}
    else:
        n_val = val_docs if val_docs is not None else round(len(docs) * val_fraction)
        n_val = min(max(n_val, 1), len(docs) - 1)  # both splits get at least one document
        val, train = tokens(docs[:n_val]), tokens(docs[n_val:])
        counts = {"val": f"{n_val} documents", "train": f"{len(docs) - n_val} documents"}
    splits = {"val": write_shards(val, out_dir, f"{name}_val", 0, shard_size),
              "train": write_shards(train, out_dir, f"{name}_train", 1, shard_size)}
    bar.close()
    # train.py reads the val shards as one, and a micro-batch from one train shard: it would refuse these, so say so now
    got = {"val": sum(c for _, c in splits["val"]), "train": min(c for _, c in splits["train"])}
    if min(got.values()) < min_tokens:
        for path, _ in splits["val"] + splits["train"]:
            os.remove(path)
        if not os.listdir(out_dir):
            os.rmdir(out_dir)
        smallest = " in its smallest shard" if len(splits["train"]) > 1 else ""
        need = (f"{MIN_TOKENS}, one micro-batch of config/tiny.py plus one (batch_size * block_size + 1 = 4 * 128 + 1)"
                if min_tokens == MIN_TOKENS else f"{min_tokens:,} (--min_tokens)")
        raise ValueError(f"too little text: the val split got {got['val']:,} tokens, the train split {got['train']:,}"
                         f"{smallest}; each needs {need} for train.py: give more text, "
                         f"or set --min_tokens to your batch_size * block_size * processes + 1")
    for split, shards in splits.items():
        for path, count in shards:
            print(f"{path}: {count:,} tokens")
        print(f"{split}: {counts[split]}, {sum(c for _, c in shards):,} tokens")
    return splits

def tokenize_files(paths, out_dir, name="text", **kwargs):
    return tokenize_documents(read_documents(paths), out_dir, name, **kwargs)

def sample_documents():
    """The pydoc topics that ship with Python: offline, deterministic, ~100k tokens."""
    from pydoc_data.topics import topics
    return [topics[k] for k in sorted(topics)]

def build_sample(out_dir="data/sample"):
    return tokenize_documents(sample_documents(), out_dir, "sample")

# -----------------------------------------------------------------------------

def flag(text):
    """--sample alone, or --sample=True / --sample=False as the other scripts take a bool."""
    if text not in ("True", "False"):
        raise argparse.ArgumentTypeError(f"expected True or False, got {text!r}")
    return text == "True"

def count_or_none(text):
    return None if text == "None" else int(text)

def main(argv=None):
    # argparse takes --key value and --key=value alike; flag and count_or_none add the values the other
    # scripts' --key=value allows (--sample=True, --val_docs=None)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.error = lambda message: sys.exit(f"error: {message} (python prepare_fineweb.py --help)")  # one line, no usage
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--text", nargs="+", action="extend", metavar="FILE",
                      help="tokenize these local text/.jsonl files (--text a.txt b.txt, or --text=a.txt --text=b.txt)")
    mode.add_argument("--sample", nargs="?", const=True, default=False, type=flag, metavar="True|False",
                      help="build the offline sample in data/sample")
    p.add_argument("--data_dir", "--out_dir", dest="data_dir", default=None,
                   help="output dir (default data/fineweb10B, data/NAME or data/sample)")
    p.add_argument("--num_chunks", type=int, default=9, help="FineWeb train shards to get, 100M tokens each")
    p.add_argument("--base_url", default=BASE_URL, help="where the FineWeb shards live")
    p.add_argument("--retries", type=int, default=5, help="tries per file on network errors")
    p.add_argument("--name", default="text", help="file prefix for --text shards")
    p.add_argument("--val_fraction", type=float, default=0.1, help="--text: fraction of documents for val")
    p.add_argument("--val_docs", type=count_or_none, default=None, help="--text: number of val documents (overrides)")
    p.add_argument("--shard_size", type=int, default=SHARD_SIZE, help="--text: max tokens per shard")
    p.add_argument("--tokenizer", default="gpt2", help="--text: gpt2, or a released model (pretrained.py --list, "
                   "owner/name, a folder) whose own tokenizer to use, for fine-tuning it")
    p.add_argument("--min_tokens", type=int, default=MIN_TOKENS,
                   help="--text: refuse val, or a train shard, with fewer tokens (default: a micro-batch of tiny.py + 1)")
    args = p.parse_args(argv)
    try:
        if args.sample:
            build_sample(args.data_dir or "data/sample")
        elif args.text:
            tokenize_files(args.text, args.data_dir or os.path.join("data", args.name), args.name,
                           val_fraction=args.val_fraction, val_docs=args.val_docs, shard_size=args.shard_size,
                           min_tokens=args.min_tokens, tokenizer=args.tokenizer)
        else:
            download(fineweb_names(args.num_chunks), args.data_dir or "data/fineweb10B",
                     args.base_url, retries=args.retries)
    except (OSError, ValueError, RuntimeError) as e:
        sys.exit(f"error: {e}")  # user errors get one line, not a traceback

if __name__ == "__main__":
    main()
