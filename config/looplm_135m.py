# LoopLM-135M-naive's recipe (harims95/LoopLM) on nanoloop's code, to re-test its FineWeb val loss 3.95.
# Unique parameters: 134.10M (LoopLM: 134.1M, whose 896 more are its QK-norm gains; see test_model.py).
# torchrun --standalone --nproc_per_node=8 train.py config/looplm_135m.py
#
# What nanoloop does NOT copy from LoopLM's code, and why:
# - its truncated backprop: one cut n = max_i T_i - 3 for the whole micro-batch, so a sequence with
#   T_i <= max - 3 gets no gradient step. That is the bug being re-tested; here k_i = min(T_i, 3) per sequence.
# - learnable QK-norm gains and eps 1e-6 in every RMSNorm: nanoloop's QK-norm has no parameters and its
#   norms use 1e-5 (the same for every config), so this run differs from naive_135m in MLP and recipe only.
# - its init (every matrix N(0, 0.02), output projections too): nanoloop's scaled-zero init (std
#   sqrt(2/(5d)) = 0.0198, output projections 0) keeps every block the identity at init, as for all configs.
# - its z-loss 1e-4 * mean(logsumexp^2), which its reported val loss includes: the loss here is plain
#   cross-entropy, so this run's val loss is the smaller of the two by that term.
# - its Muon scales each update by 0.2 * sqrt(max(rows, cols)) and orthogonalises fused q|k|v and gate|up
#   matrices; torch.optim.Muon here uses max(1, rows/cols)^0.5 on separate matrices, so the same lr 0.02
#   is a 6.4x smaller step per element (10.6x for the MLP's down projection). Matching it needs an
#   optimizer setting nanoloop does not have yet.
# - AdamW weight decay 0.1 on the embedding and norm gains: nanoloop's AdamW group has none (Parcae's recipe).
# - its depth clamp at 4 mu_rec (P(Poisson(6) > 24) ~ 1e-8: no effect).
# Copied: the naive loop block(h + e) (an earlier LoopLM parcae.py returned h + attn + mlp instead),
# no prelude norm (its run set use_input_norm=false), a fresh random h0 every forward (0.02 * randn
# there, truncated normal std 0.0198 here), Poisson depths per sequence, Muon's weight decay and the
# AdamW settings. The schedule is its README's (cosine to 0.1x); its train.py decays linearly
# (--decay_shape=linear), and its README's command schedules 20,000 steps while the released checkpoint
# is step 17,500: if that run was scheduled for 20,000, its 3.95 was measured mid-decay (lr 0.38x by its code).
out_dir = "out/looplm_135m"
data_dir = "data/fineweb10B"
injection = "add"
prelude_norm = False
depth_sampling = "sequence"
state_init = "random"
n_embd = 1024
n_head = 16
n_kv_head = 8
n_prelude = 4
n_core = 1
n_coda = 2
mlp = "swiglu"
mlp_hidden = 2816
mean_recurrence = 6
backprop_depth = 3
rope_base = 10000.0
vocab_size = 50304
block_size = 1024
# 8 GPUs x 16 sequences x 1024 tokens x 2 micro-steps = 262,144 tokens per step (LoopLM: 2 GPUs x 32 x 1024 x 4)
batch_size = 16
total_batch_size = 262144
max_iters = 17500  # 4.59B tokens: fetch them with `python prepare_fineweb.py --num_chunks 46`
# optimizer: Muon for the block matrices, AdamW for the rest, with LoopLM's numbers
muon_lr = 0.02
weight_decay = 0.1  # Muon's decoupled decay, p *= 1 - lr * 0.1, as in LoopLM
adam_lr = 3e-4
adam_betas = (0.9, 0.95)
adam_eps = 1e-8
grad_clip = 1.0
# schedule: 100 warmup steps, constant to 60% of the run, half-cosine to 0.1x over the last 40%
warmup_iters = 100
decay_frac = 0.4
decay_shape = "cosine"
min_lr_frac = 0.1
