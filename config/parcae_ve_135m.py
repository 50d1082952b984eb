# config/parcae_135m.py with Parcae's value embeddings, as its released models train: a token table added to the
# values of every other layer (prelude.0, prelude.2, core.0, coda.1), gated per KV head. Unique parameters: 237.4M,
# of which 103.0M are the four tables (50304 x 512 each); per token they cost a lookup, not a matmul.
# torchrun --standalone --nproc_per_node=8 train.py config/parcae_ve_135m.py
out_dir = "out/parcae_ve_135m"
data_dir = "data/fineweb10B"
injection = "diagonal"
prelude_norm = True
depth_sampling = "sequence"
state_init = "random"
value_embeds = True
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
# optimizer and schedule: train.py's defaults (Parcae's, README "Full scale"); the tables go to AdamW, the gates to Muon
