"""The ``hesse`` command line.

``hesse demo`` runs the built-in example offline, in seconds; ``hesse analyze FILE.py:FUNC``
analyses the curvature of the model, loss and data that ``FUNC()`` returns. Mistakes a user can
fix are reported in one line with a non-zero exit status, never as a traceback. Under
``torchrun`` the process leaves with `os._exit` once its results are written (see `main`).
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

import hesse
from hesse.cli import _analyze, _demo
from hesse.cli._output import CommandError

__all__ = ["main"]

ANALYZE_EXAMPLES = """\
FUNC() takes no arguments and returns (model, criterion, data): data is one (inputs, target)
pair or a re-iterable of them such as a DataLoader.

analyses: with none of --top-k, --bottom-k, --trace, --density, --per-layer named, the top-5
eigenvalues, the trace and the spectral density are computed. Naming any of them runs only the
ones named (--density alone: no eigenvalues, no trace); the report says which ran. --per-layer
is never a default (it costs the exact diagonal and a dense block or a Lanczos run per layer):
add it, with the others you want, e.g. --per-layer --top-k 5 --trace.

exact or estimated: with N <= 256 parameters the dense matrix is built once (N products) and
the eigenvalues, the trace, the density and the per-layer blocks are exact. Above that the
eigenvalues come from Lanczos, the trace from Hutch++ (exact if --trace-matvecs >= N), the
density from SLQ (exact up to N = 480, where its 8 x 60 products cover N), and the per-layer
traces from the operator's exact diagonal, with each layer's top eigenvalue exact from its
dense block up to 256 entries and by Lanczos above.

examples:
  hesse analyze examples/analyze_mlp.py:setup
  hesse analyze examples/analyze_mlp.py:setup --top-k 10 --bottom-k 3 --out runs/mlp
  hesse analyze examples/analyze_mlp.py:setup --curvature ggn --params '0.*' --trace
  hesse analyze examples/analyze_mlp.py:setup --per-layer --top-k 5
  torchrun --nproc-per-node 2 -m hesse analyze examples/analyze_mlp.py:setup

Under torchrun every rank calls FUNC (after the process group is up, so FUNC can give each
rank its shard of the data); products are summed over the ranks and only rank 0 writes.
"""


# Each analysis flag's help ends with what naming it does to the defaults.
ONLY = "; naming any analysis runs only those named (none named: top-5, trace, density)"


def _at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer of at least ``minimum``."""
    wanted = "a positive integer" if minimum == 1 else f"an integer of at least {minimum}"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = minimum - 1
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected {wanted}, got {text!r}")
        return value

    return parse


_positive = _at_least(1)


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def _seed(text: str) -> int:
    """A seed torch's generators take: an integer in [-2**63, 2**64)."""
    value = _integer(text)
    if not -(2**63) <= value < 2**64:
        raise argparse.ArgumentTypeError(f"expected an integer in [-2**63, 2**64), got {text}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hesse",
        description="Second-order information about PyTorch models.",
        epilog="examples:\n  hesse demo\n  hesse analyze examples/analyze_mlp.py:setup",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"hesse {hesse.__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser(
        "demo",
        help="run the built-in example (offline, a few seconds)",
        description="The seed README's example, then a small network's loss Hessian: shapes, "
        "eigenvalues (dense and Lanczos), sharpness, trace with its standard error and a "
        "spectral density; writes OUT/report.json and PNG figures.",
        epilog="examples:\n  hesse demo\n  hesse demo --out /tmp/hesse-demo",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    demo.add_argument(
        "--out", default="hesse-demo", help="folder for report.json and PNGs (default: %(default)s)"
    )

    analyze = sub.add_parser(
        "analyze",
        help="eigenvalues, trace and spectral density of your own model's curvature",
        description="Import FUNC from FILE.py, build the curvature operator of the model, loss "
        "and data it returns, and report its extreme eigenvalues, trace and spectral density "
        "(and, with --per-layer, each layer's trace and top eigenvalue); writes "
        "OUT/report.json and PNG figures.",
        epilog=ANALYZE_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    analyze.add_argument("target", metavar="FILE.py:FUNC", help="where to find FUNC")
    analyze.add_argument(
        "--out", default="hesse-analysis", help="folder for the results (default: %(default)s)"
    )
    analyze.add_argument(
        "--params",
        nargs="+",
        metavar="PATTERN",
        help="parameters to include, by name or glob ('0.weight', '*.bias'); default: all "
        "trainable parameters",
    )
    analyze.add_argument(
        "--top-k", type=_positive, default=0, metavar="K", help="the K largest eigenvalues" + ONLY
    )
    analyze.add_argument(
        "--bottom-k",
        type=_positive,
        default=0,
        metavar="K",
        help="the K smallest eigenvalues" + ONLY,
    )
    analyze.add_argument(
        "--trace",
        action="store_true",
        help="the trace: exact at N <= 256, else a Hutch++ estimate" + ONLY,
    )
    analyze.add_argument(
        "--density",
        action="store_true",
        help="spectral density plot: exact at N <= 480, else SLQ" + ONLY,
    )
    analyze.add_argument(
        "--per-layer",
        action="store_true",
        help="per layer (weight and bias together): trace, trace per entry, top eigenvalue, "
        "and per_layer.png; never a default (a dense block or a Lanczos run per layer)" + ONLY,
    )
    analyze.add_argument(
        "--per-layer-by",
        choices=["module", "parameter"],
        default=None,
        help="with --per-layer: one row per module (default) or per parameter tensor",
    )
    analyze.add_argument(
        "--trace-matvecs",
        type=_at_least(3),  # Hutch++ spends a third on each of its three parts
        default=90,
        metavar="M",
        help="products spent on the Hutch++ trace, at least 3 (default: %(default)s); at "
        "N <= 256, or M >= N, the trace is exact from N products",
    )
    analyze.add_argument(
        "--curvature",
        choices=sorted(_analyze.OPERATORS),
        default="hessian",
        help="which matrix: the loss Hessian, the generalised Gauss-Newton or the empirical "
        "Fisher (default: %(default)s)",
    )
    analyze.add_argument(
        "--seed", type=_seed, default=0, help="seed of the random vectors (default: 0)"
    )
    analyze.add_argument("--no-progress", action="store_true", help="no progress bars")
    analyze.add_argument(
        "--traceback", action="store_true", help="show the full traceback of an error"
    )
    analyze.set_defaults(subparser=analyze)  # for errors about combinations of flags
    return parser


def _run(args: argparse.Namespace) -> int:
    if args.command == "demo":
        return _demo.run(Path(args.out))
    return _analyze.run(
        _analyze.Request(
            target=args.target,
            out=Path(args.out),
            params=_analyze.parse_params(args.params),
            top_k=args.top_k,
            bottom_k=args.bottom_k,
            trace=args.trace,
            density=args.density,
            per_layer=args.per_layer,
            per_layer_by=args.per_layer_by or "module",
            curvature=args.curvature,
            seed=args.seed,
            trace_matvecs=args.trace_matvecs,
            progress=not args.no_progress,
            traceback=args.traceback,
        )
    )


def _under_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _status(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except CommandError as err:
        if getattr(args, "traceback", False):
            raise
        rank = os.environ.get("RANK") if _under_torchrun() else None
        where = f" [rank {rank}]" if rank is not None else ""
        print(f"hesse {args.command}{where}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"hesse {args.command}: interrupted", file=sys.stderr)
        return 130


def _leave(status: int) -> NoReturn:
    """End a torchrun worker now, skipping the interpreter's teardown.

    A gloo process that ran torch.func code can abort at interpreter exit ("terminate called
    without an active exception", SIGABRT) after its work is done, and torchrun then reports a
    failed job. By now the results are written and the process group is destroyed.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``hesse`` console script; returns the exit status.

    Under ``torchrun`` (``WORLD_SIZE`` > 1) it does not return: the process leaves with
    `os._exit` and the exit status once output is flushed, also after an error.
    """
    args = _parser().parse_args(argv)
    if args.command == "analyze" and args.per_layer_by and not args.per_layer:
        args.subparser.error("argument --per-layer-by: needs --per-layer")
    if not _under_torchrun():
        return _status(args)
    try:
        status = _status(args)
    except BaseException:  # --traceback, or a bug: show it, then leave all the same
        traceback.print_exc()
        status = 1
    _leave(status)


if __name__ == "__main__":
    sys.exit(main())
