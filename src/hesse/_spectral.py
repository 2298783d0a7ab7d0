"""Spectral tools for a dense symmetric matrix or any hesse operator.

Every function takes ``A`` as a dense symmetric tensor ``(N, N)`` or an object with ``shape``,
``dtype``, ``device`` and ``A @ V`` for ``V`` of shape ``(N, K)`` (every hesse operator), draws
its random vectors from an explicit ``seed`` or ``torch.Generator`` (``seed=None``: a seed drawn
from torch's global generator, so ``torch.manual_seed`` makes a call reproducible), and returns
a frozen dataclass with diagnostics.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext, suppress
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor

from hesse._distributed import Shard, global_seed
from hesse._protocol import Operator, SymmetricOperator
from hesse._validate import Seed, check_seed, check_tolerance, integer, positive_float

__all__ = [
    "EigenResult",
    "SpectralDensity",
    "TraceResult",
    "diagonal",
    "eigsh",
    "sharpness",
    "spectral_density",
    "trace",
]

_WHICH = ("LA", "SA", "LM")
# Below this size a dense eigendecomposition is cheaper and exact.
DENSE_LIMIT = 256
# A spectral density whose budget reaches N products is computed exactly up to this N (the
# dense eigendecomposition stays cheap).
EXACT_DENSITY_LIMIT = 2048


# ---------------------------------------------------------------------------------- plumbing


@dataclass(frozen=True)
class _Linear:
    """What the algorithms need of ``A``, in the dtype they compute in."""

    n: int
    dtype: torch.dtype  # float32 for a half-precision A: no half eigh / qr on the CPU
    device: torch.device
    matmat: Callable[[Tensor], Tensor]  # (N, K) -> (N, K)
    dense: Callable[[], Tensor]
    diagonal: Callable[[], Tensor]  # exact, for budgets that reach N products
    products_for_exact: int  # what dense() or diagonal() cost: 0 for a tensor, else N
    session: Callable[[], AbstractContextManager[Any]] = nullcontext
    shard: Shard = field(default_factory=Shard)  # random draws must agree across ranks
    # A direction to start Lanczos from towards the top eigenvalues (a loss gradient), called
    # within the session; None when A offers none.
    start: Callable[[], Tensor] | None = None
    # Whether every product is a new tensor the caller may update in place (hesse's operators;
    # a user's operator may return a tensor it keeps).
    fresh: bool = False


_HALF = (torch.float16, torch.bfloat16)


def _check_symmetric(a: Tensor) -> None:
    """A non-symmetric matrix has no real spectrum to report: refuse it (cheap next to eigh)."""
    if a.numel() == 0:
        return
    a = a.detach()
    if not bool(torch.isfinite(a).all()):
        raise ValueError(
            "A: contains NaN or infinite values; a matrix with them has no spectrum to compute "
            "with. Check how it was built."
        )
    scale = float(a.abs().max())
    gap = float((a - a.mT).abs().max())
    if not gap <= (torch.finfo(a.dtype).eps ** 0.5) * max(scale, torch.finfo(a.dtype).tiny):
        raise ValueError(
            f"A: expected a symmetric matrix, but |A - Aᵀ| reaches {gap:.3g} (largest entry "
            f"{scale:.3g}); hesse's spectral tools assume symmetry. Symmetrise it with "
            "(A + A.mT) / 2 if the asymmetry is rounding error."
        )


def _check_real(a: Any) -> None:
    """Refuse ``A`` unless its dtype is a real floating torch.dtype.

    The algorithms would return wrong numbers for a complex one, and fail deep inside torch for
    an integer or a NumPy one.
    """
    dtype = a.dtype
    if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        return
    tensor = isinstance(a, Tensor)
    if not isinstance(dtype, torch.dtype):
        given = f"{type(a).__module__}.{type(a).__name__} of dtype {dtype!r}"
        fix = (
            "convert an array with torch.as_tensor(A), or give the operator a torch dtype such "
            "as torch.float64"
        )
    elif dtype.is_complex:
        given = str(dtype)
        fix = (
            "hesse's spectral tools take real symmetric matrices (complex Hermitian ones are "
            "not supported); if its entries are real, "
            + ("convert it with A.real" if tensor else "give the operator a real dtype")
        )
    else:
        given = str(dtype)
        fix = (
            "convert it with A.double()"
            if tensor
            else "give the operator a floating dtype such as torch.float64, with products in it"
        )
    kind = "matrix" if tensor else "operator"
    raise TypeError(f"A: expected a real floating-point {kind}, got {given}; {fix}.")


def _finite(out: Tensor, what: str) -> Tensor:
    """``out``, what ``what`` returned, if it is finite; a ValueError naming ``A`` otherwise."""
    # One sum, not a pass of isfinite: NaN and infinities survive it.
    if not bool(torch.isfinite(out.sum())):
        raise ValueError(
            f"A: {what} returned NaN or infinite values; check the operator (a model whose loss "
            "or parameters are not finite, or data with NaN or infinite values)."
        )
    return out


def _linear(a: Any) -> _Linear:
    if isinstance(a, Tensor):
        if a.ndim != 2 or a.shape[0] != a.shape[1]:
            raise ValueError(
                f"A: expected a square (N, N) tensor or an operator, got shape {tuple(a.shape)}."
            )
        _check_real(a)
        _check_symmetric(a)
        # Detached: results carry no graph, and the algorithms' in-place work (out=, add_) on
        # products would be refused for a tensor that requires grad.
        m = (a.float() if a.dtype in _HALF else a).detach()
        return _Linear(
            m.shape[0],
            m.dtype,
            m.device,
            lambda v: m @ v,
            lambda: m,
            lambda: m.diagonal().clone(),  # a view of A would let the caller edit A
            0,
            fresh=True,
        )
    if not isinstance(a, SymmetricOperator):
        raise TypeError(
            "A: expected a symmetric (N, N) tensor or an operator with .shape, .dtype, .device "
            f"and A @ V (such as hesse.HessianOperator), got {type(a).__name__}."
        )
    _check_real(a)
    shape = tuple(a.shape)
    if len(shape) != 2 or shape[0] != shape[1]:
        raise ValueError(f"A: expected a square (N, N) operator, got shape {shape}.")
    n = int(shape[0])
    work = torch.float32 if a.dtype in _HALF else a.dtype

    def matmat(v: Tensor) -> Tensor:
        out = a @ v.to(a.dtype)
        if not isinstance(out, Tensor):
            raise TypeError(
                f"A: A @ V returned {type(out).__module__}.{type(out).__name__}, not a "
                "torch.Tensor; an operator must map a tensor (N, K) to a tensor (N, K) of its "
                "dtype on its device (convert with torch.as_tensor inside __matmul__)."
            )
        if tuple(out.shape) != tuple(v.shape):
            raise ValueError(
                f"A: A @ V returned shape {tuple(out.shape)} for V of shape {tuple(v.shape)}; "
                "an operator must map (N, K) to (N, K)."
            )
        return _finite(out.to(work), "a product A @ V")

    def dense() -> Tensor:
        to_dense = getattr(a, "to_dense", None)
        if callable(to_dense):
            return _finite(to_dense().to(work), "A.to_dense()")
        return matmat(torch.eye(n, dtype=work, device=a.device))

    def diagonal() -> Tensor:
        exact = getattr(a, "diagonal", None)
        if callable(exact):
            with suppress(NotImplementedError):  # a sum with a part that has none
                return _finite(exact().to(work), "A.diagonal()")
        return dense().diagonal()

    if isinstance(a, Operator):
        start = getattr(a, "_lanczos_start", None)
        return _Linear(
            n, work, a.device, matmat, dense, diagonal, n, a.session, a.shard, start, fresh=True
        )
    return _Linear(n, work, a.device, matmat, dense, diagonal, n)


def _generator(seed: Seed, lin: _Linear) -> torch.Generator:
    seed = check_seed(seed)
    if isinstance(seed, torch.Generator):
        return seed
    if seed is None:
        # Drawn from torch's global generator, as torch.randn would: torch.manual_seed makes
        # the call reproducible, and nothing is reseeded. Under torch.distributed every rank
        # must draw the same probes: rank 0's seed.
        seed = lin.shard.common_seed() if lin.shard.distributed else global_seed()
    g = torch.Generator(device=lin.device)
    g.manual_seed(seed)
    return g


def _rademacher(n: int, k: int, lin: _Linear, g: torch.Generator) -> Tensor:
    signs = torch.randint(0, 2, (n, k), generator=g, device=lin.device)
    return (2 * signs - 1).to(lin.dtype)


# ------------------------------------------------------------------------------ eigenpairs


@dataclass(frozen=True)
class EigenResult:
    """Eigenpairs with their diagnostics.

    Unpacks like ``torch.linalg.eigh``: ``eigenvalues, eigenvectors = hesse.eigsh(A, k)``.

    Attributes:
        eigenvalues: ``(k,)``, in ascending order, as ``torch.linalg.eigh`` and SciPy return
            them (for ``which="LA"`` the largest is last).
        eigenvectors: ``(N, k)``, orthonormal columns, column ``i`` for ``eigenvalues[i]``.
        residuals: ``(k,)``, ``‖A v − λ v‖`` of each pair.
        converged: ``(k,)`` bools: the pair met the stopping rule (the eigenvalue error
            bound by default, the residual for an explicit ``tol``).
        num_matvecs: Products with ``A`` used (0 for a dense input solved directly).
    """

    eigenvalues: Tensor
    eigenvectors: Tensor
    residuals: Tensor
    converged: Tensor
    num_matvecs: int

    def __iter__(self) -> Iterator[Tensor]:
        """``eigenvalues, eigenvectors = result``."""
        return iter((self.eigenvalues, self.eigenvectors))

    def _ascending(self) -> EigenResult:
        idx = torch.argsort(self.eigenvalues)
        return EigenResult(
            self.eigenvalues[idx],
            self.eigenvectors[:, idx],
            self.residuals[idx],
            self.converged[idx],
            self.num_matvecs,
        )


def _order(values: Tensor, which: str) -> Tensor:
    key = {"LA": -values, "SA": values, "LM": -values.abs()}[which]
    return torch.argsort(key)


def _ritz(
    projection: Tensor, rnorm: float, k: int, which: str, tol: float, *, values_only: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    r"""Ritz values and vectors (in the basis) of ``projection``, ordered by ``which``.

    ``projection`` is symmetric by construction and ``rnorm`` is ``‖r‖``. With residual norms
    $\rho = \|r\|\,|s_\text{last}|$ and convergence flags: the residual within ``tol``
    relative to the largest Ritz value, or with ``values_only`` the eigenvalue error bound
    $\min(\rho, \rho^2/\delta)$ (Kato-Temple, $\delta$ the distance to the other Ritz values
    less their residuals) within it.
    """
    theta, s = torch.linalg.eigh(projection)
    idx = _order(theta, which)
    theta, s = theta[idx], s[:, idx]
    # Every Ritz pair's residual: another Ritz value θ_j has an eigenvalue within its own ρ_j.
    others = s[-1].abs() * rnorm
    residuals = others[:k]
    scale = theta.abs().max().clamp_min(torch.finfo(theta.dtype).tiny)
    if not values_only:
        return theta, s, residuals, residuals <= tol * scale
    # The gap to the rest of the spectrum, from below: the distance to θ_j is at least
    # |θ_i − θ_j| − ρ_j (the Ritz values alone would overestimate it).
    distance = (theta[:k, None] - theta[None, :]).abs() - others[None, :]
    distance[:, :k].fill_diagonal_(torch.inf)
    gap = distance.min(dim=1).values.clamp_min(torch.finfo(theta.dtype).tiny)
    bound = torch.minimum(residuals, residuals.square() / gap)
    return theta, s, residuals, bound <= tol * scale


def eigsh(
    A: Any,
    k: int = 1,
    which: Literal["LA", "SA", "LM"] = "LA",
    *,
    tol: float | None = None,
    max_iter: int = 50,
    max_basis: int | None = None,
    v0: Tensor | None = None,
    seed: Seed = None,
) -> EigenResult:
    r"""The ``k`` extreme eigenpairs of a symmetric matrix or operator, eigenvalues ascending.

    Thick-restart Lanczos with full reorthogonalisation: the basis grows one product at a time,
    Ritz pairs come from the exact projection $Q^\top A Q$, and a restart keeps the
    wanted Ritz vectors and continues from the residual. Small matrices (N <= 256) are solved
    densely with ``torch.linalg.eigh`` (an operator through its ``to_dense()``, or ``A @ I``).

    When to stop: by default when every wanted eigenvalue is accurate to
    $\sqrt{\varepsilon}\,\max|\lambda|$ ($\varepsilon$ the dtype's machine epsilon), by the
    bound $|\lambda - \theta| \le \min(\rho, \rho^2/\delta)$ on a Ritz value $\theta$ with
    residual $\rho = \|Av - \theta v\|$ (Kato-Temple), $\delta$ the distance to the rest of
    the spectrum, estimated from below by $|\theta - \theta_j| - \rho_j$ over the other Ritz
    pairs. The estimate rests on the Krylov space having found the eigenvalues near
    $\theta$, as every Lanczos stopping rule does. The eigenvalue error falls with the square
    of the residual, so this stops well before the residual is that small; the eigenvectors
    are then accurate to about $\rho/\delta$. An explicit ``tol`` stops on the residual instead:
    $\|Av - \theta v\| \le \mathrm{tol} \cdot \max|\theta|$, for eigenvectors to a known
    accuracy.

    Repeated eigenvalues: a Krylov space from one start vector holds one direction of each
    eigenspace in exact arithmetic, so further copies of a repeated eigenvalue come only from
    rounding and restarts, and can be missed. With $k \ge 2$, an eigenvalue of multiplicity
    3 at the top of a spectrum in $[0, 4] \cup \{5\}$ came back as ``[4, 5, 5]`` for some
    seeds, each pair converged (each is an eigenpair, but not the three largest). Where
    multiplicities are expected (symmetries, a zero eigenvalue of a rank-deficient GGN),
    compare runs with different seeds, or use ``torch.linalg.eigh(A.to_dense())``.

    The result follows ``torch.linalg.eigh`` and SciPy's ``eigsh``: eigenvalues in ascending
    order (for ``which="LA"`` the largest is last) and unpacking as
    ``eigenvalues, eigenvectors = hesse.eigsh(A, k)``.

    Args:
        A: A symmetric ``(N, N)`` tensor, or any operator with ``shape``, ``dtype``, ``device``
            and ``A @ V`` for ``V`` of shape ``(N, K)`` (`SymmetricOperator`): hesse's
            operators and their sums, curvlinops' operators, a class of your own.
        k: Number of eigenpairs, ``1 <= k < N``.
        which: ``"LA"`` the largest algebraic eigenvalues, ``"SA"`` the smallest algebraic,
            ``"LM"`` the largest in magnitude (either end).
        tol: Relative residual tolerance, $\|Av - \theta v\| \le \mathrm{tol} \cdot
            \max|\theta|$. Default ``None``: stop when the eigenvalues are accurate to the
            square root of the dtype's machine epsilon, relative to the largest (1.5e-8 in
            float64, 3.5e-4 in float32), by the bound above.
        max_iter: Restarts at most; a pair not converged by then is returned with
            ``converged`` false.
        max_basis: Basis size before a restart (default ``max(2k + 20, 40)``, capped at N).
        v0: Start vector ``(N,)``, as SciPy's ``eigsh`` takes it: for example the previous
            top eigenvector when tracking the top eigenvalue during training. Default: a
            random vector drawn from ``seed``; for ``which="LA"`` or ``"LM"`` on hesse's
            curvature operators, plus the loss gradient (same norm), which lies mostly in
            the top eigenvectors' span (Gur-Ari et al., 2018): 28 instead of 33 products on
            the benchmarks' Hessian. Lanczos finds only eigenvectors the start vector has a
            component along: a ``v0`` orthogonal to the top eigenvector returns the next one,
            flagged converged (no stopping rule can tell); a random start has such a
            component with probability 1. Unused when N <= 256 (solved densely).
        seed: An int or a ``torch.Generator`` for the random start vector; with ``v0``, used
            only should Lanczos exhaust its Krylov space and need a fresh direction. ``None``
            draws a seed from torch's global generator (left alone when none is needed).

    Returns:
        An `EigenResult`: ``eigenvalues`` ``(k,)`` in ascending order, ``eigenvectors``
        ``(N, k)`` (column ``i`` belongs to ``eigenvalues[i]``), ``residuals``, ``converged``
        flags and ``num_matvecs``, the products used (0 for a dense tensor solved directly, N
        for an operator formed densely). It unpacks as ``eigenvalues, eigenvectors``.

    Raises:
        ValueError: ``k >= N``, an unknown ``which``, a ``tol`` that is not a finite
            number ``> 0``, a negative ``max_iter``, a ``max_basis`` below 2 or not above
            ``k``, a non-square or non-symmetric dense ``A``, or a ``v0`` of the wrong shape,
            zero or not finite.
        TypeError: ``A`` is neither a tensor nor an operator, or not of a real floating dtype;
            a non-integer ``k``, ``max_iter`` or ``max_basis``; a ``v0`` that is not a real
            tensor; a ``seed`` that is not an int, a generator or None.

    Examples:
        The eigenvalues of ``diag(1, ..., 300)`` are its entries; the two largest come last:

        >>> A = torch.diag(torch.arange(1.0, 301.0, dtype=torch.float64))
        >>> eigenvalues, eigenvectors = eigsh(A, k=2, which="LA", seed=0)
        >>> eigenvalues.round(decimals=4)  # accurate to √eps of the largest by default
        tensor([299., 300.], dtype=torch.float64)
        >>> eigenvectors.abs().argmax(dim=0)  # the unit vectors e_299 and e_300
        tensor([298, 299])

        A start vector close to the answer (here the previous result) is a warm start:

        >>> again = eigsh(A, k=1, which="LA", v0=eigenvectors[:, -1])
        >>> again.eigenvalues.round(decimals=4), bool(again.converged.all())
        (tensor([300.], dtype=torch.float64), True)
    """
    lin = _linear(A)
    n = lin.n
    tol = check_tolerance(tol)
    values_only = tol is None  # the default stops on the eigenvalues' accuracy
    if tol is None:
        tol = torch.finfo(lin.dtype).eps ** 0.5
    if which not in _WHICH:
        raise ValueError(f"which: expected one of {_WHICH}, got {which!r}.")
    integer("k", k)
    max_iter = integer("max_iter", max_iter, 0)
    if max_basis is not None:
        integer("max_basis", max_basis, 2)
    if k >= n:
        raise ValueError(
            f"k: must be smaller than N = {n} for an iterative solver, got k = {k}; for all "
            "eigenvalues use torch.linalg.eigh(A.to_dense())."
        )
    # Checked whichever path solves it: a small matrix accepts only what a large one does.
    if max_basis is not None and max_basis <= k:
        raise ValueError(f"max_basis: must exceed k = {k}, got {max_basis}.")
    seed = check_seed(seed)
    start = None if v0 is None else _start_vector(v0, lin)
    with lin.session():
        result = _eigsh(
            lin,
            k,
            which,
            tol,
            max_iter,
            max_basis,
            seed,
            start,
            dense=isinstance(A, Tensor),
            values_only=values_only,
        )
    return result._ascending()


def _start_vector(v0: Any, lin: _Linear) -> Tensor:
    if not isinstance(v0, Tensor):
        raise TypeError(f"v0: expected a tensor of shape ({lin.n},), got {type(v0).__name__}.")
    if v0.shape != (lin.n,):
        raise ValueError(f"v0: expected shape ({lin.n},), got {tuple(v0.shape)}.")
    if v0.is_complex():  # casting would drop the imaginary part
        raise TypeError(
            f"v0: expected a real tensor, got {v0.dtype}; pass v0.real if the imaginary part "
            "is rounding error."
        )
    start = v0.detach().to(device=lin.device, dtype=lin.dtype)
    if not bool(torch.isfinite(start).all()) or not float(torch.linalg.vector_norm(start)) > 0:
        raise ValueError("v0: expected a finite, non-zero start vector.")
    return start


def _default_start(lin: _Linear, g: torch.Generator, which: str) -> Tensor:
    """Lanczos's default start: a random vector, plus a direction ``A`` suggests.

    For the top eigenvalues (``which`` "LA" or "LM") of hesse's curvature operators the
    direction is the loss gradient (`CurvatureOperator._lanczos_start`); both have norm 1. The
    random half keeps every eigenvector within reach whatever the suggested direction is
    (a zero or non-finite one is dropped).
    """
    r = torch.randn(lin.n, generator=g, dtype=lin.dtype, device=lin.device)
    if which == "SA" or lin.start is None:
        return r
    direction = lin.start().to(lin.dtype)
    norm = float(torch.linalg.vector_norm(direction))
    if not (math.isfinite(norm) and norm > 0):
        return r
    return direction / norm + r / torch.linalg.vector_norm(r)


def _eigsh(
    lin: _Linear,
    k: int,
    which: str,
    tol: float,
    max_iter: int,
    max_basis: int | None,
    seed: Seed,
    start: Tensor | None,
    *,
    dense: bool,
    values_only: bool = False,
) -> EigenResult:
    n = lin.n
    if n <= DENSE_LIMIT:
        matrix = lin.dense()
        values, vectors = torch.linalg.eigh(matrix)
        # Relative to max |λ| over the whole spectrum, as in Lanczos and the docstring: the
        # wanted eigenvalues alone (near 0 for which="SA" on a PSD matrix) would make rounding
        # errors look unconverged.
        scale = values.abs().max().clamp_min(torch.finfo(lin.dtype).tiny)
        idx = _order(values, which)[:k]
        values, vectors = values[idx], vectors[:, idx]
        residuals = torch.linalg.vector_norm(matrix @ vectors - vectors * values, dim=0)
        used = 0 if dense else n
        return EigenResult(values, vectors, residuals, residuals <= tol * scale + 1e-12, used)

    m = min(n, max_basis or max(2 * k + 20, 40))
    # Drawn only when needed (a random start, or a fresh direction after a breakdown): with v0
    # the seed, and torch's global generator, are left alone.
    generator: list[torch.Generator] = []

    def rng() -> torch.Generator:
        if not generator:
            generator.append(_generator(seed, lin))
        return generator[0]

    # Row j is the j-th Lanczos vector: contiguous rows make the reorthogonalisation two
    # matrix-vector products on contiguous memory (a column layout cost 0.75 ms per step at
    # N = 16,522, a third of a Hessian product's time).
    rows = torch.empty(m, n, dtype=lin.dtype, device=lin.device)
    # P = QᵀAQ, grown one column per product from the reorthogonalisation coefficients: a
    # Krylov-Schur decomposition A Q = Q P + r e_lastᵀ, tridiagonal plus, after a restart,
    # an arrowhead. The residual of a Ritz pair (θ, Qs) is then ‖r‖·|s_last|, for free.
    projection = torch.zeros(m, m, dtype=lin.dtype, device=lin.device)
    r = start if start is not None else _default_start(lin, rng(), which)
    size, matvecs = 0, 0
    # Convergence is checked after every product once the basis has a few more vectors than
    # wanted (fewer would risk settling on an interior pair).
    min_size = min(m, 2 * k + 10)
    theta = s_ = torch.empty(0)
    estimates = converged = torch.zeros(k, dtype=torch.bool)
    largest = 0.0  # the largest entry of the projection so far: the scale of a breakdown
    norm = float(torch.linalg.vector_norm(r))  # ‖r‖, kept up to date
    for restart in range(max_iter + 1):
        while size < m:
            if size > 0 and not norm > 1e-10 * largest:
                # An invariant subspace: continue from a fresh direction orthogonal to it.
                q = torch.randn(n, generator=rng(), dtype=lin.dtype, device=lin.device)
                for _ in range(2):
                    q = q - rows[:size].T @ (rows[:size] @ q)
                rows[size] = q / torch.linalg.vector_norm(q)
            else:
                torch.div(r, norm, out=rows[size])
            w = lin.matmat(rows[size, :, None])[:, 0].clone()  # updated in place below
            matvecs += 1
            # The recurrence's own terms first: A q_j lies in the span of q_j and q_{j-1}
            # (after a restart, also of the kept Ritz vectors), so subtracting those two
            # leaves the full reorthogonalisation only rounding errors to remove, and its
            # second pass (Kahan-Parlett "twice is enough") is rarely needed: two matrix-vector
            # products over the basis per step instead of four.
            basis, lo = rows[: size + 1], max(0, size - 1)
            local = rows[lo : size + 1] @ w
            w.addmv_(rows[lo : size + 1].T, local, alpha=-1)
            coefficients = basis @ w
            w.addmv_(basis.T, coefficients, alpha=-1)
            removed_norm = torch.linalg.vector_norm(coefficients)  # what the full pass removed
            coefficients[lo:] += local
            norm, removed, peak = torch.stack(
                [torch.linalg.vector_norm(w), removed_norm, coefficients.abs().max()]
            ).tolist()  # one synchronisation
            largest = max(largest, peak)
            # Twice is enough: a second pass when the full one removed most of what was left
            # (‖w‖ below 0.7 of its norm before it, ‖w‖² + ‖c‖²).
            if norm * norm < 0.49 * (norm * norm + removed * removed):
                correction = basis @ w
                w.addmv_(basis.T, correction, alpha=-1)
                coefficients += correction
                norm = float(torch.linalg.vector_norm(w))
            projection[: size + 1, size] = coefficients
            projection[size, : size + 1] = coefficients
            r = w
            size += 1
            if size >= min_size and size < m:
                theta, s_, estimates, converged = _ritz(
                    projection[:size, :size], norm, k, which, tol, values_only=values_only
                )
                if bool(converged.all()):
                    break
        theta, s_, estimates, converged = _ritz(
            projection[:size, :size], norm, k, which, tol, values_only=values_only
        )
        if bool(converged.all()) or restart == max_iter:
            break
        # Thick restart: keep the wanted Ritz vectors (and a few more); r continues the basis.
        keep = min(m - 1, k + max(2, (m - k) // 3))
        # The next column's reorthogonalisation coefficients rebuild the arrowhead couplings
        # ‖r‖·s_last,i by themselves, since Ritz vectors are orthogonal to r.
        rows[:keep] = s_[:, :keep].T @ rows[:size]
        projection.zero_()
        projection[:keep, :keep] = torch.diag(theta[:keep])
        size = keep
    vectors = rows[:size].T @ s_[:, :k]
    return EigenResult(theta[:k], vectors, estimates, converged, matvecs)


def sharpness(A: Any, *, tol: float | None = None, seed: Seed = None) -> Tensor:
    r"""The sharpness $\max_i |\lambda_i|$: the largest absolute eigenvalue.

    Not the largest *algebraic* eigenvalue $\lambda_{\max}$ that edge-of-stability work tracks:
    the two differ when the most negative eigenvalue is larger in magnitude than the largest
    one. Ask ``eigsh(A, k=1, which="LA")`` for $\lambda_{\max}$.

    Dense matrices with N <= 256, and batches of dense matrices, are solved with
    ``torch.linalg.eigvalsh``; a larger dense matrix or an operator by Lanczos
    (`eigsh` with ``which="LM"``).

    Args:
        A: A symmetric ``(N, N)`` tensor, a batch ``(..., N, N)`` of them, or any operator
            with ``shape``, ``dtype``, ``device`` and ``A @ V`` (`SymmetricOperator`).
        tol: Relative residual tolerance of Lanczos (see `eigsh`); unused by a dense solve.
        seed: An int or a ``torch.Generator`` for Lanczos's random start vector; ``None``
            draws a seed from torch's global generator. Unused by a dense solve.

    Returns:
        ``(...)``, one value per matrix, for a batch of dense matrices; a 0-dim tensor for an
        ``(N, N)`` tensor or an operator. A half-precision input gives float32.

    Raises:
        ValueError: ``A`` is not square or a dense ``A`` is not symmetric; a ``tol`` that is
            not a finite number > 0.
        TypeError: ``A`` is neither a tensor nor an operator, or not of a real floating dtype;
            a ``seed`` that is not an int, a generator or None.

    Examples:
        The most negative eigenvalue decides here, where $\lambda_{\max} = 2$:

        >>> A = torch.diag(torch.tensor([2.0, -3.0, 1.0]))
        >>> sharpness(A)
        tensor(3.)
        >>> eigsh(A, k=1, which="LA").eigenvalues
        tensor([2.])
    """
    # Checked whichever path solves it: a small matrix accepts only what a large one does.
    tol = check_tolerance(tol)
    seed = check_seed(seed)
    if isinstance(A, Tensor) and (A.ndim != 2 or A.shape[-1] <= DENSE_LIMIT):
        return dense_sharpness(A.detach())  # no graph, as from Lanczos
    lin = _linear(A)
    if lin.n == 1:
        with lin.session():
            return lin.dense().abs().reshape(())
    return eigsh(A, k=1, which="LM", tol=tol, seed=seed).eigenvalues.abs()[0]


def dense_sharpness(A: Tensor) -> Tensor:
    """``max |λ|`` of each of the dense symmetric matrices ``(..., N, N)`` by ``eigvalsh``.

    Half-precision matrices are solved in float32 (and the result is float32).
    """
    if A.ndim < 2 or A.shape[-1] != A.shape[-2]:
        raise ValueError(f"A: expected square matrices (..., N, N), got {tuple(A.shape)}.")
    _check_real(A)
    if A.shape[-1] == 0:
        raise ValueError("A: has no rows (N = 0), and so no eigenvalues; pass a nonempty matrix.")
    _check_symmetric(A)
    return torch.linalg.eigvalsh(A.float() if A.dtype in _HALF else A).abs().amax(dim=-1)


# ----------------------------------------------------------------------------------- trace


@dataclass(frozen=True)
class TraceResult:
    """A trace estimate.

    Attributes:
        estimate: 0-dim tensor, unbiased.
        stderr: 0-dim tensor, the standard error of the estimate (from the spread of the
            probes; 0 when the estimate is exact, NaN when a single probe leaves it unknown).
        num_matvecs: Products with ``A`` used.
    """

    estimate: Tensor
    stderr: Tensor
    num_matvecs: int


def trace(
    A: Any,
    num_matvecs: int = 30,
    method: Literal["hutchinson", "hutch++"] = "hutch++",
    *,
    seed: Seed = None,
) -> TraceResult:
    r"""Estimate $\operatorname{tr}(A)$ from ``num_matvecs`` products, all in one batch.

    ``"hutchinson"``: the mean of $z^\top A z$ over Rademacher probes. ``"hutch++"``
    (Meyer et al., 2021): a third of the products find a basis $Q$ of ``A``'s dominant
    range, whose part $\operatorname{tr}(Q^\top A Q)$ is exact, and Hutchinson estimates
    only the rest, $(I - QQ^\top) A (I - QQ^\top)$; far smaller error when the spectrum
    decays. The standard error comes from the spread of the Hutchinson samples.

    A budget that reaches N products, ``num_matvecs >= N``, gives the exact trace instead:
    the sum of the exact diagonal (the tensor's, the operator's ``diagonal()``, or that of
    ``A @ I``), with ``stderr`` 0.

    Args:
        A: A symmetric ``(N, N)`` tensor, or any operator with ``shape``, ``dtype``,
            ``device`` and ``A @ V`` (`SymmetricOperator`).
        num_matvecs: Products with ``A`` to spend: at least 2 for ``"hutchinson"``, 3 for
            ``"hutch++"``.
        method: ``"hutch++"`` (default) or ``"hutchinson"``.
        seed: An int or a ``torch.Generator`` for the random probes; ``None`` draws a seed
            from torch's global generator.

    Returns:
        A `TraceResult`: the unbiased ``estimate``, its standard error ``stderr`` (0 when
        exact, NaN when a single Hutch++ probe leaves it unknown) and ``num_matvecs``, the
        products used (for an exact trace: 0 for a dense tensor, N for an operator). The
        standard error is estimated from the probes themselves: with a handful of products
        it is itself rough (over 300 seeds, 2 Hutchinson or 4-6 Hutch++ products put the
        estimate more than 3 standard errors off in 21-26% of runs); from about 30 products
        on it is calibrated.

    Raises:
        ValueError: An unknown ``method``; ``num_matvecs`` below its minimum; a non-square or
            non-symmetric dense ``A``.
        TypeError: ``A`` is neither a tensor nor an operator, or not of a real floating dtype;
            a non-integer ``num_matvecs``; a ``seed`` that is not an int, a generator or None.

    Examples:
        Rademacher probes have $z_i^2 = 1$, so Hutchinson is exact on a diagonal matrix:
        $z^\top D z = \operatorname{tr} D$ for every probe, with no spread:

        >>> D = torch.diag(torch.arange(1.0, 301.0, dtype=torch.float64))  # trace 45,150
        >>> result = trace(D, num_matvecs=10, method="hutchinson", seed=0)
        >>> float(result.estimate), float(result.stderr), result.num_matvecs
        (45150.0, 0.0, 10)

        A budget of N products or more gives the exact trace:

        >>> A = torch.ones(4, 4, dtype=torch.float64) + torch.eye(4, dtype=torch.float64)
        >>> exact = trace(A, num_matvecs=4)
        >>> float(exact.estimate), float(exact.stderr), exact.num_matvecs  # 0 products: dense
        (8.0, 0.0, 0)
    """
    lin = _linear(A)
    if method not in ("hutchinson", "hutch++"):
        raise ValueError(f"method: expected 'hutchinson' or 'hutch++', got {method!r}.")
    m = integer("num_matvecs", num_matvecs, 2 if method == "hutchinson" else 3)
    seed = check_seed(seed)  # also where an exact budget leaves it unused
    if m >= lin.n:  # N products give the exact trace: no estimate needs more
        with lin.session():
            exact = lin.diagonal().sum()
        return TraceResult(exact, torch.zeros((), dtype=lin.dtype), lin.products_for_exact)
    g = _generator(seed, lin)
    with lin.session():
        return _trace(lin, m, method, g)


def _trace(lin: _Linear, m: int, method: str, g: torch.Generator) -> TraceResult:
    if method == "hutchinson":
        z = _rademacher(lin.n, m, lin, g)
        samples = (z * lin.matmat(z)).sum(0)
        return TraceResult(samples.mean(), samples.std() / math.sqrt(m), m)
    sketch = m // 3
    probes = m - 2 * sketch
    q, _ = torch.linalg.qr(lin.matmat(_rademacher(lin.n, sketch, lin, g)))
    z = _rademacher(lin.n, probes, lin, g)
    z = z - q @ (q.T @ z)
    images = lin.matmat(torch.cat([q, z], dim=1))
    exact = (q * images[:, : q.shape[1]]).sum()
    samples = (z * images[:, q.shape[1] :]).sum(0)
    if q.shape[1] >= lin.n:  # the sketch spans everything: the trace is exact
        return TraceResult(exact + samples.mean(), torch.zeros((), dtype=lin.dtype), m)
    if samples.numel() < 2:  # one probe: no spread to estimate the error from
        return TraceResult(exact + samples.mean(), torch.full((), math.nan, dtype=lin.dtype), m)
    return TraceResult(exact + samples.mean(), samples.std() / math.sqrt(probes), m)


def diagonal(
    A: Any,
    num_matvecs: int = 30,
    method: Literal["hutchinson", "diag++", "exact"] = "diag++",
    *,
    seed: Seed = None,
) -> Tensor:
    r"""Estimate the diagonal ``(N,)`` from ``num_matvecs`` products.

    ``"hutchinson"``: the mean of $z \odot Az$ over Rademacher probes. ``"diag++"``:
    a low-rank correction in the spirit of Hutch++ and XDiag — a third of the products build a
    basis $Q$ of ``A``'s dominant range, $\operatorname{diag}(QQ^\top A)$ is taken
    exactly from another third, and Hutchinson estimates the diagonal of the rest with the
    remaining products. ``"exact"``: the operator's exact ``diagonal()`` (or the dense
    diagonal), ``num_matvecs`` ignored.

    A budget that reaches N products, ``num_matvecs >= N``, gives the exact diagonal with any
    method: the tensor's, the operator's ``diagonal()``, or that of ``A @ I``.

    Args:
        A: A symmetric ``(N, N)`` tensor, or any operator with ``shape``, ``dtype``,
            ``device`` and ``A @ V`` (`SymmetricOperator`); ``method="exact"`` also needs
            ``A.diagonal()``.
        num_matvecs: Products with ``A`` to spend: at least 1 for ``"hutchinson"``, 3 for
            ``"diag++"``; ignored by ``"exact"``.
        method: ``"diag++"`` (default), ``"hutchinson"`` or ``"exact"``.
        seed: An int or a ``torch.Generator`` for the random probes; ``None`` draws a seed
            from torch's global generator.

    Returns:
        ``(N,)`` in ``A``'s dtype (float32 for a half-precision ``A``).

    Raises:
        ValueError: An unknown ``method``; ``num_matvecs`` below its minimum; a non-square or
            non-symmetric dense ``A``.
        TypeError: ``A`` is neither a tensor nor an operator, or not of a real floating dtype;
            ``method="exact"`` for an object without ``diagonal()``; a non-integer
            ``num_matvecs``; a ``seed`` that is not an int, a generator or None.
        NotImplementedError: ``method="exact"`` for a sum of operators one of which has no
            exact diagonal.

    Examples:
        On a diagonal matrix $z \odot Dz = d \odot z^2 = d$ for every Rademacher probe, so
        Hutchinson is exact:

        >>> D = torch.diag(torch.arange(1.0, 301.0, dtype=torch.float64))
        >>> diagonal(D, num_matvecs=4, method="hutchinson", seed=0)[:4]
        tensor([1., 2., 3., 4.], dtype=torch.float64)
    """
    lin = _linear(A)
    seed = check_seed(seed)  # also where an exact diagonal leaves it unused
    if method == "exact":
        if not callable(getattr(A, "diagonal", None)):
            raise TypeError(
                f"method='exact' needs A.diagonal() (a dense tensor or a hesse operator); "
                f"{type(A).__name__} has only products: use method='diag++' or 'hutchinson'."
            )
        if isinstance(A, Tensor):
            return lin.diagonal()  # a copy: a view would let the caller edit A
        return _finite(A.diagonal().to(lin.dtype), "A.diagonal()")
    if method not in ("hutchinson", "diag++"):
        raise ValueError(f"method: expected 'hutchinson', 'diag++' or 'exact', got {method!r}.")
    m = integer("num_matvecs", num_matvecs, 1 if method == "hutchinson" else 3)
    if m >= lin.n:  # N products give the exact diagonal
        with lin.session():
            return lin.diagonal()
    g = _generator(seed, lin)
    with lin.session():
        return _diagonal(lin, m, method, g)


def _diagonal(lin: _Linear, m: int, method: str, g: torch.Generator) -> Tensor:
    if method == "hutchinson":
        z = _rademacher(lin.n, m, lin, g)
        return (z * lin.matmat(z)).mean(1)
    sketch = m // 3
    probes = m - 2 * sketch
    q, _ = torch.linalg.qr(lin.matmat(_rademacher(lin.n, sketch, lin, g)))
    z = _rademacher(lin.n, probes, lin, g)
    images = lin.matmat(torch.cat([q, z], dim=1))
    aq, az = images[:, : q.shape[1]], images[:, q.shape[1] :]
    low_rank = (q * aq).sum(1)  # diag(Q Qᵀ A) for symmetric A: rows of Q ⊙ A Q
    rest = az - q @ (aq.T @ z)  # (A - Q Qᵀ A) z
    return low_rank + (z * rest).mean(1)


# --------------------------------------------------------------------------- spectral density


@dataclass(frozen=True)
class SpectralDensity:
    """A smoothed eigenvalue density from stochastic Lanczos quadrature, or the exact one.

    Attributes:
        grid: ``(G,)`` points.
        density: ``(G,)`` values; integrates to 1 over ``grid``.
        nodes: ``(P, m)`` Ritz values of each probe's Lanczos run; ``(1, N)``, all the
            eigenvalues, for an exact density (a budget that reached N products).
        weights: ``(P, m)`` quadrature weights; each probe's sum to 1 / P (``1 / N`` each
            for an exact density).
        sigma: Width of the Gaussian kernel.
        num_matvecs: Products with ``A`` used.
    """

    grid: Tensor
    density: Tensor
    nodes: Tensor
    weights: Tensor
    sigma: float
    num_matvecs: int

    def plot(self, path: Any = None, ax: Any = None, log: bool = True) -> Any:
        """Plot the density (log scale by default) with matplotlib; save a PNG to ``path``.

        With ``ax`` it draws there; with only ``path`` it draws on a figure of its own that
        pyplot never sees (the user's backend and open figures are untouched); with neither,
        on a new pyplot figure, for interactive use. The title says ``exact`` for an exact
        density, else the number of SLQ probes. Needs the ``plot`` extra
        (``pip install "hesse[plot]"``).

        Args:
            path: A file name or binary file object to save a PNG to (120 dpi); ``None``
                saves nothing.
            ax: Matplotlib axes to draw into; ``None`` makes a figure.
            log: A logarithmic density axis (default), which shows outliers next to the
                bulk; ``False`` for a linear one.

        Returns:
            The matplotlib axes drawn on.

        Raises:
            ImportError: matplotlib is not installed.
        """
        try:
            from matplotlib.figure import Figure
        except ImportError as err:
            raise ImportError(
                "SpectralDensity.plot() needs matplotlib: pip install 'hesse[plot]'."
            ) from err
        if ax is None and path is not None:
            ax = Figure(figsize=(6, 3.5)).subplots()
        elif ax is None:
            import matplotlib.pyplot as plt

            _, ax = plt.subplots(figsize=(6, 3.5))
        grid = self.grid.detach().cpu().double().numpy()
        density = self.density.detach().cpu().double().numpy()
        floor = density.max() * 1e-8 if log else 0.0
        ax.plot(grid, density + floor, color="C0")
        ax.fill_between(grid, floor, density + floor, color="C0", alpha=0.25)
        if log:
            ax.set_yscale("log")
        ax.set_xlabel("eigenvalue")
        ax.set_ylabel("density")
        probes, nodes = self.nodes.shape[0], self.nodes.shape[-1]  # exact: one row, equal weights
        exact = probes == 1 < nodes and bool((self.weights == self.weights.reshape(-1)[0]).all())
        how = "exact" if exact else f"SLQ, {probes} probe{'' if probes == 1 else 's'}"
        ax.set_title(f"Spectral density ({how})")
        if path is not None:
            ax.figure.savefig(path, dpi=120, bbox_inches="tight")
        return ax


def _lanczos_probes(lin: _Linear, v: Tensor, steps: int) -> tuple[Tensor, Tensor]:
    """Lanczos on every column of ``v`` at once: tridiagonals ``alpha (P, m)``, ``beta (P, m-1)``.

    One block product per step (all probes vectorised), full reorthogonalisation per probe.
    """
    n, p = v.shape
    basis = torch.empty(steps, n, p, dtype=lin.dtype, device=lin.device)
    alpha = torch.zeros(p, steps, dtype=lin.dtype, device=lin.device)
    beta = torch.zeros(p, max(steps - 1, 0), dtype=lin.dtype, device=lin.device)
    q = v / torch.linalg.vector_norm(v, dim=0)
    # A probe whose Krylov space is exhausted (fewer distinct eigenvalues than steps: a low
    # rank, the identity) has a residual of rounding noise; normalising it would invent
    # directions, and Ritz values far outside the spectrum. It stops there: β = 0 decouples
    # the rest of its tridiagonal, whose diagonal repeats its last α (a Rayleigh quotient,
    # inside the spectrum) with weight 0.
    alive = torch.ones(p, dtype=torch.bool, device=lin.device)
    scale = torch.zeros(p, dtype=lin.dtype, device=lin.device)
    floor = torch.finfo(lin.dtype).eps ** 0.5
    for j in range(steps):
        basis[j] = q
        w = lin.matmat(q)
        a = (q * w).sum(0)
        alpha[:, j] = a if j == 0 else torch.where(alive, a, alpha[:, j - 1])
        scale = torch.maximum(scale, a.abs())
        for _ in range(2):  # reorthogonalise against this probe's own basis
            w = w - torch.einsum(
                "jnp,jp->np", basis[: j + 1], torch.einsum("jnp,np->jp", basis[: j + 1], w)
            )
        if j + 1 < steps:
            b = torch.linalg.vector_norm(w, dim=0)
            scale = torch.maximum(scale, b)
            alive = alive & (b > floor * scale)
            beta[:, j] = torch.where(alive, b, torch.zeros_like(b))
            q = torch.where(alive, w / b.clamp_min(torch.finfo(lin.dtype).tiny), 0.0)
    return alpha, beta


def spectral_density(
    A: Any,
    *,
    num_probes: int = 8,
    lanczos_steps: int = 60,
    grid: int | Tensor = 400,
    sigma: float | None = None,
    seed: Seed = None,
) -> SpectralDensity:
    r"""The eigenvalue density of ``A`` by stochastic Lanczos quadrature (SLQ).

    Stochastic Lanczos quadrature (Ubaru, Chen & Saad, 2017; Ghorbani et al., 2019): each of
    ``num_probes`` random unit vectors runs ``lanczos_steps`` Lanczos steps (all probes
    vectorised in one block product per step). The tridiagonal's eigenvalues are quadrature
    nodes and the squared first components of its eigenvectors their weights, so
    $\sum_j w_j f(\theta_j) \approx \frac{1}{N}\operatorname{tr} f(A)$. The density is
    the nodes smoothed by a Gaussian of width ``sigma`` (default 1% of the spectral range),
    normalised to integrate to 1 over the grid.

    A budget that reaches N products, ``num_probes * lanczos_steps >= N``, with N <= 2048,
    gives the exact density instead: all N eigenvalues (``eigvalsh`` of the dense matrix) as
    nodes of one row, each weighted 1/N.

    Args:
        A: A symmetric ``(N, N)`` tensor, or any operator with ``shape``, ``dtype``,
            ``device`` and ``A @ V`` (`SymmetricOperator`).
        num_probes: Random start vectors ``P``, at least 1.
        lanczos_steps: Lanczos steps per probe, at least 1 (capped at N); the products spent
            are ``num_probes * lanczos_steps``.
        grid: The number of evenly spaced points (at least 2) spanning the nodes plus five
            ``sigma`` on each side, or an increasing 1-D tensor of points.
        sigma: Width of the Gaussian kernel in eigenvalue units; default 1% of the range of
            the nodes. Pass it to compare densities on one scale.
        seed: An int or a ``torch.Generator`` for the random probes; ``None`` draws a seed
            from torch's global generator.

    Returns:
        A `SpectralDensity`: ``grid`` and ``density`` ``(G,)`` on ``A``'s device, the nodes
        and weights ``(P, m)`` (``(1, N)`` when exact), ``sigma`` and ``num_matvecs`` (for an
        exact density: 0 for a dense tensor, N for an operator).

    Raises:
        ValueError: ``sigma`` is not a finite number > 0; ``grid`` (a tensor) is not an
            increasing 1-D grid of at least 2 points, or misses the spectrum; ``num_probes``,
            ``lanczos_steps`` or ``grid`` (an int) below their minimum; a non-square or
            non-symmetric dense ``A``.
        TypeError: ``A`` is neither a tensor nor an operator, or not of a real floating dtype;
            a non-integer ``num_probes``, ``lanczos_steps`` or ``grid``; a ``sigma`` or
            ``seed`` of the wrong type.

    Examples:
        Four products reach N = 4: the nodes are the exact eigenvalues, each weighted 1/4:

        >>> A = torch.diag(torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64))
        >>> density = spectral_density(A, num_probes=1, lanczos_steps=4)
        >>> density.nodes
        tensor([[1., 2., 3., 4.]], dtype=torch.float64)
        >>> density.weights
        tensor([[0.2500, 0.2500, 0.2500, 0.2500]], dtype=torch.float64)
        >>> density.sigma, density.num_matvecs  # 1% of the range 1..4; no products: dense
        (0.03, 0)
    """
    lin = _linear(A)
    if lin.n == 0:
        raise ValueError("A: has no rows (N = 0), and so no spectrum; pass a nonempty matrix.")
    seed = check_seed(seed)  # also where an exact density leaves it unused
    probes = integer("num_probes", num_probes)
    steps = min(integer("lanczos_steps", lanczos_steps), lin.n)
    width = None if sigma is None else positive_float("sigma", sigma)
    points = None
    if isinstance(grid, Tensor):
        if grid.ndim != 1 or grid.numel() < 2 or not bool((grid.diff() > 0).all()):
            raise ValueError(
                f"grid: expected an increasing 1-D tensor of at least 2 points, got shape "
                f"{tuple(grid.shape)}{'' if grid.ndim != 1 else ' (not increasing)'}."
            )
        points = grid.to(device=lin.device, dtype=lin.dtype)
    else:
        count = integer("grid", grid, 2)
    if probes * steps >= lin.n and lin.n <= EXACT_DENSITY_LIMIT:
        # The budget reaches N products: the exact spectrum, every eigenvalue weighted 1/N.
        with lin.session():
            nodes = torch.linalg.eigvalsh(lin.dense())[None]
        weights = torch.full_like(nodes, 1.0 / lin.n)
        used = lin.products_for_exact
    else:
        g = _generator(seed, lin)
        v = torch.randn(lin.n, probes, generator=g, dtype=lin.dtype, device=lin.device)
        with lin.session():
            alpha, beta = _lanczos_probes(lin, v, steps)
        diagonals = (torch.diag_embed(beta, 1), torch.diag_embed(beta, -1))
        nodes, vectors = torch.linalg.eigh(torch.diag_embed(alpha) + sum(diagonals))
        weights = vectors[:, 0, :] ** 2 / probes
        used = probes * steps
    lo, hi = float(nodes.min()), float(nodes.max())
    # A degenerate spectrum (a multiple of the identity) still gets a grid the dtype resolves.
    span = max(hi - lo, 1e5 * torch.finfo(lin.dtype).eps * max(abs(lo), abs(hi), 1.0))
    if width is None:
        width = 0.01 * span
    if points is None:
        points = torch.linspace(
            lo - 5 * width, hi + 5 * width, count, dtype=lin.dtype, device=lin.device
        )
    kernel = torch.exp(-0.5 * ((points[:, None] - nodes.reshape(1, -1)) / width) ** 2)
    density = kernel @ weights.reshape(-1) / (width * math.sqrt(2 * math.pi))
    mass = float(torch.trapezoid(density, points))
    if not mass > 1e-6:
        raise ValueError(
            f"grid: holds almost none of the spectrum (mass {mass:.3g} of 1): the eigenvalues "
            f"lie in [{lo:.4g}, {hi:.4g}] but the grid spans [{float(points[0]):.4g}, "
            f"{float(points[-1]):.4g}] (sigma {width:.3g}); pass a grid that covers them, or "
            "an int for an automatic grid."
        )
    density = density / mass
    return SpectralDensity(points, density, nodes, weights, width, used)
