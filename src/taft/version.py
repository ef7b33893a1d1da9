"""The package version (read by checkpoints and ledgers without importing the whole package)."""

__version__ = "0.1.0"
