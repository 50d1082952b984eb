# Running parity (README "What the loop buys"): RDM's concat + projection loop with its per-batch depth
# (Huginn), about 5 minutes on 2 cores.
# python train.py config/parity_rdm.py
out_dir = "out/parity_rdm"
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
injection = "concat"
prelude_norm = False
depth_sampling = "batch"
mean_recurrence = 8
backprop_depth = 4
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
