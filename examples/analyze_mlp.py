"""A setup function for ``hesse analyze``: a small classifier, trained briefly, and its data.

    hesse analyze examples/analyze_mlp.py:setup
    torchrun --nproc-per-node 2 -m hesse analyze examples/analyze_mlp.py:setup

``setup()`` returns ``(model, criterion, data)``. Under torchrun hesse starts the process group
before calling it, so each rank can keep its own shard of the samples; hesse sums the ranks'
products, and the result is that of the whole dataset.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def setup() -> tuple[nn.Module, nn.Module, DataLoader]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 10, generator=g)
    y = (x[:, :4] + 0.5 * torch.randn(512, 4, generator=g)).argmax(1)
    torch.manual_seed(0)  # the same weights on every rank
    model = nn.Sequential(
        nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 4)
    )
    criterion = nn.CrossEntropyLoss()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(60):
        optimizer.zero_grad()
        criterion(model(x), y).backward()
        optimizer.step()
    model.zero_grad(set_to_none=True)
    if dist.is_initialized():  # this rank's shard: every world_size-th sample
        x, y = (
            x[dist.get_rank() :: dist.get_world_size()],
            y[dist.get_rank() :: dist.get_world_size()],
        )
    return model, criterion, DataLoader(TensorDataset(x, y), batch_size=128)
