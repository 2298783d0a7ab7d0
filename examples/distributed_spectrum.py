"""The top of a model's Hessian spectrum, data-parallel over torch.distributed.

CPU (gloo), 2 processes on one machine:

    torchrun --standalone --nproc-per-node 2 examples/distributed_spectrum.py

GPUs (NCCL, one GPU per rank):

    torchrun --standalone --nproc-per-node 4 examples/distributed_spectrum.py --cuda

Each rank builds the same model and takes its shard of the dataset with a DistributedSampler;
hesse's operators all-reduce every product, so every rank computes the same eigenvalues, trace
and density as one process over the whole dataset would. Only rank 0 prints and writes files.
Each rank leaves with ``os._exit`` once its work is done (see the end of this file).
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import hesse


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cuda", action="store_true", help="NCCL, one GPU per rank")
    parser.add_argument("--samples", type=int, default=2048)
    parser.add_argument("--out", default="distributed-spectrum.png")
    args = parser.parse_args()

    dist.init_process_group("nccl" if args.cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if args.cuda else "cpu"
    if not args.cuda:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))

    torch.manual_seed(0)  # the same model and the same dataset on every rank
    model = nn.Sequential(nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 10)).to(device)
    x = torch.randn(args.samples, 32)
    y = (x[:, :10] + 0.5 * torch.randn(args.samples, 10)).argmax(1)
    dataset = TensorDataset(x.to(device), y.to(device))
    sampler = DistributedSampler(dataset, shuffle=False)  # this rank's shard
    loader = DataLoader(dataset, batch_size=256, sampler=sampler)

    op = hesse.HessianOperator(model, nn.CrossEntropyLoss(), loader)
    top = hesse.eigsh(op, k=3, which="LA")  # seed=None: all ranks share rank 0's seed
    trace = hesse.trace(op, num_matvecs=60)
    density = hesse.spectral_density(op, num_probes=4, lanczos_steps=40)
    if rank == 0:
        print(f"{world} ranks, {op.num_samples} samples, N = {op.shape[0]}")
        print(f"top-3 eigenvalues {top.eigenvalues.tolist()} ({top.num_matvecs} products)")
        print(f"trace {trace.estimate.item():.6g} ± {trace.stderr.item():.2g}")
        try:
            density.plot(args.out)
            print(f"wrote {args.out}")
        except ImportError:
            print("(pip install 'hesse[plot]' for the density plot)")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    # gloo processes that ran torch.func code can abort at interpreter exit, after their work
    # is done ("terminate called without an active exception"), and torchrun would report a
    # failed job: flush and leave without the interpreter's teardown, with the right status.
    status = 1
    try:
        main()
        status = 0
    except SystemExit as exit_:  # --help, a bad flag
        status = exit_.code if isinstance(exit_.code, int) else 1
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
