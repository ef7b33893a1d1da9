"""DP-SGD for the three methods (taft, nlft, probe) on cached trunk features: the gradient step that the training
loop (`taft.train.loop.train_loop`) plugs in for private runs, and its parts.

One step (`DPStep`): a Poisson-sampled batch (each training example joins independently with probability q, so the batch
size varies and may be 0); per-example gradients g_i of the trainable tensors (taft: Δw; nlft: the tail weights;
probe: the head); each clipped to global L2 norm C, g_i · min(1, C/‖g_i‖); summed; Gaussian noise N(0, σ²C²) added
to every coordinate; divided by the expected batch size B = q·n; then the gradient of the (data-independent)
proximity term λ‖θ − θ0‖² is added and the optimizer steps (the loop applies the configured schedule over the
planned steps). `PoissonSampler` draws the batches; `taft.train.make_private` wraps both for a user's own loop.

The clipped sum Σ_i clip_C(g_i) comes from `taft.privacy.ghost` (`via="ghost"`, the default): per-example norms and
the weighted sum from each layer's inputs and output gradients, without forming per-example gradients; about the
cost of one ordinary step. `via="vmap"` forms them (the reference, and the fallback for layers ghost clipping does
not cover), as `per_example_gradients` does.

Per-example gradients: `torch.func.vmap` over `torch.func.grad` of a `torch.func.functional_call` of the method's
trainable module, in chunks of `chunk_size` examples (memory ∝ chunk_size × parameters). For taft this works
through the tangent layers: their tangent path runs under `torch.no_grad()` (respected by torch.func.grad), and
the primal's weights w0 + (Δw − sg(Δw)) carry the gradient J(x; w0)ᵀ r (`at_base`: the wrapped Δw tensors report
`requires_grad` under torch.func.grad, checked by the tests against a per-example loop). Attention runs in its
written-out form ("manual") on this path: identical math to fused SDPA, which has no vmap batching rule and would
fall back to a per-example loop. With CLS pooling the tail's last block is pruned to token 0 here too (exact).
"""

from __future__ import annotations

import itertools
import math
import secrets
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext

import torch
from torch import nn
from torch.func import functional_call, grad_and_value, vmap

from taft.errors import NonFiniteError, TaftError
from taft.losses import DEFAULT_KAPPA, example_loss, loss_targets
from taft.model import Classifier
from taft.privacy import ghost
from taft.privacy.config import DEFAULT_CHUNK


@contextmanager
def manual_attention(module: nn.Module) -> Iterator[None]:
    """Temporarily switch every attention in `module` from fused SDPA to the written-out softmax (same math)."""
    changed = [m for m in module.modules() if getattr(m, "impl", None) == "sdpa"]
    for m in changed:
        m.impl = "manual"
    try:
        yield
    finally:
        for m in changed:
            m.impl = "sdpa"


def _grad_fn(classifier: Classifier, loss: str) -> tuple[Callable, dict[str, torch.Tensor], str]:
    """(fn(params, x, target, mask) → per-example (grads, losses), params, prefix); `mask` (b, N) or None."""
    module, prefix = classifier.trainable_module()

    def one_loss(params: dict[str, torch.Tensor], x: torch.Tensor, target: torch.Tensor,
                 mask: torch.Tensor | None) -> torch.Tensor:
        args = (x.unsqueeze(0),) if mask is None else (x.unsqueeze(0), mask.unsqueeze(0))
        return example_loss(functional_call(module, params, args)[0], target, loss)

    def fn(params: dict[str, torch.Tensor], x: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None):
        in_dims = (None, 0, 0, None if mask is None else 0)
        return vmap(grad_and_value(one_loss), in_dims=in_dims)(params, x, target, mask)

    params = {name[len(prefix):]: p.detach() for name, p in classifier.tail.named_parameters()}
    return fn, params, prefix


@contextmanager
def _per_example_context(classifier: Classifier) -> Iterator[None]:
    with manual_attention(classifier.tail), warnings.catch_warnings():
        # in-place tangent updates (addmm_, addcmul_) have no vmap batching rule yet: PyTorch loops over them
        warnings.filterwarnings("ignore", message=".*There is a performance drop because we have not yet "
                                                  "implemented the batching rule.*")
        yield


def _chunks(inputs: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor | None, size: int):
    """(inputs, targets, mask) chunks of at most `size` examples; none for an empty batch (Poisson batches may
    be empty). `mask` (text features) is cut like the inputs; a probe's pooled inputs need none."""
    if not len(inputs):
        return iter(())
    masks = mask.split(size) if mask is not None else [None] * math.ceil(len(inputs) / size)
    return zip(inputs.split(size), targets.split(size), masks)


def per_example_gradients(classifier: Classifier, inputs: torch.Tensor, labels: torch.Tensor, *,
                          mask: torch.Tensor | None = None, loss: str = "mse", kappa: float = DEFAULT_KAPPA,
                          chunk_size: int | None = None) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """({name: (b, *shape)} per-example gradients of the per-example training loss (no regularizer) with respect
    to every trainable tensor of `classifier.tail` (names as in `tail.named_parameters()`), per-example losses
    (b,)). `inputs` are `Classifier.train_inputs` (trunk features with their `mask`; pooled features for a
    probe)."""
    fn, params, prefix = _grad_fn(classifier, loss)
    targets = loss_targets(labels.to(inputs.device), classifier.num_classes, loss, kappa, inputs.dtype)
    chunk = chunk_size or len(inputs) or 1
    grads: list[dict[str, torch.Tensor]] = []
    losses = []
    with _per_example_context(classifier):
        for x, t, m in _chunks(inputs, targets, mask, chunk):
            g, value = fn(params, x, t, m)
            grads.append(g)
            losses.append(value)
    if not grads:
        shapes = {name: p.shape for name, p in params.items()}
        return ({prefix + n: inputs.new_zeros((0, *s)) for n, s in shapes.items()}, inputs.new_zeros(0))
    return {prefix + n: torch.cat([g[n] for g in grads]) for n in params}, torch.cat(losses)


def clip_factors(grads: dict[str, torch.Tensor], clip: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(min(1, C/‖g_i‖), ‖g_i‖) per example, with ‖·‖ the L2 norm over all tensors of the example together."""
    norms = torch.sqrt(sum(g.flatten(1).pow(2).sum(1) for g in grads.values()))
    return (clip / norms).clamp(max=1.0), norms  # ‖g‖ = 0 gives C/0 = inf → 1


VIAS = ("ghost", "vmap")


def clipped_sum(classifier: Classifier, inputs: torch.Tensor, labels: torch.Tensor, clip: float, *,
                mask: torch.Tensor | None = None, loss: str = "mse", kappa: float = DEFAULT_KAPPA,
                chunk_size: int = DEFAULT_CHUNK,
                via: str = "ghost") -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """(Σ_i clip_C(g_i) per trainable tensor, per-example losses, per-example gradient norms before clipping),
    computed `chunk_size` examples at a time: by ghost clipping (`taft.privacy.ghost`), or with `via="vmap"` (or
    for a layer ghost clipping does not cover) from the per-example gradients of each chunk, formed at once."""
    if via not in VIAS:
        raise TaftError(f"via must be one of {VIAS}, got {via!r}")
    module, _ = classifier.trainable_module()
    layers = ghost.trained_layers(module) if via == "ghost" else None
    fn, params, prefix = _grad_fn(classifier, loss)
    targets = loss_targets(labels.to(inputs.device), classifier.num_classes, loss, kappa, inputs.dtype)
    total = {n: torch.zeros_like(p) for n, p in params.items()}
    losses, norms = [], []
    with _per_example_context(classifier) if layers is None else nullcontext():
        for x, t, m in _chunks(inputs, targets, mask, chunk_size):
            if layers is not None:
                sums, value, norm = ghost.clipped_sum_chunk(
                    module, layers, (x,) if m is None else (x, m), t,
                    lambda z, target: example_loss(z, target, loss), clip, params)
            else:
                g, value = fn(params, x, t, m)
                factor, norm = clip_factors(g, clip)
                sums = {n: torch.tensordot(factor.to(g[n].dtype), g[n], dims=1) for n in total}
            for n in total:
                total[n].add_(sums[n])
            losses.append(value)
            norms.append(norm)
    empty = inputs.new_zeros(0)
    return ({prefix + n: v for n, v in total.items()}, torch.cat(losses) if losses else empty,
            torch.cat(norms) if norms else empty)


def noisy_gradient(classifier: Classifier, inputs: torch.Tensor, labels: torch.Tensor, *, clip: float,
                   noise_multiplier: float, expected_batch_size: int, generator: torch.Generator | None,
                   mask: torch.Tensor | None = None, loss: str = "mse", kappa: float = DEFAULT_KAPPA,
                   chunk_size: int = DEFAULT_CHUNK, via: str = "ghost") -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The DP-SGD gradient of one batch, (Σ_i clip_C(g_i) + N(0, σ²C² I)) / B, per trainable tensor (names as in
    `classifier.tail.named_parameters()`), and the per-example losses. σ = 0 adds no noise. `via`: see
    `clipped_sum`."""
    total, losses, _ = clipped_sum(classifier, inputs, labels, clip, mask=mask, loss=loss, kappa=kappa,
                                   chunk_size=chunk_size, via=via)
    for g in total.values():
        if noise_multiplier > 0:
            g.add_(torch.randn(g.shape, generator=generator, device=g.device, dtype=g.dtype),
                   alpha=noise_multiplier * clip)
        g.div_(expected_batch_size)
    return total, losses


def poisson_batches(n: int, sample_rate: float, steps: int | None,
                    generator: torch.Generator) -> Iterator[torch.Tensor]:
    """`steps` batches (endless for None) of indices into range(n): each index joins each batch independently with
    probability q."""
    for _ in range(steps) if steps is not None else itertools.count():
        yield torch.nonzero(torch.rand(n, generator=generator) < sample_rate).squeeze(1)


def dp_generators(seed: int | None, device: torch.device) -> tuple[torch.Generator, torch.Generator]:
    """(sampling generator on the CPU seeded `seed`, noise generator on `device` seeded `seed` + 1); a fresh random
    seed, stored nowhere, when `seed` is None."""
    seed = seed if seed is not None else secrets.randbits(62)
    return torch.Generator().manual_seed(seed), torch.Generator(device=device).manual_seed(seed + 1)


class PoissonSampler:
    """The index batches of DP-SGD, one epoch at a time: `steps_per_epoch` Poisson batches of range(n) at rate q
    (`poisson_batches`), or, for checks, the next batches of a fixed schedule `batches` (the guarantee and the
    ledger assume Poisson sampling)."""

    def __init__(self, n: int, sample_rate: float, steps_per_epoch: int, generator: torch.Generator,
                 batches: Sequence[torch.Tensor] | None = None):
        self.n, self.steps_per_epoch = n, steps_per_epoch
        self.generator = generator
        self._draws = iter(batches) if batches is not None else poisson_batches(n, sample_rate, None, generator)

    def epoch(self) -> list[torch.Tensor]:
        return [next(self._draws) for _ in range(self.steps_per_epoch)]


class DPStep:
    """One DP-SGD update of `model`'s trainable tensors by `optimizer` (built over them): the noisy gradient
    (Σ_i clip_C(g_i) + N(0, σ²C² I)) / B of a batch (`noisy_gradient`), plus the gradient 2λ(θ − θ0) of the
    data-independent proximity term when `reg` = λ > 0 (θ0: the weights at construction), then `optimizer.step()`.

    Calling it, `step(x, y, mask) → (Σ loss, batch size)`, is that update (the losses are diagnostics on private
    data, outside the guarantee), in a user's loop and in `taft.train.loop.train_loop`. Raises `NonFiniteError`
    when the noisy gradient is not finite (a function of the released values: the check spends no privacy)."""

    private = True

    def __init__(self, model: Classifier, optimizer: torch.optim.Optimizer, *, clip: float, noise_multiplier: float,
                 expected_batch_size: int, generator: torch.Generator | None, loss: str = "mse",
                 kappa: float = DEFAULT_KAPPA, chunk_size: int = DEFAULT_CHUNK, reg: float = 0.0):
        self.model, self.optimizer = model, optimizer
        self.clip, self.noise_multiplier, self.expected_batch_size = float(clip), noise_multiplier, expected_batch_size
        self.generator, self.loss, self.kappa, self.chunk_size, self.reg = generator, loss, kappa, chunk_size, reg
        self.params = dict(model.tail.named_parameters())
        self.start = {n: p.detach().clone() for n, p in self.params.items()} if reg > 0 else {}

    def backward(self, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Set every trainable tensor's `.grad` to its DP-SGD gradient for the batch (x = `train_inputs`, labels
        y, text mask); returns the per-example losses (diagnostics on private data, outside the guarantee)."""
        grads, losses = noisy_gradient(self.model, x, y, mask=mask, clip=self.clip,
                                       noise_multiplier=self.noise_multiplier,
                                       expected_batch_size=self.expected_batch_size, generator=self.generator,
                                       loss=self.loss, kappa=self.kappa, chunk_size=self.chunk_size)
        if not bool(torch.stack([torch.isfinite(g).all() for g in grads.values()]).all()):
            bad = next(n for n, g in grads.items() if not torch.isfinite(g).all())
            raise NonFiniteError(f"the noisy gradient of {bad}")
        for name, p in self.params.items():
            if self.reg > 0:  # the proximity term does not depend on the data: no clipping, no noise
                grads[name].add_(p.detach() - self.start[name], alpha=2 * self.reg)
            p.grad = grads[name]
        return losses

    def __call__(self, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[float, int]:
        """`backward`, then `optimizer.step()`; (the sum of the batch's example losses, its size)."""
        losses = self.backward(x, y, mask)
        self.optimizer.step()
        return float(losses.sum()), len(y)
