"""Per-sample gradients and influence functions, on top of the operators and `hesse.solve`.

Per-sample gradients come from the empirical Fisher's machinery (each sample's own loss, the
sample evaluated as a batch of one, vectorised over samples with ``vmap`` and falling back to
a loop where ``vmap`` cannot batch the model), a chunk of samples at a time. Influence scores
solve once with every test gradient as a right-hand side, then stream the training gradients
batch by batch, so the ``(n_train, N)`` gradients are never held at once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.utils.data import RandomSampler, SubsetRandomSampler, WeightedRandomSampler

from hesse._data import Batch, Dataset, as_dataset, model_fits
from hesse._functional import sample_loss_function
from hesse._kfac import EKFACOperator, KFACOperator
from hesse._layout import ParamLayout, Params
from hesse._memory import (
    ACTIVATION_FACTOR,
    MEMORY_FRACTION,
    TARGET_COLUMNS,
    MemoryBudgetError,
    activation_bytes,
    available_bytes,
    format_bytes,
)
from hesse._operators import (
    CurvatureOperator,
    EmpiricalFisherOperator,
    GGNOperator,
    HessianOperator,
)
from hesse._protocol import Operator
from hesse._solve import (
    Method,
    SolveResult,
    _renamed,
    check_damping,
    check_method,
    check_solve_tol,
    default_tol,
    solve,
    unconverged_error,
)
from hesse._spectral import _linear
from hesse._validate import (
    batch_size,
    check_chunk_size,
    check_criterion,
    check_flag,
    check_model,
    normal_target,
    normalize_inputs,
)

__all__ = ["influence_scores", "per_sample_gradients", "self_influence"]

Curvature = Literal["ggn", "hessian", "fisher", "kfac", "ekfac"]
# The curvatures known by name: builders (model, criterion, data, params, progress) -> operator.
# A structured approximation (KFAC, EKFAC) joins by adding its builder here; any operator can
# already be passed as `curvature=` directly.
_Builder = Callable[[nn.Module, Callable[..., Tensor], Dataset, Params, bool], Any]
_RANDOM_SAMPLERS = (RandomSampler, SubsetRandomSampler, WeightedRandomSampler)


def _builder(cls: type[CurvatureOperator]) -> _Builder:
    def build(
        model: nn.Module, criterion: Callable[..., Tensor], data: Dataset, params: Params, bar: bool
    ) -> Any:
        return cls(model, criterion, data, params, progress=bar)

    return build


def _kfac_builder(cls: type[KFACOperator]) -> _Builder:
    def build(
        model: nn.Module, criterion: Callable[..., Tensor], data: Dataset, params: Params, bar: bool
    ) -> Any:
        return cls(model, criterion, data, params=params)

    return build


_CURVATURES: dict[str, _Builder] = {
    "ggn": _builder(GGNOperator),
    "hessian": _builder(HessianOperator),
    "fisher": _builder(EmpiricalFisherOperator),
    # Kronecker-factored: (C + λI)⁻¹ through the factors' eigendecompositions, no iterations.
    "kfac": _kfac_builder(KFACOperator),
    "ekfac": _kfac_builder(EKFACOperator),
}
# Right-hand sides per solve in `self_influence`: block products of this many columns are
# near their best per column (see the operator benchmarks) while the solver's working set
# stays a few dozen vectors.
_RHS_CHUNK = 32
# Vectors of N numbers per right-hand side that a solve holds (MINRES's, the largest).
_SOLVE_VECTORS = 12


def _check_criterion(criterion: Any) -> Callable[..., Tensor]:
    check_criterion(criterion)
    if getattr(criterion, "reduction", None) == "none":
        raise ValueError(
            "criterion: has reduction='none', but each sample's loss must be a scalar (the "
            "criterion applied to a batch of one); build it with reduction='mean' or 'sum'."
        )
    return criterion


@contextmanager
def _named(name: str) -> Iterator[None]:
    """Errors about an operator's ``data`` said about the argument ``name``."""
    try:
        yield
    except (TypeError, ValueError) as err:
        text = str(err)
        if not text.startswith("data:"):
            raise
        raise type(err)(f"{name}:{text[5:]}") from err.__cause__


def _dataset(name: str, data: Any) -> Dataset:
    """``data`` as batches, its errors said about the argument ``name``.

    A shuffling DataLoader is refused: the results are in the order the data yield the
    samples, and it yields them in a new order on every pass.
    """
    samplers = [getattr(data, "sampler", None)]
    samplers.append(getattr(getattr(data, "batch_sampler", None), "sampler", None))
    for sampler in samplers:
        if isinstance(sampler, _RANDOM_SAMPLERS):
            raise ValueError(
                f"{name}: a DataLoader whose sampler is {type(sampler).__name__} yields the "
                "samples in a new order on every pass, so the results could not be matched "
                "to samples; build it with shuffle=False (and no random sampler)."
            )
    with _named(name), torch.inference_mode(False):
        return as_dataset(data)


def _check_fits(what: str, needed: int, device: torch.device, detail: str, fixes: str) -> None:
    available = available_bytes(device)
    if available is None:
        return
    budget = int(available * MEMORY_FRACTION)
    if needed > budget:
        raise MemoryBudgetError(
            f"{what}: needs about {format_bytes(needed)} ({detail}) but about "
            f"{format_bytes(budget)} can be used on {device} ({format_bytes(available)} "
            f"available). Alternatives: {fixes}."
        )


class _Gradients:
    """Per-sample gradients through `EmpiricalFisherOperator` (vmap of grad, or a loop)."""

    def __init__(
        self,
        model: nn.Module,
        criterion: Callable[..., Tensor],
        data: Any,
        params: Params,
        name: str,
    ) -> None:
        # Local: the gradients of this process's samples, even under torch.distributed.
        with _named(name):
            self.op = EmpiricalFisherOperator(model, criterion, data, params, distributed=False)
        self.layout: ParamLayout = self.op.layout

    def check(self, name: str, data: Dataset) -> None:
        """The checks of the operator's own data on other data's first batch (in a session)."""
        batch = _first_nonempty(data)
        with model_fits(name, batch, self.layout.dtype):
            self.op._check_batch(batch)

    def session(self) -> Any:
        return self.op.session()

    def plan(self, what: str, sample: Batch, kept_bytes: int, chunk_size: int | None) -> int:
        """Samples per vectorised pass, with the memory check (inside a session)."""
        n = self.layout.numel
        itemsize = self.layout.dtype.itemsize
        g = sample_loss_function(self.op.model, self.layout.unflatten, self.op.criterion)
        assert sample.target is not None
        target, inputs = sample.target[0], tuple(x[0] for x in sample.inputs)
        act = activation_bytes(
            lambda t: g(t, target, *inputs), self.op._state.theta, (*sample.inputs, sample.target)
        )
        per_sample = 3 * n * itemsize + ACTIVATION_FACTOR * act
        chunk = chunk_size or TARGET_COLUMNS
        available = available_bytes(self.layout.device)
        if chunk_size is None and available is not None:
            room = int(available * MEMORY_FRACTION) - kept_bytes
            chunk = max(1, min(chunk, room // max(per_sample, 1)))
        _check_fits(
            what,
            kept_bytes + chunk * per_sample,
            self.layout.device,
            f"{format_bytes(kept_bytes)} kept + {format_bytes(chunk * per_sample)} for "
            f"{chunk} samples' gradients at a time",
            "fewer samples per call, params=[...] to select fewer parameters, or a smaller "
            "chunk_size",
        )
        return chunk

    def chunks(
        self, batch: Batch, chunk: int, finite: str | None = None, index: int | None = None
    ) -> Iterator[tuple[int, Tensor]]:
        """``(start, (k, N) gradients)`` of ``batch``'s samples, ``chunk`` at a time.

        ``finite``: the data's argument name, to refuse gradients that are not finite (they
        would make every score they meet NaN) and to name data the model fails on; ``index``:
        the batch's position in them.
        """
        assert batch.target is not None
        which = "a batch" if index is None else f"batch {index}"
        for start in range(0, batch.size, chunk):
            part = Batch(
                tuple(x[start : start + chunk] for x in batch.inputs),
                batch.target[start : start + chunk],
            )
            with model_fits(finite or "data", batch, self.layout.dtype, where=which):
                g = self.op._per_sample_gradients(part)
            if finite is not None:
                bad = (~torch.isfinite(g).all(1)).nonzero()
                if bad.numel():
                    raise ValueError(
                        f"{finite}: the loss gradient of sample {start + int(bad[0, 0])} of "
                        f"{which} is NaN or infinite; check its inputs and target for NaN or "
                        "infinite values."
                    )
            yield start, g


def per_sample_gradients(
    model: nn.Module,
    criterion: Callable[..., Tensor],
    inputs: Tensor | tuple[Tensor, ...],
    target: Tensor,
    params: Params = None,
    *,
    chunk_size: int | None = None,
) -> Tensor:
    r"""The gradient of each sample's own loss, $g_b = \nabla_\theta\, \ell(f(x_b), y_b)$.

    Sample ``b``'s loss is ``criterion(model(x_b[None]), target[b][None])``, the sample
    evaluated as a batch of one: the convention of `EmpiricalFisherOperator` (whose
    $\sum_b g_b g_b^\top$ these gradients form) and of ``torch.func`` per-sample gradients.
    For ``MSELoss(reduction="mean")`` that is the mean over the sample's own outputs. The
    samples are vectorised with ``vmap``, a chunk at a time (a loop, with a
    `PerformanceWarning`, where ``vmap`` cannot batch the model), in eval mode.

    Args:
        model: The module; evaluated in eval mode, its parameters, flags, buffers and
            ``.grad`` restored afterwards.
        criterion: A loss ``criterion(output, target)`` returning a scalar for a batch (an
            ``nn.Module`` with ``reduction="mean"`` or ``"sum"``, or a function).
        inputs: A tensor or a tuple of tensors passed positionally to ``model``; dim 0 of each
            is the batch.
        target: A tensor whose dim 0 is the batch.
        params: The parameters: names, glob patterns (``"encoder.*"``) or the model's
            ``nn.Parameter`` objects, one or a list; ``None`` selects every parameter with
            ``requires_grad=True``. Columns follow ``model.named_parameters()``.
        chunk_size: Samples per vectorised pass (``None``: up to 128, fewer when memory is
            short).

    Returns:
        ``(B, N)`` in the parameters' dtype, on their device: row ``b`` is sample ``b``'s
        gradient, flattened in the order of `ParamLayout`.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``, ``criterion`` is not callable or does
            not return a floating-point tensor, ``inputs`` are not tensors, or ``chunk_size``
            is not an int.
        ValueError: ``target`` is not a tensor whose dim 0 is the batch; the batch is empty
            or its sizes differ; the model and criterion fail on the batch (inputs or target
            that do not fit them); ``criterion`` has ``reduction="none"`` or the loss is not a
            scalar; the model couples the samples of a batch; ``params`` names no parameter
            or selects none; a selected parameter is NaN or infinite; ``chunk_size < 1``.
        MemoryBudgetError: The ``(B, N)`` result and the working set would not fit in the
            device's memory (raised before allocating).

    Examples:
        For $\ell_b = \frac{1}{2}(w \cdot x_b)^2$, $g_b = (w \cdot x_b)\,x_b$; at
        $w = (1, 0)$:

        >>> model = torch.nn.Linear(2, 1, bias=False)
        >>> with torch.no_grad():
        ...     _ = model.weight.copy_(torch.tensor([[1.0, 0.0]]))
        >>> X, y = torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.zeros(2, 1)
        >>> loss = lambda out, t: 0.5 * (out - t).pow(2).sum()
        >>> per_sample_gradients(model, loss, X, y)
        tensor([[ 1.,  2.],
                [ 9., 12.]])
    """
    check_model(model)
    _check_criterion(criterion)
    chunk_size = check_chunk_size(chunk_size)
    with torch.inference_mode(False):
        args = normalize_inputs(inputs)
        target = normal_target(target)
    b = batch_size(args)
    if not isinstance(target, Tensor) or target.ndim == 0 or target.shape[0] != b:
        given = tuple(target.shape) if isinstance(target, Tensor) else type(target).__name__
        raise ValueError(
            f"target: per-sample gradients need a tensor target whose dim 0 is the batch "
            f"({b}), got {given}."
        )
    batch = Batch(args, target)
    grads = _Gradients(model, criterion, batch, params, "inputs, target")
    n = grads.layout.numel
    with torch.inference_mode(False), grads.session():
        out_bytes = b * n * grads.layout.dtype.itemsize
        chunk = grads.plan("per_sample_gradients", batch, out_bytes, chunk_size)
        out = torch.empty(b, n, dtype=grads.layout.dtype, device=grads.layout.device)
        for start, block in grads.chunks(batch, chunk):
            out[start : start + block.shape[0]] = block
    return out


# ------------------------------------------------------------------------------- influence


def _curvature(
    curvature: Any,
    model: nn.Module,
    criterion: Callable[..., Tensor],
    train: Dataset,
    params: Params,
    layout: ParamLayout,
    progress: bool,
) -> Any:
    """The operator ``C``: built by name over the training data, or the user's, checked."""
    if isinstance(curvature, str):
        if curvature not in _CURVATURES:
            names = ", ".join(repr(name) for name in _CURVATURES)
            raise ValueError(f"curvature: expected {names} or an operator, got {curvature!r}.")
        return _CURVATURES[curvature](model, criterion, train, params, progress)
    try:
        lin = _linear(curvature)
    except TypeError:
        raise TypeError(
            "curvature: expected 'ggn', 'hessian', 'fisher', 'kfac', 'ekfac' or an operator "
            "with .shape, "
            f".dtype, .device and @ (such as a hesse operator), got {type(curvature).__name__}."
        ) from None
    n = layout.numel
    if lin.n != n or curvature.dtype != layout.dtype or lin.device != layout.device:
        raise ValueError(
            f"curvature: an operator of shape ({n}, {n}), {layout.dtype} on {layout.device} "
            f"(the selected parameters) is needed, got ({lin.n}, {lin.n}), {curvature.dtype} "
            f"on {lin.device}; build it on the same model and params=."
        )
    built_on = getattr(curvature, "param_names", None)
    if built_on is not None and tuple(built_on) != layout.names:
        raise ValueError(
            f"curvature: built on the parameters {list(built_on)}, but params= selects "
            f"{list(layout.names)}; pass the same selection."
        )
    return curvature


def _checked_solve(
    what: str,
    data: str,
    C: Any,  # noqa: N803
    rhs: Tensor,
    damping: float,
    method: str,
    tol: float | None,
) -> Tensor:
    if isinstance(C, KFACOperator):  # exact for the approximation: no iterative solve
        return (C.inverse(damping) @ rhs).to(rhs.dtype)
    try:
        result: SolveResult = solve(C, rhs, damping=damping, method=method, tol=tol)  # type: ignore[arg-type]
    except ValueError as err:
        # `solve`'s A is the curvature here, and the operator's data the training data.
        raise _renamed(_renamed(err, "curvature"), data, old="data") from err
    if not bool(result.converged.all()):
        used = tol if tol is not None else default_tol(result.solution.dtype)
        raise unconverged_error(what, result, method, used, options=False)
    return result.solution.to(rhs.dtype)


def _bar(progress: bool, total: int, desc: str) -> Any:
    if not progress:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError as err:
        raise ImportError(
            "progress=True needs tqdm, an optional extra: pip install 'hesse[progress]'."
        ) from err
    return tqdm(total=total, desc=desc, unit=" batches", leave=False)


def _setup(
    model: nn.Module,
    criterion: Any,
    damping: Any,
    method: Any,
    tol: Any,
    progress: Any,
) -> tuple[float, str, float | None]:
    check_model(model)
    _check_criterion(criterion)
    check_flag("progress", progress)
    return check_damping(damping, nonnegative=True), check_method(method), check_solve_tol(tol)


def _first_nonempty(data: Dataset) -> Batch:
    return next(batch for batch in data if batch.size)


def influence_scores(
    model: nn.Module,
    criterion: Callable[..., Tensor],
    train_data: Any,
    test_data: Any,
    *,
    damping: float,
    curvature: Curvature | Any = "ggn",
    method: Method = "cg",
    params: Params = None,
    tol: float | None = None,
    progress: bool = False,
) -> Tensor:
    r"""Influence of each training sample on each test sample's loss (Koh & Liang, 2017).

    ``score[i, j]`` $= -g_{\mathrm{test},i}^\top (C + \lambda I)^{-1} g_{\mathrm{train},j}$:
    the first-order change of test sample ``i``'s loss when training sample ``j`` is
    up-weighted (their $\mathcal{I}_{\mathrm{up,loss}}$). A negative score means that
    up-weighting ``j`` lowers test ``i``'s loss (a helpful sample), a positive one that it
    raises it. ``g`` are per-sample gradients (`per_sample_gradients`) and ``C`` the curvature
    of the training loss over ``train_data``, weighted as the operators weight batches (the
    mean over all samples for ``reduction="mean"``, the sum for ``"sum"``).

    One solve with every test gradient as a right-hand side (``n_test`` columns advancing
    together), then the training gradients are streamed batch by batch and chunk by chunk,
    so the ``(n_train, N)`` gradients are never held at once.

    Args:
        model: The module; evaluated in eval mode, its state restored afterwards.
        criterion: A loss ``criterion(output, target)`` returning a scalar for a batch
            (``reduction="mean"`` or ``"sum"``).
        train_data: One ``(inputs, target)`` batch or a re-iterable of them (a list, a
            ``DataLoader`` without shuffling), as for the operators.
        test_data: The test samples, in the same form.
        damping: $\lambda \ge 0$. The GGN and the Fisher are only positive semi-definite, and
            the Hessian is indefinite away from a minimum: a damping makes the system
            solvable and the scores stable (see the damping concepts page).
        curvature: ``"ggn"`` (default, `GGNOperator`), ``"hessian"`` (`HessianOperator`;
            indefinite in general, so pair it with ``method="minres"`` or enough damping),
            ``"fisher"`` (`EmpiricalFisherOperator`), ``"kfac"`` / ``"ekfac"``
            (`KFACOperator` / `EKFACOperator` with their defaults: the fast backend for large
            models, whose damped inverse is applied exactly through the factors, so ``method``
            and ``tol`` are unused), or an operator of your own over the same parameters (any
            `SymmetricOperator` of shape ``(N, N)``; a KFAC or EKFAC operator is inverted
            through its factors too), used as it is.
        method: The solver, as in `solve`: ``"cg"`` (default), ``"minres"`` or ``"lissa"``.
        params: The parameters, as for the operators; ``None`` selects every parameter with
            ``requires_grad=True``.
        tol: The solve's relative residual; default as in `solve` (1e-6 in float64).
        progress: Show progress bars (needs ``tqdm``): the curvature operator's over the
            batches of the solve, and one over the training batches.

    Returns:
        ``(n_test, n_train)`` in the parameters' dtype: rows follow the test samples, columns
        the training samples, in the order the data yield them (on this process's samples
        under ``torch.distributed``, where ``C`` covers every rank's).

    Raises:
        TypeError: ``model`` is not an ``nn.Module``, ``criterion`` is not callable, the data
            are not ``(inputs, target)`` batches or a re-iterable of them, ``curvature`` is
            neither a name nor an operator, or an argument has the wrong type.
        ValueError: ``damping`` is negative or not finite; an unknown ``curvature`` or
            ``method``; an operator of another size, dtype or parameter selection; the data
            hold no samples, come from a shuffling ``DataLoader``, do not fit the model (the
            forward pass fails on the first batch) or give a NaN gradient; the model couples
            the samples of a batch; CG met negative curvature or LiSSA diverged (each message
            says what to change); and the errors of the operators (``params``, the loss, the
            reduction).
        RuntimeError: The solve did not converge within its iterations.
        MemoryBudgetError: The test gradients, the solver's vectors and the scores would not
            fit in the device's memory (raised before allocating).

    Examples:
        Least squares, $\ell_j = (w x_j - y_j)^2$ at $w = 0$: the GGN of the summed loss is
        $C = 2\sum_j x_j^2 = 10$ and $g_j = -2 x_j y_j$, so $g_{\mathrm{train}} = (-2, -4)$
        and $g_{\mathrm{test}} = -4$:

        >>> model = torch.nn.Linear(1, 1, bias=False)
        >>> with torch.no_grad():
        ...     _ = model.weight.zero_()
        >>> loss = torch.nn.MSELoss(reduction="sum")
        >>> train = (torch.tensor([[1.0], [2.0]]), torch.tensor([[1.0], [1.0]]))
        >>> test = (torch.tensor([[1.0]]), torch.tensor([[2.0]]))
        >>> influence_scores(model, loss, train, test, damping=0.0)  # -(-4) (1/10) (-2, -4)
        tensor([[-0.8000, -1.6000]])
    """
    lam, how, tol = _setup(model, criterion, damping, method, tol, progress)
    train = _dataset("train_data", train_data)
    test = _dataset("test_data", test_data)
    n_test, n_train = test.num_samples, train.num_samples
    if n_test == 0:
        raise ValueError("test_data: no samples; pass at least one non-empty batch.")
    grads = _Gradients(model, criterion, train, params, "train_data")
    layout = grads.layout
    with _named("train_data"):
        C = _curvature(curvature, model, criterion, train, params, layout, progress)  # noqa: N806
    n, itemsize = layout.numel, layout.dtype.itemsize
    kept = itemsize * (n * n_test * (1 + _SOLVE_VECTORS) + n_test * n_train)
    with torch.inference_mode(False), grads.session():
        grads.check("test_data", test)
        chunk = grads.plan("influence_scores", _first_nonempty(train), kept, None)
        test_grads = torch.cat(
            [
                g
                for index, batch in enumerate(test)
                if batch.size
                for _, g in grads.chunks(batch, chunk, "test_data", index)
            ]
        )
        solved = _checked_solve(
            "influence_scores", "train_data", C, test_grads.T.contiguous(), lam, how, tol
        )
        del test_grads
        columns: list[Tensor] = []
        bar = _bar(progress, train.num_batches, "influence_scores: training gradients")
        try:
            for index, batch in enumerate(train):
                if batch.size:
                    parts = grads.chunks(batch, chunk, "train_data", index)
                    columns.extend(g @ solved for _, g in parts)
                if bar is not None:
                    bar.update(1)
        finally:
            if bar is not None:
                bar.close()
    return -torch.cat(columns).T.contiguous()


def self_influence(
    model: nn.Module,
    criterion: Callable[..., Tensor],
    data: Any,
    *,
    damping: float,
    curvature: Curvature | Any = "ggn",
    method: Method = "cg",
    params: Params = None,
    tol: float | None = None,
    progress: bool = False,
) -> Tensor:
    r"""Each sample's influence on its own loss: $g_i^\top (C + \lambda I)^{-1} g_i$.

    The negative of the diagonal of `influence_scores` with ``data`` as both training and
    test data (so it is ``>= 0`` for a positive definite $C + \lambda I$). A large value
    marks a sample that the model fits only by spending curvature on it: mislabeled and
    atypical samples rank first (see the how-to on finding mislabeled examples). ``C`` is the
    curvature of the loss over all of ``data``, weighted as the operators weight batches.

    The per-sample gradients are solved for in chunks of up to 32 right-hand sides
    (one block product per iteration for all of them), batch by batch.

    Args:
        model: The module; evaluated in eval mode, its state restored afterwards.
        criterion: A loss ``criterion(output, target)`` returning a scalar for a batch
            (``reduction="mean"`` or ``"sum"``).
        data: One ``(inputs, target)`` batch or a re-iterable of them (a list, a
            ``DataLoader`` without shuffling), as for the operators.
        damping: $\lambda \ge 0$, as in `influence_scores`.
        curvature: ``"ggn"`` (default), ``"hessian"``, ``"fisher"``, ``"kfac"``,
            ``"ekfac"`` or an operator of your own over the same parameters, as in
            `influence_scores`.
        method: The solver, as in `solve`: ``"cg"`` (default), ``"minres"`` or ``"lissa"``.
        params: The parameters, as for the operators; ``None`` selects every parameter with
            ``requires_grad=True``.
        tol: The solves' relative residual; default as in `solve` (1e-6 in float64).
        progress: Show progress bars (needs ``tqdm``): the curvature operator's over its
            batches, and one over the batches of ``data``.

    Returns:
        ``(n,)`` in the parameters' dtype, one value per sample in the order the data yield
        them (this process's samples under ``torch.distributed``).

    Raises:
        TypeError: ``model`` is not an ``nn.Module``, ``criterion`` is not callable, ``data``
            are not ``(inputs, target)`` batches or a re-iterable of them, ``curvature`` is
            neither a name nor an operator, or an argument has the wrong type.
        ValueError: ``damping`` is negative or not finite; an unknown ``curvature`` or
            ``method``; an operator of another size, dtype or parameter selection; the data
            hold no samples, come from a shuffling ``DataLoader``, do not fit the model or give
            a NaN gradient; the model couples the samples of a batch; CG met negative
            curvature or LiSSA diverged; and the errors of the operators.
        RuntimeError: A solve did not converge within its iterations.
        MemoryBudgetError: The solver's vectors would not fit in the device's memory.

    Examples:
        Least squares at $w = 0$ as in `influence_scores`: $C = 10$ and $g = (-2, -4)$, so
        the self-influences are $g_i^2 / 10$:

        >>> model = torch.nn.Linear(1, 1, bias=False)
        >>> with torch.no_grad():
        ...     _ = model.weight.zero_()
        >>> loss = torch.nn.MSELoss(reduction="sum")
        >>> data = (torch.tensor([[1.0], [2.0]]), torch.tensor([[1.0], [1.0]]))
        >>> self_influence(model, loss, data, damping=0.0)
        tensor([0.4000, 1.6000])
    """
    lam, how, tol = _setup(model, criterion, damping, method, tol, progress)
    train = _dataset("data", data)
    grads = _Gradients(model, criterion, train, params, "data")
    layout = grads.layout
    C = _curvature(curvature, model, criterion, train, params, layout, progress)  # noqa: N806
    n, itemsize = layout.numel, layout.dtype.itemsize
    kept = itemsize * (n * _RHS_CHUNK * (1 + _SOLVE_VECTORS) + train.num_samples)
    out = []
    with ExitStack() as stack:
        stack.enter_context(torch.inference_mode(False))
        stack.enter_context(grads.session())
        chunk = min(_RHS_CHUNK, grads.plan("self_influence", _first_nonempty(train), kept, None))
        if isinstance(C, Operator):
            stack.enter_context(C.session())  # one session for every solve of this call
        bar = _bar(progress, train.num_batches, "self_influence")
        try:
            for index, batch in enumerate(train):
                for _, g in grads.chunks(batch, chunk, "data", index) if batch.size else ():
                    x = _checked_solve("self_influence", "data", C, g.T.contiguous(), lam, how, tol)
                    out.append((g.T * x).sum(0))
                if bar is not None:
                    bar.update(1)
        finally:
            if bar is not None:
                bar.close()
    return torch.cat(out)
