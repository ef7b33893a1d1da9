"""What a model *is*, apart from its weights: the method, k, pooling and how the base head w0_head is made.

- methods: "taft" (the linearized tail f_lin(h; Δw) = f(h; w0) + J(h; w0) Δw, trained: Δw), "nlft" (the same tail
  trained non-linearly), "probe" (the head alone, on the frozen tail's pooled features). `LINEAR_METHODS` are
  linear in what they train, so models trained apart compose exactly.
- head_init: "random" (w0_head seeded by `head_seed`) or "probe" (w0_head is a linear probe fitted on the training
  data before training; taft and nlft only).

A checkpoint's `train_config` metadata records these fields beside the training recipe (`TrainConfig`), under the
same keys (`method`, `tangent_blocks`, `pooling`, `head_seed`, `head_init`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

from taft.errors import TaftError
from taft.validate import check_choice, check_integer

METHODS = ("taft", "nlft", "probe")
LINEAR_METHODS = ("taft", "probe")
POOLINGS = ("cls", "mean")
HEAD_INITS = ("random", "probe")


def default_pooling(text: bool) -> str:
    """The pooling a model gets unless told: "mean" for a text (BERT) backbone, "cls" for an image (ViT) one."""
    return "mean" if text else "cls"


@dataclass(frozen=True)
class ModelSpec:
    """method, tangent_blocks (k: the last k blocks form the tail, with the final norm and head), pooling ("cls":
    token 0; "mean"), head_seed (seeds the random w0_head) and head_init (see the module doc)."""

    method: str = "taft"
    tangent_blocks: int = 1
    pooling: str = "cls"
    head_seed: int = 0
    head_init: str = "random"

    def __post_init__(self) -> None:
        check_choice("method", self.method, METHODS)
        check_choice("pooling", self.pooling, POOLINGS)
        check_choice("head_init", self.head_init, HEAD_INITS)
        check_integer("tangent_blocks", self.tangent_blocks, minimum=1)
        check_integer("head_seed", self.head_seed, minimum=0)
        if self.head_init == "probe" and self.method == "probe":
            raise TaftError("head_init='probe' applies to methods taft and nlft (a probe starts from the random "
                            "head)")

    @property
    def linear(self) -> bool:
        """Whether the model is linear in what it trains (its trained models compose exactly)."""
        return self.method in LINEAR_METHODS

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ModelSpec:
        """The spec recorded in `d` (a recorded training config: only this class's keys are read)."""
        if not isinstance(d, Mapping):
            raise TaftError(f"a recorded training config must be a JSON object, got {type(d).__name__}")
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})


SPEC_KEYS = tuple(f.name for f in fields(ModelSpec))
