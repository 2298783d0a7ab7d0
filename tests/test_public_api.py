"""The curated public surface."""

from __future__ import annotations

import hesse

EXPECTED = {
    "EigenResult",
    "SpectralDensity",
    "TraceResult",
    "diagonal",
    "eigsh",
    "sharpness",
    "spectral_density",
    "trace",
    "CurvatureOperator",
    "EmpiricalFisherOperator",
    "GGNOperator",
    "HessianOperator",
    "hvp",
    "MemoryBudgetError",
    "ParamLayout",
    "PerformanceWarning",
    "__version__",
    "loss_hessian_diagonal",
    "loss_hessian_dict",
    "loss_hessian_matrix",
    "loss_sharpness",
    "model_hessian_diagonal",
    "model_hessian_dict",
    "model_hessian_matrix",
    "model_sharpness",
    "per_sample_loss_hessian",
}


def test_all_is_the_curated_surface() -> None:
    assert set(hesse.__all__) == EXPECTED
    assert len(hesse.__all__) == len(set(hesse.__all__))
    for name in hesse.__all__:
        assert hasattr(hesse, name)


def test_public_names_are_documented() -> None:
    for name in hesse.__all__:
        if name.startswith("__"):
            continue
        assert getattr(hesse, name).__doc__, name


def test_no_private_module_leaks() -> None:
    public = {n for n in dir(hesse) if not n.startswith("_")}
    # submodules imported by the package are private (underscore) or the CLI
    assert public - EXPECTED <= {"cli"}
