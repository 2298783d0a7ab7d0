"""The ``hesse`` command line: ``hesse demo`` runs the built-in example offline, in seconds."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

import torch
from torch import Tensor, nn

import hesse

__all__ = ["main"]


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


def _seed_example() -> None:
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
    print(f"model_sharpness                      -> {_fmt(hesse.model_sharpness(model, (x, y)))}")
    print(
        "loss_sharpness                       -> "
        f"{hesse.loss_sharpness(model, criterion, (x, y), target).item():.6g}"
    )


def _network_example() -> None:
    print("\n== A small MLP (8-16-16-3, Tanh) trained briefly on generated 3-class data")
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
    loss = criterion(model(x), target).item()
    start = time.perf_counter()
    h = hesse.loss_hessian_matrix(model, criterion, x, target)
    elapsed = time.perf_counter() - start
    eigenvalues = torch.linalg.eigvalsh(h.double())
    print(f"parameters N = {h.shape[0]}, training loss {loss:.4f}")
    print(f"loss_hessian_matrix                  -> {tuple(h.shape)} in {elapsed * 1e3:.0f} ms")
    print(f"top-5 eigenvalues                    {_fmt(eigenvalues[-5:].flip(0))}")
    print(f"bottom-3 eigenvalues                 {_fmt(eigenvalues[:3])}")
    print(f"sharpness (largest |eigenvalue|)     {eigenvalues.abs().max().item():.6g}")
    diag = hesse.loss_hessian_diagonal(model, criterion, x, target)
    print(f"trace (sum of the exact diagonal)    {diag.sum().item():.6g}")
    blocks = hesse.loss_hessian_dict(model, criterion, x, target, diagonal_only=True)
    for name, block in blocks.items():
        n = hesse.ParamLayout.from_module(model, [name]).numel
        sharp = torch.linalg.eigvalsh(block[name].reshape(n, n).double()).abs().max()
        print(f"  block {name:<10} sharpness {sharp.item():.4g}")


def _demo(_: argparse.Namespace) -> int:
    torch.set_printoptions(precision=4)
    _seed_example()
    _network_example()
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hesse",
        description="Second-order information about PyTorch models.",
        epilog="Example: hesse demo",
    )
    parser.add_argument("--version", action="version", version=f"hesse {hesse.__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = sub.add_parser(
        "demo",
        help="run the built-in example (offline, a few seconds)",
        description="The seed README's example, then a small network's loss Hessian: shapes, "
        "eigenvalues, sharpness and trace.",
        epilog="Example: hesse demo",
    )
    demo.set_defaults(run=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``hesse`` console script."""
    args = _parser().parse_args(argv)
    return int(args.run(args))


if __name__ == "__main__":
    sys.exit(main())
