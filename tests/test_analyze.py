"""``hesse analyze FILE.py:FUNC``: results against independent references, and its errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from cases import oracle_hessian
from torch import nn

import hesse
from hesse.cli import _analyze, _output, main
from hesse.cli._analyze import CommandError

ROOT = Path(__file__).resolve().parents[1]

SETUP = """
import torch
from torch import nn


def data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(48, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (48,), generator=g)
    return x, y


def model(hidden):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, hidden), nn.Tanh(), nn.Linear(hidden, 3)).double()


def setup():  # N = 6*40 + 40 + 40*3 + 3 = 403: Lanczos, not the dense shortcut
    x, y = data()
    return model(40), nn.CrossEntropyLoss(), [(x[:32], y[:32]), (x[32:], y[32:])]


def tiny():  # N = 6*4 + 4 + 4*3 + 3 = 43: small enough for a heat map
    return model(4), nn.CrossEntropyLoss(reduction="sum"), data()


def not_a_triple():
    return model(4)


def wrong_loss():
    return model(4), "cross-entropy", data()


def empty():
    return model(4), nn.CrossEntropyLoss(), []


def raises():
    raise RuntimeError("boom")


def nan_data():  # N = 43: the dense matrix's entries are NaN
    x, y = data()
    x[0, 0] = float("nan")
    return model(4), nn.CrossEntropyLoss(), (x, y)
"""


@pytest.fixture(scope="module")
def user_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("user") / "setups.py"
    path.write_text(textwrap.dedent(SETUP))
    return path


def _user_module(path: Path) -> dict[str, Any]:
    namespace: dict[str, Any] = {}
    exec(compile(path.read_text(), str(path), "exec"), namespace)
    return namespace


def _run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    status = main(args)
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def _flat_loss_hessian(model: nn.Module, criterion: Any, x: Any, y: Any) -> torch.Tensor:
    """Independent reference: the registry's autograd.functional.hessian oracle."""
    return oracle_hessian(
        model, lambda ps: criterion(torch.func.functional_call(model, ps, (x,)), y)
    )


def test_eigenvalues_and_trace_match_the_dense_hessian(
    user_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status, out, err = _run(
        [
            "analyze",
            f"{user_file}:setup",
            "--out",
            str(tmp_path),
            "--top-k",
            "3",
            "--bottom-k",
            "2",
            "--trace",
            "--no-progress",
        ],
        capsys,
    )
    assert status == 0, err
    report = json.loads((tmp_path / "report.json").read_text())
    ns = _user_module(user_file)
    x, y = ns["data"]()
    h = _flat_loss_hessian(ns["model"](40), nn.CrossEntropyLoss(), x, y)
    exact = torch.linalg.eigvalsh(h)
    assert report["parameters"] == h.shape[0] == 403
    assert report["samples"] == 48 and report["reduction"] == "mean"
    assert report["dtype"] == "float64"
    torch.testing.assert_close(
        torch.tensor(report["top"]["eigenvalues"], dtype=torch.float64),
        exact[-3:].flip(0),
        rtol=1e-6,
        atol=1e-8,
    )
    torch.testing.assert_close(
        torch.tensor(report["bottom"]["eigenvalues"], dtype=torch.float64),
        exact[:2],
        rtol=1e-6,
        atol=1e-8,
    )
    assert all(report["top"]["converged"]) and report["top"]["num_matvecs"] > 0
    trace = report["trace"]
    assert trace["method"] == "hutch++" and trace["num_matvecs"] == 90  # N = 403 > 90 products
    assert abs(trace["estimate"] - h.trace().item()) < 5 * trace["stderr"]
    assert "density" not in report  # only what was asked for
    assert report["analyses"] == ["top-3", "bottom-2", "trace"] and report["analyses_named"]
    # Every number printed is in the report.
    assert f"{report['top']['eigenvalues'][0]: .6e}" in out
    assert f"{trace['estimate']:.6e} ± " in out
    assert str(tmp_path / "report.json") in out


@pytest.mark.parametrize("curvature", ["ggn", "fisher"])
def test_other_curvatures_and_a_parameter_subset(
    curvature: str, user_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["analyze", f"{user_file}:setup", "--out", str(tmp_path), "--curvature", curvature]
    args += ["--params", "2.*", "--top-k", "2", "--no-progress"]
    status, out, err = _run(args, capsys)
    assert status == 0, err
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["param_names"] == ["2.weight", "2.bias"] and report["parameters"] == 123
    ns = _user_module(user_file)
    model, criterion, data = ns["setup"]()
    operator = {"ggn": hesse.GGNOperator, "fisher": hesse.EmpiricalFisherOperator}[curvature]
    dense = operator(model, criterion, data, params=["2.*"]).to_dense()
    torch.testing.assert_close(
        torch.tensor(report["top"]["eigenvalues"], dtype=torch.float64),
        torch.linalg.eigvalsh(dense)[-2:].flip(0),
        rtol=1e-6,
        atol=1e-10,
    )
    assert type(operator(model, criterion, data)).__name__ == report["operator"]


def test_defaults_write_density_and_heatmap(
    user_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status, out, err = _run(["analyze", f"{user_file}:tiny", "--out", str(tmp_path)], capsys)
    assert status == 0, err
    report = json.loads((tmp_path / "report.json").read_text())
    assert set(report) >= {"top", "trace", "density"} and "bottom" not in report
    assert len(report["top"]["eigenvalues"]) == 5
    assert report["reduction"] == "sum"
    assert report["analyses"] == ["top-5", "trace", "density"]
    assert report["analyses_named"] is False
    assert "analyses    top-5, trace, density (the defaults: no analysis was named)" in out
    assert "--per-layer adds a table per layer" in out and "per_layer" not in report
    ns = _user_module(user_file)
    x, y = ns["data"]()
    h = _flat_loss_hessian(ns["model"](4), nn.CrossEntropyLoss(reduction="sum"), x, y)
    exact = torch.linalg.eigvalsh(h)
    torch.testing.assert_close(  # N = 43: from the dense matrix, largest first
        torch.tensor(report["top"]["eigenvalues"], dtype=torch.float64),
        exact[-5:].flip(0),
        rtol=1e-6,
        atol=1e-8,
    )
    assert report["top"]["method"] == "exact"
    low, high = report["density"]["range"]
    assert low == pytest.approx(exact[0].item(), rel=1e-6, abs=1e-8)
    assert high == pytest.approx(exact[-1].item(), rel=1e-6)
    pytest.importorskip("matplotlib")
    for name in ("spectral_density.png", "curvature_heatmap.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
    assert report["figures"] == ["spectral_density.png", "curvature_heatmap.png"]


def test_report_names_its_figures_relative_to_out(
    user_file: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``--out`` given relative to the working folder, then the folder moved: the report's
    figure paths are file names inside it, and still name its files."""
    pytest.importorskip("matplotlib")
    monkeypatch.chdir(tmp_path)
    args = ["analyze", f"{user_file}:tiny", "--density", "--no-progress"]
    status, out, err = _run([*args, "--out", "runs/../runs/tiny"], capsys)
    assert status == 0, err
    moved = tmp_path / "elsewhere"
    (tmp_path / "runs" / "tiny").rename(moved)
    report = json.loads((moved / "report.json").read_text())
    assert report["figures"] == ["spectral_density.png", "curvature_heatmap.png"]
    for name in report["figures"]:
        assert (moved / name).read_bytes()[:4] == b"\x89PNG"
    assert "wrote runs/../runs/tiny/report.json" in out  # the printout keeps the path as given


def test_naming_one_analysis_runs_only_it_and_says_so(
    user_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["analyze", f"{user_file}:tiny", "--density", "--no-progress"]
    status, out, err = _run([*args, "--out", str(tmp_path)], capsys)
    assert status == 0, err
    report = json.loads((tmp_path / "report.json").read_text())
    assert "top" not in report and "trace" not in report and "density" in report
    assert report["analyses"] == ["density"] and report["analyses_named"] is True
    line = (
        "analyses    density (named; the defaults top-5, trace, density apply only when none "
        "is named)"
    )
    assert line in out.splitlines()
    # --help says so in its epilog and in each analysis flag's help.
    with pytest.raises(SystemExit):
        main(["analyze", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps the flags' help
    assert "Naming any of them runs only the ones named (--density alone: no eigenvalues" in text
    for flag in ("--top-k K", "--bottom-k K", "--trace", "--density", "--per-layer"):
        after = text.split(f" {flag} ", 1)[1]
        assert after.split(" --", 1)[0].endswith(
            "naming any analysis runs only those named (none named: top-5, trace, density)"
        ), flag


def test_at_most_256_parameters_the_trace_and_density_are_exact(
    user_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """N = 43: the trace and the density come from the dense matrix, whatever
    --trace-matvecs says; the trace is printed without a standard error."""
    args = ["analyze", f"{user_file}:tiny", "--trace", "--density", "--trace-matvecs", "3"]
    status, out, err = _run([*args, "--no-progress", "--out", str(tmp_path)], capsys)
    assert status == 0, err
    report = json.loads((tmp_path / "report.json").read_text())
    ns = _user_module(user_file)
    model, criterion, data = ns["tiny"]()
    dense = hesse.HessianOperator(model, criterion, data).to_dense()
    n = dense.shape[0]
    assert report["dense"]["num_matvecs"] == n == 43
    trace = report["trace"]
    assert trace["method"] == "exact" and trace["num_matvecs"] == n
    assert trace["estimate"] == pytest.approx(dense.trace().item(), rel=1e-6)
    assert f"trace       {trace['estimate']:.6e} (exact, " in out
    assert "±" not in out
    density = report["density"]
    assert density["method"] == "exact" and density["num_matvecs"] == n
    nodes = torch.tensor(density["nodes"], dtype=torch.float64)
    weights = torch.tensor(density["weights"], dtype=torch.float64)
    assert nodes.shape == weights.shape == (1, n)
    torch.testing.assert_close(nodes[0], torch.linalg.eigvalsh(dense), rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(weights, torch.full((1, n), 1 / n, dtype=torch.float64))
    assert f"(exact: all {n} eigenvalues" in out


def test_above_256_parameters_a_budget_of_n_products_is_exact(
    user_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """N = 403: the trace is exact when --trace-matvecs reaches N, and the density when its
    8 x 60 products do; Hutch++ with fewer products (test above)."""
    args = ["analyze", f"{user_file}:setup", "--trace", "--density", "--trace-matvecs", "403"]
    status, out, err = _run([*args, "--no-progress", "--out", str(tmp_path)], capsys)
    assert status == 0, err
    report = json.loads((tmp_path / "report.json").read_text())
    assert "dense" not in report  # no dense matrix built by the command above 256
    ns = _user_module(user_file)
    model, criterion, data = ns["setup"]()
    dense = hesse.HessianOperator(model, criterion, data).to_dense()
    assert report["trace"]["method"] == "exact" and report["trace"]["num_matvecs"] == 403
    assert report["trace"]["estimate"] == pytest.approx(dense.trace().item(), rel=1e-6)
    assert report["density"]["method"] == "exact" and report["density"]["num_matvecs"] == 403
    torch.testing.assert_close(
        torch.tensor(report["density"]["nodes"], dtype=torch.float64)[0],
        torch.linalg.eigvalsh(dense),
        rtol=1e-6,
        atol=1e-8,
    )
    assert "±" not in out and "(exact: all 403 eigenvalues, 403 products" in out


class _Bars:
    """A stand-in for tqdm that records each bar: its description, total and products."""

    made: list[dict[str, Any]]

    def __init__(self) -> None:
        self.made = []

    def tqdm(self, iterable: Any = None, **kwargs: Any) -> Any:
        bar = {"desc": kwargs.get("desc"), "total": kwargs.get("total"), "count": 0}
        self.made.append(bar)
        if iterable is not None:  # the operator's own progress=True bar over batches
            return iterable

        def update(count: int) -> None:
            bar["count"] += count

        return SimpleNamespace(update=update, close=lambda: None)


@pytest.mark.parametrize(
    ("func", "steps"),
    [("tiny", ["dense matrix"]), ("setup", ["top-1 eigenvalues", "trace", "spectral density"])],
)
def test_one_progress_bar_per_step_and_none_per_product(
    func: str,
    steps: list[str],
    user_file: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    bars = _Bars()
    fake = SimpleNamespace(tqdm=bars.tqdm, auto=SimpleNamespace(tqdm=bars.tqdm))
    monkeypatch.setitem(sys.modules, "tqdm", fake)
    monkeypatch.setitem(sys.modules, "tqdm.auto", fake.auto)
    args = ["analyze", f"{user_file}:{func}", "--top-k", "1", "--trace", "--density"]
    status, _, err = _run([*args, "--out", str(tmp_path)], capsys)
    assert status == 0, err
    report = json.loads((tmp_path / "report.json").read_text())
    assert [bar["desc"] for bar in bars.made] == steps  # none from the operator itself
    counts = {"top-1 eigenvalues": report["top"]["num_matvecs"]}
    counts.update({"dense matrix": 43, "trace": 90, "spectral density": 403})
    for bar in bars.made:
        assert bar["count"] == counts[bar["desc"]], bar
        assert bar["total"] in (None, bar["count"]), bar


def _dense_block(dense: torch.Tensor, layout: hesse.ParamLayout, names: list[str]) -> torch.Tensor:
    index = torch.cat([torch.arange(layout.numel)[layout.slice(n)] for n in names])
    return dense[index][:, index]


def test_per_layer_on_the_operator(
    user_file: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """N = 403: a row per module, its trace exact from the operator's diagonal and its top
    eigenvalue against the dense block; only the named analysis runs; one progress bar."""
    bars = _Bars()
    fake = SimpleNamespace(tqdm=bars.tqdm, auto=SimpleNamespace(tqdm=bars.tqdm))
    monkeypatch.setitem(sys.modules, "tqdm", fake)
    monkeypatch.setitem(sys.modules, "tqdm.auto", fake.auto)
    status, out, err = _run(
        ["analyze", f"{user_file}:setup", "--per-layer", "--out", str(tmp_path)], capsys
    )
    assert status == 0, err
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["analyses"] == ["per-layer"] and report["analyses_named"] is True
    assert not {"top", "trace", "density", "dense"} & set(report)
    section = report["per_layer"]
    assert section["by"] == "module" and section["source"] == "operator"
    ns = _user_module(user_file)
    model, criterion, data = ns["setup"]()
    op = hesse.HessianOperator(model, criterion, data)
    dense = op.to_dense()
    rows = section["rows"]
    assert [(r["name"], r["params"], r["numel"]) for r in rows] == [
        ("0", ["0.weight", "0.bias"], 280),  # above 256: Lanczos
        ("2", ["2.weight", "2.bias"], 123),  # dense block
    ]
    for row in rows:
        block = _dense_block(dense, op.layout, row["params"])
        assert row["trace"] == pytest.approx(block.trace().item(), rel=1e-10)
        assert row["trace_exact"] and row["trace_stderr"] == 0.0
        assert row["trace_per_numel"] == pytest.approx(row["trace"] / row["numel"])
        top = torch.linalg.eigvalsh(block)[-1].item()
        assert row["top_eigenvalue"] == pytest.approx(top, rel=1e-7) and row["converged"]
    assert section["total_trace"] == pytest.approx(dense.trace().item(), rel=1e-10)
    assert section["num_matvecs"] == sum(r["num_matvecs"] for r in rows)
    # One bar: the summary's products and the N of the exact diagonal.
    assert [bar["desc"] for bar in bars.made] == ["per-layer"]
    assert bars.made[0]["count"] == section["num_matvecs"] + 403
    # The table, as printed.
    assert "analyses    per-layer (named; " in out
    assert "per-layer   by module (exact traces from the diagonal; " in out
    table = out.split("per-layer   by module", 1)[1].splitlines()[1:5]
    header = "name numel trace ± stderr trace/numel top eigenvalue"
    assert table[0].split() == header.split()
    for line, row in zip(table[1:3], rows):
        assert line.split()[:3] == [row["name"], str(row["numel"]), f"{row['trace']:.6e}"]
        assert line.split()[-1] == f"{row['top_eigenvalue']:.6e}"
    assert table[3].split()[:3] == ["total", "403", f"{section['total_trace']:.6e}"]
    if _analyze.have_matplotlib():
        assert report["figures"] == ["per_layer.png"]
        assert (tmp_path / "per_layer.png").read_bytes()[:4] == b"\x89PNG"


def test_per_layer_per_parameter_from_the_dense_matrix(
    user_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """N = 43: the blocks come from the dense matrix, exactly, with the other analyses named;
    their traces add up to the trace."""
    args = ["analyze", f"{user_file}:tiny", "--per-layer", "--per-layer-by", "parameter"]
    status, out, err = _run([*args, "--trace", "--no-progress", "--out", str(tmp_path)], capsys)
    assert status == 0, err
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["analyses"] == ["trace", "per-layer"]
    section = report["per_layer"]
    assert section["by"] == "parameter" and section["source"] == "dense matrix"
    assert section["num_matvecs"] == 0  # no product beyond the dense matrix's 43
    ns = _user_module(user_file)
    x, y = ns["data"]()
    h = _flat_loss_hessian(ns["model"](4), nn.CrossEntropyLoss(reduction="sum"), x, y)
    layout = hesse.ParamLayout.from_module(ns["model"](4))
    assert [r["name"] for r in section["rows"]] == list(layout.names)
    for row in section["rows"]:
        block = _dense_block(h, layout, row["params"])
        assert row["trace"] == pytest.approx(block.trace().item(), rel=1e-10)
        assert row["top_eigenvalue"] == pytest.approx(
            torch.linalg.eigvalsh(block)[-1].item(), rel=1e-10
        )
    assert section["total_trace"] == pytest.approx(report["trace"]["estimate"], rel=1e-12)
    assert "per-layer   by parameter (exact: blocks of the dense matrix" in out
    if _analyze.have_matplotlib():
        assert report["figures"] == ["per_layer.png", "curvature_heatmap.png"]


def test_the_shipped_example_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = f"{ROOT / 'examples' / 'analyze_mlp.py'}:setup"
    status, out, err = _run(["analyze", target, "--out", str(tmp_path), "--top-k", "2"], capsys)
    assert status == 0, err
    assert "top-2 eigenvalues" in out and "1,540 of 1,540 parameters" in out


ERRORS = [
    (["analyze", "missing.py:setup"], 1, "no such file: missing.py"),
    (["analyze", "{file}"], 1, "expected FILE.py:FUNC"),
    (["analyze", "{file}:nope"], 1, "has no function 'nope' (functions defined there: data,"),
    (["analyze", "{file}:not_a_triple"], 1, "must return (model, criterion, data)"),
    (["analyze", "{file}:wrong_loss"], 1, "must return a loss second"),
    (["analyze", "{file}:raises"], 1, "raises() raised RuntimeError: boom (run again with"),
    (["analyze", "{file}:empty"], 1, ": data: "),
    (["analyze", "{file}:tiny", "--top-k", "0"], 2, "expected a positive integer, got '0'"),
    (["analyze", "{file}:tiny", "--trace-matvecs", "2"], 2, "at least 3, got '2'"),  # Hutch++
    (["analyze", "{file}:tiny", "--curvature", "kfac"], 2, "invalid choice: 'kfac'"),
    (["analyze", "{file}:tiny", "--params", "nothing*"], 1, ": params: "),
    (["analyze", "{file}:tiny", "--top-k", "50"], 1, "--top-k 50: must be smaller than N = 43"),
    (
        ["analyze", "{file}:tiny", "--per-layer-by", "module"],
        2,
        "--per-layer-by: needs --per-layer",
    ),
    (["analyze", "{file}:tiny", "--per-layer", "--per-layer-by", "layer"], 2, "invalid choice"),
    (["analyze", "{file}:tiny", "--seed", str(2**64)], 2, "--seed: expected an integer in"),
    (["analyze", "{file}:nan_data"], 1, "NaN or infinite entries: check the data"),
]


@pytest.mark.parametrize(("args", "status", "message"), ERRORS)
def test_mistakes_get_one_line_and_no_traceback(
    args: list[str],
    status: int,
    message: str,
    user_file: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = [a.format(file=user_file) for a in args] + ["--out", str(tmp_path / "out")]
    argv.append("--no-progress")
    if status == 2:  # argparse: usage line, then the error line
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 2
        err = capsys.readouterr().err
    else:
        code, _, err = _run(argv, capsys)
        assert code == 1
        assert len(err.strip().splitlines()) == 1, err
        assert err.startswith("hesse analyze: error: ")
    assert message in err
    assert "Traceback" not in err
    if status == 1 and "raised" not in err:  # hesse's own checks: no hint to look further
        assert "--traceback" not in err
    assert not (tmp_path / "out").exists()  # nothing written on failure


def test_traceback_flag_shows_the_error(user_file: Path, tmp_path: Path) -> None:
    with pytest.raises(CommandError) as info:
        main(["analyze", f"{user_file}:raises", "--traceback", "--out", str(tmp_path)])
    assert isinstance(info.value.__cause__, RuntimeError)


def test_help_shows_examples(capsys: pytest.CaptureFixture[str]) -> None:
    for command in (["--help"], ["demo", "--help"], ["analyze", "--help"]):
        with pytest.raises(SystemExit) as info:
            main(command)
        assert info.value.code == 0
        out = capsys.readouterr().out
        assert "examples:" in out
    assert "torchrun --nproc-per-node 2 -m hesse analyze" in out


def test_analyze_under_torchrun(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """2 CPU processes, each with half the samples: rank 0 alone prints and writes, and the
    eigenvalues are those of one process with all the samples."""
    target = f"{ROOT / 'examples' / 'analyze_mlp.py'}:setup"
    flags = ["--top-k", "2", "--trace", "--no-progress"]
    status, _, err = _run(["analyze", target, "--out", str(tmp_path / "one"), *flags], capsys)
    assert status == 0, err
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc-per-node", "2", "-m", "hesse", "analyze", target]
    command += ["--out", str(tmp_path / "two"), *flags]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # what torchrun sets; said to keep it quiet
    proc = subprocess.run(
        command, capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env
    )
    # Exit status 0 every time: the workers leave with os._exit once the report is written
    # (gloo + torch.func can abort at interpreter exit; benchmarks/stress_torchrun.py).
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "terminate called" not in proc.stderr
    assert proc.stdout.count("hesse analyze") == 1  # only rank 0 prints
    assert "512 samples over 2 ranks" in proc.stdout
    one = json.loads((tmp_path / "one" / "report.json").read_text())
    two = json.loads((tmp_path / "two" / "report.json").read_text())
    assert two["world_size"] == 2 and two["samples"] == one["samples"] == 512
    # float32 products summed in another order over 2 ranks: equal to rounding, not bitwise.
    torch.testing.assert_close(
        torch.tensor(two["top"]["eigenvalues"]),
        torch.tensor(one["top"]["eigenvalues"]),
        rtol=1e-4,
        atol=1e-5,
    )
    # The same seed draws the same probes: the trace agrees to rounding.
    assert two["trace"]["estimate"] == pytest.approx(one["trace"]["estimate"], rel=1e-4)


# ------------------------------------------------------------------ --out: checked, then filled

IMPORT_MARK = """
import pathlib

pathlib.Path(__file__).with_name("imported").touch()  # proves the file was imported


def setup():
    raise AssertionError("setup() should not run")
"""


@pytest.mark.parametrize("where", ["a file", "under a file", "unwritable"])
def test_bad_out_is_refused_before_the_users_file_is_imported(
    where: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    user = tmp_path / "marked.py"
    user.write_text(IMPORT_MARK)
    file = tmp_path / "results.txt"
    file.write_text("mine")
    out = {"a file": file, "under a file": file / "sub", "unwritable": tmp_path / "new"}[where]
    if where == "unwritable":  # as root, chmod would not stop the write: refuse it here

        def refuse(*args: Any, **kwargs: Any) -> str:
            raise PermissionError(13, "Permission denied")

        monkeypatch.setattr(_output, "tempfile", SimpleNamespace(mkdtemp=refuse))
    status, stdout, err = _run(["analyze", f"{user}:setup", "--out", str(out)], capsys)
    assert status == 1
    assert err.startswith(f"hesse analyze: error: --out {out}: ") and err.count("\n") == 1, err
    message = {"a file": "name a folder", "under a file": "is a file, not a folder"}
    assert message.get(where, "cannot write in") in err
    assert stdout == "" and "Traceback" not in err
    assert not (tmp_path / "imported").exists()  # no work done
    assert file.read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["marked.py", "results.txt"]


def test_trace_matvecs_below_3_is_refused_by_argparse(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    user = tmp_path / "marked.py"
    user.write_text(IMPORT_MARK)
    for value in ("2", "0", "x"):
        with pytest.raises(SystemExit) as info:
            main(["analyze", f"{user}:setup", "--trace", "--trace-matvecs", value])
        assert info.value.code == 2
        err = capsys.readouterr().err
        assert f"--trace-matvecs: expected an integer of at least 3, got '{value}'" in err
    assert not (tmp_path / "imported").exists()


def test_trace_with_3_products(
    user_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["analyze", f"{user_file}:setup", "--trace", "--trace-matvecs", "3", "--no-progress"]
    status, out, err = _run([*args, "--out", str(tmp_path)], capsys)
    assert status == 0, err
    trace = json.loads((tmp_path / "report.json").read_text())["trace"]
    assert trace["method"] == "hutch++" and trace["num_matvecs"] <= 3


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() if p.is_file() else b"" for p in folder.iterdir()}


def test_a_reused_out_holds_exactly_this_runs_outputs(
    user_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("the user's own")
    (out / "mine").mkdir()
    for stale in ("spectral_density.png", "hessian_heatmap.png", "report.json"):
        (out / stale).write_bytes(b"from an earlier run")
    args = ["analyze", f"{user_file}:tiny", "--top-k", "1", "--no-progress", "--out", str(out)]
    status, _, err = _run(args, capsys)  # no --density: no spectral_density.png this time
    assert status == 0, err
    report = json.loads((out / "report.json").read_text())
    figures = [Path(f).name for f in report["figures"]]
    assert figures == (["curvature_heatmap.png"] if _analyze.have_matplotlib() else [])
    assert set(_files(out)) == {"report.json", "notes.txt", "mine", *figures}
    assert (out / "notes.txt").read_text() == "the user's own"


def test_a_failing_figure_leaves_nothing_written(
    user_file: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pytest.importorskip("matplotlib")
    new, reused = tmp_path / "new" / "out", tmp_path / "reused"
    args = ["analyze", f"{user_file}:tiny", "--top-k", "1", "--no-progress", "--out"]
    assert _run([*args, str(reused)], capsys)[0] == 0
    before = _files(reused)

    def broken(*args: Any) -> None:
        raise RuntimeError("no room for the colour bar")

    monkeypatch.setattr(_analyze, "hessian_heatmap", broken)
    for out in (new, reused):  # --density: the density is drawn before the heat map fails
        status, _, err = _run([*args, str(out), "--density"], capsys)
        assert status == 1
        assert err.startswith("hesse analyze: error: RuntimeError: no room for the colour bar")
    assert not (tmp_path / "new").exists()
    assert _files(reused) == before  # the earlier run's report and heat map, untouched


def test_moving_in_is_all_or_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An OSError while the files are moved in puts every file back where it was."""
    (tmp_path / "report.json").write_text("old report")
    (tmp_path / "spectral_density.png").write_text("old density")
    (tmp_path / "notes.txt").write_text("the user's own")
    before = _files(tmp_path)
    replace = os.replace

    def failing(src: Any, dst: Any) -> None:
        if Path(dst) == tmp_path / "report.json" and Path(src).parent.name != ".previous":
            raise OSError(28, "No space left on device")  # this run's report, not the restore
        replace(src, dst)

    monkeypatch.setattr(_output.os, "replace", failing)
    with (
        pytest.raises(CommandError, match="could not write the results"),
        _output.staged(tmp_path) as folder,
    ):
        (folder / "curvature_heatmap.png").write_text("new heat map")
        (folder / "report.json").write_text("new report")
    assert _files(tmp_path) == before
