"""Tests of pretrained.py: released looped LMs loaded exactly (CPU, offline).   python -m pytest -q test_pretrained.py

The references are read from ../shared/pretrained (README there): tiny models written by each family's official
code in its release's file layout, with logits of the official forward, and the key inventories of the real
releases. Nothing of them is copied into this repository.

    python test_pretrained.py synthetic looplm-135m-naive data/synthetic/looplm-135m-naive
writes a release-layout file of the real size with random values (for bench.py's load and speed numbers).
"""
import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.abspath(__file__))
SHARED = os.path.join(ROOT, "..", "shared", "pretrained")
_CACHE = os.path.join(ROOT, "..", "shared", "tiktoken_cache")
if os.path.isdir(_CACHE):  # the GPT-2 BPE file, for machines without network
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", _CACHE)
os.environ.setdefault("OMP_NUM_THREADS", "1")  # subprocesses: two OpenMP threads on a busy machine crawl

import pretrained as P  # noqa: E402
from model import GPTConfig  # noqa: E402

LOOPLM = os.path.join(SHARED, "looplm-tiny")
ENV = dict(os.environ, HF_HUB_OFFLINE="1")  # never the network, in any subprocess


def reference(folder):
    return torch.load(os.path.join(folder, "reference.pt"), weights_only=True)


def inventory(name):
    with open(os.path.join(SHARED, "inventory", f"{name}.json")) as f:
        return json.load(f)


def write_synthetic(name, folder, seed=0):
    """A release folder in the real release's exact layout (the inventory's config, keys, shapes and dtypes) with
    random values: the size of the real file without its weights. The tied head's copy equals the embedding."""
    from safetensors.torch import save_file
    inv = inventory(name)
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for k, (shape, dtype) in sorted(inv["tensors"].items()):
        t = torch.randn(shape, generator=g) * 0.02 + (1.0 if len(shape) == 1 else 0.0)  # gains near 1
        tensors[k] = t.to(getattr(torch, dtype))
    m = P.release_map(inv["config"], name, keys=inv["tensors"])
    for k, d in m["drops"].items():
        if "like" in d:  # a stored copy: equal to what it copies
            tensors[k] = tensors[d["like"]].clone()
    if "freqs_cis" in m["drops"]:  # Parcae's RoPE tables, as its code makes them
        from model import GPTConfig, rope_tables
        cos, sin = rope_tables(GPTConfig(**P.apply_overrides(m["settings"], None, name)))
        tensors["freqs_cis"] = torch.stack([cos, sin], -1)[None, :, None]
    os.makedirs(folder, exist_ok=True)
    if m["weights"].endswith(".safetensors"):
        save_file(tensors, os.path.join(folder, m["weights"]))
    else:
        tensors["lm_head.weight"] = tensors["transformer.wte.weight"]  # one storage, two names, as torch.save keeps them
        torch.save(tensors, os.path.join(folder, m["weights"]))
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(inv["config"], f)
    if "tokenizer" in m:  # the real tokenizer.json is not here: a stand-in of its size and special tokens
        from tokenizers import Tokenizer, models, pre_tokenizers
        specials = list(dict.fromkeys([m["tokenizer"]["bos"], m["tokenizer"]["eos"]]))
        vocab = {**{s: i for i, s in enumerate(specials)},
                 **{f"t{i}": i for i in range(len(specials), m["tokenizer"]["vocab"])}}
        stand_in = Tokenizer(models.WordLevel(vocab, unk_token="t2"))
        stand_in.pre_tokenizer = pre_tokenizers.Whitespace()
        stand_in.add_special_tokens(specials)
        stand_in.save(os.path.join(folder, "tokenizer.json"))
    return folder


def widened_looplm(folder, vocab=50304, seed=0):
    """The LoopLM fixture with its embedding (and the head's copy) grown to GPT-2's padded 50304 rows, the new rows
    random: a release-format model whose vocabulary takes any GPT-2 text (the fixture's 256 rows take bytes only)."""
    from safetensors.torch import load_file, save_file
    sd = load_file(os.path.join(LOOPLM, "model.safetensors"))
    emb = sd["model.embed.weight"]
    extra = torch.randn(vocab - len(emb), emb.size(1), generator=torch.Generator().manual_seed(seed)) * emb.std()
    sd["model.embed.weight"] = torch.cat([emb, extra])
    sd["model.lm_head.weight"] = sd["model.embed.weight"].clone()
    os.makedirs(folder, exist_ok=True)
    save_file(sd, os.path.join(folder, "model.safetensors"))
    with open(os.path.join(LOOPLM, "config.json")) as f:
        config = dict(json.load(f), vocab_size=vocab)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f)
    shutil.copy(os.path.join(LOOPLM, "spec.json"), folder)
    return folder


# the fixture against the official forward ------------------------------------------------------------------
REF = reference(LOOPLM)
DEPTHS = sorted(int(k.split("_")[1][1:]) for k in REF if k.startswith("logits_") and k.endswith("h0zero"))


def test_the_fixture_gives_three_depths():
    assert DEPTHS == [1, 3, 6]  # the README's T in {1, 3, 6}: a changed fixture is noticed, not skipped


@pytest.fixture(scope="module")
def looplm():
    return P.load(LOOPLM)


@pytest.mark.parametrize("T", DEPTHS)
@pytest.mark.parametrize("h0", ["zero", "given"])
def test_looplm_logits_equal_the_official_forward(looplm, T, h0):
    model, _ = looplm
    assert not model.training and model.config.mean_recurrence == 6  # eval mode, the release's depth
    with torch.no_grad():
        logits, _ = model(REF["tokens"], REF["tokens"], num_loops=T, h0=REF["h0"] if h0 == "given" else None)
    ref = REF[f"logits_T{T}_h0{h0}"]
    assert logits.dtype == torch.float32 and logits.shape == ref.shape
    assert (logits - ref).abs().max().item() < 1e-5
    # a step more or less is far outside that: the comparison can fail
    with torch.no_grad():
        other, _ = model(REF["tokens"], REF["tokens"], num_loops=T + 1)
    assert (other - REF[f"logits_T{T}_h0zero"]).abs().max().item() > 1e-2


@pytest.mark.parametrize("use_cache,cache", [(True, "full"), (False, "full")])
def test_looplm_greedy_generation_gives_the_reference_tokens(looplm, use_cache, cache):
    model, _ = looplm
    prompt = REF["greedy_prompt"][None]
    for T in DEPTHS:
        if f"greedy_T{T}" not in REF:
            continue
        out = model.generate(prompt, len(REF[f"greedy_T{T}"]), temperature=0, num_loops=T, use_cache=use_cache,
                             cache=cache)
        assert out[0, prompt.size(1):].tolist() == REF[f"greedy_T{T}"].tolist()


def test_num_loops_zero_in_sample_means_the_releases_depth(looplm):
    model, _ = looplm
    with torch.no_grad():
        default, _ = model(REF["tokens"], REF["tokens"])  # no num_loops: eval runs mean_recurrence = mu_rec
    assert (default - REF["logits_T6_h0zero"]).abs().max().item() < 1e-5


def test_the_load_maps_the_file_without_copying(looplm):
    model, _ = looplm
    for block in (*model.prelude, *model.core, *model.coda):
        a = block.attn  # q, k, v: row blocks of the file's fused qkv, one storage; gate and up of w13 likewise
        assert a.q.weight.untyped_storage().data_ptr() == a.k.weight.untyped_storage().data_ptr() == \
            a.v.weight.untyped_storage().data_ptr()
        assert block.mlp.gate.weight.untyped_storage().data_ptr() == block.mlp.up.weight.untyped_storage().data_ptr()
        assert a.q_norm.weight.numel() == 8 and block.ln_1.eps == 1e-6 and a.q_norm.eps == 1e-6


def test_eval_state_random_is_the_releases_own_draw(looplm):
    """eval_state='random' with LoopLM's state_init draws h0 = 0.02 randn at every forward, as its code does."""
    model, _ = looplm
    random_model, _ = P.load(LOOPLM, overrides={"eval_state": "random"})
    x = REF["tokens"]
    torch.manual_seed(7)
    with torch.no_grad():
        drawn, _ = random_model(x, x)
        again, _ = random_model(x, x)
    torch.manual_seed(7)
    h0 = 0.02 * torch.randn(*x.shape, model.config.n_embd)
    with torch.no_grad():
        given, _ = model(x, x, h0=h0)
    assert torch.equal(drawn, given)
    assert not torch.equal(drawn, again)  # a fresh draw every forward
    assert (drawn - REF["logits_T6_h0zero"]).abs().max().item() > 1e-4  # it changes the logits, a little


# Parcae: the fixture against the official forward -------------------------------------------------------------
PARCAE = os.path.join(SHARED, "parcae-tiny")
PREF = reference(PARCAE)
PDEPTHS = sorted(int(k.split("_")[1][1:]) for k in PREF if k.startswith("logits_") and k.endswith("h0zero"))


@pytest.fixture(scope="module")
def parcae():
    return P.load(PARCAE)


@pytest.mark.parametrize("T", PDEPTHS)
@pytest.mark.parametrize("h0", ["zero", "given"])
def test_parcae_logits_equal_the_official_forward(parcae, T, h0):
    model, _ = parcae
    assert PDEPTHS == [1, 3, 8] and model.config.mean_recurrence == 8 and model.config.value_embeds
    with torch.no_grad():
        logits, _ = model(PREF["tokens"], PREF["tokens"], num_loops=T, h0=PREF["h0"] if h0 == "given" else None)
    assert (logits - PREF[f"logits_T{T}_h0{h0}"]).abs().max().item() < 1e-5


@pytest.mark.parametrize("use_cache", [True, False])
def test_parcae_greedy_generation_gives_the_reference_tokens(parcae, use_cache):
    model, _ = parcae
    prompt = PREF["greedy_prompt"][None]
    out = model.generate(prompt, len(PREF["greedy_T8"]), temperature=0, num_loops=8, use_cache=use_cache)
    assert out[0, prompt.size(1):].tolist() == PREF["greedy_T8"].tolist()


def test_parcae_map_permutes_rope_rows_folds_the_half_and_keeps_the_rest_as_views(parcae):
    model, _ = parcae
    sd = torch.load(os.path.join(PARCAE, "pytorch_model.bin"), weights_only=True)
    hd = 24
    perm = [*range(0, hd, 2), *range(1, hd, 2)]
    for part, dst in (("prelude.0", model.prelude[0]), ("core_block.1", model.core[1]), ("coda.1", model.coda[1])):
        q = sd[f"transformer.{part}.attn.c_q.weight"].view(2, hd, 48)
        assert torch.equal(dst.attn.q.weight, q[:, perm].reshape(48, 48))
        assert torch.equal(dst.mlp.down.weight, 0.5 * sd[f"transformer.{part}.mlp.proj.weight"])
        assert torch.equal(dst.attn.v.weight, sd[f"transformer.{part}.attn.c_v.weight"])
    assert [n for n, m in model.named_modules() if getattr(m, "ve", None) is not None] == \
        ["prelude.1.attn", "core.1.attn", "coda.1.attn"]
    assert torch.equal(model.core[1].attn.ve.weight, sd["value_embeds.3.weight"])  # the core's table: layer 2 + 1


def test_parcae_tokenizer_gives_the_release_ids_for_every_case(parcae):
    _, tok = parcae
    with open(os.path.join(PARCAE, "tokenizer_cases.json")) as f:
        spec = json.load(f)
    assert tok.n_vocab == spec["vocab_size"] == 512 and (tok.bos, tok.eos) == (0, 1)
    assert {k: tok.special[k] for k in spec["specials"]} == spec["specials"]
    token_bytes = tok.token_bytes(512)
    assert len(spec["cases"]) == 30
    for case in spec["cases"]:
        ids = tok.encode(case["text"], specials=True)  # the tokenizers package's own reading, as the release's
        assert ids == case["ids"], case["text"]
        assert tok.decode(ids) == case["decoded"] == case["text"]
        plain = tok.encode(case["text"])  # special-token literals as text: the bytes of every id add up
        assert sum(token_bytes[plain]) == len(case["text"].encode()), case["text"]
    assert tok.encode("<|bos|>", specials=True) == [0] and 0 not in tok.encode("<|bos|>")
    assert tok.decode([0, 600]).endswith("\ufffd")  # a padded row: no text


PBAD = {
    "qk bias": (dict(config=lambda c: c.update(qk_bias=True)), ["'qk_bias' = true"]),
    "softcap": (dict(config=lambda c: c.update(logit_softcap=30.0)), ["'logit_softcap' = 30.0", "should be NoneType"]),
    "condensed rope": (dict(config=lambda c: c["rope_settings"].update(rope_condense_ratio=2)), ["'rope_settings'",
                                                                                               "rope_condense_ratio 1"]),
    "init scale": (dict(config=lambda c: c.update(init_strategy="takase")), ["'init_strategy' = \"takase\""]),
    "gelu": (dict(config=lambda c: c.update(nonlin_name="GELU")), ["'nonlin_name' = \"GELU\""]),
    "gqa": (dict(config=lambda c: c.update(num_key_value_heads=1)), ["'num_key_value_heads' = 1", "core blocks"]),
    "rope base": (dict(config=lambda c: c["rope_settings"].update(rope_base=10000)), ["'freqs_cis'", "differs from"]),
    "tokenizer vocab": (dict(config=lambda c: c.update(vocab_size=500)), ["tokenizer.json", "512 ids", "vocab_size 500"]),
    "gate without table": (dict(raw=lambda f: P_edit(f, lambda sd: sd.pop("value_embeds.3.weight"))),
                           ["core_block.1.attn.ve_gate.weight has no table value_embeds.3.weight"]),
    "table without gate": (dict(raw=lambda f: P_edit(f, lambda sd: sd.pop("transformer.coda.1.attn.ve_gate.weight"))),
                           ["value_embeds.5.weight has no gate"]),
    "shape": (dict(raw=lambda f: P_edit(f, lambda sd: sd.update({"transformer.C.weight": torch.zeros(48, 47)}))),
              ["'transformer.C.weight' has shape [48, 47]"]),
    "head copy": (dict(raw=lambda f: P_edit(f, lambda sd: sd.update({"lm_head.weight": sd["lm_head.weight"] + 1}))),
                  ["'lm_head.weight'", "differs from 'transformer.wte.weight'"]),
    "truncated": (dict(raw=lambda f: open(os.path.join(f, "pytorch_model.bin"), "r+b").truncate(20000)),
                  ["pytorch_model.bin: not a complete PyTorch weights file"]),
}


def P_edit(folder, edit):
    path = os.path.join(folder, "pytorch_model.bin")
    sd = torch.load(path, weights_only=True)
    edit(sd)
    torch.save(sd, path)


def parcae_copy(tmp_path, **edits):
    return edited_copy(tmp_path, src=PARCAE, **edits)


@pytest.mark.parametrize("case", sorted(PBAD))
def test_bad_parcae_release_is_one_line_naming_the_culprit(tmp_path, case):
    edit, words = PBAD[case]
    with pytest.raises(P.ReleaseError) as e:
        P.load(parcae_copy(tmp_path, **edit))
    assert "\n" not in str(e.value) and all(w in str(e.value) for w in words), str(e.value)


def test_parcae_without_its_tokenizer_offline_says_where_to_put_it(tmp_path):
    folder = parcae_copy(tmp_path, raw=lambda f: os.remove(os.path.join(f, "tokenizer.json")))
    env = dict(ENV, HF_HOME=str(tmp_path / "hf"))
    r = subprocess.run([sys.executable, "pretrained.py", folder], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
    assert "no tokenizer.json beside the weights" in r.stderr and "SandyResearch/parcae-tokenizer" in r.stderr


# Ouro: the fixture against the official forward --------------------------------------------------------------
OURO = os.path.join(SHARED, "ouro-tiny")
OREF = reference(OURO)


@pytest.fixture(scope="module")
def ouro():  # attn_impl="eager": transformers' attention order, so the official code's fp32 logits bit for bit
    return P.load(OURO, overrides={"attn_impl": "eager"})


def step_logits(model, x, t):
    """The readout after loop step t: a t-step run read out at its last step."""
    with torch.no_grad():
        return model(x, x, num_loops=t, exit_threshold=1.1)[0]  # q > 1: no step reaches it, so the last


def test_ouro_map_is_the_releases_shape():
    model, tok = P.load(OURO)
    c = model.config
    assert (c.injection, c.n_prelude, c.n_core, c.n_coda, c.mean_recurrence, c.readout_q) == ("none", 0, 3, 0, 4, 1.0)
    assert c.sandwich_norm and not c.tie_head and not c.final_norm and c.qk_norm == "none" and c.rope_base == 1e6
    assert model.lm_head.weight.dtype == torch.float32  # bf16 in the file, fp32 parameters by default
    from safetensors.torch import load_file
    sd = load_file(os.path.join(OURO, "model.safetensors"))
    assert torch.equal(model.lm_head.weight, sd["lm_head.weight"].float())
    assert torch.equal(model.core[2].post_ln_1.weight, sd["model.layers.2.input_layernorm_2.weight"].float())
    assert torch.equal(model.core[2].post_ln_2.weight, sd["model.layers.2.post_attention_layernorm_2.weight"].float())
    assert torch.equal(model.ln_loop.weight, sd["model.norm.weight"].float())
    assert torch.equal(model.exit_gate.bias, sd["model.early_exit_gate.bias"].float())
    bf16, _ = P.load(OURO, dtype="bfloat16")  # the file's dtype: views of it, nothing copied
    assert bf16.lm_head.weight.dtype == torch.bfloat16 and torch.equal(bf16.lm_head.weight, sd["lm_head.weight"])


@pytest.mark.parametrize("t", [1, 2, 3, 4])
def test_ouro_every_steps_logits_and_gate_equal_the_official_forward(ouro, t):
    model, _ = ouro
    x = OREF["tokens"]
    assert (step_logits(model, x, t) - OREF[f"logits_step{t}"]).abs().max().item() <= 1e-5
    with torch.no_grad():
        model(x, x, num_loops=4, every_step=True)
    z = model.last_exit[1]
    assert (z[t - 1] - OREF[f"gate_logits_step{t}"]).abs().max().item() <= 1e-5
    import decode
    pdf = decode.exit_cdf(z).diff(dim=0, prepend=torch.zeros_like(z[:1])).permute(1, 2, 0)
    assert (pdf - OREF["exit_pdf"]).abs().max().item() <= 1e-6


def test_ouro_with_the_default_attention_kernel_is_within_the_references_own_rounding():
    # SDPA sums in another order than transformers' eager attention; the sandwich norms and four steps carry the
    # difference to ~1.5e-4 on logits of size ~11, which is how far an fp64 model is from the fp32 reference too
    model, _ = P.load(OURO)
    model64, _ = P.load(OURO, dtype="float64", overrides={"attn_impl": "eager"})
    x = OREF["tokens"]
    sdpa = (step_logits(model, x, 4) - OREF["logits_step4"]).abs().max().item()
    exact = (step_logits(model64, x, 4).float() - OREF["logits_step4"]).abs().max().item()
    assert sdpa < 5e-4 and exact > 5e-5 and sdpa < 3 * exact


@pytest.mark.parametrize("q", [1.0, 0.5])
def test_ouro_readout_rule_at_q_is_the_releases(ouro, q):
    model, _ = ouro
    x = OREF["tokens"]
    with torch.no_grad():
        logits, _ = model(x, x, num_loops=4, exit_threshold=q)
    assert torch.equal(model.last_exit_step, OREF[f"exit_index_q{q}"])
    assert (logits - OREF[f"logits_q{q}"]).abs().max().item() <= 1e-5
    if q == 1.0:  # the release's default readout is the model's own: no threshold given
        with torch.no_grad():
            default, _ = model(x, x, num_loops=4)
        assert torch.equal(default, logits) and torch.equal(model.last_exit_step, OREF["exit_index_q1.0"])
    else:
        assert len(model.last_exit_step.unique()) == 4  # tokens really read out at every step


def test_ouro_depths_other_than_the_trained_one(ouro):
    model, _ = ouro
    x = OREF["tokens"]
    for n in (1, 2, 3):  # a model loaded with total_ut_steps = n: its default readout
        with torch.no_grad():
            logits, _ = model(x, x, num_loops=n)
        assert (logits - OREF[f"logits_T{n}_last"]).abs().max().item() <= 1e-5
    with torch.no_grad():
        logits, _ = model(x, num_loops=6)
        model(x, x, num_loops=6, every_step=True)
    assert (logits[:, -1] - OREF["logits_T6_lastpos"]).abs().max().item() <= 1e-5
    for t in (5, 6):
        assert (model.last_exit[1][t - 1] - OREF[f"gate_logits_T6_step{t}"]).abs().max().item() <= 1e-5


@pytest.mark.parametrize("use_cache", [True, False])
def test_ouro_greedy_generation_gives_the_reference_tokens(ouro, use_cache):
    model, _ = ouro
    prompt = OREF["greedy_prompt"][None]
    out = model.generate(prompt, len(OREF["greedy_q1.0"]), temperature=0, num_loops=4, use_cache=use_cache)
    assert out[0, prompt.size(1):].tolist() == OREF["greedy_q1.0"].tolist()


def test_ouro_q_exit_per_token_with_the_kv_cache_is_the_releases_readout(ouro):
    # token by token through the cache at q = 0.5: "compute" (the release's code: every step runs, only the
    # readout exits) gives the release's whole-sequence logits and exit steps at every position; "copy" (the exited
    # tokens stop, later ones read their last step's K/V) is another model, and its logits show it. A cached step
    # sums in other shapes than a whole-sequence forward: ~1e-4 here after the sandwich norms, with or without exits
    model, _ = ouro
    x, want = OREF["tokens"], OREF["logits_q0.5"]
    for exit_cache in ("compute", "copy"):
        cache, worst = model.new_cache(4), 0.0
        got, steps = model.forward_cached(x[:, :5], cache, 4, "gate", 0.5, exit_cache)  # a prompt: its last token
        assert (got - want[:, 4]).abs().max().item() <= 1e-5 and torch.equal(steps - 1, OREF["exit_index_q0.5"][:, 4])
        for pos in range(5, x.size(1)):
            got, steps = model.forward_cached(x[:, pos:pos + 1], cache, 4, "gate", 0.5, exit_cache)
            worst = max(worst, (got - want[:, pos]).abs().max().item())
            assert torch.equal(steps - 1, OREF["exit_index_q0.5"][:, pos]) or exit_cache == "copy"
        assert (worst < 5e-4) if exit_cache == "compute" else (worst > 1.0), (exit_cache, worst)


def test_ouro_tokenizer_gives_the_release_ids_for_every_case(ouro):
    _, tok = ouro
    with open(os.path.join(OURO, "tokenizer_cases.json")) as f:
        spec = json.load(f)
    cases = spec["cases"] if isinstance(spec, dict) else spec
    assert tok.n_vocab == 512 and tok.bos == tok.eos == 0 and len(cases) == 31
    assert {k: tok.special[k] for k in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")} == \
        {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2}
    token_bytes = tok.token_bytes(512)
    for case in cases:
        ids = tok.encode(case["text"], specials=True)
        assert ids == case["ids"], case["text"]
        assert tok.decode(ids) == case["decoded"], case["text"]
        plain = tok.encode(case["text"])
        assert sum(token_bytes[plain]) <= len(case["text"].encode()), case["text"]


OBAD = {
    "tied": (dict(config=lambda c: c.update(tie_word_embeddings=True)), ["'tie_word_embeddings' = true"]),
    "sliding": (dict(config=lambda c: c.update(use_sliding_window=True)), ["'use_sliding_window' = true"]),
    "sliding layer": (dict(config=lambda c: c.update(layer_types=["full_attention", "sliding_attention", "full_attention"])),
                      ["'layer_types'", "sliding-window"]),
    "gelu": (dict(config=lambda c: c.update(hidden_act="gelu")), ["'hidden_act' = \"gelu\""]),
    "rope scaling": (dict(config=lambda c: c.update(rope_scaling={"type": "linear", "factor": 2.0})),
                     ["'rope_scaling'", "should be NoneType"]),
    "head dim": (dict(config=lambda c: c.update(head_dim=16)), ["'head_dim' = 16", "hidden_size = 128"]),
    "threshold": (dict(config=lambda c: c.update(early_exit_threshold=1.5)), ["'early_exit_threshold' = 1.5"]),
    "unknown field": (dict(config=lambda c: c.update(use_qk_norm=True)), ["'use_qk_norm' = true", "unknown"]),
    "no post-norm": (dict(tensors=lambda sd: sd.pop("model.layers.1.input_layernorm_2.weight")),
                     ["'model.layers.1.input_layernorm_2.weight'", "is missing"]),
    "qk norm tensor": (dict(tensors=lambda sd: sd.update({"model.layers.0.self_attn.q_norm.weight": torch.ones(32,
                        dtype=torch.bfloat16)})), ["'model.layers.0.self_attn.q_norm.weight'", "refused"]),
    "mixed dtype": (dict(tensors=lambda sd: sd.update({"lm_head.weight": sd["lm_head.weight"].float()})),
                    ["'lm_head.weight' is float32 where the others are bfloat16"]),
    "layers": (dict(config=lambda c: c.update(num_hidden_layers=2, layer_types=["full_attention"] * 2)),
               ["'model.layers.2.", "not part of the model"]),
    "truncated": (dict(raw=lambda f: open(os.path.join(f, "model.safetensors"), "r+b").truncate(100000)),
                  ["model.safetensors: not a complete safetensors file"]),
}


def ouro_copy(tmp_path, **edits):
    return edited_copy(tmp_path, src=OURO, **edits)


@pytest.mark.parametrize("case", sorted(OBAD))
def test_bad_ouro_release_is_one_line_naming_the_culprit(tmp_path, case):
    edit, words = OBAD[case]
    with pytest.raises(P.ReleaseError) as e:
        P.load(ouro_copy(tmp_path, **edit))
    assert "\n" not in str(e.value) and all(w in str(e.value) for w in words), str(e.value)


def test_ouro_without_its_tokenizer_says_where_to_put_it(tmp_path):
    with pytest.raises(P.ReleaseError, match="no tokenizer.json beside the weights: put the release's tokenizer.json"):
        P.load(ouro_copy(tmp_path, raw=lambda f: os.remove(os.path.join(f, "tokenizer.json"))))


def test_sample_ouro_with_q_exit_and_chat():
    model, tok = P.load(OURO)
    prompt = "The cat"
    args = [f"--init_from={OURO}", f"--start={prompt}", "--temperature=0", "--num_samples=1", "--max_new_tokens=12",
            "--device=cpu"]
    want = model.generate(torch.tensor([tok.encode(prompt)]), 12, temperature=0, num_loops=4, exit_criterion="gate",
                          exit_threshold=0.5, exit_cache="compute")
    r = run("sample.py", *args, "--exit_criterion=gate", "--exit_threshold=0.5", "--exit_cache=compute")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split("\n[loop depth 4,")[0] == tok.decode(want[0].tolist())
    steps = float(r.stdout.split("mean loop steps per generated token ")[1].split(",")[0])
    assert 1 <= steps < 4, r.stdout  # tokens read out before the last step
    r = run("sample.py", *args, "--chat=True")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"), r.stdout
    reply = r.stdout.split("<|im_start|>assistant\n")[1].split("\n[loop depth")[0]
    assert reply.count("<|im_end|>") <= 1 and (reply.endswith("<|im_end|>") or "<|im_end|>" not in reply)
    r = run("sample.py", f"--init_from={LOOPLM}", "--start=a", "--chat=True", "--device=cpu")
    assert r.returncode == 1 and "no <|im_start|> and <|im_end|> tokens" in r.stderr


def test_eval_ouro_reports_the_q_exit_beside_each_depth(text, tmp_path):
    import eval as ev
    r = run("eval.py", f"--init_from={OURO}", f"--data_dir={text}", "--tasks=val", "--eval_loops=2,4",
            "--val_tokens=300", f"--out_dir={tmp_path}", "--device=cpu", "--exit_thresholds=0.5,1.0")
    assert r.returncode == 0, r.stderr
    assert "loss@q0.5" in r.stdout and "steps@q0.5" in r.stdout
    with open(tmp_path / "eval_ouro-tiny.json") as f:
        res = json.load(f)["tasks"]["val"]
    model, tok = P.load(OURO)
    rows = ev.val_documents(text, 300, tok, model.config.block_size)
    n = sum(len(c) for _, c in rows)
    for T in (2, 4):
        m = res["metrics"]
        assert 1 <= m["steps@q0.5"][str(T)] < T and m["steps@q1"][str(T)] == pytest.approx(T)
        assert m["loss@q1"][str(T)] == pytest.approx(m["loss"][str(T)], rel=1e-5)  # q = 1: the release's readout
        exit = {"qs": (0.5,)}  # by hand: the loss of each token at its Q-exit step, from the model's own readout
        ev.score_rows(model, rows, T, 4, exit=exit)
        assert m["loss@q0.5"][str(T)] == pytest.approx(exit["sums"][0].item() / n, rel=1e-5)
        with torch.no_grad():
            nats = 0.0
            for first, cont in rows:
                seq = torch.tensor([first + cont])
                logits, _ = model(seq[:, :-1], seq[:, 1:], num_loops=T, exit_threshold=0.5)
                nats += torch.nn.functional.cross_entropy(logits[0], seq[0, 1:], reduction="sum").item()
        assert m["loss@q0.5"][str(T)] == pytest.approx(nats / n, rel=1e-4)


# the real releases' layout, on the meta device ----------------------------------------------------------------
# parameters as the releases state them, and the power of ten they are given to: LoopLM's README 134.1M, Parcae's
# model cards 144M / 388M / 777M / 1339M; Ouro's names round down what its code builds (1.43B, 2.67B: the
# inventories' n_params, which the map must give exactly)
PUBLISHED = {"looplm-135m-naive": (134.1e6, 5), "parcae-140m": (144e6, 6), "parcae-370m": (388e6, 6),
             "parcae-770m": (777e6, 6), "parcae-1.3b": (1339e6, 6), "ouro-1.4b": (1.43e9, 7), "ouro-2.6b": (2.67e9, 7)}
RELEASE_DEPTH = {"LoopLM": 6, "Parcae": 8, "Ouro": 4}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_real_release_inventory_maps_on_the_meta_device(name):
    inv = inventory(name)
    m = P.release_map(inv["config"], name, keys=inv["tensors"])
    config = GPTConfig(**P.apply_overrides(m["settings"], None, name))
    shapes = P.param_shapes(config)
    reader = P.Inventory(inv["tensors"])
    assert P.check_file(reader, m, shapes, name) == ("bfloat16" if m["family"] == "Ouro" else "float32")
    state = P.convert(reader, m, shapes, torch.float32, name)
    assert {k: tuple(v.shape) for k, v in state.items()} == shapes and all(v.is_meta for v in state.values())
    consumed = [k for k in m["plan"]] + [k for k in m["drops"]]
    assert sorted(consumed) == sorted(inv["tensors"])  # every tensor of the file, once
    n = sum(math.prod(s) for s in shapes.values())
    assert n == sum(math.prod(shape) for k, (shape, _) in inv["tensors"].items() if k not in m["drops"])
    published, digits = PUBLISHED[name]
    assert round(n / 10 ** digits) == round(published / 10 ** digits) and n == inv.get("n_params", n)
    assert config.mean_recurrence == RELEASE_DEPTH[m["family"]]


def test_a_config_of_no_known_family_is_named_not_guessed():
    with pytest.raises(P.ReleaseError, match=r"not the config of a family nanoloop loads \(LoopLM, Parcae, Ouro\)"):
        P.release_map({"model_type": "llama", "hidden_size": 2048}, "config.json")


# bad input: one line naming the culprit, nothing loaded --------------------------------------------------------
def edited_copy(tmp_path, tensors=None, config=None, raw=None, src=LOOPLM):
    """A copy of a fixture (LoopLM's unless src) with its safetensors tensors, its config or its raw files edited."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file
    folder = tmp_path / os.path.basename(src)
    shutil.copytree(src, folder)
    if tensors is not None:
        weights = os.path.join(src, "model.safetensors")
        sd = load_file(weights)
        tensors(sd)
        save_file(sd, folder / "model.safetensors", metadata=safe_open(weights, "pt").metadata())  # as the file had it
    if config is not None:
        with open(os.path.join(src, "config.json")) as f:
            c = json.load(f)
        config(c)
        with open(folder / "config.json", "w") as f:
            json.dump(c, f)
    if raw is not None:
        raw(folder)
    return str(folder)


def cut(folder):  # a download that stopped early
    path = os.path.join(folder, "model.safetensors")
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[:len(data) - 1000])


BAD = {
    "key removed": (dict(tensors=lambda sd: sd.pop("model.loop.attn.q_norm.weight")),
                    ["'model.loop.attn.q_norm.weight'", "is missing", "model.safetensors"]),
    "key added": (dict(tensors=lambda sd: sd.update({"model.loop.attn.bias": torch.zeros(32)})),
                  ["'model.loop.attn.bias'", "not part of the model", "model.safetensors"]),
    "shape changed": (dict(tensors=lambda sd: sd.update({"model.coda.0.ffn.w2.weight": torch.zeros(32, 65)})),
                      ["'model.coda.0.ffn.w2.weight'", "[32, 65]", "[32, 64]"]),
    "dtype mixed": (dict(tensors=lambda sd: sd.update({"model.final_norm.weight": sd["model.final_norm.weight"].half()})),
                    ["'model.final_norm.weight'", "float16", "float32"]),
    "head differs": (dict(tensors=lambda sd: sd["model.lm_head.weight"].mul_(1.001)),
                     ["'model.lm_head.weight'", "differs from 'model.embed.weight'"]),
    "truncated": (dict(raw=cut), ["model.safetensors", "not a complete safetensors file"]),
    "unsupported value": (dict(config=lambda c: c.update(use_a_matrix=True)), ["config.json", "'use_a_matrix'", "true"]),
    "untied head": (dict(config=lambda c: c.update(tie_embeddings=False)), ["'tie_embeddings'", "untied"]),
    "no qk norm": (dict(config=lambda c: c.update(qk_norm=False)), ["'qk_norm'"]),
    "head dim": (dict(config=lambda c: c.update(head_dim=16)), ["'head_dim' = 16"]),
    "unknown field": (dict(config=lambda c: c.update(sliding_window=512)), ["'sliding_window'", "unknown"]),
    "wrong type": (dict(config=lambda c: c.update(d_model="32")), ["'d_model'", "should be int"]),
    "missing field": (dict(config=lambda c: c.pop("rope_theta")), ["'rope_theta'"]),
    "not json": (dict(raw=lambda f: open(os.path.join(f, "config.json"), "w").write("{oops")), ["config.json", "JSON"]),
    "no weights": (dict(raw=lambda f: os.remove(os.path.join(f, "model.safetensors"))), ["has no model.safetensors"]),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_release_is_one_line_naming_the_culprit(tmp_path, case):
    edit, words = BAD[case]
    folder = edited_copy(tmp_path, **edit)
    with pytest.raises(P.ReleaseError) as e:
        P.load(folder)
    msg = str(e.value)
    assert "\n" not in msg and all(w in msg for w in words), msg


def test_the_check_command_says_the_same_in_one_line(tmp_path):
    folder = edited_copy(tmp_path, **BAD["key removed"][0])
    r = subprocess.run([sys.executable, "pretrained.py", folder], cwd=ROOT, env=ENV, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: ") and "model.loop.attn.q_norm.weight" in r.stderr


@pytest.mark.parametrize("name,words", [
    ("looplm-135m", ["unknown release 'looplm-135m'", "did you mean looplm-135m-naive?"]),
    ("no spaces allowed", ["unknown release"]),
])
def test_unknown_name_is_one_line(name, words):
    with pytest.raises(P.ReleaseError) as e:
        P.load(name)
    assert "\n" not in str(e.value) and all(w in str(e.value) for w in words), str(e.value)


def test_offline_hub_with_nothing_cached_says_how_to_go_on(tmp_path):
    env = dict(ENV, HF_HOME=str(tmp_path / "hf"))
    r = subprocess.run([sys.executable, "pretrained.py", "looplm-135m-naive"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
    for words in ("harims95/LoopLM-135M-naive", "not in the Hugging Face cache", "HF_HUB_OFFLINE", "local folder"):
        assert words in r.stderr, r.stderr


def test_a_value_nanoloop_cannot_build_names_the_fields_that_gave_it(tmp_path):
    folder = edited_copy(tmp_path, config=lambda c: c.update(n_kv_heads=3))
    with pytest.raises(P.ReleaseError) as e:
        P.load(folder)
    assert "config.json: n_q_heads = 4, n_kv_heads = 3 give GPTConfig.n_head=4: must be divisible by n_kv_head=3" \
        in str(e.value)
    folder = edited_copy(tmp_path / "spec", raw=lambda f: open(os.path.join(f, "spec.json"), "w").write(
        json.dumps({"train_config": {"seq_len": 100.5}})))
    with pytest.raises(P.ReleaseError, match=r"spec.json: train_config.seq_len = 100.5 is no sequence length"):
        P.load(folder)


def test_a_failed_download_is_one_line(monkeypatch):
    import huggingface_hub

    def dropped(*args, **kwargs):
        raise ConnectionResetError("connection reset by peer")
    monkeypatch.setattr(P, "hub_offline", lambda: None)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", dropped)
    with pytest.raises(P.ReleaseError) as e:
        P.load("looplm-135m-naive")
    assert str(e.value) == ("harims95/LoopLM-135M-naive: downloading config.json failed (ConnectionResetError: "
                            "connection reset by peer): run the same command again to resume it, or pass a local folder")


def test_offline_is_assumed_only_where_nothing_can_reach_the_hub(monkeypatch):
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "https://no-such-host.invalid")
    for v in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(v, raising=False)
    assert P.hub_offline() == "no-such-host.invalid does not resolve"
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")  # the proxy resolves it: try the hub
    assert P.hub_offline() is None
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert P.hub_offline() == "HF_HUB_OFFLINE is set"


def test_two_models_of_one_release_share_nothing_writable():
    r = P.Release(LOOPLM)
    a, b = r.model(), r.model()
    with torch.no_grad():
        a.core[0].attn.q.weight.add_(1.0)  # what a fine-tune's optimizer step does
    a.config.eval_state = "random"
    assert not torch.equal(a.core[0].attn.q.weight, b.core[0].attn.q.weight) and b.config.eval_state == "zero"
    with torch.no_grad():
        logits, _ = r.model()(REF["tokens"], REF["tokens"], num_loops=6)  # and the file is as it was
    assert (logits - REF["logits_T6_h0zero"]).abs().max().item() < 1e-5


@pytest.mark.parametrize("dtype", ["int64", "foo"])
def test_a_dtype_that_is_not_float_is_one_line(dtype):
    with pytest.raises(P.ReleaseError, match="take a float dtype"):
        P.Release(LOOPLM).model(dtype=dtype)


def test_bfloat16_parameters_on_request():
    model = P.Release(LOOPLM).model(dtype="bfloat16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


@pytest.mark.parametrize("overrides,words", [
    ({"n_embd": 64}, ["n_embd=64 contradicts", "n_embd=32"]),
    ({"mlp": "relu2"}, ["mlp='relu2' contradicts"]),
    ({"norm_eps": 1e-5}, ["norm_eps=1e-05 contradicts"]),
    ({"block_size": 2048}, ["block_size=2048 is longer than the release's 1024"]),
    ({"learning_rate": 1.0}, ["'learning_rate' is not a model setting"]),
])
def test_a_setting_that_contradicts_the_release_is_refused(overrides, words):
    with pytest.raises(P.ReleaseError) as e:
        P.Release(LOOPLM, overrides)
    assert all(w in str(e.value) for w in words), str(e.value)


def test_depth_and_state_settings_may_change():
    free = {"mean_recurrence": 8, "backprop_depth": 8, "depth_sampling": "fixed", "state_init": "zero",
            "eval_state": "random", "loop_checkpoint": True, "block_size": 64, "n_embd": 32}  # n_embd: the same value
    model, _ = P.load(LOOPLM, overrides=free)
    assert all(getattr(model.config, k) == v for k, v in free.items()) and model.cos.shape == (64, 4)
    with torch.no_grad():  # the weights compute the same function: the T = 6 logits at depth 6, h0 = 0
        model.config.eval_state = "zero"
        logits, _ = model(REF["tokens"], REF["tokens"], num_loops=6)
    assert (logits - REF["logits_T6_h0zero"]).abs().max().item() < 1e-5


# the check command ------------------------------------------------------------------------------------------------
def test_check_command_accounts_for_every_tensor():
    r = subprocess.run([sys.executable, "pretrained.py", LOOPLM], cwd=ROOT, env=ENV, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    from safetensors import safe_open
    with safe_open(os.path.join(LOOPLM, "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    lines = r.stdout.splitlines()
    for k in keys:  # each tensor once, with what became of it
        assert sum(line.strip().startswith(k + " ") for line in lines) == 1, k
    assert any("model.lm_head.weight" in line and "dropped" in line and "checked equal" in line for line in lines)
    assert "parameters: 45,408" in r.stdout and "sha256 " in r.stdout
    assert "use_a_matrix = false" in r.stdout and "injection='add'" in r.stdout
    assert "loss on the built-in text: skipped" in r.stdout  # 256 rows cannot take GPT-2 text


def test_check_command_reports_loss_by_depth_on_a_full_vocabulary(tmp_path):
    folder = widened_looplm(str(tmp_path / "wide"))
    r = subprocess.run([sys.executable, "pretrained.py", folder], cwd=ROOT, env=ENV, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    model, tok = P.load(folder)
    want = P.text_loss(model, tok, [1, 6])
    for T in (1, 6):
        assert f"T={T:<3} loss {want[T][0]:.4f}   bpb {want[T][1]:.4f}   drawn h0: loss " in r.stdout
    assert "T=12" in r.stdout and "<- the release's depth" in r.stdout


def test_record_names_the_files_and_their_sha256(looplm):
    import hashlib
    model, _ = looplm
    rec = model.release.record()
    with open(os.path.join(LOOPLM, "model.safetensors"), "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    assert rec["family"] == "LoopLM" and rec["files"]["model.safetensors"] == digest
    assert rec["folder"] == os.path.abspath(LOOPLM) and rec["repo"] is None


def test_gpt2_tokenizer_round_trip(looplm):
    _, tok = looplm
    text = "Loops, at test time: 1984 ✓"
    assert tok.decode(tok.encode(text)) == text and tok.bos == tok.eos == 50256 and tok.n_vocab == 50257
    assert tok.encode("<|endoftext|>", specials=True) == [50256] and len(tok.encode("<|endoftext|>")) > 1
    assert tok.decode([50300]) == "\ufffd"  # a padded row: no text


# everywhere a user expects it: sample.py, eval.py, train.py (fine-tune), bench.py ---------------------------------
def run(script, *args, env=ENV):
    return subprocess.run([sys.executable, script, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    return widened_looplm(str(tmp_path_factory.mktemp("release") / "looplm-wide"))


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    from prepare_fineweb import build_sample
    folder = str(tmp_path_factory.mktemp("sample"))
    build_sample(folder)
    return folder


def test_sample_from_a_release_with_the_cache_and_every_exit(wide):
    model, tok = P.load(wide)
    prompt = "The history of"
    want = model.generate(torch.tensor([tok.encode(prompt)]), 12, temperature=0, num_loops=6, use_cache=False)
    args = [f"--init_from={wide}", f"--start={prompt}", "--temperature=0", "--num_samples=1", "--max_new_tokens=12",
            "--device=cpu"]
    r = run("sample.py", *args, "--num_loops=0")  # 0: the release's depth, 6
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0] == tok.decode(want[0].tolist()) and "[loop depth 6," in r.stdout
    for crit, q in (("kl", "0.01"), ("latent", "0.5")):
        r = run("sample.py", *args, f"--exit_criterion={crit}", f"--exit_threshold={q}", "--num_loops=12")
        assert r.returncode == 0, r.stderr
        steps = float(r.stdout.split("mean loop steps per generated token ")[1].split(",")[0])
        assert 1 <= steps < 12, r.stdout  # some tokens left the loop early
    r = run("sample.py", *args, "--exit_criterion=gate")
    assert r.returncode == 1 and "has none (exit_gate=False)" in r.stderr
    r = run("sample.py", *args, "--eval_state=random", "--seed=3")
    assert r.returncode == 0 and r.stdout.splitlines()[0].startswith(prompt), r.stderr


def test_sample_refuses_a_prompt_past_the_models_vocabulary():
    r = run("sample.py", f"--init_from={LOOPLM}", "--start=The", "--device=cpu")  # 256 rows: GPT-2 bytes only
    assert r.returncode == 1 and r.stderr.strip() == "error: the prompt has token id 464, past the model's vocabulary of 256"
    r = run("sample.py", f"--init_from={LOOPLM}", "--start=a", "--temperature=0", "--num_samples=1",
            "--max_new_tokens=4", "--device=cpu")  # "a" is GPT-2's single-byte token 64: it fits
    assert r.returncode == 0, r.stderr


def test_eval_a_release_by_depth(wide, text, tmp_path):
    from test_eval import write_eval_data
    data = write_eval_data(tmp_path / "evaldata")
    r = run("eval.py", f"--init_from={wide}", f"--data_dir={text}", f"--eval_data_dir={data}", "--eval_loops=1,6",
            "--val_tokens=2048", f"--out_dir={tmp_path}", "--device=cpu")
    assert r.returncode == 0, r.stderr
    with open(os.path.join(tmp_path, "eval_looplm-wide.json")) as f:
        res = json.load(f)
    assert res["release"]["files"]["model.safetensors"] and res["eval_loops"] == [1, 6]
    assert set(res["tasks"]) == {"val", "hellaswag", "lambada"} and res["tasks"]["val"]["items"] == 2048
    # the val numbers are those of the release's model on the shard's first 2 rows of 1024
    import numpy as np
    from prepare_fineweb import open_shard
    val = np.concatenate([open_shard(os.path.join(text, f)) for f in sorted(os.listdir(text)) if "_val_" in f])
    tokens = torch.from_numpy(val[:2049].astype(np.int64))
    model, tok = P.load(wide)
    nbytes = torch.as_tensor(tok.token_bytes(50304))[tokens[1:]]
    for T in (1, 6):
        with torch.no_grad():
            logits, loss = model(tokens[:-1].view(2, 1024), tokens[1:].view(2, 1024), num_loops=T)
        nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[1:], reduction="none")
        assert res["tasks"]["val"]["metrics"]["loss"][str(T)] == pytest.approx(loss.item(), rel=1e-5)
        bpb = nll[nbytes > 0].sum().item() / (math.log(2) * nbytes.sum().item())
        assert res["tasks"]["val"]["metrics"]["bpb"][str(T)] == pytest.approx(bpb, rel=1e-5)


FT = ["--block_size=64", "--batch_size=2", "--total_batch_size=128", "--val_tokens=512", "--eval_loops=1,6",
      "--log_interval=1", "--compile=False", "--device=cpu", "--muon_lr=0.002", "--adam_lr=3e-4"]


def test_fine_tune_a_release_then_resume_sample_and_eval(wide, text, tmp_path):
    out = str(tmp_path / "ft")
    r = run("train.py", f"--init_from={wide}", f"--data_dir={text}", f"--out_dir={out}", *FT, "--max_iters=4",
            "--eval_interval=4")
    assert r.returncode == 0, r.stdout + r.stderr
    ckpt = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    args = ckpt["model_args"]
    assert (args["qk_norm"], args["norm_eps"], args["mlp"], args["n_embd"], args["vocab_size"]) == \
        ("gain", 1e-6, "swiglu", 32, 50304)
    assert args["block_size"] == 64 and args["mean_recurrence"] == 6 and args["state_init"] == "normal"
    assert ckpt["tokenizer"] == "gpt2" and ckpt["config"]["n_embd"] == 32  # the saved settings describe the model
    assert ckpt["config"]["qk_norm"] == "gain" and ckpt["config"]["init_from"] == wide
    with open(os.path.join(out, "log.jsonl")) as f:
        log = [json.loads(line) for line in f]
    rec = log[0]["run"]["release"]
    assert rec["family"] == "LoopLM" and len(rec["files"]["model.safetensors"]) == 64
    assert ckpt["runs"][0]["release"] == rec
    # the evaluation at iter 0 is the release's own model: fine-tuning starts from its weights
    first = next(x for x in log if "val" in x)
    model, _ = P.load(wide, overrides={"block_size": 64})
    import numpy as np
    from prepare_fineweb import open_shard
    val = np.concatenate([open_shard(os.path.join(text, f)) for f in sorted(os.listdir(text)) if "_val_" in f])
    tokens = torch.from_numpy(val[:513].astype(np.int64))
    with torch.no_grad():
        want = model(tokens[:-1].view(8, 64), tokens[1:].view(8, 64), num_loops=6)[1].item()
    assert first["iter"] == 0 and first["val"]["6"] == pytest.approx(want, rel=1e-5)
    # an ordinary checkpoint: it resumes, samples and evaluates with no flag about the release
    r = run("train.py", f"--out_dir={out}", "--init_from=resume", "--max_iters=6")
    assert r.returncode == 0 and "resuming from" in r.stdout, r.stdout + r.stderr
    r = run("sample.py", f"--out_dir={out}", "--start=The loop", "--num_samples=1", "--max_new_tokens=5", "--device=cpu")
    assert r.returncode == 0 and r.stdout.startswith("The loop"), r.stderr


def test_fine_tune_refuses_a_contradicting_setting_before_writing_anything(wide, text, tmp_path):
    out = str(tmp_path / "never")
    r = run("train.py", "config/tiny.py", f"--init_from={wide}", f"--data_dir={text}", f"--out_dir={out}", *FT)
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and not os.path.exists(out), r.stderr
    assert "n_embd=128, n_prelude=1, injection='diagonal' contradict the release" in r.stderr  # all of them, at once
    assert "which has n_embd=32, n_prelude=2, injection='add'" in r.stderr
    r = run("train.py", f"--init_from={wide}", f"--data_dir={text}", f"--out_dir={out}", *FT, "--block_size=2048")
    assert r.returncode == 1 and "may only shrink" in r.stderr and not os.path.exists(out)
    r = run("train.py", "--init_from=looplm-135m", f"--data_dir={text}", f"--out_dir={out}", *FT)
    assert r.returncode == 1 and "did you mean looplm-135m-naive?" in r.stderr and not os.path.exists(out)


def test_bench_a_release(wide):
    r = run("bench.py", f"--init_from={wide}", "--device=cpu", "--decode_tokens=3", "--prompt_len=8")
    assert r.returncode == 0, r.stderr
    assert "LoopLM, 1.65M parameters" in r.stdout and "peak RSS after inference" in r.stdout
    rows = [line.split() for line in r.stdout.splitlines() if line.split()[:1] == ["6"]]
    assert [row[1] for row in rows] == ["full", "last", "none"]  # its depth, cache on (two kinds) and off
    r = run("bench.py", f"--init_from={wide}", "--device=cpu", "--n_embd=64")
    assert r.returncode == 1 and "n_embd=64 contradicts the release" in r.stderr


def test_eval_leaves_out_val_where_there_are_no_shards_unless_asked(wide, tmp_path):
    from test_eval import write_eval_data
    data = write_eval_data(tmp_path / "evaldata")
    args = [f"--init_from={wide}", f"--data_dir={tmp_path}", f"--eval_data_dir={data}", "--eval_loops=1",
            f"--out_dir={tmp_path}", "--device=cpu"]
    r = run("eval.py", *args)
    assert r.returncode == 0 and f"note: no val shards (*_val_*.bin) in {tmp_path}" in r.stderr
    assert "lambada" in r.stdout and "val " not in r.stdout
    r = run("eval.py", *args, "--tasks=val,lambada")
    assert r.returncode == 1 and r.stderr.startswith("error: no val shards") and r.stderr.count("\n") == 1


# Parcae everywhere: its own tokenizer in sample.py, eval.py, prepare_fineweb.py and a fine-tune -----------------
def test_sample_from_parcae_starts_with_its_bos_and_exits():
    model, tok = P.load(PARCAE)
    prompt = "def main():"
    ids = [tok.bos] + tok.encode(prompt)
    want = model.generate(torch.tensor([ids]), 10, temperature=0, num_loops=8, use_cache=False)
    args = [f"--init_from={PARCAE}", f"--start={prompt}", "--temperature=0", "--num_samples=1", "--max_new_tokens=10",
            "--device=cpu"]
    r = run("sample.py", *args)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split("\n[loop depth 8,")[0] == tok.decode(want[0].tolist()) and r.stdout.startswith("<|bos|>")
    r = run("sample.py", *args, "--exit_criterion=kl", "--exit_threshold=0.01", "--num_loops=16")
    assert r.returncode == 0 and "mean loop steps per generated token" in r.stdout, r.stderr


def test_eval_parcae_on_gpt2_shards_re_encodes_the_documents(text, tmp_path):
    from test_eval import write_eval_data
    import eval as ev
    data = write_eval_data(tmp_path / "evaldata")
    r = run("eval.py", f"--init_from={PARCAE}", f"--data_dir={text}", f"--eval_data_dir={data}", "--eval_loops=8",
            "--val_tokens=300", f"--out_dir={tmp_path}", "--device=cpu")
    assert r.returncode == 0, r.stderr
    with open(tmp_path / "eval_parcae-tiny.json") as f:
        res = json.load(f)["tasks"]
    model, tok = P.load(PARCAE)
    rows = ev.val_documents(text, 300, tok, 64)  # each document of the GPT-2 shard, decoded, encoded by Parcae's
    from prepare_fineweb import open_shard
    shard = open_shard(ev.val_paths(text)[0])
    end = int((shard[1:] == 50256).nonzero()[0][0]) + 1  # the first document: after its <|endoftext|>, to the next
    first = tok.encode(P.GPT2Tokenizer().decode(shard[1:end].tolist()))[:65]
    assert rows[0][0] + rows[0][1] == first and first[0] != tok.bos  # no BOS, cut to block_size + 1, as Parcae's own
    n = sum(len(c) for _, c in rows)
    nats = sum(s[0] for s in ev.score_rows(model, rows, 8, 4))
    nbytes = sum(tok.token_bytes(512)[c].sum() for _, c in rows)
    assert res["val"]["items"] == n >= 300 and res["val"]["metrics"]["loss"]["8"] == pytest.approx(nats / n, rel=1e-5)
    assert res["val"]["metrics"]["bpb"]["8"] == pytest.approx(nats / (math.log(2) * nbytes), rel=1e-5)
    hs, lb = ev.task_rows("hellaswag", [("A man", ["walks", "runs"], 0)], tok), ev.task_rows("lambada", [("a b", "c")], tok)
    assert hs[0][0][0][0] == tok.bos and lb[0][0][0][0] != tok.bos  # HellaSwag after <|bos|>, LAMBADA without


def test_fine_tune_parcae_on_shards_of_its_own_tokenizer(tmp_path):
    from prepare_fineweb import sample_documents
    docs = tmp_path / "docs"
    docs.mkdir()
    for i, d in enumerate(sample_documents()[:40]):
        (docs / f"{i:02d}.txt").write_text(d)
    shards, out = str(tmp_path / "shards"), str(tmp_path / "ft")
    r = run("prepare_fineweb.py", "--text", *sorted(str(p) for p in docs.iterdir()), f"--tokenizer={PARCAE}",
            f"--data_dir={shards}", "--name=pt")
    assert r.returncode == 0 and os.path.exists(os.path.join(shards, "tokenizer.json")), r.stderr
    from prepare_fineweb import open_shard
    val = open_shard(os.path.join(shards, "pt_val_000000.bin"))
    assert val[0] == 0 and val.max() < 512  # documents start with <|bos|>, the ids are Parcae's
    args = [f"--init_from={PARCAE}", f"--data_dir={shards}", f"--out_dir={out}", "--block_size=64", "--batch_size=2",
            "--total_batch_size=128", "--val_tokens=256", "--eval_loops=8", "--log_interval=1", "--compile=False",
            "--device=cpu", "--max_iters=3", "--eval_interval=3"]
    r = run("train.py", *args)
    assert r.returncode == 0, r.stdout + r.stderr
    ckpt = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    assert ckpt["model_args"]["value_embeds"] and ckpt["tokenizer"]["bos"] == "<|bos|>"
    first = next(x for x in read_jsonl(os.path.join(out, "log.jsonl")) if "val" in x)
    model, _ = P.load(PARCAE)
    x = torch.from_numpy(val[:257].astype("int64"))
    with torch.no_grad():
        want = model(x[:-1].view(4, 64), x[1:].view(4, 64), num_loops=8)[1].item()
    assert first["iter"] == 0 and first["val"]["8"] == pytest.approx(want, rel=1e-5)  # the release's weights, at first
    r = run("sample.py", f"--out_dir={out}", "--start=def f", "--num_samples=1", "--max_new_tokens=4", "--device=cpu")
    assert r.returncode == 0 and r.stdout.startswith("<|bos|>def f"), r.stderr  # its tokenizer, from the checkpoint
    r = run("train.py", f"--out_dir={out}", "--init_from=resume", "--max_iters=4")
    assert r.returncode == 0, r.stderr
    gpt2 = str(tmp_path / "gpt2")
    from prepare_fineweb import build_sample
    build_sample(gpt2)
    r = run("train.py", *args, f"--data_dir={gpt2}", f"--out_dir={tmp_path / 'never'}")
    assert r.returncode == 1 and "were made with GPT-2's tokenizer" in r.stderr and not os.path.exists(tmp_path / "never")


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


if __name__ == "__main__":
    if len(sys.argv) != 4 or sys.argv[1] != "synthetic":
        raise SystemExit("usage: python test_pretrained.py synthetic NAME FOLDER   (NAME: an inventory in ../shared)")
    print(f"wrote {write_synthetic(sys.argv[2], sys.argv[3])}")
