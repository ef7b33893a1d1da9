"""How to train (`TrainConfig`, the recipe), shared by the three methods; what the model is lives in the model
(`taft.spec.ModelSpec`). A run records both in one dict, `run_record(spec, config)`, under the keys checkpoints and
stores have always used."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from taft.data.augment import AUGMENTS
from taft.errors import TaftError
from taft.losses import DEFAULT_KAPPA
from taft.spec import METHODS, SPEC_KEYS, ModelSpec
from taft.validate import check_choice, check_integer, check_number

LOSSES = ("mse", "ce")
SCHEDULES = ("cosine", "step", "constant")
OPTIMIZERS = ("adamw", "sgd")

# Default recipes: the settings a config leaves None are filled in by `TrainConfig.resolved` from the row of its
# backbone kind and privacy (optimizer "adamw", warmup 0 and head_lr = lr where a row says nothing). Chosen on
# validation splits of the training data (docs/results.md, "Training recipe"; the commands are there):
# - image, ordinary: DINOv2 ViT-S/14 at 112 px, CIFAR-10 mini, 300 train / 100 validation images per class from a
#   20 % split of the training folder, k = 1, 10 epochs, batch 32, one seed (val top-1 %): taft lr 1e-4: 71.8,
#   1e-4 + head_lr 1e-2: 73.3, 1e-3 + head_lr 1e-2 + warmup 0.1: 74.9, 3e-3 (same): 73.9, 1e-3 + warmup 0.1 with a
#   probe-fitted base head: 74.7; nlft lr 1e-4: 76.1, 1e-4 + head_lr 1e-2 + warmup 0.1: 76.9; probe lr 1e-2: 71.0.
#   Earlier, at 224 px on an H100 (300/100 per class, 10 epochs, no warm-up): taft 1e-4: 67.8, 3e-4: 70.6, 1e-3: 71.6
#   with an epoch-1 loss spike (which the warm-up removes), nlft 1e-4: 72.9, 3e-4: 73.0, 1e-3: 69.4.
# - text: `python experiments/text_lr.py` (Rotten Tomatoes, minilm-l6, 4 epochs, 10 % validation split): taft k=1
#   1e-4: 71.2, 1e-3: 75.8, 3e-3: 75.8; k=2 1e-4: 73.5, 1e-3: 76.6, 3e-3: 75.8; nlft 1e-4 ≥ 3e-4 at k=1 and 2;
#   probe 1e-2: 73.5, 3e-2: 74.3. Head rates and warm-up were not studied for text (so: none).
# - private (DP-SGD, either kind): see docs/results.md, "DP-SGD defaults that learn": SGD with momentum at lr 1.0
#   with a large expected batch (`taft.privacy.config.expected_batch_size`), 5 epochs; on a Fashion-MNIST
#   validation split (experiments/recipe_study.py, docs/experiments/recipe/fashion-dp-*): at ε = 3 5 epochs 76.5,
#   10 epochs 77.8, lr 0.3: 72.7, lr 3: 48.4, AdamW 1e-3 (head 1e-2): 66.6, expected batch n/4: 71.5, C 0.3 / 3 as
#   lr; at ε = 1 3 epochs 73.0, 5: 73.0, 10: 67.1; at ε = 8 5: 76.9, 10: 79.3. Ten epochs win at ε ≥ 3 and lose 5.9
#   points at ε = 1, so the DP epochs depend on the target ε (`dp_epochs`): 10 from ε = 3 on, 5 below it and when σ
#   is given instead of ε. Below an expected batch of DP_FULL_LR_BATCH the rate shrinks as (B/1000)^1.5 (`dp_lr`):
#   docs/results.md, "DP-SGD's rate on small data": CIFAR-10 mini at ε = 3, the best rate among 1 … 0.001 was
#   0.01 at B = 32, 0.03 at B = 100 and 0.1 at B = 300, where 1.0 stayed at or near chance.
DEFAULT_EPOCHS, DP_EPOCHS, DP_LONG_EPOCHS, DP_LONG_FROM_EPSILON = 10, 5, 10, 3.0
DP_RECIPE: dict[str, dict[str, Any]] = {m: {"lr": 1.0, "optimizer": "sgd"} for m in METHODS}
DP_FULL_LR_BATCH, DP_LR_EXPONENT = 1000, 1.5  # below this expected batch the DP rate shrinks (`dp_lr`)
RECIPES: dict[tuple[str, bool], dict[str, dict[str, Any]]] = {
    ("image", False): {"taft": {"lr": 1e-3, "head_lr": 1e-2, "warmup": 0.1},
                       "nlft": {"lr": 1e-4, "head_lr": 1e-2, "warmup": 0.1},
                       "probe": {"lr": 1e-2}},
    ("text", False): {"taft": {"lr": 1e-3}, "nlft": {"lr": 1e-4}, "probe": {"lr": 1e-2}},
    ("image", True): DP_RECIPE,
    ("text", True): DP_RECIPE,
}
DEFAULT_LR = {m: r["lr"] for m, r in RECIPES[("image", False)].items()}
TEXT_DEFAULT_LR = {m: r["lr"] for m, r in RECIPES[("text", False)].items()}


def dp_epochs(epsilon: float | None) -> int:
    """The default epochs of a DP-SGD run with target budget `epsilon` (None: σ is given instead): DP_LONG_EPOCHS
    from ε = DP_LONG_FROM_EPSILON on, else DP_EPOCHS (more steps add noise a small ε cannot pay for)."""
    return DP_LONG_EPOCHS if epsilon is not None and epsilon >= DP_LONG_FROM_EPSILON else DP_EPOCHS


def dp_lr(expected_batch_size: int | None) -> float:
    """The default DP-SGD rate for expected batch B: DP_RECIPE's rate from B = DP_FULL_LR_BATCH on, and
    (B / DP_FULL_LR_BATCH)^DP_LR_EXPONENT of it below (a step's noise, lr·σC/B per coordinate, must shrink with B;
    the exponent fits the validated optima, see the comment above DP_RECIPE)."""
    full = DP_RECIPE["taft"]["lr"]
    if expected_batch_size is None:
        return full
    return full * min(1.0, expected_batch_size / DP_FULL_LR_BATCH) ** DP_LR_EXPONENT


def recipe(method: str, text: bool = False, private: bool = False, epsilon: float | None = None,
           batch_size: int | None = None) -> dict[str, Any]:
    """The default settings of `method` for an image (ViT) or text (BERT) backbone, ordinary or DP-SGD training
    (`private`, with target budget `epsilon` or None, expected batch `batch_size` when known): lr, optimizer,
    warmup, head_lr (None: the same as lr), epochs."""
    row = dict(RECIPES[("text" if text else "image", private)][method])
    if private:
        row["lr"] = dp_lr(batch_size)
    epochs = dp_epochs(epsilon) if private else DEFAULT_EPOCHS
    return {"optimizer": "adamw", "warmup": 0.0, "head_lr": None, "epochs": epochs, **row}


@dataclass(frozen=True)
class TrainConfig:
    """How to train a model (the method, k, pooling and base head are the model's: `taft.spec.ModelSpec`). JSON
    round trip: `TrainConfig.from_json(cfg.to_json()) == cfg`.

    loss: "mse" (rescaled squared loss, mean over batch and classes of (logits − κ·onehot)²) or "ce".
    kappa: κ of the rescaled squared loss (ignored by "ce").
    reg: λ of the proximity term λ‖θ − θ0‖² (θ0: Δw = 0 for taft, w0 for nlft, the initial head for probe).
    lr, head_lr, optimizer, warmup, epochs: None means the default `recipe` of the model's method for its backbone
        kind and for ordinary or DP training, filled in by `resolved(...)` (which `fit`, the loops and stores call).
    lr: the learning rate.
    head_lr: the head's learning rate (taft: Δw_head, nlft: the head weights); None after `resolved`: `lr`. Not
        for probes (their `lr` is the head's).
    optimizer: "adamw" (weight_decay = 0) or "sgd" (with `momentum`).
    warmup: the fraction of all steps over which the rate rises linearly from lr/W to lr (W warm-up steps),
        before the schedule; 0: none.
    schedule: per-step "cosine" (from lr after the warm-up to 0 at the last step), "step" (×0.1 at 50 % and
        75 % of the steps) or "constant".
    batch_size, epochs: as usual (epochs default: 10; DP-SGD `dp_epochs`); the last batch of an epoch may be short.
    min_steps: at least this many optimizer steps: `epochs` is raised to ⌈min_steps / steps per epoch⌉ when
        that is more (`epochs_for(n)`), so small data sets (and small shards) are not under-trained.
    seed: data order (a seeded permutation per epoch), and the augmentation's draws.
    augment: "none", "flip" or "crop-flip" (`taft.data.augment`): images only, and only on streamed trunk
        features (`fit(..., features="stream")`); each view is seeded by (seed, epoch, example id). Evaluation
        never augments.
    """

    loss: str = "mse"
    kappa: float = DEFAULT_KAPPA
    reg: float = 0.0
    lr: float | None = None
    head_lr: float | None = None
    optimizer: str | None = None
    momentum: float = 0.9
    warmup: float | None = None
    schedule: str = "cosine"
    batch_size: int = 32
    epochs: int | None = None
    min_steps: int = 0
    seed: int = 0
    augment: str = "none"

    def __post_init__(self) -> None:
        check_choice("loss", self.loss, LOSSES)
        check_choice("augment", self.augment, AUGMENTS)
        check_choice("schedule", self.schedule, SCHEDULES)
        check_integer("batch_size", self.batch_size, minimum=1)
        if self.epochs is not None:
            check_integer("epochs", self.epochs, minimum=1)
        for name in ("seed", "min_steps"):
            check_integer(name, getattr(self, name), minimum=0)
        check_number("kappa", self.kappa, positive=True)
        check_number("reg", self.reg, positive=False)
        for name in ("lr", "head_lr"):
            if getattr(self, name) is not None:
                check_number(name, getattr(self, name), positive=True)
        if self.optimizer is not None:
            check_choice("optimizer", self.optimizer, OPTIMIZERS)
        check_number("momentum", self.momentum, positive=False)
        if self.warmup is not None:
            check_number("warmup", self.warmup, positive=False)
        if self.momentum >= 1 or (self.warmup or 0) >= 1:
            raise TaftError(f"momentum and warmup must be below 1, got momentum={self.momentum!r}, "
                            f"warmup={self.warmup!r}")

    @property
    def learning_rate(self) -> float:
        """`lr` of a resolved config."""
        if self.lr is None:
            raise TaftError("the learning rate is not set: resolve the config for its model first (resolved(...))")
        return float(self.lr)

    @property
    def head_learning_rate(self) -> float:
        """The head's rate: `head_lr`, else `learning_rate`."""
        return self.learning_rate if self.head_lr is None else float(self.head_lr)

    def epochs_for(self, n: int, batch_size: int | None = None) -> int:
        """The epochs a run on n examples trains: `epochs` (None: the ordinary default), or more to reach
        `min_steps` steps of ⌈n/B⌉ per epoch (B: `batch_size`, or the expected batch size of a DP run)."""
        per_epoch = math.ceil(n / (batch_size or self.batch_size))
        return max(self.epochs or DEFAULT_EPOCHS, math.ceil(self.min_steps / per_epoch))

    def resolved(self, method: str, text: bool = False, private: bool = False, n: int | None = None,
                 batch_size: int | None = None, epsilon: float | None = None) -> TrainConfig:
        """A copy with the defaults filled in (what a run records): `lr`, `head_lr`, `optimizer`, `warmup` and
        `epochs` from the `recipe` of `method` for an image or a text backbone, ordinary or DP-SGD (`private`,
        target budget `epsilon`, expected batch `batch_size`: the DP rate follows it, `dp_lr`) training; with `n`
        (the number of training examples), `epochs` raised to `epochs_for(n, batch_size)`."""
        check_choice("method", method, METHODS)
        if self.head_lr is not None and method == "probe":
            raise TaftError("head_lr applies to methods taft and nlft (a probe trains only the head: use lr)")
        defaults = recipe(method, text, private, epsilon, batch_size)
        lr = defaults["lr"] if self.lr is None else float(self.lr)
        head_lr = defaults["head_lr"] if self.head_lr is None and method != "probe" else self.head_lr
        filled = replace(self, lr=lr, head_lr=head_lr, optimizer=self.optimizer or defaults["optimizer"],
                         warmup=defaults["warmup"] if self.warmup is None else self.warmup,
                         epochs=self.epochs or defaults["epochs"])
        return filled if n is None else replace(filled, epochs=filled.epochs_for(n, batch_size))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TrainConfig:
        """The recipe of `d`; a recorded run's dict (`run_record`) also holds the model's keys, which are skipped."""
        if not isinstance(d, Mapping):
            raise TaftError(f"a training config must be a JSON object, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known - set(SPEC_KEYS))
        if unknown:
            raise TaftError(f"unknown training config keys {unknown}; known: {sorted(known)}")
        if d.get("lr") is not None and "optimizer" not in d:  # recorded before the recipe options: keep that recipe
            d = {**d, "optimizer": "adamw", "warmup": 0.0,
                 "head_lr": None if d.get("method") == "probe" else d["lr"]}
        return cls(**{k: v for k, v in d.items() if k in known})

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> TrainConfig:
        try:
            d = json.loads(text)
        except ValueError as e:
            raise TaftError(f"training config is not valid JSON: {e}") from e
        return cls.from_dict(d)


def run_record(spec: ModelSpec, config: TrainConfig) -> dict[str, Any]:
    """What a run records as its training config (config.json, checkpoints' `train_config`, store manifests): the
    model's spec and the recipe in one dict."""
    return {**spec.to_dict(), **config.to_dict()}
