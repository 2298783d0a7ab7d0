"""Parameter layout: the one place that maps named parameter blocks to flat rows and columns."""

from __future__ import annotations

import builtins
import fnmatch
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor, nn

__all__ = ["ParamLayout", "Params", "select_parameters"]

# What ``params=`` accepts everywhere: names, glob patterns, the model's Parameter objects.
Params = str | Tensor | Sequence[str | Tensor] | None

_GLOB_CHARS = frozenset("*?[")


@dataclass(frozen=True)
class ParamLayout:
    """Names, shapes and offsets of the parameter blocks of one flat parameter vector.

    Block ``i`` occupies rows ``offsets[i]:offsets[i] + numels[i]`` of every flat vector and of
    every row and column of an ``(N, N)`` matrix built on this layout, in the order of ``names``.

    Attributes:
        names: Parameter names, in ``model.named_parameters()`` order.
        shapes: The shape of each parameter.
        dtype: The common dtype of the parameters.
        device: The common device of the parameters.

    Examples:
        >>> layout = ParamLayout(("w", "b"), (torch.Size([2, 3]), torch.Size([2])),
        ...                      torch.float64, torch.device("cpu"))
        >>> layout.numel, layout.offsets, layout.slice("b")
        (8, (0, 6), slice(6, 8, None))
        >>> layout.unflatten(torch.arange(8.0))["w"]
        tensor([[0., 1., 2.],
                [3., 4., 5.]])
    """

    names: tuple[str, ...]
    shapes: tuple[torch.Size, ...]
    dtype: torch.dtype
    device: torch.device

    @classmethod
    def from_module(cls, model: nn.Module, params: Params = None) -> ParamLayout:
        """The layout of ``model``'s parameters selected by ``params``.

        Args:
            model: The module whose parameters are laid out.
            params: Names, glob patterns (``"encoder.*"``) or the model's ``nn.Parameter``
                objects, one or a list (``list(model[2].parameters())``); ``None`` selects
                every parameter with ``requires_grad=True``. A frozen parameter named exactly
                or passed as an object is selected; tied parameters count once.

        Returns:
            The layout, blocks in ``model.named_parameters()`` order.

        Raises:
            TypeError: ``params`` is not None, a string, a Parameter or a sequence of them.
            ValueError: A name matches no parameter, a tensor is not one of the model's
                parameters, the selection is empty, or the selected parameters do not share
                one dtype and device.
        """
        selected = select_parameters(model, params)
        dtypes = {p.dtype for _, p in selected}
        devices = {p.device for _, p in selected}
        if len(dtypes) > 1 or len(devices) > 1:
            found = ", ".join(f"{n}: {p.dtype} on {p.device}" for n, p in selected)
            raise ValueError(
                "params: the selected parameters must share one dtype and one device to form one "
                f"flat vector, got {found}; select a subset with params=[...] or convert the model "
                "with model.to(dtype, device)."
            )
        names = tuple(n for n, _ in selected)
        shapes = tuple(p.shape for _, p in selected)
        return cls(names, shapes, dtypes.pop(), devices.pop())

    @cached_property
    def numels(self) -> tuple[int, ...]:
        """Number of entries of each block."""
        return tuple(s.numel() for s in self.shapes)

    @cached_property
    def offsets(self) -> tuple[int, ...]:
        """First flat index of each block."""
        offsets, total = [], 0
        for n in self.numels:
            offsets.append(total)
            total += n
        return tuple(offsets)

    @property
    def numel(self) -> int:
        """Total number of entries ``N``."""
        return sum(self.numels)

    def slice(self, name: str) -> slice:
        """Flat index range of block ``name``.

        Args:
            name: A parameter name of this layout.

        Returns:
            The ``slice`` of its rows (and columns) in flat vectors and matrices.

        Raises:
            ValueError: ``name`` is not in the layout.
        """
        i = self.names.index(name)
        return slice(self.offsets[i], self.offsets[i] + self.numels[i])

    def restrict(self, names: Iterable[str]) -> ParamLayout:
        """The layout of a subset of the blocks, in this layout's order.

        Args:
            names: Parameter names of this layout; others are ignored.

        Returns:
            A new `ParamLayout` with only those blocks.
        """
        keep = set(names)
        idx = [i for i, n in enumerate(self.names) if n in keep]
        return ParamLayout(
            tuple(self.names[i] for i in idx),
            tuple(self.shapes[i] for i in idx),
            self.dtype,
            self.device,
        )

    def flatten(self, tensors: Mapping[str, Tensor]) -> Tensor:
        """Concatenate one tensor per block into a flat ``(N,)`` vector.

        Args:
            tensors: One tensor per parameter name, of the parameter's shape (more keys are
                ignored).

        Returns:
            ``(N,)``, blocks in the layout's order.

        Raises:
            KeyError: A parameter name is missing from ``tensors``.
        """
        return torch.cat([tensors[n].reshape(-1) for n in self.names])

    def unflatten(self, flat: Tensor) -> dict[str, Tensor]:
        """Split the last dim of ``flat`` (``(..., N)``) into one view per block.

        Args:
            flat: A tensor whose last dim has size N.

        Returns:
            ``{name: (..., *shape)}``, views of ``flat``, in the layout's order.
        """
        lead = flat.shape[:-1]
        parts = flat.split(self.numels, dim=-1)
        # A tuple: view(*()) would be view() for a 0-dim parameter of an unbatched vector.
        return {n: p.view((*lead, *s)) for n, p, s in zip(self.names, parts, self.shapes)}

    def window(self, base: Tensor, window: builtins.slice) -> Callable[[Tensor], dict[str, Tensor]]:
        """Map ``t = base[window]``'s replacement to the blocks that overlap the window.

        Blocks outside the window are left out (the model keeps its own values, equal to
        ``base``), so autograd never tracks them; a block that straddles an edge is stitched
        from ``base`` and ``t``. Used to differentiate a window of the parameters only.

        Args:
            base: The full flat parameter vector ``(N,)``.
            window: The contiguous range of flat indices that ``t`` replaces.

        Returns:
            A function of ``t`` (shape ``(window length,)``) giving ``{name: tensor}`` for
            the blocks that overlap the window.
        """
        lo_w, hi_w = window.start, window.stop
        parts = [
            (name, shape, lo, lo + size)
            for name, shape, lo, size in zip(self.names, self.shapes, self.offsets, self.numels)
            if lo < hi_w and lo + size > lo_w
        ]

        # The overlaps partition the window: one split, whose backward is one concatenation
        # (slicing each block would zero-fill and add a full-size gradient per block).
        sizes = [min(hi, hi_w) - max(lo, lo_w) for _, _, lo, hi in parts]

        def params_of(t: Tensor) -> dict[str, Tensor]:
            out = {}
            for (name, shape, lo, hi), inner in zip(parts, t.split(sizes)):
                a, b = max(lo, lo_w), min(hi, hi_w)
                if a > lo or b < hi:
                    inner = torch.cat([base[lo:a], inner, base[b:hi]])
                out[name] = inner.view(shape)
            return out

        return params_of

    def gather(self, model: nn.Module) -> Tensor:
        """The current values of the blocks of ``model`` as a detached flat vector.

        Args:
            model: A module that has every parameter of the layout, by name.

        Returns:
            ``(N,)``, blocks in the layout's order.
        """
        named = dict(model.named_parameters(remove_duplicate=False))
        return torch.cat([named[n].detach().reshape(-1) for n in self.names])

    def unflatten_matrix(self, matrix: Tensor) -> dict[str, dict[str, Tensor]]:
        """Split ``(..., N, N)`` into ``d[P][Q]`` of shape ``(..., *shape(P), *shape(Q))``.

        This is the layout of ``torch.func.hessian`` applied to a dict of parameters.

        Args:
            matrix: A tensor whose last two dims are ``(N, N)``.

        Returns:
            ``d[P][Q]`` for every pair of parameter names, in the layout's order.
        """
        lead = matrix.shape[:-2]
        return {
            p: {
                q: matrix[..., self.slice(p), self.slice(q)].reshape((*lead, *sp, *sq))
                for q, sq in zip(self.names, self.shapes)
            }
            for p, sp in zip(self.names, self.shapes)
        }


def select_parameters(model: nn.Module, params: Params = None) -> list[tuple[str, nn.Parameter]]:
    """Select parameters of ``model`` by name or glob pattern.

    Args:
        model: The module whose parameters are selected.
        params: ``None`` selects every parameter with ``requires_grad=True``. Otherwise one name
            or glob pattern (``"encoder.*"``), one of the model's ``nn.Parameter`` objects, or
            a sequence of them (``list(model.fc.parameters())``, as curvlinops users write
            it). A frozen parameter named exactly or passed as an object is selected (it was
            asked for); one matched only by a pattern is not.
            Tied parameters count once, under the name ``model.named_parameters()`` gives them;
            an alias selects its canonical parameter.

    Returns:
        ``(name, parameter)`` pairs in ``model.named_parameters()`` order.

    Raises:
        TypeError: ``params`` is not None, a string, a Parameter or a sequence of them.
        ValueError: A name matches no parameter, a tensor is not one of the model's
            parameters, or the selection is empty.
    """
    canonical = list(model.named_parameters())
    if params is None:
        selected = [(n, p) for n, p in canonical if p.requires_grad]
        if not selected:
            raise ValueError(
                f"model: {type(model).__name__} has no parameters with requires_grad=True "
                f"(it has {len(canonical)} parameter tensors); pass params=[names] to select "
                "frozen parameters explicitly, or unfreeze them with p.requires_grad_()."
            )
        return selected

    by_id = {id(p): n for n, p in canonical}
    if isinstance(params, (str, Tensor)):
        params = [params]
    # bytes iterate as ints, a dict as its keys: neither is what was meant.
    if not isinstance(params, Iterable) or isinstance(params, (dict, bytes, bytearray)):
        raise TypeError(
            "params: expected None, a parameter name or glob pattern, a Parameter, or a list "
            f"of them, got {type(params).__name__}; for example params=['fc.weight'] or "
            "params=list(model.fc.parameters())."
        )
    requested: list[str] = []
    for i, item in enumerate(params):
        if isinstance(item, str):
            requested.append(item)
        elif isinstance(item, Tensor):
            if id(item) not in by_id:
                raise ValueError(
                    f"params[{i}]: a tensor of shape {tuple(item.shape)} that is not a parameter "
                    f"of {type(model).__name__}; pass the model's own nn.Parameter objects "
                    "(e.g. list(model.fc.parameters())) or their names."
                )
            requested.append(by_id[id(item)])  # its name: exact, so a frozen one is included
        else:
            raise TypeError(
                f"params[{i}]: expected a parameter name, a glob pattern or an nn.Parameter, "
                f"got {type(item).__name__}."
            )

    alias = {n: by_id[id(p)] for n, p in model.named_parameters(remove_duplicate=False)}
    chosen: set[str] = set()
    for name in requested:
        if _GLOB_CHARS.isdisjoint(name):
            if name not in alias:
                valid = ", ".join(n for n, _ in canonical) or "(none)"
                raise ValueError(
                    f"params: {name!r} is not a parameter of {type(model).__name__}; "
                    f"valid names are: {valid}. Glob patterns such as 'layer.*' are allowed."
                )
            chosen.add(alias[name])
        else:
            chosen.update(
                alias[n]
                for n, p in model.named_parameters(remove_duplicate=False)
                if p.requires_grad and fnmatch.fnmatchcase(n, name)
            )
    selected = [(n, p) for n, p in canonical if n in chosen]
    if not selected:
        trainable = ", ".join(n for n, p in canonical if p.requires_grad) or "(none)"
        raise ValueError(
            f"params: {requested!r} selects no trainable parameter of {type(model).__name__}; "
            f"trainable names are: {trainable}."
        )
    return selected
