"""Matrix-free operators over datasets, against dense float64 references built independently."""

from __future__ import annotations

import copy

import pytest
import torch
from cases import Case
from conftest import assert_close, per_sample, state_preserved
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

import hesse

F64 = torch.float64


def _problem(loss: str, reduction: str) -> tuple[nn.Module, nn.Module, Tensor, Tensor]:
    g = torch.Generator().manual_seed(3)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).to(F64)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=F64))
    x = torch.randn(16, 3, generator=g, dtype=F64)
    if loss == "ce":
        return (
            model,
            nn.CrossEntropyLoss(reduction=reduction),
            x,
            torch.randint(0, 3, (16,), generator=g),
        )
    return model, nn.MSELoss(reduction=reduction), x, torch.randn(16, 3, generator=g, dtype=F64)


def _params(model: nn.Module) -> tuple[list[str], tuple[Tensor, ...]]:
    names = [n for n, _ in model.named_parameters()]
    return names, tuple(p.detach().clone() for p in model.parameters())


def _flat(blocks: tuple[Tensor, ...], lead: int) -> Tensor:
    return torch.cat([b.reshape(lead, -1) for b in blocks], dim=1)


def oracle_hessian(model: nn.Module, crit: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    names, values = _params(model)

    def loss(*ps: Tensor) -> Tensor:
        return crit(torch.func.functional_call(model, dict(zip(names, ps)), (x,)), y)

    blocks = torch.autograd.functional.hessian(loss, values)
    sizes = [v.numel() for v in values]
    return torch.cat(
        [
            torch.cat([blocks[i][j].reshape(si, sj) for j, sj in enumerate(sizes)], 1)
            for i, si in enumerate(sizes)
        ]
    )


def oracle_ggn(model: nn.Module, crit: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    names, values = _params(model)

    def outputs(*ps: Tensor) -> Tensor:
        return torch.func.functional_call(model, dict(zip(names, ps)), (x,)).reshape(-1)

    z = outputs(*values).detach()
    jac = _flat(torch.autograd.functional.jacobian(outputs, values), z.numel())  # (BO, N)
    shape = torch.func.functional_call(model, dict(zip(names, values)), (x,)).shape
    hz = torch.autograd.functional.hessian(lambda zz: crit(zz.reshape(shape), y), z)
    return jac.T @ hz @ jac


def oracle_fisher(model: nn.Module, crit: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    grads = []
    for i in range(x.shape[0]):
        loss = crit(model(x[i : i + 1]), y[i : i + 1])
        grads.append(
            torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(model.parameters()))])
        )
    g = torch.stack(grads)
    scale = 1 / x.shape[0] if crit.reduction == "mean" else 1.0
    return scale * g.T @ g


OPERATORS = {
    "hessian": (hesse.HessianOperator, oracle_hessian),
    "ggn": (hesse.GGNOperator, oracle_ggn),
    "fisher": (hesse.EmpiricalFisherOperator, oracle_fisher),
}


@pytest.mark.parametrize("kind", sorted(OPERATORS))
@pytest.mark.parametrize("loss", ["mse", "ce"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_operator_matches_dense_reference_over_unequal_batches(
    kind: str, loss: str, reduction: str
) -> None:
    cls, oracle = OPERATORS[kind]
    model, crit, x, y = _problem(loss, reduction)
    expected = oracle(model, crit, x, y)
    data = [(x[:12], y[:12]), (x[12:], y[12:])]  # unequal batches: 12 and 4
    with state_preserved(model):
        op = cls(model, crit, data)
        assert op.shape == expected.shape and op.dtype == F64 and op.num_samples == 16
        assert op.param_names == ("0.weight", "0.bias", "2.weight", "2.bias")
        v = torch.randn(op.shape[0], 5, generator=torch.Generator().manual_seed(0), dtype=F64)
        assert_close(op @ v, expected @ v)
        assert_close(op @ v[:, 0], expected @ v[:, 0])
        # Many columns take other paths (the Fisher: per-sample gradients instead of the loss
        # vector's Jacobian products).
        wide = torch.randn(op.shape[0], 20, generator=torch.Generator().manual_seed(1), dtype=F64)
        assert_close(op @ wide, expected @ wide)
        assert_close(op.to_dense(), expected)
        assert_close(op.diagonal(), expected.diagonal())


def test_dataloader_equals_list_and_one_batch() -> None:
    model, crit, x, y = _problem("ce", "mean")
    loader = DataLoader(TensorDataset(x, y), batch_size=5, shuffle=False)  # 5, 5, 5, 1
    dense = hesse.HessianOperator(model, crit, (x, y)).to_dense()
    assert_close(hesse.HessianOperator(model, crit, loader).to_dense(), dense)
    assert_close(dense, oracle_hessian(model, crit, x, y))
    assert_close(hesse.GGNOperator(model, crit, loader).to_dense(), oracle_ggn(model, crit, x, y))


def test_products_with_many_columns_are_one_vectorised_pass_per_chunk() -> None:
    model, crit, x, y = _problem("mse", "mean")
    op = hesse.HessianOperator(model, crit, (x, y))
    eye = torch.eye(op.shape[0], dtype=F64)
    assert_close(op @ eye, op.to_dense())


def test_hvp_accepts_flat_and_dict_vectors() -> None:
    model, crit, x, y = _problem("mse", "sum")
    layout = hesse.ParamLayout.from_module(model)
    v = torch.randn(layout.numel, generator=torch.Generator().manual_seed(1), dtype=F64)
    expected = oracle_hessian(model, crit, x, y) @ v
    assert_close(hesse.hvp(model, crit, x, y, v), expected)
    out = hesse.hvp(model, crit, x, y, layout.unflatten(v))
    assert isinstance(out, dict) and list(out) == list(layout.names)
    assert_close(layout.flatten(out), expected)
    sub = hesse.hvp(model, crit, x, y, v[layout.slice("2.bias")], params=["2.bias"])
    s = layout.slice("2.bias")
    assert_close(sub, oracle_hessian(model, crit, x, y)[s, s] @ v[s])


def test_to_scipy_eigsh_matches_dense_spectrum() -> None:
    pytest.importorskip("scipy")
    from scipy.sparse.linalg import eigsh

    model, crit, x, y = _problem("ce", "mean")
    op = hesse.HessianOperator(model, crit, [(x[:7], y[:7]), (x[7:], y[7:])])
    top = eigsh(op.to_scipy(), k=3, which="LA", return_eigenvectors=False)
    expected = torch.linalg.eigvalsh(oracle_hessian(model, crit, x, y))[-3:]
    assert_close(torch.as_tensor(sorted(top), dtype=F64), expected, rtol=1e-8)


def test_progress_bar(capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("tqdm")
    model, crit, x, y = _problem("mse", "mean")
    op = hesse.GGNOperator(model, crit, [(x[:8], y[:8]), (x[8:], y[8:])], progress=True)
    op @ torch.ones(op.shape[0], dtype=F64)
    assert "GGNOperator" in capsys.readouterr().err


def test_state_preserved_with_batchnorm_in_train_mode() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 2)).to(F64)
    model.train()
    model[0].weight.grad = torch.ones_like(model[0].weight)
    x, y = torch.randn(8, 3, dtype=F64), torch.randn(8, 2, dtype=F64)
    with state_preserved(model):
        for cls in (hesse.HessianOperator, hesse.GGNOperator, hesse.EmpiricalFisherOperator):
            op = cls(model, nn.MSELoss(), [(x[:4], y[:4]), (x[4:], y[4:])])
            op @ torch.ones(op.shape[0], dtype=F64)
            op.diagonal()
    assert model.training


def test_registry_cases_through_operators(case: Case) -> None:
    """Every registry model: the operator's product equals the exact dense loss Hessian."""
    with state_preserved(case.model):
        op = hesse.HessianOperator(case.model, case.criterion, (case.inputs, case.target))
        dense = hesse.loss_hessian_matrix(case.model, case.criterion, case.inputs, case.target)
        v = torch.randn(op.shape[0], 3, generator=torch.Generator().manual_seed(0), dtype=F64)
        assert_close(op @ v, dense @ v)  # vectorised path
        assert_close(op @ v[:, 0], dense @ v[:, 0])  # single-product path
        ggn = hesse.GGNOperator(case.model, case.criterion, (case.inputs, case.target))
        g = ggn.to_dense()
        assert_close(g, g.T)
        if len(case.inputs) == 1:
            model, x = case.model, case.inputs[0]
            case.model.eval()
            assert_close(g, oracle_ggn(model, case.criterion, x, case.target))
            case.model.train(case.train_mode)
        assert_close(ggn.diagonal(), g.diagonal())
        with per_sample(case):
            fisher = hesse.EmpiricalFisherOperator(
                case.model, case.criterion, (case.inputs, case.target)
            ).diagonal()
        assert (fisher >= 0).all()


def test_determinism_check_catches_shuffling() -> None:
    model, crit, x, y = _problem("mse", "mean")
    loader = DataLoader(TensorDataset(x, y), batch_size=4, shuffle=True)
    with pytest.raises(ValueError, match=r"check_deterministic: .*the data changed .*shuffling"):
        hesse.HessianOperator(model, crit, loader, check_deterministic=True)
    fixed = DataLoader(TensorDataset(x, y), batch_size=4, shuffle=False)
    hesse.HessianOperator(model, crit, fixed, check_deterministic=True)


def test_bad_inputs() -> None:
    model, crit, x, y = _problem("mse", "mean")
    op = hesse.HessianOperator(model, crit, (x, y))
    n = op.shape[0]
    with pytest.raises(ValueError, match=rf"vector: expected shape \({n},\) or \({n}, K\)"):
        op @ torch.ones(n + 1, dtype=F64)
    with pytest.raises(TypeError, match="vector: expected dtype torch.float64"):
        op @ torch.ones(n)
    with pytest.raises(TypeError, match="vector: expected a tensor"):
        op @ ([1.0] * n)  # type: ignore[operator]
    with pytest.raises(ValueError, match="vector: a dict needs exactly the keys"):
        op @ {"0.weight": torch.ones(4, 3, dtype=F64)}
    with pytest.raises(ValueError, match="data: no samples"):
        hesse.HessianOperator(model, crit, [])
    with pytest.raises(ValueError, match="data: no samples"):
        hesse.HessianOperator(model, crit, (x[:0], y[:0]))
    with pytest.raises(TypeError, match="data: an iterator can be read only once"):
        hesse.HessianOperator(model, crit, iter([(x, y)]))
    with pytest.raises(ValueError, match=r"data: batch 1 has .* but batch 0 has"):
        hesse.HessianOperator(model, crit, [(x, y), (x[:, :2], y)])
    with pytest.raises(TypeError, match=r"data: batch 0 must be an \(inputs, target\) pair"):
        hesse.HessianOperator(model, crit, [x])
    with pytest.raises(
        ValueError, match="reduction: expected 'mean', 'sum' or 'batchmean', got 'none'"
    ):
        hesse.HessianOperator(model, nn.MSELoss(reduction="none"), (x, y))
    with pytest.raises(ValueError, match="contradicts criterion.reduction='mean'"):
        hesse.HessianOperator(model, crit, (x, y), reduction="sum")
    with pytest.raises(ValueError, match="dim 0 of every input and of the target"):
        hesse.HessianOperator(model, crit, (x, y[:3]))


def test_curvlinops_agrees_where_installed() -> None:
    curvlinops = pytest.importorskip("curvlinops")
    model, crit, x, y = _problem("ce", "mean")
    data = [(x[:10], y[:10]), (x[10:], y[10:])]
    params = list(model.parameters())
    v = torch.randn(sum(p.numel() for p in params), 2, dtype=F64)
    ours = {
        "HessianLinearOperator": hesse.HessianOperator(model, crit, data),
        "GGNLinearOperator": hesse.GGNOperator(model, crit, data),
    }
    for name, op in ours.items():
        theirs = getattr(curvlinops, name)(model, crit, params, data, check_deterministic=False)
        assert_close(op @ v, theirs @ v)


def test_operator_leaves_copies_alone() -> None:
    model, crit, x, y = _problem("mse", "mean")
    before = copy.deepcopy(model.state_dict())
    hesse.EmpiricalFisherOperator(model, crit, (x, y)).to_dense()
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_single_product_of_a_loss_linear_in_the_parameters_is_zero() -> None:
    model = nn.Linear(3, 1).to(F64)
    x = torch.randn(4, 3, dtype=F64)
    op = hesse.HessianOperator(model, lambda out, t: out.sum(), (x, torch.zeros(4)))
    assert torch.count_nonzero(op @ torch.ones(4, dtype=F64)) == 0
    assert torch.count_nonzero(op @ torch.ones(4, 2, dtype=F64)) == 0


def test_one_batch_graph_is_kept_within_a_session_only() -> None:
    """A one-batch operator keeps its gradient graph inside one call of an algorithm (a
    session), and every product outside one sees the model as it is then."""
    model, crit, x, y = _problem("ce", "mean")
    model[2].weight.requires_grad_(False)
    params = ["0.weight", "2.weight"]  # one of them frozen but named
    op = hesse.HessianOperator(model, crit, (x, y), params=params)
    v = torch.randn(op.shape[0], generator=torch.Generator().manual_seed(2), dtype=F64)
    expected = hesse.loss_hessian_matrix(model, crit, x, y, params=params) @ v
    with op.session():
        first = op @ v
        assert op._active is not None and op._active.graph is not None  # kept
        kept = op._active.graph
        assert_close(op @ v, first)
        assert op._active.graph is kept  # reused, not rebuilt
    assert op._active is None  # nothing outlives the session
    assert not model[2].weight.requires_grad
    assert_close(first, expected)
    with torch.no_grad():
        model[0].weight.mul_(1.5)  # an in-place update, as an optimizer step makes
    assert_close(op @ v, hesse.loss_hessian_matrix(model, crit, x, y, params=params) @ v)
    with torch.no_grad():
        x.mul_(0.5)  # the data changed in place
    assert_close(op @ v, hesse.loss_hessian_matrix(model, crit, x, y, params=params) @ v)
    two_batches = hesse.HessianOperator(model, crit, [(x[:8], y[:8]), (x[8:], y[8:])])
    with two_batches.session():
        two_batches @ torch.ones(two_batches.shape[0], dtype=F64)
        assert two_batches._active is not None and two_batches._active.graph is None


@pytest.mark.parametrize("kind", ["HessianOperator", "GGNOperator", "EmpiricalFisherOperator"])
def test_data_that_do_not_fit_are_named_with_their_batch(kind: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    x = torch.randn(5, 3, dtype=torch.float64)
    y = torch.randint(0, 3, (5,))
    make = getattr(hesse, kind)
    with (
        state_preserved(model),
        pytest.raises(
            ValueError, match=r"data: the model and criterion fail on the first batch .*float64"
        ),
    ):
        make(model, nn.CrossEntropyLoss(), (x.float(), y))
    # Construction checks the first batch only; a later one that fails is named at its product.
    op = make(model, nn.CrossEntropyLoss(), [(x, y), (x[:0], y[:0]), (x, y + 3)])
    v = torch.randn(op.shape[0], dtype=torch.float64)
    with (
        state_preserved(model),
        pytest.raises(
            ValueError, match=r"data: the model and criterion fail on batch 2 .*out of bounds"
        ) as info,
    ):
        op @ v
    assert isinstance(info.value.__cause__, (IndexError, RuntimeError))  # torch's, chained
