"""Training: TAFT, non-linear fine-tuning (nlft) and linear probing on cached trunk features, one evaluation.

    from taft.train import TrainConfig, cache_features, fit, evaluate
    cfg = TrainConfig(method="taft", tangent_blocks=1, epochs=10)
    train_f = cache_features(train_ds, backbone, cfg.tangent_blocks)     # frozen trunk, computed once
    val_f = cache_features(val_ds, backbone, cfg.tangent_blocks)
    result = fit(cfg, backbone, train_f, val=val_f, run_dir="runs/taft")  # config, metrics, checkpoint
    evaluate(result.classifier, val_f).top1

Default learning rates (AdamW, weight_decay = 0, cosine schedule, batch 32, κ = 15 squared loss) are in
`DEFAULT_LR`; see `taft.train.config` for how they were chosen.
"""

from taft.train.classifier import Classifier, PlainTail, build_classifier, cache_features, feature_key
from taft.train.config import DEFAULT_LR, HEAD_INITS, LOSSES, METHODS, SCHEDULES, TrainConfig
from taft.train.losses import classification_loss, proximity
from taft.train.trainer import (CHECKPOINT_NAME, Evaluation, Examples, FitResult, Prepared, evaluate, fit,
                                lr_factor, train_loop)

__all__ = ["CHECKPOINT_NAME", "DEFAULT_LR", "HEAD_INITS", "LOSSES", "METHODS", "SCHEDULES", "Classifier",
           "Evaluation", "Examples", "FitResult", "PlainTail", "Prepared", "TrainConfig", "build_classifier",
           "cache_features", "classification_loss", "evaluate", "feature_key", "fit", "lr_factor", "proximity",
           "train_loop"]
