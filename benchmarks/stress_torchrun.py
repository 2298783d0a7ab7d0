"""Stress test (not a unit test): does ``torchrun -m hesse analyze`` exit 0 every time?

gloo processes that ran torch.func code can abort at interpreter exit after their work is done
("terminate called without an active exception", SIGABRT; DESIGN §4), and torchrun then exits
1 although the report was written. This script launches the command line, and the example
``examples/distributed_spectrum.py``, under torchrun with 2 CPU processes ``--runs`` times each,
checks each launch's exit status and output, prints a table of failures and exits 1 on any.

    python benchmarks/stress_torchrun.py              # 20 launches of each
    python benchmarks/stress_torchrun.py --runs 5 --skip-example
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node"]


def _cli(out: Path, nproc: int) -> tuple[list[str], Path]:
    target = f"{ROOT / 'examples' / 'analyze_mlp.py'}:setup"
    command = [*TORCHRUN, str(nproc), "-m", "hesse", "analyze", target, "--top-k", "2"]
    return [*command, "--no-progress", "--out", str(out)], out / "report.json"


def _example(out: Path, nproc: int) -> tuple[list[str], Path]:
    png = out / "spectrum.png"
    script = str(ROOT / "examples" / "distributed_spectrum.py")
    return [*TORCHRUN, str(nproc), script, "--samples", "512", "--out", str(png)], png


def _check(kind: str, command: list[str], written: Path, timeout: float) -> str | None:
    """Run one launch; None when it exited 0 with its output, else what went wrong."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    try:
        proc = subprocess.run(
            command, capture_output=True, text=True, timeout=timeout, cwd=written.parent, env=env
        )
    except subprocess.TimeoutExpired:
        return f"timed out after {timeout:.0f} s"
    problems = []
    if proc.returncode != 0:
        problems.append(f"exit {proc.returncode}")
    if "terminate called" in proc.stderr or "SIGABRT" in proc.stderr:
        problems.append("abort at exit")
    if kind == "cli":
        try:
            json.loads(written.read_text())["top"]["eigenvalues"]
        except (OSError, ValueError, KeyError):
            problems.append("no report.json")
    elif "top-3 eigenvalues" not in proc.stdout:
        problems.append("no eigenvalues printed")
    elif "wrote " in proc.stdout and not written.is_file():
        problems.append("no PNG")
    return ", ".join(problems) or None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20, help="launches of each (default 20)")
    parser.add_argument("--nproc", type=int, default=2, help="processes per launch (default 2)")
    parser.add_argument("--timeout", type=float, default=300, help="seconds per launch")
    parser.add_argument("--skip-example", action="store_true", help="only the command line")
    args = parser.parse_args()

    kinds = {"cli": _cli} if args.skip_example else {"cli": _cli, "example": _example}
    failures: list[tuple[str, int, str]] = []
    with tempfile.TemporaryDirectory(prefix="hesse-stress-") as tmp:
        for kind, build in kinds.items():
            start = time.perf_counter()
            for i in range(1, args.runs + 1):
                out = Path(tmp) / f"{kind}-{i}"
                out.mkdir()
                command, written = build(out, args.nproc)
                problem = _check(kind, command, written, args.timeout)
                if problem is not None:
                    failures.append((kind, i, problem))
                mark = "." if problem is None else "F"
                print(mark, end="" if i < args.runs else "\n", flush=True)
            bad = sum(1 for k, _, _ in failures if k == kind)
            seconds = time.perf_counter() - start
            print(
                f"{kind:8s} {bad} of {args.runs} launches failed "
                f"({seconds / args.runs:.1f} s per launch)",
                flush=True,
            )
    if failures:
        print(f"\n{'what':8s} {'run':>4s}  problem")
        for kind, i, problem in failures:
            print(f"{kind:8s} {i:4d}  {problem}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
