"""The operator protocol: what hesse's algorithms accept, and what hesse's own operators add.

Every algorithm (``eigsh``, ``sharpness``, ``trace``, ``diagonal``, ``spectral_density``)
accepts a dense symmetric tensor or any object of the `SymmetricOperator` protocol: ``shape``,
``dtype``, ``device`` and ``A @ V`` for ``V`` of shape ``(N,)`` and ``(N, K)``. hesse's own
operators derive from `Operator`, which adds two things an algorithm may rely on:

- ``shard``: where the operator's data lives under ``torch.distributed``, so that every rank
  draws the same random probes. It is abstract: an `Operator` subclass (a wrapper, say) cannot
  be instantiated without saying where its data lives.
- ``session()``: a context inside which products may reuse work (a kept gradient graph), since
  the algorithm guarantees that nothing changes between them. Outside a session every product
  starts from the model as it is at that moment.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from contextlib import AbstractContextManager, nullcontext
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from hesse._distributed import Shard
from hesse._layout import ParamLayout
from hesse._memory import check_dense_fits
from hesse._validate import normal_tensor

__all__ = ["LayoutOperator", "Operator", "SymmetricOperator"]


@runtime_checkable
class SymmetricOperator(Protocol):
    """A symmetric ``N x N`` matrix known through its products: what the spectral tools take.

    `eigsh`, `sharpness`, `trace`, `diagonal` and `spectral_density` accept a dense symmetric
    tensor or any object with these four members: hesse's operators and their sums, curvlinops'
    operators, or a class of your own. Nothing needs to inherit from this class. Optional
    extras are used when present: ``to_dense()`` (the dense solve of a small ``eigsh``, exact
    budgets) and ``diagonal()`` (``diagonal(A, method="exact")``, exact budgets); without them
    hesse forms ``A @ I``.

    ``isinstance(obj, hesse.SymmetricOperator)`` checks only that the members exist. Neither
    it nor the spectral tools check an operator's symmetry (that would cost products); a
    dense tensor's is checked.

    Attributes:
        shape: ``(N, N)``.
        dtype: The dtype of products; half precision is accepted, and the spectral tools then
            compute their small dense algebra in float32.
        device: Where products live; the tools' vectors are made there.

    Examples:
        A class of your own, here $A = 2I$ of size 3:

        >>> class TwiceIdentity:
        ...     shape, dtype, device = (3, 3), torch.float64, torch.device("cpu")
        ...     def __matmul__(self, V):  # (N,) -> (N,) and (N, K) -> (N, K)
        ...         return 2 * V
        >>> isinstance(TwiceIdentity(), SymmetricOperator)
        True
        >>> from hesse import trace
        >>> float(trace(TwiceIdentity(), num_matvecs=3).estimate)  # 3 products reach N = 3
        6.0
    """

    @property
    def shape(self) -> tuple[int, ...]:
        """``(N, N)``."""
        ...

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of products."""
        ...

    @property
    def device(self) -> torch.device:
        """The device of products."""
        ...

    def __matmul__(self, other: Tensor, /) -> Any:
        """``A @ V``: ``(N,) -> (N,)`` and ``(N, K) -> (N, K)``, in ``dtype`` on ``device``.

        hesse's spectral tools always pass a block ``(N, K)`` (``K = 1`` for one Lanczos
        step); the vector form is for users and for sums of operators.
        """
        ...


class Operator(ABC):
    """Base class of hesse's operators: the protocol, plus ``shard`` and ``session()``."""

    @property
    @abstractmethod
    def shape(self) -> tuple[int, int]: ...

    @property
    @abstractmethod
    def dtype(self) -> torch.dtype: ...

    @property
    @abstractmethod
    def device(self) -> torch.device: ...

    @property
    @abstractmethod
    def shard(self) -> Shard:
        """Where the data lives: ``Shard()`` for this process alone."""

    @abstractmethod
    def __matmul__(self, other: Any) -> Any: ...

    def session(self) -> AbstractContextManager[None]:
        """Products inside the block may reuse work; nothing may change the model meanwhile."""
        return nullcontext()

    def to_dense(self) -> Tensor:
        """The ``(N, N)`` matrix, from products with the identity's columns.

        Returns:
            ``(N, N)`` in the operator's dtype, on its device.

        Raises:
            MemoryBudgetError: The matrix would not fit in the device's memory (checked
                before allocating).
        """
        n = self.shape[0]
        # The identity it multiplies and the result.
        check_dense_fits(f"{type(self).__name__}.to_dense", n, self.dtype, self.device, copies=2)
        return self @ torch.eye(n, dtype=self.dtype, device=self.device)

    def to_scipy(self) -> Any:
        """A ``scipy.sparse.linalg.LinearOperator`` on NumPy arrays of this operator's dtype.

        SciPy is an optional extra (``pip install hesse[scipy]``). When SciPy's OpenBLAS and
        torch both use threads inside ARPACK they slow each other down; set
        ``OPENBLAS_NUM_THREADS=1`` before importing NumPy for ``eigsh`` on large operators.

        Returns:
            A ``LinearOperator`` of shape ``(N, N)`` whose ``matvec``, ``matmat`` (and, the
            operator being symmetric, ``rmatvec`` and ``rmatmat``) are products with this
            operator; every call converts to and from torch on the operator's device.

        Raises:
            ImportError: SciPy is not installed.
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

    # -- algebra: lazy linear combinations (`hesse._algebra`) ---------------------------------

    def __add__(self, other: Any) -> Any:
        from hesse._algebra import LinearCombination

        if not isinstance(other, Operator):
            return NotImplemented
        return LinearCombination([(1.0, self), (1.0, other)])

    def __radd__(self, other: Any) -> Any:
        if isinstance(other, int) and other == 0:  # sum([A, B]) starts from 0
            return self
        return NotImplemented

    def __sub__(self, other: Any) -> Any:
        from hesse._algebra import LinearCombination

        if not isinstance(other, Operator):
            return NotImplemented
        return LinearCombination([(1.0, self), (-1.0, other)])

    def __mul__(self, other: Any) -> Any:
        from hesse._algebra import LinearCombination, scalar

        c = scalar(other)
        return NotImplemented if c is None else LinearCombination([(c, self)])

    __rmul__ = __mul__

    def __truediv__(self, other: Any) -> Any:
        from hesse._algebra import LinearCombination, scalar

        c = scalar(other)
        if c == 0:
            raise ZeroDivisionError(
                f"coefficient: an operator divided by 0 has no finite entries; got {other!r}."
            )
        return NotImplemented if c is None else LinearCombination([(1.0 / c, self)])

    def __neg__(self) -> Any:
        from hesse._algebra import LinearCombination

        return LinearCombination([(-1.0, self)])


class LayoutOperator(Operator):
    """An operator on the flat vector of a `ParamLayout`: hesse's curvature operators and KFAC.

    ``layout`` sets ``shape``, ``dtype``, ``device`` and ``param_names``; ``_shard`` is where its
    data live. `_product` checks an operand and applies a ``(N, K) -> (N, K)`` map to it in
    the form it came: ``(N,)``, ``(N, K)`` or a dict keyed by parameter name.
    """

    layout: ParamLayout
    _shard: Shard

    @property
    def shape(self) -> tuple[int, int]:
        """``(N, N)``, N the number of selected parameter entries."""
        return (self.layout.numel, self.layout.numel)

    @property
    def dtype(self) -> torch.dtype:
        """The parameters' dtype: vectors must have it, products return it."""
        return self.layout.dtype

    @property
    def device(self) -> torch.device:
        """The parameters' device: vectors must live there."""
        return self.layout.device

    @property
    def shard(self) -> Shard:
        """Where the data live under ``torch.distributed`` (this process alone by default)."""
        return self._shard

    @property
    def param_names(self) -> tuple[str, ...]:
        """The selected parameters' names, in the order of the rows."""
        return self.layout.names

    def _product(self, other: Any, apply: Any) -> Any:
        """``apply`` (``(N, K) -> (N, K)``) on ``other``, returned in ``other``'s form."""
        if isinstance(other, dict):
            flat = check_dict(self, self.layout, other)
            return self.layout.unflatten(apply(flat[:, None])[:, 0])
        matrix = check_operand(self, other)
        if matrix.ndim == 2 and matrix.shape[1] == 0:
            return matrix.new_zeros(matrix.shape)
        out = apply(matrix if matrix.ndim == 2 else matrix[:, None])
        return out if matrix.ndim == 2 else out[:, 0]


def check_operand(op: Operator, other: Any) -> Tensor:
    """``other`` checked as the right operand of ``op @``: ``(N,)`` or ``(N, K)``, ``op``'s."""
    if not isinstance(other, Tensor):
        raise TypeError(
            f"vector: expected a tensor of shape (N,) or (N, K) or a dict of tensors keyed "
            f"by parameter name, got {type(other).__name__}."
        )
    n = op.shape[0]
    if other.ndim not in (1, 2) or other.shape[0] != n:
        raise ValueError(
            f"vector: expected shape ({n},) or ({n}, K) for this {n} x {n} operator, got "
            f"{tuple(other.shape)}."
        )
    if other.dtype != op.dtype:
        raise TypeError(
            f"vector: expected dtype {op.dtype} (the operator's), got {other.dtype}; "
            f"convert it with v.to({op.dtype})."
        )
    if other.device != op.device:
        raise ValueError(
            f"vector: is on {other.device} but the operator is on {op.device}; move it "
            f"with v.to({str(op.device)!r})."
        )
    return normal_tensor(other)


def check_dict(op: Operator, layout: ParamLayout, other: dict[str, Tensor]) -> Tensor:
    """A dict keyed by ``layout``'s names, flattened and checked as ``op``'s operand."""
    if set(other) != set(layout.names):
        raise ValueError(
            f"vector: a dict needs exactly the keys {list(layout.names)}, got {list(other)}."
        )
    for name, shape in zip(layout.names, layout.shapes):
        value = other[name]
        if not isinstance(value, Tensor) or value.shape != shape:
            given = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise ValueError(f"vector[{name!r}]: expected shape {tuple(shape)}, got {given}.")
    return check_operand(op, layout.flatten(other))
