"""Damped inverse products ``(A + λI)⁻¹ b``: CG, MINRES and LiSSA, and the inverse as an operator.

Every method takes ``A`` as a dense symmetric tensor or any operator of the protocol
(`hesse.SymmetricOperator`) and advances ``K`` right-hand sides together: one block product
``A @ P`` with ``P`` of shape ``(N, k)``, ``k <= K``, per iteration. MINRES and LiSSA keep the
scalars of their recurrences per column. CG with ``K > 1`` is block CG: the columns share one
block Krylov subspace, searched with matrix step lengths, so ``K`` right-hand sides typically
need fewer iterations than one. A column leaves the block as soon as it has converged, so
later products are narrower. The whole solve runs inside one session of the operator
(`hesse._protocol.Operator.session`), where products may reuse work such as a kept gradient
graph.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from hesse._distributed import Shard
from hesse._layout import ParamLayout
from hesse._protocol import Operator, check_dict, check_operand
from hesse._spectral import _Linear, _linear, eigsh
from hesse._validate import check_tolerance, integer, positive_float

__all__ = ["InverseOperator", "SolveResult", "default_tol", "solve"]

Method = Literal["cg", "minres", "lissa"]
_METHODS = ("cg", "minres", "lissa")
# The loosest default relative residual: below it the answer rarely matters for the uses
# (influence, Newton steps) and each further decade costs more iterations.
_DEFAULT_TOL_FLOOR = 1e-6
# LiSSA's default scale: this fraction of an upper bound on λ_max(A + λI). The recursion
# converges for any scale above λ_max / 2, and the smaller the scale the faster it converges;
# 3/4 keeps a margin for an estimate that is slightly low.
_LISSA_SCALE_FRACTION = 0.75
# LiSSA stops as diverged when a column's residual exceeds this multiple of its smallest so far
# (within its range of convergence the residual never grows).
_LISSA_GROWTH = 2.0
# `_may_drift`: the margin on the first-order bound of the gap between the recursive and the
# true residual (whose norm estimate, a Rayleigh quotient, is low).
_DRIFT_MARGIN = 1000.0
# CG's curvature test: pᵀ(A + λI)p / pᵀp at most this many eps times the norm estimate is flat.
_FLAT = 100.0


def default_tol(dtype: torch.dtype) -> float:
    """The default relative residual of a solve in ``dtype`` (the dtype computed in).

    ``max(√eps, 1e-6)``: 1e-6 in float64, 3.5e-4 in float32 (and for half-precision operators,
    which are solved in float32).
    """
    return max(torch.finfo(dtype).eps ** 0.5, _DEFAULT_TOL_FLOOR)


def _default_max_iter(method: str, n: int) -> int:
    return 10 * n if method != "lissa" else max(10 * n, 10_000)


@dataclass(frozen=True)
class SolveResult:
    r"""The solution of $(A + \lambda I)\,x = b$ with its diagnostics.

    Attributes:
        solution: ``x``, the shape of ``b``: ``(N,)`` or ``(N, K)``.
        residual_norms: The history of the relative residual
            $\lVert b - (A + \lambda I)x \rVert / \lVert b \rVert$, one row per iteration
            after the initial one: ``(iterations + 1,)`` for ``b`` of shape ``(N,)``,
            ``(iterations + 1, K)`` for ``(N, K)``. A column that converged keeps its last
            value. These are the recursively updated residuals of the method, equal to
            ``b - (A + λI) x`` in exact arithmetic; rounding can make them drift apart (an
            ill-conditioned system, a tight ``tol``, float32). Where it can reach ``tol``,
            and for every column that did not converge, the last entry is the true
            residual, from one more product. A zero right-hand side has residual 0.
        converged: Bools, ``()`` for one right-hand side, ``(K,)`` for ``K``: the relative
            residual reached ``tol``. Checked on the true residual wherever the recursive one
            may have drifted by ``tol``; a column that fails the check restarts from its true
            residual while that keeps halving, and is reported unconverged past that.
        num_matvecs: Products with ``A``, counted per column: a block product of ``k``
            columns counts ``k``. Includes the initial residual's product when ``x0`` is
            given, the checks of true residuals, and LiSSA's eigenvalue estimate when
            ``scale=None``.
    """

    solution: Tensor
    residual_norms: Tensor
    converged: Tensor
    num_matvecs: int


# ------------------------------------------------------------------------------ validation


def _renamed(err: Exception, name: str, old: str = "A") -> Exception:
    """An error about the argument ``old`` (``_linear``'s ``A``), said about ``name`` instead."""
    text = str(err)
    if text.startswith(f"{old}:"):
        text = f"{name}:{text[len(old) + 1 :]}"
    return type(err)(text)


def check_damping(value: Any, *, nonnegative: bool = False) -> float:
    """A finite real ``λ`` (``>= 0`` with ``nonnegative``), as a float."""
    if isinstance(value, Tensor) and value.numel() == 1 and value.is_floating_point():
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(
            f"damping: expected a real number λ (the system is A + λI), got "
            f"{type(value).__name__} {value!r}."
        )
    number = float(value)
    if not math.isfinite(number) or (nonnegative and number < 0):
        wanted = "a finite number >= 0" if nonnegative else "a finite number"
        raise ValueError(
            f"damping: expected {wanted}, got {value!r}; damping adds λ to every eigenvalue of "
            "the curvature, so a positive λ makes a positive semi-definite matrix invertible."
        )
    return number


def check_solve_tol(tol: Any) -> float | None:
    """``None`` or a relative residual in ``(0, 1)``: ``x = 0`` already has residual 1."""
    value = check_tolerance(tol)
    if value is not None and value >= 1:
        raise ValueError(
            f"tol: expected a relative residual below 1, got {value:g}; x = 0 already has "
            "relative residual 1, so every answer would count as converged. Pass a tolerance "
            "such as 1e-6, or None for the default of the dtype."
        )
    return value


def check_method(method: Any) -> str:
    if method not in _METHODS:
        raise ValueError(
            f"method: expected 'cg' (positive definite systems), 'minres' (symmetric "
            f"indefinite) or 'lissa' (Neumann series), got {method!r}."
        )
    return str(method)


def check_max_iter(max_iter: Any) -> int | None:
    return None if max_iter is None else integer("max_iter", max_iter, 0)


def check_scale(scale: Any, method: str) -> float | None:
    if scale is None:
        return None
    if method != "lissa":
        raise ValueError(
            f"scale: only method='lissa' takes a scale, got scale={scale!r} with "
            f"method={method!r}; drop it, or pass method='lissa'."
        )
    return positive_float("scale", scale)


def _vectors(name: str, value: Any, lin: _Linear, dtype: torch.dtype) -> Tensor:
    """``value`` ``(N,)`` or ``(N, K)`` as a fresh ``(N, K)`` block in the working dtype."""
    n = lin.n
    if not isinstance(value, Tensor):
        raise TypeError(
            f"{name}: expected a tensor of shape ({n},) or ({n}, K), got {type(value).__name__}."
        )
    if value.ndim not in (1, 2) or value.shape[0] != n:
        raise ValueError(
            f"{name}: expected shape ({n},) or ({n}, K) for this {n} x {n} system, got "
            f"{tuple(value.shape)}."
        )
    if value.dtype != dtype:
        raise TypeError(
            f"{name}: expected dtype {dtype} (A's), got {value.dtype}; convert it with "
            f"{name}.to({dtype})."
        )
    if value.device != lin.device:
        raise ValueError(
            f"{name}: is on {value.device} but A is on {lin.device}; move it with "
            f"{name}.to({str(lin.device)!r})."
        )
    block = value.detach()
    block = block if block.ndim == 2 else block[:, None]
    if not bool(torch.isfinite(block).all()):
        raise ValueError(f"{name}: contains NaN or infinite values.")
    return block.to(lin.dtype, copy=True)


@dataclass(frozen=True)
class _Preconditioner:
    apply: Callable[[Tensor], Tensor]
    session: Callable[[], AbstractContextManager[Any]] = nullcontext


def _preconditioner(value: Any, lin: _Linear, dtype: torch.dtype) -> _Preconditioner | None:
    """``z = M⁻¹ r`` from a diagonal ``(N,)``, a dense ``(N, N)`` tensor or an operator."""
    if value is None:
        return None
    n = lin.n
    if isinstance(value, Tensor) and value.ndim == 1:
        if value.shape[0] != n:
            raise ValueError(
                f"preconditioner: a 1-D tensor is the diagonal of M⁻¹ and needs shape ({n},), "
                f"got {tuple(value.shape)}."
            )
        diag = _vectors("preconditioner", value, lin, dtype)[:, 0]
        if not bool((diag > 0).all()):
            raise ValueError(
                "preconditioner: the diagonal of M⁻¹ must be positive (CG and MINRES need a "
                "positive definite preconditioner); for Jacobi pass 1 / (A.diagonal() + "
                "damping), clamped away from zero."
            )
        return _Preconditioner(lambda r: r * diag[:, None])
    try:
        plin = _linear(value)
    except (TypeError, ValueError) as err:
        raise _renamed(err, "preconditioner") from None
    if plin.n != n:
        raise ValueError(
            f"preconditioner: expected an operator of shape ({n}, {n}) like A, got "
            f"({plin.n}, {plin.n})."
        )
    if value.dtype != dtype or plin.device != lin.device:
        raise TypeError(
            f"preconditioner: expected {dtype} on {lin.device} like A, got {value.dtype} on "
            f"{plin.device}."
        )
    return _Preconditioner(plin.matmat, plin.session)


# ---------------------------------------------------------------------------------- solvers


def _flags(*masks: Tensor) -> list[bool]:
    """Whether each mask has a true entry, read in one synchronisation."""
    return [bool(f) for f in torch.stack([m.any() for m in masks]).tolist()]


def _dot(a: Tensor, b: Tensor) -> Tensor:
    return (a * b).sum(0)


def _norm(a: Tensor) -> Tensor:
    if a.shape[1] == 1:
        return torch.linalg.vector_norm(a, dim=0)
    # The columns of a row-major block: one GEMM beats a strided reduction (0.2 against 0.5 ms
    # for 16,522 x 16 in float64).
    return (a.T @ a).diagonal().sqrt()


class _System:
    """``(A + λI) V`` with a product count, and ``M⁻¹ R`` (the identity without one)."""

    def __init__(self, lin: _Linear, damping: float, prec: _Preconditioner | None) -> None:
        self.lin = lin
        self.damping = damping
        self.prec = prec
        self.matvecs = 0
        # The largest |Rayleigh quotient| of A + λI the method met: a lower estimate of its
        # norm, for `_may_drift`. A tensor (no synchronisation per iteration).
        self.norm_estimate: Tensor | None = None

    def rounding_level(self) -> Tensor:
        """The curvature ``pᵀ(A + λI)p / pᵀp`` at or below which it is rounding noise.

        ``100 eps ‖A + λI‖`` (estimated): a positive definite system with curvature below it
        has a condition beyond ``1 / (100 eps)``, out of reach of this precision.
        """
        assert self.norm_estimate is not None
        return _FLAT * torch.finfo(self.norm_estimate.dtype).eps * self.norm_estimate

    def saw(self, quotients: Tensor) -> None:
        """Note Rayleigh quotients of ``A + λI`` (the iterations' own scalars)."""
        top = quotients.abs().max()
        self.norm_estimate = (
            top if self.norm_estimate is None else torch.maximum(self.norm_estimate, top)
        )

    def apply(self, v: Tensor) -> Tensor:
        self.matvecs += v.shape[1]
        out = self.lin.matmat(v)
        if tuple(out.shape) != tuple(v.shape):
            raise ValueError(
                f"A: A @ V returned shape {tuple(out.shape)} for V of shape {tuple(v.shape)}; "
                "an operator must map (N, K) to (N, K)."
            )
        if self.damping:
            # In place on hesse's own products (new tensors): no (N, K) block to allocate.
            fresh = self.lin.fresh and out.dtype == v.dtype
            out = out.add_(v, alpha=self.damping) if fresh else out.add(v, alpha=self.damping)
        # Not checked here (a pass over N x K numbers and a sync): a NaN or infinity in a
        # product makes the methods' per-column scalars non-finite, which they check.
        return out

    @staticmethod
    def not_finite() -> ValueError:
        return ValueError(
            "A: a product A @ V returned NaN or infinite values; check the operator (a model "
            "whose loss or parameters are not finite, or data with NaN or infinite values)."
        )

    def precondition(self, r: Tensor) -> Tensor:
        return r if self.prec is None else self.prec.apply(r)


def _check_preconditioned(rz: Tensor, active: Tensor) -> None:
    bad = ~(rz > 0)
    if bool(bad.any()):
        column = int(active[bad.nonzero()[0, 0]])
        raise ValueError(
            f"preconditioner: rᵀ M⁻¹ r = {float(rz[bad][0]):.3g} <= 0 for right-hand side "
            f"{column}: the preconditioner is not positive definite, which CG and MINRES "
            "need. Pass a symmetric positive definite M⁻¹ (a positive diagonal, say)."
        )


class _Columns:
    """The right-hand sides still iterating, and what the others reached."""

    def __init__(self, x: Tensor, rel: Tensor) -> None:
        self.solution = x.clone()
        self.history = [rel.clone()]
        self.active = torch.arange(x.shape[1], device=x.device)
        self.converged = torch.zeros(x.shape[1], dtype=torch.bool, device=x.device)
        # Stopped where no restart can help (MINRES at a least-squares solution).
        self.final = torch.zeros(x.shape[1], dtype=torch.bool, device=x.device)

    def record(self, rel: Tensor) -> None:
        row = self.history[-1].clone()
        row[self.active] = rel
        self.history.append(row)

    def retire(
        self, x: Tensor, done: Tensor, stopped: Tensor | None = None, final: Tensor | None = None
    ) -> Tensor:
        """Store the finished columns; return the mask of the ones kept.

        ``done``: converged; ``stopped``: not, and ``final`` among them for good.
        """
        leaving = done if stopped is None else done | stopped
        index = self.active[leaving]
        self.solution[:, index] = x[:, leaving]
        self.converged[self.active[done]] = True
        if final is not None:
            self.final[self.active[final]] = True
        keep = ~leaving
        self.active = self.active[keep]
        return keep

    def finish(self, x: Tensor) -> None:
        self.solution[:, self.active] = x


def _solve(
    lin: _Linear,
    A: Any,  # noqa: N803
    b: Tensor,
    x0: Tensor | None,
    *,
    damping: float,
    method: str,
    tol: float,
    max_iter: int,
    prec: _Preconditioner | None,
    scale: float | None,
) -> tuple[Tensor, Tensor, Tensor, int]:
    """The solve on ``(N, K)`` blocks: solution, history ``(T, K)``, converged ``(K,)``, count.

    The methods update their residuals recursively. A column the method reports converged is
    checked with one product on its solution where rounding may have let the recursive
    residual drift from the true one (`_may_drift`), and so is every column it did not
    converge (the last entry of its history is then true); one that fails the check restarts
    from its true residual while that keeps improving.
    """
    system = _System(lin, damping, prec)
    norms = _norm(b)
    zero = norms == 0
    denom = torch.where(zero, torch.ones_like(norms), norms)
    if x0 is None:
        x, r = torch.zeros_like(b), b.clone()
    else:
        x = x0.clone()
        x[:, zero] = 0  # (A + λI) x = 0 has the solution 0
        r = b - system.apply(x)
    run = _Run(system, A, lin, method, tol, scale)
    solution, history, converged, final = run(x, r, denom, max_iter)
    checked = torch.ones_like(converged) if len(history) == 1 else history[0] <= tol
    last = torch.full_like(denom, math.inf)  # each column's true residual at its last check
    while True:
        used = len(history) - 1
        suspect = ~checked & (~converged | _may_drift(system, solution, denom, used, tol))
        if not bool(suspect.any()):
            break
        index = suspect.nonzero()[:, 0]
        true_r = b[:, index] - system.apply(solution[:, index])
        rel = _norm(true_r) / denom[index]
        if not bool(torch.isfinite(rel).all()):
            raise system.not_finite()
        history[-1] = history[-1].clone()
        history[-1][index] = rel
        checked[index] = True
        failed = rel > tol
        converged[index] = ~failed
        # Restart a failed column while its true residual at least halves between checks;
        # past that it has reached the accuracy attainable in this dtype.
        again = failed & (rel <= last[index] / 2) & ~final[index]
        last[index] = rel
        if not bool(again.any()) or used >= max_iter:
            break
        restart = index[again]
        part, rows, done, _ = run(
            solution[:, restart], true_r[:, again], denom[restart], max_iter - used
        )
        solution[:, restart] = part
        converged[restart] = done
        checked[restart] = False
        for row in rows[1:]:  # rows[0] is the true residual recorded above
            full = history[-1].clone()
            full[restart] = row
            history.append(full)
    return solution, torch.stack(history), converged, system.matvecs


class _Run:
    """One run of the method from ``(x, r)``: solution, history rows, converged flags."""

    def __init__(
        self,
        system: _System,
        A: Any,  # noqa: N803
        lin: _Linear,
        method: str,
        tol: float,
        scale: float | None,
    ) -> None:
        self.system, self.A, self.lin = system, A, lin
        self.method, self.tol, self.scale = method, tol, scale

    def __call__(
        self, x: Tensor, r: Tensor, denom: Tensor, max_iter: int
    ) -> tuple[Tensor, list[Tensor], Tensor, Tensor]:
        system, tol = self.system, self.tol
        rel = _norm(r) / denom
        if not bool(torch.isfinite(rel).all()):
            raise system.not_finite()
        cols = _Columns(x, rel)
        keep = cols.retire(x, rel <= tol)
        x, r, denom = x[:, keep], r[:, keep], denom[keep]
        if x.shape[1] and max_iter > 0:
            if self.method == "cg":
                if x.shape[1] == 1:
                    _cg(system, cols, x, r, denom, tol, max_iter)
                else:
                    _block_cg(system, cols, x, r, denom, tol, max_iter)
            elif self.method == "minres":
                _minres(system, cols, x, r, denom, tol, max_iter)
            else:
                if self.scale is None:
                    self.scale = _lissa_scale(system, self.A, self.lin, system.damping)
                # λ_max < 2s where LiSSA converges
                system.saw(torch.tensor(2 * self.scale, dtype=x.dtype, device=x.device))
                _lissa(system, cols, x, r, denom, tol, max_iter, self.scale)
        else:
            cols.finish(x)
        return cols.solution, cols.history, cols.converged, cols.final


def _may_drift(system: _System, x: Tensor, denom: Tensor, iterations: int, tol: float) -> Tensor:
    """Columns whose recursive residual may be off the true one by ``tol`` or more.

    Rounding makes the recursively updated residual drift from ``b - (A + λI)x`` by up to
    about ``eps · Σ_t (‖A + λI‖ ‖x_t‖ + ‖r_t‖)`` (Greenbaum, 1997). This is that bound with
    a margin of 1,000 on ``‖A + λI‖`` estimated from the iterations' Rayleigh quotients:
    1e-10 for a float64 system of condition 20 after 30 iterations, far below any ``tol``,
    so well-conditioned float64 solves take no extra product.
    """
    if system.norm_estimate is None or iterations == 0:
        return torch.zeros_like(denom, dtype=torch.bool)
    eps = torch.finfo(x.dtype).eps
    size = system.norm_estimate.to(x.dtype)
    bound = _DRIFT_MARGIN * eps * iterations * (size * _norm(x) / denom + 1)
    return bound > tol


def _cg(
    system: _System,
    cols: _Columns,
    x: Tensor,
    r: Tensor,
    denom: Tensor,
    tol: float,
    max_iter: int,
) -> None:
    """Preconditioned conjugate gradients, one step length per column (used for one column)."""
    z = system.precondition(r)
    rz = _dot(r, z)
    if system.prec is not None:
        _check_preconditioned(rz, cols.active)
    p = z.clone()
    for iteration in range(1, max_iter + 1):
        q = system.apply(p)
        pq = _dot(p, q)
        rayleigh = pq / _dot(p, p)
        system.saw(rayleigh)
        alpha = rz / pq
        x.add_(p * alpha)
        r.sub_(q * alpha)
        rel = _norm(r) / denom
        cols.record(rel)
        done = rel <= tol
        finite = torch.isfinite(pq) & torch.isfinite(rel)
        flat = ~(rayleigh > system.rounding_level())  # <= 0, or > 0 only within rounding
        bad, any_done = _flags(~finite | flat, done)  # one synchronisation
        if bad:
            # A flat direction (a singular system) also makes the step, and rel, not finite.
            if bool(torch.isfinite(pq).all()) and bool(flat.any()):
                raise _negative_curvature(p, pq, flat, system.damping, cols.active, iteration)
            raise system.not_finite()
        if any_done:
            keep = cols.retire(x, done)
            if not bool(keep.any()):
                return
            x, r, p, rz, denom = x[:, keep], r[:, keep], p[:, keep], rz[keep], denom[keep]
        z = system.precondition(r)
        rz_next = _dot(r, z)
        if system.prec is not None:
            _check_preconditioned(rz_next, cols.active)
        p = z + p * (rz_next / rz)
        rz = rz_next
    cols.finish(x)


def _block_cg(
    system: _System,
    cols: _Columns,
    x: Tensor,
    r: Tensor,
    denom: Tensor,
    tol: float,
    max_iter: int,
) -> None:
    """Preconditioned breakdown-free block CG (O'Leary, 1980; Ji & Li, 2017).

    The columns share one block Krylov subspace: each iteration minimises every column's
    ``(A + λI)``-norm error over the span of the search block ``P`` (step lengths
    ``α = (PᵀQ)⁻¹PᵀR``, a matrix), and the next block is made ``(A + λI)``-conjugate to it
    (``β = -(PᵀQ)⁻¹QᵀZ``). ``P`` is kept orthonormal without its numerically dependent
    directions (`_orth`), so dependent right-hand sides and columns that converge at different
    rates narrow the block instead of breaking the recurrence down. α and β make the iteration
    independent of the basis chosen for the span of ``P``.
    """
    z = system.precondition(r)
    if system.prec is not None:
        _check_preconditioned(_dot(r, z), cols.active)
    p = _orth(z)
    for iteration in range(1, max_iter + 1):
        if p.shape[1] == 0:
            break  # no direction left to search: the active columns stay unconverged
        q = system.apply(p)
        pq = p.T @ q
        pq = (pq + pq.T) / 2  # symmetric in exact arithmetic
        system.saw(pq.diagonal())  # P has orthonormal columns within about 1%
        chol, info = torch.linalg.cholesky_ex(pq)  # no synchronisation; info read below
        # A pivot at the level of rounding: PᵀQ is singular in this precision (and its
        # smallest eigenvalue is at most the smallest pivot).
        flat = (info != 0) | ~(chol.diagonal().square().min() > system.rounding_level())
        alpha = torch.cholesky_solve(p.T @ r, chol)
        x.addmm_(p, alpha)
        r.addmm_(q, alpha, alpha=-1)
        rel = _norm(r) / denom
        cols.record(rel)
        done = rel <= tol
        finite = torch.isfinite(pq).all() & torch.isfinite(rel).all()
        bad, any_done = _flags(~finite | flat, done)  # one synchronisation
        if bad:
            # A singular PᵀQ also makes the steps, and rel, not finite.
            if bool(torch.isfinite(pq).all()) and bool(flat):
                raise _block_negative_curvature(p, pq, system.damping, iteration)
            raise system.not_finite()
        if any_done:
            keep = cols.retire(x, done)
            if not bool(keep.any()):
                return
            x, r, denom = x[:, keep], r[:, keep], denom[keep]
        z = system.precondition(r)
        if system.prec is not None:
            _check_preconditioned(_dot(r, z), cols.active)
        p = _orth(torch.addmm(z, p, torch.cholesky_solve(q.T @ z, chol), alpha=-1))
    cols.finish(x)


def _orth(w: Tensor) -> Tensor:
    """An orthonormal basis of the range of ``w`` ``(N, k)`` without its dependent directions.

    ``w V Λ^-1/2`` from the eigenpairs of the ``k x k`` Gram matrix: one ``N x k x k`` product,
    no factorisation of the tall ``w``. It has no columns when ``w`` is zero.
    """
    gram = w.T @ w
    # Unit columns first: the range is the same, and a column far smaller than the others (a
    # nearly converged residual) is not mistaken for a dependent one.
    sq = gram.diagonal()
    scale = torch.where(sq > 0, sq.rsqrt(), torch.zeros_like(sq))
    values, vectors = torch.linalg.eigh(gram * scale[:, None] * scale[None, :])
    # The Gram matrix's eigenvalues carry rounding errors of about k·eps·λ_max (its length-N
    # sums, the eigensolver); below 100 times that a direction is noise. The ones kept give
    # PᵀP within about 1% of I, plenty for the Cholesky factor of PᵀQ, without a second pass.
    eps = torch.finfo(w.dtype).eps
    kept = values > values[-1] * (w.shape[1] * eps * 100)
    return w @ (scale[:, None] * vectors[:, kept] * values[kept].rsqrt())


def _negative_curvature(
    p: Tensor, pq: Tensor, flat: Tensor, damping: float, active: Tensor, iteration: int
) -> ValueError:
    bad = flat.nonzero()[0, 0]
    curvature = float(pq[bad])
    rayleigh = curvature / float(_dot(p[:, bad], p[:, bad]))
    where = f"right-hand side {int(active[bad])}, iteration {iteration}"
    relation = "<= 0" if curvature <= 0 else "> 0 only within rounding"
    return _curvature_error(curvature, relation, where, rayleigh, damping)


def _block_negative_curvature(p: Tensor, pq: Tensor, damping: float, iteration: int) -> ValueError:
    """The error for a block ``Pᵀ(A + λI)P`` that is not positive definite, along its worst ``p``.

    ``p = P y`` with ``y`` the eigenvector of the smallest eigenvalue of ``PᵀQ``, so
    ``pᵀ(A + λI)p`` is that eigenvalue.
    """
    values, vectors = torch.linalg.eigh(pq)
    direction = p @ vectors[:, 0]
    curvature = float(values[0])
    rayleigh = curvature / float(direction @ direction)
    # Cholesky can also fail on a matrix whose smallest eigenvalue is positive at the level of
    # rounding (a singular A + λI): say so rather than claim a sign.
    relation = "<= 0" if curvature <= 0 else "> 0 only within rounding"
    where = f"a direction of the block of {p.shape[1]} search directions, iteration {iteration}"
    return _curvature_error(curvature, relation, where, rayleigh, damping)


def _curvature_error(
    curvature: float, relation: str, where: str, rayleigh: float, damping: float
) -> ValueError:
    if curvature >= 0:  # zero, or positive only within rounding: singular in this precision
        larger = "> 0" if damping == 0 else f"above {damping:g}"
        return ValueError(
            f"A: CG met a flat direction, pᵀ(A + λI)p = {curvature:.3g} {relation} ({where}): "
            f"A + λI with damping={damping:g} is singular to working precision, and CG's "
            f"answer would be wrong. Pass a damping {larger} (1e-3 times the top eigenvalue, "
            "hesse.eigsh(A, k=1), makes a condition of about 1,000), or use method='minres', "
            "which returns a least-squares solution of a singular system."
        )
    bound = rayleigh - damping  # λ_min(A) <= the Rayleigh quotient of A along p
    return ValueError(
        f"A: CG met negative curvature, pᵀ(A + λI)p = {curvature:.3g} {relation} ({where}): "
        f"A + λI with damping={damping:g} is not positive definite, and CG's answer would be "
        f"wrong. The smallest eigenvalue of A is at most {bound:.3g}, so a damping above "
        f"{-bound:.3g} at least is needed (more than -λ_min(A); hesse.eigsh(A, k=1, "
        "which='SA') gives λ_min). Or use method='minres', which solves symmetric indefinite "
        "systems."
    )


def _minres(
    system: _System,
    cols: _Columns,
    x: Tensor,
    r: Tensor,
    denom: Tensor,
    tol: float,
    max_iter: int,
) -> None:
    """Preconditioned MINRES (Paige & Saunders, 1975), the scalars of each column apart.

    The Lanczos process of ``M⁻¹(A + λI)`` and a QR factorisation of its tridiagonal by Givens
    rotations, updated one column at a time; the residual ``b - (A + λI)x`` is carried along
    (``(A + λI)w`` follows the same recurrence as the direction ``w``).
    """
    eps = torch.finfo(x.dtype).eps
    y = system.precondition(r)
    beta_sq = _dot(r, y)
    if system.prec is not None:
        _check_preconditioned(beta_sq, cols.active)
    beta = beta_sq.sqrt()
    old_beta = torch.zeros_like(beta)
    tnorm_sq = torch.zeros_like(beta)  # ‖T_k‖_F², T the Lanczos tridiagonal of M⁻¹(A + λI)
    stall = torch.zeros_like(beta)  # iterations in a row that cut the residual by < 0.1%
    dbar = torch.zeros_like(beta)
    epsilon = torch.zeros_like(beta)
    phibar = beta.clone()
    cs = -torch.ones_like(beta)
    sn = torch.zeros_like(beta)
    r1 = r2 = r
    w = w2 = aw = aw2 = torch.zeros_like(x)
    for iteration in range(1, max_iter + 1):
        v = y / beta
        av = system.apply(v)
        y = av if iteration == 1 else av - r1 * (beta / old_beta)
        alpha = _dot(v, y)
        system.saw(alpha / _dot(v, v))
        y = y - r2 * (alpha / beta)
        r1, r2 = r2, y
        y = system.precondition(r2)
        old_beta = beta
        beta_sq = _dot(r2, y)
        if system.prec is not None and bool((beta_sq < 0).any()):
            _check_preconditioned(beta_sq, cols.active)
        beta = beta_sq.clamp_min(0).sqrt()
        tnorm_sq = tnorm_sq + alpha.square() + old_beta.square() + beta.square()
        old_epsilon = epsilon
        delta = cs * dbar + sn * alpha
        gbar = sn * dbar - cs * alpha
        epsilon = sn * beta
        dbar = -cs * beta
        # ‖(A + λI) r‖ / (‖A + λI‖ ‖r‖) for the residual before this step (Paige & Saunders'
        # test 2, in the preconditioned operator's scale, ‖T_k‖_F for its norm) at or below
        # tol while the residual has stood still for 5 iterations: x is a least-squares solution
        # of a singular system with no exact one. The column stops there for good, before
        # Lanczos, having lost orthogonality, divides by a pivot of noise (x went to 1e16).
        # A residual that just fell onto one eigenvalue of 1e-7 of the norm has not stalled:
        # its answer comes a step later.
        size = tnorm_sq.sqrt()
        least_squares = (torch.hypot(gbar, dbar) <= tol * size) & (stall >= 5)
        gamma = torch.hypot(gbar, beta).clamp_min(eps * size)
        cs, sn = gbar / gamma, beta / gamma
        phi = torch.where(least_squares, torch.zeros_like(phibar), cs * phibar)
        before = phibar
        phibar = torch.where(least_squares, phibar, sn * phibar)
        stall = torch.where(phibar > 0.999 * before, stall + 1, torch.zeros_like(stall))
        w1, w2 = w2, w
        w = (v - w1 * old_epsilon - w2 * delta) / gamma
        aw1, aw2 = aw2, aw
        aw = (av - aw1 * old_epsilon - aw2 * delta) / gamma
        x = x + w * phi
        r = r - aw * phi
        rel = _norm(r) / denom
        cols.record(rel)
        done = rel <= tol
        # beta at the level of rounding: the Krylov space is exhausted; a column not converged
        # then never will.
        stopped = ~done & ((beta <= eps * size) | least_squares)
        bad, leaving = _flags(~torch.isfinite(rel), done | stopped)
        if bad:
            raise system.not_finite()
        if leaving:
            keep = cols.retire(x, done, stopped, ~done & least_squares)
            if not bool(keep.any()):
                return
            x, r, y, r1, r2 = x[:, keep], r[:, keep], y[:, keep], r1[:, keep], r2[:, keep]
            w, w2, aw, aw2 = w[:, keep], w2[:, keep], aw[:, keep], aw2[:, keep]
            beta, old_beta, dbar, epsilon = beta[keep], old_beta[keep], dbar[keep], epsilon[keep]
            phibar, cs, sn, denom = phibar[keep], cs[keep], sn[keep], denom[keep]
            tnorm_sq, stall = tnorm_sq[keep], stall[keep]
    cols.finish(x)


def _lissa_scale(system: _System, A: Any, lin: _Linear, damping: float) -> float:  # noqa: N803
    """3/4 of an upper bound on ``λ_max(A + λI)`` from `eigsh`, its products counted."""
    if lin.n == 1:
        system.matvecs += lin.products_for_exact
        top = float(lin.dense()[0, 0])
    else:
        result = eigsh(A, k=1, which="LA", seed=0)
        system.matvecs += result.num_matvecs
        top = float(result.eigenvalues[-1]) + float(result.residuals[-1])
    bound = top + damping
    if not bound > 0:
        raise ValueError(
            f"A: A + λI has no positive eigenvalue (λ_max(A) ≈ {top:.3g}, damping={damping:g}); "
            "LiSSA needs A + λI positive definite. Increase damping, or use method='minres'."
        )
    return _LISSA_SCALE_FRACTION * bound


def _lissa(
    system: _System,
    cols: _Columns,
    x: Tensor,
    r: Tensor,
    denom: Tensor,
    tol: float,
    max_iter: int,
    scale: float,
) -> None:
    """The Neumann recursion ``x ← x + (b − (A + λI)x) / scale``, without sampling.

    The residual follows ``r ← r − (A + λI) r / scale``: one product per iteration, and the
    residual comes for free. Each eigen-component of ``r`` shrinks by ``|1 − μ/scale|``, so the
    residual never grows while every eigenvalue ``μ`` of ``A + λI`` lies in ``(0, 2·scale)``;
    growth means divergence.
    """
    best = _norm(r) / denom
    for iteration in range(1, max_iter + 1):
        q = system.apply(r)
        x.add_(r, alpha=1.0 / scale)
        r_next = r - q / scale
        rel = _norm(r_next) / denom
        cols.record(rel)
        grew = ~(rel <= _LISSA_GROWTH * best)
        done = rel <= tol
        diverged, any_done = _flags(grew, done)
        if diverged:
            if not bool(torch.isfinite(rel).all()):
                raise system.not_finite()
            raise _lissa_divergence(r, q, grew, rel, best, cols.active, iteration, scale, system)
        best = torch.minimum(best, rel)
        r = r_next
        if any_done:
            keep = cols.retire(x, done)
            if not bool(keep.any()):
                return
            x, r, best, denom = x[:, keep], r[:, keep], best[keep], denom[keep]
    cols.finish(x)


def _lissa_divergence(
    r: Tensor,
    q: Tensor,
    grew: Tensor,
    rel: Tensor,
    best: Tensor,
    active: Tensor,
    iteration: int,
    scale: float,
    system: _System,
) -> ValueError:
    j = grew.nonzero()[0, 0]
    # The residual is dominated by the growing eigen-component: its Rayleigh quotient is
    # about that eigenvalue of A + λI.
    rayleigh = float(_dot(r[:, j], q[:, j]) / _dot(r[:, j], r[:, j]))
    head = (
        f"A: LiSSA diverged: the relative residual of right-hand side {int(active[j])} grew "
        f"from {float(best[j]):.3g} to {float(rel[j]):.3g} at iteration {iteration} with "
        f"scale={scale:.4g}."
    )
    if rayleigh > 0:
        return ValueError(
            f"{head} The recursion converges only when scale > λ_max(A + λI) / 2, and "
            f"A + λI has an eigenvalue of about {rayleigh:.3g} (the residual's Rayleigh "
            f"quotient; λ_max is at least that): use scale >= {rayleigh:.3g}, or scale=None "
            "to estimate λ_max with hesse.eigsh, or method='cg'."
        )
    needed = system.damping - rayleigh
    return ValueError(
        f"{head} A + λI is not positive definite (a Rayleigh quotient of {rayleigh:.3g} <= 0), "
        f"and then no scale converges: increase damping above {needed:.3g} at least, or use "
        "method='minres'."
    )


# ------------------------------------------------------------------------------ public API


def solve(
    A: Any,  # noqa: N803
    b: Tensor,
    *,
    damping: float = 0.0,
    method: Method = "cg",
    tol: float | None = None,
    max_iter: int | None = None,
    x0: Tensor | None = None,
    preconditioner: Any = None,
    scale: float | None = None,
) -> SolveResult:
    r"""Solve $(A + \lambda I)\,x = b$ for a symmetric ``A``, one or ``K`` right-hand sides.

    ``K`` right-hand sides advance together: each iteration costs one block product
    ``A @ P`` with ``P`` of shape ``(N, k)``, ``k`` at most the columns not yet converged (a
    converged column leaves the block). The whole solve runs in one session of a hesse
    operator, so products reuse what they can (a one-batch Hessian keeps its gradient graph).

    - ``"cg"``: conjugate gradients, for positive definite $A + \lambda I$ (a damped GGN or
      Fisher, a Hessian near a minimum). With ``K > 1`` it is block CG (O'Leary; Ji & Li's
      breakdown-free variant): the columns share one block Krylov subspace, so ``K``
      right-hand sides typically need fewer iterations than one; dependent columns narrow
      the block. Negative curvature, $p^\top(A + \lambda I)p \le 0$, stops it with a
      ValueError that names MINRES and a lower bound on the damping needed; it never returns
      a wrong answer for an indefinite system.
    - ``"minres"``: MINRES (Paige & Saunders), for symmetric indefinite systems (a Hessian
      away from a minimum); its residual norm never increases. Its scalars (and LiSSA's) are
      kept per column.
    - ``"lissa"``: the deterministic Neumann recursion
      $x_{t+1} = b/s + (I - (A + \lambda I)/s)\,x_t$ with ``scale`` $s$, which
      converges when every eigenvalue of $A + \lambda I$ lies in $(0, 2s)$. It is
      slower than CG (its iterations grow with the condition number, CG's with its square
      root) and is here for comparison with the influence-function literature. A growing
      residual stops it with a ValueError that says the scale (or damping) to use.

    Args:
        A: A symmetric ``(N, N)`` tensor, or any operator with ``shape``, ``dtype``, ``device``
            and ``A @ V`` for ``V`` of shape ``(N, K)`` (`SymmetricOperator`): hesse's
            operators and their sums, curvlinops' operators, a class of your own.
        b: The right-hand side ``(N,)``, or ``K`` of them as columns ``(N, K)``, in ``A``'s
            dtype and on its device.
        damping: $\lambda$, added to every eigenvalue of ``A`` (any finite real; usually
            ``>= 0``). Costs nothing: $(A + \lambda I)v = Av + \lambda v$.
        method: ``"cg"`` (default), ``"minres"`` or ``"lissa"``.
        tol: The relative residual $\lVert b - (A + \lambda I)x\rVert / \lVert b\rVert$ at
            which a column has converged. Default `max(√eps, 1e-6)` of the dtype computed
            in: 1e-6 in float64, 3.5e-4 in float32 (half-precision operators are solved in
            float32).
        max_iter: Iterations at most (0 returns ``x0``); a column not converged by then is
            returned with ``converged`` false. Default ``10 * N`` for CG and MINRES (SciPy's
            default), ``max(10 * N, 10_000)`` for LiSSA.
        x0: A start ``(N,)`` or ``(N, K)``, the shape of ``b`` (default zeros). Its initial
            residual costs one product.
        preconditioner: $M^{-1}$, applied as ``z = preconditioner @ r``, for CG and MINRES
            (both need it symmetric positive definite): a ``(N, N)`` tensor, any operator, or
            a 1-D tensor ``(N,)`` holding the diagonal of $M^{-1}$ (Jacobi:
            ``1 / (A.diagonal() + damping)``). A good one cuts the iterations.
        scale: LiSSA's $s$; the recursion converges for $s > \lambda_{\max}(A + \lambda I)/2$,
            and the smaller the faster. Default (``None``): 3/4 of an upper bound on
            $\lambda_{\max}(A + \lambda I)$ from `eigsh` (its products are counted).

    Returns:
        A `SolveResult`: ``solution`` in the shape of ``b``, ``residual_norms`` (the history
        of the relative residual, ``(iterations + 1,)`` or ``(iterations + 1, K)``),
        ``converged`` flags and ``num_matvecs``. Tensors are in ``A``'s dtype (float32 for a
        half-precision ``A``) on its device.

    Raises:
        ValueError: CG met negative curvature, or LiSSA diverged (each message says what to
            change); an unknown ``method``; a ``tol``, ``scale`` or ``damping`` that is not
            finite (``tol`` and ``scale`` must be ``> 0``); a negative ``max_iter``;
            ``scale`` with a method other than LiSSA, or ``preconditioner`` with LiSSA;
            ``b``, ``x0`` or ``preconditioner`` of the wrong shape or device, or not finite;
            a preconditioner that is not positive definite; a non-square or non-symmetric
            dense ``A``; a product that returns NaN or infinity.
        TypeError: ``A`` is neither a floating-point tensor nor an operator; ``b`` or ``x0``
            is not a tensor or has another dtype than ``A``; ``damping``, ``tol``,
            ``max_iter`` or ``scale`` has the wrong type.

    Examples:
        $\operatorname{diag}(1, 2, 4) + I$ has the inverse $\operatorname{diag}(1/2, 1/3, 1/5)$:

        >>> A = torch.diag(torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64))
        >>> b = torch.ones(3, dtype=torch.float64)
        >>> result = solve(A, b, damping=1.0)
        >>> result.solution
        tensor([0.5000, 0.3333, 0.2000], dtype=torch.float64)
        >>> bool(result.converged), result.num_matvecs  # CG: one product per eigenvalue
        (True, 3)

        Several right-hand sides share one block Krylov subspace, one block product per
        iteration (here a single iteration: the block spans the whole space):

        >>> B = torch.eye(3, dtype=torch.float64)
        >>> solve(A, B, damping=1.0).solution.diagonal()
        tensor([0.5000, 0.3333, 0.2000], dtype=torch.float64)
    """
    lin = _linear(A)
    declared = A.dtype
    lam = check_damping(damping)
    how = check_method(method)
    tol = check_solve_tol(tol)
    tolerance = default_tol(lin.dtype) if tol is None else tol
    iterations = check_max_iter(max_iter)
    if iterations is None:
        iterations = _default_max_iter(how, lin.n)
    s = check_scale(scale, how)
    if preconditioner is not None and how == "lissa":
        raise ValueError(
            "preconditioner: LiSSA takes none (it is a fixed-step recursion); use method='cg' "
            "or 'minres' with a preconditioner."
        )
    with torch.inference_mode(False), torch.no_grad():
        rhs = _vectors("b", b, lin, declared)
        start = None
        if x0 is not None:
            start = _vectors("x0", x0, lin, declared)
            if tuple(x0.shape) != tuple(b.shape):
                raise ValueError(
                    f"x0: expected the shape of b, {tuple(b.shape)}, got {tuple(x0.shape)}."
                )
        prec = _preconditioner(preconditioner, lin, declared)
        with ExitStack() as stack:
            stack.enter_context(lin.session())
            if prec is not None:
                stack.enter_context(prec.session())
            solution, history, converged, matvecs = _solve(
                lin,
                A,
                rhs,
                start,
                damping=lam,
                method=how,
                tol=tolerance,
                max_iter=iterations,
                prec=prec,
                scale=s,
            )
    if b.ndim == 1:
        return SolveResult(solution[:, 0], history[:, 0], converged[0], matvecs)
    return SolveResult(solution, history, converged, matvecs)


def unconverged_error(
    what: str, result: SolveResult, method: str, tol: float, *, options: bool = True
) -> RuntimeError:
    """The error for a solve whose answer would be used as if it were exact.

    ``options``: whether the caller takes ``max_iter`` and ``preconditioner`` (`solve` and
    `InverseOperator` do; the influence functions do not): the advice names only what the
    caller can change.
    """
    flags = result.converged.reshape(-1)
    reached = result.residual_norms.reshape(result.residual_norms.shape[0], -1)[-1]
    missed = int((~flags).sum())
    iterations = result.residual_norms.shape[0] - 1
    fixes = ["raise max_iter"] if options else []
    fixes += [
        "loosen tol",
        "increase damping (a better-conditioned system; a singular one needs damping > 0)",
    ]
    if method == "lissa":
        fixes.append(
            "use method='cg' (or 'minres' for an indefinite A), far fewer products than LiSSA"
        )
    elif options:
        fixes.append("pass a preconditioner")
    advice = ", ".join(fixes[:-1]) + " or " + fixes[-1]
    return RuntimeError(
        f"{what}: {method} did not reach the relative residual tol={tol:.3g} for {missed} of "
        f"{flags.numel()} right-hand sides in {iterations} iterations (worst "
        f"{float(reached[~flags].max()):.3g}), so the result would not be (A + λI)⁻¹ v. "
        f"{advice[0].upper()}{advice[1:]}."
    )


class InverseOperator(Operator):
    r"""$(A + \lambda I)^{-1}$ as an operator: each product ``inv @ V`` is a `solve`.

    An operator like hesse's others: ``shape``, ``dtype``, ``device``, ``@`` on ``(N,)``,
    ``(N, K)`` (all ``K`` columns solved together) and, when ``A`` knows the parameter
    layout, name-keyed dicts; ``to_dense()`` (``N`` right-hand sides), ``to_scipy()``, sums
    and multiples with other operators, ``A``'s session and shard. It feeds the spectral
    tools: the top eigenvalue of the inverse is $1/(\lambda_{\min}(A) + \lambda)$.

    A product whose solve does not converge raises a RuntimeError with the residual reached,
    rather than return an inexact product that an algorithm would take for exact; the
    diagnostics of the latest product are in ``last_result``. Nothing else is kept between
    products: each one solves anew for ``A`` as it is then. Each product is accurate to about
    ``tol`` (relative): an algorithm that needs more accurate products, such as `eigsh` at
    its default tolerance (√eps), needs a tighter ``tol`` here or a looser one there.

    Args:
        A: A symmetric ``(N, N)`` tensor or any operator (`SymmetricOperator`).
        damping: $\lambda$ (any finite real; usually ``> 0``).
        method: ``"cg"`` (default), ``"minres"`` or ``"lissa"``, as in `solve`.
        tol: Relative residual of each solve; default as in `solve` (1e-6 in float64, 3.5e-4
            in float32).
        max_iter: Iterations per solve at most; default as in `solve`.
        preconditioner: $M^{-1}$ for CG and MINRES, as in `solve`.
        scale: LiSSA's scale, as in `solve`; ``None`` estimates it for every product.

    Attributes:
        A: The operator inverted.
        damping: $\lambda$.
        layout: ``A``'s `ParamLayout` when it has one (dict products), else ``None``.
        last_result: The `SolveResult` of the latest product, or ``None`` before the first.

    Raises:
        TypeError: ``A`` is neither a floating-point tensor nor an operator, or an argument
            has the wrong type.
        ValueError: An argument is out of range (as in `solve`).

    Examples:
        >>> A = torch.diag(torch.tensor([1.0, 3.0], dtype=torch.float64))
        >>> inverse = InverseOperator(A, damping=1.0)
        >>> inverse @ torch.tensor([2.0, 4.0], dtype=torch.float64)
        tensor([1., 1.], dtype=torch.float64)
        >>> inverse.to_dense()
        tensor([[0.5000, 0.0000],
                [0.0000, 0.2500]], dtype=torch.float64)
    """

    def __init__(
        self,
        A: Any,  # noqa: N803
        *,
        damping: float,
        method: Method = "cg",
        tol: float | None = None,
        max_iter: int | None = None,
        preconditioner: Any = None,
        scale: float | None = None,
    ) -> None:
        lin = _linear(A)
        self.A = A
        self.damping = check_damping(damping)
        self._method = check_method(method)
        self._tol = check_solve_tol(tol)
        self._max_iter = check_max_iter(max_iter)
        self._scale = check_scale(scale, self._method)
        if preconditioner is not None and self._method == "lissa":
            raise ValueError(
                "preconditioner: LiSSA takes none; use method='cg' or 'minres' with a "
                "preconditioner."
            )
        _preconditioner(preconditioner, lin, A.dtype)  # checked now, applied per product
        self._preconditioner = preconditioner
        self._n = lin.n
        self._device = lin.device
        layout = getattr(A, "layout", None)  # a tensor's is torch.strided
        self.layout: ParamLayout | None = layout if isinstance(layout, ParamLayout) else None
        self.last_result: SolveResult | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return (self._n, self._n)

    @property
    def dtype(self) -> torch.dtype:
        return self.A.dtype

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def shard(self) -> Shard:
        return self.A.shard if isinstance(self.A, Operator) else Shard()

    def session(self) -> AbstractContextManager[None]:
        return self._session()

    @contextmanager
    def _session(self) -> Iterator[None]:
        with self.A.session() if isinstance(self.A, Operator) else nullcontext():
            yield

    def __matmul__(self, other: Any) -> Any:
        """``(A + λI)⁻¹ V`` for ``V`` of shape ``(N,)`` or ``(N, K)``, or a dict of tensors.

        Raises:
            TypeError: ``V`` is not a tensor of the operator's dtype, or is a dict and ``A``
                has no parameter layout.
            ValueError: ``V`` has the wrong shape or device; the solve met negative curvature
                (CG) or diverged (LiSSA).
            RuntimeError: The solve did not converge within ``max_iter``.
        """
        if isinstance(other, dict):
            if self.layout is None:
                raise TypeError(
                    "vector: a dict needs the parameter layout, and this A has none; pass a "
                    "flat tensor."
                )
            return self.layout.unflatten(self @ check_dict(self, self.layout, other))
        other = check_operand(self, other)
        result = solve(
            self.A,
            other,
            damping=self.damping,
            method=self._method,  # type: ignore[arg-type]
            tol=self._tol,
            max_iter=self._max_iter,
            preconditioner=self._preconditioner,
            scale=self._scale,
        )
        self.last_result = result
        if not bool(result.converged.all()):
            tol = self._tol if self._tol is not None else default_tol(result.solution.dtype)
            raise unconverged_error("InverseOperator", result, self._method, tol)
        return result.solution.to(self.dtype)

    def __repr__(self) -> str:
        return (
            f"InverseOperator(n={self._n}, damping={self.damping:g}, method={self._method!r}, "
            f"A={type(self.A).__name__})"
        )
