# Running parity (README "What the loop buys"): Ouro's loop, the same three blocks all looped, about 5 minutes on 2 cores.
# python train.py config/parity_ouro.py
out_dir = "out/parity_ouro"
task = "parity"
task_mod = 2
task_train_len = (1, 8)
task_long_len = (31, 31)
block_size = 64
n_embd = 128
n_head = 4
n_kv_head = 4
n_prelude = 0              # no prelude or coda: the whole stack (3 blocks, as the others' 1/1/1) is the loop
n_core = 3
n_coda = 0
injection = "none"         # no re-injection: the loop starts from the embeddings and never sees them again
prelude_norm = False
loop_norm = True
exit_gate = True
exit_beta = 0.1            # Stage I
depth_sampling = "fixed"
mean_recurrence = 4        # T_max = 4 (Ouro's): 12 block applications, as Parcae's 1 + 8 + 1 cost about
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
