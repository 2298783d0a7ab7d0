"""``hesse demo``: the seed README's example and a small trained network, offline, in seconds."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

import hesse
from hesse.cli._figures import NO_MATPLOTLIB, Drawing, have_matplotlib, hessian_heatmap
from hesse.cli._output import check, staged

__all__ = ["MimoModel", "run", "trained_classifier"]


class MimoModel(nn.Module):
    """The seed README's multi-input, multi-output model: ``[tr(AᵀA) x, tr(BᵀB) y]``."""

    def __init__(self, m: int) -> None:
        super().__init__()
        self.A = nn.Parameter(torch.randn(m, m))
        self.B = nn.Parameter(torch.randn(m, m))

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        row_1 = torch.trace(self.A.T @ self.A) * x
        row_2 = torch.trace(self.B.T @ self.B) * y
        return torch.hstack((row_1, row_2))


def _fmt(t: Tensor, digits: int = 4) -> str:
    return "[" + ", ".join(f"{v:.{digits}g}" for v in t.reshape(-1).tolist()) + "]"


def _seed_example(report: dict[str, Any]) -> None:
    print("== The seed README's example: MimoModel(2), inputs (x, y) of shape (2, 2)")
    torch.manual_seed(0)
    model = MimoModel(2)
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    y = -1.0 * x
    h = hesse.model_hessian_matrix(model=model, inputs=(x, y))
    print(f"model_hessian_matrix                 -> {tuple(h.shape)}  (batch, outputs, N, N)")
    h_a = hesse.model_hessian_matrix(model=model, inputs=(x, y), params=["A"])
    print(f"model_hessian_matrix(params=['A'])   -> {tuple(h_a.shape)}")
    print(f"  sample 0, output 0 w.r.t. A (= 2·x[0,0]·I): diagonal {_fmt(h_a[0, 0].diagonal())}")
    criterion = nn.MSELoss()
    target = torch.randn(2, 4)
    lh = hesse.loss_hessian_matrix(model=model, criterion=criterion, inputs=(x, y), target=target)
    print(f"loss_hessian_matrix                  -> {tuple(lh.shape)}")
    print(f"  diagonal                           {_fmt(lh.diagonal())}")
    model_sharpness = hesse.model_sharpness(model, (x, y))
    print(f"model_sharpness (batch, outputs)     -> {_fmt(model_sharpness)}")
    loss_sharpness = hesse.loss_sharpness(model, criterion, (x, y), target).item()
    print(f"loss_sharpness                       -> {loss_sharpness:.6g}")
    report["seed_example"] = {
        "model_hessian_shape": list(h.shape),
        "model_hessian_shape_params_A": list(h_a.shape),
        "loss_hessian_shape": list(lh.shape),
        "loss_hessian_diagonal": lh.diagonal().tolist(),
        "model_sharpness": model_sharpness.tolist(),
        "loss_sharpness": loss_sharpness,
    }


def trained_classifier() -> tuple[nn.Module, nn.Module, Tensor, Tensor]:
    """The demo's network: an MLP 8-16-16-3 (Tanh, N = 467) trained by 100 Adam steps on 256
    generated 3-class samples; returns ``(model, criterion, x, target)``. Deterministic."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 8, generator=g)
    target = (x[:, :3] + 0.3 * torch.randn(256, 3, generator=g)).argmax(1)
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3)
    )
    criterion = nn.CrossEntropyLoss()
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    for _ in range(100):
        opt.zero_grad()
        criterion(model(x), target).backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    return model, criterion, x, target


def _network_example(report: dict[str, Any]) -> list[Drawing]:
    print("\n== A small MLP (8-16-16-3, Tanh) trained briefly on generated 3-class data")
    model, criterion, x, target = trained_classifier()
    loss = criterion(model(x), target).item()

    start = time.perf_counter()
    h = hesse.loss_hessian_matrix(model, criterion, x, target)
    elapsed = time.perf_counter() - start
    print(f"parameters N = {h.shape[0]}, training loss {loss:.4f}")
    print(f"loss_hessian_matrix                  -> {tuple(h.shape)} in {elapsed * 1e3:.0f} ms")

    # The same curvature matrix-free, over a DataLoader of 4 batches.
    loader = DataLoader(TensorDataset(x, target), batch_size=64)
    op = hesse.HessianOperator(model, criterion, loader)
    top = hesse.eigsh(op, k=5, which="LA", seed=0)
    largest_first = torch.argsort(top.eigenvalues, descending=True)  # as the dense ones below
    top_values, top_residuals = top.eigenvalues[largest_first], top.residuals[largest_first]
    dense_eigenvalues = torch.linalg.eigvalsh(h.double())
    sharp = hesse.sharpness(op, seed=0).item()
    tr = hesse.trace(op, num_matvecs=90, method="hutch++", seed=0)
    exact_trace = hesse.loss_hessian_diagonal(model, criterion, x, target).sum().item()
    print(f"HessianOperator over a DataLoader    -> {op}")
    print(
        f"top-5 eigenvalues (Lanczos)          {_fmt(top_values)}  "
        f"({top.num_matvecs} products, max residual {top.residuals.max().item():.1e})"
    )
    print(f"top-5 eigenvalues (dense eigvalsh)   {_fmt(dense_eigenvalues[-5:].flip(0))}")
    print(f"bottom-3 eigenvalues (dense)         {_fmt(dense_eigenvalues[:3])}")
    print(f"sharpness (largest |eigenvalue|)     {sharp:.6g}")
    print(
        f"trace (Hutch++, 90 products)         {tr.estimate.item():.6g} ± "
        f"{tr.stderr.item():.2g}   (exact: {exact_trace:.6g})"
    )
    density = hesse.spectral_density(op, num_probes=8, lanczos_steps=40, seed=0)
    report["network"] = {
        "parameters": h.shape[0],
        "training_loss": loss,
        "dense_hessian_ms": elapsed * 1e3,
        "top_eigenvalues": top_values.tolist(),
        "top_residuals": top_residuals.tolist(),
        "top_num_matvecs": top.num_matvecs,
        "dense_top_eigenvalues": dense_eigenvalues[-5:].flip(0).tolist(),
        "dense_bottom_eigenvalues": dense_eigenvalues[:3].tolist(),
        "sharpness": sharp,
        "trace_estimate": tr.estimate.item(),
        "trace_stderr": tr.stderr.item(),
        "trace_num_matvecs": tr.num_matvecs,
        "trace_exact": exact_trace,
        "density_nodes_min": density.nodes.min().item(),
        "density_nodes_max": density.nodes.max().item(),
    }
    layout = hesse.ParamLayout.from_module(model)
    title = "Loss Hessian, blocks per parameter"
    return [
        ("spectral_density.png", density.plot),
        ("hessian_heatmap.png", lambda path: hessian_heatmap(h, layout, path, title)),
    ]


def run(out: Path) -> int:
    """Print the demo and write ``out/report.json`` and its figures.

    ``out`` is checked before any work and filled all at once (`hesse.cli._output`).
    """
    check(out)
    torch.set_printoptions(precision=4)
    report: dict[str, Any] = {"hesse": hesse.__version__, "torch": torch.__version__}
    _seed_example(report)
    figures = _network_example(report)
    if not have_matplotlib():
        print(NO_MATPLOTLIB)
        figures = []
    with staged(out) as folder:
        for name, draw in figures:
            draw(folder / name)
        (folder / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    written = [out / "report.json", *(out / name for name, _ in figures)]
    print("\nwrote " + ", ".join(str(p) for p in written))
    return 0
