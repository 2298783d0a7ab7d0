"""Shared measurement harness for the benchmark scripts.

Timing: one child process runs the methods of a table round-robin (each round runs every method
once), so that a drift of the machine's speed hits all methods alike. Memory: one child process
per method runs it once; its peak-RSS growth is its own. A script registers its methods as
``{spec: factory}`` where ``factory()`` prepares a problem and returns the call to time.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "benchmarks.md"
THREADS = 2
# A script's `--device cuda` times its tables on a GPU; children read it from the environment.
DEVICE = torch.device(os.environ.get("HESSE_BENCH_DEVICE", "cpu"))

Specs = dict[str, Callable[[], Callable[[], Any]]]


def synced(run: Callable[[], Any]) -> Callable[[], Any]:
    """On a GPU, a timed call ends when its kernels have finished."""
    if DEVICE.type != "cuda":
        return run

    def call() -> Any:
        out = run()
        torch.cuda.synchronize()
        return out

    return call


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def mib(b: float) -> str:
    return f"{b / 2**20:,.1f} MiB" if b < 10 * 2**20 else f"{b / 2**20:,.0f} MiB"


def _nbytes(out: Any) -> int:
    return out.numel() * out.element_size() if isinstance(out, torch.Tensor) else 0


def _warm(specs: Specs, warm: Sequence[str]) -> None:
    for spec in warm:
        specs[spec]()()


def child_memory(specs: Specs, warm: Sequence[str], spec: str) -> dict[str, Any]:
    torch.set_num_threads(THREADS)
    _warm(specs, warm)
    run = specs[spec]()
    before = peak_rss()
    start = time.perf_counter()
    out = run()
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "peak_growth": peak_rss() - before, "output_bytes": _nbytes(out)}


def child_times(
    specs: Specs, warm: Sequence[str], names: list[str], rounds: int
) -> dict[str, list[float]]:
    torch.set_num_threads(THREADS)
    _warm(specs, warm)
    runs = {name: specs[name]() for name in names}
    for run in runs.values():
        run()  # first call of each method: lazy initialisation, not timed
    times: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(rounds):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return times


def _child(script: str, args: list[str], env_extra: dict[str, str] | None = None) -> Any:
    env = {**os.environ, "OMP_NUM_THREADS": str(THREADS), **(env_extra or {})}
    proc = subprocess.run([sys.executable, script, *args], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        return {"error": last[:300]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure_memory(script: str, spec: str, mem_limit_gb: float | None = None) -> dict[str, Any]:
    env = {"HESSE_BENCH_MEM_LIMIT_GB": str(mem_limit_gb)} if mem_limit_gb else None
    result = _child(script, ["--child-memory", spec], env)
    if "error" in result:
        print(f"  memory {spec}: FAILED ({result['error'][:160]})", flush=True)
    else:
        print(
            f"  memory {spec}: {result['seconds']:.2f} s, peak growth "
            f"{mib(result['peak_growth'])}, output {mib(result['output_bytes'])}",
            flush=True,
        )
    return result


def measure_times(script: str, names: list[str], rounds: int) -> dict[str, dict[str, Any]]:
    result = _child(script, ["--child-times", ",".join(names), "--rounds", str(rounds)])
    if "error" in result:
        print(f"  times {names}: FAILED ({result['error'][:160]})", flush=True)
        return {name: {"error": result["error"]} for name in names}
    out = {}
    for name, times in result.items():
        out[name] = {"times": times, "median_s": statistics.median(times)}
        print(f"  time {name}: {', '.join(f'{t:.4f}' for t in times)} s", flush=True)
    return out


def ratio(results: dict[str, dict[str, Any]], spec: str, ref: str) -> str:
    """Median ratio spec / ref, with the range of the per-round ratios."""
    a, b = results.get(spec, {}), results.get(ref, {})
    if "median_s" not in a or "median_s" not in b:
        return "–"
    text = f"{a['median_s'] / b['median_s']:.2f}×"
    if "times" in a and "times" in b and len(a["times"]) == len(b["times"]):
        per_round = [x / y for x, y in zip(a["times"], b["times"])]
        text += f" ({min(per_round):.2f}–{max(per_round):.2f})"
    return text


def seconds(results: dict[str, dict[str, Any]], spec: str, unit: str = "s") -> str:
    r = results.get(spec, {})
    if "error" in r:
        return "failed: " + r["error"][:80]
    if "median_s" not in r:
        return "–"
    value = r["median_s"]
    return f"{value * 1e3:.1f} ms" if unit == "ms" else f"{value:.2f} s"


def write_docs(section: str, table: str) -> None:
    """Replace the block between ``<!-- section:start -->`` and ``<!-- section:end -->``."""
    start, end = f"<!-- {section}:start -->", f"<!-- {section}:end -->"
    text = DOCS.read_text()
    if start not in text:
        text += f"\n{start}\n{end}\n"
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    DOCS.write_text(f"{head}{start}\n{table}\n{end}{tail}")
    print(f"\nwrote {DOCS.relative_to(ROOT)} ({section})")


def child_main(specs: Specs, warm: Sequence[str]) -> bool:
    """Handle the child-process flags; True when this process was a child."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--child-memory")
    parser.add_argument("--child-times")
    parser.add_argument("--rounds", type=int, default=5)
    args, _ = parser.parse_known_args()
    if args.child_memory:
        limit = os.environ.get("HESSE_BENCH_MEM_LIMIT_GB")
        if limit:
            cap = int(float(limit) * 2**30)
            resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
        print(json.dumps(child_memory(specs, warm, args.child_memory)))
        return True
    if args.child_times:
        print(json.dumps(child_times(specs, warm, args.child_times.split(","), args.rounds)))
        return True
    return False
