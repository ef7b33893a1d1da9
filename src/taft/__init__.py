"""taft: Tangent Attention Fine-Tuning.

f_lin(x; Δw) = f(x; w0) + J(x; w0) Δw for the last k blocks of a pretrained transformer, computed in one forward
pass by hand-written tangent layers. See README.md.

    import taft
    backbone = taft.load_backbone("dinov2-vits14")
    model = taft.Classifier(backbone, ["cat", "dog", "ship"], k=1, method="taft")
    train = model.cache_features(taft.data.image_folder("my_images/train"))
    result = taft.fit(model, train, taft.TrainConfig(epochs=10), run_dir="runs/mine")

The training names (`fit`, `evaluate`, `TrainConfig`, `Compute`, `FeatureSource`, `make_private`), the store's
(`ModelStore`, `Execution`) and the subpackages `data`, `privacy` and `store` load on first use, so that
`import taft.model` stays light.
"""

import importlib
from typing import Any

from taft.backbones import Backbone, load_backbone
from taft.errors import AssetMissingError, FingerprintMismatchError, TaftError
from taft.model import Classifier, TangentModel, load_checkpoint
from taft.spec import ModelSpec
from taft.version import __version__

LAZY = {"fit": "taft.train", "evaluate": "taft.train", "TrainConfig": "taft.train", "Compute": "taft.train",
        "FeatureSource": "taft.train",
        "make_private": "taft.train", "data": "taft.data", "privacy": "taft.privacy", "store": "taft.store",
        "ModelStore": "taft.store", "Execution": "taft.parallel"}


def __getattr__(name: str) -> Any:
    if name not in LAZY:
        raise AttributeError(f"module 'taft' has no attribute {name!r}")
    module = importlib.import_module(LAZY[name])
    return module if module.__name__ == f"taft.{name}" else getattr(module, name)


__all__ = ["AssetMissingError", "Backbone", "Classifier", "Compute", "Execution", "FeatureSource",
           "FingerprintMismatchError", "ModelSpec", "ModelStore", "TaftError", "TangentModel", "TrainConfig", "__version__", "data", "evaluate", "fit", "load_backbone",
           "load_checkpoint", "make_private", "privacy", "store"]
