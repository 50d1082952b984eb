# Fine-tune the released LoopLM-135M-naive (pretrained.py) on FineWeb GPT-2 shards, or on any GPT-2 text.
# The model is the release's (its settings cannot be contradicted here; depths, h0 and a shorter block_size can
# change); everything below is training. The checkpoint is an ordinary one: resume, sample and eval it as usual.
# python train.py config/finetune_looplm.py
# python train.py config/finetune_looplm.py --data_dir=data/linuxdoc --max_iters=200 --out_dir=out/ft_linuxdoc
# python train.py config/finetune_looplm.py --init_from=path/to/LoopLM-135M-naive   # a local copy, no network
init_from = "looplm-135m-naive"
out_dir = "out/finetune_looplm"
data_dir = "data/fineweb10B"
batch_size = 8                # x 1024 tokens x 8 micro-steps (one GPU) = 65,536 tokens per step
total_batch_size = 65536
val_tokens = 1048576
max_iters = 1000
eval_interval = 250
log_interval = 10
# a tenth of LoopLM's learning rates; its betas, eps and Muon weight decay (its AdamW decays the embedding and gains
# by 0.1 too, nanoloop's AdamW does not); a short warmup, then its code's schedule: constant, then linear to 0.1x
# over the last 40% (its README says cosine; its training/train.py lr_mult is linear)
muon_lr = 0.002
weight_decay = 0.1
adam_lr = 3e-5
adam_betas = (0.9, 0.95)
adam_eps = 1e-8
warmup_iters = 50
decay_frac = 0.4
decay_shape = "linear"
min_lr_frac = 0.1
