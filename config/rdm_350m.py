# 350M RDM / Huginn: concat + projection, one log-normal Poisson depth per batch. Unique parameters: 362.6M.
# torchrun --standalone --nproc_per_node=8 train.py config/rdm_350m.py
out_dir = "out/rdm_350m"
data_dir = "data/fineweb10B"
injection = "concat"
prelude_norm = False
depth_sampling = "batch"
state_init = "random"
n_embd = 1280
n_head = 10
n_kv_head = 10
n_prelude = 5
n_core = 5
n_coda = 5
mean_recurrence = 8
backprop_depth = 4
block_size = 1024
# 8 GPUs x 16 sequences x 1024 tokens x 4 micro-steps = 524,288 tokens per step
batch_size = 16
total_batch_size = 524288
max_iters = 14000  # 7.3B tokens: fetch them with `python prepare_fineweb.py --num_chunks 74`
# optimizer and schedule: train.py's defaults (Parcae's, README "Full scale"), the same for every variant
