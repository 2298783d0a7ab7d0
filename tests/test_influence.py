"""Per-sample gradients, influence scores and self-influence against dense formulas."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from cases import Case
from conftest import per_sample, state_preserved
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.data import DataLoader, TensorDataset

import hesse
import hesse._solve

DTYPE = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------- independent oracles


def _selected(model: nn.Module) -> tuple[list[str], list[Tensor]]:
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [n for n, _ in named], [p for _, p in named]


def oracle_gradients(
    model: nn.Module, criterion: Callable[..., Tensor], inputs: tuple[Tensor, ...], target: Tensor
) -> Tensor:
    """Each sample's gradient by plain autograd, one sample at a time, in eval mode."""
    names, params = _selected(model)
    was = model.training
    model.eval()
    rows = []
    try:
        with sdpa_kernel(SDPBackend.MATH):
            for i in range(target.shape[0]):
                out = model(*(x[i : i + 1] for x in inputs))
                grads = torch.autograd.grad(
                    criterion(out, target[i : i + 1]), params, allow_unused=True
                )
                rows.append(
                    torch.cat(
                        [
                            (g if g is not None else torch.zeros_like(p)).reshape(-1)
                            for g, p in zip(grads, params)
                        ]
                    )
                )
    finally:
        model.train(was)
    return torch.stack(rows)


def _theta_function(model: nn.Module) -> tuple[Tensor, Callable[[Tensor], dict[str, Tensor]]]:
    names, params = _selected(model)
    theta = torch.cat([p.detach().reshape(-1) for p in params])

    def unflatten(t: Tensor) -> dict[str, Tensor]:
        pieces = t.split([p.numel() for p in params])
        return {n: piece.reshape(p.shape) for n, piece, p in zip(names, pieces, params)}

    return theta, unflatten


def oracle_curvature(
    kind: str, model: nn.Module, criterion: Callable[..., Tensor], x: Tensor, y: Tensor
) -> Tensor:
    """The Hessian or GGN of ``criterion(model(x), y)`` over all training samples at once."""
    theta, unflatten = _theta_function(model)
    model.eval()

    def outputs(t: Tensor) -> Tensor:
        return functional_call(model, unflatten(t), (x,))

    if kind == "hessian":
        return torch.autograd.functional.hessian(lambda t: criterion(outputs(t), y), theta)
    z = outputs(theta).detach()
    jacobian = torch.autograd.functional.jacobian(outputs, theta).reshape(z.numel(), -1)
    h = torch.autograd.functional.hessian(
        lambda flat: criterion(flat.reshape(z.shape), y), z.reshape(-1)
    )
    return jacobian.T @ h @ jacobian


def _problem(loss: str) -> tuple[nn.Module, nn.Module, Tensor, Tensor, Tensor, Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 3)).to(DTYPE)
    g = _gen(1)
    x = torch.randn(8, 3, generator=g, dtype=DTYPE)
    xt = torch.randn(3, 3, generator=g, dtype=DTYPE)
    if loss == "ce":
        y = torch.randint(0, 3, (8,), generator=g)
        yt = torch.randint(0, 3, (3,), generator=g)
        return model, nn.CrossEntropyLoss(), x, y, xt, yt
    y = torch.randn(8, 3, generator=g, dtype=DTYPE)
    yt = torch.randn(3, 3, generator=g, dtype=DTYPE)
    return model, nn.MSELoss(), x, y, xt, yt


def _batches(x: Tensor, y: Tensor, sizes: list[int]) -> list[tuple[Tensor, Tensor]]:
    return list(zip(x.split(sizes), y.split(sizes)))


def _oracle_scores(
    kind: str,
    model: nn.Module,
    criterion: Any,
    x: Tensor,
    y: Tensor,
    xt: Tensor,
    yt: Tensor,
    lam: float,
) -> Tensor:
    c = oracle_curvature(kind, model, criterion, x, y)
    if kind == "fisher":  # the empirical Fisher of the mean loss
        g = oracle_gradients(model, criterion, (x,), y)
        c = g.T @ g / x.shape[0]
    inverse = torch.linalg.inv(c + lam * torch.eye(c.shape[0], dtype=DTYPE))
    train = oracle_gradients(model, criterion, (x,), y)
    test = oracle_gradients(model, criterion, (xt,), yt)
    return -test @ inverse @ train.T


def _close(actual: Tensor, expected: Tensor, rtol: float) -> None:
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    scale = float(expected.abs().max())
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * scale)


# ----------------------------------------------------------------------- per-sample gradients


def test_per_sample_gradients_match_a_loop_for_every_case(case: Case) -> None:
    expected = oracle_gradients(case.model, case.criterion, case.inputs, case.target)
    with state_preserved(case.model), per_sample(case):
        got = hesse.per_sample_gradients(case.model, case.criterion, case.inputs, case.target)
    _close(got, expected, 1e-10)


def test_per_sample_gradients_chunks_and_params() -> None:
    model, criterion, x, y, _, _ = _problem("ce")
    expected = oracle_gradients(model, criterion, (x,), y)
    _close(hesse.per_sample_gradients(model, criterion, x, y, chunk_size=3), expected, 1e-12)
    last = hesse.per_sample_gradients(model, criterion, x, y, params="2.*")
    _close(last, expected[:, -18:], 1e-12)  # the last layer: weight 3x5 and bias 3


def test_per_sample_gradients_bad_arguments() -> None:
    model, criterion, x, y, _, _ = _problem("mse")
    with pytest.raises(ValueError, match=r"target: per-sample gradients need .* \(8\)"):
        hesse.per_sample_gradients(model, criterion, x, y[:3])
    with pytest.raises(ValueError, match="criterion: has reduction='none'"):
        hesse.per_sample_gradients(model, nn.MSELoss(reduction="none"), x, y)
    with pytest.raises(ValueError, match="chunk_size: expected a positive int"):
        hesse.per_sample_gradients(model, criterion, x, y, chunk_size=0)
    with pytest.raises(TypeError, match="model: expected a torch.nn.Module"):
        hesse.per_sample_gradients(lambda v: v, criterion, x, y)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="params: "):
        hesse.per_sample_gradients(model, criterion, x, y, params="nothing")


# ----------------------------------------------------------------------------- influence


@pytest.mark.parametrize("loss", ["mse", "ce"])
@pytest.mark.parametrize("kind", ["ggn", "hessian", "fisher"])
def test_influence_scores_match_the_dense_formula_over_unequal_batches(
    loss: str, kind: str
) -> None:
    model, criterion, x, y, xt, yt = _problem(loss)
    model.train()
    first = next(model.parameters())
    first.grad = torch.ones_like(first)
    lam = 0.1
    method = "minres" if kind == "hessian" else "cg"  # the Hessian is indefinite here
    if kind == "hessian":
        spectrum = torch.linalg.eigvalsh(oracle_curvature(kind, model, criterion, x, y))
        assert float((spectrum + lam).abs().min()) > 1e-3  # nonsingular
    expected = _oracle_scores(kind, model, criterion, x, y, xt, yt, lam)
    with state_preserved(model):
        got = hesse.influence_scores(
            model,
            criterion,
            _batches(x, y, [3, 5]),
            _batches(xt, yt, [2, 1]),
            damping=lam,
            curvature=kind,
            method=method,  # type: ignore[arg-type]
            tol=1e-12,
        )
    assert got.shape == (3, 8)
    _close(got, expected, 1e-6)


@pytest.mark.parametrize("kind", ["ggn", "hessian", "fisher"])
def test_self_influence_is_the_diagonal_of_the_dense_formula(kind: str) -> None:
    model, criterion, x, y, _, _ = _problem("ce")
    g = _gen(3)
    x = torch.cat([x, torch.randn(37, 3, generator=g, dtype=DTYPE)])  # 45: two chunks of RHS
    y = torch.cat([y, torch.randint(0, 3, (37,), generator=g)])
    lam = 0.05 if kind != "hessian" else 0.5
    expected = -_oracle_scores(kind, model, criterion, x, y, x, y, lam).diagonal()
    method = "minres" if kind == "hessian" else "cg"
    with state_preserved(model):
        got = hesse.self_influence(
            model,
            criterion,
            _batches(x, y, [40, 5]),
            damping=lam,
            curvature=kind,
            method=method,  # type: ignore[arg-type]
            tol=1e-12,
        )
    _close(got, expected, 1e-6)


def test_a_users_operator_as_curvature_and_a_dataloader() -> None:
    model, criterion, x, y, xt, yt = _problem("mse")
    dense = oracle_curvature("ggn", model, criterion, x, y)

    class Mine:  # the protocol, around the dense GGN
        shape, dtype, device = tuple(dense.shape), DTYPE, torch.device("cpu")

        def __matmul__(self, v: Tensor) -> Tensor:
            return dense @ v

    loader = DataLoader(TensorDataset(x, y), batch_size=3)
    expected = _oracle_scores("ggn", model, criterion, x, y, xt, yt, 0.1)
    got = hesse.influence_scores(
        model, criterion, loader, (xt, yt), damping=0.1, curvature=Mine(), tol=1e-12
    )
    _close(got, expected, 1e-6)
    operator = hesse.GGNOperator(model, criterion, loader)
    self_scores = hesse.self_influence(
        model, criterion, loader, damping=0.1, curvature=operator, tol=1e-12
    )
    _close(self_scores, -_oracle_scores("ggn", model, criterion, x, y, x, y, 0.1).diagonal(), 1e-6)


def test_sum_reduction_weights_batches_by_one() -> None:
    model, _, x, y, xt, yt = _problem("mse")
    criterion = nn.MSELoss(reduction="sum")
    expected = _oracle_scores("ggn", model, criterion, x, y, xt, yt, 0.3)
    got = hesse.influence_scores(
        model, criterion, _batches(x, y, [5, 3]), (xt, yt), damping=0.3, tol=1e-12
    )
    _close(got, expected, 1e-6)


def test_progress_bars_and_a_lissa_solve() -> None:
    model, criterion, x, y, xt, yt = _problem("ce")
    expected = _oracle_scores("ggn", model, criterion, x, y, xt, yt, 1.0)
    got = hesse.influence_scores(
        model,
        criterion,
        _batches(x, y, [4, 4]),
        (xt, yt),
        damping=1.0,
        method="lissa",
        tol=1e-8,
        progress=True,
    )
    _close(got, expected, 1e-5)


# -------------------------------------------------------------------- errors and state


def test_influence_errors_leave_the_model_as_it_was() -> None:
    model, criterion, x, y, xt, yt = _problem("mse")
    model.train()
    first = next(model.parameters())
    first.grad = torch.ones_like(first)
    train, test = _batches(x, y, [3, 5]), (xt, yt)
    with state_preserved(model), pytest.raises(ValueError, match="negative curvature"):
        hesse.influence_scores(model, criterion, train, test, damping=0.0, curvature="hessian")
    with state_preserved(model), pytest.raises(ValueError, match="negative curvature"):
        hesse.self_influence(model, criterion, train, damping=0.0, curvature="hessian")


def test_an_unconverged_solve_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    model, criterion, x, y, xt, yt = _problem("mse")
    monkeypatch.setattr(hesse._solve, "_default_max_iter", lambda method, n: 2)
    with pytest.raises(RuntimeError, match="influence_scores: cg did not reach"):
        hesse.influence_scores(model, criterion, (x, y), (xt, yt), damping=1e-3)
    with pytest.raises(RuntimeError, match="self_influence: cg did not reach") as info:
        hesse.self_influence(model, criterion, (x, y), damping=1e-3)
    # The advice names only what these functions take: no max_iter, no preconditioner.
    text = str(info.value)
    assert "Loosen tol" in text and "damping" in text
    assert "max_iter" not in text and "preconditioner" not in text
    with pytest.raises(RuntimeError, match=r"lissa did not reach .*use method='cg'") as info:
        hesse.self_influence(model, criterion, (x, y), damping=1e-3, method="lissa")
    assert "preconditioner" not in str(info.value)


def test_a_singular_curvature_is_named_with_the_damping_it_needs() -> None:
    # Zero damping on a GGN of rank below N: CG meets a flat direction. The error names the
    # argument (curvature, not solve's A) and asks for damping > 0, not a negative one.
    model, criterion, x, y, xt, yt = _problem("ce")
    with pytest.raises(ValueError, match=r"^curvature: CG met a flat direction.*damping > 0"):
        hesse.influence_scores(model, criterion, (x, y), (xt, yt), damping=0.0)


def test_influence_bad_arguments() -> None:
    model, criterion, x, y, xt, yt = _problem("mse")
    train, test = (x, y), (xt, yt)
    bad: list[tuple[type[Exception], str, dict[str, Any]]] = [
        (ValueError, "damping: expected a finite number >= 0", {"damping": -1.0}),
        (TypeError, "damping: expected a real number", {"damping": None}),
        (ValueError, "curvature: expected 'ggn', 'hessian', 'fisher'", {"curvature": "kfc"}),
        (
            TypeError,
            "curvature: expected 'ggn', 'hessian', 'fisher', 'kfac', 'ekfac' or an operator",
            {"curvature": 3},
        ),
        (
            ValueError,
            r"curvature: an operator of shape \(38, 38\)",
            {"curvature": torch.eye(4, dtype=DTYPE)},
        ),
        (ValueError, "method: expected 'cg'", {"method": "lu"}),
        (ValueError, "tol: expected a finite number > 0", {"tol": -1.0}),
        (ValueError, "tol: expected a relative residual below 1", {"tol": 2.0}),
        (TypeError, "progress: expected True or False", {"progress": 1}),
        (TypeError, "test_data: expected one", {"test_data": xt}),
        (TypeError, "train_data: batch 0 must be an", {"train_data": [xt]}),
        (
            ValueError,
            "criterion: has reduction='none'",
            {"criterion": nn.MSELoss(reduction="none")},
        ),
    ]
    for error, message, change in bad:
        kwargs: dict[str, Any] = {"criterion": criterion, "train_data": train, "test_data": test}
        kwargs.update({"damping": 0.1, **change})
        with pytest.raises(error, match=message):
            hesse.influence_scores(
                model,
                kwargs.pop("criterion"),
                kwargs.pop("train_data"),
                kwargs.pop("test_data"),
                **kwargs,
            )
    other = hesse.GGNOperator(model, criterion, train, params="2.*")
    with pytest.raises(ValueError, match=r"curvature: an operator of shape \(38, 38\)"):
        hesse.self_influence(model, criterion, train, damping=0.1, curvature=other)
    weights_1 = hesse.GGNOperator(model, criterion, train, params="0.weight")  # 15 entries
    with pytest.raises(ValueError, match="curvature: built on the parameters"):
        hesse.self_influence(
            model, criterion, train, damping=0.1, curvature=weights_1, params="2.weight"
        )


@pytest.mark.parametrize("name", ["kfac", "ekfac"])
def test_kronecker_curvatures_are_inverted_through_their_factors(name: str) -> None:
    model, criterion, x, y, xt, yt = _problem("mse")
    cls = hesse.KFACOperator if name == "kfac" else hesse.EKFACOperator
    dense = cls(model, criterion, (x, y)).to_dense()
    lam = 0.1
    g_train = hesse.per_sample_gradients(model, criterion, x, y)
    g_test = hesse.per_sample_gradients(model, criterion, xt, yt)
    inverse = torch.linalg.inv(dense + lam * torch.eye(dense.shape[0], dtype=dense.dtype))
    expected = -g_test @ inverse @ g_train.T
    got = hesse.influence_scores(model, criterion, (x, y), (xt, yt), damping=lam, curvature=name)
    torch.testing.assert_close(got, expected, rtol=1e-8, atol=1e-10)
    own = hesse.self_influence(model, criterion, (x, y), damping=lam, curvature=name)
    torch.testing.assert_close(own, ((g_train @ inverse) * g_train).sum(1), rtol=1e-8, atol=1e-10)


def test_data_that_does_not_fit_the_model_is_named() -> None:
    # Mismatches that used to surface as RuntimeErrors deep inside the forward pass.
    model, criterion, x, y, xt, yt = _problem("ce")
    fails = "the model and criterion fail on the first batch"
    with state_preserved(model):
        with pytest.raises(ValueError, match=rf"train_data: {fails} .*torch.int32.*Long"):
            hesse.influence_scores(model, criterion, (x, y.int()), (xt, yt), damping=0.1)
        with pytest.raises(ValueError, match=rf"test_data: {fails} .*\(B, 5\)"):
            hesse.influence_scores(
                model, criterion, (x, y), (torch.randn(2, 5, dtype=DTYPE), yt[:2]), damping=0.1
            )
        with pytest.raises(ValueError, match=rf"data: {fails} .*torch.float32"):
            hesse.self_influence(model, criterion, (x.float(), y), damping=0.1)
        with pytest.raises(ValueError, match=rf"inputs, target: {fails} .*torch.float32"):
            hesse.per_sample_gradients(model, criterion, x.float(), y)
    # Only the first batch is checked up front; a later one is named by its argument and place.
    good, bad = (x[:4], y[:4]), (x[4:], y[4:] + 3)  # class indices past the 3 classes
    later = "the model and criterion fail on batch 1"
    with state_preserved(model):
        with pytest.raises(ValueError, match=rf"^test_data: {later}"):
            hesse.influence_scores(model, criterion, (x, y), [good, bad], damping=0.1)
        with pytest.raises(ValueError, match=rf"^train_data: {later}"):
            hesse.influence_scores(model, criterion, [good, bad], (xt, yt), damping=0.1)
        with pytest.raises(ValueError, match=rf"^train_data: {later}"):
            hesse.influence_scores(
                model, criterion, [good, bad], (xt, yt), damping=0.1, curvature="fisher"
            )
        with pytest.raises(ValueError, match=rf"^data: {later}"):
            hesse.self_influence(model, criterion, [good, bad], damping=0.1)


def test_samples_that_are_not_finite_are_named() -> None:
    model, criterion, x, y, xt, yt = _problem("ce")
    xt = xt.clone()
    xt[1, 0] = float("nan")
    with state_preserved(model):
        with pytest.raises(ValueError, match="model: its output is NaN or infinite"):
            hesse.influence_scores(model, criterion, (x, y), (xt, yt), damping=0.1)
        # A batch of one has no batch to compare with: its gradient is checked.
        one = [(xt[:1], yt[:1]), (xt[1:2], yt[1:2])]
        with pytest.raises(ValueError, match="test_data: the loss gradient of sample 0"):
            hesse.influence_scores(model, criterion, (x, y), one, damping=0.1)


def test_a_shuffling_data_loader_is_refused() -> None:
    from torch.utils.data import DataLoader, TensorDataset

    model, criterion, x, y, xt, yt = _problem("ce")
    shuffled = DataLoader(TensorDataset(x, y), batch_size=4, shuffle=True)
    ordered = DataLoader(TensorDataset(x, y), batch_size=4)
    with pytest.raises(ValueError, match="train_data: a DataLoader whose sampler is RandomSampler"):
        hesse.influence_scores(model, criterion, shuffled, (xt, yt), damping=0.1)
    with pytest.raises(ValueError, match="data: a DataLoader whose sampler is RandomSampler"):
        hesse.self_influence(model, criterion, shuffled, damping=0.1)
    expected = hesse.self_influence(model, criterion, (x, y), damping=0.1)
    got = hesse.self_influence(model, criterion, ordered, damping=0.1)
    torch.testing.assert_close(got, expected, rtol=1e-8, atol=0)
