"""The curated public surface."""

from __future__ import annotations

import dataclasses
import inspect
import re

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
    "IdentityOperator",
    "LinearCombination",
    "SymmetricOperator",
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
    "InverseOperator",
    "SolveResult",
    "solve",
    "influence_scores",
    "per_sample_gradients",
    "self_influence",
    "BlockRow",
    "BlockSummary",
    "block_summary",
    "KFACOperator",
    "EKFACOperator",
    "KFACInverse",
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


# Google-style docstrings: a section header, then entries indented one level ("name: text").
_HEADER = re.compile(r"^(\w[\w ]*):\s*$")
_ENTRY = re.compile(r"^    \*{0,2}(\w+)(?: \([^)]*\))?:")


def _sections(doc: str | None) -> dict[str, list[str]]:
    """Section name -> the names of its entries (for Args and Attributes)."""
    sections: dict[str, list[str]] = {}
    current = None
    for line in inspect.cleandoc(doc or "").splitlines():
        header = _HEADER.match(line)
        if header:
            current = header.group(1)
            sections[current] = []
        elif current is not None:
            entry = _ENTRY.match(line)
            if entry:
                sections[current].append(entry.group(1))
    return sections


def _parameters(function: object) -> list[str]:
    names = list(inspect.signature(function).parameters)
    return [n for n in names if n not in ("self", "cls")]


def _check_function(qualname: str, function: object, problems: list[str]) -> None:
    sections = _sections(function.__doc__)
    wanted = _parameters(function)
    missing = [n for n in wanted if n not in sections.get("Args", [])]
    if missing:
        problems.append(f"{qualname}: Args lacks {missing}")
    if "Returns" not in sections and "Yields" not in sections:
        problems.append(f"{qualname}: no Returns section")


def test_public_names_document_arguments_returns_and_raises() -> None:
    """Every public function documents each argument, its result and what it raises; every
    public class its constructor's arguments (or its fields) and its public methods theirs.
    Ruff's pydocstyle rules cannot check this: they treat hesse's private modules, where the
    public names are defined, as private."""
    problems: list[str] = []
    for name in hesse.__all__:
        obj = getattr(hesse, name)
        if name.startswith("__") or (isinstance(obj, type) and issubclass(obj, Warning)):
            continue
        if isinstance(obj, type) and issubclass(obj, BaseException):
            continue
        if not isinstance(obj, type):
            _check_function(name, obj, problems)
            if "Raises" not in _sections(obj.__doc__):
                problems.append(f"{name}: no Raises section")
            continue
        sections = _sections(obj.__doc__)
        if dataclasses.is_dataclass(obj):
            fields = [f.name for f in dataclasses.fields(obj)]
            missing = [f for f in fields if f not in sections.get("Attributes", [])]
            if missing:
                problems.append(f"{name}: Attributes lacks {missing}")
        elif getattr(obj, "_is_protocol", False):
            members = ["shape", "dtype", "device"]
            missing = [m for m in members if m not in sections.get("Attributes", [])]
            if missing:
                problems.append(f"{name}: Attributes lacks {missing}")
        else:
            wanted = _parameters(obj.__init__)
            missing = [n for n in wanted if n not in sections.get("Args", [])]
            if missing:
                problems.append(f"{name}: Args lacks {missing}")
            if "Raises" not in sections:
                problems.append(f"{name}: no Raises section")
        for attr, member in vars(obj).items():
            if attr.startswith("_"):
                continue
            function = getattr(member, "__func__", member)  # classmethods and staticmethods
            if inspect.isfunction(function) and _parameters(function):
                _check_function(f"{name}.{attr}", function, problems)
    assert not problems, "\n".join(problems)
