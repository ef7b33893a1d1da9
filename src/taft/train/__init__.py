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

from taft.data.trunk_features import cache_features
from taft.model import Classifier
from taft.train.config import DEFAULT_LR, TrainConfig
from taft.train.evaluation import Evaluation, evaluate
from taft.train.trainer import FitResult, build_classifier, fit

__all__ = ["DEFAULT_LR", "Classifier", "Evaluation", "FitResult", "TrainConfig", "build_classifier", "cache_features",
           "evaluate", "fit"]
