# Ouro on the CPU (README "Ouro"): the whole stack looped, a learned exit, both training stages, in minutes.
# python prepare_fineweb.py --sample
# python train.py config/ouro_tiny.py                                                  # Stage I
# python train.py config/ouro_tiny.py --init_from=resume --train_gate=True --max_iters=300   # Stage II
# python sample.py --out_dir=out/ouro_tiny --exit_criterion=gate --exit_threshold=0.5       # Q-exit
out_dir = "out/ouro_tiny"
data_dir = "data/sample"
injection = "none"         # no re-injection: h0 = wte[idx], h_t = RMSNorm(Core(h_t-1))
prelude_norm = False
loop_norm = True
exit_gate = True
n_prelude = 0              # all three blocks are in the loop
n_core = 3
n_coda = 0
n_embd = 128
n_head = 4
n_kv_head = 2
mean_recurrence = 4        # T_max
backprop_depth = 4         # Stage I backpropagates through every step
depth_sampling = "fixed"
exit_beta = 0.1            # Ouro's first stage
block_size = 128
batch_size = 4             # x 128 tokens: every step reads out T_max = 4 heads of 50304 logits, so half tiny's batch
total_batch_size = 512
val_tokens = 4096
max_iters = 200
eval_interval = 100
log_interval = 20
eval_loops = (1, 2, 3, 4, 6, 8)   # per-step val losses up to T_max, then past it
muon_lr = 0.02
adam_lr = 8e-3
