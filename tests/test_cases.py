"""Every public function on every registry model, against float64 oracles."""

from __future__ import annotations

import torch
from cases import Case, oracle_loss_hessian, oracle_model_hessian
from conftest import assert_close, per_sample, state_preserved

import hesse


def _model_hessian(case: Case, **kwargs: object) -> torch.Tensor:
    with per_sample(case):
        return hesse.model_hessian_matrix(case.model, case.inputs, **kwargs)  # type: ignore[arg-type]


def _loss_hessian(case: Case, **kwargs: object) -> torch.Tensor:
    return hesse.loss_hessian_matrix(case.model, case.criterion, case.inputs, case.target, **kwargs)  # type: ignore[arg-type]


def test_model_hessian_matrix_matches_oracle(case: Case) -> None:
    with state_preserved(case.model):
        h = _model_hessian(case)
    assert_close(h, oracle_model_hessian(case))
    assert not h.requires_grad
    assert_close(h, h.transpose(-1, -2))


def test_loss_hessian_matrix_matches_oracle(case: Case) -> None:
    with state_preserved(case.model):
        h = _loss_hessian(case)
    assert_close(h, oracle_loss_hessian(case))
    assert not h.requires_grad
    assert_close(h, h.T)


def test_subset_is_sub_block(case: Case) -> None:
    chosen = [n for n, _ in case.model.named_parameters()][-1:]
    s = hesse.ParamLayout.from_module(case.model).slice(chosen[0])
    with state_preserved(case.model):
        sub = _loss_hessian(case, params=chosen)
        model_sub = _model_hessian(case, params=chosen)
    assert_close(sub, _loss_hessian(case)[s, s])
    assert_close(model_sub, _model_hessian(case)[..., s, s])


def test_diagonals_match_full(case: Case) -> None:
    with state_preserved(case.model):
        diag = hesse.loss_hessian_diagonal(case.model, case.criterion, case.inputs, case.target)
        with per_sample(case):
            model_diag = hesse.model_hessian_diagonal(case.model, case.inputs)
    assert_close(diag, _loss_hessian(case).diagonal())
    assert_close(model_diag, _model_hessian(case).diagonal(dim1=-2, dim2=-1))


def test_diagonal_only_is_masked_full(case: Case) -> None:
    layout = hesse.ParamLayout.from_module(case.model)
    mask = torch.zeros(layout.numel, layout.numel, dtype=torch.bool)
    for name in layout.names:
        mask[layout.slice(name), layout.slice(name)] = True
    with state_preserved(case.model):
        only = _loss_hessian(case, diagonal_only=True)
        model_only = _model_hessian(case, diagonal_only=True)
    assert_close(only, torch.where(mask, _loss_hessian(case), 0.0))
    assert_close(model_only, torch.where(mask, _model_hessian(case), 0.0))


def test_dict_forms_have_torch_func_layout(case: Case) -> None:
    layout = hesse.ParamLayout.from_module(case.model)
    full, model_full = _loss_hessian(case), _model_hessian(case)
    with state_preserved(case.model):
        d = hesse.loss_hessian_dict(case.model, case.criterion, case.inputs, case.target)
        with per_sample(case):
            md = hesse.model_hessian_dict(case.model, case.inputs)
        with per_sample(case):
            md_diag = hesse.model_hessian_dict(case.model, case.inputs, diagonal_only=True)
    lead = model_full.shape[:-2]
    assert list(d) == list(layout.names)
    for p, sp in zip(layout.names, layout.shapes):
        assert list(d[p]) == list(layout.names)
        assert list(md_diag[p]) == [p]
        assert_close(md_diag[p][p], md[p][p])
        for q, sq in zip(layout.names, layout.shapes):
            assert d[p][q].shape == (*sp, *sq)
            assert md[p][q].shape == (*lead, *sp, *sq)
            sp_, sq_ = layout.slice(p), layout.slice(q)
            assert_close(d[p][q].reshape(sp.numel(), sq.numel()), full[sp_, sq_])
            assert_close(md[p][q].reshape(*lead, sp.numel(), sq.numel()), model_full[..., sp_, sq_])


def test_sharpness_is_largest_magnitude_eigenvalue(case: Case) -> None:
    with state_preserved(case.model):
        s = hesse.loss_sharpness(case.model, case.criterion, case.inputs, case.target)
        with per_sample(case):
            ms = hesse.model_sharpness(case.model, case.inputs)
    assert s.shape == ()
    assert_close(s, torch.linalg.eigvalsh(oracle_loss_hessian(case)).abs().max(), rtol=1e-9)
    expected = torch.linalg.eigvalsh(oracle_model_hessian(case)).abs().amax(-1)
    assert_close(ms, expected, rtol=1e-9)


def test_per_sample_loss_hessians_sum_to_batch_hessian(case: Case) -> None:
    def sum_loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if target.dtype == torch.long:
            return torch.nn.functional.cross_entropy(out, target, reduction="sum")
        return (out - target).pow(2).sum()

    with state_preserved(case.model), per_sample(case):
        each = hesse.per_sample_loss_hessian(case.model, sum_loss, case.inputs, case.target)
    assert each.shape[0] == case.inputs[0].shape[0]
    batch = hesse.loss_hessian_matrix(case.model, sum_loss, case.inputs, case.target)
    assert_close(each.sum(0), batch)


def test_is_batch_false_differentiates_the_batched_output(case: Case) -> None:
    with state_preserved(case.model):
        h = hesse.model_hessian_matrix(case.model, case.inputs, is_batch=False)
    # Samples are independent (eval mode), so each output entry's Hessian is its sample's.
    assert_close(h, _model_hessian(case))


def test_chunk_size_does_not_change_results(case: Case) -> None:
    reference = _loss_hessian(case)
    for chunk in (1, 7):
        assert_close(_loss_hessian(case, chunk_size=chunk), reference, rtol=1e-12)
    with per_sample(case):
        d = hesse.model_hessian_diagonal(case.model, case.inputs, chunk_size=3)
    with per_sample(case):
        expected = hesse.model_hessian_diagonal(case.model, case.inputs)
    assert_close(d, expected, rtol=1e-12)
