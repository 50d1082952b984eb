# Parcae twin of config/looplm_135m.py: LoopLM-135M-naive's recipe with only the injection changed, stable
# diagonal injection with its prelude norm (and the C, B, A_log, dt_bias that come with it). Everything
# else is looplm_135m.py's, so the pair re-tests LoopLM's finding that no Parcae variant beat the naive loop.
# Unique parameters: 136.20M (134.10M + prelude norm 1024 + A_log, dt_bias 2 x 1024 + B, C 2 x 1024^2).
# This is nanoloop's Parcae (A_log 0, decay 0.447, B = I, C after the loop, injection parameters in AdamW
# without weight decay), not one of LoopLM's own five ablations (no C, B in Muon, A_log uniform).
# torchrun --standalone --nproc_per_node=8 train.py config/parcae_looplm_135m.py
out_dir = "out/parcae_looplm_135m"
data_dir = "data/fineweb10B"
injection = "diagonal"
prelude_norm = True
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
