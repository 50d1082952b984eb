# CPU quick start on the offline sample (python prepare_fineweb.py --sample): a few minutes on 2 cores.
# python train.py config/tiny.py
# torchrun --standalone --nproc_per_node=2 train.py config/tiny.py
out_dir = "out/tiny"
data_dir = "data/sample"
injection = "diagonal"
n_embd = 128
n_head = 4
n_kv_head = 2
n_prelude = 1
n_core = 1
n_coda = 1
mean_recurrence = 4
backprop_depth = 2
block_size = 128
batch_size = 4                # x 128 tokens x 2 micro-steps (1 process) or x 2 processes (torchrun --nproc_per_node=2)
total_batch_size = 1024
val_tokens = 8192
max_iters = 250
eval_interval = 125
log_interval = 25
warmup_iters = 0
muon_lr = 0.02
adam_lr = 8e-3
