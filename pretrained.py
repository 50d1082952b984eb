"""
Released looped LMs in nanoloop's own model: found by name, converted exactly, checked tensor by tensor.

    python pretrained.py looplm-135m-naive                # the check to run first (below)
    python pretrained.py harims95/LoopLM-135M-naive@main  # any hub repo of a known family, at a revision
    python pretrained.py path/to/LoopLM-135M-naive        # a local folder in the release's layout: no network
    python pretrained.py --list                           # the short names and their hub repos

    from pretrained import load
    model, tok = load("looplm-135m-naive")                # a model.GPT in eval mode, and the release's tokenizer
    logits, _ = model(torch.tensor([tok.encode("The loop")]), num_loops=6)   # any test-time depth

The scripts take the same names: sample.py, eval.py and bench.py --init_from=NAME, and train.py
--init_from=NAME fine-tunes. The check prints where the files came from (repo, revision, sha256), how each
config.json field maps to a GPTConfig setting, what became of every tensor in the file, the parameter count,
and the loss and bits per byte of a short built-in text at a few depths.

How a load works, and why it cannot load something silently wrong:
1. config.json names the family (never the release's name). Each field maps to a setting, or is named as
   unused with the reason; a field this loader does not know, or a value nanoloop does not compute, is an
   error naming it (a hub's bookkeeping fields, such as architectures or auto_map, excepted).
2. The weights file's header lists its tensors. Before any value is read, each must be consumed by a
   parameter (fused matrices are split by rows) or dropped for a stated reason; each parameter must be
   filled; every shape must be what the config implies and every dtype one float type.
3. A dropped tensor is checked first (a tied head's stored copy must equal the embedding).
4. The values go straight into the parameters: a safetensors file is memory-mapped and, in the file's dtype,
   each parameter is a view of it (split rows are views too), so a load holds one copy of the weights.
Downloads are huggingface_hub's (its cache, resume, progress bars, HF_TOKEN, revisions, HF_HUB_OFFLINE);
nothing in a release is executed. The tests prove each family's map against its official code on tiny
release-format fixtures and against the real releases' key inventories; the real files are checked by
this script, on a machine that has them.

Why one file of this size: each family's map (config fields, key plan, transforms, tokenizer) is a
function here, read beside the others it must agree with, and the shared machinery (files, checks,
tokenizers) is what makes every map refuse by name; split up, a reader would chase one load across files.
"""
import dataclasses
import difflib
import hashlib
import json
import math
import os
import re
import socket
import sys
import urllib.parse

RELEASES = {  # short name: hub repo
    "looplm-135m-naive": "harims95/LoopLM-135M-naive",
    "parcae-140m": "SandyResearch/parcae-140m",
    "parcae-370m": "SandyResearch/parcae-370m",
    "parcae-770m": "SandyResearch/parcae-770m",
    "parcae-1.3b": "SandyResearch/parcae-1.3b",
    "ouro-1.4b": "ByteDance/Ouro-1.4B",
    "ouro-2.6b": "ByteDance/Ouro-2.6B",
    "ouro-1.4b-thinking": "ByteDance/Ouro-1.4B-Thinking",
    "ouro-2.6b-thinking": "ByteDance/Ouro-2.6B-Thinking",
}
# the settings a user may change on a release: which depths run, how h0 is drawn, how much memory a step
# takes, and a shorter context (block_size, shrink only). Every other GPTConfig setting is the release's.
FREE = ("mean_recurrence", "backprop_depth", "depth_sampling", "state_init", "eval_state", "loop_checkpoint",
        "block_size", "readout_q", "attn_impl")
HUB_FIELDS = ("architectures", "auto_map", "model_type", "torch_dtype", "dtype", "transformers_version",
              "_name_or_path")  # the hub's bookkeeping: no effect on what the weights compute
DTYPES = {"F64": "float64", "F32": "float32", "BF16": "bfloat16", "F16": "float16"}  # safetensors' names
TEXT = ("The lighthouse keeper climbed the stairs every evening, counting the steps as his father had taught "
        "him. There were one hundred and twelve of them, and on windy nights the tower hummed like a bottle "
        "when someone blows across its neck. He lit the lamp, wiped the salt from the glass, and wrote the "
        "time in a small book with a blue cover. Ships passed far out on the water. Most of them never knew "
        "his name, but they knew the light, and that was enough for him.")  # the check's built-in text


class ReleaseError(ValueError):
    """A release that cannot be loaded exactly; the message is one line naming the file, key or field."""


# -----------------------------------------------------------------------------
# where the files come from


def hub_offline():
    """HF_HUB_OFFLINE, or a hub host that does not resolve (and no proxy that could resolve it): then only the
    cache is read; huggingface_hub would otherwise retry for about 20 s before it looks in its cache."""
    from huggingface_hub import constants
    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY",
                                       "all_proxy")):
        return None  # the proxy resolves the host, not this machine
    host = urllib.parse.urlparse(constants.ENDPOINT).hostname
    try:
        socket.getaddrinfo(host, 443)
    except (socket.gaierror, UnicodeError):
        return f"{host} does not resolve"
    return None


def sha256(path):
    """The sha256 of the file's bytes (about 1 s per GB); the hub lists the same for a file stored with LFS."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


class Files:
    """A release's files: a local folder as it is, or a hub repo through huggingface_hub's cache."""

    def __init__(self, name):
        self.name, self.paths = name, {}  # paths: {file name: local path} of the files read so far
        self.folder = self.repo = self.revision = self.commit = self.weights = None
        if os.path.isdir(name):
            self.folder = name
            return
        repo, _, revision = name.partition("@")
        if repo in RELEASES:
            repo = RELEASES[repo]
        elif not re.fullmatch(r"[\w.-]+/[\w.-]+", repo) or repo.startswith("."):
            close = difflib.get_close_matches(name, RELEASES, n=1)
            raise ReleaseError(f"unknown release {name!r}: " + (f"did you mean {close[0]}? " if close else "") +
                               f"give a short name ({', '.join(RELEASES)}), a hub repo owner/name[@revision], "
                               f"or a local folder")
        self.repo, self.revision, self.offline = repo, revision or None, hub_offline()

    def where(self):
        return self.folder or f"{self.repo}" + (f"@{self.revision}" if self.revision else "")

    def path(self, filename, required=True):
        """The local path of one file (downloaded first if need be), or None for a missing optional file."""
        if self.folder is not None:
            p = os.path.join(self.folder, filename)
            if os.path.isfile(p):
                self.paths[filename] = p
                return p
            if required:
                raise ReleaseError(f"{self.folder} has no {filename}: a release folder holds the files of the hub "
                                   f"repo as they are (config.json and the weights file)")
            return None
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import (EntryNotFoundError, GatedRepoError, HfHubHTTPError,
                                            LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError)
        try:
            p = hf_hub_download(self.repo, filename, revision=self.revision, local_files_only=bool(self.offline))
        except GatedRepoError:
            raise ReleaseError(f"{self.repo} is gated: accept its terms on the hub and set HF_TOKEN") from None
        except RepositoryNotFoundError:
            raise ReleaseError(f"no repo {self.repo} on the hub (a private one needs HF_TOKEN), nor a local folder "
                               f"{self.name}") from None
        except RevisionNotFoundError:
            raise ReleaseError(f"{self.repo} has no revision {self.revision!r}") from None
        except LocalEntryNotFoundError:
            if not required:
                return None
            why = self.offline or "the hub could not be reached"
            raise ReleaseError(f"{self.where()}: {filename} is not in the Hugging Face cache and {why} (nor is there "
                               f"a local folder {self.name}): download it where there is network (python "
                               f"pretrained.py {self.name}), or pass a local folder holding the repo's files") from None
        except EntryNotFoundError:
            if not required:
                return None
            raise ReleaseError(f"{self.where()} has no {filename}") from None
        except HfHubHTTPError as e:
            raise ReleaseError(f"{self.where()}: {filename}: {' '.join(str(e).split())}") from None
        except Exception as e:  # the network library's own errors after huggingface_hub's retries, a full disk ...
            why = " ".join(str(e).split()) or "no message"
            raise ReleaseError(f"{self.where()}: downloading {filename} failed ({type(e).__name__}: {why}): run the "
                               f"same command again to resume it, or pass a local folder") from None
        self.commit = os.path.basename(os.path.dirname(p))  # the cache's snapshots/<commit>/<file>
        self.paths[filename] = p
        return p

    def record(self):
        """The release's name, hub repo and commit (or its folder), and each file's sha256."""
        return {"name": self.name, "repo": self.repo, "revision": self.commit,
                "folder": os.path.abspath(self.folder) if self.folder else None,
                "files": {f: sha256(p) for f, p in self.paths.items()}}


# -----------------------------------------------------------------------------
# reading a weights file: names, shapes and dtypes from the header alone, values on demand


class SafetensorsFile:
    def __init__(self, path):
        from safetensors import safe_open
        self.path = path
        try:
            self.f = safe_open(path, "pt")
        except Exception as e:  # safetensors' own error: a truncated file, another format ...
            raise ReleaseError(f"{path}: not a complete safetensors file ({' '.join(str(e).split())}): "
                               f"download it again") from None
        self.meta = {}
        for k in self.f.keys():
            s = self.f.get_slice(k)
            self.meta[k] = (tuple(s.get_shape()), DTYPES.get(s.get_dtype(), s.get_dtype()))

    def get(self, key):
        return self.f.get_tensor(key)  # a view of the memory-mapped file: nothing is read until it is used

    def copy(self, key):
        """One tensor read into memory of its own with plain reads, not through the mapping: a load that casts
        (Ouro's bf16 file to fp32) then peaks at its result plus one tensor, not plus the whole file's pages."""
        import torch
        with open(self.path, "rb") as f:
            if not hasattr(self, "offsets"):  # the format: the header's length, the JSON header, the data
                n = int.from_bytes(f.read(8), "little")
                self.offsets = {k: (8 + n + v["data_offsets"][0], 8 + n + v["data_offsets"][1])
                                for k, v in json.loads(f.read(n)).items() if k != "__metadata__"}
            begin, end = self.offsets[key]
            f.seek(begin)
            buf = bytearray(end - begin)
            if f.readinto(buf) != len(buf):
                raise ReleaseError(f"{self.path}: tensor {key!r} is cut short: download the file again")
        shape, dtype = self.meta[key]
        return torch.frombuffer(buf, dtype=getattr(torch, dtype)).view(shape) if buf else self.get(key)

    def again(self):
        return SafetensorsFile(self.path)  # the same file, mapped once more


class TorchFile:
    """A pytorch_model.bin (a zip of tensors): read with weights_only (no code runs) and memory-mapped."""

    def __init__(self, path):
        import torch
        self.path = path
        try:
            self.tensors = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # a truncated zip, a pickle with code in it, another format ...
            why = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise ReleaseError(f"{path}: not a complete PyTorch weights file ({why}): download it again") from None
        if not isinstance(self.tensors, dict) or not all(isinstance(v, torch.Tensor) for v in self.tensors.values()):
            raise ReleaseError(f"{path}: not a dict of tensors")
        self.meta = {k: (tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in self.tensors.items()}

    def get(self, key):
        return self.tensors[key]

    copy = get  # read through a mapping of its own (again()), unmapped after the load

    def again(self):
        return TorchFile(self.path)


class Inventory:
    """A release's tensor list (name: [shape, dtype]) standing in for its file: values on the meta device."""

    def __init__(self, tensors):
        self.meta = {k: (tuple(shape), dtype) for k, (shape, dtype) in tensors.items()}

    def get(self, key):
        import torch
        shape, dtype = self.meta[key]
        return torch.empty(shape, dtype=getattr(torch, dtype), device="meta")

    copy = get

    def again(self):
        return self


# -----------------------------------------------------------------------------
# the families: config.json -> GPTConfig settings, and the file's tensors -> parameters


def family(c):
    """The family a config.json belongs to, by its fields; None if no family here has them."""
    if c.get("_class_name") == "ParcaeConfig":
        return "Parcae"
    if c.get("model_type") == "ouro" or "OuroForCausalLM" in (c.get("architectures") or []):
        return "Ouro"
    if {"d_model", "mu_rec", "n_prelude", "n_coda", "dense_ffn"} <= c.keys():
        return "LoopLM"
    return None


def map_fields(c, rules):
    """Apply rules {field: (type, rule)} to config.json's dict c; rule(value) -> ({setting: value}, note) or
    raises. Every field needs a rule or is the hub's bookkeeping. Returns the settings and the mapping's lines."""
    unknown = [k for k in c if k not in rules and k not in HUB_FIELDS]
    if unknown:
        raise ReleaseError(f"field {unknown[0]!r} = {json.dumps(c[unknown[0]])} is unknown to this loader: it may "
                           f"change what the model computes, so the release is refused rather than loaded differently")
    settings, lines = {}, []
    for k, (kind, rule) in rules.items():
        if k not in c:
            raise ReleaseError(f"no field {k!r}: not a whole config of this family")
        v = c[k]
        if isinstance(v, bool) != (kind is bool) or not isinstance(v, kind):  # JSON true is no number here
            kinds = " or ".join(t.__name__ for t in (kind if isinstance(kind, tuple) else (kind,)))
            raise ReleaseError(f"field {k!r} = {json.dumps(v)} should be {kinds}")
        try:
            got, note = rule(v)
        except ReleaseError as e:  # a value nanoloop does not compute: the field, the value and why
            raise ReleaseError(f"field {k!r} = {json.dumps(v)}: {e}") from None
        settings.update(got)
        mapped = ", ".join(f"{s}={g!r}" for s, g in got.items())
        lines.append((f"{k} = {json.dumps(v)}", f"{mapped} ({note})" if mapped and note else
                      mapped or note or "as nanoloop computes it"))
    lines += [(f"{k} = {json.dumps(c[k])}", "not used: the hub's bookkeeping") for k in c if k in HUB_FIELDS]
    return settings, lines


def to(setting):
    """A rule that takes a field's value as this setting's."""
    return lambda v: ({setting: v}, "")


def unused(why):
    return lambda v: ({}, f"not used: {why}")


def only(value, settings, note, why):
    """A rule that accepts one value of a field (mapped to settings) and refuses any other, saying why."""
    def rule(v):
        if v != value:
            raise ReleaseError(why)
        return settings, note
    return rule


def looplm(c, optional, keys):
    """LoopLM (harims95/LoopLM: looplm/model.py, looplm/parcae.py). One pre-norm block looped on block(h + e),
    SwiGLU with a fused w13 = [gate; up], GQA with a fused qkv = [q; k; v] and learnable QK-norm gains applied
    before rotate-half RoPE, RMSNorm eps 1e-6 everywhere, keys prefixed model., the tied head stored as a copy.
    optional(filename) is the path of a release file or None; keys, the weights file's tensor names."""
    d, nq = c.get("d_model"), c.get("n_q_heads")

    def head_dim(v):
        if not (isinstance(d, int) and isinstance(nq, int) and v * nq == d):
            raise ReleaseError(f"with d_model = {d} and n_q_heads = {nq}: nanoloop's head dim is n_embd / n_head")
        return {}, "= d_model / n_q_heads"
    number = (int, float)
    settings, lines = map_fields(c, {
        "vocab_size": (int, to("vocab_size")),
        "d_model": (int, to("n_embd")),
        "n_prelude": (int, to("n_prelude")),
        "n_coda": (int, to("n_coda")),
        "mu_rec": (int, lambda v: ({"mean_recurrence": v, "backprop_depth": math.ceil(v / 2)},
                                   "its depth, and its ceil(mu_rec / 2) gradient steps")),
        "n_q_heads": (int, to("n_head")),
        "n_kv_heads": (int, to("n_kv_head")),
        "head_dim": (int, head_dim),
        "qk_norm": (bool, only(True, {"qk_norm": "gain"}, "RMSNorm(head_dim) with a gain",
                               "LoopLM without QK-norm is not a model nanoloop computes")),
        "rope_theta": (number, lambda v: ({"rope_base": float(v)}, "rotate-half")),
        "dense_ffn": (int, lambda v: ({"mlp": "swiglu", "mlp_hidden": v}, "SwiGLU")),
        "tie_embeddings": (bool, only(True, {}, "the head is the embedding", "an untied LoopLM head is not supported")),
        "final_z_loss_coef": (number, unused("a training loss term; the logits do not depend on it")),
        "use_a_matrix": (bool, only(False, {"injection": "add"}, "the naive loop block(h + e)",
                                    "LoopLM's A-matrix loop (decay h + dt B e, no output projection) is not supported")),
        "use_input_norm": (bool, to("prelude_norm")),
        "init_std": (number, unused("initialisation only")),
        **({"preset": (str, unused("the training preset's name"))} if "preset" in c else {}),
    })
    spec = optional("spec.json")  # its training run's settings: the context length it trained on
    seq_len = 1024
    if spec is not None:
        try:
            with open(spec) as f:
                seq_len = json.load(f)["train_config"]["seq_len"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ReleaseError(f"{spec}: no train_config.seq_len ({type(e).__name__})") from None
        if type(seq_len) is not int or seq_len < 1:
            raise ReleaseError(f"{spec}: train_config.seq_len = {json.dumps(seq_len)} is no sequence length")
    settings.update(n_core=1, norm_eps=1e-6, depth_sampling="sequence", state_init="normal", block_size=seq_len)
    lines += [("(its loop is one block, model.loop)", "n_core=1"),
              ("(looplm/model.py, every RMSNorm)", "norm_eps=1e-06"),
              ("(its training draws a Poisson depth per sequence, capped at 4 mu_rec)", "depth_sampling='sequence'"),
              ("(its h0 = 0.02 randn at every forward)", "state_init='normal' (eval_state stays 'zero' unless set)"),
              (f"({'spec.json: trained on' if spec else 'no spec.json: LoopLM trains on'} {seq_len} tokens)",
               f"block_size={seq_len}")]

    def block(src, dst):  # one pre-norm block of looplm/model.py -> nanoloop's Block
        return {f"{src}attn_norm.weight": [f"{dst}ln_1.weight"],
                f"{src}attn.qkv.weight": [f"{dst}attn.q.weight", f"{dst}attn.k.weight", f"{dst}attn.v.weight"],
                f"{src}attn.proj.weight": [f"{dst}attn.o.weight"],
                f"{src}attn.q_norm.weight": [f"{dst}attn.q_norm.weight"],
                f"{src}attn.k_norm.weight": [f"{dst}attn.k_norm.weight"],
                f"{src}ffn_norm.weight": [f"{dst}ln_2.weight"],
                f"{src}ffn.w13.weight": [f"{dst}mlp.gate.weight", f"{dst}mlp.up.weight"],
                f"{src}ffn.w2.weight": [f"{dst}mlp.down.weight"]}
    plan = {"model.embed.weight": ["wte.weight"], "model.final_norm.weight": ["ln_f.weight"]}
    if settings["prelude_norm"]:
        plan["model.prelude_norm.weight"] = ["ln_prelude.weight"]
    for i in range(settings["n_prelude"]):
        plan.update(block(f"model.prelude.{i}.", f"prelude.{i}."))
    plan.update(block("model.loop.", "core.0."))
    for j in range(settings["n_coda"]):
        plan.update(block(f"model.coda.{j}.", f"coda.{j}."))
    drops = {"model.lm_head.weight": {"why": "the tied head's stored copy", "like": "model.embed.weight"}}
    return dict(settings=settings, lines=lines, plan=plan, drops=drops, transforms={})


def parcae(c, optional, keys):
    """Parcae (sandyresearch/parcae: parcae_lm/models/parcae, parcae_lm/modules). Pre-norm blocks with a ReLU^2 MLP
    that multiplies by 0.5, interleaved-pair RoPE applied to q and k before a parameter-free QK-norm, the diagonal
    injection, C after the loop, value embeddings; keys without a prefix, freqs_cis and both tied names stored."""
    import torch
    n_head, d = c.get("num_attention_heads"), c.get("n_embd")

    def same_as(field, what):  # a field that must repeat another one's value
        def rule(v):
            if v != c.get(field):
                raise ReleaseError(f"differs from {field} = {json.dumps(c.get(field))}: {what} nanoloop does not have")
            return {}, f"= {field}"
        return rule

    def kv_heads(v):
        if v != n_head:  # Parcae's core blocks are built with num_key_value_heads = num_attention_heads
            raise ReleaseError(f"differs from num_attention_heads = {n_head}: Parcae's core blocks would then have "
                               f"other KV heads than its prelude and coda, which nanoloop's blocks do not")
        return {"n_kv_head": v}, ""

    def rope(v):
        if not isinstance(v, dict) or set(v) != {"use_rope", "rope_condense_ratio", "rope_base"}:
            raise ReleaseError("expected use_rope, rope_condense_ratio and rope_base")
        if v["use_rope"] is not True or v["rope_condense_ratio"] != 1 or not isinstance(v["rope_base"], (int, float)):
            raise ReleaseError("nanoloop computes RoPE with use_rope true and rope_condense_ratio 1 only")
        return {"rope_base": float(v["rope_base"])}, "the stored freqs_cis is checked against it"

    def state(v):
        if v not in ("like-init", "zero"):
            raise ReleaseError("nanoloop draws h0 like the init (like-init) or starts at zero")
        return {"state_init": "random" if v == "like-init" else "zero"}, "TruncN(0, sqrt(2/(5d)), +-3 std)"
    number, null = (int, float), type(None)
    train_only = unused("a training setting; the function of the weights does not depend on it")
    settings, lines = map_fields(c, {
        "name": (str, unused("the model's name")),
        "hf_config": (dict, unused("the model's name")),
        "block_size": (int, to("block_size")),
        "n_embd": (int, to("n_embd")),
        "intermediate_size": (int, lambda v: ({"mlp": "relu2", "mlp_hidden": v}, "ReLU^2, its 0.5 folded into down")),
        "num_attention_heads": (int, to("n_head")),
        "num_key_value_heads": (int, kv_heads),
        "vocab_size": (int, unused("the tokenizer's size; the tables have padded_vocab_size rows")),
        "padding_multiple": (int, unused("how padded_vocab_size was rounded")),
        "padded_vocab_size": (int, to("vocab_size")),
        "rope_settings": (dict, rope),
        "use_abacus": (bool, only(False, {}, "", "abacus position embeddings are not in nanoloop")),
        "randomize_positions_from": (null, unused("null: positions are 0, 1, 2 ...")),
        "block_class_name": (str, only("TransformerPreNormBlock", {}, "nanoloop's Block", "another block class")),
        "norm_class_name": (str, only("RMSNorm", {}, "RMSNorm in fp32", "another norm class")),
        "attn_impl": (str, unused("the attention kernel: the same causal softmax attention")),
        "norm_eps": (number, to("norm_eps")),
        "mlp_class_name": (str, only("BaseMLP", {}, "fc, nonlinearity, proj", "another MLP class")),
        "nonlin_name": (str, only("ReLU2", {}, "relu(x)^2 * 0.5", "another nonlinearity")),
        "bias": (bool, only(False, {}, "", "biases are not in nanoloop's blocks")),
        "qk_bias": (bool, only(False, {}, "", "a QK bias is not in nanoloop's attention")),
        "init_strategy": (str, only("scaled-zero", {}, "no embedding or logit scale", "init strategies other than "
                                    "scaled-zero may scale the embedding or the logits, which nanoloop does not")),
        "init_orthogonal": (bool, unused("initialisation only")),
        "skip_initialization": (bool, unused("initialisation only")),
        "mup_model_scaling_factor": (number, only(1, {}, "", "a muP factor scales the logits")),
        "use_fused_head": (str, unused("the output head's kernel: the same logits")),
        "debias_attention": (bool, only(False, {}, "", "not in nanoloop's attention")),
        "center_attention": (bool, only(False, {}, "", "not in nanoloop's attention")),
        "clip_qkv": (null, unused("null: q, k, v are not clipped")),
        "qk_norm": (bool, only(True, {"qk_norm": "plain"}, "parameter-free, after RoPE: the same as before it",
                               "Parcae without QK-norm is not a model nanoloop computes")),
        "logit_softcap": (null, unused("null: the logits are not capped")),
        "activation_checkpoint_impl": (str, unused("memory only")),
        "simple_ops": (bool, only(False, {}, "", "not a path nanoloop has checked")),
        "strategy": (str, unused("the distributed strategy")),
        "injection_type": (str, only("diagonal", {"injection": "diagonal"}, "", "only Parcae's diagonal injection")),
        "n_layers_in_recurrent_block": (int, to("n_core")),
        "n_layers_in_prelude": (int, to("n_prelude")),
        "n_layers_in_coda": (int, to("n_coda")),
        "state_init": (str, state),
        "recurrent_embedding_dimension": (int, same_as("n_embd", "a loop state of another width")),
        "recurrent_intermediation_embedding_dimension": (int, same_as("intermediate_size", "a core MLP of another size")),
        "recurrent_num_attention_heads": (null, unused("null: the core has num_attention_heads")),
        "prelude_norm": (bool, to("prelude_norm")),
        "sampling_scheme": (str, train_only),
        "mean_recurrence": (int, to("mean_recurrence")),
        "mean_backprop_depth": (int, to("backprop_depth")),
        "lockstep_n": (bool, train_only),
        "lockstep_k": (bool, train_only),
        "curriculum_target": (str, train_only),
        "recurrent_iteration_method": (str, train_only),
        "tie_embeddings": (bool, only(True, {}, "the head is the embedding", "an untied Parcae head is not supported")),
        "model_class_name": (str, only("Parcae", {}, "", "another model class")),
        "_is_recurrent_block_config": (bool, only(False, {}, "", "the config of a core block, not of a model")),
        "_class_name": (str, unused("the family: ParcaeConfig")),
    })
    settings.update(depth_sampling="sequence")
    lines.append(("(Parcae's poisson-truncated-full per sequence)", "depth_sampling='sequence' (fine-tuning)"))
    if isinstance(n_head, int) and isinstance(d, int) and (n_head < 1 or d % n_head):
        raise ReleaseError(f"n_embd = {d} is not divisible by num_attention_heads = {n_head}")
    hd = d // n_head
    # value embeddings: their layout read from the file's keys, each table with its gate
    n_pre, n_core, n_coda = settings["n_prelude"], settings["n_core"], settings["n_coda"]
    where = [f"transformer.prelude.{i}." for i in range(n_pre)] + [f"transformer.core_block.{j}." for j in
             range(n_core)] + [f"transformer.coda.{j}." for j in range(n_coda)]  # by effective layer index
    tables = sorted(int(k.split(".")[1]) for k in keys if re.fullmatch(r"value_embeds\.\d+\.weight", k))
    gates = [i for i, p in enumerate(where) if f"{p}attn.ve_gate.weight" in keys]
    for k in tables:
        if k >= len(where) or k not in gates:
            raise ReleaseError(f"value_embeds.{k}.weight has no gate ({where[k] if k < len(where) else 'no layer '}"
                               f"{'attn.ve_gate.weight' if k < len(where) else str(k)}): a table without a gate")
    for i in gates:
        if i not in tables:
            raise ReleaseError(f"{where[i]}attn.ve_gate.weight has no table value_embeds.{i}.weight: a gate without a table")
    rule = [i for i in range(len(where)) if i % 2 == (len(where) - 1) % 2]
    if tables and tables != rule:
        raise ReleaseError(f"value embeddings at layers {tables}; nanoloop's are at {rule} (every other layer, the "
                           f"last included)")
    settings["value_embeds"] = bool(tables)
    lines.append((f"(value_embeds.* in the file: layers {tables})", f"value_embeds={bool(tables)}"))
    nanoloop = [f"prelude.{i}." for i in range(n_pre)] + [f"core.{j}." for j in range(n_core)] + \
               [f"coda.{j}." for j in range(n_coda)]
    plan = {"transformer.wte.weight": ["wte.weight"], "transformer.ln_f.weight": ["ln_f.weight"],
            "transformer.adapter.A_log": ["A_log"], "transformer.adapter.dt_bias": ["dt_bias"],
            "transformer.adapter.B": ["B.weight"], "transformer.C.weight": ["C.weight"]}
    if settings["prelude_norm"]:
        plan["transformer.ln_prelude.weight"] = ["ln_prelude.weight"]
    transforms = {}
    # interleaved pairs (2i, 2i+1) of each head -> rotate-half pairs (i, i + hd/2); QK-norm is indifferent to the order
    perm = torch.cat([torch.arange(0, hd, 2), torch.arange(1, hd, 2)])
    rotate_half = (lambda t: t.view(-1, hd, t.size(-1))[:, perm].reshape(t.shape), "rows to rotate-half order")
    for k, (src, dst) in enumerate(zip(where, nanoloop)):
        plan.update({f"{src}norm_1.weight": [f"{dst}ln_1.weight"], f"{src}attn.c_q.weight": [f"{dst}attn.q.weight"],
                     f"{src}attn.c_k.weight": [f"{dst}attn.k.weight"], f"{src}attn.c_v.weight": [f"{dst}attn.v.weight"],
                     f"{src}attn.c_proj.weight": [f"{dst}attn.o.weight"], f"{src}norm_2.weight": [f"{dst}ln_2.weight"],
                     f"{src}mlp.fc.weight": [f"{dst}mlp.up.weight"], f"{src}mlp.proj.weight": [f"{dst}mlp.down.weight"]})
        transforms.update({f"{dst}attn.q.weight": rotate_half, f"{dst}attn.k.weight": rotate_half,
                           f"{dst}mlp.down.weight": (lambda t: 0.5 * t, "times 0.5 (ReLU^2's factor)")})
        if k in tables:
            plan.update({f"value_embeds.{k}.weight": [f"{dst}attn.ve.weight"],
                         f"{src}attn.ve_gate.weight": [f"{dst}attn.ve_gate.weight"]})

    def rope_check(t):  # the stored tables, (1, block_size, 1, hd/2, [cos, sin]), against nanoloop's own
        from model import GPTConfig, rope_tables
        cos, sin = rope_tables(GPTConfig(n_embd=d, n_head=n_head, n_kv_head=n_head, block_size=settings["block_size"],
                                         rope_base=settings["rope_base"]))
        if not (torch.equal(t[0, :, 0, :, 0].float(), cos) and torch.equal(t[0, :, 0, :, 1].float(), sin)):
            return "differs from nanoloop's RoPE tables for rope_base and block_size: another RoPE"
    drops = {"lm_head.weight": {"why": "the tied head's stored copy", "like": "transformer.wte.weight"},
             "freqs_cis": {"why": "RoPE's cos and sin tables", "shape": (1, settings["block_size"], 1, hd // 2, 2),
                           "check": rope_check, "checked": "checked equal to nanoloop's own"}}
    # its own tokenizer: BOS starts a HellaSwag context and a prompt (receval's CORE), not LAMBADA or val text
    tokenizer = {"repo": "SandyResearch/parcae-tokenizer", "vocab": c["vocab_size"], "bos": "<|bos|>",
                 "eos": "<|eos|>", "bos_in": ("hellaswag", "sample")}
    return dict(settings=settings, lines=lines, plan=plan, drops=drops, transforms=transforms, tokenizer=tokenizer)


def ouro(c, optional, keys):
    """Ouro (ByteDance/Ouro-*, remote code modeling_ouro.py): the whole stack of layers looped total_ut_steps times,
    an RMSNorm after every step whose output is the next step's input, the head's and the exit gate's (no second
    norm); blocks with a norm on each branch's output too (sandwich), no QK-norm, SwiGLU, an untied head; keys as
    transformers' Llama, bf16. Its readout rule reads each token out at the first step whose exit CDF reaches
    early_exit_threshold (readout_q)."""
    n_head, d = c.get("num_attention_heads"), c.get("hidden_size")

    def head_dim(v):
        if not (isinstance(d, int) and isinstance(n_head, int) and v * n_head == d):
            raise ReleaseError(f"with hidden_size = {d} and num_attention_heads = {n_head}: nanoloop's head dim is "
                               f"n_embd / n_head")
        return {}, "= hidden_size / num_attention_heads"

    def full_attention(v):
        if any(t != "full_attention" for t in v):
            raise ReleaseError("sliding-window layers are not in nanoloop")
        return {}, "every layer attends to the whole context"

    def threshold(v):
        if not 0 <= v <= 1:
            raise ReleaseError("a probability in [0, 1]")
        return {"readout_q": float(v)}, "each token reads out at the first step whose exit CDF reaches it"
    number, null = (int, float), type(None)
    optional_fields = {  # fields that a release's config.json may or may not hold
        "layer_types": (list, full_attention),
        "max_window_layers": (int, unused("sliding windows are off")),
        "pad_token_id": ((int, null), unused("padding, for batched generation")),
    }
    settings, lines = map_fields(c, {
        "vocab_size": (int, to("vocab_size")),
        "hidden_size": (int, to("n_embd")),
        "intermediate_size": (int, lambda v: ({"mlp": "swiglu", "mlp_hidden": v}, "SwiGLU: down(silu(gate) * up)")),
        "num_hidden_layers": (int, lambda v: ({"n_core": v}, "every layer is in the loop")),
        "num_attention_heads": (int, to("n_head")),
        "num_key_value_heads": (int, to("n_kv_head")),
        "head_dim": (int, head_dim),
        "hidden_act": (str, only("silu", {}, "", "SwiGLU with another activation is not in nanoloop")),
        "max_position_embeddings": (int, to("block_size")),
        "rms_norm_eps": (number, to("norm_eps")),
        "rope_theta": (number, lambda v: ({"rope_base": float(v)}, "rotate-half, as nanoloop")),
        "rope_scaling": (null, unused("null: positions are not rescaled")),
        "tie_word_embeddings": (bool, only(False, {"tie_head": False}, "lm_head.weight is a head of its own",
                                           "a tied Ouro head is not a release nanoloop knows")),
        "total_ut_steps": (int, lambda v: ({"mean_recurrence": v, "backprop_depth": v}, "its depth: every step, "
                                           "each with gradient, as it trains")),
        "early_exit_threshold": (number, threshold),
        "use_sliding_window": (bool, only(False, {}, "", "sliding-window attention is not in nanoloop")),
        "sliding_window": ((int, null), unused("use_sliding_window is false")),
        "attention_dropout": (number, only(0.0, {}, "no dropout", "attention dropout is not in nanoloop")),
        "bos_token_id": (int, unused("the tokenizer's <|endoftext|>; nothing starts with it")),
        "eos_token_id": (int, unused("the tokenizer's <|endoftext|> (chat: <|im_end|>)")),
        "initializer_range": (number, unused("initialisation only")),
        "use_cache": (bool, unused("a generation default")),
        **{k: rule for k, rule in optional_fields.items() if k in c},
    })
    settings.update(injection="none", n_prelude=0, n_coda=0, prelude_norm=False, loop_norm=True, exit_gate=True,
                    depth_sampling="fixed", sandwich_norm=True, qk_norm="none", final_norm=False)
    lines += [("(modeling_ouro.py: the loop is every layer, the state starts at the embedding)",
               "injection='none', n_prelude=0, n_coda=0, prelude_norm=False, depth_sampling='fixed'"),
              ("(model.norm after every step, the next step's input, the head's and the gate's)",
               "loop_norm=True, final_norm=False (a second RMSNorm with gains would change the logits)"),
              ("(input_layernorm_2, post_attention_layernorm_2 on each branch's output)", "sandwich_norm=True"),
              ("(no q_norm or k_norm in its attention)", "qk_norm='none'"),
              ("(model.early_exit_gate: lambda_t = sigmoid(w . h_t + b))", "exit_gate=True")]
    plan = {"model.embed_tokens.weight": ["wte.weight"], "model.norm.weight": ["ln_loop.weight"],
            "model.early_exit_gate.weight": ["exit_gate.weight"], "model.early_exit_gate.bias": ["exit_gate.bias"],
            "lm_head.weight": ["lm_head.weight"]}
    for i in range(settings["n_core"]):
        src, dst = f"model.layers.{i}.", f"core.{i}."
        plan.update({f"{src}self_attn.{p}_proj.weight": [f"{dst}attn.{p}.weight"] for p in "qkvo"})
        plan.update({f"{src}mlp.{p}_proj.weight": [f"{dst}mlp.{p}.weight"] for p in ("gate", "up", "down")})
        plan.update({f"{src}input_layernorm.weight": [f"{dst}ln_1.weight"],
                     f"{src}input_layernorm_2.weight": [f"{dst}post_ln_1.weight"],
                     f"{src}post_attention_layernorm.weight": [f"{dst}ln_2.weight"],
                     f"{src}post_attention_layernorm_2.weight": [f"{dst}post_ln_2.weight"]})
    # SmolLM2's byte-level BPE; the base models' documents start with nothing (no BOS in its evaluation)
    tokenizer = {"repo": None, "vocab": c["vocab_size"], "bos": "<|endoftext|>", "eos": "<|endoftext|>", "bos_in": ()}
    return dict(settings=settings, lines=lines, plan=plan, drops={}, transforms={}, tokenizer=tokenizer)


FAMILIES = {"LoopLM": looplm, "Parcae": parcae, "Ouro": ouro}
WEIGHTS = {"LoopLM": "model.safetensors", "Parcae": "pytorch_model.bin", "Ouro": "model.safetensors"}  # weights files


def family_of(c, where):
    """The family of config.json's dict c, one nanoloop loads; a one-line error otherwise."""
    if not isinstance(c, dict):
        raise ReleaseError(f"{where}: not a JSON object")
    fam = family(c)
    if fam is None:
        raise ReleaseError(f"{where}: not the config of a family nanoloop loads ({', '.join(FAMILIES)})")
    return fam


def release_map(c, where, optional=lambda filename: None, keys=()):
    """The map of a release, from config.json's dict c and its weights file's tensor names keys: a dict of
    family, weights (the file's name), settings (GPTConfig's), lines (the config mapping, for the check),
    plan {file key: [parameter, ...]} (the parameters its rows fill, in order), transforms {parameter: (fn, what)}
    (applied to its rows) and drops {file key: {why, like (the key it must equal) or shape and check(tensor)}}."""
    fam = family_of(c, where)
    try:
        return dict(family=fam, weights=WEIGHTS[fam], **FAMILIES[fam](c, optional, keys))
    except ReleaseError as e:  # named by the file it is about: config.json, unless another file says so itself
        msg = str(e)
        raise ReleaseError(msg if msg.split(":")[0].endswith(".json") else f"{where}: {msg}") from None


# -----------------------------------------------------------------------------
# the conversion, with its accounting


def apply_overrides(settings, overrides, where):
    """The release's settings with the user's: a FREE setting may change (block_size only shrink); any other
    GPTConfig setting must equal the release's."""
    from model import GPTConfig
    defaults = {f.name: f.default for f in dataclasses.fields(GPTConfig)}
    out, overrides = {**defaults, **settings}, overrides or {}
    unknown = sorted(k for k in overrides if k not in defaults)
    if unknown:
        raise ReleaseError(f"{unknown[0]!r} is not a model setting (GPTConfig)")
    bad = [k for k in defaults if k in overrides and overrides[k] != out[k] and k not in FREE]  # in GPTConfig's order
    if bad:
        have = ", ".join(f"{k}={out[k]!r}" for k in bad)
        given = ", ".join(f"{k}={overrides[k]!r}" for k in bad)
        raise ReleaseError(f"{given} {'contradicts' if len(bad) == 1 else 'contradict'} the release {where}, which has "
                           f"{have}: a release's model settings are its own (only {', '.join(FREE)} may change)")
    if overrides.get("block_size", 0) > settings["block_size"]:
        raise ReleaseError(f"block_size={overrides['block_size']} is longer than the release's {settings['block_size']} "
                           f"({where}): it may only shrink")
    return {**out, **overrides}


def check_file(reader, m, shapes, where):
    """From the header, before any value is read: every tensor consumed or dropped, every parameter filled, every
    shape what the config implies, one float dtype. Returns that dtype's name."""
    have, plan, drops = reader.meta, m["plan"], m["drops"]
    missing = [k for k in [*plan, *drops] if k not in have]
    extra = [k for k in have if k not in plan and k not in drops]
    for keys, why in ((missing, "is missing: not the file this config describes"),
                      (extra, "is not part of the model this config describes: refused rather than dropped unread")):
        if keys:
            more = f" (and {len(keys) - 1} more)" if len(keys) > 1 else ""
            raise ReleaseError(f"{where}: tensor {keys[0]!r}{more} {why}")
    expect = {}
    for key, params in plan.items():  # the row blocks of a tensor, one per parameter
        expect[key] = (sum(shapes[p][0] for p in params), *shapes[params[0]][1:])
    expect.update({k: tuple(d["shape"]) if "shape" in d else expect[d["like"]] for k, d in drops.items()})
    for k, (shape, dtype) in have.items():
        if shape != expect[k]:
            raise ReleaseError(f"{where}: tensor {k!r} has shape {list(shape)}; the config implies {list(expect[k])}")
        if dtype not in DTYPES.values():
            raise ReleaseError(f"{where}: tensor {k!r} is {dtype}, not a float tensor")
    kinds = [dtype for _, dtype in have.values()]
    first = max(set(kinds), key=kinds.count)  # the odd one out is the one named
    odd = next((k for k, (_, dtype) in have.items() if dtype != first), None)
    if odd is not None:
        raise ReleaseError(f"{where}: tensor {odd!r} is {have[odd][1]} where the others are {first}: one release, "
                           f"one dtype")
    filled = {p for params in plan.values() for p in params}
    unfilled = [p for p in shapes if p not in filled]
    if unfilled:  # the map's own bug, never the file's
        raise ReleaseError(f"{where}: nothing in the map fills parameter {unfilled[0]!r}")
    return first


def convert(reader, m, shapes, dtype, where):
    """{parameter: tensor}: each a row block of its file tensor, transformed if the map says so, in dtype; a view
    of the file when neither applies. The dropped tensors are checked first (on the meta device they cannot be)."""
    import torch
    check = reader.again()  # its own mapping, unmapped after the checks: a dropped copy's pages leave memory
    for k, d in m["drops"].items():
        t = check.get(k)
        if t.is_meta:
            continue
        if "like" in d and not torch.equal(t, check.get(d["like"])):
            diff = (t.float() - check.get(d["like"]).float()).abs().max().item()
            problem = f"differs from {d['like']!r} (max |diff| {diff:.3g})"
        else:
            problem = d["check"](t) if "check" in d else None
        if problem:
            raise ReleaseError(f"{where}: tensor {k!r}, {d['why']}, {problem}: not the file this config describes")
    state, copies = {}, check  # what is cast or transformed is read through the second mapping too: it is copied
    for key, params in m["plan"].items():
        copied = getattr(torch, reader.meta[key][1]) != dtype or all(p in m["transforms"] for p in params)
        t, row = copies.copy(key) if copied else reader.get(key), 0
        for p in params:
            piece = t[row:row + shapes[p][0]]
            row += shapes[p][0]
            piece = piece.to(dtype)  # the same tensor when it has this dtype already
            state[p] = m["transforms"][p][0](piece) if p in m["transforms"] else piece
    del check, copies
    return state


def accounting(reader, m):
    """One line per tensor of the file: its shape and what became of it."""
    lines = []
    for k, (shape, _) in reader.meta.items():
        if k in m["drops"]:
            d = m["drops"][k]
            what = f"dropped: {d['why']}, " + (f"checked equal to {d['like']}" if "like" in d else d["checked"])
        else:
            params = m["plan"][k]
            what = " + ".join(p + (f" ({m['transforms'][p][1]})" if p in m["transforms"] else "") for p in params)
            what += " (its rows in this order)" if len(params) > 1 else ""
        lines.append(f"  {k} {list(shape)} -> {what}")
    return lines


def param_shapes(config):
    """{name: shape} of every parameter of GPT(config), built on the meta device (no memory)."""
    import torch
    from model import GPT
    with torch.device("meta"):
        return {k: tuple(p.shape) for k, p in GPT(config).named_parameters()}


def build(config, state, device="cpu"):
    """GPT(config) in eval mode whose parameters are the tensors of state, not copies."""
    import torch
    from model import GPT, rope_tables
    with torch.device("meta"):
        model = GPT(config)
    model.load_state_dict(state, strict=True, assign=True)
    model.cos, model.sin = rope_tables(config)  # made on the meta device with the rest: the real tables
    return model.to(device).eval()


def find_tokenizer(files, m, rows):
    """What a release's tokenizer is made from (a checkpoint keeps it): "gpt2", or the release's own tokenizer.json,
    beside the weights if it is there, else from the tokenizer's hub repo; its vocabulary checked against the
    config (rows: the model's table)."""
    t = m.get("tokenizer", "gpt2")
    if t == "gpt2":
        return t
    path = files.path("tokenizer.json", required=False)
    if path is None and t["repo"]:
        path = Files(t["repo"]).path("tokenizer.json", required=False)
    if path is None:
        where = f", and {t['repo']}'s is not in the Hugging Face cache nor reachable" if t["repo"] else ""
        raise ReleaseError(f"{files.where()}: no tokenizer.json beside the weights{where}: put the release's "
                           f"tokenizer.json in the folder with its weights")
    with open(path, encoding="utf-8") as f:
        spec = {"tokenizer.json": f.read(), "bos": t["bos"], "eos": t["eos"], "bos_in": list(t["bos_in"])}
    n = make_tokenizer(spec, path).n_vocab
    if n != t["vocab"] or n > rows:
        raise ReleaseError(f"{path}: a tokenizer of {n:,} ids, but the release's config has vocab_size {t['vocab']:,} "
                           f"({rows:,} rows): not this release's tokenizer")
    files.paths["tokenizer.json"] = path
    return spec


def read_config(files):
    """(path, dict) of a release's config.json."""
    where = files.path("config.json")
    try:
        with open(where) as f:
            return where, json.load(f)
    except (OSError, ValueError) as e:
        raise ReleaseError(f"{where}: not a JSON config ({type(e).__name__}: {' '.join(str(e).split())})") from None


def release_tokenizer(name_or_dir):
    """The tokenizer of a release (or "gpt2"), from its config.json and tokenizer files alone: the weights are not
    fetched (prepare_fineweb.py --tokenizer)."""
    if name_or_dir == "gpt2":
        return GPT2Tokenizer()
    files = Files(name_or_dir)
    where, c = read_config(files)
    m = release_map(c, where)
    return make_tokenizer(find_tokenizer(files, m, m["settings"]["vocab_size"]), name_or_dir)


class Release:
    """A release found (a hub repo's files downloaded, or a local folder), its config mapped to a GPTConfig and its
    weights file checked from the header; no weight value is read until model(). overrides: GPTConfig settings
    to change (the FREE ones)."""

    def __init__(self, name_or_dir, overrides=None):
        from model import GPTConfig
        self.files = files = Files(name_or_dir)
        where, c = read_config(files)
        fam = family_of(c, where)
        files.weights = files.path(WEIGHTS[fam])
        self.reader = (SafetensorsFile if files.weights.endswith(".safetensors") else TorchFile)(files.weights)
        self.map = m = release_map(c, where, lambda f: files.path(f, required=False), self.reader.meta)
        self.family, self.lines = fam, m["lines"]
        settings = apply_overrides(m["settings"], overrides, files.where())
        try:
            self.config = GPTConfig(**settings)
        except ValueError as e:  # a value nanoloop cannot build: say which fields gave it
            named = set(re.findall(r"(\w+)=", str(e)))
            fields_ = [left for left, right in self.lines if named & set(re.findall(r"(\w+)=", right))]
            raise ReleaseError(f"{where}: {', '.join(fields_) or 'its fields'} {'gives' if len(fields_) == 1 else 'give'} "
                               f"{e}") from None
        self.shapes = param_shapes(self.config)
        self.dtype = check_file(self.reader, m, self.shapes, files.weights)
        self.tokenizer_spec = find_tokenizer(files, m, self.config.vocab_size)

    def model(self, device="cpu", dtype=None):
        """A GPT in eval mode. dtype: its parameters' (a float torch dtype or its name; default float32). Each
        call maps the file anew: two models from one release share no memory that either can write."""
        import torch
        kind = getattr(torch, dtype, None) if isinstance(dtype, str) else dtype or torch.float32
        if not isinstance(kind, torch.dtype) or not kind.is_floating_point:
            raise ReleaseError(f"dtype={dtype!r}: the parameters take a float dtype (float32, bfloat16, float16)")
        state = convert(self.reader.again(), self.map, self.shapes, kind, self.files.weights)
        model = build(dataclasses.replace(self.config), state, device)
        model.release = self  # where it came from: record() for a run record
        return model

    def tokenizer(self):
        return make_tokenizer(self.tokenizer_spec)

    def record(self):
        """What a run record keeps: family, name, hub repo and commit (or the folder), and each file's sha256."""
        return {"family": self.family, **self.files.record()}


def load(name_or_dir, device="cpu", dtype=None, overrides=None):
    """(model, tokenizer) of a release: a short name, a hub repo owner/name[@revision], or a local folder in the
    release's layout. The model is a model.GPT in eval mode computing the release's function; model.release is
    its Release (record() for a run record). dtype: the parameters' (default float32). overrides: see Release."""
    release = Release(name_or_dir, overrides)
    return release.model(device, dtype), release.tokenizer()


# -----------------------------------------------------------------------------
# tokenizers


class GPT2Tokenizer:
    """GPT-2's BPE through tiktoken (nanoloop's own shards, and LoopLM's): encode, decode and the special ids."""
    name = "gpt2"

    def __init__(self):
        from prepare_fineweb import EOT, gpt2_encoding
        self.enc = gpt2_encoding()
        self.n_vocab = self.enc.n_vocab    # 50257; models pad their tables to 50304
        self.bos = self.eos = EOT          # every document starts with <|endoftext|>, as nanoloop's shards
        self.special = {"<|endoftext|>": EOT}
        self.bos_in = ("hellaswag", "lambada", "text")  # what starts with bos: eval.py's tasks, a built-in text
        self.spec = "gpt2"                 # what a checkpoint keeps of it

    def encode(self, text, specials=False):
        """Token ids of text; specials=True reads <|endoftext|> in it as the special token (sample.py's prompts)."""
        return self.enc.encode(text, allowed_special=set(self.special)) if specials else self.enc.encode_ordinary(text)

    def decode(self, ids):
        """The text of ids; ids past the tokenizer (a padded table's rows) become U+FFFD."""
        pieces = (self.enc.decode_single_token_bytes(t) if t < self.n_vocab else "\ufffd".encode() for t in ids)
        return b"".join(pieces).decode("utf-8", errors="replace")

    def token_bytes(self, vocab_size):
        """UTF-8 bytes of each id (vocab_size,), for bits per byte: 0 for specials and padding."""
        from prepare_fineweb import token_byte_lengths
        return token_byte_lengths(vocab_size)


def byte_decoder():
    """Byte-level BPE's map from the printable character standing for each byte back to the byte (GPT-2's table)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), ord("\xff") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[chr(b)] = b
        else:  # the bytes with no printable character of their own get 256, 257 ...
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


class JSONTokenizer:
    """A release's own tokenizer.json, read by the tokenizers package, so its ids are the release's by construction:
    encode, decode, the special ids. bos_in: what starts with bos, as the release evaluates it."""
    name = "tokenizer.json"

    def __init__(self, text, bos, eos, bos_in, where="tokenizer.json"):
        from tokenizers import Tokenizer
        try:
            self.tok = Tokenizer.from_str(text)
        except Exception as e:
            raise ReleaseError(f"{where}: not a tokenizers file ({' '.join(str(e).split())})") from None
        self.n_vocab = self.tok.get_vocab_size(with_added_tokens=True)
        self.special = {t.content: i for i, t in self.tok.get_added_tokens_decoder().items() if t.special}
        missing = [s for s in (bos, eos) if s not in self.special]
        if missing:
            raise ReleaseError(f"{where}: no special token {missing[0]!r}")
        self.bos, self.eos, self.bos_in = self.special[bos], self.special[eos], tuple(bos_in)
        self.spec = {"tokenizer.json": text, "bos": bos, "eos": eos, "bos_in": list(bos_in)}

    def encode(self, text, specials=False):
        """Token ids of text, no BOS/EOS added; specials=True reads special-token literals in it as the tokens
        (sample.py's prompts, and the tokenizers package's own default), otherwise they are text."""
        self.tok.encode_special_tokens = not specials
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids):
        """The text of ids, special tokens included; ids past the tokenizer (a padded table's rows) become U+FFFD."""
        out, run = [], []
        for t in [*ids, None]:
            if t is not None and t < self.n_vocab:
                run.append(t)
                continue
            out.append(self.tok.decode(run, skip_special_tokens=False) if run else "")
            run = []
            if t is not None:
                out.append("\ufffd")
        return "".join(out)

    def token_bytes(self, vocab_size):
        """Bytes of text each id stands for (vocab_size,), for bits per byte: 0 for specials and padding."""
        import numpy as np
        chars, lengths = byte_decoder(), np.zeros(vocab_size, dtype=np.int64)
        specials = set(self.special.values())
        for i in range(min(vocab_size, self.n_vocab)):
            token = self.tok.id_to_token(i)
            if i in specials or token is None:
                continue
            if re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", token):  # byte fallback
                lengths[i] = 1
            elif all(ch in chars for ch in token):  # byte-level: one character a byte
                lengths[i] = len(token)
            else:
                lengths[i] = len(token.encode())
        return lengths


def make_tokenizer(spec, where="tokenizer"):
    """A tokenizer from what a checkpoint or a release map keeps of it: "gpt2", or a tokenizer.json's text with its
    BOS and EOS tokens."""
    if spec == "gpt2":
        return GPT2Tokenizer()
    if isinstance(spec, dict) and {"tokenizer.json", "bos", "eos", "bos_in"} <= spec.keys():
        return JSONTokenizer(spec["tokenizer.json"], spec["bos"], spec["eos"], spec["bos_in"], where)
    raise ValueError(f"{where}: tokenizer {str(spec)[:40]!r} is unknown to this code")


def shards_tokenizer(data_dir):
    """What the token shards in data_dir were made with: "gpt2", or the spec of the release tokenizer that
    prepare_fineweb.py --tokenizer left beside them (tokenizer.json)."""
    marker = os.path.join(data_dir, "tokenizer.json")
    if not os.path.exists(marker):
        return "gpt2"
    try:
        with open(marker, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{marker}: not what prepare_fineweb.py writes ({type(e).__name__})") from None


def check_shards_tokenizer(data_dir, tokenizer, name):
    """train.py: the shards in data_dir must be in the model's tokenizer (name: what to pass to --tokenizer)."""
    data_tokenizer = shards_tokenizer(data_dir)
    if data_tokenizer != tokenizer:
        made = "GPT-2's tokenizer" if data_tokenizer == "gpt2" else f"another tokenizer ({data_dir}/tokenizer.json)"
        model_tok = "GPT-2's" if tokenizer == "gpt2" else "its release's own"
        raise ValueError(f"the shards in {data_dir} were made with {made}; the model reads {model_tok}: make shards "
                         f"for it with python prepare_fineweb.py --text FILES --tokenizer={name} (or point --data_dir "
                         f"at such shards)")


def checkpoint_tokenizer(ckpt):
    """The tokenizer a train.py checkpoint was made with: its "tokenizer" entry (a fine-tuned release's), else GPT-2."""
    return make_tokenizer(ckpt.get("tokenizer") or "gpt2", "the checkpoint's tokenizer")


def check_ids(ids, model, what="the prompt"):
    """A one-line ValueError for a token id the model's embedding has no row for."""
    bad = max(ids, default=0)
    if bad >= model.config.vocab_size:
        raise ValueError(f"{what} has token id {bad}, past the model's vocabulary of {model.config.vocab_size}")


# -----------------------------------------------------------------------------
# python pretrained.py NAME: the check a user with the real files runs first


def text_loss(model, tok, depths, text=TEXT):
    """{T: (loss in nats per token, bits per byte)} of text, a document (after the tokenizer's document start if
    the release evaluates text that way), at each depth T."""
    import torch
    import torch.nn.functional as F
    ids = (([tok.bos] if "text" in tok.bos_in else []) + tok.encode(text))[:model.config.block_size + 1]
    check_ids(ids, model, "the built-in text")
    x, y = torch.tensor([ids[:-1]]), torch.tensor([ids[1:]])
    nbytes = torch.as_tensor(tok.token_bytes(model.config.vocab_size))[y[0]]
    out = {}
    with torch.no_grad():
        for T in depths:
            logits, loss = model(x, y, num_loops=T)
            nll = F.cross_entropy(logits[0].float(), y[0], reduction="none")
            out[T] = (loss.item(), (nll * (nbytes > 0)).sum().item() / (math.log(2) * nbytes.sum().item()))
    return out


def main(argv):
    import torch
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return
    if argv[0] == "--list":
        for name, repo in RELEASES.items():
            fam = next(f for f in ("LoopLM", "Parcae", "Ouro") if name.startswith(f.lower()))
            print(f"  {name:<20} {repo:<30} {fam}")
        return
    if len(argv) > 1:
        raise ReleaseError(f"one release at a time, got {' '.join(argv)}")
    r = Release(argv[0])
    rec = r.record()
    print(f"{argv[0]}: a {r.family} release, " + (f"hub repo {r.files.repo} at commit {rec['revision']}" if r.files.repo
                                                 else f"local folder {rec['folder']}"))
    for f, p in r.files.paths.items():
        print(f"  {f:<18} {os.path.getsize(p):>14,} bytes  sha256 {rec['files'][f]}")
    print("config.json -> GPTConfig:")
    width = max(len(a) for a, _ in r.lines)
    print("\n".join(f"  {a:<{width}} -> {b}" for a, b in r.lines))
    print(f"{os.path.basename(r.files.weights)}: {len(r.reader.meta)} tensors, {r.dtype}; each consumed by parameters "
          f"or dropped after its check:")
    print("\n".join(accounting(r.reader, r.map)))
    model, tok = r.model(), r.tokenizer()
    n_file = sum(math.prod(s) for s, _ in r.reader.meta.values())
    print(f"parameters: {model.get_num_params():,}; the file holds {n_file:,} values, "
          f"{n_file - model.get_num_params():,} of them in dropped copies")
    mu = r.config.mean_recurrence
    depths = sorted({1, 2, max(1, mu // 2), mu, 2 * mu})
    try:
        res = text_loss(model, tok, depths)
    except ValueError as e:  # a tiny test model whose table holds a part of the vocabulary
        print(f"loss on the built-in text: skipped, {e}")
        return
    model.config.eval_state = "random"  # the release's own evaluation: h0 drawn at every forward
    draws = []
    for seed in (1, 2, 3):
        torch.manual_seed(seed)
        draws.append(text_loss(model, tok, depths))
    start = "after one document start, " if "text" in tok.bos_in else ""
    print(f"loss on the built-in text ({len(tok.encode(TEXT))} {tok.name} tokens, {start}a uniform "
          f"guess is {math.log(r.config.vocab_size):.2f} nats) by loop depth T, from h0 = 0 (nanoloop's evaluation) "
          f"and from h0 drawn as the release draws it ({r.config.state_init!r}; 3 draws, mean and spread):")
    for T, (loss, bpb) in res.items():
        drawn = torch.tensor([d[T][0] for d in draws])
        print(f"  T={T:<3} loss {loss:.4f}   bpb {bpb:.4f}   drawn h0: loss {drawn.mean():.4f} +- {drawn.std():.4f}"
              + ("   <- the release's depth" if T == mu else ""))


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except ValueError as e:
        raise SystemExit(f"error: {' '.join(str(e).split())}") from None
    except BrokenPipeError:  # `| head` closed the pipe early: fine, but the exit's flush must not retry
        os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
