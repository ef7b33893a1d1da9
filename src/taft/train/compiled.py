"""Optional `torch.compile` of the tail's training forward (its backward is compiled with it), with eager fallback.

On a GPU at small batches the tangent step is bound by kernel launches; compiling fuses its elementwise work into
fewer kernels. Eager is the default and the reference: a compiled step computes the same function (tests check
compiled == eager). When compiling is not possible here (no compiler, an unsupported operation, an old torch), the
first call warns once, in one line, and the step runs eagerly from then on. Compiling costs time once per input
shape (about a minute per graph with the inductor backend on a 2-core CPU; the last short batch of an epoch is
another shape), so it pays off only for long runs.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any


class CompiledStep:
    """`fn` compiled with `torch.compile(fn, backend=backend)` when `enabled`, else `fn` itself; falls back to `fn`
    (warning once) if compiling or running the compiled function fails."""

    def __init__(self, fn: Callable[..., Any], enabled: bool = False, backend: str | Callable = "inductor"):
        self.eager = fn
        self.compiled: Callable[..., Any] | None = None
        self.failure: str | None = None
        if enabled:
            try:
                import torch

                self.compiled = torch.compile(fn, backend=backend)
            except Exception as e:  # noqa: BLE001 - any reason compile is unavailable means: run eagerly
                self._fall_back(e)

    @property
    def active(self) -> bool:
        """Whether calls currently go to the compiled function."""
        return self.compiled is not None

    def _fall_back(self, e: BaseException) -> None:
        self.compiled = None
        root = e
        while getattr(root, "inner_exception", None) is not None or root.__cause__ is not None:
            root = getattr(root, "inner_exception", None) or root.__cause__  # the compiler's own error
        text = str(root).strip().splitlines()
        self.failure = f"{type(e).__name__}: {type(root).__name__}: {text[0] if text else ''}"
        warnings.warn(f"torch.compile of the training step is not available here ({self.failure}); running eagerly",
                      RuntimeWarning, stacklevel=3)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.compiled is not None:
            try:
                return self.compiled(*args, **kwargs)
            except Exception as e:  # noqa: BLE001 - compile errors surface at the first call; eager re-raises
                self._fall_back(e)  # real input errors, since it runs the same function
        return self.eager(*args, **kwargs)
