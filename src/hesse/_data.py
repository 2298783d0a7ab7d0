"""Datasets for curvature operators: one ``(inputs, target)`` batch or a re-iterable of them."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from hesse._transforms import _out_of_memory
from hesse._validate import normal_tensor, normalize_inputs

__all__ = ["Batch", "Dataset", "as_dataset", "missing_derivative", "model_fits"]


@dataclass(frozen=True)
class Batch:
    inputs: tuple[Tensor, ...]
    # A tensor in a dataset; for a single batch given as such (`hvp`, `loss_sharpness`)
    # whatever the criterion takes as its second argument, None included.
    target: Any

    @property
    def size(self) -> int:
        first = self.inputs[0]
        return first.shape[0] if first.ndim else 1  # an unbatched input given to `hvp`

    def signature(self) -> tuple[Any, ...]:
        """What every batch of one dataset shares: input count, dtypes and per-sample shapes."""
        tensors = self.inputs if self.target is None else (*self.inputs, self.target)
        return tuple(
            (x.dtype, tuple(x.shape[1:]), x.device)
            if isinstance(x, Tensor)
            else (type(x).__name__, None, None)
            for x in tensors
        )

    def tensors(self) -> tuple[Tensor, ...]:
        """Inputs and a tensor target: what a product over this batch depends on."""
        if isinstance(self.target, Tensor):
            return (*self.inputs, self.target)
        return self.inputs


def _describe(signature: tuple[Any, ...], *, has_target: bool = True) -> str:
    parts = [
        str(dtype) if shape is None else f"{dtype} (B, {', '.join(map(str, shape))})"
        for dtype, shape, _ in signature
    ]
    if not has_target:
        return "inputs [" + "; ".join(parts) + "]"
    return "inputs [" + "; ".join(parts[:-1]) + "], target " + parts[-1]


def missing_derivative(err: BaseException) -> ValueError | None:
    """The error for torch lacking a derivative of one of the model's operations, if it is one.

    Curvature differentiates twice, and torch cannot always (nn.EmbeddingBag has no double
    backward): the model's limit, not a problem with the data or the call.
    """
    if not (isinstance(err, NotImplementedError) and "derivative for" in str(err)):
        return None
    return ValueError(
        f"model: torch lacks a derivative that curvature needs for one of the model's "
        f"operations ({err}). Select parameters before that operation with params=[...], or "
        "replace the layer (nn.EmbeddingBag: nn.Embedding and a sum)."
    )


@contextmanager
def model_fits(
    name: str,
    batch: Batch,
    dtype: Any,
    *,
    where: str = "the first batch",
    criterion: bool = True,
    batched: bool = True,
) -> Iterator[None]:
    """Name the data when the model (or its criterion) fails on ``batch`` inside torch.

    A mismatch of data and model (float32 inputs to a float64 model, a feature width the first
    layer does not take, int32 class indices for cross-entropy) otherwise surfaces as a
    RuntimeError deep inside the forward pass. hesse's own errors (ValueError, TypeError)
    pass through. ``criterion=False``: the model alone (the model Hessians), no target;
    ``batched=False``: inputs without a batch dim, described by their whole shapes.
    """
    try:
        yield
    except (RuntimeError, IndexError) as err:
        if _out_of_memory(err):  # the batch may fit the model, just not the memory
            raise
        named = missing_derivative(err)
        if named is not None:  # not the data
            raise named from err
        if not criterion:
            if batched:
                given = _describe(batch.signature(), has_target=False)
            else:
                given = "; ".join(f"{x.dtype} {tuple(x.shape)}" for x in batch.inputs)
            raise ValueError(
                f"{name}: the model fails on {where} ({given}): {type(err).__name__}: {err}. "
                f"Check that the inputs have the model's dtype ({dtype}) and the feature shape "
                "it takes"
                + (
                    " (dim 0 is the batch; one sample is evaluated as a batch of one)."
                    if batched
                    else "."
                )
            ) from err
        given = _describe(batch.signature(), has_target=batch.target is not None)
        raise ValueError(
            f"{name}: the model and criterion fail on {where} ({given}): "
            f"{type(err).__name__}: {err}. Check that the inputs have the model's dtype "
            f"({dtype}) and the feature shape it takes, and that the target suits the criterion "
            "(class indices as int64 for cross-entropy, the outputs' shape for MSE)."
        ) from err


def _batch(item: Any, index: int) -> Batch:
    if not (isinstance(item, (tuple, list)) and len(item) == 2):
        raise TypeError(
            f"data: batch {index} must be an (inputs, target) pair, got {type(item).__name__}; "
            "a DataLoader over a TensorDataset(x, y) yields such pairs."
        )
    inputs, target = item
    if not isinstance(target, Tensor):
        raise TypeError(
            f"data: the target of batch {index} must be a tensor, got {type(target).__name__}."
        )
    args = normalize_inputs(inputs)
    target = normal_tensor(target)
    sizes = {x.shape[0] if x.ndim else None for x in (*args, target)}
    if len(sizes) != 1 or None in sizes:
        shapes = ", ".join(str(tuple(x.shape)) for x in (*args, target))
        raise ValueError(
            f"data: batch {index} needs one batch size in dim 0 of every input and of the "
            f"target, got shapes {shapes}."
        )
    return Batch(args, target)


class Dataset:
    """A re-iterable of validated batches.

    ``num_samples`` and ``num_batches`` are counted at construction, for reports and checks;
    products count the samples of each pass anew, so a list that grows later is weighted by
    what it holds when the product runs.
    """

    def __init__(self, data: Any, *, allow_empty: bool = False) -> None:
        if isinstance(data, Batch):
            self._source: Iterable[Any] = [data]
        elif isinstance(data, tuple) and len(data) == 2 and isinstance(data[1], Tensor):
            self._source = [data]
        elif isinstance(data, Iterable) and not isinstance(data, (Tensor, str, dict)):
            if iter(data) is data:
                raise TypeError(
                    "data: an iterator can be read only once, but an operator reads the data on "
                    "every product; pass a list of (inputs, target) batches or a DataLoader."
                )
            self._source = data
        else:
            raise TypeError(
                "data: expected one (inputs, target) batch or a re-iterable of them (a list, a "
                f"DataLoader), got {type(data).__name__}."
            )
        self._signature: tuple[Any, ...] | None = None
        first: tuple[Any, ...] | None = None
        count = batches = 0
        for batch in self:
            if first is None:
                first = batch.signature()
            count += batch.size
            batches += 1
        if (first is None or count == 0) and not allow_empty:
            raise ValueError("data: no samples; pass at least one non-empty batch.")
        self.num_samples = count
        self.num_batches = batches
        self._signature = first

    def __iter__(self) -> Iterator[Batch]:
        signature = self._signature
        for index, item in enumerate(self._source):
            batch = item if isinstance(item, Batch) else _batch(item, index)
            if signature is None:
                signature = batch.signature()
            elif batch.signature() != signature:
                raise ValueError(
                    f"data: batch {index} has {_describe(batch.signature())} but batch 0 has "
                    f"{_describe(signature)}; every batch must have the same structure."
                )
            yield batch


def as_dataset(data: Any, *, allow_empty: bool = False) -> Dataset:
    return data if isinstance(data, Dataset) else Dataset(data, allow_empty=allow_empty)
