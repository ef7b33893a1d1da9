"""Exceptions raised by taft. Every error a user can cause is a `TaftError` with a message naming the problem."""


class TaftError(Exception):
    """Base class: a problem with the user's input, assets or files (not a bug in taft)."""


class AssetMissingError(TaftError):
    """A bundled asset package is not installed; the message says exactly what to install."""


class FingerprintMismatchError(TaftError):
    """A Δw (or checkpoint) was made for a different base model than the one it is loaded into."""


class NonFiniteError(TaftError):
    """A training quantity (a batch loss, a noisy gradient, a trained weight) is NaN or infinite; `what` names it
    and `value` is its value (NaN for a tensor). The training loop turns it into a `DivergedError`."""

    def __init__(self, what: str, value: float = float("nan")):
        super().__init__(f"{what} is {value}")
        self.what, self.value = what, value


class DivergedError(TaftError):
    """Training diverged (a non-finite loss, gradient or weight); the message suggests a lower learning rate."""
