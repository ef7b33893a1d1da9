"""Exceptions raised by taft. Every error a user can cause is a `TaftError` with a message naming the problem."""


class TaftError(Exception):
    """Base class: a problem with the user's input, assets or files (not a bug in taft)."""


class AssetMissingError(TaftError):
    """A bundled asset package is not installed; the message says exactly what to install."""


class FingerprintMismatchError(TaftError):
    """A Δw (or checkpoint) was made for a different base model than the one it is loaded into."""
