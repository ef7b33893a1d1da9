"""Exceptions raised by taft. Every error a user can cause is a `TaftError` with a message naming the problem."""


class TaftError(Exception):
    """Base class: a problem with the user's input, assets or files (not a bug in taft). `arguments` names the
    library parameters the message is about (e.g. ("device",)), so that the command line can name its options."""

    def __init__(self, message: str = "", *, arguments: tuple[str, ...] = ()):
        super().__init__(message)
        self.arguments = tuple(arguments)


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
