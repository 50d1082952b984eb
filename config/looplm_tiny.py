# LoopLM-135M-naive's architecture at laptop size: the released model's switches (SwiGLU, learnable QK-norm gains,
# RMSNorm eps 1e-6, naive loop without a prelude norm, h0 = 0.02 randn, 4/1/2 blocks, GQA 2:1, mu_rec 6), d = 128.
# Trains in about 15 minutes on 2 cores on the Linux documentation shards (README "Released models").
# python train.py config/looplm_tiny.py
out_dir = "out/looplm_tiny"
data_dir = "data/linuxdoc"
injection = "add"
prelude_norm = False
qk_norm = "gain"
norm_eps = 1e-6
state_init = "normal"
depth_sampling = "sequence"
n_embd = 128
n_head = 4
n_kv_head = 2
n_prelude = 4
n_core = 1
n_coda = 2
mlp = "swiglu"
mlp_hidden = 352              # 2816 / 1024 of the width, as the release
mean_recurrence = 6
backprop_depth = 3
block_size = 256
batch_size = 8
total_batch_size = 2048
val_tokens = 65536
max_iters = 600
eval_interval = 300
log_interval = 50
eval_loops = (1, 2, 3, 6, 12)
muon_lr = 0.02
adam_lr = 3e-3
adam_betas = (0.9, 0.95)
warmup_iters = 30
