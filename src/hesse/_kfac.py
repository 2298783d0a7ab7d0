r"""Kronecker-factored curvature: KFAC and eigenvalue-corrected KFAC (EKFAC).

For a layer $z = W a + b$ (``nn.Linear`` over any leading dimensions, or ``nn.Conv2d`` seen
through its unfolded patches), KFAC approximates the layer's block of the GGN/Fisher by a
Kronecker product $G \otimes A$ of two small matrices:

- $A = \frac{1}{N} \sum_n \frac{1}{T} \sum_t a_{nt} a_{nt}^\top$, the input covariance over
  the ``N`` samples and ``T`` positions at which the weight is shared (``kfac_approx="expand"``)
  or of the positions' mean $\bar a_n$ (``"reduce"``, Eschenhagen et al. 2023); with
  ``separate_weight_and_bias=False`` the input carries a homogeneous coordinate 1 for the bias;
- $G = \sum_b w_b \sum_{n \in b} \sum_c g_{nc} g_{nc}^\top$, the covariance of the output
  gradients $g_{nc} = J_{z_n}^\top s_{nc}$ backpropagated from the columns $s_{nc}$ of a
  factor of the loss Hessian in the model's outputs (summed over positions for ``"reduce"``).
  $w_b = B_b / N$ for a mean-reduced loss and 1 for a sum, as for hesse's other operators.

The scaling follows curvlinops' ``KFACLinearOperator`` exactly, so the two agree to round-off.
The matrix is block-diagonal over layers (and over weight and bias unless they are joint);
everything else (products, ``diagonal``, ``trace``, ``logdet``, the damped inverse) is computed
from the factors and cached eigendecompositions, never from an ``N x N`` matrix.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

from hesse._data import Batch, Dataset, as_dataset, model_fits
from hesse._distributed import agree_on_parameters, resolve_shard
from hesse._functional import criterion_loss, evaluate
from hesse._layers import Record, _batched_grad, recording
from hesse._layout import ParamLayout, Params
from hesse._memory import check_dense_fits
from hesse._operators import _reduction
from hesse._protocol import LayoutOperator
from hesse._state import model_scope
from hesse._validate import Seed, check_criterion, check_finite, check_model, check_seed, integer

__all__ = ["EKFACOperator", "KFACInverse", "KFACOperator"]

_FISHER_TYPES = ("type-2", "mc", "empirical", "forward-only")
_APPROXES = ("expand", "reduce")
_ENTRIES = 1 << 24  # per-sample gradient entries held at once by the eigenvalue correction


# -- structure: which layers, which parameters, which rows ------------------------------------


@dataclass
class _Site:
    """A supported layer with selected parameters (``weight``/``bias``: layout names or None)."""

    path: str
    module: nn.Module
    weight: str | None
    bias: str | None
    joint: bool
    d_out: int
    d_in: int  # per output: in_features, or C_in * k1 * k2 for a convolution


@dataclass
class _Block:
    """One Kronecker block ``G ⊗ A`` over some rows of the flat parameter vector.

    ``parts`` are ``(slice, width)``: the block's ``(d_out, d_a, K)`` operand is the
    concatenation along dim 1 of ``V[slice].reshape(d_out, width, K)``.
    ``kind``: ``"weight"`` (A is the input covariance), ``"joint"`` (with the homogeneous
    coordinate) or ``"bias"`` (``A = [[1]]``).
    """

    site: _Site
    kind: str
    parts: list[tuple[slice, int]]

    @property
    def d_a(self) -> int:
        return sum(w for _, w in self.parts)

    @property
    def rows(self) -> int:
        return self.site.d_out * self.d_a


def _conv_padding(module: nn.Conv2d) -> tuple[int, int]:
    padding = module.padding
    if isinstance(padding, str):
        if padding == "valid":
            return (0, 0)
        pads = []
        for k, d in zip(module.kernel_size, module.dilation):
            total = d * (k - 1)
            if total % 2:
                raise ValueError(
                    f"model: {module!r} pads unequally on two sides (padding='same' with an "
                    "even kernel), which unfold cannot express; use explicit integer padding."
                )
            pads.append(total // 2)
        return (pads[0], pads[1])
    return (int(padding[0]), int(padding[1]))


def _sites(model: nn.Module, layout: ParamLayout, joint: bool) -> list[_Site]:
    """The supported layers owning the selected parameters; refuse any other selection."""
    named = dict(model.named_parameters(remove_duplicate=False))
    owners: dict[int, list[tuple[str, nn.Module, str]]] = {}
    for path, module in model.named_modules(remove_duplicate=False):
        for kind, p in module._parameters.items():
            if p is not None:
                owners.setdefault(id(p), []).append((path, module, kind))
    unsupported, tied = [], []
    found: dict[str, tuple[nn.Module, dict[str, str]]] = {}
    for name in layout.names:
        own = owners.get(id(named[name]), [])
        if len(own) > 1:
            tied.append(name)
            continue
        path, module, kind = own[0]
        if not isinstance(module, (nn.Linear, nn.Conv2d)) or kind not in ("weight", "bias"):
            unsupported.append(f"{name} ({type(module).__name__})")
            continue
        found.setdefault(path, (module, {}))[1][kind] = name
    if tied:
        raise ValueError(
            f"params: {', '.join(tied)} is shared by several modules (tied weights); KFAC "
            "needs each weight in one layer. Exclude it with params=[...]."
        )
    if unsupported:
        raise ValueError(
            f"params: KFAC supports the weights and biases of nn.Linear and nn.Conv2d only; "
            f"the selection holds {', '.join(unsupported)}. Select the supported layers' "
            "parameters with params=[...] (for example params=['fc1.*', 'fc2.*']), or use "
            "hesse.GGNOperator for the exact curvature of every parameter."
        )
    sites = []
    for path, (module, kinds) in found.items():
        if isinstance(module, nn.Conv2d):
            if module.groups != 1 or module.padding_mode != "zeros":
                raise ValueError(
                    f"model: {path or 'the model'} is {module!r}; KFAC supports nn.Conv2d "
                    "with groups=1 and padding_mode='zeros'. Exclude it with params=[...]."
                )
            _conv_padding(module)
            d_out = module.out_channels
            d_in = module.weight.shape[1:].numel()
        else:
            assert isinstance(module, nn.Linear)
            d_out, d_in = module.out_features, module.in_features
        weight, bias = kinds.get("weight"), kinds.get("bias")
        both = weight is not None and bias is not None
        sites.append(_Site(path, module, weight, bias, joint and both, d_out, d_in))
    return sites


def _blocks(sites: list[_Site], layout: ParamLayout) -> list[_Block]:
    blocks = []
    for site in sites:
        if site.joint:
            assert site.weight is not None and site.bias is not None
            parts = [(layout.slice(site.weight), site.d_in), (layout.slice(site.bias), 1)]
            blocks.append(_Block(site, "joint", parts))
            continue
        if site.weight is not None:
            blocks.append(_Block(site, "weight", [(layout.slice(site.weight), site.d_in)]))
        if site.bias is not None:
            blocks.append(_Block(site, "bias", [(layout.slice(site.bias), 1)]))
    return blocks


# -- the factor of the loss Hessian in the outputs ---------------------------------------------


def _check_criterion(criterion: Any) -> None:
    ok = (
        type(criterion) is nn.CrossEntropyLoss
        and criterion.weight is None
        and criterion.label_smoothing == 0
    ) or type(criterion) is nn.MSELoss
    if not ok or criterion.reduction not in ("mean", "sum"):
        raise ValueError(
            "criterion: KFAC needs the likelihood behind the loss, which hesse knows for "
            "nn.CrossEntropyLoss (class-index targets, no class weights or label smoothing) "
            "and nn.MSELoss, with reduction 'mean' or 'sum'; got "
            f"{criterion!r}. Use hesse.GGNOperator for other losses."
        )


def _check_output(criterion: Any, f: Any, target: Any) -> None:
    if not isinstance(f, Tensor) or not f.is_floating_point():
        raise TypeError(f"model: KFAC needs a floating-point tensor output, got {type(f)}.")
    if type(criterion) is nn.CrossEntropyLoss:
        if (
            f.ndim < 2
            or not isinstance(target, Tensor)
            or target.is_floating_point()
            or target.shape != (f.shape[0], *f.shape[2:])
        ):
            raise ValueError(
                "target: KFAC with nn.CrossEntropyLoss needs outputs (B, C, ...) and class "
                f"indices (B, ...), got outputs {tuple(f.shape)} and target "
                f"{tuple(target.shape) if isinstance(target, Tensor) else type(target)}."
            )
        if bool((target == criterion.ignore_index).any()):
            raise ValueError(
                f"target: holds ignore_index={criterion.ignore_index}; KFAC counts every "
                "target as a loss term. Drop those samples from the data."
            )
        # Type-2 and MC never read the labels; a wrong one is still a bug in the data, which
        # the loss (and the other fisher types) would refuse: named with its batch by
        # `model_fits`, as the loss's own IndexError is.
        if target.numel() and not (int(target.min()) >= 0 and int(target.max()) < f.shape[1]):
            bad = target[(target < 0) | (target >= f.shape[1])][0]
            raise IndexError(
                f"target class index {int(bad)} is out of range for {f.shape[1]} classes"
            )
    elif f.ndim < 2 or not isinstance(target, Tensor) or target.shape != f.shape:
        raise ValueError(
            "target: KFAC with nn.MSELoss needs outputs (B, ..., C) and a target of the same "
            f"shape, got outputs {tuple(f.shape)} and target "
            f"{tuple(target.shape) if isinstance(target, Tensor) else type(target)}."
        )


def _columns(
    criterion: Any,
    fisher_type: str,
    f: Tensor,
    target: Tensor,
    mc_samples: int,
    generator: torch.Generator | None,
) -> tuple[Tensor, float]:
    """Columns ``U`` ``(K, *f.shape)`` and a weight ``ω`` with ``ω Σ_k u_k u_kᵀ ≈ ∇²_f ℓ``.

    Computed in float32 or wider, returned in ``f``'s dtype; ``ω`` carries the loss's
    normalisation, so the columns stay of order one (no underflow in half precision).
    """
    wide = f.detach().to(torch.promote_types(f.dtype, torch.float32))
    mean = criterion.reduction == "mean"
    ce = type(criterion) is nn.CrossEntropyLoss
    terms = target.numel() if ce else wide[..., 0].numel()  # L: the loss terms of the batch
    classes = wide.shape[1] if ce else wide.shape[-1]
    if fisher_type == "type-2":
        if ce:
            p = torch.softmax(wide, dim=1)
            eye = torch.eye(classes, dtype=wide.dtype, device=wide.device)
            shape = (classes, 1, classes) + (1,) * (wide.ndim - 2)
            onehots = eye.reshape(shape)  # column c: e_c in dim 1 at every position
            u = (onehots - p[None]) * p.movedim(1, 0)[:, :, None].sqrt()
            omega = 1.0 / terms if mean else 1.0
        else:
            eye = torch.eye(classes, dtype=wide.dtype, device=wide.device)
            u = eye.reshape(classes, *(1,) * (wide.ndim - 1), classes).expand(-1, *wide.shape)
            omega = 2.0 / wide.numel() if mean else 2.0
    elif fisher_type == "mc":
        if ce:
            p = torch.softmax(wide, dim=1)
            flat = p.movedim(1, -1).reshape(-1, classes)
            labels = torch.multinomial(
                flat.cpu(), mc_samples, replacement=True, generator=generator
            )
            onehot = F.one_hot(labels.T.to(wide.device), classes).to(wide.dtype)  # (M, L, C)
            onehot = onehot.reshape(mc_samples, *p.movedim(1, -1).shape).movedim(-1, 2)
            u = p[None] - onehot
            omega = (1.0 / terms if mean else 1.0) / mc_samples
        else:
            noise = torch.randn((mc_samples, *wide.shape), generator=generator, dtype=wide.dtype)
            u = noise.to(wide.device)
            omega = (2.0 / wide.numel() if mean else 2.0) / mc_samples
    else:  # empirical: the gradient of the batch loss in the outputs, per loss term
        leaf = wide.requires_grad_()
        with torch.enable_grad():
            (g,) = torch.autograd.grad(criterion_loss(criterion, leaf, target), leaf)
        if mean:
            u = (g * terms)[None]
            omega = (1.0 if ce else float(classes)) / terms
        else:
            u, omega = g[None], 1.0
    return u.to(f.dtype), omega


def _by_term(criterion: Any, f: Tensor, u: Tensor) -> Iterator[Tensor]:
    """The type-2 columns ``(K, *f.shape)`` split into one column per class and position.

    A type-2 column ``c`` holds the loss Hessian's factor for class ``c`` at every position
    of a sample at once: right for KFAC's factors, whose rows are per position, but a
    per-sample gradient built from it (EKFAC's correction) would square the sum of several
    positions' terms, whose products are not in the loss Hessian (block-diagonal over
    positions). Column ``(c, t)`` keeps position ``t`` only; yielded in chunks of at most
    `_ENTRIES` entries. Without positions, ``u`` itself.
    """
    ce = type(criterion) is nn.CrossEntropyLoss
    positions = f.shape[2:] if ce else f.shape[1:-1]
    count = math.prod(positions)
    if count == 1:
        yield u
        return
    k = u.shape[0]
    step = max(1, _ENTRIES // max(k * f.numel(), 1))
    for lo in range(0, count, step):
        n = min(step, count - lo)
        rows = u.new_zeros(n, count)  # (n, T): position t alone
        rows[torch.arange(n), torch.arange(lo, lo + n)] = 1
        shape = (n, 1, 1, *positions) if ce else (n, 1, *positions, 1)
        yield (u[:, None] * rows.reshape(shape)).reshape(k * n, *f.shape)


# -- the operators -------------------------------------------------------------------------------


@dataclass
class _Factors:
    a: dict[str, Tensor] = field(default_factory=dict)  # by site path (weight selected)
    g: dict[str, Tensor] = field(default_factory=dict)  # by site path


class KFACOperator(LayoutOperator):
    r"""The KFAC approximation of the GGN/Fisher over a dataset, block-diagonal over layers.

    Each selected ``nn.Linear`` (inputs of any leading dimensions) or ``nn.Conv2d`` layer
    contributes a block $G \otimes A$ (rows in the order of ``weight.flatten()``): $A$ the
    covariance of its inputs (unfolded patches for a convolution), $G$ the covariance of the
    gradients in its outputs backpropagated from a factor of the loss Hessian. The arguments
    and the scaling follow curvlinops' ``KFACLinearOperator``, so the two give the same
    matrix; batches are weighted like hesse's other operators (``B_b / N`` for a mean loss,
    1 for a sum; unequal batches are exact).

    **Computed at one point.** The factors are computed once, at construction, from the
    model as it is then. A KFAC operator does *not* follow later changes as hesse's exact
    operators do, and it never answers for a model that has changed: every product and
    method first compares the model's parameters and buffers (objects and values), its
    modules and their hooks, and the criterion's reduction, class weights and label smoothing
    with those the factors came from, and raises after a training step, a ``.data`` edit, a
    replaced ``Parameter`` or module or a new hook. Call `refresh` (or build a new operator)
    after the model changes. Plain Python attributes read in ``forward`` (a scale, a config
    object) and the data are not compared (many models write attributes of their own on
    every forward pass; a pass over the data costs as much as `refresh`): after changing
    them, call `refresh`.

    The matrix is never formed: products, `diagonal`, `trace`, `logdet` and the damped
    `inverse` work on the factors and on their eigendecompositions, computed once and cached.
    Factors are accumulated in float32 for float16/bfloat16/float32 models (float64 for
    float64 ones); products take and return the parameters' dtype.

    Args:
        model: The module; evaluated in eval mode, its state restored afterwards.
        criterion: ``nn.CrossEntropyLoss`` (class-index targets, no class weights, label
            smoothing or ignored targets) or ``nn.MSELoss``, reduction ``"mean"`` or
            ``"sum"``. Outputs are ``(B, C, ...)`` for cross-entropy and ``(B, ..., C)``
            for MSE; every position is a loss term, as in curvlinops.
        data: One ``(inputs, target)`` batch, or a re-iterable of them (a list, a
            ``DataLoader``); read once per `refresh` (twice for EKFAC).
        fisher_type: ``"type-2"`` (the exact loss Hessian in the outputs through its
            symmetric factor: the GGN's KFAC), ``"mc"`` (``mc_samples`` labels drawn from
            the model's predictive distribution per sample), ``"empirical"`` (the observed
            labels' loss gradients) or ``"forward-only"`` ($G = I$).
        kfac_approx: ``"expand"`` or ``"reduce"``: how a weight shared over positions (a
            ``Linear`` over ``(B, T, d)``, a convolution) is treated (Eschenhagen et al.,
            2023). Both coincide without weight sharing.
        mc_samples: Labels drawn per sample for ``fisher_type="mc"``; must be 1 otherwise.
        separate_weight_and_bias: ``True``: one block for the weight and one for the bias.
            ``False``: one joint block, the inputs extended by a coordinate 1.
        params: The parameters (names, glob patterns or ``nn.Parameter`` objects); ``None``
            selects every parameter with ``requires_grad=True``. All must belong to
            ``nn.Linear`` or ``nn.Conv2d`` layers.
        seed: The labels' random draws for ``"mc"``: an int, a ``torch.Generator`` or
            ``None`` (from torch's global generator).
        reduction: How ``criterion`` reduces over a batch; default ``criterion.reduction``.
        process_group: With ``torch.distributed`` initialised, the group whose ranks each
            hold a shard of the data (default: the global group); the factors are summed
            over the ranks.
        distributed: ``None`` (default): data-parallel exactly when ``torch.distributed``
            is initialised; ``False``: this process's data only; ``True``: require it.

    Attributes:
        shape: ``(N, N)``.
        dtype: The parameters' dtype.
        device: The parameters' device.
        layout: The `ParamLayout` mapping rows to parameters.
        factors: ``{layer path: (A, G)}``; ``A`` is ``None`` when the layer's weight is not
            selected. ``A`` includes the homogeneous coordinate for a joint block.
        num_samples: Samples in the data (over all ranks) at the latest `refresh`.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``; ``criterion`` is not callable; ``data``
            is not ``(inputs, target)`` batches; an argument has the wrong type.
        ValueError: An unsupported criterion, ``fisher_type`` or ``kfac_approx``;
            ``mc_samples != 1`` without ``"mc"``; a selected parameter outside
            ``nn.Linear``/``nn.Conv2d`` (or shared by several modules); a layer that does not
            run exactly once per forward pass; outputs or targets of the wrong shape; NaN or
            infinite parameters; no samples.

    Examples:
        For one ``nn.Linear`` and MSE, KFAC with a joint weight and bias is the GGN:
        $2 \frac{1}{N}\sum_n \tilde x_n \tilde x_n^\top \otimes I$ (mean over the outputs'
        single column here), $\tilde x = (x, 1)$:

        >>> model = torch.nn.Linear(1, 1)
        >>> X, y = torch.tensor([[1.0], [3.0]]), torch.zeros(2, 1)
        >>> K = KFACOperator(model, torch.nn.MSELoss(), (X, y),
        ...                  separate_weight_and_bias=False)
        >>> K.to_dense()  # 2 * mean of [[x², x], [x, 1]]
        tensor([[10.,  4.],
                [ 4.,  2.]])
        >>> round(K.trace(), 6), round(K.logdet(), 6)  # det = 20 - 16 = 4
        (12.0, 1.386294)
    """

    _seen: _ModelPoint  # what the factors came from, set by `refresh`

    def __init__(
        self,
        model: nn.Module,
        criterion: Callable[..., Tensor],
        data: Any,
        *,
        fisher_type: Literal["type-2", "mc", "empirical", "forward-only"] = "type-2",
        kfac_approx: Literal["expand", "reduce"] = "expand",
        mc_samples: int = 1,
        separate_weight_and_bias: bool = True,
        params: Params = None,
        seed: Seed = None,
        reduction: Literal["mean", "sum"] | None = None,
        process_group: Any = None,
        distributed: bool | None = None,
    ) -> None:
        self.model = check_model(model)
        self.criterion = check_criterion(criterion)
        self.reduction = _reduction(criterion, reduction)
        _check_criterion(criterion)
        if fisher_type not in self._fisher_types():
            raise ValueError(
                f"fisher_type: expected one of {', '.join(map(repr, self._fisher_types()))}, "
                f"got {fisher_type!r}."
            )
        if kfac_approx not in _APPROXES:
            raise ValueError(f"kfac_approx: expected 'expand' or 'reduce', got {kfac_approx!r}.")
        self.mc_samples = integer("mc_samples", mc_samples)
        if fisher_type != "mc" and self.mc_samples != 1:
            raise ValueError(
                f"mc_samples: {mc_samples} labels per sample are drawn only with "
                "fisher_type='mc'; leave mc_samples=1."
            )
        if not isinstance(separate_weight_and_bias, bool):
            raise TypeError(
                "separate_weight_and_bias: expected True or False, got "
                f"{separate_weight_and_bias!r}."
            )
        self.fisher_type: str = fisher_type
        self.kfac_approx: str = kfac_approx
        self.separate_weight_and_bias = separate_weight_and_bias
        self.layout = ParamLayout.from_module(model, params)
        self._shard = resolve_shard(process_group, distributed, self.layout.device)
        # The factors' all-reduces need the same layers on every rank: checked before any.
        options = f"{fisher_type}|{kfac_approx}|{separate_weight_and_bias}"
        agree_on_parameters(self._shard, self.layout, 0, options)
        self._sites = _sites(model, self.layout, joint=not separate_weight_and_bias)
        self._blocks = _blocks(self._sites, self.layout)
        with torch.inference_mode(False):
            self.data: Dataset = as_dataset(data, allow_empty=self._shard.distributed)
        checked = check_seed(seed)
        if isinstance(checked, torch.Generator):
            checked = int(torch.randint(2**62, (), generator=checked))
        # Only "mc" draws: the others leave torch's global generator as it was.
        if checked is None:
            checked = self._shard.common_seed() if fisher_type == "mc" else 0
        self._seed: int = checked
        self._factor_dtype = torch.promote_types(self.layout.dtype, torch.float32)
        self._reduction_arg = reduction
        self.factors: dict[str, tuple[Tensor | None, Tensor]] = {}
        self.num_samples = 0
        self._generation = 0  # refreshes so far: a `KFACInverse` belongs to one of them
        self.refresh()

    @staticmethod
    def _fisher_types() -> tuple[str, ...]:
        return _FISHER_TYPES

    # -- what it is -------------------------------------------------------------------------

    # shape, dtype, device, shard, param_names: `LayoutOperator`

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(shape={self.shape}, fisher_type={self.fisher_type!r}, "
            f"kfac_approx={self.kfac_approx!r}, layers={len(self._sites)}, "
            f"samples={self.num_samples})"
        )

    # -- computing the factors ----------------------------------------------------------------

    def refresh(self) -> None:
        """Recompute the factors from the model and data as they are now.

        The factors answer for the model at the latest refresh (construction is the first);
        call this after the parameters change. Cached eigendecompositions are dropped, and
        inverses made before (`inverse`) refuse to be used.

        Raises:
            ValueError: A selected parameter is NaN or infinite, a layer does not run exactly
                once per forward pass, outputs or targets have the wrong shape or do not fit
                the model, or the data hold no samples.
        """
        with torch.inference_mode(False):
            _check_criterion(self.criterion)  # its attributes may have changed since
            self.reduction = _reduction(self.criterion, self._reduction_arg)
            self._refresh()
            # After the passes: a forward that updates a module's own cache is not a change.
            self._seen = _ModelPoint.of(self)
            self._generation += 1

    def _refresh(self) -> None:
        self._eig: dict[str, tuple[Tensor, Tensor]] = {}
        factors = _Factors()
        dtype, device = self._factor_dtype, self.device
        for site in self._sites:
            if site.weight is not None:
                width = site.d_in + (1 if site.joint else 0)
                factors.a[site.path] = torch.zeros(width, width, dtype=dtype, device=device)
            factors.g[site.path] = torch.zeros(site.d_out, site.d_out, dtype=dtype, device=device)

        def visit(batch: Batch, inputs: list[Tensor], grads: list[Tensor | None], w: float) -> None:
            for site, a, g in zip(self._sites, inputs, grads):
                if site.weight is not None:
                    positions = a.shape[1]
                    if self.kfac_approx == "expand":
                        flat = a.reshape(-1, a.shape[-1])
                        factors.a[site.path].addmm_(flat.T, flat, alpha=1.0 / positions)
                    else:
                        mean = a.mean(1)
                        factors.a[site.path].addmm_(mean.T, mean)
                if g is not None:
                    rows = g.reshape(-1, site.d_out) if self.kfac_approx == "expand" else g.sum(2)
                    rows = rows.reshape(-1, site.d_out)
                    factors.g[site.path].addmm_(rows.T, rows, alpha=w)

        count = self._pass(visit, backward=self.fisher_type != "forward-only")
        for site in self._sites:
            if site.weight is not None:
                factors.a[site.path] = self.shard.all_reduce(factors.a[site.path]).div_(count)
            if self.fisher_type == "forward-only":
                factors.g[site.path] = torch.eye(site.d_out, dtype=dtype, device=device)
            else:
                g = self.shard.all_reduce(factors.g[site.path])
                factors.g[site.path] = g.div_(count) if self.reduction == "mean" else g
        self.factors = {s.path: (factors.a.get(s.path), factors.g[s.path]) for s in self._sites}
        self.num_samples = count

    def _pass(
        self,
        visit: Callable[[Batch, list[Tensor], list[Tensor | None], float], None],
        *,
        backward: bool,
        by_term: bool = False,
        check_layers: bool = True,
    ) -> int:
        """One pass over the data, handing each batch to ``visit``; the samples, over all ranks.

        ``visit`` gets per batch each layer's inputs ``(B, T, d_a)`` and output gradients
        ``(K, B, T, d_out)`` (float32 or wider), and the weight ``w_b ω_b``. ``by_term``: the
        type-2 columns one loss term (position) each, in several calls per batch when the
        outputs have positions (`_by_term`); ``visit`` must then only sum over the columns.
        ``check_layers=False``: a pass of a refresh whose first pass made the layer-use check
        (`_check_used_in_layers_only`) on the same model.
        """
        generator = torch.Generator(device="cpu").manual_seed(
            (self._seed + self.shard.rank) % 2**63
        )
        count = 0
        with model_scope(self.model):
            named = dict(self.model.named_parameters(remove_duplicate=False))
            missing = [n for n in self.layout.names if n not in named]
            if missing:
                raise ValueError(
                    f"model: the parameter(s) {missing} this operator was built on no longer "
                    "exist; build a new operator for the changed model."
                )
            present = {id(m) for m in self.model.modules()}
            gone = [site.path for site in self._sites if id(site.module) not in present]
            if gone:
                raise ValueError(
                    f"model: the layer(s) {gone} this operator was built on are no longer part "
                    "of the model (replaced by other modules); build a new operator for the "
                    "changed model."
                )
            theta = torch.cat([named[n].detach().reshape(-1) for n in self.layout.names])
            check_finite(self.model, self.layout, theta)
            leaves = {n: named[n].detach().requires_grad_() for n in self.layout.names}
            for index, batch in enumerate(self.data):
                if not batch.size:
                    continue
                count += batch.size
                with (
                    model_fits("data", batch, self.dtype, where=f"batch {index}"),
                    torch.enable_grad(),
                    recording([site.module for site in self._sites]) as records,
                ):
                    f = evaluate(self.model, leaves, batch.inputs)
                    _check_output(self.criterion, f, batch.target)
                inputs = [self._inputs(s, r, batch.size) for s, r in zip(self._sites, records)]
                if check_layers and count == batch.size:  # the first batch with samples
                    self._check_used_in_layers_only(f, leaves, records, inputs)
                if not backward:
                    visit(batch, inputs, [None] * len(self._sites), 0.0)
                    continue
                assert batch.target is not None
                with model_fits("data", batch, self.dtype, where=f"batch {index}"):
                    u, omega = _columns(
                        self.criterion,
                        self.fisher_type,
                        f,
                        batch.target,
                        self.mc_samples,
                        generator,
                    )
                weight = omega * (batch.size if self.reduction == "mean" else 1.0)
                split = by_term and self.fisher_type == "type-2"
                for columns in _by_term(self.criterion, f, u) if split else [u]:
                    with torch.enable_grad():
                        got = _batched_grad(f, [r.z for r in records], columns)
                    grads: list[Tensor | None] = [
                        self._gradients(s, g) for s, g in zip(self._sites, got)
                    ]
                    visit(batch, inputs, grads, weight)
        if self.shard.distributed:
            count = int(self.shard.all_reduce(torch.tensor([float(count)], dtype=torch.float64)))
        if count == 0:
            raise ValueError("data: no samples; KFAC needs data to have curvature.")
        return count

    def _inputs(self, site: _Site, record: Record, batch: int) -> Tensor:
        """The layer's input as ``(B, T, d_a)`` in the factors' dtype (patches for a conv)."""
        a, z, module = record.a, record.z, site.module
        where = site.path or "the model"
        if record.calls != 1:
            raise ValueError(
                f"model: the layer {where} ran {record.calls} times in one forward pass; KFAC "
                "needs each selected layer to run exactly once per forward pass. Exclude it "
                "with params=[...]."
            )
        if (
            not isinstance(a, Tensor)
            or not isinstance(z, Tensor)
            or a.ndim < 2
            or a.shape[0] != batch
            or not z.requires_grad
        ):
            raise ValueError(
                f"model: the layer {where} must be called on one batched tensor (dim 0 the "
                "batch) and its output must depend on the selected parameters."
            )
        a = a.detach().to(self._factor_dtype)
        if isinstance(module, nn.Conv2d):
            if a.ndim != 4:
                raise ValueError(f"model: the convolution {where} needs (B, C, H, W) inputs.")
            patches = F.unfold(
                a,
                module.kernel_size,
                dilation=module.dilation,
                padding=_conv_padding(module),
                stride=module.stride,
            )
            a = patches.transpose(1, 2)  # (B, positions, C_in k1 k2)
        else:
            a = a.reshape(batch, -1, site.d_in)
        if site.joint:
            a = torch.cat([a, a.new_ones(*a.shape[:-1], 1)], dim=-1)
        return a

    def _check_used_in_layers_only(
        self, f: Tensor, leaves: dict[str, Tensor], records: list[Record], inputs: list[Tensor]
    ) -> None:
        """Refuse a selected parameter that the model also uses outside its layer.

        KFAC sees a weight only through its layer's inputs and output gradients; a second use
        in functional code (``F.linear(h, enc.weight.t())``, a tied decoder) would be dropped
        without a trace. One backward pass of a fixed random probe compares each parameter's
        gradient with the one its layer accounts for, ``Σ_t g_t a_tᵀ``. The same check refuses
        a layer that does not compute ``W a + b`` with its parameters as they are (a subclass
        scaling its weight). It runs always: a graph read count misses a tie under autocast,
        which casts the weight once for both uses. In float16/bfloat16 models a second use whose
        share of the gradient is within the rounding of the sums can pass unnoticed.
        """
        names = [n for s in self._sites for n in (s.weight, s.bias) if n is not None]
        probe = torch.randn(f.shape, generator=torch.Generator().manual_seed(0), dtype=f.dtype)
        with torch.enable_grad():
            got = torch.autograd.grad(
                f,
                [leaves[n] for n in names] + [r.z for r in records],
                probe.to(f.device),
                retain_graph=True,
                allow_unused=True,
            )
        total = dict(zip(names, got[: len(names)]))
        # Rounding of the two sums, but never so loose that a second use of a weight hides
        # (half precision: 0.31 and 0.88 uncapped) ...
        eps = torch.finfo(self.dtype).eps
        tol = min(0.1, 10 * eps**0.5)
        # ... and rounding of terms that cancel: a bias the model then ignores (a key's under
        # softmax, a convolution's before instance norm) has a gradient of pure rounding
        # noise, of the size of its terms Σ_t |g_t| |a_t| times eps, in both sums.
        floor = min(tol, 10 * eps)
        for site, a, gz in zip(self._sites, inputs, got[len(names) :]):
            if gz is None:
                continue
            g = self._gradients(site, gz[None])[0]  # (B, T, d_out)
            g_norms = g.norm(dim=-1)
            local = {}
            if site.weight is not None:
                x = a[..., : site.d_in]
                terms = float((g_norms * x.norm(dim=-1)).sum())
                local[site.weight] = (torch.einsum("bto,bti->oi", g, x), terms)
            if site.bias is not None:
                local[site.bias] = (g.sum((0, 1)), float(g_norms.sum()))
            for name, (mine, terms) in local.items():
                full = total[name]
                full = torch.zeros_like(mine) if full is None else full.reshape(mine.shape)
                full = full.to(mine.dtype)
                size = tol * float(full.norm() + mine.norm()) + floor * terms
                if float((full - mine).norm()) > size:
                    where = site.path or "(the model)"
                    raise ValueError(
                        f"params: {name} enters the model other than as W a + b of its layer "
                        f"{where}: also used outside it (a weight tied in functional code, "
                        "such as F.linear(h, encoder.weight.t())), or scaled by a layer "
                        "subclass. KFAC's factors would miss that. Exclude it with "
                        "params=[...], or use hesse.GGNOperator."
                    )

    def _gradients(self, site: _Site, g: Tensor) -> Tensor:
        """``(K, B, *z)`` output gradients as ``(K, B, T, d_out)`` in the factors' dtype."""
        g = g.detach().to(self._factor_dtype)
        if isinstance(site.module, nn.Conv2d):
            g = g.flatten(3).transpose(2, 3)  # (K, B, positions, C_out)
        return g.reshape(g.shape[0], g.shape[1], -1, site.d_out)

    # -- the blocks -----------------------------------------------------------------------------

    def _factor_pair(self, block: _Block) -> tuple[Tensor, Tensor]:
        a, g = self.factors[block.site.path]
        if block.kind == "bias":
            return torch.ones(1, 1, dtype=g.dtype, device=g.device), g
        assert a is not None
        return (a if block.kind == "joint" else a[: block.site.d_in, : block.site.d_in]), g

    def _eigh(self, key: str, matrix: Tensor) -> tuple[Tensor, Tensor]:
        if key not in self._eig:
            values, vectors = torch.linalg.eigh(matrix)
            self._eig[key] = (values, vectors)
        return self._eig[key]

    def _basis(self, block: _Block) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Eigenvalues and eigenvectors of ``A`` and ``G`` (cached), ``(λ_A, Q_A, λ_G, Q_G)``."""
        a, g = self._factor_pair(block)
        path = block.site.path
        la, qa = self._eigh(f"{path}/A:{block.kind}", a)
        lg, qg = self._eigh(f"{path}/G", g)
        return la, qa, lg, qg

    def _eigenvalues(self, block: _Block) -> Tensor:
        """``(d_out, d_a)``: the block's eigenvalues in its Kronecker eigenbasis."""
        la, _, lg, _ = self._basis(block)
        return torch.outer(lg, la)

    def _block_apply(self, block: _Block, m: Tensor) -> Tensor:
        """``(d_out, K, d_a) -> (d_out, K, d_a)``: the block times ``m`` (``G M A``)."""
        a, g = self._factor_pair(block)
        d_out, k, d_a = m.shape
        r = (m.reshape(d_out * k, d_a) @ a).reshape(d_out, k * d_a)
        return (g @ r).reshape(d_out, k, d_a)

    def _spectral_apply(self, block: _Block, m: Tensor, scale: Tensor) -> Tensor:
        """``Q diag(scale) Qᵀ m`` with ``Q = Q_G ⊗ Q_A``; ``scale`` is ``(d_out, d_a)``.

        ``m`` is ``(d_out, K, d_a)``; every step is one two-dimensional matrix product.
        """
        _, qa, _, qg = self._basis(block)
        d_out, k, d_a = m.shape
        r = (m.reshape(d_out * k, d_a) @ qa).reshape(d_out, k * d_a)
        r = (qg.T @ r).reshape(d_out, k, d_a).mul_(scale[:, None, :])
        r = (qg @ r.reshape(d_out, k * d_a)).reshape(d_out * k, d_a)
        return (r @ qa.T).reshape(d_out, k, d_a)

    def _apply(self, v: Tensor, per_block: Callable[[_Block, Tensor], Tensor]) -> Tensor:
        """``(N, K) -> (N, K)`` block by block, in the factors' dtype.

        Each block's rows are gathered as ``(d_out, K, d_a)`` (the columns next to the output
        index, so both factors act through plain matrix products) and scattered back.
        """
        wide = v.to(self._factor_dtype)
        out = torch.empty_like(wide)
        k = wide.shape[1]
        for block in self._blocks:
            d_out = block.site.d_out
            pieces = [wide[s].reshape(d_out, w, k).transpose(1, 2) for s, w in block.parts]
            m = pieces[0].contiguous() if len(pieces) == 1 else torch.cat(pieces, dim=2)
            r = per_block(block, m)
            start = 0
            for s, w in block.parts:
                out[s] = r[:, :, start : start + w].transpose(1, 2).reshape(-1, k)
                start += w
        return out.to(v.dtype)

    def _indices(self, block: _Block) -> Tensor:
        """The block's rows in the flat vector, in its Kronecker order."""
        d_out = block.site.d_out
        parts = [
            s.start + torch.arange(d_out)[:, None] * w + torch.arange(w)[None, :]
            for s, w in block.parts
        ]
        return torch.cat(parts, dim=1).reshape(-1).to(self.device)

    # -- products ---------------------------------------------------------------------------

    def __matmul__(self, other: Tensor | dict[str, Tensor]) -> Any:
        """``K @ V`` for ``V`` of shape ``(N,)`` or ``(N, K)``, or a dict keyed by parameter.

        Args:
            other: A vector ``(N,)``, a block ``(N, K)`` or a dict with one tensor per
                selected parameter, shaped like it; in the operator's dtype, on its device.

        Returns:
            The product, in the form of ``other``.

        Raises:
            TypeError: ``other`` is neither a tensor nor a dict, or has another dtype.
            ValueError: ``other`` has the wrong shape, device or dict keys.
        """
        self._check_point()
        return self._product(other, lambda v: self._apply(v, self._block_apply))

    def _check_point(self) -> None:
        """Refuse to answer for a model other than the one the factors came from."""
        change = self._seen.change(self)
        if change is not None:
            raise ValueError(
                f"model: {change} since the factors were computed (at construction or the "
                f"latest refresh()), and {type(self).__name__} answers for the model at that "
                "point only. Call refresh() to recompute it for the model as it is now, or "
                "build a new operator."
            )

    def to_dense(self) -> Tensor:
        """The ``(N, N)`` block-diagonal matrix, assembled from the factors.

        Returns:
            ``(N, N)`` in the operator's dtype, on its device.
        """
        self._check_point()
        n = self.shape[0]
        copies = 1 if self._factor_dtype == self.dtype else 2  # and its copy in the dtype
        check_dense_fits(
            f"{type(self).__name__}.to_dense", n, self._factor_dtype, self.device, copies=copies
        )
        dense = torch.zeros(n, n, dtype=self._factor_dtype, device=self.device)
        for block in self._blocks:
            rows = self._indices(block)
            dense[rows[:, None], rows[None, :]] = self._dense_block(block)
        return dense.to(self.dtype)

    def _dense_block(self, block: _Block) -> Tensor:
        a, g = self._factor_pair(block)
        return torch.kron(g, a)

    def diagonal(self) -> Tensor:
        """The exact diagonal of the approximation, ``diag(G) ⊗ diag(A)`` per block.

        Returns:
            ``(N,)`` in the operator's dtype, on its device.
        """
        self._check_point()
        out = torch.zeros(self.shape[0], dtype=self._factor_dtype, device=self.device)
        for block in self._blocks:
            out[self._indices(block)] = self._block_diagonal(block).reshape(-1)
        return out.to(self.dtype)

    def _block_diagonal(self, block: _Block) -> Tensor:
        a, g = self._factor_pair(block)
        return torch.outer(g.diagonal(), a.diagonal())

    def trace(self) -> float:
        """The trace, ``Σ tr(G) tr(A)`` over the blocks.

        Returns:
            The trace as a Python float.
        """
        self._check_point()
        return float(sum(float(self._block_diagonal(b).sum()) for b in self._blocks))

    def logdet(self, damping: float = 0.0) -> float:
        r"""$\log\det(K + \lambda I)$ from the factors' eigenvalues.

        Negative round-off eigenvalues of the factors are clipped to 0 first (the factors are
        positive semi-definite by construction); with ``damping=0``, so are eigenvalues at the
        level of rounding (below ``max · d · eps``, ``d`` the larger factor's size).

        Args:
            damping: $\lambda \ge 0$.

        Returns:
            The log-determinant as a Python float; ``-inf`` when ``K + λI`` is singular (a
            rank-deficient factor with ``damping=0``).

        Raises:
            ValueError: ``damping`` is negative or not finite.
        """
        damping = _damping(damping)
        self._check_point()
        total = 0.0
        for block in self._blocks:
            values = self._eigenvalues(block).clamp_min(0)
            if damping == 0:
                values = _zeros_at_rounding(values)
            total += float((values + damping).log().sum())
        return total

    def inverse(self, damping: float, *, heuristic: bool = False) -> KFACInverse:
        r"""The damped inverse as an operator, applied exactly through the eigendecompositions.

        ``heuristic=False`` (exact damping): $(K + \lambda I)^{-1}$, per block
        $(Q_G \otimes Q_A) \operatorname{diag}(1 / (\lambda_G \lambda_A^\top + \lambda))
        (Q_G \otimes Q_A)^\top$.

        ``heuristic=True`` (π-damping, Martens & Grosse 2015, §6.3, as curvlinops'
        ``use_heuristic_damping``): each weight block becomes $(G + \sqrt\lambda / \pi\, I)^{-1}
        \otimes (A + \pi\sqrt\lambda I)^{-1}$ with $\pi = \sqrt{(\operatorname{tr} A /
        d_A) / (\operatorname{tr} G / d_G)}$ (each damping at least 1e-8): *not* the
        inverse of $K + \lambda I$, but of a matrix that keeps the Kronecker structure. A
        separate bias block gets $(G + \sqrt\lambda / \pi\, I)^{-1}$ with its layer's $\pi$
        (curvlinops' convention); a layer whose weight is not selected is damped exactly.
        For `EKFACOperator` only exact damping exists.

        Args:
            damping: $\lambda > 0$ (or ``0`` when every block is invertible).
            heuristic: π-damping of the factors instead of exact damping.

        Returns:
            A `KFACInverse` operator (``shape``, ``dtype``, ``device``, ``@`` on ``(N,)``,
            ``(N, K)`` and dicts, ``to_dense()``, ``diagonal()``), usable as a
            preconditioner; it shares this operator's cached eigendecompositions.

        Raises:
            ValueError: ``damping`` is negative or not finite, or 0 with a singular block;
                ``heuristic=True`` on EKFAC; the model changed since the factors were
                computed.
        """
        damping = _damping(damping)
        if not isinstance(heuristic, bool):
            raise TypeError(f"heuristic: expected True or False, got {heuristic!r}.")
        if heuristic and isinstance(self, EKFACOperator):
            raise ValueError("heuristic: π-damping exists for KFAC only; use exact damping.")
        self._check_point()
        scales = {}
        for block in self._blocks:
            values = self._eigenvalues(block).clamp_min(0)
            if damping == 0 and not heuristic and bool((_zeros_at_rounding(values) == 0).any()):
                where = f"layer {block.site.path!r}" if block.site.path else "the model"
                raise ValueError(
                    f"damping: 0 inverts K itself, but the {block.kind} block of {where} is "
                    "singular (a factor has eigenvalues at the level of rounding: fewer "
                    "samples than inputs, or cross-entropy's G, which is always singular); "
                    "pass damping > 0."
                )
            a, g = self.factors[block.site.path]
            if heuristic and a is not None:
                _, _, lg, _ = self._basis(block)
                la = self._basis(block)[0] if block.kind != "bias" else None
                mean_a = float(a.trace()) / a.shape[0]
                mean_g = float(g.trace()) / g.shape[0]
                if mean_a >= 0 and mean_g > 0:
                    pi, root = math.sqrt(mean_a / mean_g), math.sqrt(damping)
                    da, dg = max(root * pi, 1e-8), max(root / pi, 1e-8)
                    if la is None:  # the bias shares its layer's damped G
                        values = (lg.clamp_min(0) + dg)[:, None]
                    else:
                        values = torch.outer(lg.clamp_min(0) + dg, la.clamp_min(0) + da)
                else:
                    values = values + damping
            else:
                values = values + damping
            scales[id(block)] = values.reciprocal()
        return KFACInverse(self, scales, damping)


class EKFACOperator(KFACOperator):
    r"""Eigenvalue-corrected KFAC (George et al. 2018), block-diagonal over layers.

    Each block is $(Q_G \otimes Q_A) \operatorname{diag}(s) (Q_G \otimes Q_A)^\top$: the
    Kronecker eigenbasis of KFAC's factors (`KFACOperator`, same arguments), with the
    eigenvalues replaced by the weighted sums $s = \sum_b w_b \omega_b \sum_{n, c}
    (Q_G^\top \nabla_{W} \ell_{nc}\, Q_A)^{\odot 2}$ of per-sample gradients
    $\nabla_W \ell_{nc} = \sum_t g_{nct} a_{nt}^\top$ (column ``c`` of the loss Hessian's
    factor, summed over the positions ``t`` of sample ``n``) projected into that basis; this
    is curvlinops' ``EKFACLinearOperator`` convention for outputs ``(B, C)`` (the per-sample
    gradients are exact for both ``kfac_approx`` values, which change only the basis).
    Outputs with positions (``(B, C, T)``, ``(B, T, C)``, per-pixel outputs) have one loss
    term per position, and the loss Hessian has no products of two positions' terms: the
    ``"type-2"`` columns then take one class at one position each, so the trace stays the
    GGN's (the correction costs one backward pass per class and position); ``"mc"`` draws
    each position's label independently, so one column per draw is unbiased; ``"empirical"``
    uses each sample's own loss gradient (all its positions), the empirical Fisher's
    per-sample convention. The data are read twice at construction (factors, then the
    correction). ``fisher_type="forward-only"`` is not available (no gradients to correct
    with).

    Like KFAC, computed from the model at construction, and refusing to answer once the model
    has changed: call `refresh` after it changes.

    Args:
        model: The module; evaluated in eval mode, its state restored afterwards.
        criterion: ``nn.CrossEntropyLoss`` or ``nn.MSELoss`` (see `KFACOperator`).
        data: One ``(inputs, target)`` batch, or a re-iterable of them.
        fisher_type: ``"type-2"``, ``"mc"`` or ``"empirical"``.
        kfac_approx: ``"expand"`` or ``"reduce"``: the factors whose eigenbasis is used.
        mc_samples: Labels drawn per sample for ``"mc"`` (the same draws in both passes).
        separate_weight_and_bias: One block per weight and per bias, or a joint block.
        params: The parameters; all must belong to ``nn.Linear`` or ``nn.Conv2d`` layers.
        seed: The labels' random draws for ``"mc"``.
        reduction: How ``criterion`` reduces over a batch; default ``criterion.reduction``.
        process_group: The data-parallel group (factors and corrections all-reduced).
        distributed: As for `KFACOperator`.

    Attributes:
        eigenvalues: ``{layer path: {block kind: (d_out, d_a) corrected eigenvalues}}``.

    Raises:
        TypeError: As for `KFACOperator`.
        ValueError: As for `KFACOperator`; ``fisher_type="forward-only"``.

    Examples:
        Without weight sharing and with one sample, EKFAC equals KFAC:

        >>> model = torch.nn.Linear(2, 2)
        >>> X, y = torch.tensor([[1.0, 2.0]]), torch.tensor([1])
        >>> crit = torch.nn.CrossEntropyLoss()
        >>> E = EKFACOperator(model, crit, (X, y))
        >>> K = KFACOperator(model, crit, (X, y))
        >>> bool(torch.allclose(E.to_dense(), K.to_dense(), atol=1e-6))
        True
    """

    eigenvalues: dict[str, dict[str, Tensor]]

    @staticmethod
    def _fisher_types() -> tuple[str, ...]:
        return ("type-2", "mc", "empirical")

    def refresh(self) -> None:
        """Recompute the factors, their eigenbasis and the corrected eigenvalues.

        Raises:
            ValueError: As `KFACOperator.refresh`.
        """
        super().refresh()

    def _refresh(self) -> None:
        # The second pass may fail after the first replaced the factors: put back all of the
        # operator as it was, never a mix of a new eigenbasis and old eigenvalues.
        kept = (self.factors, getattr(self, "_eig", {}), getattr(self, "eigenvalues", {}))
        kept_count = self.num_samples
        try:
            super()._refresh()
            self._correct()
        except BaseException:
            self.factors, self._eig, self.eigenvalues = kept
            self.num_samples = kept_count
            raise

    def _correct(self) -> None:
        corrections: dict[int, Tensor] = {
            id(b): torch.zeros(b.site.d_out, b.d_a, dtype=self._factor_dtype, device=self.device)
            for b in self._blocks
        }
        by_site: dict[str, list[_Block]] = {}
        for block in self._blocks:
            by_site.setdefault(block.site.path, []).append(block)

        def visit(batch: Batch, inputs: list[Tensor], grads: list[Tensor | None], w: float) -> None:
            for site, a, g in zip(self._sites, inputs, grads):
                assert g is not None
                for block in by_site[site.path]:
                    _, qa, _, qg = self._basis(block)
                    bias = block.kind == "bias"
                    x = a.new_ones(*a.shape[:-1], 1) if bias else a[..., : block.d_a]
                    corrections[id(block)].add_(_correction(g @ qg, x @ qa), alpha=w)

        count = self._pass(visit, backward=True, by_term=True, check_layers=False)
        eigenvalues: dict[str, dict[str, Tensor]] = {}
        for block in self._blocks:
            s = self.shard.all_reduce(corrections[id(block)])
            if self.reduction == "mean":
                s = s.div_(count)
            eigenvalues.setdefault(block.site.path, {})[block.kind] = s
        self.eigenvalues = eigenvalues

    def _corrected(self, block: _Block) -> Tensor:
        return self.eigenvalues[block.site.path][block.kind]

    def _eigenvalues(self, block: _Block) -> Tensor:
        return self._corrected(block)

    def _block_apply(self, block: _Block, m: Tensor) -> Tensor:
        return self._spectral_apply(block, m, self._corrected(block))

    def _dense_block(self, block: _Block) -> Tensor:
        _, qa, _, qg = self._basis(block)
        q = torch.kron(qg, qa)
        return (q * self._corrected(block).reshape(-1)) @ q.T

    def _block_diagonal(self, block: _Block) -> Tensor:
        _, qa, _, qg = self._basis(block)
        return qg.square() @ self._corrected(block) @ qa.square().T

    def trace(self) -> float:
        """The trace, the sum of the corrected eigenvalues.

        Returns:
            The trace as a Python float.
        """
        self._check_point()
        return float(sum(float(self._corrected(b).sum()) for b in self._blocks))


def _correction(gr: Tensor, ar: Tensor) -> Tensor:
    """``Σ_{k,n} (Σ_t gr[k,n,t,:] ar[n,t,:]ᵀ)²``: squared per-sample gradients in the basis."""
    if ar.shape[1] == 1:
        return gr[:, :, 0].square().sum(0).T @ ar[:, 0].square()
    k, b, _, d_out = gr.shape
    step = max(1, _ENTRIES // max(k * d_out * ar.shape[-1], 1))
    out = gr.new_zeros(d_out, ar.shape[-1])
    for lo in range(0, b, step):
        per_sample = torch.einsum("knti,ntj->knij", gr[:, lo : lo + step], ar[lo : lo + step])
        out += per_sample.square().sum((0, 1))
    return out


def _zeros_at_rounding(values: Tensor) -> Tensor:
    """Eigenvalues of a positive semi-definite block with those at rounding level set to 0.

    A rank-deficient factor's zero eigenvalues come out at about ``eps · max`` (1e-17, not
    0); below ``max · d · eps`` (``d`` the larger factor's size) they count as zeros.
    """
    cut = values.max() * max(values.shape) * torch.finfo(values.dtype).eps
    return torch.where(values > cut, values, torch.zeros_like(values))


@dataclass(frozen=True)
class _ModelPoint:
    """What the factors were computed from.

    The model's parameters and buffers (the objects, and copies of their values: version
    counters miss ``.data`` writes), its modules (the object at each path) and their hooks
    (by handle), and the criterion's reduction. Plain Python attributes are not compared:
    many models write their own (caches, counters, ``LSTM._flat_weight_refs``) on every
    forward pass, and a config object can hide any change; refusing on them would refuse
    valid uses, and comparing them all would still miss some.
    """

    names: tuple[str, ...]
    tensors: tuple[Tensor, ...]
    values: tuple[Tensor, ...]
    modules: tuple[tuple[str, nn.Module], ...]
    hooks: tuple[tuple[int, ...], ...]
    reduction: str

    @staticmethod
    def _now(op: KFACOperator) -> tuple[tuple[str, ...], tuple[Tensor, ...]]:
        named = [
            *op.model.named_parameters(remove_duplicate=False),
            *op.model.named_buffers(remove_duplicate=False),
        ]
        return tuple(n for n, _ in named), tuple(t for _, t in named)

    @staticmethod
    def _modules(op: KFACOperator) -> tuple[tuple[str, nn.Module], ...]:
        return tuple(op.model.named_modules(remove_duplicate=False))

    @staticmethod
    def _hooks(modules: tuple[tuple[str, nn.Module], ...]) -> tuple[tuple[int, ...], ...]:
        return tuple(
            tuple(key for kind in _HOOKS for key in getattr(module, kind, {}))
            for _, module in modules
        )

    @classmethod
    def of(cls, op: KFACOperator) -> _ModelPoint:
        names, tensors = cls._now(op)
        values = tuple(t.detach().clone() for t in tensors)
        modules = cls._modules(op)
        reduction = _reduction(op.criterion, op._reduction_arg)
        return cls(names, tensors, values, modules, cls._hooks(modules), reduction)

    def change(self, op: KFACOperator) -> str | None:
        """What changed in ``op``'s model or criterion since, or ``None``."""
        names, tensors = self._now(op)
        if names != self.names:
            return "its parameters or buffers were added, removed or renamed"
        replaced = [n for n, a, b in zip(names, tensors, self.tensors) if a is not b]
        if replaced:
            return f"{replaced[0]} was replaced by another tensor"
        for name, now, then in zip(names, tensors, self.values):
            if now.shape != then.shape or not _identical(now.detach(), then):
                return f"the values of {name} changed (a training step, a .data edit)"
        reduction = _reduction(op.criterion, op._reduction_arg)
        if reduction != self.reduction:
            return f"the criterion's reduction changed from {self.reduction!r} to {reduction!r}"
        try:
            _check_criterion(op.criterion)
        except ValueError:
            return "the criterion was given class weights or label smoothing"
        modules = self._modules(op)
        if [p for p, _ in modules] != [p for p, _ in self.modules] or any(
            a is not b for (_, a), (_, b) in zip(modules, self.modules)
        ):
            return "its modules were replaced, added or removed"
        for (path, _), hooks, held in zip(modules, self._hooks(modules), self.hooks):
            if hooks != held:
                where = f"the module {path}" if path else "the model"
                return f"a hook was added to or removed from {where}"
        return None


def _identical(a: Tensor, b: Tensor) -> bool:
    """Equal values, NaN equal to NaN.

    A buffer holding NaN (unused, or from ``torch.empty``) has not changed; ``torch.equal``
    says it always has.
    """
    if torch.equal(a, b):
        return True
    if not (a.is_floating_point() or a.is_complex()) or a.dtype != b.dtype:
        return False
    return bool(((a == b) | (a.isnan() & b.isnan())).all())


# The hooks that change what a module computes or differentiates (state-dict hooks do not).
_HOOKS = ("_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks", "_backward_hooks")


def _damping(damping: Any) -> float:
    if isinstance(damping, Tensor) and damping.numel() == 1:
        damping = damping.item()
    if isinstance(damping, bool) or not isinstance(damping, numbers.Real):
        raise TypeError(f"damping: expected a number >= 0, got {type(damping).__name__}.")
    value = float(damping)
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"damping: expected a finite number >= 0, got {damping!r}.")
    return value


class KFACInverse(LayoutOperator):
    r"""The damped inverse of a `KFACOperator` or `EKFACOperator`, from `KFACOperator.inverse`.

    Applied block by block in the Kronecker eigenbasis, $Q \operatorname{diag}(1/(\lambda +
    \text{damping})) Q^\top$, with the eigendecompositions the operator caches; a product
    costs four small matrix products per block. It answers for its operator's factors as
    they were when it was made: after the model changes, or after the operator's `refresh`,
    it raises (make a new one with ``op.inverse(damping)``).

    Args:
        op: The KFAC or EKFAC operator.
        scales: Per block (by ``id``), the ``(d_out, d_a)`` inverse eigenvalues.
        damping: The damping, for ``repr``.

    Attributes:
        layout: The operator's `ParamLayout` (dict products).
        damping: The damping it inverts with.

    Raises:
        TypeError: A product's operand is neither a tensor nor a dict, or has another dtype.
        ValueError: A product's operand has the wrong shape, device or dict keys.
    """

    def __init__(self, op: KFACOperator, scales: dict[int, Tensor], damping: float) -> None:
        self._op = op
        self._scales = scales
        self.damping = damping
        self.layout = op.layout
        self._shard = op.shard
        self._generation = op._generation

    def _check_point(self) -> None:
        """Refuse to answer after the operator's factors changed (or its model did)."""
        op = self._op
        if op._generation != self._generation:
            raise ValueError(
                f"KFACInverse: made before {type(op).__name__}.refresh() recomputed the "
                "factors it inverts; call op.inverse(damping) again."
            )
        op._check_point()

    def __repr__(self) -> str:
        return f"KFACInverse(of={type(self._op).__name__}, damping={self.damping})"

    def __matmul__(self, other: Tensor | dict[str, Tensor]) -> Any:
        """``(K + λI)⁻¹ @ V`` for ``(N,)``, ``(N, K)`` or a dict keyed by parameter name.

        Raises:
            TypeError: ``other`` is neither a tensor nor a dict, or has another dtype.
            ValueError: ``other`` has the wrong shape, device or dict keys.
        """
        self._check_point()
        op = self._op
        return self._product(
            other,
            lambda v: op._apply(v, lambda b, m: op._spectral_apply(b, m, self._scales[id(b)])),
        )

    def to_dense(self) -> Tensor:
        """The ``(N, N)`` inverse, block-diagonal, in the operator's dtype."""
        self._check_point()
        op = self._op
        n = self.shape[0]
        copies = 1 if op._factor_dtype == self.dtype else 2
        check_dense_fits("KFACInverse.to_dense", n, op._factor_dtype, self.device, copies=copies)
        dense = torch.zeros(n, n, dtype=op._factor_dtype, device=self.device)
        for block in op._blocks:
            _, qa, _, qg = op._basis(block)
            q = torch.kron(qg, qa)
            rows = op._indices(block)
            dense[rows[:, None], rows[None, :]] = (q * self._scales[id(block)].reshape(-1)) @ q.T
        return dense.to(self.dtype)

    def diagonal(self) -> Tensor:
        """The exact diagonal of the inverse, ``(N,)``."""
        self._check_point()
        op = self._op
        out = torch.zeros(self.shape[0], dtype=op._factor_dtype, device=self.device)
        for block in op._blocks:
            _, qa, _, qg = op._basis(block)
            values = qg.square() @ self._scales[id(block)] @ qa.square().T
            out[op._indices(block)] = values.reshape(-1)
        return out.to(self.dtype)
