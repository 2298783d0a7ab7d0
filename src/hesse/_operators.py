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

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from typing import Any, Literal, cast

import torch
import torch.autograd.forward_ad as fwAD  # noqa: N812
from torch import Tensor, nn
from torch.func import grad, vjp, vmap

from hesse._chain import ChainProducts, chain_products
from hesse._compat import load_forward_ad
from hesse._curvature import check_independent_samples, dense, diagonal, loss_curvature
from hesse._data import Batch, Dataset, as_dataset, model_fits
from hesse._distributed import agree_on_parameters, global_seed, resolve_shard
from hesse._functional import criterion_loss, evaluate, loss, sample_loss_function
from hesse._layers import (
    Factor,
    FactoredGGN,
    check_sampled,
    exact_factor,
    factored_ggn,
    ggn_diagonal_blocks,
    ggn_factors,
    linear_sites,
    sampled_factor,
)
from hesse._layout import ParamLayout, Params
from hesse._memory import TARGET_COLUMNS, check_dense_fits
from hesse._protocol import LayoutOperator
from hesse._scratch import Scratch
from hesse._state import check_training, model_scope
from hesse._transforms import Fallbacks, Strategy, _out_of_memory
from hesse._validate import (
    Seed,
    check_criterion,
    check_finite,
    check_flag,
    check_model,
    check_nonempty,
    check_scalar_loss,
    check_seed,
    integer,
    normal_target,
    normalize_inputs,
)

__all__ = [
    "CurvatureOperator",
    "EmpiricalFisherOperator",
    "GGNOperator",
    "HessianOperator",
    "hvp",
]

# "batchmean" (nn.KLDivLoss) divides the summed loss by the batch size: the mean over samples.
_REDUCTIONS = ("mean", "sum", "batchmean")


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
            f"reduction: expected 'mean', 'sum' or 'batchmean', got {reduction!r}; a curvature "
            "operator needs a scalar loss per batch (reduction='none' gives one per sample)."
        )
    return reduction


# The most a session keeps of the batches' factored GGNs over several batches (the influence
# benchmark's MLP 64-256-256-64-10 holds 23 MB per batch of 250 samples): rebuilding them
# cost about a third of each block product there.
_KEPT_FACTORED_BYTES = 1 << 29


def _batch_key(batch: Batch) -> tuple[Any, ...]:
    """What identifies a batch's tensors as they are now: their identities and versions."""
    return tuple((id(t), t._version) for t in batch.tensors())


@dataclass
class _Session:
    """What one call of an algorithm may reuse between its products (see `Operator.session`).

    The parameters resolved by name and their values when it began, and a kept gradient graph.
    """

    params: dict[str, Tensor]
    theta: Tensor
    graph: tuple[Any, ...] | None = None  # (key, batch tensors, {kind: graph}): see `_kept`
    bar: Any = None  # the call's progress bar (tqdm), with progress=True
    singles: int = 0  # single products of one batch so far (the choice of path)
    blocks: int = 0  # block products of one batch so far (the GGN's choice of path)
    # Over several batches: each batch's factored GGN by batch key (`GGNOperator._factored`),
    # with the batch tensors that key names, their bytes, and the temporaries they share.
    factored: dict[tuple[Any, ...], tuple[tuple[Tensor, ...], Any]] = field(default_factory=dict)
    factored_bytes: int = 0
    scratch: Scratch | None = None


class CurvatureOperator(LayoutOperator):
    """A symmetric curvature matrix of ``criterion(model(*inputs), target)`` over ``data``.

    Every product answers for the model, data and criterion as they are when it runs: the
    parameters are looked up by name, the data are read anew and weighted by the samples of
    that pass. Only inside one call of hesse's algorithms (``eigsh``, ``trace``,
    ``spectral_density``, ...), where nothing can change between products, is work reused: over
    a one-batch dataset the gradient graph is kept, so a repeated product costs one backward
    pass; over several batches a GGN of an MLP keeps each batch's layer factors for its block
    products, while the batch's tensors are the same and unchanged.

    Args:
        model: The module; evaluated in eval mode (train mode with ``training=True``), its
            state restored after every product.
        criterion: A loss ``criterion(output, target)`` returning a scalar for a batch
            (an ``nn.Module`` or a function).
        data: One ``(inputs, target)`` batch, or a re-iterable of them (a list, a
            ``DataLoader``); ``inputs`` is a tensor or a tuple of tensors. It is read anew
            by every product.
        params: The parameters: names, glob patterns (``"encoder.*"``) or the model's
            ``nn.Parameter`` objects, one or a list (``list(model[2].parameters())``);
            ``None`` selects every parameter with ``requires_grad=True``.
        reduction: How ``criterion`` reduces over a batch, which sets the batch weights:
            ``"mean"`` (batch ``b`` weighted ``B_b / N_data``), ``"sum"`` (weight 1) or
            ``"batchmean"`` (as ``"mean"``); default ``criterion.reduction``, else ``"mean"``.
        training: The curvature of the training-mode loss: modules in train mode, so BatchNorm
            normalises with the batch's statistics (its running statistics are left untouched);
            dropout stays off, since a random mask would make every product another matrix.
        progress: Show one progress bar per call (a product, ``to_dense()``, ``diagonal()``
            or a whole ``eigsh``, ``trace``, ...), counting batches (needs ``tqdm``, the
            ``progress`` extra).
        check_deterministic: Read the data twice at construction and refuse data or models
            that change between passes (a shuffling ``DataLoader``, random augmentation, a
            model with randomness in eval mode): the operator would not be one matrix.
        process_group: With ``torch.distributed`` initialised, the group whose ranks each
            hold a shard of the data (default: the global group). Products are summed over
            the ranks with one all-reduce; every rank gets the same result.
        distributed: ``None`` (default): data-parallel exactly when ``torch.distributed`` is
            initialised. ``False``: this process's data only, even under ``torchrun``.
            ``True``: require an initialised process group.

    Attributes:
        shape: ``(N, N)``.
        dtype: The parameters' dtype: products take and return it.
        device: The parameters' device.
        layout: The `ParamLayout` mapping rows to parameters.
        param_names: The selected parameters' names, in row order.
        num_samples: Samples in the dataset (over all ranks; as of the latest pass over it).
        reduction: ``"mean"``, ``"sum"`` or ``"batchmean"``: the argument, else
            ``criterion.reduction`` as it is at each product.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``, ``criterion`` is not callable or does
            not return a floating-point tensor, ``data`` is a one-shot iterator or not
            ``(inputs, target)`` batches, or a flag has the wrong type.
        ValueError: ``data`` holds no samples or batches of different structure, or does
            not fit the model (the forward pass fails on its first batch); the loss
            is not a scalar; ``reduction`` is not ``"mean"``, ``"sum"`` or ``"batchmean"`` or
            contradicts ``criterion.reduction``; ``params`` names no parameter or selects
            none; a selected parameter is NaN or infinite; ``check_deterministic=True`` and
            two passes differ; ``process_group`` or ``distributed`` do not match the state
            of ``torch.distributed``, or the ranks disagree on the parameters or hold no
            samples.
        ImportError: ``progress=True`` without ``tqdm``.
    """

    def __init__(
        self,
        model: nn.Module,
        criterion: Callable[..., Tensor],
        data: Any,
        params: Params = None,
        *,
        reduction: Literal["mean", "sum", "batchmean"] | None = None,
        training: bool = False,
        progress: bool = False,
        check_deterministic: bool = False,
        process_group: Any = None,
        distributed: bool | None = None,
    ) -> None:
        self.model = check_model(model)
        self.criterion = check_criterion(criterion)
        self._reduction_arg = reduction
        _reduction(criterion, reduction)  # checked now; read anew where it is used
        self.training = check_training(training)
        check_flag("check_deterministic", check_deterministic)
        self._check_training()
        self.layout = ParamLayout.from_module(model, params)
        self._shard = resolve_shard(process_group, distributed, self.layout.device)
        with torch.inference_mode(False):
            self.data: Dataset = as_dataset(data, allow_empty=self._shard.distributed)
        self.progress = check_flag("progress", progress)
        self._policies: dict[str, Fallbacks] = {}
        self._block_path: str | None = None  # "block" or "singles", measured on first uses
        self._block_times: list[float] = []  # seconds per column of the first blocks
        self._timing_spoilt = False  # this block also timed alternatives (the GGN's factors)
        self._active: _Session | None = None
        self._num_samples = self._agree_across_ranks()
        self._num_batches = self.data.num_batches  # this rank's, as of the latest pass
        with self.session():
            first = next(iter(self.data))
            with model_fits("data", first, self.dtype):
                self._check_batch(first)
            if check_deterministic:
                self._check_deterministic()

    @property
    def reduction(self) -> str:
        """``"mean"``, ``"sum"`` or ``"batchmean"``, read anew on every use.

        The argument, else ``criterion.reduction`` as it is now: a criterion whose reduction
        changes after construction is followed.
        """
        return _reduction(self.criterion, self._reduction_arg)

    def _check_training(self) -> None:
        """Refuse ``training=True`` where it has no meaning (per-sample curvature)."""

    def _check_batch(self, batch: Batch) -> None:
        """One forward pass at construction: the loss is a scalar."""
        check_scalar_loss(loss(self.criterion, self.model, None, batch.inputs, batch.target))

    def _agree_across_ranks(self) -> int:
        """The global sample count; every rank fails alike on an empty or mismatched shard."""
        counts = agree_on_parameters(self.shard, self.layout, self.data.num_samples)
        empty = [r for r, count in enumerate(counts) if count == 0]
        if empty:
            raise ValueError(
                f"data: rank(s) {empty} of {len(counts)} hold no samples; give every rank a "
                "non-empty shard (e.g. a DistributedSampler over a dataset with at least one "
                "sample per rank)."
            )
        return sum(counts)

    # -- what it is (shape, dtype, device, shard, param_names: `LayoutOperator`) -------------

    @property
    def num_samples(self) -> int:
        """Samples in the dataset: over all ranks when distributed, as of the latest pass."""
        return self._num_samples

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(shape={self.shape}, dtype={self.dtype}, "
            f"reduction={self.reduction!r}, samples={self.num_samples}, "
            f"batches={self._num_batches})"
        )

    # -- sessions -------------------------------------------------------------------------------

    @contextmanager
    def session(self) -> Iterator[None]:
        """A block within which products may reuse work; nothing may change the model meanwhile.

        Inside, the parameters are looked up once, the model stays in the operator's mode
        under ``torch.no_grad()``, and a one-batch ``HessianOperator`` keeps its gradient
        graph, so each further single product costs one backward pass (a ``GGNOperator`` of an
        MLP keeps each batch's layer factors for block products over several batches); with
        ``progress=True`` one bar counts the batches of every product in the block. hesse's
        algorithms open one per call. Every product outside a session opens its own, so it
        sees the model exactly as it is then. Sessions nest: an inner one joins the outer.

        Yields:
            None; use it as ``with op.session(): ...``.

        Raises:
            ValueError: A selected parameter no longer exists, changed shape, dtype or
                device, or is NaN or infinite.
        """
        if self._active is not None:
            yield
            return
        with model_scope(self.model, training=self.training):
            params = self._resolve_parameters()
            theta = torch.cat([params[n].detach().reshape(-1) for n in self.layout.names])
            check_finite(self.model, self.layout, theta)
            self._active = _Session(params, theta, bar=self._progress_bar())
            try:
                yield
            finally:
                if self._active.bar is not None:
                    self._active.bar.close()
                self._active = None

    def _progress_bar(self) -> Any:
        """One bar per call (a session), counting batches over all of its products."""
        if not self.progress:
            return None
        try:
            from tqdm.auto import tqdm
        except ImportError as err:
            raise ImportError(
                "progress=True needs tqdm, an optional extra: pip install 'hesse[progress]'."
            ) from err
        return tqdm(desc=type(self).__name__, unit=" batches", leave=False)

    def _resolve_parameters(self) -> dict[str, Tensor]:
        """The selected parameters of the model as it is now, by name.

        A replaced ``Parameter`` is used; a changed shape, dtype or device is refused.
        """
        named = dict(self.model.named_parameters(remove_duplicate=False))
        layout = self.layout
        for name, shape in zip(layout.names, layout.shapes):
            p = named.get(name)
            if p is None:
                raise ValueError(
                    f"model: the parameter {name!r} this operator was built on no longer "
                    "exists; build a new operator for the changed model."
                )
            if p.shape != shape or p.dtype != layout.dtype or p.device != layout.device:
                raise ValueError(
                    f"model: the parameter {name!r} is now {tuple(p.shape)} {p.dtype} on "
                    f"{p.device}, but the operator was built for {tuple(shape)} {layout.dtype} "
                    f"on {layout.device}; build a new operator for the changed model."
                )
        return {n: named[n] for n in layout.names}

    @property
    def _state(self) -> _Session:
        assert self._active is not None, "inside a session only"
        return self._active

    def _kept(
        self, batch: Batch, build: Callable[[], Any], kind: str = "graph"
    ) -> tuple[Any, bool]:
        """``build()``'s graph (of ``kind``) for ``batch`` and whether it is kept.

        Over a one-batch dataset it is kept for the session, so a repeated product replays it.
        The key is the batch tensors' identity and version; the entry holds the tensors, so
        their identities cannot be reused by others while it lives.
        """
        session = self._state
        tensors = batch.tensors()
        key = _batch_key(batch)
        keep = self.data.num_batches == 1
        if keep and session.graph is not None and session.graph[0] == key:
            if kind in session.graph[2]:
                return session.graph[2][kind], True
        else:
            session.graph = None
        graph = build()
        if keep:
            if session.graph is None:
                session.graph = (key, tensors, {})
            session.graph[2][kind] = graph
        return graph, keep

    _chain_off = False  # set once the chain's products raised (a criterion vmap cannot batch)

    def _chain(self, batch: Batch) -> ChainProducts | None:
        """The hand-written products of an MLP (`hesse._chain`), or None for another model.

        Kept for a session over one batch, like a gradient graph. Used for blocks of columns:
        a single product through a kept gradient graph costs one backward pass, cheaper than
        the chain's fixed costs (a lone float32 product took 9 ms by the chain against 4 ms).
        """
        if self._chain_off:
            return None

        def build() -> ChainProducts | None:
            return chain_products(
                self.model,
                self.layout,
                self._state.params,
                batch.inputs,
                batch.target,
                self.criterion,
            )

        return cast("ChainProducts | None", self._kept(batch, build, kind="chain")[0])

    def _chain_single(self, batch: Batch, v: Tensor, *, ggn: bool) -> Tensor | None:
        """One product ``(N,)`` through an MLP's chain, or None (another path serves it).

        From a session's second single product on, over one batch: the chain is then kept,
        and its product beats a backward pass through a kept graph (MLP 64-96-96-10, batch
        512: Hessian 2.4 against 3.8 ms in float64, 1.5 against 2.0 ms in float32; GGN 1.6
        ms). A lone product does not pay for building the chain.
        """
        if self.data.num_batches != 1 or self._state.singles < 2:
            return None
        chain = self._chain(batch)
        out = None if chain is None else self._by_chain(chain, v[None], ggn=ggn)
        return None if out is None else out[0]

    def _by_chain(self, chain: ChainProducts, tangents: Tensor, *, ggn: bool) -> Tensor | None:
        """The chain's products, or None (and the chain off for this operator).

        None when the criterion's Hessian cannot be vectorised over the columns: the general
        path and its fallbacks take over.
        """
        try:
            return chain.ggn(tangents) if ggn else chain.hessian(tangents)
        except (RuntimeError, NotImplementedError) as err:
            if _out_of_memory(err):
                raise
            self._chain_off = True
            return None

    def _lanczos_start(self) -> Tensor:
        """The loss gradient over the data, ``(N,)``: where Lanczos starts for top eigenvalues.

        The gradient of a network's loss lies mostly in the span of its curvature's top
        eigenvectors (Gur-Ari et al., 2018, "Gradient descent happens in a tiny subspace"; at
        the edge of stability it oscillates along the top one), so a start vector with a
        gradient component reaches the top eigenvalue in fewer products than a random one: 28
        against 33 for the benchmarks' MLP Hessian (N = 16,522, to √eps). One forward and
        backward pass per batch, inside the caller's session.
        """
        names = self.layout.names

        def per_batch(batch: Batch) -> Tensor:
            leaves = [self._state.params[n].detach().requires_grad_() for n in names]
            with torch.enable_grad():
                params = dict(zip(names, leaves))
                value = loss(self.criterion, self.model, params, batch.inputs, batch.target)
                grads = torch.autograd.grad(value, leaves, allow_unused=True)
            return _flat(grads, leaves)

        return self._accumulate(per_batch, self._state.theta.new_zeros(self.layout.numel))

    def _policy(self, kind: str) -> Fallbacks:
        """The fallback policy of one kind of computation (`hesse._transforms.Fallbacks`)."""
        return self._policies.setdefault(kind, Fallbacks())

    # -- products ------------------------------------------------------------------------------

    def __matmul__(self, other: Tensor | dict[str, Tensor]) -> Any:
        """``op @ V``: the curvature over the whole dataset applied to ``V``.

        Args:
            other: A vector ``(N,)``, a block ``(N, K)`` (all ``K`` columns in one vectorised
                pass per batch), or a dict with one tensor per selected parameter, shaped like
                it; in the operator's dtype, on its device.

        Returns:
            The product, in the form of ``other``: ``(N,)``, ``(N, K)`` or a dict.

        Raises:
            TypeError: ``other`` is neither a tensor nor a dict, or has another dtype.
            ValueError: ``other`` has the wrong shape, device or dict keys; or a parameter
                changed (see `session`), or the data hold no samples in this pass.
        """
        with self.session():
            return self._product(other, self._matmat)

    _blocks_timed = 2  # block products timed before choosing blocks or singles

    def _matmat(self, matrix: Tensor) -> Tensor:
        """``(N, K) -> (N, K)``: a vectorised block, or K single products if faster.

        Vectorising K columns shares the forward pass and the gradient, but on some models
        (convolutions on the CPU) the batched second backward is slower than K plain ones: a
        ResNet-style CNN took 1.7 s for a block of 16 against 0.76 s for 16 single products.
        The first few block products (two; three for the GGN, one of whose blocks times its
        own alternatives) are timed against single products, once per operator, and the
        faster path is kept; the numbers are the same either way.
        """
        k = matrix.shape[1]
        if k == 1 or self._block_path == "block":
            return self._columns(matrix)
        if self._block_path == "singles":
            out = torch.empty_like(matrix)
            for i in range(k):  # inside this product's session: a one-batch graph is kept
                out[:, i] = self._columns(matrix[:, i].contiguous()[:, None])[:, 0]
            return out
        self._timing_spoilt = False
        start = time.perf_counter()
        out = self._columns(matrix)
        # A block that also timed alternatives of its own (the GGN's factors) is no measure.
        spent = (time.perf_counter() - start) / k
        self._block_times.append(float("inf") if self._timing_spoilt else spent)
        # The first call pays one-time costs: decide on the best of the first few (as many on
        # every rank, so that the all-reduce below matches).
        if len(self._block_times) >= self._blocks_timed:
            column = matrix[:, :1].contiguous()
            singles = []
            for _ in range(3):  # the first builds what a session keeps (a one-batch graph)
                start = time.perf_counter()
                self._columns(column)
                singles.append(time.perf_counter() - start)
            # Every rank must take the same path (their collectives must match): decide on
            # the times summed over the ranks.
            times = torch.tensor([min(singles[1:]), min(self._block_times)], dtype=torch.float64)
            single, block = self.shard.all_reduce(times).tolist()
            self._block_path = "singles" if single < 0.8 * block else "block"
        return out

    def _columns(self, matrix: Tensor) -> Tensor:
        """``(N, K) -> (N, K)``, columns in chunks that fit the cache."""
        tangents = matrix.T
        k = tangents.shape[0]

        def per_batch(batch: Batch) -> Tensor:
            # Accumulated as rows (K, N), the layout vmap returns: contiguous adds.
            if k == 1:
                return self._batch_product(batch, tangents[0])[None]
            if k <= TARGET_COLUMNS:
                return self._batch_matmat(batch, tangents)
            out = tangents.new_empty(tangents.shape)
            for start in range(0, k, TARGET_COLUMNS):
                rows = slice(start, start + TARGET_COLUMNS)
                out[rows] = self._batch_matmat(batch, tangents[rows])
            return out

        return self._accumulate(per_batch, tuple(tangents.shape)).T.contiguous()

    def to_dense(self) -> Tensor:
        """The ``(N, N)`` matrix, built from products with identity columns.

        Returns:
            ``(N, N)`` in the operator's dtype, on its device.

        Raises:
            MemoryBudgetError: The matrix would not fit in the device's memory (checked
                before allocating).
        """
        n = self.layout.numel
        with self.session():
            self._check_fits((n, n))
            return self._accumulate(self._batch_dense, self._state.theta.new_zeros(n, n))

    def diagonal(self) -> Tensor:
        """The exact diagonal, without forming the matrix.

        Returns:
            ``(N,)`` in the operator's dtype, on its device. Per batch, parameters of
            verified linear layers cost one product per output unit (Hessian) or one
            backward pass per class for all of them (GGN); any other parameter one Hessian
            column (Hessian) or two vector-Jacobian products per output entry (GGN). The
            empirical Fisher costs one gradient per sample.
        """
        with self.session():
            out = self._state.theta.new_zeros(self.layout.numel)
            return self._accumulate(self._batch_diagonal, out)

    # -- per batch (subclasses) ------------------------------------------------------------------

    def _batch_matmat(self, batch: Batch, tangents: Tensor) -> Tensor:
        """``(K, N) -> (K, N)``: the batch loss's curvature applied to each row."""
        raise NotImplementedError

    def _batch_product(self, batch: Batch, v: Tensor) -> Tensor:
        """``(N,) -> (N,)``: one product, as Lanczos asks for."""
        return self._batch_matmat(batch, v[None])[0]

    def _batch_dense(self, batch: Batch) -> Tensor:
        n = self.layout.numel
        out = self._state.theta.new_empty(n, n)
        eye = torch.eye(n, dtype=self.dtype, device=self.device)
        for start in range(0, n, TARGET_COLUMNS):
            rows = eye[start : start + TARGET_COLUMNS]
            out[start : start + TARGET_COLUMNS] = self._batch_matmat(batch, rows)
        return out

    def _batch_diagonal(self, batch: Batch) -> Tensor:
        raise NotImplementedError

    # -- plumbing -------------------------------------------------------------------------------

    def _batches(self) -> Iterator[tuple[int, Batch]]:
        """The non-empty batches of one pass, with their positions in the data."""
        bar = self._state.bar
        for index, batch in enumerate(self.data):
            if bar is not None:
                bar.update(1)
            if batch.size:  # an empty batch adds nothing (and its mean loss is NaN)
                yield index, batch

    def _accumulate(
        self, per_batch: Callable[[Batch], Tensor], out: Tensor | tuple[int, ...]
    ) -> Tensor:
        """``Σ_b w_b per_batch(b)`` over one pass of the data, summed over the ranks.

        ``w_b = B_b / N`` for a mean-reduced loss and 1 for a sum, with ``N`` the samples of
        this very pass: a list that grew since construction is weighted by what it holds now.
        ``out`` is zeros to add into, or the result's shape: the sum then starts from the first
        batch's weighted result (no zeros to fill and add to), and one batch on one process
        is its own result, unweighted.
        """
        mean = self.reduction != "sum"
        count = batches = 0
        first: tuple[Tensor, int] | None = None
        for index, batch in self._batches():
            count += batch.size
            batches += 1
            # Only the first batch was checked at construction: name the one that fails.
            with model_fits("data", batch, self.dtype, where=f"batch {index}"):
                part = per_batch(batch)
            if not isinstance(out, Tensor):
                if first is None:
                    first = (part, batch.size)
                    continue
                out = first[0] * (first[1] if mean else 1)  # a second batch: start the sum
            out.add_(part, alpha=batch.size if mean else 1)
        if not isinstance(out, Tensor):  # at most one batch here
            if first is None:  # none on this rank
                out = self._state.theta.new_zeros(out)
            elif self.shard.distributed or count == 0:
                out = first[0] * (first[1] if mean else 1)
            else:  # w = 1
                self._num_samples, self._num_batches = count, batches
                return first[0]
        if self.shard.distributed:
            total = self.shard.all_reduce(torch.tensor([count], dtype=torch.float64))
            count = int(total.item())
        if count == 0:
            raise ValueError(
                "data: no samples in this pass over the data (it held some when the operator "
                "was built); an operator needs data to have curvature."
            )
        self._num_samples, self._num_batches = count, batches
        out = self.shard.all_reduce(out)
        return out.div_(count) if mean else out

    def _check_fits(self, shape: tuple[int, ...]) -> None:
        what = f"{type(self).__name__}.to_dense"
        # The sum over batches, one batch's matrix and the identity it multiplies.
        alternatives = [("params=[...]", None)]
        check_dense_fits(what, shape[-1], self.dtype, self.device, alternatives, copies=3)

    def _check_deterministic(self) -> None:
        def fingerprints() -> list[tuple[float, float]]:
            prints = []
            for _, batch in self._batches():
                value = loss(self.criterion, self.model, None, batch.inputs, batch.target)
                data = sum(float(x.double().sum()) for x in batch.tensors())
                prints.append((float(value), data))
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

    $L$ is the loss over all of ``data``: the mean over samples for ``reduction="mean"``
    (batches weighted by their size), the sum for ``"sum"``. Over a one-batch dataset the
    gradient graph is kept within one call of an algorithm, so each further Lanczos product
    costs one backward pass.

    The constructor, products and methods are those of `CurvatureOperator`.

    Args:
        model: The module; evaluated in eval mode (train mode with ``training=True``), its
            state restored after every product.
        criterion: A loss ``criterion(output, target)`` returning a scalar for a batch
            (an ``nn.Module`` or a function).
        data: One ``(inputs, target)`` batch, or a re-iterable of them (a list, a
            ``DataLoader``); ``inputs`` is a tensor or a tuple of tensors. It is read anew
            by every product.
        params: The parameters: names, glob patterns (``"encoder.*"``) or the model's
            ``nn.Parameter`` objects, one or a list (``list(model[2].parameters())``);
            ``None`` selects every parameter with ``requires_grad=True``.
        reduction: How ``criterion`` reduces over a batch, which sets the batch weights:
            ``"mean"`` (batch ``b`` weighted ``B_b / N_data``), ``"sum"`` (weight 1) or
            ``"batchmean"`` (as ``"mean"``); default ``criterion.reduction``, else ``"mean"``.
        training: The curvature of the training-mode loss: modules in train mode, so BatchNorm
            normalises with the batch's statistics (its running statistics are left untouched);
            dropout stays off, since a random mask would make every product another matrix.
        progress: Show one progress bar per call (a product, ``to_dense()``, ``diagonal()``
            or a whole ``eigsh``, ``trace``, ...), counting batches (needs ``tqdm``, the
            ``progress`` extra).
        check_deterministic: Read the data twice at construction and refuse data or models
            that change between passes (a shuffling ``DataLoader``, random augmentation, a
            model with randomness in eval mode): the operator would not be one matrix.
        process_group: With ``torch.distributed`` initialised, the group whose ranks each
            hold a shard of the data (default: the global group). Products are summed over
            the ranks with one all-reduce; every rank gets the same result.
        distributed: ``None`` (default): data-parallel exactly when ``torch.distributed`` is
            initialised. ``False``: this process's data only, even under ``torchrun``.
            ``True``: require an initialised process group.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``, ``criterion`` is not callable or does
            not return a floating-point tensor, ``data`` is a one-shot iterator or not
            ``(inputs, target)`` batches, or a flag has the wrong type.
        ValueError: ``data`` holds no samples or batches of different structure, or does
            not fit the model (the forward pass fails on its first batch); the loss
            is not a scalar; ``reduction`` is not ``"mean"``, ``"sum"`` or ``"batchmean"`` or
            contradicts ``criterion.reduction``; ``params`` names no parameter or selects
            none; a selected parameter is NaN or infinite; ``check_deterministic=True`` and
            two passes differ; ``process_group`` or ``distributed`` do not match the state
            of ``torch.distributed``, or the ranks disagree on the parameters or hold no
            samples.
        ImportError: ``progress=True`` without ``tqdm``.

    Examples:
        Least squares: $\frac{1}{2}\sum_i (w \cdot x_i)^2$ has Hessian $X^\top X$,
        the same whether the data come in one batch or two:

        >>> model = torch.nn.Linear(2, 1, bias=False)
        >>> X, y = torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.zeros(2, 1)
        >>> loss = lambda out, t: 0.5 * (out - t).pow(2).sum()
        >>> op = HessianOperator(model, loss, [(X[:1], y[:1]), (X[1:], y[1:])], reduction="sum")
        >>> op @ torch.tensor([1.0, 0.0])
        tensor([10., 14.])
    """

    def _curvature(self, batch: Batch) -> Any:
        return loss_curvature(
            self.model,
            self.layout,
            self.criterion,
            batch.inputs,
            batch.target,
            self._policy("columns"),
        )

    def _batch_matmat(self, batch: Batch, tangents: Tensor) -> Tensor:
        chain = self._chain(batch)
        if chain is not None:
            out = self._by_chain(chain, tangents, ggn=False)
            if out is not None:
                return out
        theta = self._state.theta
        return self._curvature(batch).columns(self.layout, theta, slice(0, theta.numel()))(tangents)

    def _batch_product(self, batch: Batch, v: Tensor) -> Tensor:
        # One product, as Lanczos and power iteration ask for: plain double backward through
        # the gradient graph, without torch.func overhead (about 2x faster for one vector);
        # from a session's second product on, an MLP's through its kept chain.
        self._state.singles += 1
        by_chain = self._chain_single(batch, v, ggn=False)
        if by_chain is not None:
            return by_chain
        leaves, grads, retain = self._gradient_graph(batch)
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
                retain_graph=retain,
                allow_unused=True,
            )
        return _flat(products, leaves)

    def _gradient_graph(self, batch: Batch) -> tuple[list[Tensor], Sequence[Tensor | None], bool]:
        """Leaves for the selected parameters, the loss gradient with its graph, and kept-ness.

        The graph is kept within the session (`_kept`). The leaves are detached views of the
        parameters (their hooks, ``requires_grad`` flags and ``.grad`` stay the user's), so a
        repeated product costs one backward pass.
        """

        def build() -> tuple[list[Tensor], Sequence[Tensor | None]]:
            names = self.layout.names
            leaves = [self._state.params[n].detach().requires_grad_() for n in names]
            with torch.enable_grad():
                params = dict(zip(names, leaves))
                value = loss(self.criterion, self.model, params, batch.inputs, batch.target)
                grads = torch.autograd.grad(value, leaves, create_graph=True, allow_unused=True)
            return leaves, grads

        (leaves, grads), kept = self._kept(batch, build)
        return leaves, grads, kept

    def _batch_dense(self, batch: Batch) -> Tensor:
        what = f"{type(self).__name__}.to_dense"
        return dense(self._curvature(batch), self.layout, None, what, self._state.theta)

    def _batch_diagonal(self, batch: Batch) -> Tensor:
        what = f"{type(self).__name__}.diagonal"
        return diagonal(self._curvature(batch), None, what, self._state.theta)


def _jacobian_products(
    f: Callable[[Tensor], Tensor], theta: Tensor
) -> tuple[Tensor, Callable[[Tensor], Tensor], Callable[[Tensor], Tensor]]:
    """``f(θ)`` with its Jacobian products ``v ↦ J v`` and ``u ↦ Jᵀ u``, one forward pass.

    ``J v`` needs no forward mode (``nn.LSTM`` has none): it is the VJP of the linear map
    ``u ↦ Jᵀ u``.
    """
    value, jt = vjp(f, theta)[:2]
    j = vjp(lambda u: jt(u)[0], torch.zeros_like(value))[1]
    return value, lambda v: j(v)[0], lambda u: jt(u)[0]


def _flat(grads: Sequence[Tensor | None], leaves: Sequence[Tensor]) -> Tensor:
    """Per-leaf results as one flat vector, zeros where autograd returned None (unused)."""
    return torch.cat(
        [(g if g is not None else torch.zeros_like(t)).reshape(-1) for g, t in zip(grads, leaves)]
    )


def _autograd_grad(output: Tensor, inputs: Tensor, weights: Tensor) -> Tensor:
    """``∂(output · weights)/∂inputs`` by plain autograd, zeros where it does not depend."""
    if not output.requires_grad:
        return torch.zeros_like(inputs)
    (result,) = torch.autograd.grad(output, inputs, weights, retain_graph=True, allow_unused=True)
    return torch.zeros_like(inputs) if result is None else result


def _factors_pay(model: nn.Module, layout: ParamLayout, batch: Batch) -> bool:
    """Whether factored GGN products beat autograd's on this model and batch (`_pays`)."""
    sites = linear_sites(model, layout)
    covered = {n for site in sites for n in site.names}
    if not sites or covered != set(layout.names) or not batch.size:
        return False
    with torch.no_grad():
        output = evaluate(model, None, batch.inputs)
    if not isinstance(output, Tensor) or output.ndim == 0:
        return False
    return _pays([site.module for site in sites], output[0].numel(), batch.size)


def _agree(out: Tensor, reference: Tensor) -> bool:
    """Two routes' products agree to the square root of the dtype's precision."""
    tol = torch.finfo(reference.dtype).eps ** 0.5
    scale = float(reference.abs().max()) if reference.numel() else 0.0
    return torch.allclose(out, reference, rtol=tol, atol=tol * scale)


def _pays(layers: Sequence[nn.Linear], classes: int, samples: int) -> bool:
    """Whether factored products beat autograd's: ``C`` classes, linear ``layers``.

    They cost two matrix products per layer and column against about three: a win when the
    outputs' factor is narrow (``C * Σ d_out`` at most half the layers' ``Σ d_out (d_in + 1)``)
    and its ``C x B x Σ d_out`` numbers are few (2**24).
    """
    outputs = sum(m.out_features for m in layers)
    columns = sum(m.out_features * (m.in_features + 1) for m in layers)
    return 2 * classes * outputs <= columns and classes * samples * outputs <= 1 << 24


class GGNOperator(CurvatureOperator):
    r"""The generalised Gauss-Newton matrix $\sum_b w_b J_b^\top H_b J_b$.

    $J_b$ is the Jacobian of the model's outputs on batch ``b`` with respect to the
    parameters and $H_b = \nabla^2_z \ell(z, y)$ the Hessian of the batch loss in the
    outputs ``z``. Positive semi-definite for convex losses (MSE, cross-entropy).

    The constructor, products and methods are those of `CurvatureOperator`.

    Args:
        model: The module; evaluated in eval mode (train mode with ``training=True``), its
            state restored after every product.
        criterion: A loss ``criterion(output, target)`` returning a scalar for a batch
            (an ``nn.Module`` or a function).
        data: One ``(inputs, target)`` batch, or a re-iterable of them (a list, a
            ``DataLoader``); ``inputs`` is a tensor or a tuple of tensors. It is read anew
            by every product.
        params: The parameters: names, glob patterns (``"encoder.*"``) or the model's
            ``nn.Parameter`` objects, one or a list (``list(model[2].parameters())``);
            ``None`` selects every parameter with ``requires_grad=True``.
        reduction: How ``criterion`` reduces over a batch, which sets the batch weights:
            ``"mean"`` (batch ``b`` weighted ``B_b / N_data``), ``"sum"`` (weight 1) or
            ``"batchmean"`` (as ``"mean"``); default ``criterion.reduction``, else ``"mean"``.
        training: The curvature of the training-mode loss: modules in train mode, so BatchNorm
            normalises with the batch's statistics (its running statistics are left untouched);
            dropout stays off, since a random mask would make every product another matrix.
        progress: Show one progress bar per call (a product, ``to_dense()``, ``diagonal()``
            or a whole ``eigsh``, ``trace``, ...), counting batches (needs ``tqdm``, the
            ``progress`` extra).
        check_deterministic: Read the data twice at construction and refuse data or models
            that change between passes (a shuffling ``DataLoader``, random augmentation, a
            model with randomness in eval mode): the operator would not be one matrix.
        process_group: With ``torch.distributed`` initialised, the group whose ranks each
            hold a shard of the data (default: the global group). Products are summed over
            the ranks with one all-reduce; every rank gets the same result.
        distributed: ``None`` (default): data-parallel exactly when ``torch.distributed`` is
            initialised. ``False``: this process's data only, even under ``torchrun``.
            ``True``: require an initialised process group.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``, ``criterion`` is not callable or does
            not return a floating-point tensor, the model does not return one tensor (the
            outputs ``z``), ``data`` is a one-shot iterator or not
            ``(inputs, target)`` batches, or a flag has the wrong type.
        ValueError: ``data`` holds no samples or batches of different structure, or does
            not fit the model (the forward pass fails on its first batch); the loss
            is not a scalar; ``reduction`` is not ``"mean"``, ``"sum"`` or ``"batchmean"`` or
            contradicts ``criterion.reduction``; ``params`` names no parameter or selects
            none; a selected parameter is NaN or infinite; ``check_deterministic=True`` and
            two passes differ; ``process_group`` or ``distributed`` do not match the state
            of ``torch.distributed``, or the ranks disagree on the parameters or hold no
            samples.
        ImportError: ``progress=True`` without ``tqdm``.

    Examples:
        For a linear model $z = Xw$ and $\frac{1}{2}\lVert z\rVert^2$, $J = X$ and
        $H = I$: the GGN is $X^\top X$, as is the Hessian:

        >>> model = torch.nn.Linear(2, 1, bias=False)
        >>> X, y = torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.zeros(2, 1)
        >>> loss = lambda out, t: 0.5 * (out - t).pow(2).sum()
        >>> GGNOperator(model, loss, (X, y), reduction="sum").to_dense()
        tensor([[10., 14.],
                [14., 20.]])
    """

    _factored_off = False  # set once a batch could not take the factored products
    _blocks_timed = 3  # one of the first blocks may time the factors against autograd

    def _check_batch(self, batch: Batch) -> None:
        output = evaluate(self.model, None, batch.inputs)
        if not isinstance(output, Tensor):
            raise TypeError(
                f"model: the GGN needs the model to return one tensor (the outputs z whose "
                f"loss Hessian it uses), got {type(output).__name__}; wrap the model so that "
                "forward returns the logits, e.g. a module whose forward returns "
                "model(x).logits for a HuggingFace model."
            )
        check_scalar_loss(criterion_loss(self.criterion, output, batch.target))

    def _outputs(self, batch: Batch) -> Callable[[Tensor], Tensor]:
        def outputs(t: Tensor) -> Tensor:
            return evaluate(self.model, self.layout.unflatten(t), batch.inputs)

        return outputs

    def _linearise(
        self, batch: Batch, sub: ParamLayout | None = None, theta: Tensor | None = None
    ) -> tuple[
        Callable[[Tensor], Tensor],
        Callable[[Tensor], Tensor],
        Callable[[Tensor], Tensor],
        tuple[int, ...],
    ]:
        """``J``, ``H``, ``Jᵀ`` and the outputs' shape; in the blocks of ``sub`` if given."""
        if sub is None or theta is None:
            z, j, jt = _jacobian_products(self._outputs(batch), self._state.theta)
        else:

            def outputs(t: Tensor) -> Tensor:
                return evaluate(self.model, sub.unflatten(t), batch.inputs)

            z, j, jt = _jacobian_products(outputs, theta)

        def loss_of_outputs(out: Tensor) -> Tensor:
            return criterion_loss(self.criterion, out, batch.target)

        h = vjp(grad(loss_of_outputs), z.detach())[1]
        return j, lambda u: h(u)[0], jt, tuple(z.shape)

    def _autograd(self, batch: Batch) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        """The slow path's graph: ``θ``, ``z``, ``z`` detached, ``∇_z ℓ``, and ``u``, ``Jᵀu``."""
        theta = self._state.theta.detach().requires_grad_()
        with torch.enable_grad():
            z = self._outputs(batch)(theta)
            zd = z.detach().requires_grad_()
            outer = criterion_loss(self.criterion, zd, batch.target)
            (gz,) = torch.autograd.grad(outer, zd, create_graph=True)
            u = torch.zeros_like(z, requires_grad=True)
            jt_u = torch.zeros_like(theta)
            if z.requires_grad:
                (jt_u,) = torch.autograd.grad(z, theta, u, create_graph=True)
        return theta, z, zd, gz, u, jt_u

    def _factored(
        self, batch: Batch, columns: int, chain: ChainProducts | None
    ) -> FactoredGGN | None:
        """The batch's GGN from its factors (`hesse._layers.FactoredGGN`), where it pays.

        Every parameter must sit in a verified linear layer. Checked on every batch it is built
        for (kept for a session: over one batch like a gradient graph, over several batches
        each batch's within `_KEPT_FACTORED_BYTES`); once a batch fails, this operator keeps to
        autograd. ``chain``: the batch's `_chain`, which an MLP's factors come from.
        """
        if self._factored_off:
            return None
        if columns < 4:
            # A single product through a kept autograd graph is cheaper than through the
            # factors (MLP 64-96-96-10, batch 512: 1.15 against 1.54 ms), and a few columns do
            # not pay for the factors' setup (C backward passes).
            return None

        def build(scratch: Scratch | None) -> FactoredGGN | None:
            # An MLP with cross-entropy or MSE: from the chain's kept passes, without C
            # backward passes of the model (MLP 64-96-96-10, batch 512: 2 against 28 ms).
            factors = None if chain is None else chain.ggn_factors()
            if factors is not None:
                layers = [site.module for site, _, _ in factors.layers]
                pays = _pays(layers, factors.sign.shape[0], batch.size)
                return factored_ggn(factors, self.layout, scratch) if pays else None
            if not _factors_pay(self.model, self.layout, batch):
                return None
            factors = ggn_factors(
                self.model,
                self.layout,
                self.layout.unflatten(self._state.theta),
                batch.inputs,
                batch.size,
                exact_factor(self.criterion, batch.target, batch.size),
            )
            return factored_ggn(factors, self.layout, scratch)

        session = self._state
        if self.data.num_batches == 1:  # kept like a gradient graph, with its own temporaries
            factored, _ = self._kept(batch, lambda: build(None), kind="factored")
        else:
            factored = self._kept_factored(batch)
            if factored is None:
                if session.scratch is None:
                    session.scratch = Scratch(self.device)
                # One set of temporaries for every batch's products.
                factored = build(session.scratch)
                if factored is not None:
                    self._keep_factored(batch, factored)
        if factored is None:
            self._factored_off = True
        return factored

    def _kept_factored(self, batch: Batch) -> FactoredGGN | None:
        """Over several batches, the session's factored GGN of ``batch`` if it keeps one."""
        if self._factored_off:
            return None
        found = self._state.factored.get(_batch_key(batch))
        return None if found is None else cast(FactoredGGN, found[1])

    def _keep_factored(self, batch: Batch, factored: FactoredGGN) -> None:
        """Keep ``factored`` for the rest of the session, the oldest making room.

        At most one per batch of the data (a loader that yields new tensors on every pass
        keeps replacing them) and `_KEPT_FACTORED_BYTES` in all.
        """
        session = self._state
        while session.factored and (
            len(session.factored) >= self.data.num_batches
            or session.factored_bytes + factored.nbytes > _KEPT_FACTORED_BYTES
        ):
            _, old = session.factored.pop(next(iter(session.factored)))
            session.factored_bytes -= old.nbytes
        if factored.nbytes <= _KEPT_FACTORED_BYTES:
            session.factored[_batch_key(batch)] = (batch.tensors(), factored)
            session.factored_bytes += factored.nbytes

    def _batch_product(self, batch: Batch, v: Tensor) -> Tensor:
        # Forward mode where no graph is kept (several batches) and for the first product of a
        # session (a lone product); from the second on, the kept graph is cheaper (Lanczos on
        # the MLP of the benchmarks, float32: 120 ms against 195 ms in forward mode).
        keep = self.data.num_batches == 1
        self._state.singles += 1
        if not self._forward_off and (not keep or self._state.singles == 1):
            try:
                return self._forward_product(batch, v)
            except (RuntimeError, NotImplementedError) as err:  # no forward mode (LSTM)
                if _out_of_memory(err):
                    raise
                self._forward_off = True
        by_chain = self._chain_single(batch, v, ggn=True)
        if by_chain is not None:
            return by_chain
        # Plain autograd through the graph of the outputs and of u ↦ Jᵀu, kept for the rest
        # of the session over a one-batch dataset (as the Hessian keeps its gradient graph):
        # a repeated product runs no forward pass.
        (theta, z, zd, gz, u, jt_u), _ = self._kept(batch, lambda: self._autograd(batch))
        with torch.enable_grad():
            return _autograd_grad(z, theta, _autograd_grad(gz, zd, _autograd_grad(jt_u, u, v)))

    _forward_off = False  # set once the model has no forward-mode derivative

    def _forward_product(self, batch: Batch, v: Tensor) -> Tensor:
        """``Jᵀ H J v`` from one forward pass in forward mode that also records the graph.

        ``J v`` is the tangent of the outputs, ``H J v`` a product with the loss Hessian in
        the outputs, and one backward pass through the recorded graph gives ``Jᵀ H J v``: a
        ResNet-style CNN took 0.71 s where the graph of ``u ↦ Jᵀu`` (double backward) took
        2.1 s and curvlinops 1.9 s (a loaded machine; the ratios hold).
        """
        names = self.layout.names
        tangent = self.layout.unflatten(v)
        leaves = [self._state.params[n].detach().requires_grad_() for n in names]
        load_forward_ad()
        with torch.enable_grad():
            with fwAD.dual_level():
                duals = {n: fwAD.make_dual(t, tangent[n]) for n, t in zip(names, leaves)}
                out = evaluate(self.model, duals, batch.inputs)
                if not isinstance(out, Tensor):
                    raise RuntimeError("the model's output is not one tensor")
                z, jv = fwAD.unpack_dual(out)
            if jv is None:  # the outputs do not depend on the parameters
                return torch.zeros_like(v)
            zd = z.detach().requires_grad_()
            (gz,) = torch.autograd.grad(
                criterion_loss(self.criterion, zd, batch.target), zd, create_graph=True
            )
            hjv = _autograd_grad(gz, zd, jv.detach())
            grads = torch.autograd.grad(z, leaves, hjv, allow_unused=True)
        return _flat(grads, leaves)

    def _looped_matmat(self, batch: Batch, tangents: Tensor) -> Tensor:
        """``Jᵀ H J v`` by plain autograd, one column at a time.

        ``J v`` is the VJP of the linear map ``u ↦ Jᵀu``: for models torch.func cannot
        transform.
        """
        theta, z, zd, gz, u, jt_u = self._autograd(batch)
        with torch.enable_grad():
            rows = []
            for v in tangents:
                jv = _autograd_grad(jt_u, u, v)
                rows.append(_autograd_grad(z, theta, _autograd_grad(gz, zd, jv)))
        return torch.stack(rows)

    def _batch_matmat(self, batch: Batch, tangents: Tensor) -> Tensor:
        if self._factored_wins and self.data.num_batches != 1:
            kept = self._kept_factored(batch)
            if kept is not None:  # this session built it already: no chain, no factors
                return kept.matmat(tangents)

        def linearised() -> Any:
            # Kept within a session over one batch: a repeated block (a block solver's
            # iterations) runs no forward pass.
            return self._kept(batch, lambda: self._linearise(batch), kind="linearised")[0]

        def vectorised(rows: Tensor) -> Tensor:
            j, h, jt, _ = linearised()
            return vmap(lambda v: jt(h(j(v))))(rows)

        general = self._policy("products")(
            [
                Strategy("vectorised", vectorised, slow=False),
                Strategy(
                    "an autograd loop over columns",
                    lambda rows: self._looped_matmat(batch, rows),
                    slow=True,
                ),
            ]
        )
        chain = self._chain(batch)

        def autograd(rows: Tensor) -> Tensor:
            out = None if chain is None else self._by_chain(chain, rows, ggn=True)
            return general(rows) if out is None else out

        # The factors' setup (C backward passes) pays off over repeated blocks: over one batch,
        # from a session's second block on (a block solver; they are then kept), not for a
        # lone product. Over several batches each batch's factors are kept for the session
        # (`_keep_factored`) and nothing else: the timing below counts each path's setup.
        # (`blocks` counts calls here, chunks of at most 128 columns.)
        # From a chain with a closed-form loss the factors cost about one backward pass: they
        # are built from the first block on.
        factored = None
        cheap = chain is not None and chain.has_factors
        if self.data.num_batches != 1:
            factored = self._factored(batch, tangents.shape[0], chain)
        else:
            self._state.blocks += 1
            if self._state.blocks >= 2 or cheap:
                factored = self._factored(batch, tangents.shape[0], chain)
        if factored is None or self._factored_wins is False:
            return autograd(tangents)
        if self._factored_wins is None and cheap:
            assert chain is not None
            # From the chain's passes the factors need no race: they do half the chain's
            # arithmetic per column (two matrix products per layer against four), and their
            # setup is about one backward pass. One column through the chain checks them.
            out = factored.matmat(tangents)
            if _agree(out[:1], chain.ggn(tangents[:1])):
                self._factored_wins = True
                return out
            self._factored_off = True  # never expected: the checks admitted a wrong route
            return autograd(tangents)
        if self._factored_wins is None:
            # Which is faster depends on the machine, the dtype and the sizes, so the first
            # such block takes both paths, once per operator. Each is timed with what it
            # rebuilds for every product: nothing over one batch (both kept for the session),
            # its setup over several. The two results must agree: a check of the factors.
            self._timing_spoilt = True
            if chain is None:
                with suppress(RuntimeError, NotImplementedError):
                    linearised()  # torch.func may fail here: the policy below falls back
            start = time.perf_counter()
            factored = self._factored(batch, tangents.shape[0], chain) or factored
            out = factored.matmat(tangents)
            middle = time.perf_counter()
            other = autograd(tangents)
            self._factored_wins = middle - start <= time.perf_counter() - middle
            if not _agree(out, other):
                self._factored_off = True  # never expected: the checks admitted a wrong route
                return other
            return out
        return factored.matmat(tangents)

    _factored_wins: bool | None = None  # measured on the first block product

    def mc_diagonal(self, mc_samples: int = 1, *, seed: Seed = None) -> Tensor:
        r"""A Monte-Carlo estimate of the diagonal from labels sampled from the model.

        As BackPACK's ``DiagGGNMC``: the outputs' loss Hessian $H_f$ is replaced by
        $\frac{1}{M}\sum_m g_m g_m^\top$, $g_m$ the loss gradient in the outputs at a
        label drawn from the model's predictive distribution, whose expectation is
        $H_f$ (cross-entropy: a categorical over the softmax; MSE: a Gaussian). The
        estimate is unbiased and costs ``mc_samples`` backward passes per batch instead of
        one per output entry. Parameters of verified linear layers are sampled; any
        other parameter (a convolution, a norm layer) gets its exact value, a zero-variance
        special case, at the cost of the exact diagonal. So does every parameter where the
        layer route is off (float16 and bfloat16 models, cross-entropy over outputs
        ``(B, C, T)``): there the result is the exact diagonal, the same for every seed.

        Args:
            mc_samples: Labels drawn per sample, ``M >= 1``.
            seed: An int or a ``torch.Generator`` (on the CPU) for the labels; ``None``
                draws a seed from torch's global generator.

        Returns:
            ``(N,)`` in the operator's dtype, weighted over batches like `diagonal`.

        Raises:
            ValueError: ``criterion`` is not ``nn.CrossEntropyLoss`` (without class weights
                or label smoothing) or ``nn.MSELoss`` with reduction ``"mean"``/``"sum"``;
                ``mc_samples < 1``.
            TypeError: ``mc_samples`` is not an int; ``seed`` is not an int, a generator or
                None.

        Examples:
            With MSE every draw is a Gaussian vector; many draws approach `diagonal`:

            >>> _ = torch.manual_seed(0)
            >>> model = torch.nn.Linear(3, 2).double()
            >>> X, y = torch.randn(50, 3).double(), torch.randn(50, 2).double()
            >>> G = GGNOperator(model, torch.nn.MSELoss(), (X, y))
            >>> estimate = G.mc_diagonal(mc_samples=4000, seed=0)
            >>> bool(torch.allclose(estimate, G.diagonal(), rtol=0.1))
            True
        """
        check_sampled(self.criterion)
        mc_samples = integer("mc_samples", mc_samples, 1)
        seed = check_seed(seed)
        if isinstance(seed, torch.Generator):
            generator = seed
        else:
            generator = torch.Generator().manual_seed(global_seed() if seed is None else seed)
        with self.session():
            out = self._state.theta.new_zeros(self.layout.numel)

            def per_batch(batch: Batch) -> Tensor:
                factor = sampled_factor(
                    self.criterion, batch.target, batch.size, mc_samples, generator
                )
                return self._layered_diagonal(batch, factor)

            return self._accumulate(per_batch, out)

    def _batch_diagonal(self, batch: Batch) -> Tensor:
        # Linear layers whose weights enter once per sample: through their outputs, C backward
        # passes for all of them (`hesse._layers`); any other parameter: the general path.
        return self._layered_diagonal(batch, exact_factor(self.criterion, batch.target, batch.size))

    def _layered_diagonal(self, batch: Batch, factor: Callable[[Tensor], Factor | None]) -> Tensor:
        theta = self._state.theta
        params = self.layout.unflatten(theta)
        blocks = ggn_diagonal_blocks(
            self.model, self.layout, params, batch.inputs, batch.size, factor
        )
        out = theta.new_empty(theta.numel())
        for name, block in blocks.items():
            out[self.layout.slice(name)] = block.reshape(-1)
        rest = self.layout.restrict(n for n in self.layout.names if n not in blocks)
        if rest.names:
            # The general path differentiates only the parameters off the route.
            general = self._general_diagonal(batch, rest)
            for name, piece in zip(rest.names, general.split(rest.numels)):
                out[self.layout.slice(name)] = piece
        return out

    def _general_diagonal(self, batch: Batch, sub: ParamLayout) -> Tensor:
        # diag(Jᵀ H J) = Σ_r J_r ⊙ (Jᵀ H e_r), over the output entries r, a chunk at a time,
        # for the blocks of `sub` (the other parameters keep their values).
        full = self._state.theta
        theta = torch.cat([full[self.layout.slice(n)] for n in sub.names])

        def vectorised(e: Tensor) -> Tensor:
            _, h, jt, shape = self._linearise(batch, sub, theta)
            e = e.reshape(-1, *shape)
            return (vmap(jt)(e) * vmap(lambda u: jt(h(u)))(e)).sum(0)

        def looped(e: Tensor) -> Tensor:
            whole, z, zd, gz, _, _ = self._autograd(batch)
            with torch.enable_grad():
                out = torch.zeros_like(whole)
                for row in e.reshape(-1, *z.shape):
                    weighted = _autograd_grad(z, whole, _autograd_grad(gz, zd, row))
                    out += _autograd_grad(z, whole, row) * weighted
            return torch.cat([out[self.layout.slice(n)] for n in sub.names])

        columns = self._policy("diagonal")(
            [
                Strategy("vectorised", vectorised, slow=False),
                Strategy("an autograd loop over outputs", looped, slow=True),
            ]
        )
        with torch.no_grad():
            z_numel = self._outputs(batch)(self._state.theta).numel()
        out = theta.new_zeros(theta.numel())
        eye = torch.eye(z_numel, dtype=theta.dtype, device=theta.device)
        for start in range(0, z_numel, TARGET_COLUMNS):
            out += columns(eye[start : start + TARGET_COLUMNS])
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
    gradients; it is what ``torch.func`` per-sample gradients give. Per-sample gradients need
    samples that do not influence each other, so ``training=True`` (batch statistics) and
    models that couple the samples of a batch are refused.

    The constructor, products and methods are those of `CurvatureOperator`.

    Args:
        model: The module; evaluated in eval mode (train mode with ``training=True``), its
            state restored after every product.
        criterion: A loss ``criterion(output, target)`` returning a scalar for a batch
            (an ``nn.Module`` or a function).
        data: One ``(inputs, target)`` batch, or a re-iterable of them (a list, a
            ``DataLoader``); ``inputs`` is a tensor or a tuple of tensors. It is read anew
            by every product.
        params: The parameters: names, glob patterns (``"encoder.*"``) or the model's
            ``nn.Parameter`` objects, one or a list (``list(model[2].parameters())``);
            ``None`` selects every parameter with ``requires_grad=True``.
        reduction: How ``criterion`` reduces over a batch, which sets the batch weights:
            ``"mean"`` (batch ``b`` weighted ``B_b / N_data``), ``"sum"`` (weight 1) or
            ``"batchmean"`` (as ``"mean"``); default ``criterion.reduction``, else ``"mean"``.
        training: Must be ``False``: each sample is evaluated alone, where batch statistics
            mean nothing.
        progress: Show one progress bar per call (a product, ``to_dense()``, ``diagonal()``
            or a whole ``eigsh``, ``trace``, ...), counting batches (needs ``tqdm``, the
            ``progress`` extra).
        check_deterministic: Read the data twice at construction and refuse data or models
            that change between passes (a shuffling ``DataLoader``, random augmentation, a
            model with randomness in eval mode): the operator would not be one matrix.
        process_group: With ``torch.distributed`` initialised, the group whose ranks each
            hold a shard of the data (default: the global group). Products are summed over
            the ranks with one all-reduce; every rank gets the same result.
        distributed: ``None`` (default): data-parallel exactly when ``torch.distributed`` is
            initialised. ``False``: this process's data only, even under ``torchrun``.
            ``True``: require an initialised process group.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``, ``criterion`` is not callable or does
            not return a floating-point tensor, ``data`` is a one-shot iterator or not
            ``(inputs, target)`` batches, or a flag has the wrong type.
        ValueError: ``training=True``; the model couples the samples of a batch; ``data``
            holds no samples or batches of different structure; the loss is not a scalar;
            ``reduction`` is not ``"mean"``, ``"sum"`` or ``"batchmean"`` or contradicts
            ``criterion.reduction``; ``params`` names no parameter or selects none; a
            selected parameter is NaN or infinite; ``check_deterministic=True`` and two
            passes differ; ``process_group`` or ``distributed`` do not match the state of
            ``torch.distributed``, or the ranks disagree on the parameters or hold no
            samples.
        ImportError: ``progress=True`` without ``tqdm``.

    Examples:
        For $\ell_i = \frac{1}{2}(w \cdot x_i)^2$ at $w = (1, 0)$, $g_i = (w \cdot x_i)\, x_i$:

        >>> model = torch.nn.Linear(2, 1, bias=False)
        >>> with torch.no_grad():
        ...     _ = model.weight.copy_(torch.tensor([[1.0, 0.0]]))
        >>> X, y = torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.zeros(2, 1)
        >>> loss = lambda out, t: 0.5 * (out - t).pow(2).sum()
        >>> F = EmpiricalFisherOperator(model, loss, (X, y), reduction="sum")
        >>> F.to_dense()  # g_1 = (1, 2), g_2 = 3 (3, 4): g_1 g_1ᵀ + g_2 g_2ᵀ
        tensor([[ 82., 110.],
                [110., 148.]])
    """

    def _check_training(self) -> None:
        if self.training:
            raise ValueError(
                "training: the empirical Fisher is built from per-sample gradients, each sample "
                "evaluated as a batch of one, where batch statistics are meaningless; use "
                "training=False, or GGNOperator/HessianOperator(..., training=True)."
            )

    def _check_batch(self, batch: Batch) -> None:
        super()._check_batch(batch)
        if batch.size < 2:
            return
        check_independent_samples(
            self.model,
            self.layout,
            batch.inputs,
            "EmpiricalFisherOperator (whose per-sample gradients per_sample_gradients and the "
            "influence functions use)",
        )

    def _per_sample_gradients(self, batch: Batch) -> Tensor:
        g = sample_loss_function(self.model, self.layout.unflatten, self.criterion)
        dims = (None, 0, *(0,) * len(batch.inputs))

        def vectorised(theta: Tensor) -> Tensor:
            return vmap(grad(g), in_dims=dims)(theta, batch.target, *batch.inputs)

        def looped(theta: Tensor) -> Tensor:
            samples = zip(cast(Tensor, batch.target), *batch.inputs)
            return torch.stack([grad(g)(theta, t, *xs) for t, *xs in samples])

        return self._policy("gradients")(
            [
                Strategy("vectorised", vectorised, slow=False),
                Strategy("a loop over samples", looped, slow=True),
            ]
        )(self._state.theta)

    def _scale(self, batch: Batch) -> float:
        # Batches are weighted by B_b / N for "mean": use the batch mean here.
        return 1.0 / batch.size if self.reduction != "sum" else 1.0

    def _batch_matmat(self, batch: Batch, tangents: Tensor) -> Tensor:
        def through_gradients(rows: Tensor) -> Tensor:
            g = self._per_sample_gradients(batch)
            return (rows @ g.T) @ g

        if tangents.shape[0] > _FISHER_DIRECT_COLUMNS:
            return self._scale(batch) * through_gradients(tangents)
        products = self._policy("few columns")(
            [
                Strategy(
                    "vectorised",
                    lambda rows: self._products_through_losses(batch, rows),
                    slow=False,
                ),
                # The per-sample gradients, with their own fallback (a loop over samples).
                Strategy("per-sample gradients", through_gradients, slow=False),
            ]
        )
        return self._scale(batch) * products(tangents)

    def _products_through_losses(self, batch: Batch, tangents: Tensor) -> Tensor:
        """``Σ_i g_i (g_iᵀ v)`` without the ``(B, N)`` gradients.

        ``gᵢᵀ v`` for every sample is one Jacobian-vector product of the per-sample loss
        vector ``ℓ(θ)`` and the sum one vector-Jacobian product, ``J_ℓᵀ (J_ℓ v)``; cheaper
        for a few columns.
        """
        g = sample_loss_function(self.model, self.layout.unflatten, self.criterion)
        dims = (None, 0, *(0,) * len(batch.inputs))

        def losses(t: Tensor) -> Tensor:
            return vmap(g, in_dims=dims)(t, batch.target, *batch.inputs)  # (B,)

        _, j, jt = _jacobian_products(losses, self._state.theta)
        return vmap(lambda v: jt(j(v)))(tangents)

    def _batch_dense(self, batch: Batch) -> Tensor:
        g = self._per_sample_gradients(batch)
        return self._scale(batch) * g.T @ g

    def _batch_diagonal(self, batch: Batch) -> Tensor:
        g = self._per_sample_gradients(batch)
        return self._scale(batch) * g.pow(2).sum(0)


def hvp(
    model: nn.Module,
    criterion: Callable[..., Tensor],
    inputs: Tensor | tuple[Tensor, ...],
    target: Any,
    vector: Tensor | dict[str, Tensor],
    params: Params = None,
    *,
    training: bool = False,
) -> Any:
    r"""The loss Hessian times ``vector``: $\nabla^2_\theta\, \ell(\theta)\, v$.

    Args:
        model: The module, evaluated in eval mode; its state is restored afterwards.
        criterion: Any callable returning a scalar tensor.
        inputs: A tensor or a tuple of tensors passed positionally to ``model``.
        target: Passed to ``criterion`` as its second argument (``None`` allowed).
        vector: A flat ``(N,)`` tensor, an ``(N, K)`` matrix (K products, vectorised), or a
            dict of tensors keyed by parameter name; the result has the same form.
        params: The parameters: names, glob patterns (``"encoder.*"``) or the model's
            ``nn.Parameter`` objects, one or a list; ``None`` selects every parameter with
            ``requires_grad=True``.
        training: The Hessian of the training-mode loss: BatchNorm normalises with the
            batch's statistics (its running statistics untouched); dropout stays off.

    Returns:
        The product in the form of ``vector``: ``(N,)``, ``(N, K)`` or a dict keyed by
        parameter name, on the parameters' dtype and device.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``, ``criterion`` is not callable or does
            not return a floating-point tensor, ``inputs`` are not tensors, or ``vector`` is
            neither a tensor nor a dict or has another dtype.
        ValueError: ``vector`` has the wrong shape, device or dict keys; the batch is empty;
            the loss is not a scalar; ``params`` names no parameter or selects none; a
            selected parameter is NaN or infinite.

    Examples:
        $\ell = \sum_i (w \cdot x_i)^2$ has Hessian $2X^\top X$:

        >>> model = torch.nn.Linear(2, 1, bias=False)
        >>> X = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
        >>> hvp(model, lambda out, t: out.pow(2).sum(), X, torch.zeros(2, 1),
        ...     {"weight": torch.tensor([[0.0, 1.0]])})
        {'weight': tensor([[28., 40.]])}
    """
    # One batch: weight 1 for either reduction, so the product is the batch loss's Hessian.
    check_model(model)
    check_criterion(criterion)
    with torch.inference_mode(False):
        args = normalize_inputs(inputs)
        check_nonempty(args)  # named as hvp's argument, not as one batch of a dataset
        batch = Batch(args, normal_target(target))
    return HessianOperator(model, criterion, batch, params, training=training) @ vector
