"""hesse: second-order information about PyTorch models, exactly or matrix-free, in one call.

The seed API (``model_hessian_matrix``, ``loss_hessian_matrix``, their dict forms and the
sharpness functions) works verbatim; see ``README.md`` for a tour.
"""

from hesse._algebra import IdentityOperator, LinearCombination
from hesse._dense import (
    loss_hessian_diagonal,
    loss_hessian_dict,
    loss_hessian_matrix,
    loss_sharpness,
    model_hessian_diagonal,
    model_hessian_dict,
    model_hessian_matrix,
    model_sharpness,
    per_sample_loss_hessian,
)
from hesse._influence import influence_scores, per_sample_gradients, self_influence
from hesse._kfac import EKFACOperator, KFACInverse, KFACOperator
from hesse._layout import ParamLayout
from hesse._memory import MemoryBudgetError
from hesse._operators import (
    CurvatureOperator,
    EmpiricalFisherOperator,
    GGNOperator,
    HessianOperator,
    hvp,
)
from hesse._protocol import SymmetricOperator
from hesse._solve import InverseOperator, SolveResult, solve
from hesse._spectral import (
    EigenResult,
    SpectralDensity,
    TraceResult,
    diagonal,
    eigsh,
    sharpness,
    spectral_density,
    trace,
)
from hesse._summary import BlockRow, BlockSummary, block_summary
from hesse._transforms import PerformanceWarning
from hesse._version import __version__

__all__ = [
    "BlockRow",
    "BlockSummary",
    "CurvatureOperator",
    "EKFACOperator",
    "EigenResult",
    "EmpiricalFisherOperator",
    "GGNOperator",
    "HessianOperator",
    "IdentityOperator",
    "InverseOperator",
    "KFACInverse",
    "KFACOperator",
    "LinearCombination",
    "MemoryBudgetError",
    "ParamLayout",
    "PerformanceWarning",
    "SolveResult",
    "SpectralDensity",
    "SymmetricOperator",
    "TraceResult",
    "__version__",
    "block_summary",
    "diagonal",
    "eigsh",
    "hvp",
    "influence_scores",
    "loss_hessian_diagonal",
    "loss_hessian_dict",
    "loss_hessian_matrix",
    "loss_sharpness",
    "model_hessian_diagonal",
    "model_hessian_dict",
    "model_hessian_matrix",
    "model_sharpness",
    "per_sample_gradients",
    "per_sample_loss_hessian",
    "self_influence",
    "sharpness",
    "solve",
    "spectral_density",
    "trace",
]
