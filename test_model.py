"""Tests of model.py (CPU, tiny shapes).   python -m pytest -q test_model.py"""
import math
import os
import runpy

import pytest
import torch
import torch.nn.functional as F

from conftest import DEVICES, cuda_only
from model import GPT, GPTConfig, Block

INJECTIONS = ["add", "concat", "diagonal"]


def tiny(injection="diagonal", **kw):
    args = dict(block_size=32, vocab_size=64, n_embd=32, n_head=4, n_kv_head=2, n_prelude=1, n_core=2,
                n_coda=1, injection=injection, mean_recurrence=4, backprop_depth=2)
    args.update(kw)
    return GPTConfig(**args)


def randomized(cfg, seed=0, dtype=torch.float32):
    """A model whose zero-initialised output projections are made random, so every block does work."""
    torch.manual_seed(seed)
    model = GPT(cfg).to(dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("attn.o.weight", "mlp.down.weight")):
                p.normal_(0, 0.1)
            elif p.dim() == 2 and name not in ("B.weight",):
                p.normal_(0, 0.3 if name != "wte.weight" else 1.0)
    return model


# 1. parameter counts of the README's config table ------------------------------------------------
def closed_form_params(d, n_head, n_kv, layers, injection, prelude_norm, V=50304, mlp="relu2", mlp_hidden=0):
    kv_dim = d // n_head * n_kv
    mlp_params = (3 if mlp == "swiglu" else 2) * d * (mlp_hidden or 4 * d)  # (gate,) up, down
    block = d * d + 2 * d * kv_dim + d * d + mlp_params + 2 * d  # q, k, v, o, MLP, two norms
    extra = {"add": 0, "concat": 2 * d * d, "diagonal": 2 * d * d + 2 * d}[injection]
    return V * d + layers * block + d + (d if prelude_norm else 0) + extra


@pytest.mark.parametrize("shape,table", [
    (dict(n_embd=1024, n_head=16, n_kv_head=8, n_prelude=4, n_core=1, n_coda=2, mean_recurrence=6, backprop_depth=3),
     {"add": 132.3, "diagonal": 134.4, "concat": 134.4}),
    (dict(n_embd=1280, n_head=10, n_kv_head=10, n_prelude=5, n_core=5, n_coda=5, mean_recurrence=8, backprop_depth=4),
     {"add": 359.3, "diagonal": 362.6, "concat": 362.6}),
])
@pytest.mark.parametrize("injection", INJECTIONS)
def test_param_counts_match_spec_table(shape, table, injection):
    cfg = GPTConfig(block_size=1024, vocab_size=50304, injection=injection, prelude_norm=injection != "add", **shape)
    with torch.device("meta"):
        model = GPT(cfg)
    n = model.get_num_params()
    layers = shape["n_prelude"] + shape["n_core"] + shape["n_coda"]
    assert n == closed_form_params(shape["n_embd"], shape["n_head"], shape["n_kv_head"], layers, injection,
                                   cfg.prelude_norm)
    assert round(n / 1e6, 1) == table[injection]
    assert model.wte.weight.data_ptr() == model.wte.weight.data_ptr()  # tied head: counted once above


def config_model_args(name):
    """The GPTConfig fields a config file sets (the rest at their defaults, which are train.py's)."""
    settings = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "config", name))
    return {k: v for k, v in settings.items() if k in GPTConfig.__dataclass_fields__}


# config/looplm_135m.py by hand (add injection, no prelude norm, so no injection parameters):
#   wte, tied with the head   50304 * 1024                              = 51,511,296
#   per block   q, o          2 * 1024 * 1024                           =  2,097,152
#               k, v          2 * 1024 * 512   (8 kv heads x 64)        =  1,048,576
#               gate, up, down 3 * 1024 * 2816 (SwiGLU)                 =  8,650,752
#               2 norm gains  2 * 1024                                  =      2,048
#               one block                                               = 11,798,528
#   7 blocks (prelude/core/coda 4/1/2)  7 * 11,798,528                  = 82,589,696
#   ln_f                      1024                                      =      1,024
#   total                     51,511,296 + 82,589,696 + 1,024           = 134,102,016
# LoopLM counts 134,102,912 (its "134.1M"): the same plus its learnable QK-norm gains, 2 x 64 per block,
# 7 * 128 = 896. The Parcae twin adds the prelude norm (1024), A_log and dt_bias (2 * 1024) and B, C
# (2 * 1024 * 1024 = 2,097,152): 134,102,016 + 2,100,224 = 136,202,240.
@pytest.mark.parametrize("name,expected", [("looplm_135m.py", 134_102_016), ("parcae_looplm_135m.py", 136_202_240)])
def test_looplm_config_param_count(name, expected):
    args = config_model_args(name)
    with torch.device("meta"):
        model = GPT(GPTConfig(**args))
    assert (args["mlp"], args["mlp_hidden"]) == ("swiglu", 2816)
    assert model.get_num_params() == expected
    assert expected == closed_form_params(1024, 16, 8, 7, args["injection"], args["prelude_norm"], mlp="swiglu",
                                          mlp_hidden=2816)
    twin = config_model_args("parcae_looplm_135m.py")  # the twin differs in the injection only
    assert {k for k in args if args[k] != twin[k]} <= {"injection", "prelude_norm"}


def test_parcae_ve_config_param_count():
    # config/parcae_135m.py (134,367,232) plus four value tables of 50304 x (8 kv heads x 64) and their 32 x 8 gates,
    # at layers 0, 2, 4, 6 of 7: 134,367,232 + 4 * (25,755,648 + 256) = 237,390,848
    args, base = config_model_args("parcae_ve_135m.py"), config_model_args("parcae_135m.py")
    assert {k for k in args if args[k] != base.get(k)} == {"value_embeds"}
    with torch.device("meta"):
        assert GPT(GPTConfig(**base)).get_num_params() == 134_367_232
        assert GPT(GPTConfig(**args)).get_num_params() == 237_390_848


# SwiGLU MLP (LoopLM) --------------------------------------------------------------------------------
def test_swiglu_block_matches_hand_formula():
    cfg = tiny("add", mlp="swiglu", mlp_hidden=48)
    model = randomized(cfg, dtype=torch.float64)
    block, cos, sin = model.core[0], model.cos[:16], model.sin[:16]
    with torch.no_grad():
        block.ln_2.weight.uniform_(0.5, 1.5)
    x = torch.randn(2, 16, 32, dtype=torch.float64)
    h = x + block.attn(block.ln_1(x), cos, sin)
    n = h / torch.sqrt((h * h).mean(-1, keepdim=True) + 1e-5) * block.ln_2.weight
    g, u = n @ block.mlp.gate.weight.T, n @ block.mlp.up.weight.T
    ref = h + (g / (1 + torch.exp(-g)) * u) @ block.mlp.down.weight.T  # silu(g) = g * sigmoid(g)
    assert torch.allclose(block(x, cos, sin), ref, atol=1e-12, rtol=0)


def test_swiglu_init_and_optimizer_groups():
    torch.manual_seed(0)
    model = GPT(tiny("add", mlp="swiglu", mlp_hidden=48))
    std = model.init_std
    for name, p in model.named_parameters():
        if ".mlp." in name:
            assert p.shape == ((32, 48) if name.endswith("down.weight") else (48, 32)), name
        if name.endswith(("mlp.gate.weight", "mlp.up.weight")):  # input side: truncated normal like q, k, v
            assert p.abs().max() <= 3 * std and abs(p.std().item() / std - 1) < 0.2, name
        if name.endswith("mlp.down.weight"):
            assert torch.equal(p, torch.zeros_like(p))  # every block still starts as the identity
    x = torch.randn(2, 8, 32)
    block = model.core[0]
    assert torch.equal(block(x, model.cos[:8], model.sin[:8]), x)
    muon, adamw = model.configure_optimizers(0.02, 3e-4, 0.0, (0.9, 0.95), 1e-8)
    in_muon = {id(p) for g in muon.param_groups for p in g["params"]}
    mlp = [p for n, p in model.named_parameters() if ".mlp." in n]
    assert len(mlp) == 3 * 4 and all(id(p) in in_muon for p in mlp)  # gate, up, down of all 4 blocks
    assert not in_muon & {id(p) for g in adamw.param_groups for p in g["params"]}


# 2. causality ---------------------------------------------------------------------------------
@pytest.mark.parametrize("injection", INJECTIONS)
@pytest.mark.parametrize("training", [True, False])
def test_causality(injection, training):
    model = randomized(tiny(injection), dtype=torch.float64).train(training)
    idx = torch.randint(0, 64, (3, 20))
    for t in (0, 7, 19):
        idx2 = idx.clone()
        idx2[:, t] = (idx2[:, t] + 1) % 64
        torch.manual_seed(1)  # same sampled depths and h0 for both runs
        a, _ = model(idx, idx)
        torch.manual_seed(1)
        b, _ = model(idx2, idx2)
        assert torch.allclose(a[:, :t], b[:, :t], atol=1e-12, rtol=0)
        assert not torch.allclose(a[:, t], b[:, t])  # the changed token itself does matter


# 3. fixed depth 1 is a plain stack ---------------------------------------------------------------
def test_fixed_depth_equals_plain_stack():
    cfg = tiny("add", mean_recurrence=1, backprop_depth=1, depth_sampling="fixed", state_init="zero",
               prelude_norm=False)
    model = randomized(cfg, dtype=torch.float64)
    idx = torch.randint(0, 64, (2, 16))
    cos, sin = model.cos[:16], model.sin[:16]
    x = model.wte(idx)
    for block in list(model.prelude) + list(model.core) + list(model.coda):
        x = block(x, cos, sin)
    ref = model.ln_f(x) @ model.wte.weight.T
    for training in (True, False):
        logits, _ = model.train(training)(idx, idx)
        assert torch.allclose(logits, ref, atol=1e-12)


# 4. truncated backprop, per sequence ---------------------------------------------------------------
def grads(model):
    return {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for n, p in model.named_parameters()}


@pytest.mark.parametrize("injection", INJECTIONS)
def test_per_sequence_truncated_backprop(injection):
    model = randomized(tiny(injection, mean_recurrence=4, backprop_depth=2), dtype=torch.float64).train()
    B, T = 4, 12
    idx = torch.randint(0, 64, (B, T))
    h0 = torch.randn(B, T, 32, dtype=torch.float64) * 0.1
    depths = torch.tensor([1, 2, 5, 7])  # (n, k) = (0,1) (0,2) (3,2) (5,2)
    model.zero_grad()
    _, loss = model(idx, idx, num_loops=depths, h0=h0)
    (loss * B).backward()  # mean over the batch -> sum of per-sequence means
    batch = grads(model)
    n, k = model.last_depths
    assert n.tolist() == [0, 0, 3, 5] and k.tolist() == [1, 2, 2, 2]
    total = {name: torch.zeros_like(g) for name, g in batch.items()}
    for i in range(B):
        model.zero_grad()
        _, loss_i = model(idx[i:i + 1], idx[i:i + 1], num_loops=int(depths[i]), h0=h0[i:i + 1])
        loss_i.backward()
        single = grads(model)
        assert single["prelude.0.attn.q.weight"].abs().sum() > 0  # the prelude learns from every sequence
        for name in total:
            total[name] += single[name]
    for name in total:
        assert torch.allclose(batch[name], total[name], atol=1e-10, rtol=1e-7), name


def test_no_grad_steps_build_no_graph():
    model = randomized(tiny("diagonal", backprop_depth=2)).train()
    idx = torch.randint(0, 64, (2, 8))
    counts = []
    for T in (2, 9):
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            model(idx, idx, num_loops=T)
        counts.append(len(saved))
    assert counts[0] == counts[1] > 0  # 7 extra no-grad steps save nothing for backward



# exact compaction: only the rows still looping run, and that changes nothing ------------------------------
@pytest.mark.parametrize("device", DEVICES)  # on CUDA the row order goes to the GPU pinned and non-blocking
@pytest.mark.parametrize("injection", INJECTIONS)
def test_compacted_batch_equals_each_row_alone(injection, device):
    model = randomized(tiny(injection, mean_recurrence=4, backprop_depth=3), seed=3, dtype=torch.float64).train()
    model.to(device)
    torch.manual_seed(4)
    B, T = 10, 12
    idx = torch.randint(0, 64, (B, T)).to(device)
    h0 = (torch.randn(B, T, 32, dtype=torch.float64) * 0.1).to(device)
    depths = torch.tensor([3, 1, 7, 3, 1, 5, 2, 9, 4, 7])  # unsorted, repeated, depth 1, deeper than backprop_depth
    model.zero_grad()
    logits, loss = model(idx, idx, num_loops=depths, h0=h0)
    (loss * B).backward()  # mean over the batch -> sum of per-sequence means
    batch = grads(model)
    n, k = model.last_depths  # in the caller's row order, not the sorted one
    assert (n + k).tolist() == depths.tolist() and k.tolist() == depths.clamp(max=3).tolist()
    assert model.last_rows_run == int(depths.sum())  # no padded loop steps
    total = {name: torch.zeros_like(g) for name, g in batch.items()}
    for i in range(B):
        model.zero_grad()
        logits_i, loss_i = model(idx[i:i + 1], idx[i:i + 1], num_loops=int(depths[i]), h0=h0[i:i + 1])
        loss_i.backward()
        assert torch.allclose(logits[i], logits_i[0], rtol=1e-7, atol=1e-12), i
        for name, g in grads(model).items():
            total[name] += g
    for name in total:
        assert torch.allclose(batch[name], total[name], rtol=1e-7, atol=1e-12), name


@pytest.mark.parametrize("kw", [dict(injection="diagonal"), dict(injection="concat", loop_checkpoint=True),
                                dict(injection="none", n_prelude=0, prelude_norm=False, loop_norm=True, exit_gate=True,
                                     depth_sampling="fixed", backprop_depth=4)])
@cuda_only
def test_a_training_forward_never_waits_for_the_gpu(kw):
    # Depths are drawn and sorted on the CPU; the row order reaches the GPU pinned and non-blocking. A forward that
    # synchronised (an .item(), a boolean mask, a blocking copy) would stall the GPU every micro-step. (Backward is
    # autograd's and PyTorch's kernels, not this file's: an embedding's backward may synchronise on its own.)
    model = GPT(tiny(**kw)).cuda().train()
    idx = torch.randint(0, 64, (8, 16), device="cuda")
    beta = 0.1 if model.config.exit_gate else 0.0
    model(idx, idx, exit_beta=beta)[1].backward()  # first calls may synchronise once (lazy initialisation)
    torch.cuda.synchronize()
    for _ in range(3):
        torch.cuda.set_sync_debug_mode("error")
        try:
            _, loss = model(idx, idx, exit_beta=beta)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        loss.backward()
    if not model.config.exit_gate:
        assert (model.last_depths[0] + model.last_depths[1]).unique().numel() > 1  # rows of several depths ran


@pytest.mark.parametrize("injection", INJECTIONS)
def test_loop_checkpoint_gives_the_same_gradients(injection):
    torch.manual_seed(5)
    idx, depths = torch.randint(0, 64, (6, 10)), torch.tensor([4, 1, 6, 2, 6, 3])
    h0 = torch.randn(6, 10, 32, dtype=torch.float64) * 0.1
    results = []
    for ckpt in (False, True):
        model = randomized(tiny(injection, backprop_depth=3, loop_checkpoint=ckpt), seed=6, dtype=torch.float64).train()
        logits, loss = model(idx, idx, num_loops=depths, h0=h0)
        loss.backward()
        results.append((logits.detach(), grads(model)))
    (la, ga), (lb, gb) = results
    assert torch.equal(la, lb)
    assert ga["core.0.attn.q.weight"].abs().sum() > 0 and ga["prelude.0.mlp.up.weight"].abs().sum() > 0
    for name in ga:
        assert torch.allclose(ga[name], gb[name], rtol=1e-12, atol=1e-15), name


def saved_bytes_for_backward(model, idx, num_loops):
    """Bytes autograd keeps for backward, each storage counted once (e is saved at every step, once in memory)."""
    seen = {}

    def pack(t):
        seen[(t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))] = t.numel() * t.element_size()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _, loss = model(idx, idx, num_loops=num_loops)
    loss.backward()
    return sum(seen.values())


def test_loop_checkpoint_keeps_activation_memory_flat_in_backprop_depth():
    B, T, d = 4, 16, 32
    idx = torch.randint(0, 64, (B, T))
    state = B * T * d * 4  # one fp32 loop state (B, T, C)
    for ckpt in (False, True):
        sizes = []
        for bwd in (1, 2, 4, 8):
            torch.manual_seed(0)
            model = GPT(tiny("diagonal", backprop_depth=bwd, loop_checkpoint=ckpt)).train()
            sizes.append(saved_bytes_for_backward(model, idx, num_loops=8))  # k = bwd gradient steps
        growth = [(b - a) / (k2 - k1) for (a, k1), (b, k2) in zip(zip(sizes, (1, 2, 4)), zip(sizes[1:], (2, 4, 8)))]
        if ckpt:  # all that grows is the state entering each gradient step, which the recomputation starts from
            assert growth == [state] * 3, (sizes, growth)
        else:  # every block's activations, at every gradient step
            assert all(g > 20 * state for g in growth), (sizes, growth)


# numerics shared with Parcae's code ----------------------------------------------------------------------
def test_rope_is_applied_in_fp32_and_rounded_once():
    from model import apply_rope
    model = GPT(tiny())
    torch.manual_seed(0)
    cos, sin = model.cos[:32], model.sin[:32]
    x64 = torch.randn(2, 32, 4, 8, dtype=torch.float64)
    c64, s64 = cos[:, None].double(), sin[:, None].double()
    a, b = x64.chunk(2, dim=-1)
    assert torch.equal(apply_rope(x64, cos, sin), torch.cat([a * c64 - b * s64, a * s64 + b * c64], dim=-1))  # fp64 stays exact
    x = (torch.randn(2, 32, 4, 8) * 3).bfloat16()
    x1, x2 = x.double().chunk(2, dim=-1)
    c, s = cos[:, None].double(), sin[:, None].double()
    exact = torch.cat([x1 * c - x2 * s, x1 * s + x2 * c], dim=-1)
    got = apply_rope(x, cos, sin)
    assert got.dtype == torch.bfloat16
    # at most the one final rounding of bf16 (2^-8 relative) away from the exact rotation
    err = (got.double() - exact).abs() / exact.abs().clamp(min=1e-3)
    assert err.max() <= 2 ** -8 + 1e-6
    bf16_rotation = torch.cat([x1.bfloat16() * c.bfloat16() - x2.bfloat16() * s.bfloat16(),
                               x1.bfloat16() * s.bfloat16() + x2.bfloat16() * c.bfloat16()], dim=-1)
    assert not torch.equal(bf16_rotation, got)  # the old bf16 rotation rounds more than once


def test_qk_norm_uses_rms_norms_default_eps():
    # with tiny q/k projections mean(q^2) is ~1e-8: eps 1e-5 would all but zero the normalised q, k
    torch.manual_seed(0)
    cfg = tiny()
    attn = GPT(cfg).core[0].attn
    with torch.no_grad():
        attn.q.weight.mul_(1e-4), attn.k.weight.mul_(1e-4), attn.o.weight.normal_(0, 0.1)
    x = torch.randn(2, 16, 32)
    cos, sin = GPT(cfg).cos[:16], GPT(cfg).sin[:16]

    def reference(eps):
        hd = attn.head_dim
        q, k = attn.q(x).view(2, 16, 4, hd), attn.k(x).view(2, 16, 2, hd)
        v = attn.v(x).view(2, 16, 2, hd).transpose(1, 2).repeat_interleave(2, dim=1)
        q, k = (t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + eps) for t in (q, k))
        from model import apply_rope
        q, k = apply_rope(q, cos, sin).transpose(1, 2), apply_rope(k, cos, sin).transpose(1, 2).repeat_interleave(2, dim=1)
        att = (q @ k.transpose(-1, -2) / hd ** 0.5).masked_fill(torch.ones(16, 16).triu(1).bool(), float("-inf"))
        return attn.o((att.softmax(-1) @ v).transpose(1, 2).reshape(2, 16, 32))
    out = attn(x, cos, sin)
    assert torch.allclose(out, reference(torch.finfo(torch.float32).eps), atol=1e-5)
    assert not torch.allclose(out, reference(1e-5), atol=1e-3)


def test_qk_norm_gain_and_norm_eps_are_loopLMs():
    """qk_norm="gain": RMSNorm(head_dim) with a learnable gain, eps norm_eps, before RoPE (LoopLM's order); every
    block norm takes norm_eps too. The defaults leave every existing model as it was: no new parameters."""
    torch.manual_seed(0)
    cfg = tiny(qk_norm="gain", norm_eps=1e-6)
    model = GPT(cfg)
    plain = GPT(tiny())
    n_blocks = cfg.n_prelude + cfg.n_core + cfg.n_coda
    assert model.get_num_params() - plain.get_num_params() == n_blocks * 2 * (cfg.n_embd // cfg.n_head)
    assert not any("q_norm" in k for k in plain.state_dict()) and plain.ln_f.eps == 1e-5
    assert all(m.eps == 1e-6 for m in model.modules() if hasattr(m, "eps"))
    attn = model.core[0].attn
    with torch.no_grad():
        attn.q_norm.weight.uniform_(0.5, 1.5), attn.k_norm.weight.uniform_(0.5, 1.5), attn.o.weight.normal_(0, 0.1)
    x, cos, sin = torch.randn(2, 16, 32), model.cos[:16], model.sin[:16]
    hd = attn.head_dim
    from model import apply_rope
    q, k = attn.q(x).view(2, 16, 4, hd), attn.k(x).view(2, 16, 2, hd)
    q = q * torch.rsqrt(q.pow(2).mean(-1, keepdim=True) + 1e-6) * attn.q_norm.weight
    k = k * torch.rsqrt(k.pow(2).mean(-1, keepdim=True) + 1e-6) * attn.k_norm.weight
    q, k = apply_rope(q, cos, sin).transpose(1, 2), apply_rope(k, cos, sin).transpose(1, 2).repeat_interleave(2, dim=1)
    v = attn.v(x).view(2, 16, 2, hd).transpose(1, 2).repeat_interleave(2, dim=1)
    att = (q @ k.transpose(-1, -2) / hd ** 0.5).masked_fill(torch.ones(16, 16).triu(1).bool(), float("-inf"))
    ref = attn.o((att.softmax(-1) @ v).transpose(1, 2).reshape(2, 16, 32))
    assert torch.allclose(attn(x, cos, sin), ref, atol=1e-5)
    with torch.no_grad():
        attn.q_norm.weight.fill_(1.0)  # the gains matter: at 1 the output moves
    assert not torch.allclose(attn(x, cos, sin), ref, atol=1e-3)


def test_initial_state_draws_in_training_and_where_eval_state_asks():
    torch.manual_seed(0)
    e = torch.zeros(4, 64, 256)
    for init, std in (("random", math.sqrt(2 / (5 * 256))), ("normal", 0.02)):
        model = GPT(tiny(state_init=init, n_embd=256))
        h = model.initial_state(e)  # training
        assert abs(h.std().item() - std) < 0.03 * std
        if init == "random":
            assert h.abs().max() <= 3 * std + 1e-7  # truncated at 3 std
        model.eval()
        assert not model.initial_state(e).any()  # eval: zero, deterministic
        model.config.eval_state = "random"
        h1, h2 = model.initial_state(e), model.initial_state(e)
        assert abs(h1.std().item() - std) < 0.03 * std and not torch.equal(h1, h2)  # a fresh draw every forward
    zero = GPT(tiny(state_init="zero", eval_state="random"))
    assert not zero.initial_state(e[..., :32]).any()


# loop telemetry ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("training", [True, False])
def test_loop_telemetry_on_a_known_trajectory(training, device):
    # identity blocks (zero-init output projections), add injection and h0 = 0 give h_t = t e exactly:
    # the state RMS per token is T * rms(e) and the last step's relative residual |e| / |T e| = 1/T
    model = GPT(tiny("add", prelude_norm=True, backprop_depth=2)).double().train(training).to(device)
    idx = torch.randint(0, 64, (4, 8), device=device)
    depths = torch.tensor([1, 5, 2, 7])
    h0 = torch.zeros(4, 8, 32, dtype=torch.float64, device=device)
    model(idx, idx, num_loops=depths, h0=h0)
    rms, residual = model.last_state
    e = model._prelude(idx, model.cos[:8], model.sin[:8])
    rms_e = e.pow(2).mean(-1).sqrt().mean(-1)  # (B,) ~1 after the prelude RMSNorm
    assert rms.dtype == residual.dtype == torch.float32  # telemetry is fp32, whatever the model runs in
    assert rms.device == e.device  # computed where the state is: no copy to the host every step
    assert torch.allclose(rms.double(), depths.to(device) * rms_e, rtol=1e-6)
    assert torch.allclose(residual.double(), 1 / depths.double().to(device), rtol=1e-6)
    assert model.last_rows_run == int(depths.sum())
    # an exploding state is reported, not lost to fp32 overflow when squared: h_1 = h0 + e with h0 = 1e30
    model.float()(idx, idx, num_loops=1, h0=torch.full((4, 8, 32), 1e30, device=device))
    assert torch.allclose(model.last_state[0], torch.full((4,), 1e30, device=device), rtol=1e-5)

# 5. depth sampler ----------------------------------------------------------------------------
def test_sequence_sampler_mean_and_grad_steps():
    model = GPT(tiny("diagonal", mean_recurrence=6, backprop_depth=3)).train()
    torch.manual_seed(0)
    T = torch.cat([model.sample_depths(32) for _ in range(1000)]).double()
    assert abs(T.mean().item() - 6) < 0.05  # E[max(Poisson(6), 1)] = 6 + e^-6
    assert T.std() > 2 and T.min() >= 1
    n, k = model._depths(32, None)
    assert (k >= 1).all() and (n + k >= 1).all() and (k <= 3).all()


def test_batch_sampler_is_one_draw_lognormal_poisson():
    model = GPT(tiny("concat", mean_recurrence=6, depth_sampling="batch")).train()
    torch.manual_seed(0)
    draws = [model.sample_depths(8) for _ in range(20000)]
    assert all((d == d[0]).all() for d in draws)  # one depth for the whole batch
    mean = torch.stack([d[0] for d in draws]).double().mean().item()
    assert abs(mean - 7) < 0.15  # Poisson(e^tau) + 1 with E[e^tau] = mu_rec: mean mu_rec + 1


def test_eval_mode_never_samples():
    model = GPT(tiny("diagonal", mean_recurrence=5)).eval()
    idx = torch.arange(16).view(2, 8)
    state = torch.get_rng_state()
    a, _ = model(idx)
    for _ in range(3):
        b, _ = model(idx)
        assert model.last_depths[0].tolist() == [3, 3] and model.last_depths[1].tolist() == [2, 2]
    assert torch.equal(torch.get_rng_state(), state)  # no draw at all: neither depth nor h0
    assert torch.equal(a, b)
    model.train()
    torch.manual_seed(0)
    seen = set()
    for _ in range(20):
        model(idx)
        seen.add(tuple((model.last_depths[0] + model.last_depths[1]).tolist()))
    assert len(seen) > 1  # while training mode does sample


# 6. Parcae stability ---------------------------------------------------------------------------
def test_diagonal_stable_by_construction():
    model = GPT(tiny("diagonal"))
    assert torch.equal(model.B.weight, torch.eye(32))
    dt = F.softplus(model.dt_bias)
    assert torch.allclose(dt, torch.full_like(dt, 0.8047), atol=1e-4)
    assert abs(model.loop_stats()["rho"] - 0.4472) < 1e-4
    torch.manual_seed(0)
    with torch.no_grad():
        for _ in range(200):
            model.A_log.uniform_(-5, 5)
            model.dt_bias.uniform_(-5, 5)
            stats = model.loop_stats()
            assert 0 < stats["mean_decay"] <= stats["rho"] < 1
        model.A_log.fill_(-5), model.dt_bias.fill_(-5)  # the slowest corner of the box
        assert model.loop_stats()["rho"] < 1


def test_loop_stats_add_and_concat():
    assert GPT(tiny("add")).loop_stats()["rho"] == 1.0
    # the fixed-depth baseline trains no loop: no rho to report
    assert GPT(tiny("add", mean_recurrence=1, depth_sampling="fixed")).loop_stats() == {}
    model = GPT(tiny("concat"))
    with torch.no_grad():
        model.W.weight[:, :32] = 2 * torch.eye(32)
    stats = model.loop_stats()
    assert abs(stats["rho"] - 2) < 1e-5 and abs(stats["sigma_max"] - 2) < 1e-5


# 7. KV cache -----------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("injection", INJECTIONS)
@pytest.mark.parametrize("num_loops", [1, 4])
def test_kv_cache_greedy_matches_recompute(injection, num_loops, device):
    # in fp64: greedy tokens must be equal, and on a GPU fp32 kernels for 1 and L queries round differently
    dtype = torch.float64 if device == "cuda" else torch.float32
    model = randomized(tiny(injection, block_size=24), dtype=dtype).to(device).eval()
    prompt = torch.randint(0, 64, (2, 5)).to(device)
    a = model.generate(prompt, 12, temperature=0, num_loops=num_loops, use_cache=True)
    b = model.generate(prompt, 12, temperature=0, num_loops=num_loops, use_cache=False)
    assert torch.equal(a, b)
    c = model.generate(prompt, 25, temperature=0, num_loops=num_loops)  # runs past block_size
    d = model.generate(prompt, 25, temperature=0, num_loops=num_loops, use_cache=False)
    assert torch.equal(c, d)


@pytest.mark.parametrize("injection", INJECTIONS)
def test_prefill_in_two_chunks_equals_one(injection):
    # a chunk of several tokens on a filled cache attends to the cache and causally within itself (an explicit
    # mask): a token that saw a later one would pass that on, through its K/V at the next loop steps, to the last
    model = randomized(tiny(injection, block_size=24), dtype=torch.float64).eval()
    prompt = torch.randint(0, 64, (2, 12))
    one, _ = model.forward_cached(prompt, model.new_cache(4), 4)
    cache = model.new_cache(4)
    model.forward_cached(prompt[:, :5], cache, 4)
    two, _ = model.forward_cached(prompt[:, 5:], cache, 4)
    assert torch.allclose(one, two, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("injection", INJECTIONS)
def test_last_step_cache_equals_full_at_one_loop(injection, device):
    dtype = torch.float64 if device == "cuda" else torch.float32
    model = randomized(tiny(injection), dtype=dtype).to(device).eval()
    prompt = torch.randint(0, 64, (2, 4)).to(device)
    a, sa = model.generate(prompt, 10, temperature=0, num_loops=1, return_stats=True)
    b, sb = model.generate(prompt, 10, temperature=0, num_loops=1, cache="last", return_stats=True)
    assert torch.equal(a, b) and sa["cache_bytes"] == sb["cache_bytes"]
    _, s4 = model.generate(prompt, 10, temperature=0, num_loops=4, return_stats=True)
    _, l4 = model.generate(prompt, 10, temperature=0, num_loops=4, cache="last", return_stats=True)
    assert s4["cache_bytes"] > l4["cache_bytes"] == sa["cache_bytes"]


# adaptive exit -----------------------------------------------------------------------------------
@pytest.mark.parametrize("criterion", ["kl", "latent"])
@pytest.mark.parametrize("cache", ["full", "last"])
def test_adaptive_exit_extremes(criterion, cache):
    model = randomized(tiny("diagonal")).eval()
    prompt = torch.randint(0, 64, (2, 4))
    ref = model.generate(prompt, 8, temperature=0, num_loops=5, cache=cache)
    out, stats = model.generate(prompt, 8, temperature=0, num_loops=5, cache=cache, exit_criterion=criterion,
                                exit_threshold=0.0, return_stats=True)
    assert torch.equal(out, ref) and stats["mean_steps"] == 5
    _, stats = model.generate(prompt, 8, temperature=0, num_loops=5, cache=cache, exit_criterion=criterion,
                              exit_threshold=1e9, return_stats=True)
    assert stats["mean_steps"] == 1


def test_adaptive_exit_counts_steps_and_fills_cache():
    # Zero-init blocks are the identity, so with add injection and h0 = 0 the state is h_r = r e and the
    # latent criterion |h_r - h_{r-1}| / |h_r| = 1/r: threshold 0.3 exits after exactly 4 steps.
    model = GPT(tiny("add", prelude_norm=False, state_init="zero")).eval()
    prompt = torch.randint(0, 64, (1, 3))
    _, stats = model.generate(prompt, 6, temperature=0, num_loops=8, exit_criterion="latent",
                              exit_threshold=0.3, return_stats=True)
    assert stats["mean_steps"] == 4
    cache = model.new_cache(8)
    model.forward_cached(prompt, cache, 8)
    _, steps = model.forward_cached(prompt[:, -1:], cache, 8, "latent", 0.21)
    assert steps.tolist() == [5]
    for step in cache["core"]:
        for c in step:
            assert len(c) == 4  # every loop step's cache holds the new token
    for later in cache["core"][5:]:
        assert torch.equal(later[0].k[:, :, -1], cache["core"][4][0].k[:, :, -1])  # its latest real entry


# 8. each injection can overfit one batch -------------------------------------------------------------
@pytest.mark.parametrize("injection", INJECTIONS)
def test_overfits_single_batch(injection):
    torch.manual_seed(0)
    model = GPT(tiny(injection)).train()
    idx = torch.randint(0, 64, (4, 16))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(200):
        _, loss = model(idx[:, :-1], idx[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0]


# 8b. value embeddings (Parcae) ---------------------------------------------------------------------------
def ve_layers(model):
    return [name for name, m in model.named_modules() if getattr(m, "ve", None) is not None]


@pytest.mark.parametrize("layout,want", [
    ((1, 2, 1), ["core.0.attn", "coda.0.attn"]),   # 4 layers: 1 and 3
    ((2, 2, 2), ["prelude.1.attn", "core.1.attn", "coda.1.attn"]),   # Parcae-140m: 1, 3, 5 of 6
    ((4, 1, 2), ["prelude.0.attn", "prelude.2.attn", "core.0.attn", "coda.1.attn"]),   # 0, 2, 4, 6 of 7
])
def test_value_embeds_sit_in_every_other_layer_the_last_included(layout, want):
    p, c, k = layout
    cfg = tiny(n_prelude=p, n_core=c, n_coda=k, value_embeds=True)
    with torch.device("meta"):
        model, plain = GPT(cfg), GPT(tiny(n_prelude=p, n_core=c, n_coda=k))
    assert ve_layers(model) == want and ve_layers(plain) == []
    kv_dim = cfg.n_kv_head * cfg.n_embd // cfg.n_head
    assert model.get_num_params() - plain.get_num_params() == len(want) * (cfg.vocab_size * kv_dim + 32 * cfg.n_kv_head)


def test_value_embed_attention_equals_the_formula():
    """v += 2 sigmoid(W_g x[..., :32]) * VE[idx], per KV head, x the attention's normed input (fp64)."""
    cfg = tiny(n_embd=64, n_head=4, n_kv_head=2, value_embeds=True)
    model = randomized(cfg, dtype=torch.float64)
    attn = model.core[0].attn
    x, idx = torch.randn(2, 16, 64, dtype=torch.float64), torch.randint(0, 64, (2, 16))
    cos, sin = model.cos[:16], model.sin[:16]
    hd = attn.head_dim
    gate = 2 * torch.sigmoid(x[..., :32] @ attn.ve_gate.weight.T)  # (2, 16, 2): the first 32 of 64 channels
    v = (x @ attn.v.weight.T).view(2, 16, 2, hd) + gate[..., None] * attn.ve.weight[idx].view(2, 16, 2, hd)
    q = F.rms_norm((x @ attn.q.weight.T).view(2, 16, 4, hd), (hd,), eps=torch.finfo(torch.float32).eps)
    k = F.rms_norm((x @ attn.k.weight.T).view(2, 16, 2, hd), (hd,), eps=torch.finfo(torch.float32).eps)
    from model import apply_rope
    q, k = apply_rope(q, cos, sin).transpose(1, 2), apply_rope(k, cos, sin).transpose(1, 2).repeat_interleave(2, 1)
    att = (q @ k.transpose(-1, -2) / hd ** 0.5).masked_fill(torch.ones(16, 16).triu(1).bool(), float("-inf"))
    ref = attn.o((att.softmax(-1) @ v.transpose(1, 2).repeat_interleave(2, 1)).transpose(1, 2).reshape(2, 16, 64))
    assert torch.allclose(attn(x, cos, sin, idx=idx), ref, atol=1e-12, rtol=0)
    assert not torch.allclose(attn(x, cos, sin, idx=idx.roll(1, -1)), ref, atol=1e-3)  # the ids matter


@pytest.mark.parametrize("injection", INJECTIONS)
def test_value_embeds_cached_equals_uncached_and_exits_hold(injection):
    model = randomized(tiny(injection, block_size=24, value_embeds=True), dtype=torch.float64).eval()
    prompt = torch.randint(0, 64, (2, 5))
    for T in (1, 4):
        a = model.generate(prompt, 12, temperature=0, num_loops=T, use_cache=True)
        b = model.generate(prompt, 12, temperature=0, num_loops=T, use_cache=False)
        assert torch.equal(a, b)
    # exits: a threshold no step reaches is generation without exit; one every step reaches leaves after one step
    plain = model.generate(prompt, 8, temperature=0, num_loops=4)
    for crit in ("kl", "latent"):
        never, stats = model.generate(prompt, 8, temperature=0, num_loops=4, exit_criterion=crit, exit_threshold=0.0,
                                      return_stats=True)
        assert torch.equal(never, plain) and stats["mean_steps"] == 4
        _, stats = model.generate(prompt, 8, temperature=0, num_loops=4, exit_criterion=crit, exit_threshold=1e9,
                                  return_stats=True)
        assert stats["mean_steps"] == 1
    prompt = torch.randint(0, 64, (2, 12))  # and a prefill in two chunks equals one
    one, _ = model.forward_cached(prompt, model.new_cache(4), 4)
    cache = model.new_cache(4)
    model.forward_cached(prompt[:, :5], cache, 4)
    two, _ = model.forward_cached(prompt[:, 5:], cache, 4)
    assert torch.allclose(one, two, rtol=1e-10, atol=1e-12)


def test_value_embeds_get_gradients_in_prelude_core_and_coda():
    model = randomized(tiny("diagonal", n_prelude=2, n_core=2, n_coda=2, value_embeds=True)).train()
    idx = torch.randint(0, 32, (4, 16))  # ids below 32: the other rows of every table get no gradient
    _, loss = model(idx, torch.randint(0, 64, (4, 16)))
    loss.backward()
    for name in ve_layers(model):
        attn = model.get_submodule(name)
        assert attn.ve.weight.grad[:32].abs().sum(-1).gt(0).sum() == len(idx.unique())
        assert not attn.ve.weight.grad[32:].any() and attn.ve_gate.weight.grad.abs().sum() > 0
    muon, adamw = model.configure_optimizers(0.02, 1e-3, 0.0, (0.9, 0.95), 1e-8)
    tables = {id(model.get_submodule(n).ve.weight) for n in ve_layers(model)}
    gates = {id(model.get_submodule(n).ve_gate.weight) for n in ve_layers(model)}
    assert tables <= {id(p) for g in adamw.param_groups for p in g["params"]}  # embeddings: AdamW, as Parcae
    assert gates <= {id(p) for g in muon.param_groups for p in g["params"]}  # the gates: matrices, Muon


def test_value_embeds_start_with_gates_at_one():
    model = GPT(tiny(value_embeds=True))
    attn = model.get_submodule(ve_layers(model)[0])
    assert not attn.ve_gate.weight.any() and abs(attn.ve.weight.std().item() - 1) < 0.05


# 9. bad input ------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw,field", [
    (dict(injection="mul"), "injection"), (dict(n_kv_head=3), "n_head"), (dict(n_head=5), "n_embd"),
    (dict(mean_recurrence=0), "mean_recurrence"), (dict(backprop_depth=0), "backprop_depth"),
    (dict(depth_sampling="token"), "depth_sampling"), (dict(state_init="ones"), "state_init"),
    (dict(n_core=0), "n_core"), (dict(n_prelude=-1), "n_prelude"), (dict(mean_recurrence=2.5), "mean_recurrence"),
    (dict(mlp="gelu"), "mlp="), (dict(mlp="swiglu"), "mlp_hidden="), (dict(mlp_hidden=-1), "mlp_hidden="),
    (dict(norm_eps=0.0), "norm_eps"), (dict(qk_norm="learned"), "qk_norm"), (dict(eval_state="normal"), "eval_state"),
    (dict(value_embeds=1), "value_embeds"), (dict(value_embeds=True, n_embd=16, n_head=2), "n_embd"),
    (dict(sandwich_norm=1), "sandwich_norm"), (dict(tie_head="no"), "tie_head"), (dict(attn_impl="flash"), "attn_impl"),
    (dict(readout_q=1.5), "readout_q"), (dict(readout_q=0.5), "readout_q.*exit_gate"), (dict(qk_norm=None), "qk_norm"),
])
def test_invalid_config_raises(kw, field):
    with pytest.raises(ValueError, match=field):
        tiny(**kw)


def test_too_long_sequence_raises():
    model = GPT(tiny())
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, 33, dtype=torch.long))
    with pytest.raises(ValueError, match="num_loops"):
        model(torch.zeros(1, 8, dtype=torch.long), num_loops=0)


# 9. Ouro: the whole stack looped, a learned exit --------------------------------------------------------
from model import exit_distribution, exit_objective, gate_loss, survival  # noqa: E402


def ouro(**kw):
    args = dict(injection="none", prelude_norm=False, n_prelude=0, n_core=2, n_coda=0, loop_norm=True, exit_gate=True,
                depth_sampling="fixed", mean_recurrence=4, backprop_depth=4)
    args.update(kw)
    return tiny(**args)


def test_exit_distribution_check_values():
    z = torch.zeros(4, 1, 1, dtype=torch.float64)  # lambda = 1/2
    p = exit_distribution(z)
    assert torch.allclose(p.flatten(), torch.tensor([0.5, 0.25, 0.125, 0.125], dtype=torch.float64))
    assert -torch.xlogy(p, p).sum().item() == pytest.approx(1.2130, abs=5e-5)
    assert (p.flatten() * torch.arange(1, 5)).sum().item() == pytest.approx(1.875)
    z2 = z.clone()
    z2[-1] = 2.6  # lambda_{T_max} is never used
    assert torch.equal(exit_distribution(z2), p)
    z = torch.randn(6, 3, 5, dtype=torch.float64) * 3
    lam = torch.sigmoid(z)
    p = exit_distribution(z)
    assert (p >= 0).all() and torch.allclose(p.sum(0), torch.ones(3, 5, dtype=torch.float64))
    assert torch.allclose(survival(lam)[2], (1 - lam[0]) * (1 - lam[1]) * (1 - lam[2]))
    S = survival(lam)  # p(t) = lambda_t S_t-1, written with products
    assert torch.allclose(p[1], lam[1] * S[0]) and torch.allclose(p[-1], S[-2])


def test_a_saturated_gate_gives_finite_gradients():
    # in fp32 sigmoid(+-20) is exactly 1 or 0: an objective written with log(lambda) or p log p would be NaN
    ce = torch.rand(4, 2, 3) * 3
    for value in (-25.0, 25.0):
        z = torch.randn(4, 2, 3).mul(3).requires_grad_()
        with torch.no_grad():
            z[:, 0] = value
        (exit_objective(ce, z, 0.1).sum() + gate_loss(ce, z).sum()).backward()
        assert torch.isfinite(z.grad).all(), value


def by_hand(model, idx, targets, beta):
    """Stage I's loss written out for n_prelude = n_coda = 0: h_t = N(Core(h_t-1)), y_t = ln_f(h_t)."""
    h, ces, lams = model.wte(idx), [], []
    cos, sin = model.cos[:idx.size(1)], model.sin[:idx.size(1)]
    for t in range(model.config.mean_recurrence):
        for block in model.core:
            h = block(h, cos, sin)
        h = model.ln_loop(h)
        y = model.ln_f(h)
        ces.append(F.cross_entropy((y @ model.wte.weight.T).transpose(1, 2), targets, ignore_index=-1, reduction="none"))
        lams.append(torch.sigmoid(y @ model.exit_gate.weight[0] + model.exit_gate.bias[0]))
    total, count = 0.0, 0
    T = len(ces)
    for b in range(idx.size(0)):
        for i in range(idx.size(1)):
            if targets[b, i] < 0:
                continue
            S, expected, H = 1.0, 0.0, 0.0
            for t in range(T):
                p = lams[t][b, i] * S if t < T - 1 else S
                S = S * (1 - lams[t][b, i])
                expected, H = expected + p * ces[t][b, i], H - p * torch.log(p)
            total, count = total + expected - beta * H, count + 1
    return total / count


@pytest.mark.parametrize("beta", [0.0, 0.1])
def test_stage_one_objective_equals_a_hand_computation(beta):
    model = randomized(ouro(), dtype=torch.float64).train()
    with torch.no_grad():
        model.exit_gate.weight.normal_(0, 1.0)  # lambda far from 1/2, different per token and step
    idx, targets = torch.randint(0, 64, (2, 9)), torch.randint(0, 64, (2, 9))
    targets[0, :4] = -1  # masked targets count nowhere
    want = by_hand(model, idx, targets, beta)
    if beta == 0:  # the objective at beta = 0 is the expected cross-entropy
        model(idx, targets, num_loops=4)
        ce, z = model.last_exit
        got0 = exit_objective(ce, z, 0.0)[targets != -1].mean()
        assert torch.allclose(got0, (exit_distribution(z) * ce).sum(0)[targets != -1].mean())
        assert torch.allclose(got0, want, atol=1e-10)
        return
    _, loss = model(idx, targets, exit_beta=beta)
    assert torch.allclose(loss, want, atol=1e-10), (loss.item(), want.item())
    loss.backward()
    for name in ("exit_gate.weight", "exit_gate.bias", "core.0.attn.q.weight", "core.1.mlp.up.weight", "wte.weight"):
        g = dict(model.named_parameters())[name].grad
        assert g is not None and g.abs().sum() > 0, name


def test_none_injection_at_one_step_is_a_plain_stack():
    model = randomized(ouro(loop_norm=False, exit_gate=False, mean_recurrence=1, backprop_depth=1)).train()
    idx = torch.randint(0, 64, (2, 10))
    x = model.wte(idx)
    for block in model.core:
        x = block(x, model.cos[:10], model.sin[:10])
    want = model.ln_f(x) @ model.wte.weight.T
    logits, _ = model(idx, torch.zeros_like(idx))
    assert torch.allclose(logits, want, atol=1e-5)
    assert GPT(ouro()).loop_stats() == {"rho": 1.0}  # A-bar = I, as for naive addition


def test_loop_norm_keeps_the_state_at_the_gains_level():
    model = randomized(ouro()).eval()
    with torch.no_grad():
        model.ln_loop.weight.fill_(2.5)
    idx = torch.randint(0, 64, (2, 12))
    for T in range(1, 2 * model.config.mean_recurrence + 1):
        model(idx, num_loops=T)
        assert torch.allclose(model.last_state[0], torch.full((2,), 2.5), rtol=1e-3), T
    plain = randomized(ouro(loop_norm=False)).eval()  # without it the state grows with depth
    plain(idx, num_loops=8)
    rms8 = plain.last_state[0].mean()
    plain(idx, num_loops=1)
    assert rms8 > 1.5 * plain.last_state[0].mean()


def test_gate_starts_at_zero_bias_and_goes_to_adamw():
    model = GPT(ouro())
    assert model.exit_gate.bias.item() == 0.0 and model.exit_gate.weight.abs().max() > 0
    muon, adamw = model.configure_optimizers(0.02, 8e-3, 0.0, (0.8, 0.95), 1e-10)
    ids = {id(p) for g in adamw.param_groups for p in g["params"]}
    assert id(model.exit_gate.weight) in ids and id(model.exit_gate.bias) in ids


def test_exit_gate_needs_fixed_depth():
    with pytest.raises(ValueError, match="depth_sampling"):
        ouro(depth_sampling="sequence")


def test_stage_two_target_floor_and_torch_reference():
    T = 4
    ce = torch.rand(T, 3, 5, dtype=torch.float64) * 3
    ce[:, 0] = 2.0  # a stalled row: I_t = 0 at every step
    z = torch.randn(T, 3, 5, dtype=torch.float64) * 2
    w = torch.sigmoid(50 * ((ce[:-1] - ce[1:]).clamp(min=0) - 0.005))
    want = F.binary_cross_entropy(1 - torch.sigmoid(z[1:]), w, reduction="none").sum(0) / T  # the paper's 1/T_max
    assert torch.allclose(gate_loss(ce, z), want)
    assert w[:, 0].unique().item() == pytest.approx(0.4378, abs=5e-5)
    # the floor: a stalled token's loss is least where its exit probability lambda is 1 - 0.4378 = 0.562
    grid = torch.linspace(0.01, 0.99, 9801, dtype=torch.float64)
    z_s = torch.logit(grid).view(1, -1, 1).expand(T, -1, 1)
    best = grid[gate_loss(torch.full((T, 9801, 1), 2.0, dtype=torch.float64), z_s).flatten().argmin()]
    assert best.item() == pytest.approx(0.562, abs=2e-4)


def test_stage_two_gradient_reaches_the_gate_only():
    model = randomized(ouro()).train()
    idx, targets = torch.randint(0, 64, (2, 9)), torch.randint(0, 64, (2, 9))
    _, loss = model(idx, targets, train_gate=True)
    loss.backward()
    for name, p in model.named_parameters():
        if name.startswith("exit_gate."):
            assert p.grad is not None and p.grad.abs().sum() > 0
        else:
            assert p.grad is None or not p.grad.any(), name


def gated_for_decoding(seed=0):
    model = randomized(ouro(block_size=40, mean_recurrence=4), seed=seed, dtype=torch.float64).eval()
    with torch.no_grad():
        model.exit_gate.weight.normal_(0, 1.0)  # lambda from near 0 to near 1 by token, never exactly 1
    return model


def test_a_gated_model_in_eval_reads_out_every_step_only_when_asked():
    # eval.py, tasks.py and train.py's evaluation at depths other than T_max want the last step's loss alone:
    # T readouts (a coda and a head each) would be wasted there
    model = randomized(ouro(n_coda=1), dtype=torch.float64).eval()
    codas = []
    model.ln_f.register_forward_hook(lambda *_: codas.append(1))
    idx, targets = torch.randint(0, 64, (2, 9)), torch.randint(0, 64, (2, 9))
    logits, loss = model(idx, targets, num_loops=4)
    assert model.last_exit is None and len(codas) == 1
    logits_all, loss_all = model(idx, targets, num_loops=4, every_step=True)
    assert model.last_exit[0].shape == (4, 2, 9) and len(codas) == 1 + 4 + 1
    assert torch.equal(logits, logits_all) and torch.equal(loss, loss_all)


def test_q_exit_step_equals_the_gates_cdf_by_hand():
    model = gated_for_decoding()
    idx = torch.randint(0, 64, (6, 8))
    model(idx, torch.zeros_like(idx), num_loops=6, every_step=True)  # lambda_t of the last token of each row
    S = survival(torch.sigmoid(model.last_exit[1][:, :, -1]))  # (6 steps, 6 rows)
    for q in (0.3, 0.6, 0.9):
        cache = model.new_cache(6)
        model.forward_cached(idx[:, :-1], cache, 6)
        _, steps = model.forward_cached(idx[:, -1:], cache, 6, "gate", q)
        hit = torch.cat([1 - S[:-1] >= q, torch.ones(1, 6, dtype=torch.bool)])
        assert steps.tolist() == (hit.int().argmax(0) + 1).tolist(), q


def test_q_exit_is_per_row_and_does_not_decrease_in_q():
    model = gated_for_decoding()
    prompts = torch.randint(0, 64, (4, 6))
    for cache in ("full", "last"):
        used = {}
        for q in (0.0, 0.3, 0.6, 0.9, 1.0):
            out_b, steps_b = decode_steps(model, prompts, q, cache)
            for i in range(len(prompts)):  # alone: the same tokens and the same exit steps
                out_i, steps_i = decode_steps(model, prompts[i:i + 1], q, cache)
                assert torch.equal(out_i[0], out_b[i]) and torch.equal(steps_i[:, 0], steps_b[:, i]), (cache, q, i)
            used[q] = steps_b
        assert (used[0.0] == 1).all() and (used[1.0] == 4).all()
        assert used[0.3].float().std() > 0  # rows of different lambda really exit at different steps
    # one new token after the same context: its exit step does not decrease as q grows
    idx, steps = torch.randint(0, 64, (8, 7)), []
    for q in torch.linspace(0, 1, 21).tolist():
        kv = model.new_cache(4)
        model.forward_cached(idx[:, :-1], kv, 4)
        steps.append(model.forward_cached(idx[:, -1:], kv, 4, "gate", q)[1])
    steps = torch.stack(steps)
    assert (steps[1:] >= steps[:-1]).all() and len(steps.unique()) == 4


def decode_steps(model, prompt, q, cache, n=8):
    """Greedy decoding with Q-exit; the tokens and each generated token's exit step per row (n, B)."""
    kv, steps = model.new_cache(4, cache), []
    logits, _ = model.forward_cached(prompt, kv, 4)
    idx = prompt
    for _ in range(n):
        nxt = logits.argmax(-1, keepdim=True)
        idx = torch.cat([idx, nxt], 1)
        logits, s = model.forward_cached(nxt, kv, 4, "gate", q)
        steps.append(s)
    return idx, torch.stack(steps)


def test_q_exit_at_one_is_generation_without_exit():
    model = gated_for_decoding(seed=3)
    prompt = torch.randint(0, 64, (3, 5))
    ref = model.generate(prompt, 10, temperature=0, num_loops=4, use_cache=False)
    out, stats = model.generate(prompt, 10, temperature=0, num_loops=4, exit_criterion="gate", exit_threshold=1.0,
                                return_stats=True)
    assert torch.equal(out, ref) and stats["mean_steps"] == 4
    with pytest.raises(ValueError, match="exit gate"):
        GPT(tiny()).eval().generate(prompt, 2, exit_criterion="gate", exit_threshold=0.5)


def test_none_injection_input_gets_gradient_only_through_gradient_steps():
    # with no re-injection e enters through h0 alone: a row with no step before its gradient steps (n = 0)
    # passes gradient to the prelude; a row whose first steps ran without gradient passes none
    model = randomized(ouro(n_prelude=1, exit_gate=False, depth_sampling="sequence", backprop_depth=2)).train()
    idx = torch.randint(0, 64, (2, 8))
    for row, want in ((0, True), (1, False)):
        model.zero_grad()
        targets = torch.full_like(idx, -1)
        targets[row] = idx[row]
        _, loss = model(idx, targets, num_loops=torch.tensor([2, 5]))  # row 0: n = 0; row 1: n = 3
        loss.backward()
        g = model.prelude[0].attn.q.weight.grad
        assert (g is not None and g.abs().sum() > 0) == want, row


def test_ouro_135m_is_looplm_135m_looped_plus_its_norm_and_gate():
    args, base = config_model_args("ouro_135m.py"), config_model_args("looplm_135m.py")
    assert (args["n_prelude"], args["n_core"], args["n_coda"]) == (0, base["n_prelude"] + base["n_core"] + base["n_coda"], 0)
    with torch.device("meta"):
        model = GPT(GPTConfig(**args))
    assert model.get_num_params() == 134_102_016 + 1024 + 1025  # + the loop norm's gain, + the gate's w and b


# 10. the switches Ouro's release needs ------------------------------------------------------------------
def test_ouros_switches_change_only_what_they_name():
    plain = GPT(tiny())
    keys = set(plain.state_dict())
    assert not any(k.startswith("lm_head") or "post_ln" in k for k in keys)  # the defaults add nothing
    cfg = tiny(sandwich_norm=True, tie_head=False, final_norm=False, qk_norm="none")
    model = GPT(cfg)
    n_blocks = cfg.n_prelude + cfg.n_core + cfg.n_coda
    added = set(model.state_dict()) - keys
    assert added == {f"{p}.{i}.post_ln_{j}.weight" for p, n in (("prelude", 1), ("core", 2), ("coda", 1))
                     for i in range(n) for j in (1, 2)} | {"lm_head.weight"}
    assert len(added) == 2 * n_blocks + 1 and "ln_f.weight" not in model.state_dict()
    assert not any("q_norm" in k for k in model.state_dict())
    # a block by hand: each branch's output normed before the residual add, no QK-norm
    model = randomized(cfg, dtype=torch.float64).eval()
    block, x = model.core[0], torch.randn(2, 8, 32, dtype=torch.float64)
    with torch.no_grad():
        for ln in (block.post_ln_1, block.post_ln_2):
            ln.weight.uniform_(0.5, 1.5)
    cos, sin = model.cos[:8], model.sin[:8]
    rms = lambda t, w: t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + cfg.norm_eps) * w
    a = block.attn
    from model import apply_rope
    q, k = apply_rope(a.q(rms(x, block.ln_1.weight)).view(2, 8, 4, 8), cos, sin), apply_rope(
        a.k(rms(x, block.ln_1.weight)).view(2, 8, 2, 8), cos, sin)
    v = a.v(rms(x, block.ln_1.weight)).view(2, 8, 2, 8)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2).repeat_interleave(2, 1), v.transpose(1, 2).repeat_interleave(2, 1)
    att = (q @ k.transpose(-1, -2) / 8 ** 0.5).masked_fill(torch.ones(8, 8).triu(1).bool(), float("-inf")).softmax(-1)
    h = x + rms(a.o((att @ v).transpose(1, 2).reshape(2, 8, 32)), block.post_ln_1.weight)
    h = h + rms(block.mlp(rms(h, block.ln_2.weight)), block.post_ln_2.weight)
    assert torch.allclose(block(x, cos, sin), h, rtol=1e-10, atol=1e-12)
    # the head is its own matrix, the coda's output goes to it unnormed
    idx = torch.randint(0, 64, (2, 8))
    with torch.no_grad():
        logits, _ = model(idx, idx, num_loops=3)
        e = model._prelude(idx, cos, sin)
        h = torch.zeros_like(e)  # eval: h0 = 0
        for _ in range(3):
            h = model.core_step(h, e, cos, sin, idx=idx)
        y = model._coda(h, cos, sin, idx=idx)
    assert torch.allclose(logits, y @ model.lm_head.weight.T, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("injection", INJECTIONS)
def test_eager_attention_equals_sdpa(injection):
    a = randomized(tiny(injection, block_size=24), dtype=torch.float64).eval()
    b = randomized(tiny(injection, block_size=24, attn_impl="eager"), dtype=torch.float64).eval()
    idx = torch.randint(0, 64, (2, 20))
    with torch.no_grad():
        assert torch.allclose(a(idx, idx, num_loops=3)[0], b(idx, idx, num_loops=3)[0], rtol=1e-8, atol=1e-8)
    for model in (a, b):  # the cached decode too, prompt chunks of more than one token included
        cache = model.new_cache(3)
        model.forward_cached(idx[:, :7], cache, 3)
        model.forward_cached(idx[:, 7:12], cache, 3)
        last, _ = model.forward_cached(idx[:, 12:13], cache, 3)
        with torch.no_grad():
            assert torch.allclose(last, model(idx[:, :13], num_loops=3)[0][:, -1], rtol=1e-8, atol=1e-8)


def test_readout_at_q_reads_each_token_at_its_q_exit_step():
    model = gated_for_decoding(seed=5)
    idx = torch.randint(0, 64, (3, 10))
    import decode
    with torch.no_grad():
        model(idx, idx, num_loops=4, every_step=True)
        z = model.last_exit[1]
        states, h = [], model._prelude(idx, model.cos[:10], model.sin[:10])
        for _ in range(4):
            h = model.core_step(h, h, model.cos[:10], model.sin[:10], idx=idx)
            states.append(model.head(model._coda(h, model.cos[:10], model.sin[:10], idx=idx)))
        for q in (0.0, 0.4, 0.8, 1.0):
            logits, _ = model(idx, idx, num_loops=4, exit_threshold=q)
            S, m = survival(torch.sigmoid(z)), model.last_exit_step
            hit = torch.cat([1 - S[:-1] >= q, torch.ones(1, 3, 10, dtype=torch.bool)])  # the rule by hand
            assert torch.equal(m, hit.int().argmax(0)) and torch.equal(decode.exit_step(z, q), m)
            want = torch.stack(states).gather(0, m[None, :, :, None].expand(1, 3, 10, 64))[0]
            assert torch.allclose(logits, want, rtol=1e-10, atol=1e-10)
        assert (model.last_exit_step == 3).all()  # q = 1: the last step (no survival underflows in fp64 here)
    model.config.readout_q = 0.4  # a release's own rule is its eval default, and its cached decode's
    with torch.no_grad():
        default, _ = model(idx, idx, num_loops=4)
        at, _ = model(idx, idx, num_loops=4, exit_threshold=0.4)
    assert torch.equal(default, at)
    cache = model.new_cache(4)
    model.forward_cached(idx[:, :-1], cache, 4)
    last, steps = model.forward_cached(idx[:, -1:], cache, 4)
    assert torch.allclose(last, at[:, -1], rtol=1e-9, atol=1e-10) and torch.equal(steps - 1, model.last_exit_step[:, -1])


def test_q_exit_sums_of_no_thresholds_is_empty():
    import decode
    ce, z = torch.rand(4, 2, 3), torch.randn(4, 2, 3)
    out = decode.q_exit_sums(ce, z, torch.ones(2, 3, dtype=torch.bool), ())  # --exit_thresholds=() is allowed
    assert out.shape == (0,) and out.dtype == torch.float64
    assert decode.q_exit_sums(ce, z, torch.ones(2, 3, dtype=torch.bool), (1.0,))[1] == 4 * 6  # q = 1: every step
