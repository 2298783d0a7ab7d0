"""Matrix-free curvature operators of a loss over a whole dataset.

Each operator is a symmetric ``N x N`` matrix that is never formed: ``op @ V`` loops over the
dataset's batches (the only Python loop) and, per batch, applies the batch's curvature to all
``K`` columns of ``V`` at once through ``vmap``. Batches are weighted so that the operator is
the curvature of the dataset loss:

- ``reduction="mean"``: the loss is the mean over all samples, so batch ``b`` of ``B_b``
  samples enters with weight ``B_b / N_data`` (exact for unequal batches);
- ``reduction="sum"``: the loss is the sum over samples; every batch has weight 1.

The reduction is read from ``criterion.reduction`` when present, else ``"mean"``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar, cast

import torch
from torch import Tensor, nn
from torch.func import grad, vjp, vmap

from hesse._compat import elementary_norms, math_attention
from hesse._data import Batch, Dataset, as_dataset
from hesse._distributed import resolve_shard
from hesse._functional import loss_function, sample_loss_function
from hesse._layout import ParamLayout
from hesse._memory import TARGET_COLUMNS, plan_chunk
from hesse._state import evaluation_mode
from hesse._transforms import (
    Fallbacks,
    dense_from_columns,
    diagonal_from_columns,
    hessian_columns,
    warn_fallback,
)
from hesse._validate import check_criterion, check_model, check_scalar_loss

__all__ = [
    "CurvatureOperator",
    "EmpiricalFisherOperator",
    "GGNOperator",
    "HessianOperator",
    "hvp",
]

Params = str | Sequence[str] | None
_REDUCTIONS = ("mean", "sum")
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_F = TypeVar("_F", bound=Callable[..., Any])


def _vectorised(method: _F) -> _F:
    """Run a per-batch method that uses vmap with the norm-layer workaround of `_compat`."""

    @functools.wraps(method)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        with elementary_norms():
            return method(*args, **kwargs)

    return cast(_F, wrapped)


def _reduction(criterion: Any, reduction: str | None) -> str:
    own = getattr(criterion, "reduction", None)
    if reduction is None:
        reduction = own if own is not None else "mean"
    elif own is not None and own != reduction:
        raise ValueError(
            f"reduction: {reduction!r} contradicts criterion.reduction={own!r}; the operator "
            "weights batches by how the criterion reduces over a batch. Drop the argument or "
            f"build the criterion with reduction={reduction!r}."
        )
    if reduction not in _REDUCTIONS:
        raise ValueError(
            f"reduction: expected 'mean' or 'sum', got {reduction!r}; a curvature operator "
            "needs a scalar loss per batch."
        )
    return reduction


class CurvatureOperator:
    """A symmetric curvature matrix of ``criterion(model(*inputs), target)`` over ``data``.

    Args:
        model: The module; evaluated in eval mode, its state restored after every product.
        criterion: A loss returning a scalar for a batch (``nn.Module`` or function).
        data: One ``(inputs, target)`` batch, or a re-iterable of them (a list, a
            ``DataLoader``); ``inputs`` is a tensor or a tuple of tensors.
        params: Parameter names or glob patterns; ``None`` selects every trainable parameter.
        reduction: ``"mean"`` or ``"sum"``; default ``criterion.reduction``, else ``"mean"``.
        progress: Show a progress bar over batches (needs ``tqdm``, the ``progress`` extra).
        check_deterministic: Read the data twice at construction and refuse data or models
            that change between passes (a shuffling ``DataLoader``, random augmentation, a
            model with randomness in eval mode): the operator would not be one matrix.
        process_group: With ``torch.distributed`` initialised, the group whose ranks each
            hold a shard of the data (default: the global group). Products are summed over
            the ranks with one all-reduce; every rank gets the same result.
        distributed: ``None`` (default): data-parallel exactly when ``torch.distributed`` is
            initialised. ``False``: this process's data only, even under ``torchrun``.

    Attributes:
        shape: ``(N, N)``.
        layout: The `ParamLayout` mapping rows to parameters.
        num_samples: Samples in the dataset.
    """

    def __init__(
        self,
        model: nn.Module,
        criterion: Callable[..., Tensor],
        data: Any,
        params: Params = None,
        *,
        reduction: str | None = None,
        progress: bool = False,
        check_deterministic: bool = False,
        process_group: Any = None,
        distributed: bool | None = None,
    ) -> None:
        self.model = check_model(model)
        self.criterion = check_criterion(criterion)
        self.reduction = _reduction(criterion, reduction)
        self.layout = ParamLayout.from_module(model, params)
        self.shard = resolve_shard(process_group, distributed, self.layout.device)
        self.data: Dataset = as_dataset(data, allow_empty=self.shard.distributed)
        self.progress = progress
        self._fallbacks = Fallbacks()
        self._parameters = dict(model.named_parameters(remove_duplicate=False))
        self._graph: tuple[Any, list[Tensor], Sequence[Tensor | None]] | None = None
        self._num_samples = self._agree_across_ranks()
        first = next(iter(self.data))
        with evaluation_mode(model), torch.no_grad():
            check_scalar_loss(criterion(model(*first.inputs), first.target))
        if check_deterministic:
            self._check_deterministic()

    def _agree_across_ranks(self) -> int:
        """The global sample count; every rank fails alike on an empty or mismatched shard."""
        dtype_code = list(_DTYPES).index(self.dtype) if self.dtype in _DTYPES else -1
        mine = [self.data.num_samples, self.layout.numel, dtype_code]
        ranks = self.shard.gather(mine)
        empty = [r for r, (count, _, _) in enumerate(ranks) if count == 0]
        if empty:
            raise ValueError(
                f"data: rank(s) {empty} of {len(ranks)} hold no samples; give every rank a "
                "non-empty shard (e.g. a DistributedSampler over a dataset with at least one "
                "sample per rank)."
            )
        layouts = {(n, d) for _, n, d in ranks}
        if len(layouts) > 1:
            found = ", ".join(
                f"rank {r}: N = {n}, {_DTYPES[d] if d >= 0 else 'other dtype'}"
                for r, (_, n, d) in enumerate(ranks)
            )
            raise ValueError(
                f"model: the ranks disagree on the selected parameters ({found}); every rank "
                "must build the same model with the same params= and dtype."
            )
        return sum(count for count, _, _ in ranks)

    # -- what it is ---------------------------------------------------------------------------

    @property
    def shape(self) -> tuple[int, int]:
        return (self.layout.numel, self.layout.numel)

    @property
    def dtype(self) -> torch.dtype:
        return self.layout.dtype

    @property
    def device(self) -> torch.device:
        return self.layout.device

    @property
    def param_names(self) -> tuple[str, ...]:
        return self.layout.names

    @property
    def num_samples(self) -> int:
        """Samples in the dataset: over all ranks when distributed."""
        return self._num_samples

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(shape={self.shape}, dtype={self.dtype}, "
            f"reduction={self.reduction!r}, samples={self.num_samples}, "
            f"batches={self.data.num_batches})"
        )

    # -- products ------------------------------------------------------------------------------

    def __matmul__(self, other: Tensor | dict[str, Tensor]) -> Any:
        if isinstance(other, dict):
            flat = self._check_dict(other)
            return self.layout.unflatten(self._matmat(flat[:, None])[:, 0])
        matrix = self._check_vector(other)
        out = self._matmat(matrix if other.ndim == 2 else matrix[:, None])
        return out if other.ndim == 2 else out[:, 0]

    def _matmat(self, matrix: Tensor) -> Tensor:
        """``(N, K) -> (N, K)``, columns in chunks that fit the cache."""
        theta = self.layout.gather(self.model)
        tangents = matrix.T
        # Accumulated as rows (K, N), the layout vmap returns: contiguous adds, one transpose.
        out = tangents.new_zeros(tangents.shape)
        for batch, weight in self._weighted_batches():
            for start in range(0, tangents.shape[0], TARGET_COLUMNS):
                rows = slice(start, start + TARGET_COLUMNS)
                out[rows].add_(self._batch_matmat(batch, theta, tangents[rows]), alpha=weight)
        return self.shard.all_reduce(out).T.contiguous()

    def to_dense(self) -> Tensor:
        """The ``(N, N)`` matrix, built from products with identity columns."""
        n = self.layout.numel
        self._check_fits((n, n))
        theta = self.layout.gather(self.model)
        out = theta.new_zeros(n, n)
        for batch, weight in self._weighted_batches():
            out += weight * self._batch_dense(batch, theta)
        return self.shard.all_reduce(out)

    def diagonal(self) -> Tensor:
        """The exact diagonal ``(N,)``."""
        theta = self.layout.gather(self.model)
        out = theta.new_zeros(self.layout.numel)
        for batch, weight in self._weighted_batches():
            out += weight * self._batch_diagonal(batch, theta)
        return self.shard.all_reduce(out)

    def to_scipy(self) -> Any:
        """A ``scipy.sparse.linalg.LinearOperator`` on NumPy arrays of this operator's dtype.

        SciPy is an optional extra (``pip install hesse[scipy]``). When SciPy's OpenBLAS and
        torch both use threads inside ARPACK they slow each other down; set
        ``OPENBLAS_NUM_THREADS=1`` before importing NumPy for ``eigsh`` on large operators.
        """
        try:
            from scipy.sparse.linalg import LinearOperator
        except ImportError as err:
            raise ImportError(
                "to_scipy() needs SciPy, an optional extra: pip install 'hesse[scipy]'."
            ) from err
        import numpy as np

        def apply(array: Any) -> Any:
            tensor = torch.as_tensor(np.asarray(array), dtype=self.dtype, device=self.device)
            return (self @ tensor).cpu().numpy()

        np_dtype = torch.empty((), dtype=self.dtype).numpy().dtype
        return LinearOperator(
            self.shape, matvec=apply, rmatvec=apply, matmat=apply, rmatmat=apply, dtype=np_dtype
        )

    # -- per batch (subclasses) ------------------------------------------------------------------

    def _batch_matmat(self, batch: Batch, theta: Tensor, tangents: Tensor) -> Tensor:
        """``(K, N) -> (K, N)``: the batch loss's curvature applied to each row."""
        raise NotImplementedError

    def _batch_dense(self, batch: Batch, theta: Tensor) -> Tensor:
        n = theta.numel()
        out = theta.new_empty(n, n)
        eye = torch.eye(n, dtype=theta.dtype, device=theta.device)
        for start in range(0, n, TARGET_COLUMNS):
            rows = eye[start : start + TARGET_COLUMNS]
            out[start : start + TARGET_COLUMNS] = self._batch_matmat(batch, theta, rows)
        return out

    def _batch_diagonal(self, batch: Batch, theta: Tensor) -> Tensor:
        raise NotImplementedError

    # -- plumbing -------------------------------------------------------------------------------

    def _weighted_batches(self) -> Iterator[tuple[Batch, float]]:
        batches: Any = self.data
        if self.progress:
            try:
                from tqdm.auto import tqdm
            except ImportError as err:
                raise ImportError(
                    "progress=True needs tqdm, an optional extra: pip install 'hesse[progress]'."
                ) from err
            batches = tqdm(batches, total=self.data.num_batches, desc=type(self).__name__)
        with evaluation_mode(self.model), torch.no_grad():
            for batch in batches:
                weight = batch.size / self._num_samples if self.reduction == "mean" else 1.0
                # Loading the batch stays outside: a mode would intercept every indexing op.
                with math_attention():
                    yield batch, weight

    def _check_vector(self, other: Any) -> Tensor:
        if not isinstance(other, Tensor):
            raise TypeError(
                f"vector: expected a tensor of shape (N,) or (N, K) or a dict of tensors keyed "
                f"by parameter name, got {type(other).__name__}."
            )
        n = self.layout.numel
        if other.ndim not in (1, 2) or other.shape[0] != n:
            raise ValueError(
                f"vector: expected shape ({n},) or ({n}, K) for this {self.shape[0]} x "
                f"{self.shape[1]} operator, got {tuple(other.shape)}."
            )
        if other.dtype != self.dtype:
            raise TypeError(
                f"vector: expected dtype {self.dtype} (the parameters'), got {other.dtype}; "
                f"convert it with v.to({self.dtype})."
            )
        if other.device != self.device:
            raise ValueError(
                f"vector: is on {other.device} but the operator is on {self.device}; move it "
                f"with v.to({str(self.device)!r})."
            )
        return other

    def _check_dict(self, other: dict[str, Tensor]) -> Tensor:
        if set(other) != set(self.layout.names):
            raise ValueError(
                f"vector: a dict needs exactly the keys {list(self.layout.names)}, got "
                f"{list(other)}."
            )
        for name, shape in zip(self.layout.names, self.layout.shapes):
            value = other[name]
            if not isinstance(value, Tensor) or value.shape != shape:
                given = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
                raise ValueError(f"vector[{name!r}]: expected shape {tuple(shape)}, got {given}.")
        return self._check_vector(self.layout.flatten(other))

    def _check_fits(self, shape: tuple[int, ...]) -> None:
        plan_chunk(
            what=f"{type(self).__name__}.to_dense",
            n=shape[-1],
            lead=(),
            output_shape=shape,
            dtype=self.dtype,
            device=self.device,
            chunk_size=1,
            activations=lambda: 0,
            alternatives=[
                ("products op @ V with fewer columns", None),
                ("op.diagonal()", shape[-1] * self.dtype.itemsize),
                ("params=[...]", None),
            ],
        )

    def _check_deterministic(self) -> None:
        def fingerprints() -> list[tuple[float, float]]:
            prints = []
            for batch, _ in self._weighted_batches():
                loss = self.criterion(self.model(*batch.inputs), batch.target)
                data = sum(float(x.double().sum()) for x in (*batch.inputs, batch.target))
                prints.append((float(loss), data))
            return prints

        first, second = fingerprints(), fingerprints()
        for index, (a, b) in enumerate(zip(first, second)):
            if a == b:
                continue
            if a[1] != b[1]:
                cause = f"the data changed (sums {a[1]!r} vs {b[1]!r}): shuffling or augmentation"
            else:
                cause = f"same data, loss {a[0]!r} vs {b[0]!r}: randomness in the model"
            raise ValueError(
                f"check_deterministic: two passes over the data differ at batch {index} "
                f"({cause}), so products would not come from one matrix. Use a DataLoader with "
                "shuffle=False and no random augmentation, and a model without randomness in "
                "eval mode."
            )


class HessianOperator(CurvatureOperator):
    r"""The Hessian of the dataset loss, $\nabla^2_\theta L$.

    Example:
        Least squares: $\frac{1}{2}\sum_i (w \cdot x_i)^2$ has Hessian $X^\top X$,
        the same whether the data come in one batch or two:

        >>> model = torch.nn.Linear(2, 1, bias=False)
        >>> X, y = torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.zeros(2, 1)
        >>> loss = lambda out, t: 0.5 * (out - t).pow(2).sum()
        >>> op = HessianOperator(model, loss, [(X[:1], y[:1]), (X[1:], y[1:])], reduction="sum")
        >>> op @ torch.tensor([1.0, 0.0])
        tensor([10., 14.])
    """

    def _columns(self, batch: Batch, theta: Tensor) -> Any:
        def columns_at(window: slice) -> Any:
            f = loss_function(
                self.model,
                self.layout.window(theta, window),
                self.criterion,
                batch.inputs,
                batch.target,
            )
            return self._fallbacks(hessian_columns(f, theta[window], scalar=True))

        return columns_at

    def _matmat(self, matrix: Tensor) -> Tensor:
        if matrix.shape[1] > 1:
            return super()._matmat(matrix)
        out = torch.zeros_like(matrix[:, 0])  # one column: no parameter vector needed
        for batch, weight in self._weighted_batches():
            out.add_(self._single_product(batch, matrix[:, 0]), alpha=weight)
        return self.shard.all_reduce(out)[:, None]

    def _batch_matmat(self, batch: Batch, theta: Tensor, tangents: Tensor) -> Tensor:
        if tangents.shape[0] == 1:
            return self._single_product(batch, tangents[0])[None]
        return self._vmapped_matmat(batch, theta, tangents)

    @_vectorised
    def _vmapped_matmat(self, batch: Batch, theta: Tensor, tangents: Tensor) -> Tensor:
        return self._columns(batch, theta)(slice(0, theta.numel()))(tangents)

    def _single_product(self, batch: Batch, v: Tensor) -> Tensor:
        # One product, as Lanczos and power iteration ask for: plain double backward through
        # the gradient graph, without torch.func overhead (about 2x faster for one vector).
        leaves, grads = self._gradient_graph(batch)
        tangent = self.layout.unflatten(v)
        pairs = [
            (g, tangent[n])
            for g, n in zip(grads, self.layout.names)
            if g is not None and g.requires_grad
        ]
        products: Sequence[Tensor | None] = [None] * len(leaves)
        if pairs:
            products = torch.autograd.grad(
                [g for g, _ in pairs],
                leaves,
                [t for _, t in pairs],
                retain_graph=self._graph is not None,
                allow_unused=True,
            )
        return torch.cat(
            [
                (h if h is not None else torch.zeros_like(leaf)).reshape(-1)
                for h, leaf in zip(products, leaves)
            ]
        )

    def _gradient_graph(self, batch: Batch) -> tuple[list[Tensor], Sequence[Tensor | None]]:
        """Leaves for the selected parameters and the loss gradient, with its graph.

        Over a one-batch dataset the graph is kept between products while nothing it depends
        on changes (parameters, buffers and data, by identity and version counter), so that a
        repeated product costs one backward pass; the memory it holds is the activations.
        """
        if self.data.num_batches > 1:
            # Nothing is kept: differentiate the model's own parameters (no functional_call
            # overhead); `evaluation_mode` restores the requires_grad flags switched on here.
            params: list[Tensor] = [self._parameters[n] for n in self.layout.names]
            for p in params:
                p.requires_grad_(True)
            with torch.enable_grad():
                loss = self.criterion(self.model(*batch.inputs), batch.target)
                return params, torch.autograd.grad(
                    loss, params, create_graph=True, allow_unused=True
                )
        tensors = (*self.model.parameters(), *self.model.buffers(), *batch.inputs)
        key = tuple((id(t), t._version) for t in (*tensors, batch.target))
        if self._graph is not None and self._graph[0] == key:
            return self._graph[1], self._graph[2]
        self._graph = None
        # Kept between products: leaves that share storage and version counter with the
        # parameters, so that the parameters' own requires_grad flags stay the user's.
        leaves = [self._parameters[n].detach().requires_grad_() for n in self.layout.names]
        with torch.enable_grad():
            output = torch.func.functional_call(
                self.model, dict(zip(self.layout.names, leaves)), batch.inputs
            )
            loss = self.criterion(output, batch.target)
            grads = torch.autograd.grad(loss, leaves, create_graph=True, allow_unused=True)
        self._graph = (key, leaves, grads)
        return leaves, grads

    @_vectorised
    def _batch_dense(self, batch: Batch, theta: Tensor) -> Tensor:
        n = theta.numel()
        return dense_from_columns(self._columns(batch, theta), n, (), TARGET_COLUMNS, theta)

    @_vectorised
    def _batch_diagonal(self, batch: Batch, theta: Tensor) -> Tensor:
        n = theta.numel()
        return diagonal_from_columns(self._columns(batch, theta), n, (), TARGET_COLUMNS, theta)


def _jacobian_products(
    f: Callable[[Tensor], Tensor], theta: Tensor, what: str
) -> tuple[Tensor, Callable[[Tensor], Tensor], Callable[[Tensor], Tensor]]:
    """``f(θ)`` with its Jacobian products ``v ↦ J v`` and ``u ↦ Jᵀ u``, one forward pass.

    ``J v`` needs no forward mode (``nn.LSTM`` has none): it is the VJP of the linear map
    ``u ↦ Jᵀ u``.
    """
    value, jt = vjp(f, theta)[:2]
    if not isinstance(value, Tensor):
        raise TypeError(
            f"model: {what} needs the model to return one tensor, got {type(value).__name__}."
        )
    j = vjp(lambda u: jt(u)[0], torch.zeros_like(value))[1]
    return value, lambda v: j(v)[0], lambda u: jt(u)[0]


class GGNOperator(CurvatureOperator):
    r"""The generalised Gauss-Newton matrix $\sum_b w_b J_b^\top H_b J_b$.

    $J_b$ is the Jacobian of the model's outputs on batch ``b`` with respect to the
    parameters and $H_b = \nabla^2_z \ell(z, y)$ the Hessian of the batch loss in the
    outputs ``z``. Positive semi-definite for convex losses (MSE, cross-entropy).
    """

    def _linearise(
        self, batch: Batch, theta: Tensor
    ) -> tuple[
        Callable[[Tensor], Tensor],
        Callable[[Tensor], Tensor],
        Callable[[Tensor], Tensor],
        tuple[int, ...],
    ]:
        def outputs(t: Tensor) -> Tensor:
            return torch.func.functional_call(self.model, self.layout.unflatten(t), batch.inputs)

        z, j, jt = _jacobian_products(outputs, theta, "the GGN")

        def loss_of_outputs(out: Tensor) -> Tensor:
            return self.criterion(out, batch.target)

        h = vjp(grad(loss_of_outputs), z.detach())[1]

        def hvp_(u: Tensor) -> Tensor:
            return h(u)[0]

        return j, hvp_, jt, tuple(z.shape)

    @_vectorised
    def _batch_matmat(self, batch: Batch, theta: Tensor, tangents: Tensor) -> Tensor:
        j, h, jt, _ = self._linearise(batch, theta)
        return vmap(lambda v: jt(h(j(v))))(tangents)

    @_vectorised
    def _batch_diagonal(self, batch: Batch, theta: Tensor) -> Tensor:
        # diag(Jᵀ H J) = Σ_r J_r ⊙ (Jᵀ H e_r), over the output entries r, a chunk at a time.
        _, h, jt, shape = self._linearise(batch, theta)
        out = theta.new_zeros(theta.numel())
        z_numel = torch.Size(shape).numel()
        eye = torch.eye(z_numel, dtype=theta.dtype, device=theta.device)
        for start in range(0, z_numel, TARGET_COLUMNS):
            e = eye[start : start + TARGET_COLUMNS].reshape(-1, *shape)
            rows = vmap(jt)(e)
            weighted = vmap(lambda u: jt(h(u)))(e)
            out += (rows * weighted).sum(0)
        return out


# Up to this many columns, empirical Fisher products go through the per-sample loss vector
# instead of the (B, N) per-sample gradients. Measured (MLP 64-96-96-10, N = 16,522, batch 512):
# 1 column 10.6 ms against 36 ms, 32 columns 37 ms against 43 ms, 128 columns 201 ms against
# 59 ms; writing the (B, N) gradients dominates for few columns, their reuse for many.
_FISHER_DIRECT_COLUMNS = 16


class EmpiricalFisherOperator(CurvatureOperator):
    r"""The empirical Fisher $c \sum_i g_i g_i^\top$ over all samples ``i``.

    $g_i$ is the gradient of sample ``i``'s own loss, ``criterion(model(x_i), y_i)``
    with ``x_i`` evaluated as a batch of one (so for ``MSELoss(reduction="mean")`` it is the
    mean over that sample's outputs). $c = 1/N_{data}$ for ``reduction="mean"`` and 1
    for ``"sum"``. Note that this differs from the Fisher (expectation under the model's
    predictive distribution) and, for ``"mean"``, from BackPACK's convention of per-batch
    gradients; it is what ``torch.func`` per-sample gradients give.
    """

    _through_losses = True  # products of few columns via the loss vector, until that fails

    @_vectorised
    def _per_sample_gradients(self, batch: Batch, theta: Tensor) -> Tensor:
        g = sample_loss_function(self.model, self.layout.unflatten, self.criterion)
        try:
            return vmap(grad(g), in_dims=(None, 0, *(0,) * len(batch.inputs)))(
                theta, batch.target, *batch.inputs
            )
        except (RuntimeError, NotImplementedError) as err:
            if not getattr(self, "_warned", False):
                self._warned = True
                warn_fallback(err, "a loop over samples", stacklevel=5)
            return torch.stack(
                [grad(g)(theta, t, *xs) for t, *xs in zip(batch.target, *batch.inputs)]
            )

    def _scale(self, batch: Batch) -> float:
        # The base class weights batches by B_b / N for "mean": use the batch mean here.
        return 1.0 / batch.size if self.reduction == "mean" else 1.0

    def _batch_matmat(self, batch: Batch, theta: Tensor, tangents: Tensor) -> Tensor:
        if tangents.shape[0] <= _FISHER_DIRECT_COLUMNS and self._through_losses:
            try:
                return self._scale(batch) * self._products_through_losses(batch, theta, tangents)
            except (RuntimeError, NotImplementedError):
                # Not for this model (vmap over samples): the per-sample path computes the
                # same, or says what failed; later products go there directly.
                self._through_losses = False
        g = self._per_sample_gradients(batch, theta)
        return self._scale(batch) * (tangents @ g.T) @ g

    @_vectorised
    def _products_through_losses(self, batch: Batch, theta: Tensor, tangents: Tensor) -> Tensor:
        """``Σ_i g_i (g_iᵀ v)`` without the ``(B, N)`` gradients: ``gᵢᵀ v`` for every sample
        is one Jacobian-vector product of the per-sample loss vector ``ℓ(θ)`` and the sum one
        vector-Jacobian product, ``J_ℓᵀ (J_ℓ v)``; cheaper for a few columns."""
        g = sample_loss_function(self.model, self.layout.unflatten, self.criterion)
        dims = (None, 0, *(0,) * len(batch.inputs))

        def losses(t: Tensor) -> Tensor:
            return vmap(g, in_dims=dims)(t, batch.target, *batch.inputs)  # (B,)

        _, j, jt = _jacobian_products(losses, theta, "the empirical Fisher")
        return vmap(lambda v: jt(j(v)))(tangents)

    def _batch_dense(self, batch: Batch, theta: Tensor) -> Tensor:
        g = self._per_sample_gradients(batch, theta)
        return self._scale(batch) * g.T @ g

    def _batch_diagonal(self, batch: Batch, theta: Tensor) -> Tensor:
        g = self._per_sample_gradients(batch, theta)
        return self._scale(batch) * g.pow(2).sum(0)


def hvp(
    model: nn.Module,
    criterion: Callable[..., Tensor],
    inputs: Tensor | tuple[Tensor, ...],
    target: Tensor,
    vector: Tensor | dict[str, Tensor],
    params: Params = None,
) -> Any:
    r"""The loss Hessian times ``vector``: $\nabla^2_\theta\, \ell(\theta)\, v$.

    Args:
        vector: A flat ``(N,)`` tensor, an ``(N, K)`` matrix (K products, vectorised), or a
            dict of tensors keyed by parameter name; the result has the same form.

    Example:
        >>> model = torch.nn.Linear(2, 1, bias=False)
        >>> X = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
        >>> hvp(model, lambda out, t: out.pow(2).sum(), X, torch.zeros(2, 1),
        ...     {"weight": torch.tensor([[0.0, 1.0]])})
        {'weight': tensor([[28., 40.]])}
    """
    # One batch: weight 1 for either reduction, so the product is the batch loss's Hessian.
    return HessianOperator(model, criterion, (inputs, target), params) @ vector
