# 135M naive additive injection (LoopLM-135M-naive). Unique parameters: 132.3M.
# torchrun --standalone --nproc_per_node=8 train.py config/naive_135m.py
out_dir = "out/naive_135m"
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
mean_recurrence = 6
backprop_depth = 3
block_size = 1024
# 8 GPUs x 16 sequences x 1024 tokens x 2 micro-steps = 262,144 tokens per step (LoopLM-135M's batch)
batch_size = 16
total_batch_size = 262144
max_iters = 10000  # 2.6B tokens: fetch them with `python prepare_fineweb.py --num_chunks 27`
# optimizer and schedule: train.py's defaults (Parcae's, README "Full scale"), the same for every variant
