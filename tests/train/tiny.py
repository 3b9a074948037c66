"""A tiny ViT-on-digits configuration shared by the estimator and CLI tests."""

TINY = [
    "model.hidden_size=16",
    "model.num_layers=1",
    "model.num_heads=2",
    "model.mlp_dim=32",
    "data.batch_size=32",
    "data.eval_batch_size=360",
    "optimizer.warmup_steps=2",
    "train.steps=12",
    "train.log_every=3",
    "train.checkpoint_every=4",
    "train.eval_every=0",
]
