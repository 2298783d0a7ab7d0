r"""Layer-structured curvature: exact diagonals through the outputs of linear layers.

For a layer $z_n = W a_n + b$ whose weight enters the loss only there, once per sample $n$,
and a loss whose curvature in the layer's outputs does not couple samples,

$$\operatorname{diag} H_W[i, j] = \sum_n a_{nj}^2\, [\nabla^2_{z_n} L]_{ii}, \qquad
\operatorname{diag} H_b[i] = \sum_n [\nabla^2_{z_n} L]_{ii},$$

and $[\nabla^2_{z_n} L]_{ii}$ for every sample at once is one product with the Hessian in
$z$, the probe $e_i$ placed in every sample: a layer costs ``d_out`` products instead of
``d_out * (d_in + 1)``. The GGN takes the same form with $J_z^\top H_f J_z$ in place of
$\nabla^2_z L$; its diagonal follows from a factor $H_f = S \operatorname{diag}(\sigma) S^\top$ of
the outputs' loss Hessian ($C$ columns per sample), one backward pass per column for all
layers at once (what BackPACK's ``DiagGGNExact`` propagates layer by layer).

Nothing is assumed. Each layer is checked on the very batch, and one that fails a check takes
the general path:

- the module ran once, on an input of shape ``(B, d_in)``, and returned $a W^\top + b$ of it
  (a forward hook of the user's that changes the output fails here);
- its weight and bias each feed one operation of the graph, and the loss gradient in them
  equals the one through the layer's outputs (tied weights, a parameter read elsewhere);
- the products commute with weighting the samples: ``M(w ⊙ u) = w ⊙ Mu`` for a random probe
  ``u`` and random weights ``w`` per sample, which fails with probability one if any two
  samples are coupled (BatchNorm with batch statistics, attention across the batch, a loss
  that compares samples).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

from hesse._functional import criterion_loss, evaluate
from hesse._layout import ParamLayout
from hesse._scratch import Scratch, chunk_size
from hesse._transforms import _out_of_memory

__all__ = [
    "FactoredGGN",
    "GGNFactors",
    "KnownLoss",
    "Record",
    "check_sampled",
    "exact_factor",
    "factored_ggn",
    "ggn_diagonal_blocks",
    "ggn_factors",
    "hessian_diagonal_blocks",
    "known_loss",
    "linear_sites",
    "model_diagonal_blocks",
    "recording",
    "sampled_factor",
]

# In half precision a check's rounding slack would be the size of what it checks: those
# models take the general path.
_HALF = (torch.float16, torch.bfloat16)
# Probes per batched backward pass, and the most probe entries (probes x B x d_out) at once.
_PROBES = 256
_PROBE_ENTRIES = 1 << 24


@dataclass(frozen=True)
class Site:
    """A linear layer with selected parameters: ``weight``/``bias`` are layout names or None."""

    path: str
    module: nn.Linear
    weight: str | None
    bias: str | None

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(n for n in (self.weight, self.bias) if n is not None)


@dataclass
class Record:
    """What a forward hook saw of one module: how often it ran, its input and its output."""

    calls: int = 0
    a: Any = None
    z: Any = None


def linear_sites(model: nn.Module, layout: ParamLayout) -> list[Site]:
    """The ``nn.Linear`` modules of ``model`` with a selected weight or bias, in module order."""
    selected = set(layout.names)
    sites = []
    for path, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        prefix = f"{path}." if path else ""
        weight = f"{prefix}weight" if f"{prefix}weight" in selected else None
        bias = f"{prefix}bias" if module.bias is not None and f"{prefix}bias" in selected else None
        if weight is not None or bias is not None:
            sites.append(Site(path, module, weight, bias))
    return sites


@contextmanager
def recording(modules: list[nn.Module]) -> Iterator[list[Record]]:
    """Record each module's calls, input and output during a forward pass; hooks removed after.

    The output passed on is a copy, so that the recorded one stays the module's own when the
    next module works in place (``nn.ReLU(inplace=True)``): derivatives with respect to it
    are then the layer's.
    """
    records = [Record() for _ in modules]
    handles = []

    def hook_for(record: Record) -> Callable[..., Any]:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
            record.calls += 1
            record.a = args[0] if len(args) == 1 and isinstance(args[0], Tensor) else None
            record.z = output
            return output.clone() if isinstance(output, Tensor) else output

        return hook

    try:
        for module, record in zip(modules, records):
            # First of the module's hooks: what it records is the layer's own output, before
            # a user's hook changes what the rest of the model sees.
            handles.append(module.register_forward_hook(hook_for(record), prepend=True))
        yield records
    finally:
        for handle in handles:
            handle.remove()


def _close(actual: Tensor, expected: Tensor, slack: float = 1e3) -> bool:
    actual, expected = actual.detach(), expected.detach()
    if expected.numel() == 0:
        return actual.shape == expected.shape
    eps = torch.finfo(actual.dtype).eps
    scale = max(float(expected.abs().max()) if expected.numel() else 0.0, 1e-30)
    return float((actual - expected).abs().max()) <= slack * eps * scale


def _uses(root: Tensor, leaves: dict[str, Tensor]) -> dict[int, int]:
    """How many operations of ``root``'s graph read each leaf (by ``id``)."""
    wanted = {id(t) for t in leaves.values()}
    counts: dict[int, int] = {}
    seen = set()
    stack = [root.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        for child, _ in node.next_functions:
            if child is None:
                continue
            variable = getattr(child, "variable", None)
            if variable is not None and id(variable) in wanted:
                counts[id(variable)] = counts.get(id(variable), 0) + 1
            else:
                stack.append(child)
    return counts


def _linear_records(
    sites: list[Site],
    records: list[Record],
    leaves: dict[str, Tensor],
    batch: int,
    uses: dict[int, int],
) -> list[tuple[Site, Tensor, Tensor]]:
    """The sites that ran once as ``z = a Wᵀ + b`` on ``(B, *positions, d_in)``.

    Each with its input as ``(B, T, d_in)`` (``T`` positions per sample, 1 for a plain
    ``(B, d_in)`` input) and its output as recorded, each selected leaf read once.
    """
    kept = []
    for site, record in zip(sites, records):
        a, z, m = record.a, record.z, site.module
        if not (
            record.calls == 1
            and isinstance(a, Tensor)
            and isinstance(z, Tensor)
            and a.ndim >= 2
            and a.numel() > 0
            and z.numel() > 0
            and a.shape[0] == batch
            and a.shape[-1] == m.in_features
            and z.shape == (*a.shape[:-1], m.out_features)
            and z.requires_grad
            and all(uses.get(id(leaves[n]), 0) == 1 for n in site.names)
        ):
            continue
        weight = leaves[site.weight] if site.weight else m.weight
        bias = leaves[site.bias] if site.bias else m.bias
        if not _is_affine(a.detach(), z.detach(), weight.detach(), _detach(bias)):
            continue
        kept.append((site, a.detach().reshape(batch, -1, m.in_features), z))
    return kept


def _detach(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.detach()


def _probe(size: int, like: Tensor) -> Tensor:
    """A fixed random vector: checks by random projection see any change but cost a product."""
    g = torch.Generator(device="cpu").manual_seed(size)
    return torch.randn(size, generator=g, dtype=like.dtype).to(like.device)


def _projected(actual: Tensor, expected: Tensor, scale: Tensor, slack: float) -> bool:
    """``actual == expected`` up to rounding, ``scale`` bounding the magnitudes summed."""
    eps = torch.finfo(actual.dtype).eps
    bound = slack * eps * max(float(scale.max()) if scale.numel() else 0.0, 1e-30)
    return float((actual - expected).abs().max()) <= bound if actual.numel() else True


def _is_affine(a: Tensor, z: Tensor, weight: Tensor, bias: Tensor | None) -> bool:
    """``z == a Wᵀ + b``, checked along a random direction ``r``: ``z r == a (Wᵀ r) + b·r``.

    A forward hook or a subclass that changes the output fails it with probability one, at
    the cost of a matrix-vector product instead of the layer's matrix product.
    """
    with torch.no_grad():
        r = _probe(z.shape[-1], z)
        expected = a @ (weight.T @ r)
        scale = a.abs() @ (weight.abs().T @ r.abs())
        if bias is not None:
            expected = expected + bias @ r
            scale = scale + bias.abs() @ r.abs()
        return _projected(z @ r, expected, scale + (z.abs() @ r.abs()), slack=1e3)


def _gradient_matches(site: Site, a: Tensor, gz: Tensor, grads: dict[str, Tensor]) -> bool:
    """The gradient in the layer's parameters equals the one through its outputs.

    ``∇_W = gᵀ a`` checked along a random direction (``∇_W r == gᵀ (a r)``), ``∇_b = Σ g``.
    """
    g = gz.detach().reshape(-1, gz.shape[-1])
    inputs = a.reshape(-1, a.shape[-1])
    if site.weight is not None:
        r = _probe(inputs.shape[-1], inputs)
        actual = grads[site.weight].detach() @ r
        scale = g.abs().T @ (inputs.abs() @ r.abs()) + grads[site.weight].detach().abs() @ r.abs()
        if not _projected(actual, g.T @ (inputs @ r), scale, slack=1e4):
            return False
    return site.bias is None or _close(grads[site.bias], g.sum(0), slack=1e4)


def _coupling_probes(batch: int, width: int, like: Tensor, seed: int) -> tuple[Tensor, Tensor]:
    """Two probes ``(2, B, width)``: a random ``u`` and ``w ⊙ u``, ``w`` a random weight per sample.

    A map ``M`` that does not couple samples commutes with scaling them: ``M(w ⊙ u) = w ⊙ Mu``
    sample by sample. One that does gives ``Σ_{n≠m} (w_n − w_m) M_mn u_n`` at sample ``m``,
    non-zero with probability one over the random ``u`` and ``w`` whenever some ``M_mn`` is:
    two probes settle any coupling between any pair of samples (`_uncoupled`).
    """
    g = torch.Generator(device="cpu").manual_seed(seed)
    u = torch.randn(batch, width, generator=g, dtype=like.dtype)
    w = 0.5 + torch.rand(batch, generator=g, dtype=like.dtype)
    return torch.stack([u, w[:, None] * u]).to(like.device), w.to(like.device)


def _uncoupled(results: Tensor, w: Tensor) -> bool:
    """The products ``(2, B, ...)`` of `_coupling_probes` commute with the samples' weights."""
    results = results.detach().reshape(2, w.shape[0], -1)
    eps = torch.finfo(results.dtype).eps
    scale = max(float(results.abs().max()) if results.numel() else 0.0, 1e-30)
    gap = (results[1] - w[:, None] * results[0]).abs()
    return gap.numel() == 0 or float(gap.max()) <= 1e3 * eps * scale


def _batched_grad(
    outputs: Tensor | list[Tensor], inputs: list[Tensor], probes: Tensor
) -> list[Tensor]:
    """``∂(outputs · probe)/∂inputs`` for every probe (dim 0), vectorised, in chunks."""
    per_probe = probes[0].numel()
    chunk = max(1, min(_PROBES, _PROBE_ENTRIES // max(per_probe, 1)))
    parts: list[list[Tensor]] = [[] for _ in inputs]
    for start in range(0, probes.shape[0], chunk):
        block = probes[start : start + chunk]
        try:
            got = torch.autograd.grad(
                outputs, inputs, block, retain_graph=True, allow_unused=True, is_grads_batched=True
            )
        except (RuntimeError, NotImplementedError) as err:  # vmap cannot batch it: a loop
            if _out_of_memory(err):
                raise
            rows = [
                torch.autograd.grad(outputs, inputs, p, retain_graph=True, allow_unused=True)
                for p in block
            ]
            got = tuple(
                torch.stack([_zeros(r[i], inputs[i]) for r in rows]) for i in range(len(inputs))
            )
        for i, g in enumerate(got):
            parts[i].append(_zeros_batched(g, inputs[i], block.shape[0]))
    return [torch.cat(p) for p in parts]


def _zeros(g: Tensor | None, like: Tensor) -> Tensor:
    return torch.zeros_like(like) if g is None else g


def _zeros_batched(g: Tensor | None, like: Tensor, count: int) -> Tensor:
    return like.new_zeros(count, *like.shape) if g is None else g


def _probe_diagonals(g: Tensor, z: Tensor, batch: int, positions: int, width: int) -> Tensor:
    """``r[t, n, t2, i] = [∇²_z L][(n, t2, i), (n, t, i)]``, from probes ``e_(t, i)``.

    Probes are made and reduced a chunk at a time: only the entries with the same output
    unit ``i`` are kept, ``B T² d_out`` numbers rather than ``(T d_out)² B``.
    """
    per = positions * width
    chunk = max(1, min(_PROBES, _PROBE_ENTRIES // max(batch * per, 1)))
    out = z.new_empty(per, batch, positions)  # [(t, i), n, t2]
    for lo in range(0, per, chunk):
        hi = min(per, lo + chunk)
        units = z.new_zeros(hi - lo, per)
        units[torch.arange(hi - lo), torch.arange(lo, hi)] = 1
        probes = units[:, None, :].expand(-1, batch, -1).reshape(hi - lo, *z.shape)
        with torch.enable_grad():
            (columns,) = _batched_grad(g, [z], probes)
        columns = columns.detach().reshape(hi - lo, batch, positions, width)
        unit = (torch.arange(lo, hi, device=z.device) % width).reshape(-1, 1, 1, 1)
        out[lo:hi] = columns.gather(3, unit.expand(-1, batch, positions, 1))[..., 0]
    return out.reshape(positions, width, batch, positions).permute(0, 2, 3, 1)


def _assemble(site: Site, a: Tensor, d: Tensor) -> dict[str, Tensor]:
    """Blocks from the per-sample diagonal ``d`` ``(B, d_out)`` of the curvature in z (T = 1)."""
    a = a[:, 0]
    out = {}
    if site.weight is not None:
        out[site.weight] = d.T @ (a * a)
    if site.bias is not None:
        out[site.bias] = d.sum(0)
    return out


def _unit_probes(batch: int, shape: tuple[int, ...], like: Tensor) -> Tensor:
    """``(prod(shape), B, *shape)``: probe ``k`` is the ``k``-th unit vector in every sample."""
    width = math.prod(shape)
    eye = torch.eye(width, dtype=like.dtype, device=like.device).reshape(width, 1, *shape)
    return eye.expand(width, batch, *shape)


def hessian_diagonal_blocks(
    model: nn.Module,
    layout: ParamLayout,
    params: dict[str, Tensor],
    run_loss: Callable[[dict[str, Tensor]], Tensor],
    batch: int,
) -> dict[str, Tensor]:
    """Exact diagonal blocks of the loss Hessian for the verified linear layers' parameters.

    Args:
        model: The module (in the state the caller set up).
        layout: The selected parameters.
        params: Their current values by name.
        run_loss: ``leaves -> loss`` with ``leaves`` in place of the selected parameters.
        batch: The number of samples ``B`` (dim 0 of the inputs).

    Returns:
        ``{name: diagonal block of the parameter's shape}`` for the parameters the layer
        route covers; the others are left to the general path.
    """
    sites = linear_sites(model, layout)
    if not sites or batch == 0 or layout.dtype in _HALF:
        return {}
    leaves = {n: params[n].detach().requires_grad_() for n in layout.names}
    with torch.enable_grad():
        with recording([site.module for site in sites]) as records:
            value = run_loss(leaves)
        if not value.requires_grad:
            return {}
        found = _linear_records(sites, records, leaves, batch, _uses(value, leaves))
        if not found:
            return {}
        names = [n for site, _, _ in found for n in site.names]
        grads = torch.autograd.grad(
            value,
            [z for _, _, z in found] + [leaves[n] for n in names],
            create_graph=True,
            allow_unused=True,
        )
    gz = grads[: len(found)]
    by_name = {n: _zeros(g, leaves[n]) for n, g in zip(names, grads[len(found) :])}
    blocks: dict[str, Tensor] = {}
    for k, ((site, a, z), g) in enumerate(zip(found, gz)):
        positions, width = a.shape[1], z.shape[-1]
        if positions * width >= sum(leaves[n].numel() for n in site.names):
            continue  # more probes than the general path's columns
        if g is None or not g.requires_grad or not _gradient_matches(site, a, g, by_name):
            continue
        checks, weights = _coupling_probes(batch, z[0].numel(), z, seed=k)
        with torch.enable_grad():
            (moved,) = _batched_grad(g, [z], checks.reshape(-1, *z.shape))
        if not _uncoupled(moved, weights):
            continue
        r = _probe_diagonals(g, z, batch, positions, width)  # (T, B, T, d_out): [t, n, t2, i]
        if positions == 1:
            blocks.update(_assemble(site, a, r[0, :, 0]))
            continue
        if site.weight is not None:
            blocks[site.weight] = torch.einsum("anbi,naj,nbj->ij", r, a, a)
        if site.bias is not None:
            blocks[site.bias] = r.sum((0, 1, 2))
    return blocks


def model_diagonal_blocks(
    model: nn.Module,
    layout: ParamLayout,
    params: dict[str, Tensor],
    inputs: tuple[Any, ...],
    batch: int,
    sample_shape: tuple[int, ...],
) -> dict[str, Tensor]:
    """Exact per-sample, per-output diagonal blocks of the model's Hessian, by layers.

    For output entry ``o`` of sample ``n``, ``∂²f_no/∂W_ij² = Σ_{t,t'} a_ntj a_nt'j
    [∇²_{z_n} f_no]_{(t,i),(t',i)}``. One batched backward pass gives ``∇_z f_o`` for every
    output entry and layer (with its graph); per layer, one more gives the needed entries, the
    probe ``e_(t,i)`` placed in every sample of output slot ``o``.

    Args:
        model: The module (in the state the caller set up).
        layout: The selected parameters.
        params: Their current values by name.
        inputs: The model's inputs, a batch of ``B`` samples.
        batch: ``B``.
        sample_shape: The shape of one sample's output ``O``.

    Returns:
        ``{name: (B, *O, *shape)}`` for the parameters the layer route covers.
    """
    sites = linear_sites(model, layout)
    outputs = math.prod(sample_shape)
    if not sites or batch == 0 or outputs > _PROBES or layout.dtype in _HALF:
        return {}
    leaves = {n: params[n].detach().requires_grad_() for n in layout.names}
    with torch.enable_grad():
        with recording([site.module for site in sites]) as records:
            f = evaluate(model, leaves, inputs)
        if not isinstance(f, Tensor) or not f.requires_grad or f.shape != (batch, *sample_shape):
            return {}
        found = _linear_records(sites, records, leaves, batch, _uses(f, leaves))
        found = [
            (site, a, z)
            for site, a, z in found
            if outputs * z[0].numel() < sum(leaves[n].numel() for n in site.names)
        ]
        if not found:
            return {}
        names = [n for site, _, _ in found for n in site.names]
        checks, weights = _coupling_probes(batch, outputs, f, seed=0)
        units = _unit_probes(batch, (outputs,), f).reshape(outputs, *f.shape)
        probes = torch.cat([units, checks.reshape(-1, *f.shape)])
        first = outputs  # the row of the first check probe
        try:
            got = torch.autograd.grad(
                f,
                [z for _, _, z in found] + [leaves[n] for n in names],
                probes,
                create_graph=True,
                allow_unused=True,
                is_grads_batched=True,
            )
        except (RuntimeError, NotImplementedError) as err:
            # vmap cannot batch some layer's backward (GroupNorm's): the general path takes over.
            if _out_of_memory(err):
                raise
            return {}
    by_name = {
        n: _zeros_batched(g, leaves[n], probes.shape[0])[first]
        for n, g in zip(names, got[len(found) :])
    }
    blocks: dict[str, Tensor] = {}
    for (site, a, z), g in zip(found, got[: len(found)]):
        if g is None:
            continue
        if not _uncoupled(g[first:], weights) or not _gradient_matches(site, a, g[first], by_name):
            continue
        positions, width = a.shape[1], z.shape[-1]
        per = positions * width
        if (outputs * per) ** 2 * batch > _PROBE_ENTRIES * _PROBES:
            continue  # the probes would not fit in memory: the general path
        if g.requires_grad:
            # probe (o, t, i): e_(t, i) in every sample of slot o, zero in the other slots
            eye = torch.eye(outputs * per, dtype=z.dtype, device=z.device)
            second = eye.reshape(outputs * per, outputs, 1, per).expand(-1, -1, batch, -1)
            with torch.enable_grad():
                (columns,) = _batched_grad(g[:first], [z], second.reshape(-1, outputs, *z.shape))
        else:  # the outputs are linear in z (the last layer): no curvature through it
            columns = z.new_zeros(outputs * per, *z.shape)
        r = columns.detach().reshape(outputs, positions, width, batch, positions, width)
        r = r.diagonal(dim1=2, dim2=5)  # (O, T, B, T, d_out): [o, t, n, t2, i]
        lead = (batch, *sample_shape)
        if site.weight is not None:
            w = torch.einsum("otnsi,ntj,nsj->noij", r, a, a)
            blocks[site.weight] = w.reshape(*lead, *leaves[site.weight].shape)
        if site.bias is not None:
            blocks[site.bias] = r.sum((1, 3)).permute(1, 0, 2).reshape(*lead, width)
    return blocks


Factor = tuple[Tensor, Tensor]  # columns (C, B, *O) of each sample's factor, signs (C, B)


@dataclass(frozen=True)
class GGNFactors:
    """The GGN of one batch through its verified linear layers.

    ``layers``: per layer its site, input ``a`` ``(B, T, d_in)`` and ``m = J_zᵀ S``
    ``(C, B, T, d_out)``, the outputs' Jacobian applied to each column of the factor of the
    outputs' loss Hessian; ``sign``: ``(C, B)``. For parameters in these layers,
    ``G = Σ_n Σ_c σ_nc (J_nᵀ s_nc)(J_nᵀ s_nc)ᵀ`` with ``J_nᵀ s_nc = m[c, n] ⊗ a_n``.
    """

    layers: tuple[tuple[Site, Tensor, Tensor], ...]
    sign: Tensor


def ggn_factors(
    model: nn.Module,
    layout: ParamLayout,
    params: dict[str, Tensor],
    inputs: tuple[Any, ...],
    batch: int,
    factor_of: Callable[[Tensor], Factor | None],
) -> GGNFactors | None:
    """The GGN's factors through the linear layers that pass every check on this batch.

    The GGN of the outputs ``f`` is ``Jᵀ H_f J``. Per sample ``H_f = S diag(σ) Sᵀ``, and
    ``J_zᵀ S_c`` for every layer comes from one backward pass of ``f`` weighted by column
    ``c`` of each sample's ``S``: ``C`` passes for all layers together.

    Args:
        model: The module (in the state the caller set up).
        layout: The selected parameters.
        params: Their current values by name.
        inputs: The model's inputs.
        batch: The number of samples ``B`` (dim 0 of the inputs).
        factor_of: The outputs ``f`` (detached) to the factor of their loss Hessian
            (`exact_factor`) or a Monte-Carlo one (`sampled_factor`); ``None`` when there is
            none per sample.

    Returns:
        The factors of the layers that passed, or ``None`` when none did.
    """
    sites = linear_sites(model, layout)
    if not sites or batch == 0 or layout.dtype in _HALF:
        return None
    leaves = {n: params[n].detach().requires_grad_() for n in layout.names}
    with torch.enable_grad():
        with recording([site.module for site in sites]) as records:
            f = evaluate(model, leaves, inputs)
        if not isinstance(f, Tensor) or not f.requires_grad or f.ndim == 0 or f.shape[0] != batch:
            return None
        found = _linear_records(sites, records, leaves, batch, _uses(f, leaves))
        if not found:
            return None
        factor = factor_of(f.detach())
    if factor is None:
        return None
    s, sign = factor  # (C, B, *O) columns of each sample's factor, (C, B) signs
    names = [n for site, _, _ in found for n in site.names]
    checks, weights = _coupling_probes(batch, s[0, 0].numel(), f, seed=0)
    probes = torch.cat([s, checks.reshape(-1, *f.shape)])
    first = s.shape[0]  # the row of the first check probe
    with torch.enable_grad():
        got = _batched_grad(f, [z for _, _, z in found], probes)
        # The parameters' gradients only for the gradient check, one probe: asking them of
        # every probe in the batched pass cost about a third of it.
        grads = torch.autograd.grad(
            f, [leaves[n] for n in names], probes[first], retain_graph=True, allow_unused=True
        )
    by_name = {n: _zeros(g, leaves[n]) for n, g in zip(names, grads)}
    layers = []
    for (site, a, _), m in zip(found, got):
        # m: (C + 2, B, *positions, d_out); the last two rows are the coupling probes' Jᵀ u.
        if not _uncoupled(m[first:], weights):
            continue
        if not _gradient_matches(site, a, m[first], by_name):
            continue
        layers.append((site, a, m[:first].reshape(first, batch, a.shape[1], -1).detach()))
    return GGNFactors(tuple(layers), sign) if layers else None


def ggn_diagonal_blocks(
    model: nn.Module,
    layout: ParamLayout,
    params: dict[str, Tensor],
    inputs: tuple[Any, ...],
    batch: int,
    factor_of: Callable[[Tensor], Factor | None],
) -> dict[str, Tensor]:
    """Exact diagonal blocks of the GGN for the verified linear layers' parameters.

    The diagonal in a layer's outputs is ``Σ_c σ_c (J_zᵀ S_c)²`` (`ggn_factors`).

    Args:
        model: The module (in the state the caller set up).
        layout: The selected parameters.
        params: Their current values by name.
        inputs: The model's inputs.
        batch: The number of samples ``B`` (dim 0 of the inputs).
        factor_of: As for `ggn_factors`.

    Returns:
        ``{name: diagonal block}`` for the parameters the layer route covers.
    """
    factors = ggn_factors(model, layout, params, inputs, batch, factor_of)
    if factors is None:
        return {}
    sign = factors.sign
    blocks: dict[str, Tensor] = {}
    for site, a, m in factors.layers:
        if a.shape[1] == 1:
            d = (sign[:, :, None] * m[:, :, 0].square()).sum(0)  # (B, d_out)
            blocks.update(_assemble(site, a, d))
        else:
            blocks.update(_positions_ggn(site, a, m, sign))
    return blocks


# On the CPU, the factored products' chunks of samples keep their two widest temporaries,
# ``(b, Σ d_out, K)``, within 32 MiB each: few chunks of many rows keep the layers' matrix
# products efficient (the influence benchmark's MLP 64-256-256-64-10, batch 250, K = 20 in
# float64: 45 ms in one chunk against 51 ms in two and 66 ms in six), and chunks make no
# difference beyond the rounds' spread where the rows are many anyway (MLP 64-96-96-10, batch 512).
_FACTORED_CHUNK_BYTES = 1 << 25


class FactoredGGN:
    """Products with the GGN of one batch from its factors, without autograd.

    ``(G V)`` for parameters that all sit in verified linear layers on ``(B, d_in)`` inputs:
    ``U[n, c] = σ_nc Σ_layers m[c, n] · (W_v a_n + b_v)`` (the outputs' factor applied to
    ``J v``), then per layer ``Σ_n (Σ_c U[n, c] m[c, n]) ⊗ [a_n, 1]``: two matrix products per
    layer and column, like a forward and a backward pass without the nonlinearities.

    The layers' factors sit side by side, ``(B, C, Σ d_out)``: the layers' ``W_v a_n`` are
    written next to each other, so that one batched product per direction serves every layer
    (three layers: 2 batched products per chunk against 6, and no sums of their results).
    """

    def __init__(
        self, factors: GGNFactors, layout: ParamLayout, scratch: Scratch | None = None
    ) -> None:
        self.layout = layout
        sign = factors.sign.T.contiguous()[:, :, None]  # (B, C, 1)
        # Cross-entropy's and MSE's factors have no negative or zero signs: nothing to apply.
        self.sign = None if bool((sign == 1).all()) else sign
        # Temporaries: its own, or shared with the other batches' products of a session.
        self.scratch = Scratch(sign.device) if scratch is None else scratch
        self.sites = [site for site, _, _ in factors.layers]
        # (B, d_in + 1): each layer's inputs with a column of ones for its bias.
        self.inputs = [
            torch.cat([a[:, 0], a.new_ones(a.shape[0], 1)], 1) for _, a, _ in factors.layers
        ]
        self.bounds = list(
            itertools.accumulate((m.shape[-1] for _, _, m in factors.layers), initial=0)
        )
        # One copy each: the chain's factors are by sample already, (B, C, d_out) transposed.
        self.factor = torch.cat([m[:, :, 0].transpose(0, 1) for _, _, m in factors.layers], 2)
        self.factor_t = self.factor.transpose(1, 2).contiguous()  # (B, Σ d_out, C)

    @property
    def nbytes(self) -> int:
        """What it holds: the factors twice over and the layers' inputs."""
        held = [self.factor, self.factor_t, *self.inputs]
        if self.sign is not None:
            held.append(self.sign)
        return sum(t.numel() * t.element_size() for t in held)

    def matmat(self, tangents: Tensor) -> Tensor:
        """``(K, N) -> (K, N)``: each row multiplied by the batch's GGN.

        Computed on the columns ``(N, K)``, the layout of the factors' products (``K``
        innermost): no transposes in or out, the result the rows' view of an ``(N, K)`` block.
        On the CPU the samples go in equal chunks whose ``(b, Σ d_out, K)`` temporaries stay
        within 32 MiB and are reused (`hesse._scratch.Scratch`).
        """
        k = tangents.shape[0]
        cols = tangents.T  # (N, K)
        weights = [self._augmented(j, cols, k) for j in range(len(self.sites))]
        batch, width = self.factor.shape[0], self.bounds[-1] * k
        step = chunk_size(batch, width, tangents, cpu_bytes=_FACTORED_CHUNK_BYTES)
        scratch = self.scratch
        sums: list[Tensor] = []
        for lo in range(0, batch, step):
            rows = slice(lo, lo + step)
            size = self.factor[rows].shape[0]
            y = _buffer(scratch, ("y",), (size, width), tangents)
            for j, w in enumerate(weights):
                # W_v a_n + b_v for each sample, (b, d_out * K), into its columns of y
                torch.mm(
                    self.inputs[j][rows], w, out=y[:, self.bounds[j] * k : self.bounds[j + 1] * k]
                )
            shape = (size, self.factor.shape[1], k)
            u = torch.bmm(self.factor[rows], y.view(size, -1, k), out=scratch(("u",), shape, y))
            if self.sign is not None:
                u.mul_(self.sign[rows])  # (b, C, K)
            shape = (size, self.bounds[-1], k)
            p = torch.bmm(self.factor_t[rows], u, out=scratch(("p",), shape, u))  # (b, Σ d_out, K)
            for j, a in enumerate(self.inputs):
                part = p[:, self.bounds[j] : self.bounds[j + 1]].reshape(size, -1)
                if lo == 0:
                    sums.append(_outer_sum(a[rows], part, scratch, j))
                else:
                    sums[j].addmm_(a[rows].T, part)
        out = tangents.new_empty(tangents.shape[::-1])  # (N, K); every entry is written
        for site, total in zip(self.sites, sums):
            layer = site.module
            full = total.unflatten(1, (layer.out_features, k))  # (d_in + 1, d_out, K)
            if site.weight is not None:
                block = out[self.layout.slice(site.weight)]
                block.view(layer.out_features, layer.in_features, k).copy_(
                    full[:-1].transpose(0, 1)
                )
            if site.bias is not None:
                out[self.layout.slice(site.bias)] = full[-1]
        return out.T

    def _augmented(self, j: int, cols: Tensor, k: int) -> Tensor:
        """``(d_in + 1, d_out * K)``: layer ``j``'s weight and bias tangents, entry (i, (o, k))."""
        site = self.sites[j]
        m = site.module
        both = _buffer(self.scratch, ("w", j), (m.in_features + 1, m.out_features, k), cols)
        if site.weight is not None:
            weight = cols[self.layout.slice(site.weight)].view(m.out_features, m.in_features, k)
            both[:-1].copy_(weight.transpose(0, 1))
        else:
            both[:-1].zero_()
        if site.bias is not None:
            both[-1].copy_(cols[self.layout.slice(site.bias)])
        else:
            both[-1].zero_()
        return both.view(m.in_features + 1, -1)


def _outer_sum(a: Tensor, part: Tensor, scratch: Scratch, j: int) -> Tensor:
    """``aᵀ part`` ``(d_in + 1, d_out * K)``, in a buffer laid out for the faster kernel.

    torch runs a product into a transposed output as the transposed product, and MKL's
    kernels favour opposite operand orders in the two dtypes (batch 512, d_in = 96,
    d_out * K = 1,536, ``part`` strided: float64 2.1 against 2.9 ms as ``partᵀ a``, float32
    1.9 against 3.1 ms as ``aᵀ part``): in float64 the result is the transpose of a
    ``(d_out * K, d_in + 1)`` buffer. Later chunks add into it the same way (``addmm_``).
    """
    rows, cols = a.shape[1], part.shape[1]
    if a.dtype == torch.float64:
        out = _buffer(scratch, ("sum", j), (cols, rows), a).T
    else:
        out = _buffer(scratch, ("sum", j), (rows, cols), a)
    return torch.mm(a.T, part, out=out)


def _buffer(scratch: Scratch, key: tuple[Any, ...], shape: tuple[int, ...], like: Tensor) -> Tensor:
    """``scratch``'s buffer, or a new tensor where it hands out none."""
    found = scratch(key, shape, like)
    return like.new_empty(shape) if found is None else found


def factored_ggn(
    factors: GGNFactors | None, layout: ParamLayout, scratch: Scratch | None = None
) -> FactoredGGN | None:
    """`FactoredGGN` when every selected parameter is covered and every layer has T = 1."""
    if factors is None:
        return None
    covered = {n for site, _, _ in factors.layers for n in site.names}
    if covered != set(layout.names) or any(a.shape[1] != 1 for _, a, _ in factors.layers):
        return None
    return FactoredGGN(factors, layout, scratch)


def _positions_ggn(site: Site, a: Tensor, m: Tensor, sign: Tensor) -> dict[str, Tensor]:
    """``Σ_n Σ_c σ_c (Σ_t m[c, n, t, i] a[n, t, j])²`` (and the bias's), samples in chunks."""
    c, batch, _, width = m.shape
    per_sample = c * width * a.shape[-1]
    step = max(1, _PROBE_ENTRIES // max(per_sample, 1))
    weight = a.new_zeros(width, a.shape[-1]) if site.weight is not None else None
    bias = a.new_zeros(width) if site.bias is not None else None
    for lo in range(0, batch, step):
        mc, ac, sc = m[:, lo : lo + step], a[lo : lo + step], sign[:, lo : lo + step]
        if weight is not None:
            q = torch.einsum("cnti,ntj->cnij", mc, ac)
            weight += (sc[:, :, None, None] * q.square()).sum((0, 1))
        if bias is not None:
            bias += (sc[:, :, None] * mc.sum(2).square()).sum((0, 1))
    out = {}
    if site.weight is not None and weight is not None:
        out[site.weight] = weight
    if site.bias is not None and bias is not None:
        out[site.bias] = bias
    return out


def exact_factor(
    criterion: Callable[..., Tensor], target: Any, batch: int
) -> Callable[[Tensor], Factor | None]:
    """The exact factor of the outputs' loss Hessian, for `ggn_diagonal_blocks`."""
    return lambda f: _output_factor(criterion, f, target, batch)


def _output_factor(
    criterion: Callable[..., Tensor], f: Tensor, target: Any, batch: int
) -> Factor | None:
    """Columns ``S_c`` (``(C, B, *O)``) and signs of each sample's outputs' loss Hessian.

    ``None`` when the loss couples samples (the GGN's diagonal is then not per sample).
    """
    width = f[0].numel()
    if width > _PROBES:
        return None  # C backward passes would cost more than the general path
    known = known_loss(criterion, f, target)  # cross-entropy, MSE: in closed form
    if known is not None:
        return known.factor()
    leaf = f.detach().requires_grad_()
    with torch.enable_grad():
        value = criterion_loss(criterion, leaf, target)
        (g,) = torch.autograd.grad(value, leaf, create_graph=True)
    checks, weights = _coupling_probes(batch, width, f, seed=1)
    units = _unit_probes(batch, (width,), f)
    probes = torch.cat([units, checks]).reshape(-1, *f.shape)
    if not g.requires_grad:  # a loss linear in the outputs: no curvature
        return torch.zeros(width, *f.shape, dtype=f.dtype, device=f.device), f.new_zeros(
            width, batch
        )
    with torch.enable_grad():
        (columns,) = _batched_grad(g, [leaf], probes)
    columns = columns.reshape(-1, batch, width)
    if not _uncoupled(columns[width:], weights):
        return None
    h = columns[:width].permute(1, 2, 0)  # h[n, :, c] = H_n e_c
    values, vectors = torch.linalg.eigh((h + h.mT) / 2)  # (B, C), (B, C, C)
    s = vectors * values.abs().sqrt()[:, None, :]  # s[n, :, c]: column c of sample n's factor
    return s.permute(2, 0, 1).reshape(width, *f.shape), values.sign().T


@dataclass(frozen=True)
class KnownLoss:
    """Cross-entropy or MSE of one batch's outputs, recognised and verified.

    The outputs' Hessian is ``w (diag p − p pᵀ)`` per sample for cross-entropy with class
    indices (``p`` the softmax, ``w`` ``1/B`` for the mean) and ``w I`` for MSE (``w``
    ``2/numel`` for the mean).
    """

    weight: float
    probabilities: Tensor | None  # (B, C) for cross-entropy; None for MSE
    gradient: Tensor  # ∇_f ℓ, f's shape

    def hessian_product(self, t: Tensor) -> Tensor:
        """Tangents of the outputs ``(B, ..., C)`` (any dims between) times their Hessian."""
        p = self.probabilities
        if p is None:
            return t * self.weight
        p = p.view(p.shape[0], *(1,) * (t.ndim - 2), p.shape[1])
        u = t * p
        return u.sub_(p * u.sum(-1, keepdim=True)).mul_(self.weight)

    def factor(self) -> Factor:
        """Columns ``S_c`` ``(C, B, ...)`` with ``Σ_c S_c S_cᵀ`` each sample's Hessian; signs.

        Cross-entropy: ``S = √w (diag √p − p √pᵀ)``; MSE: ``S = √w I``.
        """
        w, p, f = self.weight, self.probabilities, self.gradient
        batch = f.shape[0]
        if p is not None:
            root = p.sqrt()
            s = torch.diag_embed(root) - p[:, :, None] * root[:, None, :]  # s[n, :, c]
            s = (s * w**0.5).permute(2, 0, 1)  # (C, B, C)
        else:
            width = f[0].numel()
            s = _unit_probes(batch, (width,), f).reshape(width, *f.shape) * w**0.5
        return s, f.new_ones(s.shape[0], batch)


def known_loss(criterion: Callable[..., Tensor], f: Tensor, target: Any) -> KnownLoss | None:
    """The closed form of ``criterion`` at outputs ``f`` (``(B, ...)``), or None.

    ``nn.CrossEntropyLoss`` (no class weights, label smoothing or ignored targets; outputs
    ``(B, C)``, class indices ``(B,)``) and ``nn.MSELoss`` (a target shaped like ``f``), both
    with reduction ``"mean"`` or ``"sum"``. The closed-form gradient against autograd's
    gradient of the criterion confirms the form: a patched criterion is not taken (and a
    subclass not recognised at all).
    """
    reduction = getattr(criterion, "reduction", None)
    if reduction not in ("mean", "sum") or not isinstance(target, Tensor) or f.ndim < 1:
        return None
    batch = f.shape[0]
    p = None
    if (
        type(criterion) is nn.CrossEntropyLoss
        and criterion.weight is None
        and criterion.label_smoothing == 0
        and f.ndim == 2
        and batch > 0
        and target.shape == (batch,)
        and not target.is_floating_point()
        and not bool((target == criterion.ignore_index).any())
    ):
        w = 1.0 / batch if reduction == "mean" else 1.0
        p = torch.softmax(f.detach(), dim=1)
        # one_hot takes int64 only; cross-entropy also takes uint8 class indices.
        expected_gradient = w * (p - F.one_hot(target.long(), f.shape[1]).to(f.dtype))
    elif type(criterion) is nn.MSELoss and target.shape == f.shape and f.numel() > 0:
        w = 2.0 / f.numel() if reduction == "mean" else 2.0
        expected_gradient = w * (f.detach() - target)
    else:
        return None
    leaf = f.detach().requires_grad_()
    with torch.enable_grad():
        (g,) = torch.autograd.grad(criterion_loss(criterion, leaf, target), leaf)
    if not _close(g, expected_gradient, slack=1e4):
        return None
    return KnownLoss(w, p, expected_gradient)


def check_sampled(criterion: Any) -> None:
    """Monte-Carlo GGN: the criterion must be a likelihood hesse can sample labels from."""
    ok = (
        type(criterion) is nn.CrossEntropyLoss
        and criterion.weight is None
        and criterion.label_smoothing == 0
    ) or type(criterion) is nn.MSELoss
    if not ok or getattr(criterion, "reduction", None) not in ("mean", "sum"):
        given = repr(criterion)
        if type(criterion) is nn.CrossEntropyLoss:  # its repr shows none of these
            given += (
                f" with weight={'None' if criterion.weight is None else 'a tensor'}, "
                f"label_smoothing={criterion.label_smoothing}, "
                f"reduction={criterion.reduction!r}"
            )
        raise ValueError(
            f"criterion: the Monte-Carlo GGN samples labels from the model's predictive "
            f"distribution, which hesse knows for nn.CrossEntropyLoss (no class weights or "
            f"label smoothing; a categorical) and nn.MSELoss (a Gaussian), with reduction "
            f"'mean' or 'sum'; got {given}. Use the exact diagonal() instead."
        )


def sampled_factor(
    criterion: Any, target: Any, batch: int, mc_samples: int, generator: torch.Generator
) -> Callable[[Tensor], Factor | None]:
    r"""A Monte-Carlo factor of the outputs' loss Hessian from sampled labels (``DiagGGNMC``).

    Cross-entropy: $w(\operatorname{diag} p - p p^\top) = w\,\mathbb{E}_{\hat y \sim p}
    [(p - e_{\hat y})(p - e_{\hat y})^\top]$, so column $m$ is $\sqrt{w/M}\,(p - e_{\hat
    y_m})$, the gradient of the loss at a label drawn from the model. MSE: $c I =
    c\,\mathbb{E}[\varepsilon \varepsilon^\top]$ with $\varepsilon \sim N(0, I)$, column
    $\sqrt{c/M}\,\varepsilon_m$. Draws come from ``generator`` (on the CPU), so a seed
    reproduces them on any device.
    """

    def factor(f: Tensor) -> Factor | None:
        mean = criterion.reduction == "mean"
        if type(criterion) is nn.CrossEntropyLoss:
            if f.ndim != 2:
                return None
            # Samples whose target is ignore_index are left out of the loss: of its mean too.
            kept = (
                target != criterion.ignore_index
                if isinstance(target, Tensor) and not target.is_floating_point()
                else torch.ones(batch, dtype=torch.bool, device=f.device)
            )
            count = int(kept.sum())
            if count == 0:
                return f.new_zeros(mc_samples, *f.shape), f.new_ones(mc_samples, batch)
            w = 1.0 / count if mean else 1.0
            p = torch.softmax(f, dim=1)
            labels = torch.multinomial(p.cpu(), mc_samples, replacement=True, generator=generator)
            onehot = F.one_hot(labels.T.to(f.device), f.shape[1]).to(f.dtype)  # (M, B, C)
            s = (p[None] - onehot) * (w / mc_samples) ** 0.5 * kept[None, :, None]
        else:
            c = 2.0 / f.numel() if mean else 2.0
            noise = torch.randn((mc_samples, *f.shape), generator=generator, dtype=f.dtype)
            s = noise.to(f.device) * (c / mc_samples) ** 0.5
        return s, f.new_ones(mc_samples, batch)

    return factor
