# Ouro's looped LM (arXiv 2510.25741) on the blocks of config/looplm_135m.py, to compare the four ways of looping
# at 135M on the same data and optimizer. Stage I, then Stage II (the exit gate alone):
# torchrun --standalone --nproc_per_node=8 train.py config/ouro_135m.py
# torchrun --standalone --nproc_per_node=8 train.py config/ouro_135m.py --init_from=resume --train_gate=True --max_iters=18500
# Unique parameters: 134,104,065 = looplm_135m's 134,102,016 + the loop norm (1,024) + the gate (1,025); see test_model.py.
#
# What nanoloop does NOT copy from Ouro, and why:
# - its shape (1.4B: 24 layers, d 2048; 2.6B: 48 layers): the point here is the looping, on the same 7 blocks as
#   the naive, RDM and Parcae 135M runs, so that only the way of looping differs.
# - its AdamW-only optimizer: Muon for the block matrices and AdamW for the rest, as every nanoloop config, so a
#   difference is not the optimizer's.
# - its data (a multi-trillion-token mix) and its T 8 -> 4 schedule: FineWeb-10B for 4.59B tokens at T_max = 4
#   throughout, the depth its released models use; a schedule over depths is one more variable to compare.
# - the "sandwich" branch norms of its released code (four norms per block): the blocks stay the other configs'.
# Copied: no prelude, no coda, no re-injection (h0 = wte[idx]); an RMSNorm after every loop step; a readout of
# every step through the final norm and the tied head; the gate on the head's input; Stage I with beta 0.1
# and every step backpropagated; Stage II on the gate alone with I_t and w_t of the paper.
out_dir = "out/ouro_135m"
data_dir = "data/fineweb10B"
injection = "none"
prelude_norm = False
loop_norm = True
exit_gate = True
exit_beta = 0.1
n_embd = 1024
n_head = 16
n_kv_head = 8
n_prelude = 0
n_core = 7            # all of looplm_135m's 4 + 1 + 2 blocks, looped
n_coda = 0
mlp = "swiglu"
mlp_hidden = 2816
mean_recurrence = 4   # T_max
backprop_depth = 4    # Stage I backpropagates through every step
depth_sampling = "fixed"
rope_base = 10000.0
vocab_size = 50304
block_size = 1024
# 8 GPUs x 16 sequences x 1024 tokens x 2 micro-steps = 262,144 tokens per step, as looplm_135m
batch_size = 16
total_batch_size = 262144
max_iters = 17500     # 4.59B tokens, as looplm_135m
eval_loops = (1, 2, 3, 4, 6, 8)
# looplm_135m's optimizer and schedule
muon_lr = 0.02
weight_decay = 0.1
adam_lr = 3e-4
adam_betas = (0.9, 0.95)
adam_eps = 1e-8
grad_clip = 1.0
warmup_iters = 100
decay_frac = 0.4
decay_shape = "cosine"
min_lr_frac = 0.1
