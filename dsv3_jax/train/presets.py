"""Training settings that go with each model preset."""

from __future__ import annotations

from dsv3_jax.train.config import TrainConfig

TRAIN_PRESETS: dict[str, TrainConfig] = {
    # Seconds per run: end-to-end tests.
    "tiny": TrainConfig(steps=20, batch_size=4, seq_len=32, peak_lr=3e-3, eval_every=10, eval_batches=2,
                        checkpoint_every=5, keep_checkpoints=3, bias_update_rate=0.01),
    # `make train` on a 2-core CPU: about 10-15 minutes on the shakespeare corpus.
    # (measured: 2.1 s per step of 8 x 256 tokens with the blocked dispatch -> ~11 min for 300 steps)
    "small": TrainConfig(steps=300, batch_size=8, seq_len=256, peak_lr=2e-3, warmup_frac=0.05,
                         decay_start_frac=0.5, decay_end_frac=0.95, eval_every=50, eval_batches=16,
                         checkpoint_every=50, bias_update_rate=0.001),
    # Research-scale presets at V3's sequence length with V3's optimiser recipe (AdamW 0.9/0.95, weight decay 0.1,
    # clip 1.0, warmup then constant then cosine to 10%, MTP weight 0.3, bias rate 0.001); the peak learning
    # rates are those published for the shapes: DeepSeek-V2-Lite's 4.2e-4, the aux-loss-free paper's 1e-3.
    # Batches: 4M tokens (dsv2-lite) and 1M tokens (moe-1b) per step.
    "dsv2-lite": TrainConfig(steps=50_000, batch_size=1024, seq_len=4096, peak_lr=4.2e-4, final_lr_ratio=0.1,
                             warmup_frac=0.04, mtp_lambda=0.3, bias_update_rate=0.001),
    "moe-1b": TrainConfig(steps=20_000, batch_size=256, seq_len=4096, peak_lr=1e-3, final_lr_ratio=0.1,
                          warmup_frac=0.05, mtp_lambda=0.3, bias_update_rate=0.001),
    # The paper's recipe (V3 §4.2) for reference: 2.2e-4 peak, 4K sequences; batch ramps 3072 -> 15360 there.
    "deepseek-v3-671b": TrainConfig(steps=100_000, batch_size=15360, seq_len=4096, peak_lr=2.2e-4,
                                    final_lr_ratio=0.1, warmup_frac=0.02, mtp_lambda=0.3, bias_update_rate=0.001),
}


def train_preset(name: str) -> TrainConfig:
    if name not in TRAIN_PRESETS:
        raise KeyError(f"unknown preset {name!r}; choose one of {sorted(TRAIN_PRESETS)}")
    return TRAIN_PRESETS[name]
