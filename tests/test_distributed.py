"""Data parallelism: 2 CPU processes (gloo, loopback) against one process on the union."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import _dist_worker as worker
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import assert_close
from torch import nn

import hesse

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    root = tmp_path_factory.mktemp("dist")
    store = root / "store"
    mp.spawn(worker.main, args=(2, str(store), str(root)), nprocs=2, join=True)
    errors = sorted(root.glob("rank*.err"))
    assert not errors, errors[0].read_text()
    return [torch.load(root / f"rank{r}.pt", weights_only=False) for r in range(2)]


@pytest.fixture(scope="module")
def union() -> tuple[hesse.HessianOperator, nn.Module, Any, Any]:
    model, x, y = worker.problem()
    return hesse.HessianOperator(model, nn.CrossEntropyLoss(), (x, y)), model, x, y


def test_every_rank_gets_the_single_process_result(ranks: list[dict[str, Any]], union: Any) -> None:
    op, model, x, y = union
    v = worker.vectors(op.shape[0])
    dense = op.to_dense()
    for r in ranks:
        assert r["num_samples"] == 16
        assert_close(r["matmat"], dense @ v)
        assert_close(r["matmat_after"], dense @ v)
        assert r["block_path"] == ranks[0]["block_path"] in ("block", "singles")
        assert_close(r["matvec"], dense @ v[:, 0])
        assert_close(r["dense"], dense)
        assert_close(r["diagonal"], dense.diagonal())
        assert_close(r["eigsh"], torch.linalg.eigvalsh(dense)[-2:], rtol=1e-7)  # eigsh: 1.5e-8
        ce = nn.CrossEntropyLoss()
        ggn = hesse.GGNOperator(model, ce, (x, y))
        assert_close(r["ggn"], ggn @ v)
        assert_close(r["ggn_diagonal"], ggn.diagonal())
        damped = ggn.to_dense() + 0.1 * torch.eye(ggn.shape[0], dtype=v.dtype)
        assert_close(r["solve"], torch.linalg.solve(damped, v), rtol=1e-5)  # CG: tol 1e-6
        assert_close(r["kfac"], hesse.KFACOperator(model, ce, (x, y)).to_dense())
        assert_close(r["ekfac"], hesse.EKFACOperator(model, ce, (x, y)).to_dense())
        assert_close(r["fisher"], hesse.EmpiricalFisherOperator(model, ce, (x, y)) @ v)


def test_ranks_agree_on_random_probes(ranks: list[dict[str, Any]], union: Any) -> None:
    op = union[0]
    (e0, s0), (e1, s1) = ranks[0]["trace"], ranks[1]["trace"]
    assert torch.equal(e0, e1) and torch.equal(s0, s1)  # the same probes on both ranks
    true = op.to_dense().trace()
    assert abs(float(e0 - true)) < 4 * float(s0) + 1e-12


def test_local_operator_and_errors(ranks: list[dict[str, Any]]) -> None:
    assert [r["local"] for r in ranks] == [12, 4]
    for r in ranks:  # every rank fails alike, naming the culprit
        assert "data: rank(s) [1] of 2 hold no samples" in r["empty"]
        assert "model: the ranks disagree on the selected parameters" in r["mismatch"]
        assert "rank 1: N = 75" in r["mismatch"]
        assert "but other parameter names or shapes" in r["same_n"]
        assert "rank 1: N = 75" in r["kfac_mismatch"]


def test_without_a_process_group() -> None:
    model, x, y = worker.problem()
    with pytest.raises(ValueError, match="distributed: True needs torch.distributed"):
        hesse.HessianOperator(model, nn.CrossEntropyLoss(), (x, y), distributed=True)
    with pytest.raises(ValueError, match="process_group: given, but torch.distributed"):
        hesse.HessianOperator(model, nn.CrossEntropyLoss(), (x, y), process_group=object())


def test_torchrun_example(tmp_path: Path) -> None:
    """The README's command, on 2 CPU processes (gloo, loopback rendezvous)."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    png = tmp_path / "spectrum.png"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        str(root / "examples" / "distributed_spectrum.py"),
        "--samples",
        "512",
        "--out",
        str(png),
    ]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "2 ranks, 512 samples, N = 2762" in proc.stdout
    assert proc.stdout.count("top-3 eigenvalues") == 1  # only rank 0 prints
    pytest.importorskip("matplotlib")
    assert png.read_bytes()[:4] == b"\x89PNG"
