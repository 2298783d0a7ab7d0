"""Spectral tools against known spectra and dense eigendecompositions."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from conftest import assert_close
from torch import nn

import hesse

F64 = torch.float64


def _matrix(eigenvalues: torch.Tensor, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    n = eigenvalues.numel()
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=F64))
    return (q * eigenvalues) @ q.T


def _spectrum(n: int = 400) -> torch.Tensor:
    g = torch.Generator().manual_seed(5)
    # clustered top pair, a dominant negative one, and a bulk in [-1, 1]
    head = torch.tensor([10.0, 9.999, 9.5, -12.0, -4.0], dtype=F64)
    return torch.cat([head, torch.rand(n - 5, generator=g, dtype=F64) * 2 - 1])


@pytest.mark.parametrize("which", ["LA", "SA", "LM"])
def test_eigsh_known_spectrum(which: str) -> None:
    ev = _spectrum()
    a = _matrix(ev)
    result = hesse.eigsh(a, k=3, which=which, seed=0)
    order = {"LA": torch.argsort(-ev), "SA": torch.argsort(ev), "LM": torch.argsort(-ev.abs())}
    expected = ev[order[which]][:3].sort().values  # returned in ascending order, as eigh
    assert_close(result.eigenvalues, expected, rtol=1e-9)
    assert result.converged.all()
    assert result.eigenvectors.shape == (400, 3)
    assert_close(result.eigenvectors.T @ result.eigenvectors, torch.eye(3, dtype=F64), rtol=1e-9)
    direct = torch.linalg.vector_norm(
        a @ result.eigenvectors - result.eigenvectors * result.eigenvalues, dim=0
    )
    assert_close(result.residuals, direct, rtol=1e-6)
    assert 0 < result.num_matvecs < 400


def test_eigsh_small_dense_and_operator() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 3)).to(F64)
    x, y = torch.randn(40, 6, dtype=F64), torch.randint(0, 3, (40,))
    op = hesse.HessianOperator(model, nn.CrossEntropyLoss(), [(x[:25], y[:25]), (x[25:], y[25:])])
    true = torch.linalg.eigvalsh(op.to_dense())
    result = hesse.eigsh(op, k=2, which="LA")  # N = 123: dense path through to_dense
    assert_close(result.eigenvalues, true[-2:], rtol=1e-9)
    bigger = nn.Sequential(nn.Linear(10, 24), nn.Tanh(), nn.Linear(24, 3)).to(F64)
    op = hesse.HessianOperator(bigger, nn.CrossEntropyLoss(), (x.repeat(1, 2)[:, :10], y))
    true = torch.linalg.eigvalsh(op.to_dense())  # N = 339 > 256: Lanczos on products
    for which, expected in (("LA", true[-2:]), ("SA", true[:2])):
        result = hesse.eigsh(op, k=2, which=which, seed=1)
        assert_close(result.eigenvalues, expected, rtol=1e-7)
        assert result.converged.all()
    assert_close(hesse.sharpness(op, seed=2), true.abs().max(), rtol=1e-7)


def test_eigsh_bad_arguments() -> None:
    a = _matrix(_spectrum(300))
    with pytest.raises(ValueError, match="which: expected one of"):
        hesse.eigsh(a, which="BE")
    with pytest.raises(ValueError, match="k: must be smaller than N = 300"):
        hesse.eigsh(a, k=300)
    with pytest.raises(ValueError, match=r"A: expected a square \(N, N\) tensor"):
        hesse.eigsh(torch.ones(3, 4))
    with pytest.raises(TypeError, match="A: expected a symmetric"):
        hesse.eigsh([[1.0]])


def test_sharpness_of_dense_batches() -> None:
    a = torch.stack([_matrix(_spectrum(50), seed=s) for s in range(3)])
    assert_close(hesse.sharpness(a), torch.full((3,), 12.0, dtype=F64), rtol=1e-10)


@pytest.mark.parametrize("method", ["hutchinson", "hutch++"])
def test_trace_unbiased_with_honest_stderr(method: str) -> None:
    ev = torch.cat([torch.linspace(50, 5, 10, dtype=F64), torch.rand(190, dtype=F64)])
    a = _matrix(ev)
    true = ev.sum()
    z_scores = []
    for seed in range(30):
        r = hesse.trace(a, num_matvecs=30, method=method, seed=seed)
        assert r.num_matvecs == 30
        z_scores.append(float((r.estimate - true) / r.stderr))
    z = torch.tensor(z_scores)
    assert (z.abs() < 4).all()  # each estimate within 4 standard errors
    assert abs(float(z.mean())) < 4 / 30**0.5 * 2  # no bias beyond sampling noise


def test_hutchpp_beats_hutchinson_on_low_rank_plus_noise() -> None:
    ev = torch.cat([torch.linspace(100, 10, 15, dtype=F64), 0.01 * torch.rand(285, dtype=F64)])
    a = _matrix(ev)
    err = {
        m: torch.tensor(
            [float(hesse.trace(a, 45, m, seed=s).estimate - ev.sum()) for s in range(20)]
        )
        .abs()
        .mean()
        for m in ("hutchinson", "hutch++")
    }
    assert err["hutch++"] < 0.1 * err["hutchinson"]


@pytest.mark.parametrize("method", ["hutchinson", "diag++"])
def test_diagonal_estimators_are_unbiased(method: str) -> None:
    ev = torch.cat([torch.linspace(20, 5, 5, dtype=F64), torch.rand(95, dtype=F64)])
    a = _matrix(ev)
    estimates = torch.stack([hesse.diagonal(a, 30, method, seed=s) for s in range(40)])
    mean, stderr = estimates.mean(0), estimates.std(0) / 40**0.5
    assert ((mean - a.diagonal()).abs() <= 4 * stderr + 1e-12).float().mean() > 0.98
    exact = hesse.diagonal(a, method="exact")
    assert_close(exact, a.diagonal())


def test_diagonal_exact_delegates_to_the_operator() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(F64)
    op = hesse.GGNOperator(
        model, nn.MSELoss(), (torch.randn(8, 3, dtype=F64), torch.zeros(8, 2, dtype=F64))
    )
    assert_close(hesse.diagonal(op, method="exact"), op.diagonal())

    class ProductsOnly:  # an operator of the user's own, with products and no diagonal()
        shape, dtype, device = (3, 3), F64, torch.device("cpu")

        def __matmul__(self, v: torch.Tensor) -> torch.Tensor:
            return 2 * v

    with pytest.raises(TypeError, match=r"method='exact' needs A\.diagonal\(\).*ProductsOnly"):
        hesse.diagonal(ProductsOnly(), method="exact")
    estimate = hesse.diagonal(ProductsOnly(), num_matvecs=3, method="hutchinson", seed=0)
    assert_close(estimate, torch.full((3,), 2.0, dtype=F64))  # z ⊙ 2z = 2 for ±1 probes


def test_spectral_density_mass_mean_and_plot(tmp_path: object) -> None:
    ev = _spectrum(300)
    a = _matrix(ev)
    d = hesse.spectral_density(a, num_probes=4, lanczos_steps=70, seed=0)  # 280 < N: SLQ
    assert_close(torch.trapezoid(d.density, d.grid), torch.tensor(1.0, dtype=F64))
    assert_close(d.weights.sum(), torch.tensor(1.0, dtype=F64), rtol=1e-12)
    # The quadrature's mean estimates tr(A)/N: compare within the probes' spread.
    per_probe = (d.nodes * d.weights).sum(1) * d.nodes.shape[0]
    stderr = per_probe.std() / per_probe.numel() ** 0.5
    assert abs(float(per_probe.mean() - ev.mean())) < 4 * float(stderr)
    # Extreme nodes find the extreme eigenvalues.
    assert abs(float(d.nodes.max()) - 10.0) < 1e-6 and abs(float(d.nodes.min()) + 12.0) < 1e-6
    pytest.importorskip("matplotlib")
    from pathlib import Path

    path = Path(str(tmp_path)) / "density.png"
    d.plot(path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_budgets_that_reach_n_products_are_exact() -> None:
    """A trace, diagonal or density whose budget reaches N products is computed exactly."""
    ev = _spectrum(300)
    a = _matrix(ev)
    tr = hesse.trace(a, num_matvecs=300, seed=0)
    assert_close(tr.estimate, ev.sum())
    assert float(tr.stderr) == 0 and tr.num_matvecs == 0
    assert_close(hesse.diagonal(a, num_matvecs=400, method="hutchinson"), a.diagonal())
    d = hesse.spectral_density(a, num_probes=5, lanczos_steps=60)
    assert_close(d.nodes[0], ev.sort().values)
    assert d.num_matvecs == 0
    assert_close(d.weights.sum(), torch.tensor(1.0, dtype=F64))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).to(F64)
    op = hesse.HessianOperator(
        model, nn.CrossEntropyLoss(), (torch.randn(20, 4, dtype=F64), torch.randint(0, 3, (20,)))
    )
    exact = torch.linalg.eigvalsh(op.to_dense())
    d = hesse.spectral_density(op, num_probes=8, lanczos_steps=10)
    assert_close(d.nodes[0], exact)
    assert d.num_matvecs == op.shape[0] == 51
    tr = hesse.trace(op, num_matvecs=60)
    assert_close(tr.estimate, exact.sum(), rtol=1e-9)
    assert tr.num_matvecs == 51


def test_seed_and_generator_reproducible() -> None:
    a = _matrix(_spectrum(300))
    r1 = hesse.trace(a, 12, seed=3)
    r2 = hesse.trace(a, 12, seed=torch.Generator().manual_seed(3))
    assert torch.equal(r1.estimate, r2.estimate)
    with pytest.raises(TypeError, match="seed: expected an int"):
        hesse.trace(a, 12, seed="3")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="method: expected 'hutchinson' or 'hutch\\+\\+'"):
        hesse.trace(a, 12, method="exact")


def test_loss_sharpness_beyond_the_dense_limit_uses_lanczos_exactly() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 24), nn.Tanh(), nn.Linear(24, 3)).to(F64)  # N = 339
    x, y = torch.randn(30, 10, dtype=F64), torch.randint(0, 3, (30,))
    h = hesse.loss_hessian_matrix(model, nn.CrossEntropyLoss(), x, y)
    expected = torch.linalg.eigvalsh(h).abs().max()
    assert_close(hesse.loss_sharpness(model, nn.CrossEntropyLoss(), x, y), expected, rtol=1e-9)


def test_seed_none_draws_from_the_global_generator_without_reseeding_it() -> None:
    a = torch.diag(torch.arange(1.0, 101.0, dtype=F64))
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        estimate = hesse.trace(a, num_matvecs=6, method="hutchinson").estimate
        runs.append((estimate, torch.randn(3)))  # the user's own draws stay reproducible
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


def test_hutchpp_with_one_probe_reports_an_unknown_error() -> None:
    a = torch.diag(torch.arange(1.0, 101.0, dtype=F64))
    result = hesse.trace(a, num_matvecs=3, method="hutch++", seed=0)  # 1 sketch, 1 probe
    assert torch.isnan(result.stderr) and torch.isfinite(result.estimate)
    small = hesse.trace(a[:1, :1], num_matvecs=3, method="hutch++", seed=0)  # sketch spans all
    assert small.stderr == 0 and small.estimate == 1.0


def _regression(seed: int = 0) -> tuple[nn.Module, nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    """MSE linear regression (N = 300) whose loss gradient is the Hessian's top eigenvector."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(400, 300, generator=g, dtype=F64)
    # No spike: the top eigenvalue sits at the edge of the Marchenko-Pastur bulk, close to the
    # next ones, and Lanczos needs many products from a random start.
    model = nn.Linear(300, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(torch.randn(1, 300, generator=g, dtype=F64))
    top = torch.linalg.eigh(x.T @ x).eigenvectors[:, -1]
    # The gradient 2Xᵀ(Xw − y)/B is proportional to XᵀX v₁, that is to v₁, for Xw − y = X v₁.
    y = x @ model.weight.detach().T - (x @ top)[:, None]
    return model, nn.MSELoss(), (x, y)


def test_lanczos_starts_from_the_loss_gradient_for_the_top_eigenvalues() -> None:
    model, criterion, (x, y) = _regression()
    batches = [(x[:150], y[:150]), (x[150:], y[150:])]  # unequal: the mean's weighting
    op = hesse.HessianOperator(model, criterion, batches)
    with op.session():
        start = op._lanczos_start()
    expected = torch.autograd.grad(criterion(model(x), y), [model.weight])[0].reshape(-1)
    assert_close(start, expected, rtol=1e-12)
    exact = torch.linalg.eigvalsh(op.to_dense())
    default = hesse.eigsh(op, k=1, seed=3)
    random = hesse.eigsh(
        op, k=1, v0=torch.randn(300, generator=torch.Generator().manual_seed(3), dtype=F64)
    )
    for result in (default, random):
        assert_close(result.eigenvalues[-1], exact[-1], rtol=1e-9)
    assert default.num_matvecs < random.num_matvecs
    sharp = hesse.sharpness(op, seed=3)  # "LM" starts there too
    assert_close(sharp, exact.abs().max(), rtol=1e-9)


def test_the_gradient_start_is_asked_only_for_top_eigenvalues_without_v0(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model, criterion, data = _regression()
    op = hesse.HessianOperator(model, criterion, data)
    calls: list[int] = []
    original = hesse.HessianOperator._lanczos_start

    def counted(self: hesse.HessianOperator) -> torch.Tensor:
        calls.append(1)
        return original(self)

    monkeypatch.setattr(hesse.HessianOperator, "_lanczos_start", counted)
    hesse.eigsh(op, k=1, which="LA", seed=0)
    assert len(calls) == 1
    hesse.eigsh(op, k=1, which="SA", seed=0)
    hesse.eigsh(op, k=1, which="LA", v0=torch.ones(300, dtype=F64))
    assert len(calls) == 1


def test_a_zero_gradient_leaves_the_random_start() -> None:
    # At the minimum of a least-squares loss the gradient is zero: Lanczos starts at random.
    model, criterion, (x, _) = _regression()
    y = model(x).detach()
    op = hesse.HessianOperator(model, criterion, (x, y))
    with op.session():
        assert float(op._lanczos_start().abs().max()) == 0.0
    exact = torch.linalg.eigvalsh(op.to_dense())
    assert_close(hesse.eigsh(op, k=2, seed=1).eigenvalues, exact[-2:], rtol=1e-9)


@pytest.mark.parametrize("spectrum", ["identity", "rank 4"])
def test_spectral_density_stops_a_probe_whose_krylov_space_is_exhausted(spectrum: str) -> None:
    # Fewer distinct eigenvalues than Lanczos steps, and a budget below N (no exact path):
    # the residual after the last one is rounding noise, which had made Ritz values of
    # -29..31 for the identity.
    n = 3000
    g = torch.Generator().manual_seed(0)
    if spectrum == "identity":
        a, lo, hi = torch.eye(n, dtype=F64), 1.0, 1.0
    else:
        u = torch.linalg.qr(torch.randn(n, 4, generator=g, dtype=F64))[0]
        a, lo, hi = (u * torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=F64)) @ u.T, 0.0, 4.0
    density = hesse.spectral_density(a, num_probes=3, lanczos_steps=12, seed=0)
    assert float(density.nodes.min()) >= lo - 1e-8 and float(density.nodes.max()) <= hi + 1e-8
    assert_close(density.weights.sum(), torch.tensor(1.0, dtype=F64), rtol=1e-10)
    mean = float((density.nodes * density.weights).sum())  # ≈ trace / N
    assert abs(mean - float(a.trace()) / n) <= 0.1 * max(1.0, float(a.trace()) / n)


def test_operators_whose_products_are_not_finite_or_misshapen_are_named() -> None:
    class Broken:
        shape, dtype, device = (300, 300), F64, torch.device("cpu")

        def __init__(self, fill: float, width: int | None = None) -> None:
            self.fill, self.width = fill, width

        def __matmul__(self, v: torch.Tensor) -> torch.Tensor:
            out = v.clone()
            out[0] = self.fill
            return out if self.width is None else out[:, : self.width]

    not_finite = "A: a product A @ V returned NaN or infinite values"
    for call in (
        lambda a: hesse.eigsh(a, k=1, seed=0),
        lambda a: hesse.sharpness(a, seed=0),
        lambda a: hesse.spectral_density(a, num_probes=2, lanczos_steps=5, seed=0),
        lambda a: hesse.trace(a, num_matvecs=10, seed=0),
        lambda a: hesse.diagonal(a, num_matvecs=10, seed=0),
    ):
        with pytest.raises(ValueError, match=not_finite):
            call(Broken(float("nan")))
    with pytest.raises(ValueError, match=r"A: A @ V returned shape \(300, 1\)"):
        hesse.trace(Broken(1.0, width=1), num_matvecs=10, seed=0)
    empty = torch.zeros(0, 0, dtype=F64)
    with pytest.raises(ValueError, match="A: has no rows"):
        hesse.sharpness(empty)
    with pytest.raises(ValueError, match="A: has no rows"):
        hesse.spectral_density(empty)


def test_dense_hessians_name_inputs_that_do_not_fit_and_empty_outputs() -> None:
    model = nn.Linear(2, 1).to(F64)
    x = torch.randn(3, 5, generator=torch.Generator().manual_seed(0), dtype=F64)
    with pytest.raises(
        ValueError, match=r"inputs, target: the model and criterion fail .*\(B, 5\)"
    ):
        hesse.loss_hessian_matrix(model, nn.MSELoss(), x, torch.zeros(3, 1, dtype=F64))
    with pytest.warns(UserWarning, match="zero-element"):  # torch's, at nn.Linear(3, 0)
        no_outputs = nn.Linear(3, 0).to(F64)
    empty = hesse.model_hessian_matrix(no_outputs, x[:, :3])
    assert empty.shape == (3, 0, 0, 0)  # no outputs, and no parameters either


class _Protocol:
    """An operator of the protocol, 2I of size n, with any ``dtype`` attribute."""

    device = torch.device("cpu")

    def __init__(self, dtype: object, n: int = 300) -> None:
        self.dtype, self.shape = dtype, (n, n)

    def __matmul__(self, v: torch.Tensor) -> torch.Tensor:
        return 2 * v


def _every_tool() -> list[Callable[[Any], object]]:
    return [
        lambda a: hesse.eigsh(a, k=1, seed=0),
        lambda a: hesse.sharpness(a, seed=0),
        lambda a: hesse.trace(a, num_matvecs=30, seed=0),
        lambda a: hesse.trace(a, num_matvecs=300, seed=0),  # exact budget
        lambda a: hesse.diagonal(a, num_matvecs=30, seed=0),
        lambda a: hesse.spectral_density(a, num_probes=2, lanczos_steps=5, seed=0),
    ]


@pytest.mark.parametrize(
    "kind", ["complex operator", "integer operator", "numpy array", "complex tensor"]
)
def test_a_that_is_not_real_floating_point_is_refused_up_front(kind: str) -> None:
    # A complex operator had given wrong numbers (eigsh 14,089 for diag(1..300), a complex
    # trace), an integer one an integer trace or errors from deep inside torch.
    np = pytest.importorskip("numpy")
    a = {
        "complex operator": lambda: _Protocol(torch.complex128),
        "integer operator": lambda: _Protocol(torch.int64),
        "numpy array": lambda: np.eye(300),
        "complex tensor": lambda: torch.eye(300, dtype=torch.complex128),
    }[kind]()
    fix = {
        "complex operator": r"got torch\.complex128; .*give the operator a real dtype",
        "integer operator": r"got torch\.int64; give the operator a floating dtype",
        "numpy array": r"got numpy\.ndarray of dtype .*float64.*; convert an array with "
        r"torch\.as_tensor\(A\)",
        "complex tensor": r"got torch\.complex128; .*convert it with A\.real",
    }[kind]
    for call in _every_tool():
        with pytest.raises(TypeError, match=rf"^A: expected a real floating-point \w+, {fix}"):
            call(a)


def test_dense_eigsh_converged_is_relative_to_the_whole_spectrum() -> None:
    # PSD with a zero eigenvalue (a rank-deficient GGN): the smallest eigenvalue is rounding
    # noise, and so is its residual, well within √eps of max |λ| = 1e4.
    ev = torch.linspace(0, 1e4, 50, dtype=F64)
    a = _matrix(ev)
    a = (a + a.T) / 2
    result = hesse.eigsh(a, k=1, which="SA")  # N <= 256: a dense solve
    assert abs(float(result.eigenvalues[0])) < 1e-8
    assert float(result.residuals[0]) < 1e-8 * 1e4
    assert bool(result.converged.all())


def test_a_dense_tensor_that_requires_grad_is_used_detached() -> None:
    ev = torch.arange(1.0, 301.0, dtype=F64)
    big = torch.diag(ev).requires_grad_()  # N > 256: Lanczos, whose in-place work autograd refuses
    small = torch.diag(ev[:10]).requires_grad_()  # a dense solve
    for a, top in ((big, 300.0), (small, 10.0)):
        result = hesse.eigsh(a, k=1, seed=0)
        sharp = hesse.sharpness(a, seed=0)
        assert_close(result.eigenvalues, torch.tensor([top], dtype=F64), rtol=1e-8)
        assert_close(sharp, torch.tensor(top, dtype=F64), rtol=1e-8)
        assert not result.eigenvalues.requires_grad and not result.eigenvectors.requires_grad
        assert not sharp.requires_grad


def test_non_finite_dense_forms_and_diagonals_of_operators_are_refused() -> None:
    class NaNs(_Protocol):  # products, to_dense() and diagonal() all NaN (a diverged model)
        def __matmul__(self, v: torch.Tensor) -> torch.Tensor:
            return v * float("nan")

        def to_dense(self) -> torch.Tensor:
            return torch.full(self.shape, float("nan"), dtype=F64)

        def diagonal(self) -> torch.Tensor:
            return torch.full(self.shape[:1], float("nan"), dtype=F64)

    a = NaNs(F64, n=10)
    to_dense = r"A: A\.to_dense\(\) returned NaN or infinite values; check the operator"
    diagonal = r"A: A\.diagonal\(\) returned NaN or infinite values; check the operator"
    for call, message in (
        (lambda: hesse.eigsh(a, k=1), to_dense),
        (lambda: hesse.sharpness(a), to_dense),
        (lambda: hesse.spectral_density(a), to_dense),  # had been torch's _LinAlgError
        (lambda: hesse.trace(a, num_matvecs=10), diagonal),  # had been nan with stderr 0
        (lambda: hesse.diagonal(a, num_matvecs=10), diagonal),
        (lambda: hesse.diagonal(a, method="exact"), diagonal),
    ):
        with pytest.raises(ValueError, match=message):
            call()
    # hesse's own operator over data with a NaN, N = 31: to_dense() and diagonal() paths.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 1)).to(F64)
    x, y = torch.randn(16, 4, dtype=F64), torch.randn(16, 1, dtype=F64)
    x[3, 2] = float("nan")
    h = hesse.HessianOperator(model, nn.MSELoss(), (x, y))
    with pytest.raises(ValueError, match="A: A.to_dense"):
        hesse.eigsh(h, k=1)
    with pytest.raises(ValueError, match="A: A.diagonal"):
        hesse.trace(h, num_matvecs=31)


@pytest.mark.parametrize("how", ["exact", "budget of N"])
def test_the_exact_diagonal_of_a_tensor_is_a_copy(how: str) -> None:
    a = torch.full((4, 4), 0.5, dtype=F64) + torch.diag(torch.arange(1.0, 5.0, dtype=F64))
    before = a.clone()
    d = hesse.diagonal(a, method="exact") if how == "exact" else hesse.diagonal(a, 4)
    assert_close(d, before.diagonal())
    d += 10
    assert torch.equal(a, before)


def test_arguments_are_checked_on_the_dense_and_exact_paths_too() -> None:
    s = torch.diag(torch.arange(1.0, 11.0, dtype=F64))  # N = 10: dense solves, exact budgets
    seed = "seed: expected an int, a torch.Generator or None"
    for call in (
        lambda: hesse.eigsh(s, k=1, seed="abc"),  # type: ignore[arg-type]
        lambda: hesse.eigsh(s, k=1, seed=1.5),  # type: ignore[arg-type]
        lambda: hesse.sharpness(s, seed="abc"),  # type: ignore[arg-type]
        lambda: hesse.trace(s, num_matvecs=10, seed="abc"),  # type: ignore[arg-type]
        lambda: hesse.diagonal(s, num_matvecs=10, seed="abc"),  # type: ignore[arg-type]
        lambda: hesse.diagonal(s, method="exact", seed="abc"),  # type: ignore[arg-type]
        lambda: hesse.spectral_density(s, seed="abc"),  # type: ignore[arg-type]
    ):
        with pytest.raises(TypeError, match=seed):
            call()
    with pytest.raises(ValueError, match="max_basis: must exceed k = 3, got 3"):
        hesse.eigsh(s, k=3, max_basis=3)
    with pytest.raises(ValueError, match="tol: expected a finite number > 0"):
        hesse.sharpness(s, tol=-1.0)
    with pytest.raises(TypeError, match="tol: expected a positive number"):
        hesse.sharpness(s, tol="x")  # type: ignore[arg-type]


def test_eigsh_with_v0_leaves_the_global_generator_alone() -> None:
    a = torch.diag(torch.arange(1.0, 301.0, dtype=F64))
    torch.manual_seed(123)
    before = torch.get_rng_state()
    result = hesse.eigsh(a, k=1, v0=torch.ones(300, dtype=F64))  # seed=None: not needed
    assert torch.equal(torch.get_rng_state(), before)
    assert_close(result.eigenvalues, torch.tensor([300.0], dtype=F64), rtol=1e-8)


def test_a_complex_v0_is_refused() -> None:
    a = torch.diag(torch.arange(1.0, 301.0, dtype=F64))
    for v0 in (torch.ones(300, dtype=torch.complex128), 1j * torch.ones(300, dtype=F64)):
        with pytest.raises(TypeError, match=r"v0: expected a real tensor, got torch\.complex128"):
            hesse.eigsh(a, k=1, v0=v0)


@pytest.mark.parametrize("width", [5, 70])  # N = 31 (dense) and N = 421 (Lanczos)
def test_loss_sharpness_names_its_own_arguments_for_a_non_finite_hessian(width: int) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, width), nn.Tanh(), nn.Linear(width, 1)).to(F64)
    x, y = torch.randn(16, 4, dtype=F64), torch.randn(16, 1, dtype=F64)
    x[3, 2] = float("nan")
    with pytest.raises(ValueError, match=r"^inputs, target: the loss Hessian contains NaN"):
        hesse.loss_sharpness(model, nn.MSELoss(), x, y)
