"""Evaluation on cached trunk features: top-1, per-class accuracy and loss."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from taft.data.feature_cache import LabelledDataset
from taft.losses import classification_loss
from taft.model import Classifier
from taft.train.config import TrainConfig
from taft.train.examples import EVAL_BATCH, Examples, FeatureData, Prepared
from taft.train.sources import FeatureSource, feature_source, is_dataset, prepared, training_data


@dataclass
class Evaluation:
    """top1: fraction correct; per_class[c]: accuracy on class c (None when it has no examples); loss: mean
    training loss (without the regularizer)."""

    top1: float
    loss: float
    per_class: list[float | None]
    counts: list[int]
    class_names: list[str]

    @property
    def n(self) -> int:
        return sum(self.counts)

    def to_dict(self) -> dict[str, Any]:
        return {"top1": self.top1, "loss": self.loss, "n": self.n,
                "per_class_accuracy": dict(zip(self.class_names, self.per_class)),
                "per_class_count": dict(zip(self.class_names, self.counts))}


@torch.no_grad()
def evaluate_prepared(classifier: Classifier, data: Prepared, loss: str, kappa: float,
                      batch_size: int = EVAL_BATCH) -> Evaluation:
    """`evaluate` on data already prepared for `classifier` (and placed on its device)."""
    n_cls = classifier.num_classes
    correct = torch.zeros(n_cls, dtype=torch.int64)
    counts = torch.zeros(n_cls, dtype=torch.int64)
    total_loss = 0.0
    order = torch.arange(len(data)).split(batch_size)
    for idx, (x, _, mask) in zip(order, data.batches(order, classifier.device, classifier.dtype)):
        logits = classifier.train_logits(x, mask)
        y = data.labels[idx]
        total_loss += float(classification_loss(logits, y.to(logits.device), loss, kappa, reduction="sum"))
        hit = logits.argmax(-1).cpu() == y
        counts += torch.bincount(y, minlength=n_cls)
        correct += torch.bincount(y[hit], minlength=n_cls)
    per_class = [float(c) / float(m) if m else None for c, m in zip(correct.tolist(), counts.tolist())]
    n = int(counts.sum())
    return Evaluation(top1=float(correct.sum()) / n, loss=total_loss / n, per_class=per_class,
                      counts=counts.tolist(), class_names=list(classifier.class_names))


def evaluate(classifier: Classifier, data: FeatureData | LabelledDataset, *, batch_size: int = EVAL_BATCH,
             loss: str | None = None, kappa: float | None = None, feed: str = "auto",
             features: FeatureSource | str = "auto") -> Evaluation:
    """Top-1, per-class accuracy and loss of `classifier` (on its device) on `data`: cached trunk features
    (CachedFeatures or (features, labels[, ids])), or a raw dataset (images, texts) whose features are cached or
    streamed through the classifier's trunk as `features` says (`taft.train.sources`; never augmented). The loss
    defaults to the classifier's training loss and κ. `feed`: how cached features reach the device
    (`taft.train.feeding`)."""
    recipe, default = classifier.train_config or {}, TrainConfig()
    loss = loss or recipe.get("loss") or default.loss
    kappa = kappa if kappa is not None else recipe.get("kappa", default.kappa)
    classifier.eval()
    if is_dataset(data):
        examples = training_data(classifier, data, feature_source(features), "evaluation data", progress=False)
        examples.check(classifier)
        batches = prepared(classifier, examples)
    else:
        examples = Examples(data, "evaluation data")
        examples.check_labels(classifier.class_names)
        batches = Prepared(classifier, examples, batch_size)
    batches.place(classifier.device, feed)
    return evaluate_prepared(classifier, batches, loss, kappa, batch_size)
