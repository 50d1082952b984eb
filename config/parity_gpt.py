# Running parity (README "What the loop buys"): the same three blocks run once, no loop (the parameters of
# the loop but its injection's), about 3 minutes on 2 cores.
# python train.py config/parity_gpt.py
out_dir = "out/parity_gpt"
task = "parity"
task_mod = 2
task_train_len = (1, 8)
task_long_len = (31, 31)
block_size = 64
n_embd = 128
n_head = 4
n_kv_head = 4
n_prelude = 1
n_core = 1
n_coda = 1
injection = "add"
prelude_norm = False
depth_sampling = "fixed"
state_init = "zero"
mean_recurrence = 1
backprop_depth = 1
batch_size = 64
total_batch_size = 4096
max_iters = 750
eval_interval = 750
save_interval = 250         # a checkpoint between the two evaluations: an interrupted run keeps its steps
log_interval = 50
eval_loops = (1, 2, 4, 8, 16, 32, 64, 128)
muon_lr = 0.02
adam_lr = 8e-3
warmup_iters = 50
