"""Operator algebra: ``A + B``, ``A - B``, ``c * A``, ``-A`` and the identity, lazily.

A sum is never formed: ``(c₁A₁ + c₂A₂) @ V = c₁(A₁ @ V) + c₂(A₂ @ V)``, so damping a curvature
operator, ``G + λ·I``, costs one product of ``G`` and an addition. Every combination is again an
`hesse._protocol.Operator`: it keeps ``shape``, ``dtype``, ``device``, products on ``(N,)``,
``(N, K)`` and (when a part knows the parameter layout) name-keyed dicts, ``to_dense()``, an
exact ``diagonal()`` when every part has one, ``to_scipy()``, sessions and the data's shard.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from typing import Any

import torch
from torch import Tensor

from hesse._distributed import Shard
from hesse._layout import ParamLayout
from hesse._memory import check_dense_fits
from hesse._protocol import Operator, check_dict, check_operand

__all__ = ["IdentityOperator", "LinearCombination", "scalar"]


def scalar(value: Any) -> float | None:
    """``value`` as a Python float if it is a real number (a 0-dim tensor too), else None.

    Raises:
        ValueError: It is NaN or infinite (every product would be).
    """
    real = isinstance(value, numbers.Real) and not isinstance(value, bool)
    one = isinstance(value, Tensor) and value.numel() == 1 and not value.is_complex()
    number = float(value) if real or one else None
    if number is not None and not math.isfinite(number):
        raise ValueError(
            f"coefficient: expected a finite number to scale an operator by, got {number!r}."
        )
    return number


def _describe(layout: ParamLayout) -> str:
    return "[" + ", ".join(f"{n} {tuple(s)}" for n, s in zip(layout.names, layout.shapes)) + "]"


class IdentityOperator(Operator):
    r"""The identity $I$ of size ``n``: the damping term of ``G + λ * I``.

    An operator like hesse's others (``shape``, ``dtype``, ``device``, ``@`` on ``(N,)``,
    ``(N, K)`` and dicts, ``to_dense()``, ``diagonal()``, ``to_scipy()``) that costs nothing
    per product. `like` builds the one that matches an operator's size, dtype, device and
    parameter layout, so that ``G + 1e-3 * hesse.IdentityOperator.like(G)`` adds up.

    Args:
        n: The size ``N``.
        dtype: The dtype of products (default: torch's default dtype).
        device: The device of products (default: the CPU).

    Raises:
        ValueError: ``n`` is not a positive int, or ``device`` is no device.
        TypeError: ``dtype`` is not a floating-point ``torch.dtype``.

    Examples:
        Damping adds $\lambda$ to every eigenvalue. Here the GGN of $\lVert Xw \rVert^2$
        is $2X^\top X = \operatorname{diag}(2, 8)$:

        >>> import hesse
        >>> model = torch.nn.Linear(2, 1, bias=False)
        >>> X, y = torch.tensor([[1.0, 0.0], [0.0, 2.0]]), torch.zeros(2, 1)
        >>> G = hesse.GGNOperator(model, torch.nn.MSELoss(reduction="sum"), (X, y))
        >>> damped = G + 0.5 * hesse.IdentityOperator.like(G)
        >>> damped.to_dense()
        tensor([[2.5000, 0.0000],
                [0.0000, 8.5000]])
    """

    def __init__(
        self,
        n: int,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
            raise ValueError(f"n: expected a positive int (the size N), got {n!r}.")
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(
                f"dtype: expected a floating-point torch.dtype such as torch.float64, got "
                f"{dtype!r}."
            )
        try:
            where = torch.device(device if device is not None else "cpu")
        except (RuntimeError, TypeError) as err:
            raise ValueError(
                f"device: expected a torch.device or a name such as 'cpu' or 'cuda:0', got "
                f"{device!r}."
            ) from err
        self._n: int = int(n)
        self._dtype: torch.dtype = dtype if dtype is not None else torch.get_default_dtype()
        self._device: torch.device = where
        self.layout: ParamLayout | None = None

    @classmethod
    def like(cls, op: Any) -> IdentityOperator:
        """The identity of ``op``'s size, dtype and device (and parameter layout, if any).

        Args:
            op: Any operator with ``shape``, ``dtype`` and ``device`` (hesse's or your own).

        Returns:
            An `IdentityOperator` that can be added to ``op``; it carries ``op.layout`` when
            ``op`` has one, so the sum still takes dicts keyed by parameter name.
        """
        identity = cls(op.shape[0], dtype=op.dtype, device=op.device)
        identity.layout = getattr(op, "layout", None)
        return identity

    @property
    def shape(self) -> tuple[int, int]:
        return (self._n, self._n)

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def shard(self) -> Shard:
        return Shard()  # the same on every rank: nothing to communicate

    def __matmul__(self, other: Any) -> Any:
        """``I @ V``: a copy of ``V`` (``(N,)``, ``(N, K)`` or a dict of tensors)."""
        if isinstance(other, dict):
            if self.layout is None:
                raise TypeError(
                    "vector: a dict needs the parameter layout; build the identity with "
                    "hesse.IdentityOperator.like(op) from an operator over parameters."
                )
            return self.layout.unflatten(check_dict(self, self.layout, other).clone())
        return check_operand(self, other).clone()

    def to_dense(self) -> Tensor:
        """``torch.eye(N)`` in the operator's dtype, on its device."""
        check_dense_fits(f"{type(self).__name__}.to_dense", self._n, self._dtype, self._device)
        return torch.eye(self._n, dtype=self._dtype, device=self._device)

    def diagonal(self) -> Tensor:
        """``torch.ones(N)`` in the operator's dtype, on its device."""
        return torch.ones(self._n, dtype=self._dtype, device=self._device)

    def __repr__(self) -> str:
        return f"IdentityOperator(n={self._n}, dtype={self._dtype}, device={self._device})"


class LinearCombination(Operator):
    r"""$\sum_i c_i A_i$ of operators of one shape, dtype and device, never formed.

    Built by ``A + B``, ``A - B``, ``c * A``, ``A * c``, ``A / c`` and ``-A`` on hesse's
    operators (``c`` a Python number or a one-element tensor); nested combinations are
    flattened into one list of terms, and ``sum([A, B])`` works. A product costs one product
    of each part: ``(c_1 A_1 + c_2 A_2) @ V = c_1 (A_1 @ V) + c_2 (A_2 @ V)``.

    A combination keeps what its parts have: ``shape``, ``dtype``, ``device``, ``@`` on
    ``(N,)``, ``(N, K)`` and (when a part knows the parameter layout) name-keyed dicts,
    ``to_dense()``, an exact ``diagonal()`` when every part has one, ``to_scipy()``, one
    session over all parts inside each algorithm call, and the parts' process group under
    ``torch.distributed``. It works in every spectral tool.

    Args:
        terms: ``(coefficient, operator)`` pairs; usually built by the operators above rather
            than by hand.

    Attributes:
        terms: The flattened ``(coefficient, operator)`` pairs.
        layout: The parts' `ParamLayout`, or ``None`` when no part has one.

    Raises:
        ValueError: The operators differ in shape, dtype, device or parameter selection, or
            are distributed over different process groups.

    Examples:
        >>> import hesse
        >>> I = hesse.IdentityOperator(2, dtype=torch.float64)
        >>> combo = 3 * I - I / 2
        >>> [c for c, _ in combo.terms]
        [3.0, -0.5]
        >>> combo.diagonal()
        tensor([2.5000, 2.5000], dtype=torch.float64)
    """

    def __init__(self, terms: list[tuple[float, Operator]]) -> None:
        if not terms:
            raise ValueError("terms: a linear combination needs at least one operator.")
        flat: list[tuple[float, Operator]] = []
        for coefficient, op in terms:
            if isinstance(op, LinearCombination):
                flat.extend((coefficient * c, part) for c, part in op.terms)
            else:
                flat.append((coefficient, op))
        first = flat[0][1]
        for _, op in flat[1:]:
            if tuple(op.shape) != tuple(first.shape):
                raise ValueError(
                    f"operators: shapes differ, {tuple(first.shape)} and {tuple(op.shape)}; only "
                    "operators of the same size can be added."
                )
            if op.dtype != first.dtype or op.device != first.device:
                raise ValueError(
                    f"operators: {first.dtype} on {first.device} and {op.dtype} on {op.device} "
                    "cannot be added; build both on the same dtype and device (for the "
                    "identity: hesse.IdentityOperator.like(op))."
                )
        found = [getattr(op, "layout", None) for _, op in flat]
        layouts = {
            (layout.names, tuple(map(tuple, layout.shapes))): layout
            for layout in found
            if layout is not None
        }
        if len(layouts) > 1:
            raise ValueError(
                "operators: built on different parameters "
                f"({' vs '.join(_describe(layout) for layout in layouts.values())}); add "
                "operators of one parameter selection."
            )
        shards = {id(op.shard.group): op.shard for _, op in flat if op.shard.distributed}
        if len(shards) > 1:
            raise ValueError(
                "operators: distributed over different process groups; their sum would need "
                "two groups to agree on every random draw."
            )
        self.terms: tuple[tuple[float, Operator], ...] = tuple(flat)
        self.layout: ParamLayout | None = next(iter(layouts.values()), None)
        self._shard = next(iter(shards.values()), Shard())

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.terms[0][1].shape)  # type: ignore[return-value]

    @property
    def dtype(self) -> torch.dtype:
        return self.terms[0][1].dtype

    @property
    def device(self) -> torch.device:
        return self.terms[0][1].device

    @property
    def shard(self) -> Shard:
        return self._shard

    def session(self) -> AbstractContextManager[None]:
        return self._sessions()

    @contextmanager
    def _sessions(self) -> Iterator[None]:
        with ExitStack() as stack:
            for _, op in self.terms:
                stack.enter_context(op.session())
            yield

    def __matmul__(self, other: Any) -> Any:
        """``Σ c_i (A_i @ V)`` for ``V`` of shape ``(N,)`` or ``(N, K)``, or a dict of tensors.

        Raises:
            TypeError: ``V`` is not a tensor of the operator's dtype, or is a dict and no part
                knows the parameter layout.
            ValueError: ``V`` is not of shape ``(N,)`` or ``(N, K)``, or not on the operator's
                device; a dict without exactly the parameters' keys and shapes.
        """
        if isinstance(other, dict):
            if self.layout is None:
                raise TypeError(
                    "vector: a dict needs an operator that knows the parameter layout; none of "
                    "the parts of this sum does. Pass a flat tensor."
                )
            return self.layout.unflatten(self @ check_dict(self, self.layout, other))
        other = check_operand(self, other)
        with self.session():
            out: Tensor | None = None
            for coefficient, op in self.terms:
                term = op @ other
                out = term * coefficient if out is None else out.add_(term, alpha=coefficient)
        assert out is not None
        return out

    def to_dense(self) -> Tensor:
        """``Σ c_i A_i.to_dense()``, the ``(N, N)`` matrix."""
        # The sum so far, a term's matrix and its multiple.
        what = f"{type(self).__name__}.to_dense"
        check_dense_fits(what, self.shape[0], self.dtype, self.device, copies=3)
        with self.session():
            return sum(c * op.to_dense() for c, op in self.terms)  # type: ignore[return-value]

    def diagonal(self) -> Tensor:
        """The exact diagonal ``Σ c_i A_i.diagonal()``, ``(N,)``.

        Raises:
            NotImplementedError: A part has no exact ``diagonal()``; `hesse.diagonal` then
                estimates it, or takes it exactly from N products.
        """
        missing = [type(op).__name__ for _, op in self.terms if not hasattr(op, "diagonal")]
        if missing:
            raise NotImplementedError(
                f"diagonal(): {', '.join(missing)} has no exact diagonal; estimate it with "
                "hesse.diagonal(A, method='diag++'), or form A.to_dense().diagonal()."
            )
        with self.session():
            return sum(c * op.diagonal() for c, op in self.terms)  # type: ignore[attr-defined,return-value]

    def __repr__(self) -> str:
        parts = " + ".join(f"{c:g} * {op!r}" for c, op in self.terms)
        return f"LinearCombination({parts})"
