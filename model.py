"""
A looped transformer language model in one file.

    x = Prelude(wte[idx]);  e = RMSNorm(x)             run once
    h = h0;  repeat T times: h = Core(Inject(h, e))    the SAME core weights every step (T: the loop depth)
    logits = RMSNorm(Coda(Out(h))) @ wte^T             run once; Out(h) = C h for "diagonal", h otherwise

Ways to inject the input e into the loop (GPTConfig.injection):
    "add"       naive addition            h + e                          (LoopLM-135M-naive)
    "concat"    concat + projection       W [h; e]                       (RDM / Huginn)
    "diagonal"  stable diagonal system    exp(-dt*A) * h + dt * (B e)    (Parcae)
    "none"      no re-injection           h, starting from h0 = e        (Ouro: the whole stack looped)

Ouro's learned exit (loop_norm, exit_gate): h_t = RMSNorm(Core(h_t-1)); every step t is read out,
y_t = RMSNorm(Coda(h_t)), and a gate lambda_t = sigmoid(w . y_t + b) gives each token a distribution
p(t) over the step it exits at (exit_distribution). Training: Stage I, the expected loss over p minus
beta times its entropy (exit_objective); Stage II, the gate alone (gate_loss). decode.py exits per token.

Parcae's value embeddings (value_embeds): every other layer's attention adds 2 sigmoid(W_g x[..., :32]) * VE[idx]
to its values, so the token ids reach prelude, core and coda (and decode.py's cached steps).

What each family's released weights need (pretrained.py): LoopLM qk_norm="gain", norm_eps=1e-6, state_init="normal";
Parcae value_embeds; Ouro sandwich_norm (each branch's output normed before the residual add), tie_head=False,
qk_norm="none", final_norm=False (the head reads loop_norm's output) and readout_q (decode.exit_step's readout).

Everything an injection adds sits in these places: its parameters (GPT.__init__), their init
(init_weights), initial_state() ("none" only), inject(), Out before the coda (_coda, "diagonal" only),
its rho (loop_stats) and its FLOPs (estimate_flops). L is the sequence length throughout, T the loop depth.

Use it:
    from model import GPT, GPTConfig
    model = GPT(GPTConfig(injection="diagonal"))
    logits, loss = model(idx, targets)                  # training: depths are sampled
    model.eval(); out = model.generate(idx, 100, num_loops=16)   # choose test-time depth
    ouro = GPT(GPTConfig(injection="none", n_prelude=0, n_coda=0, prelude_norm=False, loop_norm=True,
                         exit_gate=True, depth_sampling="fixed", mean_recurrence=4, backprop_depth=4))
    _, loss = ouro(idx, targets, exit_beta=0.1)          # Stage I; train_gate=True: Stage II
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import decode

QK_EPS = torch.finfo(torch.float32).eps  # F.rms_norm's default for the fp32 inputs CUDA autocast gives it (Parcae)

VE_GATE_CHANNELS = 32  # a value embedding's gate reads the first 32 channels of the attention's input (Parcae)


@dataclass
class GPTConfig:
    block_size: int = 1024         # longest sequence the model sees
    vocab_size: int = 50304        # GPT-2's 50257 tokens padded to a multiple of 64
    n_embd: int = 768              # width d of the residual stream (and of the loop state h)
    n_head: int = 12               # query heads
    n_kv_head: int = 12            # key/value heads (grouped-query attention when < n_head)
    n_prelude: int = 2             # blocks run once before the loop
    n_core: int = 2                # blocks run T times inside the loop, shared weights
    n_coda: int = 2                # blocks run once after the loop
    injection: str = "diagonal"    # how e enters the loop: "add" (naive) | "concat" (RDM) | "diagonal" (Parcae) | "none" (Ouro)
    prelude_norm: bool = True      # RMSNorm on the prelude output before it is injected
    mean_recurrence: int = 8       # mu_rec: mean loop depth in training, the depth at eval
    backprop_depth: int = 4        # mu_bwd: gradient flows through the last min(T, mu_bwd) steps
    depth_sampling: str = "sequence"  # "sequence" (Parcae: a depth per sequence) | "batch" (Huginn: one per batch) | "fixed"
    state_init: str = "random"     # h0 in training: "random" (TruncN(0, sqrt(2/(5d)), +-3 std), Parcae), "normal" (0.02 N(0, 1), LoopLM), "zero"
    eval_state: str = "zero"       # h0 in eval and sampling: "zero" (deterministic) or "random" (drawn as in training, as the releases do)
    rope_base: float = 10000.0     # rotary embedding base
    mlp: str = "relu2"             # "relu2" (ReLU², Parcae) | "swiglu" (SiLU-gated, three matrices, LoopLM)
    mlp_hidden: int = 0            # MLP hidden size; 0 = 4 * n_embd, allowed for relu2 only
    loop_checkpoint: bool = False  # recompute each gradient loop step in backward: memory flat in backprop_depth
    attn_impl: str = "sdpa"        # "sdpa" (fused kernels) | "eager" (matmul, fp32 softmax, matmul: transformers' order, bit for bit)
    loop_norm: bool = False        # RMSNorm after every loop step, its output the next step's input (Ouro)
    exit_gate: bool = False        # Ouro's exit gate: every step is read out, lambda_t per token
    norm_eps: float = 1e-5         # eps of every RMSNorm with a gain (LoopLM: 1e-6)
    qk_norm: str = "plain"         # "plain": QK-norm without parameters (Parcae) | "gain": learnable per-head-dim gains (LoopLM) | "none" (Ouro)
    sandwich_norm: bool = False    # Ouro: each branch's output normed too before the residual add (four norms a block)
    tie_head: bool = True          # the output head is wte's transpose; False: a head of its own (Ouro)
    final_norm: bool = True        # RMSNorm before the head; False: read straight off loop_norm's output (Ouro's release)
    readout_q: float = -1.0        # a gated model in eval reads each token out at its Q-exit step for this q (Ouro's release: 1.0); -1: the last step
    value_embeds: bool = False     # Parcae's value embeddings: a token table added to the values of every other layer

    def __post_init__(self):
        def bad(field, why):
            raise ValueError(f"GPTConfig.{field}={getattr(self, field)!r}: {why}")
        for f in ("block_size", "vocab_size", "n_embd", "n_head", "n_kv_head", "n_prelude", "n_core", "n_coda",
                  "mean_recurrence", "backprop_depth", "mlp_hidden"):
            low = 0 if f in ("n_prelude", "n_coda", "mlp_hidden") else 1
            if not isinstance(getattr(self, f), int) or getattr(self, f) < low:
                bad(f, f"must be an integer >= {low}")
        if self.n_embd % self.n_head:
            bad("n_embd", f"must be divisible by n_head={self.n_head}")
        if (self.n_embd // self.n_head) % 2:
            bad("n_embd", "head size n_embd // n_head must be even for rotary embeddings")
        if self.n_head % self.n_kv_head:
            bad("n_head", f"must be divisible by n_kv_head={self.n_kv_head}")
        for f, allowed in (("injection", ("add", "concat", "diagonal", "none")), ("state_init", ("random", "normal", "zero")),
                           ("eval_state", ("zero", "random")), ("qk_norm", ("plain", "gain", "none")),
                           ("depth_sampling", ("sequence", "batch", "fixed")), ("mlp", ("relu2", "swiglu")),
                           ("attn_impl", ("sdpa", "eager"))):
            if getattr(self, f) not in allowed:
                bad(f, f"must be one of {allowed}")
        if self.mlp == "swiglu" and not self.mlp_hidden:  # 4d would be 1.5x relu2's MLP: ask for the size
            bad("mlp_hidden", "must be set (> 0) for mlp='swiglu'")
        for f in ("prelude_norm", "loop_checkpoint", "loop_norm", "exit_gate", "value_embeds", "sandwich_norm",
                  "tie_head", "final_norm"):
            if not isinstance(getattr(self, f), bool):
                bad(f, "must be True or False")
        for f in ("rope_base", "norm_eps"):
            if not (isinstance(getattr(self, f), (int, float)) and getattr(self, f) > 0):
                bad(f, "must be > 0")
        if self.value_embeds and self.n_embd < VE_GATE_CHANNELS:
            bad("n_embd", f"must be >= {VE_GATE_CHANNELS} with value_embeds=True: the gate reads that many channels")
        if not (isinstance(self.readout_q, (int, float)) and (self.readout_q == -1 or 0 <= self.readout_q <= 1)):
            bad("readout_q", "must be -1 (off) or a probability in [0, 1]")
        if self.readout_q >= 0 and not self.exit_gate:
            bad("readout_q", "needs exit_gate=True: the rule reads the exit gate's CDF")
        if self.exit_gate and self.depth_sampling != "fixed":  # p(t) is over steps 1..T_max of one depth
            bad("depth_sampling", "must be 'fixed' with exit_gate=True: every row runs the same T_max steps")


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(dim)), eps

    def forward(self, x):
        # statistics in the gain's precision (fp32), even when x is bf16 under autocast
        return F.rms_norm(x.to(self.weight.dtype), (x.size(-1),), self.weight, self.eps).type_as(x)


def rope_tables(cfg):
    """cos, sin (block_size, hd/2) of the rotary angles pos * base^(-2i/hd), rotate-half layout."""
    hd = cfg.n_embd // cfg.n_head
    inv_freq = 1.0 / cfg.rope_base ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd)  # as Parcae and LoopLM, bit for bit
    angles = torch.outer(torch.arange(cfg.block_size, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):  # x (B, L, H, hd), cos/sin (L, hd/2); rotate-half layout
    # rotate in fp32 (or finer) and round once: in bf16 the rotation would round cos, sin and the products
    dtype = torch.promote_types(x.dtype, torch.float32)
    x1, x2 = x.to(dtype).chunk(2, dim=-1)
    cos, sin = cos[:, None, :].to(dtype), sin[:, None, :].to(dtype)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).type_as(x)


class Attention(nn.Module):
    def __init__(self, cfg, value_embed=False):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.n_embd // cfg.n_head
        self.q = nn.Linear(cfg.n_embd, cfg.n_head * self.head_dim, bias=False)
        self.k = nn.Linear(cfg.n_embd, cfg.n_kv_head * self.head_dim, bias=False)
        self.v = nn.Linear(cfg.n_embd, cfg.n_kv_head * self.head_dim, bias=False)
        self.o = nn.Linear(cfg.n_embd, cfg.n_embd, bias=False)
        self.q_norm = self.k_norm = None
        self.qk_plain, self.eager = cfg.qk_norm == "plain", cfg.attn_impl == "eager"
        if cfg.qk_norm == "gain":  # LoopLM: a learnable gain per head dimension, shared by the heads
            self.q_norm, self.k_norm = RMSNorm(self.head_dim, cfg.norm_eps), RMSNorm(self.head_dim, cfg.norm_eps)
        self.ve = self.ve_gate = None
        if value_embed:  # Parcae: a table of values per token, and a gate per KV head
            self.ve = nn.Embedding(cfg.vocab_size, cfg.n_kv_head * self.head_dim)
            self.ve_gate = nn.Linear(VE_GATE_CHANNELS, cfg.n_kv_head, bias=False)

    def forward(self, x, cos, sin, cache=None, store=True, idx=None):
        B, L, C = x.shape  # L tokens (T is the loop depth); idx (B, L) the token ids, for value embeddings
        q = self.q(x).view(B, L, self.n_head, self.head_dim)
        k = self.k(x).view(B, L, self.n_kv_head, self.head_dim)
        v = self.v(x).view(B, L, self.n_kv_head, self.head_dim)
        if self.ve is not None:  # v += 2 sigmoid(W_g x[..., :32]) * VE[idx], the gate in (0, 2) per KV head
            gate = 2 * torch.sigmoid(self.ve_gate(x[..., :VE_GATE_CHANNELS]))  # (B, L, n_kv_head)
            v = v + (gate[..., None] * self.ve(idx).view(B, L, self.n_kv_head, self.head_dim)).type_as(v)
        if self.qk_plain:  # QK-norm without parameters keeps attention logits bounded however the state grows
            q, k = (F.rms_norm(t, (self.head_dim,), eps=QK_EPS) for t in (q, k))
        elif self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)  # QK-norm before RoPE (RoPE keeps the norm)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, L, hd)
        fresh = cache is None or cache.k is None  # a Python bool, not a size: under compile a size is symbolic
        if cache is not None:
            k, v = cache(k, v, store)
        mask = None  # causal: a fresh sequence, or one new token that sees everything cached
        if (not fresh and L > 1) or self.eager:
            past = k.size(2) - L
            mask = torch.ones(L, past + L, dtype=torch.bool, device=x.device).tril(diagonal=past)
        if self.eager:  # SDPA's kernels sum in another order: 1e-5 at a step, more after sandwich norms and loops
            k, v = (t.repeat_interleave(self.n_head // self.n_kv_head, 1) for t in (k, v))
            w = (q @ k.transpose(2, 3) * self.head_dim ** -0.5).masked_fill(~mask, float("-inf"))
            y = torch.softmax(w, -1, dtype=torch.promote_types(w.dtype, torch.float32)).to(q.dtype) @ v
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=fresh and mask is None,
                                               enable_gqa=self.n_kv_head != self.n_head)
        return self.o(y.transpose(1, 2).reshape(B, L, C))


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        hidden = cfg.mlp_hidden or 4 * cfg.n_embd
        self.gate = nn.Linear(cfg.n_embd, hidden, bias=False) if cfg.mlp == "swiglu" else None
        self.up = nn.Linear(cfg.n_embd, hidden, bias=False)
        self.down = nn.Linear(hidden, cfg.n_embd, bias=False)

    def forward(self, x):
        if self.gate is None:
            return self.down(F.relu(self.up(x)).square())  # ReLU^2
        return self.down(F.silu(self.gate(x)) * self.up(x))  # SwiGLU


class Block(nn.Module):
    def __init__(self, cfg, value_embed=False):
        super().__init__()
        self.ln_1, self.attn = RMSNorm(cfg.n_embd, cfg.norm_eps), Attention(cfg, value_embed)
        self.ln_2, self.mlp = RMSNorm(cfg.n_embd, cfg.norm_eps), MLP(cfg)
        post = (lambda: RMSNorm(cfg.n_embd, cfg.norm_eps)) if cfg.sandwich_norm else nn.Identity
        self.post_ln_1, self.post_ln_2 = post(), post()  # Ouro: a branch's output is normed, the residual stream not

    def forward(self, x, cos, sin, cache=None, store=True, idx=None):
        x = x + self.post_ln_1(self.attn(self.ln_1(x), cos, sin, cache, store, idx))
        return x + self.post_ln_2(self.mlp(self.ln_2(x)))


def deepest_first(T):
    """The row order (B,) that sorts the depths T deepest first (stable), or None if they already are."""
    if not (T[1:] > T[:-1]).any():
        return None
    return T.argsort(descending=True, stable=True)  # on the CPU, like the depths


def active_prefixes(steps):
    """(m, m_next) for each step s of a loop phase: rows [0, m) run step s, and rows [m_next, m) run their
    last one. steps (B,) does not increase along the rows, so the rows with steps > s are a prefix."""
    active = [int((steps > s).sum()) for s in range(int(steps.max()))] + [0]
    return list(zip(active, active[1:]))


@torch.no_grad()
def _telemetry(hT, h_prev, rms, residual):
    """Per row, into rms and residual: the RMS of h_T per token and |h_T - h_T-1| / |h_T| per token, averaged
    over the row's tokens. In fp64: an exploding state (RDM's reached 1e19) would overflow fp32 when squared."""
    hT, step = hT.double(), (hT - h_prev).double()
    rms[:] = hT.pow(2).mean(-1).sqrt().mean(-1)
    residual[:] = (step.norm(dim=-1) / hT.norm(dim=-1).clamp(min=1e-12)).mean(-1)


# --- Ouro's exit distribution over the steps t = 1..T_max (README "Ouro") ------------------------------
# z (T, B, L) are the gate's logits, lambda_t = sigmoid(z_t). The objectives work in log space: in fp32 a gate
# past |z| ~ 17 gives lambda = 0 or 1 exactly, and log(0) (or p log p at p = 0) would make every gradient NaN.
def survival(lam):
    """S_t = prod_{j<=t} (1 - lambda_j): the probability that a token has not exited by step t."""
    return torch.cumprod(1 - lam, 0)


def exit_log_distribution(z):
    """log p(t): p(t) = lambda_t S_{t-1} for t < T_max, and p(T_max) = S_{T_max-1}. The last step takes what
    is left, so p sums to 1 and lambda_{T_max} is never used."""
    log_S_prev = torch.cat([torch.zeros_like(z[:1]), torch.cumsum(F.logsigmoid(-z[:-1]), 0)])  # log S_0 .. S_T-1
    return torch.cat([F.logsigmoid(z[:-1]) + log_S_prev[:-1], log_S_prev[-1:]])


def exit_distribution(z):
    return exit_log_distribution(z).exp()


def exit_objective(ce, z, beta):
    """Stage I, per token: sum_t p(t) CE_t - beta H(p). The entropy term keeps p from collapsing onto one step."""
    log_p = exit_log_distribution(z)
    p = log_p.exp()
    return (p * ce).sum(0) + beta * (p * log_p).sum(0)


def gate_loss(ce, z):
    """Stage II, per token: (1/T_max) sum_{t=2..T_max} BCE(1 - lambda_t, w_t). Continue (target w_t -> 1) where
    step t still lowered the loss: I_t = max(0, CE_t-1 - CE_t), w_t = sigmoid(50 (I_t - 0.005)). ce is detached;
    1 - lambda_t = sigmoid(-z_t), so the BCE is taken on the logit -z_t."""
    w = torch.sigmoid(50 * ((ce[:-1] - ce[1:]).clamp(min=0) - 0.005))  # >= 0.4378: a stalled token's floor
    return F.binary_cross_entropy_with_logits(-z[1:], w, reduction="none").sum(0) / len(ce)


def exit_summary(ce, z, valid):
    """Means over valid tokens (B, L): CE_t per step (T,), the entropy of p, and the mean exit step E[t]."""
    log_p = exit_log_distribution(z)
    p, t = log_p.exp(), torch.arange(1, len(z) + 1, device=z.device, dtype=z.dtype)
    per_token = torch.stack([*ce, -(p * log_p).sum(0), (p * t[:, None, None]).sum(0)])[:, valid]
    return per_token.mean(1)  # (T + 2,): CE_1 .. CE_T, H, E[t]


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = cfg = config
        d = cfg.n_embd
        self.wte = nn.Embedding(cfg.vocab_size, d)  # tied with the output head unless tie_head=False
        self.lm_head = None if cfg.tie_head else nn.Linear(d, cfg.vocab_size, bias=False)
        # value embeddings (Parcae) in every other layer of prelude, core (counted once) and coda, the last included
        n_layers = cfg.n_prelude + cfg.n_core + cfg.n_coda
        ve = [cfg.value_embeds and i % 2 == (n_layers - 1) % 2 for i in range(n_layers)]
        self.prelude = nn.ModuleList(Block(cfg, ve[i]) for i in range(cfg.n_prelude))
        self.ln_prelude = RMSNorm(d, cfg.norm_eps) if cfg.prelude_norm else None
        self.core = nn.ModuleList(Block(cfg, ve[cfg.n_prelude + j]) for j in range(cfg.n_core))  # one table, every step
        self.coda = nn.ModuleList(Block(cfg, ve[cfg.n_prelude + cfg.n_core + j]) for j in range(cfg.n_coda))
        self.ln_f = RMSNorm(d, cfg.norm_eps) if cfg.final_norm else nn.Identity()  # RMSNorm with gains is not idempotent
        self.ln_loop = RMSNorm(d, cfg.norm_eps) if cfg.loop_norm else None
        if cfg.exit_gate:
            self.exit_gate = nn.Linear(d, 1)  # lambda_t = sigmoid(w . y_t + b), the same for every step
        # the injection's own parameters (the docstring lists every place an injection adds code)
        if cfg.injection == "concat":
            self.W = nn.Linear(2 * d, d, bias=False)  # acts on [h ; e], state first
        if cfg.injection == "diagonal":
            self.A_log = nn.Parameter(torch.zeros(d))
            self.dt_bias = nn.Parameter(torch.zeros(d))
            self.B = nn.Linear(d, d, bias=False)
            self.C = nn.Linear(d, d, bias=False)  # Out: the loop's output projection
        cos, sin = rope_tables(cfg)
        self.register_buffer("cos", cos, persistent=False)  # (block_size, hd/2)
        self.register_buffer("sin", sin, persistent=False)
        self.last_depths = None  # (n, k) per sequence of the latest forward, for MFU and padded-work stats
        self.last_rows_run = 0   # row-steps the core actually ran in the latest forward (= sum of T_i)
        self.last_state = None   # per sequence (B,): RMS of h_T per token, and |h_T - h_T-1| / |h_T| per token
        self.last_exit = None    # gated models given targets (training, or every_step): CE_t and the gate logit z_t (T, B, L)
        self.last_exit_step = None  # forward(exit_threshold=q): each token's 0-based readout step (B, L)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self):
        d = self.config.n_embd
        self.init_std = std = math.sqrt(2 / (5 * d))  # "scaled-zero" init
        for name, p in self.named_parameters():
            if name.endswith(("attn.o.weight", "mlp.down.weight")):
                nn.init.zeros_(p)  # every block starts as the identity
            elif name == "B.weight":
                p.copy_(torch.eye(d))
            elif name in ("A_log", "exit_gate.bias") or name.endswith("attn.ve_gate.weight"):
                p.zero_()  # the exit gate starts at lambda = 1/2, a value embedding's gate at 2 sigmoid(0) = 1
            elif name.endswith("attn.ve.weight"):
                nn.init.normal_(p)  # N(0, 1): Parcae's value tables keep nn.Embedding's init
            elif name == "dt_bias":
                # softplus^-1(-ln sqrt(1/5)): decay exp(-dt) = sqrt(1/5) = 0.4472, dt = 0.8047
                p.fill_(math.log(math.expm1(-math.log(math.sqrt(0.2)))))
            elif p.dim() == 2:  # q, k, v, gate, up, wte, lm_head, C, W
                nn.init.trunc_normal_(p, 0.0, std, -3 * std, 3 * std)
            else:
                nn.init.ones_(p)  # norm gains

    def get_num_params(self):
        return sum(p.numel() for p in self.parameters())  # parameters() yields the tied wte once

    # --- depth sampling (README "How training works") ------------------------------------
    def sample_depths(self, B):
        """Loop depths T (B,) for one training forward, drawn on the CPU generator."""
        cfg, mu = self.config, float(self.config.mean_recurrence)
        if cfg.depth_sampling == "sequence":  # Parcae: an independent Poisson draw per sequence
            return torch.poisson(torch.full((B,), mu)).clamp(min=1).long()
        if cfg.depth_sampling == "batch":  # Huginn: log-normal Poisson, one draw for the batch
            sigma = 0.5
            tau = torch.normal(math.log(mu) - sigma ** 2 / 2, sigma, (1,))
            return (torch.poisson(tau.exp()) + 1).long().expand(B).clone()
        return torch.full((B,), cfg.mean_recurrence, dtype=torch.long)

    def _depths(self, B, num_loops):
        if num_loops is None:
            T = self.sample_depths(B) if self.training else torch.full((B,), self.config.mean_recurrence)
        else:
            T = torch.as_tensor(num_loops).long().cpu().expand(B).clone()
            if T.min() < 1:
                raise ValueError(f"num_loops must be >= 1, got {num_loops}")
        k = T.clamp(max=self.config.backprop_depth)  # every sequence gets >= 1 gradient step
        return T - k, k

    # --- the pieces of the forward pass ----------------------------------------------------
    def _prelude(self, idx, cos, sin, caches=None):
        x = self.wte(idx)  # (B, L, C)
        for i, block in enumerate(self.prelude):
            x = block(x, cos, sin, None if caches is None else caches[i], idx=idx)
        return x if self.ln_prelude is None else self.ln_prelude(x)

    def initial_state(self, e):
        if self.config.injection == "none":
            return e  # nothing is re-injected: the loop starts from the input itself
        how = self.config.state_init if self.training or self.config.eval_state == "random" else "zero"
        if how == "random":
            std = self.init_std
            return nn.init.trunc_normal_(torch.empty_like(e), 0.0, std, -3 * std, 3 * std)
        if how == "normal":
            return 0.02 * torch.randn_like(e)
        return torch.zeros_like(e)  # eval: the mean of either distribution, so eval is deterministic

    def inject(self, h, e):
        if self.config.injection == "none":
            return h
        if self.config.injection == "add":
            return h + e
        if self.config.injection == "concat":
            return self.W(torch.cat([h, e], dim=-1)).type_as(h)  # bf16 W's output, but fp32 for the core's adds
        # Parcae: zero-order-hold discretisation of dh/dt = -A h + B e; decay in (0, 1) for ANY A_log, dt_bias
        dt = F.softplus(self.dt_bias)
        decay = torch.exp(-dt * self.A_log.exp())
        return decay * h + dt * self.B(e)

    def core_step(self, h, e, cos, sin, caches=None, store=True, idx=None):
        x = self.inject(h, e)
        for j, block in enumerate(self.core):
            x = block(x, cos, sin, None if caches is None else caches[j], store, idx)
        return x if self.ln_loop is None else self.ln_loop(x)  # Ouro: the state is normed at every step

    def _coda(self, h, cos, sin, caches=None, store=True, idx=None):
        y = self.C(h).type_as(h) if self.config.injection == "diagonal" else h  # Out(h), fp32 like h under autocast
        for i, block in enumerate(self.coda):
            y = block(y, cos, sin, None if caches is None else caches[i], store, idx)
        return self.ln_f(y)

    def head(self, y):
        logits = F.linear(y, self.wte.weight if self.lm_head is None else self.lm_head.weight)
        return logits if logits.dtype == torch.float64 else logits.float()  # fp32 (fp64 kept for tests)

    def gate_logit(self, y):
        """z_t (B, L), lambda_t = sigmoid(z_t), from the head's input y_t (B, L, C). In fp32 even under autocast:
        the survival is a product of T_max of them."""
        with torch.autocast(y.device.type, enabled=False):
            return self.exit_gate(y.to(self.exit_gate.weight.dtype)).squeeze(-1)  # fp32 weights

    def lam(self, y):
        """lambda_t (B, L): the exit gate's probability that a token leaves at this step."""
        return torch.sigmoid(self.gate_logit(y))

    def _readout(self, h, cos, sin, targets, gate_only=False, idx=None):
        """Step t's prediction read off the state (Ouro): per-token CE_t and the gate's z_t (B, L). Called under a
        checkpoint in training, so its B x L x V logits are not kept for backward. gate_only (Stage II):
        no gradient reaches anything but the gate."""
        y = self._coda(h, cos, sin, idx=idx)
        ce = F.cross_entropy(self.head(y).flatten(0, 1), targets.flatten(), ignore_index=-1, reduction="none")
        return ce.view(targets.shape), self.gate_logit(y.detach() if gate_only else y)

    def _loop(self, h, e, cos, sin, n, k, idx, readout=None):
        """The loop of the docstring, row i running T_i = n_i + k_i steps:

            for t in range(T_i):  h = core_step(h, e)

        with three systems concerns on top, each a named step below:
        1. truncated backprop (Parcae): the first n_i steps run without gradient, the last k_i with it.
           The core is the same at every step, so all rows run their n-phase, then all their k-phase;
        2. per-row depth: rows come sorted deepest first and n, k grow with T, so in each phase the rows
           still running are a prefix h[:m] (active_prefixes); only those are computed;
        3. loop_checkpoint: a gradient step keeps only its input and is recomputed in backward.
        At each row's last step, _telemetry records its state RMS and the step's relative size; readout
        (Ouro's per-step predictions; every row at one depth then) gets the state after every step."""
        rms, residual = torch.zeros(2, len(h), device=h.device, dtype=torch.float32)
        for steps, with_grad in ((n, False), (k, True)):  # 1: the no-gradient phase, then the gradient phase
            grad = with_grad and torch.is_grad_enabled()  # no_grad() callers (eval) run both phases without
            inp = e if grad else e.detach()  # e gets gradient from every gradient step, h from none before them
            for m, m_next in active_prefixes(steps):  # 2: rows [0, m) run this step, [m_next, m) finish
                with torch.set_grad_enabled(grad):  # the step only: a row that skips it keeps h0 = e's gradient
                    if grad and self.config.loop_checkpoint:  # 3
                        x = checkpoint(self.core_step, h[:m], inp[:m], cos, sin, None, True, idx[:m],
                                       use_reentrant=False, preserve_rng_state=False)  # the core draws no random numbers
                    else:
                        x = self.core_step(h[:m], inp[:m], cos, sin, idx=idx[:m])
                if readout is not None:
                    readout(x)
                if with_grad:  # every row ends in the gradient phase (k_i >= 1): its last step is here
                    _telemetry(x[m_next:], h[m_next:m], rms[m_next:m], residual[m_next:m])
                h = x if m == len(h) else torch.cat([x, h[m:]])  # finished rows keep their state
                self.last_rows_run += m
        return h, rms, residual

    def forward(self, idx, targets=None, num_loops=None, h0=None, exit_beta=0.0, train_gate=False, every_step=None,
                exit_threshold=None):
        """Logits and the last step's cross-entropy. A gated model given targets reads out every step too
        (last_exit): in training, or in eval with every_step=True (each readout costs a coda and a head). Its
        loss is then Stage I's objective if exit_beta > 0, Stage II's if train_gate. exit_threshold q: each token's
        logits (and loss) from its Q-exit step instead (exit_step; last_exit_step), as Ouro's release reads out."""
        B, L = idx.shape  # L tokens per row (T is the loop depth)
        if L > self.config.block_size:
            raise ValueError(f"sequence of length {L} is longer than block_size={self.config.block_size}")
        cos, sin = self.cos[:L], self.sin[:L]
        e = self._prelude(idx, cos, sin)  # (B, L, C) the input injected at every step
        if h0 is None:
            h0 = self.initial_state(e)
        elif h0.shape != e.shape:
            raise ValueError(f"h0 has shape {tuple(h0.shape)}, expected {tuple(e.shape)}")
        else:
            h0 = h0.detach()  # a caller's h0 gets no gradient
        # the per-row schedule, once: n steps without gradient, then k with it, rows run deepest first
        n, k = self._depths(B, num_loops)
        self.last_depths, self.last_rows_run = (n, k), 0
        order = deepest_first(n + k)
        per_step, readout = [], None  # a gated model's (CE_t, z_t) after every step t
        self.last_exit = self.last_exit_step = None
        if every_step is None:
            every_step = self.training or bool(exit_beta) or train_gate
        if exit_threshold is None and not (self.training or exit_beta or train_gate):
            exit_threshold = self.config.readout_q if self.config.readout_q >= 0 else None  # the release's own rule
        states = []  # exit_threshold: the state after every step
        if exit_threshold is not None and (not self.config.exit_gate or order is not None or exit_beta or train_gate):
            raise ValueError("exit_threshold reads out a gated model's rows at one depth, without an objective")
        per_ce = self.config.exit_gate and targets is not None and every_step
        if per_ce and (order is not None or (exit_beta and n.any())):
            raise ValueError("an exit gate's objective needs every row at one depth, each step with gradient")
        if per_ce or exit_threshold is not None:
            def readout(x):
                if exit_threshold is not None:
                    states.append(x)
                if per_ce:
                    args = (x, cos, sin, targets, train_gate, idx)
                    per_step.append(checkpoint(self._readout, *args, use_reentrant=False) if x.requires_grad
                                    else self._readout(*args))
        if order is None:  # already sorted (eval: every row at the same depth)
            h, rms, residual = self._loop(h0, e, cos, sin, n, k, idx, readout)
        else:
            o = (order.pin_memory() if e.is_cuda else order).to(e.device, non_blocking=True)  # no host sync
            back = o.argsort()  # the caller's row order again, before the coda
            h, rms, residual = (t[back] for t in self._loop(h0[o], e[o], cos, sin, n[order], k[order], idx[o]))
        self.last_state = (rms, residual)
        if per_step:
            ce, z = (torch.stack(t) for t in zip(*per_step))  # (T, B, L) each
            self.last_exit = (ce.detach(), z.detach())
            if exit_beta or train_gate:  # mean over the tokens that have a target (a product: a mask index waits for the GPU)
                obj = gate_loss(ce.detach(), z) if train_gate else exit_objective(ce, z, exit_beta)
                valid = targets != -1
                return None, (obj * valid).sum() / valid.sum()
        if states:  # Q-exit: each token reads out at the first step whose exit CDF reaches q (else the last)
            ys = torch.stack([self._coda(s, cos, sin, idx=idx) for s in states])  # (T, B, L, C)
            self.last_exit_step = m = decode.exit_step(self.gate_logit(ys), exit_threshold)  # (B, L), 0-based
            y = ys.gather(0, m[None, :, :, None].expand(1, *ys.shape[1:]))[0]
        else:
            y = self._coda(h, cos, sin, idx=idx)  # (B, L, C)
        if targets is None:
            return self.head(y[:, [-1], :]), None  # (B, 1, V)
        logits = self.head(y)  # (B, L, V)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return logits, loss


# -----------------------------------------------------------------------------
# What is not the model's forward, as functions of it: compiling, cost, optimizers, stability, cached
# generation. Each is also a method (model.estimate_flops(...)), bound after the class.


def compile_blocks(model):
    """torch.compile block by block, so a new loop depth reuses the same graphs. With symbolic sizes one graph
    serves every block, batch size (the core's batch shrinks as rows finish their loops) and length. What
    still makes a new graph is a short list (test_compile.py counts them): gradient on or off, a batch or
    length of 1 (specialised), a KV cache empty or filled, storing or not. All are Block.forward's,
    and dynamo's default of 8 graphs per function would send the rest to eager, silently but for a warning."""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    for block in (*model.prelude, *model.core, *model.coda):
        block.compile(dynamic=True)


def compiled_graphs():
    """Graphs torch.compile has made in this process so far: flat once every variant above has run."""
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


def estimate_flops(model, seq_len, n, k, backward=True):
    """Matmul FLOPs of one forward (+ backward) where sequence i runs n[i] loop steps without and
    k[i] with gradient (backward costs 2x forward). Attention counts the full L^2 (the usual
    convention, and what FlopCounterMode counts for SDPA's math and CUDA kernels). The forward runs
    exactly these steps (_loop); B copies of the maxima give what padded execution would cost.
    seq_len is L, the tokens per row. A gated model (Ouro) reads out every step: coda and head T times."""
    cfg, d = model.config, model.config.n_embd
    kv_dim = cfg.n_kv_head * (d // cfg.n_head)
    ve = lambda blocks: 2 * VE_GATE_CHANNELS * cfg.n_kv_head * sum(b.attn.ve is not None for b in blocks)  # gates
    mlp = (3 if cfg.mlp == "swiglu" else 2) * d * (cfg.mlp_hidden or 4 * d)  # gate, up, down
    block = 2 * (2 * d * d + 2 * d * kv_dim + mlp) + 4 * seq_len * d  # per token: q,o + k,v + MLP + attention
    inject = {"none": 0, "add": 0, "concat": 4 * d * d, "diagonal": 2 * d * d}[cfg.injection]  # W or B, every step
    C = 2 * d * d if cfg.injection == "diagonal" else 0  # output projection, once
    read = cfg.n_coda * block + ve(model.coda) + 2 * d * cfg.vocab_size + C + (2 * d if cfg.exit_gate else 0)
    once = cfg.n_prelude * block + ve(model.prelude) + (0 if cfg.exit_gate else read)
    f = 3 if backward else 1
    n, k = torch.as_tensor(n), torch.as_tensor(k)
    step = cfg.n_core * block + ve(model.core) + inject + (read if cfg.exit_gate else 0)
    return seq_len * (len(n) * f * once + step * (int(n.sum()) + f * int(k.sum())))


def configure_optimizers(model, muon_lr, adam_lr, weight_decay, adam_betas, adam_eps, gate_only=False):
    """Muon for the matrices inside blocks; AdamW, without weight decay, for the embeddings (the value tables too),
    norm gains and every injection parameter (Parcae's recipe). gate_only: Ouro's Stage II, an AdamW over the exit
    gate alone, every other weight frozen (bit-identical)."""
    if gate_only:
        for name, p in model.named_parameters():
            p.requires_grad_(name.startswith("exit_gate."))
        return (torch.optim.AdamW(model.exit_gate.parameters(), lr=adam_lr, betas=adam_betas, eps=adam_eps,
                                  weight_decay=0.0),)
    blocks = [*model.prelude, *model.core, *model.coda]
    matrices = [p for b in blocks for n, p in b.named_parameters() if p.dim() == 2 and not n.endswith("ve.weight")]
    ids = {id(p) for p in matrices}
    rest = [p for p in model.parameters() if id(p) not in ids]
    muon = torch.optim.Muon(matrices, lr=muon_lr, weight_decay=weight_decay, momentum=0.95, nesterov=True)
    adamw = torch.optim.AdamW(rest, lr=adam_lr, betas=adam_betas, eps=adam_eps, weight_decay=0.0)
    return muon, adamw


@torch.no_grad()
def loop_stats(model):
    """Spectral radius rho of the loop's linear part A-bar, and cheap companions; {} for the fixed-depth
    baseline (mean_recurrence 1, depth_sampling "fixed"), which trains no loop."""
    inj, d = model.config.injection, model.config.n_embd
    if model.config.mean_recurrence == 1 and model.config.depth_sampling == "fixed":
        return {}
    if inj in ("add", "none"):
        return {"rho": 1.0}  # A-bar = I: on the stability boundary
    if inj == "concat":
        Wh = model.W.weight[:, :d].float()  # the part acting on the state
        return {"rho": torch.linalg.eigvals(Wh).abs().max().item(),
                "sigma_max": torch.linalg.matrix_norm(Wh, ord=2).item()}
    decay = torch.exp(-F.softplus(model.dt_bias.float()) * model.A_log.float().exp())
    return {"rho": decay.max().item(), "mean_decay": decay.mean().item()}


GPT.compile_blocks, GPT.compiled_graphs = compile_blocks, staticmethod(compiled_graphs)
GPT.estimate_flops, GPT.configure_optimizers, GPT.loop_stats = estimate_flops, configure_optimizers, loop_stats
# generation with a KV cache: decode.py (README "Test-time compute")
GPT.new_cache, GPT.cache_nbytes = decode.new_cache, staticmethod(decode.cache_nbytes)
GPT.forward_cached, GPT.generate = decode.forward_cached, decode.generate  # generate(idx, max_new_tokens, temperature, ...)
