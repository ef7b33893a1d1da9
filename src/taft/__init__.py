"""taft: Tangent Attention Fine-Tuning.

f_lin(x; Δw) = f(x; w0) + J(x; w0) Δw for the last k blocks of a pretrained transformer, computed in one forward
pass by hand-written tangent layers. See README.md.
"""

from taft.backbones import Backbone, load_backbone
from taft.errors import AssetMissingError, FingerprintMismatchError, TaftError
from taft.model import Classifier, TangentModel
from taft.version import __version__

__all__ = ["AssetMissingError", "Backbone", "Classifier", "FingerprintMismatchError", "TaftError", "TangentModel",
           "load_backbone", "__version__"]
