"""
Generation with a KV cache at a chosen test-time depth, and adaptive exit from the loop.

A looped model attends at every loop step, so its cache holds one K/V per (core layer, loop step) for
each past token ("full": exact), or only each token's last step ("last": num_loops times smaller, an
approximation). GPT.new_cache, GPT.forward_cached and GPT.generate call the functions here:

    cache = model.new_cache(16)                               # depth 16, the exact cache
    logits, steps = model.forward_cached(idx, cache, 16)      # the prompt: every row runs 16 steps
    logits, steps = model.forward_cached(idx[:, -1:], cache, 16, "gate", 0.9)   # one token, Q-exit
    out = model.generate(idx, 100, num_loops=16, exit_criterion="kl", exit_threshold=5e-4)

Exit criteria, decided per row after each step (a row's exit never depends on the other rows):
    "kl"      KL between consecutive steps' next-token distributions falls under the threshold (RDM)
    "latent"  |h_t - h_t-1| / |h_t| falls under the threshold (Ouro's hidden-state-difference exit)
    "gate"    Q-exit (Ouro): the learned exit gate's CDF reaches the threshold q (exit_step, Ouro's release's rule)
"""
import torch
import torch.nn.functional as F

EXIT_CRITERIA = ("none", "kl", "latent", "gate")


def exit_cdf(z, last_takes_rest=True):
    """The exit CDF (T, B, L) as Ouro's release computes it for its readout rule: p in linear space, in z's dtype,
    summed by torch.cumsum, so the first step reaching q is the release's to the last bit (in bf16, a q of 1.0 is
    reached early). last_takes_rest=False: the steps so far are not all (decode.py, one step at a time)."""
    lam, S, p = torch.sigmoid(z), torch.ones_like(z[0]), []
    for t in range(len(z)):
        p.append(S if last_takes_rest and t == len(z) - 1 else lam[t] * S)
        S = S * (1 - lam[t])
    return torch.cumsum(torch.stack(p), 0)


def exit_step(z, q):
    """Q-exit: the 0-based step (B, L) each token reads out at, the first whose exit CDF reaches q, else the last."""
    hit = exit_cdf(z) >= q
    return torch.where(hit.any(0), hit.int().argmax(0), len(z) - 1)


def q_exit_sums(ce, z, valid, qs):
    """Sums over the valid tokens (B, L) of CE_t and z_t (T, B, L) from every step: for each q in qs, the CE at each
    token's Q-exit step and that step (1-based). train.py's and eval.py's Q-exit tables."""
    out = []
    for q in qs:
        m = exit_step(z, q)
        out += [ce.gather(0, m[None])[0][valid].sum(), (m + 1)[valid].sum()]
    return torch.stack(out).double() if out else torch.zeros(0, dtype=torch.float64, device=ce.device)


def q_exit_table(means, qs, mu):
    """train.py's evaluation of a gated model at T_max = mu: its log.jsonl fields and printed lines, from means over
    the val tokens of q_exit_sums' values followed by H(p) and E[t]."""
    *per_q, entropy, step = means
    rec = {"val_exit_entropy": entropy, "val_exit_step": step,
           "val_q_exit": {q: {"loss": per_q[2 * i], "steps": per_q[2 * i + 1]} for i, q in enumerate(qs)}}
    return rec, (f"  exit gate at T_max={mu}: H(p) {entropy:.3f}, E[t] {step:.2f}; Q-exit, all {mu} steps run and "
                 f"each token's loss read at its exit step:\n" + "\n".join(
                     f"  q={q:<4} loss {r['loss']:.4f}   mean steps {r['steps']:.2f}" for q, r in rec["val_q_exit"].items()))


class KVCache:
    """Keys and values of past tokens for ONE attention application (a layer, or a core layer at one loop step)."""

    def __init__(self):
        self.k = self.v = None  # (B, n_kv_head, L, head_dim)
        self.new = None         # the (k, v) of the latest call, for callers that keep them elsewhere

    def __len__(self):
        return 0 if self.k is None else self.k.size(2)

    def __call__(self, k, v, store=True):
        self.new = (k, v)
        if self.k is not None:
            k, v = torch.cat([self.k, k], dim=2), torch.cat([self.v, v], dim=2)
        if store:
            self.k, self.v = k, v
        return k, v

    def nbytes(self):
        return 0 if self.k is None else 2 * self.k.numel() * self.k.element_size()


def new_cache(model, num_loops, mode="full"):
    """One KVCache per attention application: prelude layer, (loop step, core layer), coda layer.
    mode="last" keeps one cache per core layer holding each past token's LAST loop step only."""
    steps = num_loops if mode == "full" else 1
    return {"pos": 0, "mode": mode,
            "prelude": [KVCache() for _ in model.prelude],
            "core": [[KVCache() for _ in model.core] for _ in range(steps)],
            "coda": [KVCache() for _ in model.coda]}


def cache_nbytes(cache):
    caches = cache["prelude"] + cache["coda"] + [c for step in cache["core"] for c in step]
    return sum(c.nbytes() for c in caches)


def cache_estimate(model, num_loops, tokens, mode="full", batch=1, dtype_bytes=None):
    """The bytes cache_nbytes will count once a cache of new_cache's layout holds `tokens` tokens (K and V of every
    attention application, in the parameters' dtype unless dtype_bytes, an autocast's, says otherwise): sample.py
    says it, and refuses past free memory, before a run."""
    cfg, dtype_bytes = model.config, dtype_bytes or next(model.parameters()).element_size()
    kv = 2 * batch * tokens * cfg.n_kv_head * (cfg.n_embd // cfg.n_head) * dtype_bytes  # K and V of one application
    return kv * (len(model.prelude) + len(model.coda) + len(model.core) * (num_loops if mode == "full" else 1))


def check_exit(model, exit_criterion):
    if exit_criterion not in EXIT_CRITERIA:
        raise ValueError(f"exit_criterion must be one of {', '.join(EXIT_CRITERIA)}, got {exit_criterion!r}")
    if exit_criterion == "gate" and not model.config.exit_gate:
        raise ValueError("exit_criterion='gate' needs a model trained with an exit gate (exit_gate=True)")


@torch.no_grad()
def forward_cached(model, idx, cache, num_loops, exit_criterion="none", exit_threshold=0.0, exit_cache="copy"):
    """Run the new tokens idx (B, L) after those in cache; return next-token logits (B, V) and the loop
    steps each row used (B,). With L == 1 and an exit criterion, a row leaves the loop after the first
    step at which its criterion says so, and what it does at the steps left is exit_cache's: "copy" stops
    it (its entries at later steps are its last real one: the Ouro paper's saving) while the others go on;
    "compute" runs them for the cache, so only its readout exits (Ouro's released code: exact, nothing saved).
    Q-exit ("gate") reads a prompt's last token out at its exit step too, as the release does."""
    if exit_criterion == "none" and model.config.readout_q >= 0:  # the release's own readout (Ouro)
        exit_criterion, exit_threshold, exit_cache = "gate", model.config.readout_q, "compute"
    check_exit(model, exit_criterion)
    if exit_cache not in ("copy", "compute"):
        raise ValueError(f"exit_cache must be 'copy' or 'compute', got {exit_cache!r}")
    B, L = idx.shape
    pos, full = cache["pos"], cache["mode"] == "full"
    if pos + L > model.config.block_size:
        raise ValueError(f"cache of {pos} tokens + {L} new exceeds block_size={model.config.block_size}")
    cos, sin = model.cos[pos:pos + L], model.sin[pos:pos + L]
    e = model._prelude(idx, cos, sin, cache["prelude"])
    h = h_run = model.initial_state(e)
    adaptive = exit_criterion != "none" and (L == 1 or exit_criterion == "gate")
    stop = adaptive and L == 1 and exit_cache == "copy"  # an exited row stops computing
    last = (torch.arange(L, device=idx.device) == L - 1)[None, :, None]  # the exit is the last token's
    done = torch.zeros(B, dtype=torch.bool, device=idx.device)
    steps = torch.zeros(B, dtype=torch.long, device=idx.device)
    z = []  # "gate": the gate's logit z_t of the last token after each step
    pending = [None] * len(model.core)  # "last" mode: each row's K/V from its latest step
    if adaptive and exit_criterion == "kl":
        logp = F.log_softmax(model.head(model._coda(h, cos, sin, cache["coda"], False, idx)), -1)
    for r in range(num_loops):
        caches = cache["core"][r if full else 0]
        h_new = model.core_step(h_run, e, cos, sin, caches, full, idx)
        keep = done[:, None, None, None] if stop else torch.zeros_like(done)[:, None, None, None]  # rows that stopped
        for j, c in enumerate(caches):
            if full and stop and r > 0:  # a stopped row's entry at this step is its latest real one
                prev = cache["core"][r - 1][j]
                c.k[:, :, -1:] = torch.where(keep, prev.k[:, :, -1:], c.k[:, :, -1:])
                c.v[:, :, -1:] = torch.where(keep, prev.v[:, :, -1:], c.v[:, :, -1:])
            if not full:
                pending[j] = c.new if r == 0 else tuple(torch.where(keep, p, q) for p, q in zip(pending[j], c.new))
        h_prev, h = h, torch.where(done[:, None, None] & last, h, h_new)  # an exited token's readout state stays
        h_run = h if stop else h_new
        steps += (~done).long()  # a row that exits at step m has run (or reads out) m steps
        if not adaptive:
            continue
        if exit_criterion == "kl":  # KL(p_{r-1} || p_r) of the next-token distributions
            logp_prev = logp
            logp = F.log_softmax(model.head(model._coda(h, cos, sin, cache["coda"], False, idx)), -1)
            done |= (logp_prev.exp() * (logp_prev - logp)).sum(-1).clamp(min=0)[:, -1] < exit_threshold
        elif exit_criterion == "latent":  # relative change of the state
            done |= ((h - h_prev).norm(dim=-1) / (h.norm(dim=-1) + 1e-12))[:, -1] < exit_threshold
        else:  # Q-exit: the release's rule, its CDF summed as the release sums it; the last step takes what is left
            z.append(model.gate_logit(model._coda(h, cos, sin, cache["coda"], False, idx)[:, -1]))
            done |= exit_cdf(torch.stack(z), last_takes_rest=False)[-1] >= exit_threshold
        if stop and bool(done.all()):
            if full:  # later tokens at steps > r read the latest entry these tokens have
                for later in cache["core"][r + 1:]:
                    for c, c_r in zip(later, caches):
                        c(c_r.k[:, :, -1:], c_r.v[:, :, -1:])
            break
    if not full:  # each token keeps only its last step's K/V
        for c, (k, v) in zip(cache["core"][0], pending):
            c(k, v)
    cache["pos"] = pos + L
    y = model._coda(h, cos, sin, cache["coda"], idx=idx)
    return model.head(y[:, -1]), steps


@torch.no_grad()
def generate(model, idx, max_new_tokens, temperature=1.0, top_k=None, num_loops=None, use_cache=True,
             cache="full", exit_criterion="none", exit_threshold=0.0, exit_cache="copy", return_stats=False):
    """Sample max_new_tokens after idx (B, L). temperature=0 is greedy. Prompt tokens run num_loops
    steps; with an exit criterion each generated token may leave the loop earlier (exit_cache: see
    forward_cached). Q-exit with exit_cache="compute" generates what Ouro's released code generates."""
    num_loops = model.config.mean_recurrence if num_loops is None else num_loops
    if num_loops < 1:
        raise ValueError(f"num_loops must be >= 1, got {num_loops}")
    check_exit(model, exit_criterion)
    if exit_criterion != "none" and not use_cache:
        raise ValueError("adaptive exit needs use_cache=True")
    if cache not in ("full", "last"):
        raise ValueError(f"cache must be 'full' or 'last', got {cache!r}")
    kv, used = None, []
    for _ in range(max_new_tokens):
        if not use_cache:
            logits = model(idx[:, -model.config.block_size:], num_loops=num_loops)[0][:, -1]
        elif kv is None or idx.size(1) > model.config.block_size:
            # (re)fill the cache with the whole context; past block_size this recomputes every token
            kv = new_cache(model, num_loops, cache)
            logits, _ = forward_cached(model, idx[:, -model.config.block_size:], kv, num_loops,
                                       *((exit_criterion, exit_threshold) if exit_criterion == "gate" else ()))
        else:
            logits, steps = forward_cached(model, idx[:, -1:], kv, num_loops, exit_criterion, exit_threshold,
                                           exit_cache)
            used.append(steps)
        if temperature == 0:
            idx_next = logits.argmax(-1, keepdim=True)
        else:
            logits = logits / temperature
            if top_k is not None:
                v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                logits[logits < v[:, [-1]]] = -float("inf")
            idx_next = torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)
        idx = torch.cat((idx, idx_next), dim=1)
    if not return_stats:
        return idx
    stats = {"mean_steps": torch.stack(used).float().mean().item() if used else float(num_loops),
             "cache_bytes": cache_nbytes(kv) if kv is not None else 0}
    return idx, stats
