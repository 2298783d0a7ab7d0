"""hesse.solve and hesse.InverseOperator: CG, MINRES and LiSSA against torch.linalg.solve."""

from __future__ import annotations

import copy
import re
from typing import Any

import pytest
import torch
from cases import CASES
from conftest import state_preserved
from torch import Tensor

import hesse
from hesse._solve import _orth, default_tol

DTYPE = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _symmetric(eigenvalues: Tensor, seed: int = 0, scales: Tensor | None = None) -> Tensor:
    """Q diag(eigenvalues) Qᵀ, optionally congruent to D^½ · D^½ (a badly scaled diagonal)."""
    n = eigenvalues.numel()
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=_gen(seed), dtype=DTYPE))
    a = (q * eigenvalues) @ q.T
    if scales is not None:
        a = scales.sqrt()[:, None] * a * scales.sqrt()[None, :]
    return (a + a.T) / 2


def _spd(n: int = 30, seed: int = 0) -> Tensor:
    return _symmetric(torch.logspace(-1, 1, n, dtype=DTYPE), seed)


def _indefinite(n: int = 30, seed: int = 1) -> Tensor:
    values = torch.linspace(-3, 5, n, dtype=DTYPE)
    values[values.abs() < 0.2] = 0.5  # nonsingular
    return _symmetric(values, seed)


def _rhs(n: int, k: int | None = None, seed: int = 2) -> Tensor:
    shape = (n,) if k is None else (n, k)
    return torch.randn(*shape, generator=_gen(seed), dtype=DTYPE)


def _exact(a: Tensor, b: Tensor, damping: float) -> Tensor:
    return torch.linalg.solve(a + damping * torch.eye(a.shape[0], dtype=a.dtype), b)


def _close(actual: Tensor, expected: Tensor, rtol: float) -> None:
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    scale = max(float(expected.abs().max()), 1e-300)
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * scale)


class Counting:
    """The protocol around a matrix, recording the width of every product."""

    def __init__(self, a: Any) -> None:
        self.a = a
        self.shape, self.dtype, self.device = tuple(a.shape), a.dtype, a.device
        self.widths: list[int] = []

    def __matmul__(self, v: Tensor) -> Tensor:
        self.widths.append(v.shape[1] if v.ndim == 2 else 1)
        return self.a @ v


def _mlp() -> Any:
    return copy.deepcopy(CASES["mlp"])


# ------------------------------------------------------------------------- against dense


@pytest.mark.parametrize("method", ["cg", "minres"])
@pytest.mark.parametrize("k", [None, 1, 4])
def test_krylov_methods_match_the_dense_solve(method: str, k: int | None) -> None:
    a, b = _spd(), _rhs(30, k)
    result = hesse.solve(a, b, damping=0.3, method=method, tol=1e-12)  # type: ignore[arg-type]
    _close(result.solution, _exact(a, b, 0.3), 1e-9)
    assert bool(result.converged.all())
    assert result.converged.shape == (() if k is None else (k,))
    iterations = result.residual_norms.shape[0] - 1
    assert result.residual_norms.shape == ((iterations + 1,) if k is None else (iterations + 1, k))
    assert float(result.residual_norms[0].min()) == pytest.approx(1.0)  # x0 = 0
    assert bool((result.residual_norms[-1] <= 1e-12).all())


def test_minres_solves_an_indefinite_system_and_its_residual_never_grows() -> None:
    a, b = _indefinite(), _rhs(30, 3)
    result = hesse.solve(a, b, method="minres", tol=1e-11)
    _close(result.solution, _exact(a, b, 0.0), 1e-8)
    history = result.residual_norms
    assert bool((history[1:] <= history[:-1] * (1 + 1e-10) + 1e-15).all())
    # The reported residual is the true one.
    true = torch.linalg.vector_norm(b - a @ result.solution, dim=0) / b.norm(dim=0)
    torch.testing.assert_close(true, history[-1], rtol=1e-4, atol=1e-13)


@pytest.mark.parametrize("signs", ["semidefinite", "indefinite"])
def test_minres_on_a_singular_system_without_a_solution_stops_at_least_squares(
    signs: str,
) -> None:
    # Rank n - 3 and b with a part in the null space: no x solves it; the least-squares
    # residual is the floor. MINRES divided by a pivot of rounding noise there (x ~ 1e16).
    values = torch.linspace(1, 2, 27, dtype=DTYPE)
    if signs == "indefinite":
        values[::2] *= -1
    a = _symmetric(torch.cat([values, torch.zeros(3, dtype=DTYPE)]), seed=3)
    b = _rhs(30, 2)
    result = hesse.solve(a, b, method="minres")
    floor = torch.linalg.vector_norm(b - a @ torch.linalg.lstsq(a, b).solution, dim=0) / b.norm(
        dim=0
    )
    assert not bool(result.converged.any())
    history = result.residual_norms
    assert bool((history[1:] <= history[:-1] * (1 + 1e-10) + 1e-15).all())
    true = torch.linalg.vector_norm(b - a @ result.solution, dim=0) / b.norm(dim=0)
    torch.testing.assert_close(true, history[-1], rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(true, floor, rtol=1e-8, atol=1e-12)
    # x stays the size of the least-squares solution (that of minimum norm: 3 or so here).
    assert float(result.solution.norm()) < 10 * float((torch.linalg.pinv(a) @ b).norm())
    assert result.residual_norms.shape[0] < 60  # stopped, not run to max_iter


def test_minres_least_squares_stop_spares_solvable_and_preconditioned_systems() -> None:
    # The stop must not fire on a residual that just fell onto a tiny eigenvalue (its answer
    # is a step away), nor compare a preconditioned operator's scale with A's.
    values = torch.ones(50, dtype=DTYPE)
    values[-1] = 1e-7
    a, b = _symmetric(values, seed=4), _rhs(50, 2)
    result = hesse.solve(a, b, method="minres")
    assert bool(result.converged.all())
    _close(result.solution, _exact(a, b, 0.0), 1e-6)
    scaled = 1e6 * _symmetric(torch.logspace(0, 1, 30, dtype=DTYPE), seed=5)
    jacobi = 1 / scaled.diagonal()
    result = hesse.solve(scaled, _rhs(30), method="minres", preconditioner=jacobi)
    assert bool(result.converged) and result.residual_norms.shape[0] < 40


def test_cg_with_negative_damping_reports_negative_curvature_and_its_bound() -> None:
    a = torch.diag(torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=DTYPE))
    with pytest.raises(ValueError, match=r"negative curvature.*a damping above -1\.\d+ at least"):
        hesse.solve(a, torch.tensor([1.0, 1.0, 0.1, 0.1], dtype=DTYPE), damping=-2.5)


def test_cg_refuses_negative_curvature_and_names_minres_and_the_damping() -> None:
    a, b = _indefinite(), _rhs(30)
    lambda_min = float(torch.linalg.eigvalsh(a)[0])
    with pytest.raises(ValueError, match="negative curvature.*method='minres'") as info:
        hesse.solve(a, b, damping=0.5)
    found = re.search(r"damping above (-?[\d.e+-]+) at least", str(info.value))
    assert found is not None
    needed = float(found.group(1))
    assert 0 < needed <= -lambda_min + 1e-12  # a lower bound on what is needed


def test_lissa_converges_to_the_dense_solution() -> None:
    a, b = _spd(20), _rhs(20, 2)
    top = float(torch.linalg.eigvalsh(a)[-1])
    explicit = hesse.solve(a, b, damping=0.5, method="lissa", scale=top + 0.5)
    _close(explicit.solution, _exact(a, b, 0.5), 1e-3)
    assert bool(explicit.converged.all())
    counting = Counting(a)
    automatic = hesse.solve(counting, b, damping=0.5, method="lissa", tol=1e-10)
    _close(automatic.solution, _exact(a, b, 0.5), 1e-8)
    # The default scale costs an eigenvalue estimate (for N <= 256 the dense A @ I), counted.
    assert counting.widths[0] == 20
    assert automatic.num_matvecs == sum(counting.widths)


def test_lissa_divergence_names_a_scale_that_works() -> None:
    a, b = _spd(20), _rhs(20)
    top = float(torch.linalg.eigvalsh(a)[-1])
    with pytest.raises(ValueError, match=r"LiSSA diverged.*use scale >= ") as info:
        hesse.solve(a, b, method="lissa", scale=top / 4)
    found = re.search(r"use scale >= ([\d.e+-]+)", str(info.value))
    assert found is not None
    suggested = float(found.group(1))
    assert suggested > top / 2
    assert bool(hesse.solve(a, b, method="lissa", scale=suggested).converged)


def test_lissa_refuses_an_indefinite_system() -> None:
    a, b = _indefinite(), _rhs(30)
    with pytest.raises(ValueError, match="not positive definite.*minres"):
        hesse.solve(a, b, method="lissa", scale=10.0)


# ---------------------------------------------------------------------------- operators


def test_damped_ggn_operator() -> None:
    case = _mlp()
    ggn = hesse.GGNOperator(case.model, case.criterion, (case.inputs, case.target))
    dense = ggn.to_dense()
    b = _rhs(ggn.shape[0], 3)
    result = hesse.solve(ggn, b, damping=0.1, tol=1e-12)
    _close(result.solution, _exact(dense, b, 0.1), 1e-8)
    # A damped sum of operators is an operator too: the same system.
    damped = ggn + 0.1 * hesse.IdentityOperator.like(ggn)
    _close(hesse.solve(damped, b, tol=1e-12).solution, result.solution, 1e-8)


def test_hessian_operator_minres_and_cg_refusal() -> None:
    case = _mlp()
    h = hesse.HessianOperator(case.model, case.criterion, (case.inputs, case.target))
    dense = h.to_dense()
    spectrum = torch.linalg.eigvalsh(dense)
    assert spectrum[0] < -1.0  # indefinite: damping 1 leaves negative eigenvalues
    assert float((spectrum + 1.0).abs().min()) > 0.1  # but keeps it nonsingular
    b = _rhs(h.shape[0], 2)
    with state_preserved(case.model):
        result = hesse.solve(h, b, damping=1.0, method="minres", tol=1e-12)
    _close(result.solution, _exact(dense, b, 1.0), 1e-8)
    with state_preserved(case.model), pytest.raises(ValueError, match="negative curvature"):
        hesse.solve(h, b, damping=1.0, method="cg")


def test_one_solve_is_one_session_a_kept_graph_costs_one_forward_pass() -> None:
    case = _mlp()
    h = hesse.HessianOperator(case.model, case.criterion, (case.inputs, case.target))
    calls = []
    hook = case.model[0].register_forward_hook(lambda *_: calls.append(1))
    try:
        result = hesse.solve(h, _rhs(h.shape[0]), damping=3.0, tol=1e-10)
    finally:
        hook.remove()
    assert result.num_matvecs > 5
    assert len(calls) == 1


# ------------------------------------------------------------------- blocks and options


def test_k_right_hand_sides_take_one_block_product_per_iteration() -> None:
    a = _spd(40)
    # The last column, an eigenvector, lies in the first block's span: solved in one iteration.
    b = torch.cat([_rhs(40, 3), torch.linalg.eigh(a).eigenvectors[:, :1]], dim=1)
    counting = Counting(a)
    result = hesse.solve(counting, b, damping=0.0, tol=1e-9)
    iterations = result.residual_norms.shape[0] - 1
    assert len(counting.widths) == iterations
    assert counting.widths[0] == 4
    assert counting.widths == sorted(counting.widths, reverse=True)  # converged columns leave
    assert counting.widths[-1] < 4
    assert sum(counting.widths) == result.num_matvecs
    # A column that left keeps its last residual in the history.
    finished = result.residual_norms[-1]
    assert bool((finished <= 1e-9).all())
    _close(result.solution, _exact(a, b, 0.0), 1e-8)


def _ill_conditioned(kind: str, smallest: float = 1e-6) -> Tensor:
    """n = 60: ``smallest`` and ±1e-3 below 58 eigenvalues in [1, 100] (a third negative
    for ``"indefinite"``), where the recursive residuals drift from the true ones."""
    big = torch.linspace(1, 100, 58, dtype=DTYPE)
    if kind == "indefinite":
        big = big * torch.where(torch.arange(58) % 3 == 0, -1.0, 1.0).to(DTYPE)
    low = [smallest, 1e-3 if kind == "spd" else -1e-3]
    return _symmetric(torch.cat([torch.tensor(low, dtype=DTYPE), big]))


def _true_residual(a: Tensor, b: Tensor, x: Tensor) -> Tensor:
    b, x = b.reshape(b.shape[0], -1), x.reshape(x.shape[0], -1)
    return (b - a @ x).norm(dim=0) / b.norm(dim=0)


@pytest.mark.parametrize(
    ("kind", "method", "k"),
    [
        ("spd", "minres", None),
        ("spd", "minres", 3),
        ("indefinite", "minres", None),
        ("indefinite", "minres", 3),
        ("spd", "cg", 3),
    ],
)
def test_converged_means_the_true_residual_met_tol(kind: str, method: str, k: int | None) -> None:
    # Condition 1e8: MINRES's recursive residual reached 1e-6 here while the true one was
    # 1.2e-5; converged columns are now checked with a product and restarted where they fail.
    a, b = _ill_conditioned(kind), _rhs(60, k, seed=10)
    result = hesse.solve(a, b, method=method, tol=1e-6)
    true = _true_residual(a, b, result.solution)
    assert bool(result.converged.all())
    # The test's own product rounds differently by about eps·‖A‖‖x‖ ≈ 2e-8 of ‖b‖.
    assert bool((true <= 1.05e-6).all())
    torch.testing.assert_close(result.residual_norms[-1].reshape(-1), true, rtol=0.05, atol=0)


@pytest.mark.parametrize("method", ["cg", "minres"])
def test_an_unattainable_tol_is_reported_with_the_true_residual(method: str) -> None:
    # Condition 1e12: float64 cannot reach 1e-6 (eps·κ ≈ 2e-4); the answer says so.
    a, b = _ill_conditioned("spd", smallest=1e-12), _rhs(60, seed=10)
    result = hesse.solve(a, b, method=method, tol=1e-6)
    true = _true_residual(a, b, result.solution)
    assert not bool(result.converged)
    assert float(true[0]) > 1e-6
    torch.testing.assert_close(result.residual_norms[-1].reshape(1), true, rtol=0.05, atol=0)


@pytest.mark.parametrize(("method", "k"), [("cg", None), ("cg", 4), ("minres", None)])
def test_well_conditioned_solves_take_no_check_product(method: str, k: int | None) -> None:
    # The drift bound (1e-10 here) is far below tol: no product beyond the iterations'.
    a, b = _spd(), _rhs(30, k)
    counting = Counting(a)
    result = hesse.solve(counting, b, method=method, tol=1e-6)
    assert bool(result.converged.all())
    assert len(counting.widths) == _iterations(result)  # one product per iteration
    assert bool((_true_residual(a, b, result.solution) <= 1e-6).all())


def test_x0_starts_the_iteration_and_costs_one_product() -> None:
    a, b = _spd(), _rhs(30, 2)
    exact = _exact(a, b, 0.2)
    warm = hesse.solve(a, b, damping=0.2, x0=exact)
    assert warm.num_matvecs == 2 and warm.residual_norms.shape == (1, 2)
    assert bool(warm.converged.all())
    near = exact + 1e-4 * _rhs(30, 2, seed=5)
    cold = hesse.solve(a, b, damping=0.2, tol=1e-10)
    started = hesse.solve(a, b, damping=0.2, tol=1e-10, x0=near)
    assert started.residual_norms.shape[0] < cold.residual_norms.shape[0]
    _close(started.solution, exact, 1e-8)


@pytest.mark.parametrize("method", ["cg", "minres"])
def test_a_jacobi_preconditioner_cuts_the_iterations(method: str) -> None:
    scales = torch.logspace(-3, 3, 50, dtype=DTYPE)
    a = _symmetric(torch.logspace(-0.5, 0.5, 50, dtype=DTYPE), 3, scales)
    b = _rhs(50, 2)
    jacobi = 1 / (a.diagonal() + 1e-3)
    plain = hesse.solve(a, b, damping=1e-3, method=method, tol=1e-10)  # type: ignore[arg-type]
    pre = hesse.solve(
        a,
        b,
        damping=1e-3,
        method=method,  # type: ignore[arg-type]
        tol=1e-10,
        preconditioner=jacobi,
    )
    assert pre.num_matvecs < plain.num_matvecs / 2
    _close(pre.solution, _exact(a, b, 1e-3), 1e-7)
    # The relative residual reported is the unpreconditioned one.
    true = torch.linalg.vector_norm(
        b - (a + 1e-3 * torch.eye(50, dtype=DTYPE)) @ pre.solution, dim=0
    )
    torch.testing.assert_close(true / b.norm(dim=0), pre.residual_norms[-1], rtol=1e-3, atol=1e-13)
    # The same preconditioner as a dense matrix, or as an operator, gives the same iterates.
    dense = hesse.solve(
        a, b, damping=1e-3, method=method, tol=1e-10, preconditioner=torch.diag(jacobi)
    )  # type: ignore[arg-type]
    assert dense.num_matvecs == pre.num_matvecs
    _close(dense.solution, pre.solution, 1e-9)


def test_unconverged_columns_are_flagged_and_max_iter_zero_returns_x0() -> None:
    a, b = _spd(), _rhs(30, 2)
    short = hesse.solve(a, b, max_iter=3)
    assert short.residual_norms.shape == (4, 2)
    assert not bool(short.converged.any())
    # 3 block products, and one on the unconverged solutions: their last residual is true.
    assert short.num_matvecs == 6 + 2
    true = (b - a @ short.solution).norm(dim=0) / b.norm(dim=0)
    torch.testing.assert_close(short.residual_norms[-1], true, rtol=1e-10, atol=0)
    x0 = _rhs(30, 2, seed=9)
    none = hesse.solve(a, b, max_iter=0, x0=x0)
    assert torch.equal(none.solution, x0) and none.residual_norms.shape == (1, 2)


@pytest.mark.parametrize("method", ["cg", "minres", "lissa"])
def test_zero_right_hand_sides_are_solved_by_zero(method: str) -> None:
    a = _spd(20)
    b = _rhs(20, 3)
    b[:, 1] = 0
    result = hesse.solve(
        a, b, damping=1.0, method=method, x0=torch.ones(20, 3, dtype=DTYPE), tol=1e-10
    )  # type: ignore[arg-type]
    assert torch.equal(result.solution[:, 1], torch.zeros(20, dtype=DTYPE))
    assert bool(result.converged.all())
    assert float(result.residual_norms[:, 1].abs().max()) == 0.0
    zero = hesse.solve(a, torch.zeros(20, dtype=DTYPE))
    assert zero.num_matvecs == 0 and bool(zero.converged)


def test_default_tolerance_fits_the_dtype() -> None:
    assert default_tol(torch.float64) == 1e-6
    assert default_tol(torch.float32) == pytest.approx(torch.finfo(torch.float32).eps ** 0.5)
    a, b = _spd().float(), _rhs(30).float()
    result = hesse.solve(a, b, damping=0.1)
    assert result.solution.dtype == torch.float32 and bool(result.converged)
    assert float(result.residual_norms[-1]) <= default_tol(torch.float32)
    exact = _exact(a.double(), b.double(), 0.1).float()
    torch.testing.assert_close(
        result.solution, exact, rtol=1e-2, atol=1e-2 * float(exact.abs().max())
    )


def test_solve_inside_inference_mode() -> None:
    case = _mlp()
    ggn = hesse.GGNOperator(case.model, case.criterion, (case.inputs, case.target))
    b = _rhs(ggn.shape[0])
    expected = hesse.solve(ggn, b, damping=0.1).solution
    with torch.inference_mode():
        inside = hesse.solve(ggn, b.clone(), damping=0.1).solution
    _close(inside.clone(), expected, 1e-12)


# ------------------------------------------------------------------------------ block CG


def _iterations(result: hesse.SolveResult) -> int:
    return result.residual_norms.shape[0] - 1


def test_block_cg_shares_the_krylov_space_and_needs_fewer_iterations() -> None:
    # Six outlying eigenvalues cost single-column CG about one iteration each; a block of
    # K >= 7 columns catches them all in its first iterations.
    values = torch.cat(
        [torch.linspace(1, 2, 54, dtype=DTYPE), torch.linspace(50, 100, 6, dtype=DTYPE)]
    )
    a, b = _symmetric(values, seed=4), _rhs(60, 8, seed=6)
    block = hesse.solve(a, b, tol=1e-10)
    assert bool(block.converged.all())
    _close(block.solution, _exact(a, b, 0.0), 1e-8)
    single = [_iterations(hesse.solve(a, b[:, j], tol=1e-10)) for j in range(8)]
    assert _iterations(block) < max(single) * 2 / 3
    # Five columns, fewer than the outliers, still take fewer iterations than one column.
    five = hesse.solve(a, b[:, :5], tol=1e-10)
    _close(five.solution, _exact(a, b[:, :5], 0.0), 1e-8)
    assert _iterations(five) < max(single[:5])


def test_block_cg_dependent_right_hand_sides_narrow_the_block() -> None:
    a, b = _spd(), _rhs(30, 4)
    b[:, 1] = b[:, 0]
    b[:, 2] = 2 * b[:, 0] + b[:, 3]
    counting = Counting(a)
    result = hesse.solve(counting, b, damping=0.1, tol=1e-10)
    assert bool(result.converged.all())
    _close(result.solution, _exact(a, b, 0.1), 1e-8)
    # Rank 2: two directions per block (rounding can add a third near the end, when the
    # residuals are small enough for their dependence to be inexact).
    assert counting.widths[0] == 2
    assert result.num_matvecs < 3 * _iterations(result)
    assert result.num_matvecs == sum(counting.widths)
    # Dependent columns keep the dependence in the answer.
    _close(result.solution[:, 1], result.solution[:, 0], 1e-9)
    _close(result.solution[:, 2], 2 * result.solution[:, 0] + result.solution[:, 3], 1e-9)


def test_block_cg_with_a_zero_column_among_nonzero_ones() -> None:
    a, b = _spd(), _rhs(30, 3)
    b[:, 1] = 0
    result = hesse.solve(a, b, damping=0.2, tol=1e-10)
    assert bool(result.converged.all())
    assert torch.equal(result.solution[:, 1], torch.zeros(30, dtype=DTYPE))
    assert float(result.residual_norms[:, 1].abs().max()) == 0.0
    _close(result.solution, _exact(a, b, 0.2), 1e-8)


def test_block_cg_on_a_damped_ggn_operator() -> None:
    case = copy.deepcopy(CASES["cnn"])
    ggn = hesse.GGNOperator(case.model, case.criterion, (case.inputs, case.target))
    b = _rhs(ggn.shape[0], 3, seed=7)
    result = hesse.solve(ggn, b, damping=0.05, tol=1e-11)
    assert bool(result.converged.all())
    _close(result.solution, _exact(ggn.to_dense(), b, 0.05), 1e-8)


def test_block_cg_refuses_negative_curvature_and_names_minres_and_the_damping() -> None:
    a, b = _indefinite(), _rhs(30, 3)
    lambda_min = float(torch.linalg.eigvalsh(a)[0])
    with pytest.raises(ValueError, match="negative curvature.*block.*method='minres'") as info:
        hesse.solve(a, b, damping=0.5)
    found = re.search(r"damping above (-?[\d.e+-]+) at least", str(info.value))
    assert found is not None
    assert 0 < float(found.group(1)) <= -lambda_min + 1e-12


def test_block_cg_with_a_diagonal_preconditioner() -> None:
    # D^½ (I + E) D^½ with a small symmetric E: diagonally dominant once scaled, and D spans
    # six decades, which Jacobi undoes.
    n = 50
    e = torch.rand(n, n, generator=_gen(8), dtype=DTYPE) * 2 - 1
    base = torch.eye(n, dtype=DTYPE) + (e + e.T) / (4 * n)
    d = torch.logspace(-3, 3, n, dtype=DTYPE)
    a = d.sqrt()[:, None] * base * d.sqrt()[None, :]
    a = (a + a.T) / 2
    b = _rhs(n, 4)
    plain = hesse.solve(a, b, damping=1e-3, tol=1e-10)
    pre = hesse.solve(a, b, damping=1e-3, tol=1e-10, preconditioner=1 / (a.diagonal() + 1e-3))
    assert bool(pre.converged.all())
    assert _iterations(pre) <= _iterations(plain)
    _close(pre.solution, _exact(a, b, 1e-3), 1e-7)


def test_block_cg_counts_every_column_it_applies() -> None:
    a = _spd(40)
    eigenvector = torch.linalg.eigh(a).eigenvectors[:, :1]
    b = torch.cat([_rhs(40, 3), _rhs(40, 1, seed=3).repeat(1, 2), eigenvector], dim=1)
    x0 = 1e-3 * _rhs(40, 6, seed=4)
    x0[:, 4] = x0[:, 3]  # the repeated column keeps a repeated residual
    x0[:, 5] = 0  # the eigenvector's column converges in the first iteration
    counting = Counting(a)
    result = hesse.solve(counting, b, damping=0.0, tol=1e-9, x0=x0)
    assert bool(result.converged.all())
    assert counting.widths[0] == 6  # x0's residual: every column
    assert counting.widths[1] == 5  # the repeated column adds no direction
    assert counting.widths[2] == 4  # the eigenvector's column has left
    assert len(counting.widths) == 1 + _iterations(result)
    assert result.num_matvecs == sum(counting.widths)
    _close(result.solution, _exact(a, b, 0.0), 1e-8)


def test_orth_keeps_independent_directions_however_small() -> None:
    w = _rhs(20, 4)
    w[:, 3] = w[:, 0] - w[:, 1]  # dependent
    w[:, 2] *= 1e-12  # independent, tiny: kept
    basis = _orth(w)
    assert basis.shape == (20, 3)
    torch.testing.assert_close(basis.T @ basis, torch.eye(3, dtype=DTYPE), atol=1e-10, rtol=0)
    projected = basis @ (basis.T @ w)
    torch.testing.assert_close(projected / w.norm(dim=0), w / w.norm(dim=0), atol=1e-10, rtol=0)
    assert _orth(torch.zeros(20, 3, dtype=DTYPE)).shape == (20, 0)


# ------------------------------------------------------------------------ InverseOperator


def test_inverse_operator_products_dense_and_composition() -> None:
    a = _spd(20)
    inverse = hesse.InverseOperator(a, damping=0.5, tol=1e-12)
    expected = torch.linalg.inv(a + 0.5 * torch.eye(20, dtype=DTYPE))
    b = _rhs(20, 3)
    _close(inverse @ b, expected @ b, 1e-9)
    _close(inverse @ b[:, 0], expected @ b[:, 0], 1e-9)
    _close(inverse.to_dense(), expected, 1e-9)
    assert inverse.last_result is not None and inverse.last_result.solution.shape == (20, 20)
    assert inverse.shape == (20, 20) and inverse.dtype == DTYPE
    # It composes, and feeds the spectral tools: the top eigenvalue of the inverse is
    # 1 / (λ_min(A) + λ).
    shifted = inverse + 2.0 * hesse.IdentityOperator.like(inverse)
    _close(shifted @ b, expected @ b + 2 * b, 1e-9)
    lambda_min = float(torch.linalg.eigvalsh(a)[0])
    top = hesse.eigsh(inverse, k=1, seed=0).eigenvalues[-1]
    assert float(top) == pytest.approx(1 / (lambda_min + 0.5), rel=1e-8)


def test_inverse_operator_of_a_curvature_operator_takes_dicts() -> None:
    case = _mlp()
    ggn = hesse.GGNOperator(case.model, case.criterion, (case.inputs, case.target))
    inverse = hesse.InverseOperator(ggn, damping=0.1, tol=1e-12)
    v = _rhs(ggn.shape[0])
    as_dict = inverse @ ggn.layout.unflatten(v)
    assert set(as_dict) == set(ggn.param_names)
    _close(ggn.layout.flatten(as_dict), _exact(ggn.to_dense(), v, 0.1), 1e-8)
    assert inverse.shard == ggn.shard
    # A dict is checked as the operators check it: its keys, then each entry's shape.
    first = ggn.param_names[0]
    with pytest.raises(ValueError, match="vector: a dict needs exactly the keys"):
        inverse @ {k: t for k, t in as_dict.items() if k != first}
    with pytest.raises(ValueError, match=rf"vector\[{first!r}\]: expected shape"):
        inverse @ {**as_dict, first: as_dict[first].flatten()}


def test_inverse_operator_refuses_to_return_an_unconverged_product() -> None:
    inverse = hesse.InverseOperator(_spd(), damping=0.0, max_iter=2)
    with pytest.raises(RuntimeError, match=r"cg did not reach .*tol=1e-06.*Raise max_iter"):
        inverse @ _rhs(30)
    assert inverse.last_result is not None and not bool(inverse.last_result.converged)


# ------------------------------------------------------------------------- bad arguments


def test_bad_arguments_name_the_argument() -> None:
    a, b = _spd(10), _rhs(10)
    cases: list[tuple[type[Exception], str, dict[str, Any]]] = [
        (TypeError, "A: expected a symmetric", {"A": [[1.0]]}),
        (ValueError, "A: expected a symmetric matrix", {"A": torch.triu(a)}),
        (TypeError, "b: expected a tensor", {"b": [1.0] * 10}),
        (ValueError, r"b: expected shape \(10,\) or \(10, K\)", {"b": _rhs(9)}),
        (TypeError, r"b: expected dtype torch.float64 .*b.to\(torch.float64\)", {"b": b.float()}),
        (ValueError, "b: contains NaN", {"b": torch.full((10,), float("nan"), dtype=DTYPE)}),
        (TypeError, "damping: expected a real number", {"damping": "1e-3"}),
        (ValueError, "damping: expected a finite number", {"damping": float("inf")}),
        (ValueError, "method: expected 'cg'", {"method": "gmres"}),
        (ValueError, "tol: expected a finite number > 0", {"tol": 0.0}),
        (ValueError, "tol: expected a relative residual below 1", {"tol": 1.0}),
        (TypeError, "max_iter: expected an int", {"max_iter": 2.5}),
        (ValueError, "max_iter: expected an int >= 0", {"max_iter": -1}),
        (ValueError, r"x0: expected the shape of b, \(10,\)", {"x0": _rhs(10, 2)}),
        (ValueError, "scale: only method='lissa'", {"scale": 2.0}),
        (ValueError, "scale: expected a finite number > 0", {"scale": -1.0, "method": "lissa"}),
        (ValueError, "preconditioner: LiSSA takes none", {"method": "lissa", "preconditioner": b}),
        (
            ValueError,
            r"preconditioner: a 1-D tensor .* needs shape \(10,\)",
            {"preconditioner": _rhs(9)},
        ),
        (
            ValueError,
            "preconditioner: the diagonal of M⁻¹ must be positive",
            {"preconditioner": -b.abs()},
        ),
        (
            ValueError,
            r"preconditioner: expected an operator of shape \(10, 10\)",
            {"preconditioner": _spd(5)},
        ),
        (TypeError, "preconditioner: expected a symmetric", {"preconditioner": "jacobi"}),
    ]
    for error, message, change in cases:
        kwargs: dict[str, Any] = {"A": a, "b": b, **change}
        with pytest.raises(error, match=message):
            hesse.solve(kwargs.pop("A"), kwargs.pop("b"), **kwargs)


@pytest.mark.parametrize("k", [None, 3])
def test_cg_on_a_singular_system_names_the_curvature_not_a_nan(k: int | None) -> None:
    # pᵀAp is 0, or 1e-34 after rounding in the block: not a "product returned NaN".
    a = torch.diag(torch.tensor([1.0, 0.0], dtype=DTYPE))
    b = torch.ones(2, dtype=DTYPE) if k is None else torch.ones(2, k, dtype=DTYPE)
    # No negative damping to ask for: it is singular, and a damping > 0 is what it needs.
    with pytest.raises(ValueError, match=r"A: CG met a flat direction.*singular.*damping > 0"):
        hesse.solve(a, b)
    assert bool(hesse.solve(a, b, damping=1.0).converged.all())


def test_dense_a_that_is_not_finite_or_requires_grad() -> None:
    a = _spd(5)
    with pytest.raises(ValueError, match="A: contains NaN or infinite values"):
        hesse.solve(torch.full_like(a, float("nan")), _rhs(5))
    # A leaf that requires grad is used as it is, without torch's warning (errors here).
    x = hesse.solve(a.clone().requires_grad_(), _rhs(5), tol=1e-12).solution
    assert not x.requires_grad
    _close(x, _exact(a, _rhs(5), 0.0), 1e-9)


def test_an_operator_that_returns_no_tensor_is_named() -> None:
    class ToNumpy(Counting):
        def __matmul__(self, v: Tensor) -> Any:
            return (self.a @ v).numpy()

    with pytest.raises(TypeError, match=r"A: A @ V returned numpy.ndarray, not a torch.Tensor"):
        hesse.solve(ToNumpy(_spd(5)), _rhs(5))


def test_an_indefinite_preconditioner_is_refused() -> None:
    a, b = _spd(10), _rhs(10)
    with pytest.raises(ValueError, match="preconditioner: .* not positive definite"):
        hesse.solve(a, b, preconditioner=-torch.eye(10, dtype=DTYPE))
    with pytest.raises(ValueError, match="preconditioner: .* not positive definite"):
        hesse.solve(a, b, method="minres", preconditioner=-torch.eye(10, dtype=DTYPE))


def test_inverse_operator_bad_arguments() -> None:
    a = _spd(10)
    with pytest.raises(TypeError, match="damping: expected a real number"):
        hesse.InverseOperator(a, damping=None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="method: expected"):
        hesse.InverseOperator(a, damping=1.0, method="lu")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="preconditioner: the diagonal"):
        hesse.InverseOperator(a, damping=1.0, preconditioner=torch.zeros(10, dtype=DTYPE))
    with pytest.raises(ValueError, match="tol: expected a relative residual below 1"):
        hesse.InverseOperator(a, damping=1.0, tol=3.0)
    inverse = hesse.InverseOperator(a, damping=1.0)
    with pytest.raises(ValueError, match=r"vector: expected shape \(10,\)"):
        inverse @ _rhs(3)
    with pytest.raises(TypeError, match=r"vector: expected dtype torch.float64"):
        inverse @ _rhs(10).float()
    with pytest.raises(TypeError, match="vector: a dict needs the parameter layout"):
        inverse @ {"w": _rhs(10)}


def test_a_product_that_is_not_finite_is_reported() -> None:
    class Broken(Counting):
        def __matmul__(self, v: Tensor) -> Tensor:
            return torch.full_like(v, float("nan"))

    with pytest.raises(ValueError, match="A: a product A @ V returned NaN"):
        hesse.solve(Broken(_spd(10)), _rhs(10))


class _Kept:
    """A user's operator that returns tensors it keeps: its input itself, or a cached block."""

    def __init__(self, a: Tensor) -> None:
        self.a = a
        self.shape, self.dtype, self.device = tuple(a.shape), a.dtype, a.device
        self.cache: dict[int, Tensor] = {}

    def __matmul__(self, v: Tensor) -> Tensor:
        if bool((self.a == torch.eye(self.shape[0], dtype=self.dtype)).all()):
            return v  # the identity, without a copy
        out = self.cache.setdefault(v.shape[-1], torch.empty_like(v))
        return torch.matmul(self.a, v, out=out)


@pytest.mark.parametrize("method", ["cg", "minres"])
@pytest.mark.parametrize("k", [None, 3])
def test_damping_never_writes_into_a_user_operators_products(method: str, k: int | None) -> None:
    # hesse adds the damping in place only to its own products (new tensors): a user's
    # identity that returns V itself, or a product written into a kept buffer, stay intact.
    b = _rhs(12, k)
    identity = _Kept(torch.eye(12, dtype=DTYPE))
    result = hesse.solve(identity, b, damping=0.5, method=method, tol=1e-12)
    _close(result.solution, b / 1.5, rtol=1e-10)
    a = _spd(12)
    kept = _Kept(a)
    result = hesse.solve(kept, b, damping=0.5, method=method, tol=1e-12)
    _close(result.solution, _exact(a, b, 0.5), rtol=1e-8)
