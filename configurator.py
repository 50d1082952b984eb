"""
Settings for train.py, sample.py, eval.py, bench.py and sweep.py, nanoGPT style: each script keeps its
settings as module-level globals and calls

    configure(globals(), sys.argv[1:])

Every argument is either a Python config file (its assignments override the globals) or
--key=value; sample.py and eval.py, which read a run's checkpoint, take --key=value only. A setting whose default is a str takes the text after = as it is (--start=1984 is the
prompt "1984"); any other value is a Python literal (--max_iters=100, --eval_loops=1,2,4), or a bare
word as a str. An unknown key or a value of the wrong type is an error that names the key.

load_checkpoint() reads and checks a checkpoint written by train.py, for every script that loads one;
save_checkpoint(), restore_state(), rng_states() and trim_log() are train.py's side of the same files;
user_errors() turns a ValueError into one line. (About 460 lines: it is every script's shared ground,
settings, device and checkpoints, and splitting it would give each script one more import to follow.)
"""
import ast
import contextlib
import difflib
import io
import os
import tokenize
import traceback


def script_settings(path, cls=None):
    """[(name, default's source text, comment, heading)] of a script's settings: its top-level `name = literal`
    assignments before its first try:, with: or configure() call. comment: the # text on the same line, with the indented
    comment-only lines right below it that continue it; heading: a comment-only line just above it (a section
    title) or None. cls: the fields of that class instead (model.py's GPTConfig: train.py's model settings).
    Read from the source text: no imports needed."""
    with open(path) as f:
        src = f.read()
    lines = src.splitlines()
    comments = {}  # line number -> (comment text, whether the line holds only the comment)
    for tok in tokenize.generate_tokens(io.StringIO(src).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = (tok.string.lstrip("#").strip(), tok.start[1] == 0)  # a top-level comment line
    settings, last, body = [], 0, ast.parse(src, path).body
    if cls:
        body = [n for n in body if isinstance(n, ast.ClassDef) and n.name == cls][0].body
        last = body[0].lineno - 1
    for node in body:
        if isinstance(node, ast.AnnAssign) and node.value is not None:  # a dataclass field: name: type = default
            node = ast.Assign(targets=[node.target], value=node.value, lineno=node.lineno)
        if isinstance(node, (ast.Try, ast.With)) or "configure(" in (ast.get_source_segment(src, node) or "").split("\n")[0]:
            break  # everything after this is the script, not settings
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            if node.targets[0].id.isupper():
                continue  # a CONSTANT, not a setting
            try:
                value = ast.literal_eval(node.value)
            except ValueError:
                continue  # not a literal: not a setting
            if not isinstance(value, (int, float, bool, str, tuple, type(None))):
                continue  # a dict or list (train.py's given = {}): configure() sets none of these
            above = [c for n, (c, alone) in comments.items() if last < n < node.lineno and alone and c.strip("-")]
            comment, alone = comments.get(node.lineno, ("", True))
            n = node.lineno + 1
            while not alone and n in comments and not comments[n][1] and lines[n - 1].lstrip().startswith("#"):
                comment, n = f"{comment} {comments[n][0]}", n + 1  # the comment goes on below
            settings.append((node.targets[0].id, ast.get_source_segment(src, node.value), "" if alone else comment,
                             above[-1] if above else None))
            last = node.lineno
    return settings


def exit_on_help(path, argv, also=()):
    """-h/--help: print the script's docstring and every setting with its default and comment, then exit 0.
    also: other scripts whose settings this one accepts too, or (path, class) for a class's fields (MODEL:
    GPTConfig's), less the fields listed above it. Reads only source text: call it before importing
    torch, and help comes at once."""
    if not {"-h", "--help"} & set(argv):
        return
    with open(path) as f:
        lines = [(ast.get_docstring(ast.parse(f.read())) or "").strip(), ""]
    listed = set()
    for p, cls in [(path, None), *((a, None) if isinstance(a, str) else a for a in also)]:
        whose = f"{os.path.basename(p)}{f' {cls}' if cls else ''}{', accepted here too' if p != path else ''}"
        lines.append(f"settings of {whose} (--key=value, or `key = value` in a config file):")
        for name, default, comment, heading in script_settings(p, cls):
            if cls and name in listed:
                continue  # a field the script sets itself (train.py's block_size): its line, not the class's
            listed.add(name)
            if heading:
                lines.append(f"  # {heading}")
            lines.append((f"  {name} = {default}".ljust(34) + (f" # {comment}" if comment else "")).rstrip())
    try:
        print("\n".join(lines), flush=True)
    except BrokenPipeError:  # `--help | head` closed the pipe early: fine, but the exit's flush must not retry
        os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
    raise SystemExit(0)


MODEL = (os.path.join(os.path.dirname(os.path.abspath(__file__)), "model.py"), "GPTConfig")  # the model's settings

# nanoGPT's names for what is called otherwise here: an unknown key that is one of these says where it went
NANOGPT = {"learning_rate": ("muon_lr", "muon_lr (Muon, the block matrices) and adam_lr (AdamW, the rest)"),
           "min_lr": ("min_lr_frac", "min_lr_frac, a fraction of each peak lr"),
           "lr_decay_iters": ("decay_frac", "decay_frac: the decay takes the last fraction of max_iters"),
           "decay_lr": ("decay_frac", "decay_frac (0 = no decay)"),
           "beta1": ("adam_betas", "adam_betas=(beta1,beta2)"), "beta2": ("adam_betas", "adam_betas=(beta1,beta2)"),
           "gradient_accumulation_steps": ("total_batch_size", "total_batch_size (tokens per step; the accumulation follows)"),
           "n_layer": ("n_core", "n_prelude, n_core and n_coda (blocks before, in and after the loop)"),
           "eval_iters": ("val_tokens", "val_tokens (a fixed prefix of the val shards)"),
           "always_save_checkpoint": ("eval_interval", "eval_interval: every evaluation checkpoints (and save_interval)")}


def _coerce(key, value, default):
    if type(default) is bool and type(value) is not bool:  # 1 == True, but --compile=1 is a guess, not a bool
        raise ValueError(f"config key {key!r} must be True or False, got {value!r}")
    if default is None:  # a None default is an optional switch (compile: None = decided by the device)
        if value is not None and type(value) is not bool:
            raise ValueError(f"config key {key!r} must be True, False or None, got {value!r}")
        return value
    if type(value) is type(default):
        return value
    if type(default) is float and type(value) is int:
        return float(value)
    if type(default) is tuple and type(value) in (int, float, list):  # --eval_loops=4, --exit_thresholds=0.5, a list
        return tuple(value) if isinstance(value, list) else (value,)
    raise ValueError(f"config key {key!r} expects {type(default).__name__} (default {default!r}), "
                     f"got {type(value).__name__} {value!r}")


def _parse(text):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # a bare word is a string: --device=cuda


def _run_dir(arg):
    """The run a stray argument of sample.py or eval.py most likely names: the folder itself, a checkpoint's
    folder, or the out_dir a config file sets (read from its source, not run)."""
    if os.path.basename(arg) == "ckpt.pt":
        return os.path.dirname(arg) or "."
    if os.path.isdir(arg) or not (os.path.exists(arg) or arg.endswith(".py")):
        return arg
    try:
        with open(arg) as f:
            tree = ast.parse(f.read())
    except (OSError, SyntaxError, ValueError):
        return "DIR"
    for node in tree.body:
        if isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == ["out_dir"] \
                and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            return f"{node.value.value} (the out_dir {arg} sets)"
    return "DIR"


def configure(settings, argv, config_files=True, given=None):
    """Override the keys of settings (a script's globals) from config files and --key=value args.
    Returns the set of keys given on the command line (they outrank a resumed checkpoint's settings).
    config_files=False: a script that reads a run's checkpoint (its settings are in it) takes --key=value only.
    given: a dict that receives every key a config file or the command line set, and where ("command line" or the
    file): a release's model settings must not be contradicted, and a resumed run names a file it overrides (train.py)."""
    # the settings: lower-case literals; not the modules, functions and CONSTANTS among the globals
    known = [k for k, v in settings.items() if not k.startswith("_") and not k.isupper()
             and isinstance(v, (int, float, bool, str, tuple, type(None)))]
    script = os.path.basename(settings.get("__file__") or "the script")

    def assign(key, value, where):
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            if key in NANOGPT and NANOGPT[key][0] in known:
                raise ValueError(f"unknown config key {key!r} ({where}): nanoGPT's {key} is {NANOGPT[key][1]} here")
            raise ValueError(f"unknown config key {key!r} ({where}): " +
                             (f"did you mean {close[0]}?" if close else f"python {script} --help lists every setting"))
        settings[key] = _coerce(key, value, settings[key])
        if given is not None:  # the command line stays the command line's, whatever a later file sets
            given[key] = "command line" if given.get(key) == "command line" else where

    on_command_line = set()
    for arg in argv:
        if arg.startswith("--"):
            if "=" not in arg:
                raise ValueError(f"expected --key=value, got {arg!r}")
            key, text = arg[2:].split("=", 1)
            # a str setting keeps the text as typed: a prompt of 1984 or None, quotes and all
            assign(key, text if isinstance(settings.get(key), str) else _parse(text), "command line")
            on_command_line.add(key)
        elif not config_files:
            raise ValueError(f"{script} takes no config file: point it at a run with --out_dir={_run_dir(arg)}")
        elif os.path.isdir(arg):
            found = sorted(f for f in os.listdir(arg) if f.endswith(".py"))
            example = "tiny.py" if "tiny.py" in found else found[0] if found else None
            raise ValueError(f"{arg} is a folder, not a config file: " + (f"name a file in it, e.g. "
                             f"{os.path.join(arg, example)}" if example else "name a .py file of key = value lines"))
        else:
            scope = {}
            try:
                with open(arg) as f:
                    source = f.read()
            except FileNotFoundError:
                raise ValueError(f"config file {arg!r} not found") from None
            except UnicodeDecodeError:  # a checkpoint, a shard ...
                raise ValueError(f"{arg} is not a config file: not UTF-8 text") from None
            except OSError as e:
                raise ValueError(f"cannot read config file {arg!r}: {e.strerror}") from None
            try:  # a checkpoint or some other file given by mistake, or a config with a bug: its line, no traceback
                exec(compile(source, arg, "exec"), scope)
            except Exception as e:
                tb = [fr.lineno for fr in traceback.extract_tb(e.__traceback__) if fr.filename == arg]
                line = e.lineno if isinstance(e, SyntaxError) else tb[-1] if tb else None
                raise ValueError(f"config file {arg}{f' line {line}' if line else ''}: {type(e).__name__}: "
                                 f"{getattr(e, 'msg', None) or e}") from None
            for key, value in scope.items():
                if not key.startswith("_") and not callable(value) and not hasattr(value, "__spec__"):
                    assign(key, value, arg)
    return on_command_line


@contextlib.contextmanager
def user_errors(*kinds):
    """Inside it a ValueError (or one of kinds) is the user's: a bad setting, file or checkpoint, said in one line
    (error: ...) with exit status 1 and no traceback. The scripts' setup runs in these."""
    try:
        yield
    except (ValueError, *kinds) as e:
        raise SystemExit(f"error: {e}") from None


def check_device(device, dtype):
    """(device, device_type, dtype) with "auto" resolved, checked before any data or model is loaded: a device
    this machine lacks or an unknown dtype is a one-line ValueError; float16 on a CPU warns (it is emulated)."""
    import sys
    import torch
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    kind, _, index = device.partition(":")
    if kind not in ("cpu", "cuda", "mps") or (":" in device and (kind != "cuda" or not index.isdigit())):
        raise ValueError(f"unknown device {device!r}: use auto, cpu, cuda, cuda:N or mps")
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r}: torch {torch.__version__} sees no CUDA GPU (none here, no driver, or a "
                         f"CPU-only build): use --device=cpu")
    if index and int(index) >= torch.cuda.device_count():
        raise ValueError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                         f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise ValueError("device 'mps': this machine or torch build has no MPS (Apple GPU) support: use --device=cpu")
    if dtype == "auto":
        dtype = "bfloat16" if kind == "cuda" else "float32"
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"dtype must be auto, float32, bfloat16 or float16, got {dtype!r}")
    if kind == "cuda" and dtype == "bfloat16" and not torch.cuda.is_bf16_supported():
        raise ValueError("this GPU has no bfloat16 support: use --dtype=float32")
    if kind == "cpu" and dtype == "float16":
        print("warning: float16 on a CPU is emulated and can be 10x slower than float32 (--dtype=float32)",
              file=sys.stderr)
    return device, kind, dtype


# Dense bf16 tensor-core peaks (FLOP/s) from NVIDIA's datasheets, by a part of torch.cuda.get_device_name(); the
# first match wins, so the PCIe and NVL parts come before the SXM ones that share their name. A large bf16 matmul
# reaches about 80% of these (about 790 of 989 TFLOP/s on an H100 or H200): bench.py measures its peak, train.py's
# MFU is against these, as nanoGPT's is.
DATASHEET_BF16_PEAK = (("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H200 NVL", 835e12), ("GH200", 989e12),
                       ("H100", 989e12), ("H200", 989e12), ("A100", 312e12), ("GB200", 2500e12), ("B200", 2250e12))


def datasheet_peak(device_name, dtype):
    """The datasheet peak for a GPU's name in bf16 or fp16, else 0.0 (MFU n/a: fp32 runs no such peak)."""
    if dtype not in ("bfloat16", "float16"):
        return 0.0
    return next((peak for part, peak in DATASHEET_BF16_PEAK if part in device_name), 0.0)


def load_checkpoint(path, need=(), text=False):
    """The checked dict of a train.py checkpoint (on the CPU). Anything wrong with the file is a ValueError
    with a one-line message naming it; keys model_args lacks are settings added later (their defaults).
    need: further keys the caller uses (resuming needs the optimizer, data position ...).
    text: the caller reads GPT-2 text (sample.py, eval.py), which a model trained on a task (tasks.py) cannot."""
    import torch
    from model import GPTConfig
    if not os.path.exists(path):
        raise ValueError(f"no checkpoint at {path}: train a model first (python train.py ...), "
                         f"or point --out_dir at its directory")
    if os.path.getsize(path) == 0:
        raise ValueError(f"{path} is empty (0 bytes): the run that wrote it did not finish")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated zip, another format, a pickle with code in it ...
        why = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(f"cannot read {path}: {why}") from None
    incompatible = f"{path} is incompatible with this code"
    if not isinstance(ckpt, dict) or not {"model", "model_args"} <= ckpt.keys():
        have = sorted(ckpt) if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ValueError(f"{incompatible}: expected keys 'model' and 'model_args', found {have}")
    if ckpt.get("version") != 1:
        raise ValueError(f"{incompatible}: checkpoint version {ckpt.get('version')!r}, this code reads version 1")
    unknown = sorted(ckpt["model_args"].keys() - {f for f in GPTConfig.__dataclass_fields__})
    if unknown:
        raise ValueError(f"{incompatible}: model_args keys unknown to GPTConfig {unknown}")
    task = ckpt.get("config", {}).get("task")
    if text and task:
        raise ValueError(f"{path} was trained on the {task!r} task (tasks.py), not on GPT-2 text: evaluate it by "
                         f"depth with python train.py --out_dir={os.path.dirname(path) or '.'} --eval_only=True")
    missing = [k for k in need if k not in ckpt]
    if missing:
        raise ValueError(f"{path} has no {missing[0]!r}: it cannot be resumed, only evaluated or sampled from")
    return ckpt


def check_stages(exit_gate, exit_beta, train_gate, mean_recurrence, backprop_depth, init_from, exit_thresholds):
    """What is wrong with a training run's settings for Ouro's two stages (README "Ouro"), or None."""
    return next((why for bad, why in (
        (exit_beta < 0, f"exit_beta must be >= 0, got {exit_beta}"),
        (exit_beta > 0 and not exit_gate, "exit_beta > 0 (Stage I) trains an exit gate: set exit_gate=True"),
        (exit_beta > 0 and mean_recurrence < 2, "Stage I (exit_beta > 0) learns when to stop among T_max = "
         "mean_recurrence >= 2 steps; at 1 there is nothing to learn"),
        (exit_beta > 0 and backprop_depth < mean_recurrence,
         f"Stage I (exit_beta > 0) backpropagates through every step: set backprop_depth >= mean_recurrence "
         f"= {mean_recurrence}, got {backprop_depth}"),
        (exit_gate and exit_beta == 0 and not train_gate,
         "exit_gate=True: train the gate with Stage I (exit_beta > 0, e.g. 0.1) or, from a Stage I checkpoint, "
         "Stage II (--train_gate=True); otherwise it stays at its init"),
        (train_gate and init_from != "resume", "train_gate=True (Stage II) continues a Stage I run: add "
         "--init_from=resume and --out_dir of that run"),
        (not all(type(q) in (int, float) and 0 <= q <= 1 for q in exit_thresholds),
         f"exit_thresholds must be values q in [0, 1], got {exit_thresholds!r}")) if bad), None)


def resume_settings(ckpt, settings, given):
    """train.py resuming or evaluating a checkpoint: the run's own settings (data_dir, batch sizes ...) outrank a
    config file's, the command line's outrank both. Returns those to use, those that differ from the config's, and
    {config file: [its keys the checkpoint's outrank]}, for the log to say so."""
    cli = {k for k, where in given.items() if where == "command line"}
    saved = {k: v for k, v in ckpt.get("config", {}).items() if k in settings and k not in cli and k not in
             ("init_from", "eval_only", "overwrite", "out_dir", "wandb_log", "wandb_project", "wandb_run_name")}
    from_ckpt, from_file = {k: v for k, v in saved.items() if v != settings[k]}, {}
    for k in (k for k in from_ckpt if k in given):
        from_file.setdefault(given[k], []).append(k)
    return saved, from_ckpt, from_file


def save_checkpoint(ckpt, path):
    """Atomic: write a temp file, fsync, rename; a crash leaves the previous checkpoint intact."""
    import torch
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        torch.save(ckpt, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def rng_states(ddp, world, cuda):
    """Every rank's RNG states, for a checkpoint (a collective: every rank calls it); a resume restores each its own."""
    import torch
    rng = {"cpu": torch.get_rng_state(), **({"cuda": torch.cuda.get_rng_state()} if cuda else {})}
    if not ddp:
        return [rng]
    rngs = [None] * world
    torch.distributed.all_gather_object(rngs, rng)
    return rngs


def restore_state(ckpt, path, optimizers, rank, cuda, optimizer=True):
    """A resumed run's optimizer states (optimizer=False: a new optimizer, Stage II's first step) and this rank's
    RNG, so its depth and h0 draws continue where they stopped; what does not fit is one ValueError line."""
    import torch
    try:
        if optimizer:
            for opt, state in zip(optimizers, ckpt["optimizer"], strict=True):
                opt.load_state_dict(state)
        rng = ckpt["rng"][rank % len(ckpt["rng"])]
        torch.set_rng_state(rng["cpu"])
        if cuda and "cuda" in rng:
            torch.cuda.set_rng_state(rng["cuda"])
    except (ValueError, KeyError, TypeError, RuntimeError, ZeroDivisionError) as e:
        raise ValueError(f"{path}: its optimizer or RNG state does not fit this model: "
                         f"{' '.join(str(e).split()) or type(e).__name__}") from None


def trim_log(path, iter_num):
    """A resumed run runs again the steps logged after its checkpoint (then Ctrl-C or a crash): drop their records
    from log.jsonl, and the record of a run that started at iter_num but never saved. Returns how many went."""
    import json
    if not os.path.exists(path):
        return 0
    with open(path) as f:
        lines = f.readlines()
    keep = [l for l in lines if (r := json.loads(l)).get("iter", 0) < iter_num
            or (r.get("iter", 0) == iter_num and "run" not in r)]
    if len(keep) < len(lines):
        with open(path + ".tmp", "w") as f:
            f.writelines(keep)
        os.replace(path + ".tmp", path)
    return len(lines) - len(keep)


def flat(record, prefix=""):
    """{"val": {4: 3.2}, "ce_steps": [..]} -> {"val/4": 3.2, "ce_steps/0": ..}: a record's numbers, for wandb."""
    items = record.items() if isinstance(record, dict) else enumerate(record)
    out = {}
    for k, v in items:
        if isinstance(v, (dict, list, tuple)):
            out.update(flat(v, f"{prefix}{k}/"))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[f"{prefix}{k}"] = v
    return out


def model_from_checkpoint(ckpt, path, overrides=None):
    """GPT built from a load_checkpoint() dict with its weights; a mismatch is a one-line ValueError.
    overrides: model settings that do not change the weights (eval_state) to use instead of the checkpoint's."""
    from model import GPT, GPTConfig
    try:
        model = GPT(GPTConfig(**{**ckpt["model_args"], **(overrides or {})}))
        model.load_state_dict(ckpt["model"])
    except (ValueError, TypeError, RuntimeError) as e:  # bad values, or weights of another shape
        raise ValueError(f"{path} does not fit this model.py: {' '.join(str(e).split())}") from None
    return model


def run_record(device, **fields):
    """What produced a run (README "Pictures, records and Weights & Biases"): the command, the code (git commit,
    and whether the tree had uncommitted changes), torch, Python, the device and the start time, plus the caller's fields. Without git,
    or outside a repository, the code fields say "unknown"; nothing here can fail a run."""
    import datetime
    import platform
    import subprocess
    import sys

    import torch

    def git(*args):
        try:
            r = subprocess.run(["git", *args], cwd=os.path.dirname(os.path.abspath(__file__)), capture_output=True,
                               text=True, timeout=10)
            return r.stdout if r.returncode == 0 else None
        except (OSError, subprocess.SubprocessError):
            return None
    commit, status = git("rev-parse", "HEAD"), git("status", "--porcelain", "--untracked-files=no")
    cuda = str(device).startswith("cuda")
    return {"command": " ".join([os.path.basename(sys.executable), *sys.argv]),
            "commit": commit.strip() if commit else "unknown",
            "dirty": bool(status.strip()) if status is not None else "unknown",
            "torch": str(torch.__version__), "python": platform.python_version(),  # str: TorchVersion is no safe global
            "device": torch.cuda.get_device_name(device) if cuda else (platform.processor() or platform.machine() or str(device)),
            "device_count": torch.cuda.device_count() if cuda else 1,
            "start": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), **fields}


def fit_saturating_exp(T, L):
    """Least squares L(T) = L_inf + Z exp(-z T): a grid over z, closed form for (L_inf, Z). Parcae's law of
    loss against test-time depth; train.py's eval_only and plot.py fit it."""
    import numpy as np

    T, L = np.asarray(T, float), np.asarray(L, float)
    best = None
    for z in np.geomspace(1e-3, 10, 2000):
        X = np.stack([np.ones_like(T), np.exp(-z * T)], 1)
        coef, *_ = np.linalg.lstsq(X, L, rcond=None)
        rms = float(np.sqrt(np.mean((X @ coef - L) ** 2)))
        if best is None or rms < best[-1]:
            best = (coef[0], coef[1], z, rms)
    return best


def fit_line(losses):
    """train.py --eval_only's last line: the fit of {T: loss} (3 depths or more), and what an edge of its z range means."""
    L_inf, Z, z, rms = fit_saturating_exp(list(losses), list(losses.values()))
    edge = (" (z at the bottom of its search range: these losses do not level off with depth)" if z <= 1.1e-3 else
            " (z at the top of its search range: the loss settles within a step or two)" if z >= 9.9 else "")
    return f"fit L(T) = {L_inf:.4f} + {Z:.4f} * exp(-{z:.4f} T), rms residual {rms:.5f}{edge}"
