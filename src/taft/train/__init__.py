"""Training: TAFT, non-linear fine-tuning (nlft) and linear probing on cached or streamed trunk features
(`FeatureSource`), one evaluation.

    model = taft.Classifier(backbone, class_names, k=1, method="taft")
    train_f = model.cache_features(train_ds)                           # frozen trunk, computed once
    val_f = model.cache_features(val_ds)
    result = fit(model, train_f, TrainConfig(epochs=10), val=val_f, run_dir="runs/taft")
    evaluate(model, val_f).top1

`TrainConfig` is the recipe (defaults per method and backbone kind, chosen on validation data:
`taft.train.config`); `plan_run` resolves it into one `RunPlan` for plain or DP-SGD training; `make_private` gives
DP-SGD's sampler and step to your own loop.
"""

from taft.train.config import DEFAULT_LR, TrainConfig
from taft.train.evaluation import Evaluation, evaluate
from taft.train.plan import RunPlan, plan_run
from taft.train.private import PrivateTraining, make_private
from taft.train.sources import FeatureSource
from taft.train.trainer import Compute, FitResult, fit

__all__ = ["DEFAULT_LR", "Compute", "Evaluation", "FeatureSource", "FitResult", "PrivateTraining", "RunPlan",
           "TrainConfig", "evaluate", "fit", "make_private", "plan_run"]
