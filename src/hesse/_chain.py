r"""Curvature products of a chain of linear layers and elementwise activations, by hand.

For an ``nn.Sequential`` of ``nn.Linear`` layers and elementwise activations (an MLP), the
products ``H V`` and ``G V`` come from the R-operator (Pearlmutter, 1994) written out layer by
layer, with the ``K`` columns of ``V`` folded into the rows of each matrix product:

- forward: ``ṡ = ḣ Wᵀ + h V_Wᵀ + v_b`` for a linear layer, ``ḣ' = σ'(s) ⊙ ṡ`` for an activation;
- outputs: ``δ̇ = ∇²_z ℓ · ż`` (the criterion's Hessian in the outputs, by torch.func);
- backward: ``Ġ_W = δ̇ᵀ h + δᵀ ḣ``, ``ġ_b = Σ δ̇``, ``δ̇_in = δ̇ W + δ V_W`` for a linear layer
  and ``δ̇_in = σ'(s) ⊙ δ̇ + σ''(s) ⊙ δ ⊙ ṡ`` for an activation.

The terms with the gradient ``δ`` (``δᵀ ḣ``, ``δ V_W``, ``σ'' δ ṡ``) are the Hessian's
second-order part; without them the same passes give the GGN ``Jᵀ ∇²_z ℓ J``.

The forward and backward passes of the loss are shared by every column (and kept for a session
over one batch), and each layer costs one GEMM per term for all columns at once, with the sums
accumulated in place. autograd's vectorised forward-over-reverse does the same arithmetic with
batched matrix products and out-of-place sums: on the CPU about half of its time (MLP
64-96-96-10, batch 512, 32 columns).

The route is taken only for a structure it can read exactly: the model's class is
``nn.Sequential`` itself, every child is one of the modules in `_ACTIVATIONS`, ``nn.Linear``,
``nn.Dropout`` (off while hesse evaluates) or a leading ``nn.Flatten``; no module has hooks or
an overridden ``forward``, no parameter is parametrised or shared between layers, and no global
module hook is set. The chain's outputs are then compared with the model's own forward pass on
the batch; any difference sends the products to the general path.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn
from torch.func import grad, vjp, vmap
from torch.nn.modules import module as _module
from torch.nn.utils import parametrize

from hesse._functional import criterion_loss, evaluate
from hesse._layers import GGNFactors, KnownLoss, Site, known_loss
from hesse._layout import ParamLayout
from hesse._scratch import Scratch, chunk_size
from hesse._transforms import _out_of_memory

__all__ = ["Chain", "ChainProducts", "chain_of", "chain_products"]

# Numbers in one layer's tangents per pass (64 MiB in float32): more columns go in chunks.
_CHUNK_ENTRIES = 1 << 24
_SQRT_HALF = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def _tanh(s: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
    t = torch.tanh(s)
    d1 = 1 - t * t
    return t, d1, -2 * t * d1


def _sigmoid(s: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
    y = torch.sigmoid(s)
    d1 = y * (1 - y)
    return y, d1, d1 * (1 - 2 * y)


def _relu(s: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
    # torch's derivative at 0 is 0 (threshold_backward): the same here.
    positive = s > 0
    return torch.relu(s), positive.to(s.dtype), None


def _leaky(slope: float) -> Callable[[Tensor], tuple[Tensor, Tensor, Tensor | None]]:
    def act(s: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        d1 = torch.where(s > 0, torch.ones_like(s), torch.full_like(s, slope))
        return F.leaky_relu(s, slope), d1, None

    return act


def _silu(s: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
    y = torch.sigmoid(s)
    d1 = y * (1 + s * (1 - y))
    return F.silu(s), d1, y * (1 - y) * (2 + s * (1 - 2 * y))


def _gelu(s: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
    pdf = torch.exp(-0.5 * s * s) * _INV_SQRT_2PI
    cdf = 0.5 * (1 + torch.erf(s * _SQRT_HALF))
    return F.gelu(s), cdf + s * pdf, pdf * (2 - s * s)


Activation = Callable[[Tensor], tuple[Tensor, Tensor, Tensor | None]]


def _activation(module: nn.Module) -> Activation | None:
    """``s ↦ (σ(s), σ'(s), σ''(s) or None where it is zero)`` for a known activation module."""
    kind = type(module)
    if kind is nn.Tanh:
        return _tanh
    if kind is nn.Sigmoid:
        return _sigmoid
    if kind is nn.ReLU:
        return _relu
    if kind is nn.LeakyReLU:
        return _leaky(float(module.negative_slope))  # type: ignore[arg-type]
    if kind is nn.SiLU:
        return _silu
    if kind is nn.GELU and module.approximate == "none":
        return _gelu
    return None


@dataclass(frozen=True)
class _Linear:
    module: nn.Linear
    weight: str | None  # the layout's name of the weight, if selected
    bias: str | None


@dataclass(frozen=True)
class Chain:
    """The steps of an MLP, in order.

    Linear layers (with the names of their selected parameters) and activations; ``flatten``:
    whether a leading ``nn.Flatten`` flattens the inputs.
    """

    steps: tuple[_Linear | Activation, ...]
    flatten: bool


def _hooked(module: nn.Module) -> bool:
    return bool(
        module._forward_hooks
        or module._forward_pre_hooks
        or module._backward_hooks
        or module._backward_pre_hooks
        or "forward" in vars(module)
    )


def _global_hooks() -> bool:
    names = (
        "_global_forward_hooks",
        "_global_forward_pre_hooks",
        "_global_backward_hooks",
        "_global_backward_pre_hooks",
    )
    return any(bool(getattr(_module, name, None)) for name in names)


def chain_of(model: nn.Module, layout: ParamLayout) -> Chain | None:
    """The chain that ``model`` is, or ``None`` where it is anything else (see the module doc)."""
    if type(model) is not nn.Sequential or _hooked(model) or _global_hooks():
        return None
    if layout.dtype not in (torch.float32, torch.float64):
        return None  # half precision keeps torch's own upcasting rules: the general path
    names = {id(p): n for n, p in model.named_parameters()}
    selected = set(layout.names)
    seen: set[int] = set()
    steps: list[_Linear | Activation] = []
    flatten = False
    # What Sequential.forward runs, in order, repeats included (named_children drops them).
    for position, child in enumerate(model._modules.values()):
        if child is None or _hooked(child) or parametrize.is_parametrized(child):
            return None
        kind = type(child)
        if kind is nn.Linear:
            linear: nn.Linear = child  # type: ignore[assignment]
            picked: list[str | None] = []
            for p in (linear.weight, linear.bias):
                if p is None:
                    picked.append(None)
                    continue
                if id(p) in seen:  # one tensor in two layers
                    return None
                seen.add(id(p))
                name = names.get(id(p))
                picked.append(name if name in selected else None)
            steps.append(_Linear(linear, picked[0], picked[1]))
        elif kind is nn.Flatten and position == 0:
            if (child.start_dim, child.end_dim) != (1, -1):
                return None
            flatten = True
        elif kind in (nn.Dropout, nn.Identity):
            continue  # dropout is off whenever hesse evaluates a model
        else:
            act = _activation(child)
            if act is None:
                return None
            steps.append(act)
    covered = {n for s in steps if isinstance(s, _Linear) for n in (s.weight, s.bias) if n}
    if covered != selected:
        return None
    return Chain(tuple(steps), flatten)


class ChainProducts:
    """``H V`` and ``G V`` for one batch of a chain, from its passes kept once.

    Built by `chain_products`; ``hessian`` and ``ggn`` map tangents ``(K, N)`` (rows in the
    layout's order) to ``(K, N)``.
    """

    def __init__(
        self,
        chain: Chain,
        layout: ParamLayout,
        passes: _Passes,
        gz: Tensor,
        hz: Callable[[Tensor], Tensor],
        known: KnownLoss | None = None,
    ) -> None:
        self.steps = chain.steps
        self.layout = layout
        self.passes = passes
        self.hz = hz  # (rows, K, C) -> (rows, K, C), a new tensor
        self.known = known  # the criterion's closed form, where it has one
        self.scratch = Scratch(passes.outputs.device)
        # The backward pass: δ at every step's output, and σ''(s) ⊙ δ for the Hessian's part.
        n = len(self.steps)
        self.deltas: list[Tensor] = []
        self.curls: list[Tensor | None] = [None] * n
        delta = gz.reshape(-1, gz.shape[-1])
        for i in range(n - 1, -1, -1):
            self.deltas.insert(0, delta)
            weight, slope, d2 = passes.weights[i], passes.slopes[i], passes.curvatures[i]
            if weight is not None:
                delta = delta @ weight
            else:
                assert slope is not None
                if d2 is not None:
                    self.curls[i] = d2 * delta
                delta = delta * slope
        # The first step with a selected parameter: tangents are zero before it.
        self.first = next(
            i for i, s in enumerate(self.steps) if isinstance(s, _Linear) and (s.weight or s.bias)
        )

    @property
    def has_factors(self) -> bool:
        """Whether `ggn_factors` gives the factors: a closed-form loss of the samples' rows."""
        known = self.known
        return known is not None and known.gradient.shape == self.passes.outputs.shape

    def ggn_factors(self) -> GGNFactors | None:
        """The GGN's factors (`hesse._layers.GGNFactors`) from the kept passes.

        The columns of the outputs' factor ``S`` (closed form) go backward through the chain
        as ``C`` tangents: one matrix product per layer for all of them, where the general
        `hesse._layers.ggn_factors` runs ``C`` backward passes of the model and checks.
        None without a closed-form criterion, or with rows other than the samples.
        """
        if not self.has_factors:
            return None
        known, passes = self.known, self.passes
        assert known is not None
        rows = passes.outputs.shape[0]
        s, sign = known.factor()  # (C, B, C_out)
        columns = s.shape[0]
        d = s.transpose(0, 1)  # (B, C, d): S backward through the steps
        layers = []
        for i in range(len(self.steps) - 1, self.first - 1, -1):
            step = self.steps[i]
            if isinstance(step, _Linear):
                if step.weight or step.bias:
                    site = Site(str(i), step.module, step.weight, step.bias)
                    a = passes.inputs[i][:, None, :-1]  # (B, 1, d_in)
                    layers.append((site, a, d.transpose(0, 1)[:, :, None]))  # (C, B, 1, d_out)
                weight = passes.weights[i]
                if i > self.first and weight is not None:
                    d = (d.reshape(rows * columns, -1) @ weight).view(rows, columns, -1)
            else:
                slope = passes.slopes[i]
                assert slope is not None
                d = d * slope[:, None, :]
        return GGNFactors(tuple(reversed(layers)), sign)

    def hessian(self, tangents: Tensor) -> Tensor:
        """``(K, N) -> (K, N)``: rows multiplied by the Hessian of the batch loss."""
        return self._chunked(tangents, second_order=True)

    def ggn(self, tangents: Tensor) -> Tensor:
        """``(K, N) -> (K, N)``: rows multiplied by the GGN of the batch loss."""
        return self._chunked(tangents, second_order=False)

    def _chunked(self, tangents: Tensor, second_order: bool) -> Tensor:
        # Each layer's tangents take rows x K x width numbers: columns go in equal chunks that
        # keep the widest within _CHUNK_ENTRIES (as vmap's chunks would) and the CPU's cache.
        widths = [t.shape[-1] for t in self.passes.inputs] + [self.passes.outputs.shape[-1]]
        per_column = self.passes.inputs[0].shape[0] * max(widths)
        k = tangents.shape[0]
        step = chunk_size(k, per_column, tangents, most=_CHUNK_ENTRIES)
        # Every entry is written. Rows (K, N) of an (N, K) block: what the operators return.
        out = tangents.new_empty(tangents.shape[::-1]).T
        for i in range(0, k, step):
            self._product(tangents[i : i + step], second_order, out[i : i + step])
        return out

    def _product(self, tangents: Tensor, second_order: bool, out: Tensor) -> None:
        """Writes the products of ``tangents`` ``(K, N)`` into ``out`` ``(K, N)``."""
        k, steps, passes, scratch = tangents.shape[0], self.steps, self.passes, self.scratch
        rows = passes.inputs[0].shape[0]
        # Forward: the tangent of every step's input, (rows, K, d); None while it is zero.
        dots: list[Tensor | None] = [None] * (len(steps) + 1)
        blocks: list[Tensor | None] = [None] * len(steps)
        for i, step in enumerate(steps):
            dot = dots[i]
            if isinstance(step, _Linear):
                vw, vb = self._tangent_blocks(step, tangents, k)
                blocks[i] = vw
                weight = passes.weights[i]
                assert weight is not None
                dots[i + 1] = _linear_tangent(weight, passes.inputs[i], dot, vw, vb, k, scratch, i)
            elif dot is not None:
                slope = passes.slopes[i]
                assert slope is not None
                if second_order and self.curls[i] is not None:
                    # ṡ itself is needed backward.
                    moved = scratch(("dot", i), tuple(dot.shape), dot)
                    dots[i + 1] = torch.mul(dot, slope[:, None, :], out=moved)
                else:
                    dots[i + 1] = dot.mul_(slope[:, None, :])
        out_dot = dots[-1]
        if out_dot is None:  # the outputs do not depend on the selected parameters
            out.zero_()
            return
        # The outputs: δ̇ = ∇²_z ℓ ż.
        d_dot = self.hz(out_dot)
        for i in range(len(steps) - 1, self.first - 1, -1):
            step, delta, dot = steps[i], self.deltas[i], dots[i]
            if isinstance(step, _Linear):
                weight = passes.weights[i]
                assert weight is not None
                d_out = weight.shape[0]
                flat = d_dot.reshape(rows, k * d_out)
                augmented = passes.inputs[i]  # (rows, d_in + 1)
                d_in = augmented.shape[1] - 1
                if step.weight is not None:
                    # Weight and bias from one GEMM with [h, 1]; the weight alone without.
                    h = augmented if step.bias else augmented[:, :d_in]
                    both = torch.mm(
                        flat.T, h, out=scratch(("both", i), (k * d_out, h.shape[1]), flat)
                    )
                    gw = out[:, self.layout.slice(step.weight)].view(k, d_out, d_in)
                    gw.copy_(both[:, :d_in].view(k, d_out, d_in))
                    if second_order and dot is not None:
                        own = torch.mm(
                            dot.reshape(rows, k * d_in).T,
                            delta,
                            out=scratch(("own", i), (k * d_in, d_out), flat),
                        )
                        gw += own.view(k, d_in, d_out).transpose(1, 2)
                    if step.bias is not None:
                        out[:, self.layout.slice(step.bias)] = both[:, d_in].view(k, d_out)
                elif step.bias is not None:
                    out[:, self.layout.slice(step.bias)] = flat.sum(0).view(k, d_out)
                if i == self.first:
                    break
                vw = blocks[i]
                nxt = torch.mm(
                    d_dot.reshape(rows * k, d_out),
                    weight,
                    out=scratch(("nxt", i), (rows * k, d_in), flat),
                )  # (rows·K, d_in)
                if second_order and vw is not None:
                    spread = scratch(("spread", i), (d_out, k * d_in), flat)
                    if spread is None:
                        spread = vw.permute(1, 0, 2).reshape(d_out, -1)  # (d_out, K·d_in)
                    else:
                        spread.view(d_out, k, d_in).copy_(vw.permute(1, 0, 2))
                    nxt.view(rows, -1).addmm_(delta, spread)
                d_dot = nxt.view(rows, k, -1)
            else:
                # d_dot is this product's own temporary: updated in place.
                slope, curl = passes.slopes[i], self.curls[i]
                assert slope is not None
                d_dot.mul_(slope[:, None, :])
                if second_order and curl is not None and dot is not None:
                    d_dot.addcmul_(curl[:, None, :], dot)

    def _tangent_blocks(
        self, step: _Linear, tangents: Tensor, k: int
    ) -> tuple[Tensor | None, Tensor | None]:
        m = step.module
        vw = vb = None
        if step.weight is not None:
            vw = tangents[:, self.layout.slice(step.weight)]
            vw = vw.view(k, m.out_features, m.in_features)
        if step.bias is not None:
            vb = tangents[:, self.layout.slice(step.bias)]
        return vw, vb


def _linear_tangent(
    weight: Tensor,
    h: Tensor,
    dot: Tensor | None,
    vw: Tensor | None,
    vb: Tensor | None,
    k: int,
    scratch: Scratch,
    index: int,
) -> Tensor | None:
    """``(rows, K, d_out)``: ``ḣ Wᵀ + h V_Wᵀ + v_b``, one GEMM per term, summed in place.

    ``h`` is the layer's input with a column of ones, ``[h, 1]``; the temporaries come from
    ``scratch``, keyed by the step's ``index``.
    """
    rows, d_out = h.shape[0], weight.shape[0]
    out: Tensor | None = None
    result = scratch(("dot", index), (rows, k * d_out), h)
    if vw is not None and vb is not None:
        both = torch.cat(
            [vw, vb[:, :, None]], dim=2, out=scratch(("cat", index), (k, d_out, h.shape[1]), h)
        ).view(k * d_out, -1)  # [V_W, v_b]
        out = torch.mm(h, both.T, out=result)
    elif vw is not None:
        out = torch.mm(h[:, :-1], vw.reshape(k * d_out, -1).T, out=result)
    elif vb is not None:
        out = vb.reshape(1, -1).expand(rows, -1)
        out = out.clone() if result is None else result.copy_(out)
    if dot is not None:
        moved = dot.reshape(rows * k, -1)
        if out is None:
            out = torch.mm(moved, weight.T, out=None if result is None else result.view(-1, d_out))
            return out.view(rows, k, d_out)
        out.view(rows * k, d_out).addmm_(moved, weight.T)
    return None if out is None else out.view(rows, k, d_out)


@dataclass(frozen=True)
class _Passes:
    """The forward pass of a chain.

    Per step: its input (a linear layer's ``[h, 1]``, an activation's ``s``), the weight used
    (linear layers), ``σ'(s)`` and ``σ''(s)`` (activations; None where zero).
    """

    inputs: list[Tensor]
    weights: list[Tensor | None]
    slopes: list[Tensor | None]
    curvatures: list[Tensor | None]
    outputs: Tensor


def _forward(chain: Chain, params: dict[str, Tensor], rows: Tensor) -> _Passes:
    inputs: list[Tensor] = []
    weights: list[Tensor | None] = []
    slopes: list[Tensor | None] = []
    curvatures: list[Tensor | None] = []
    h = rows
    for step in chain.steps:
        if isinstance(step, _Linear):
            # [h, 1]: the bias's column rides along in the GEMMs (no broadcast, no sum).
            inputs.append(torch.cat([h, h.new_ones(h.shape[0], 1)], dim=1))
            m = step.module
            weight = params[step.weight] if step.weight else m.weight.detach()
            bias = None
            if m.bias is not None:
                bias = params[step.bias] if step.bias else m.bias.detach()
            h = F.linear(h, weight, bias)
            weights.append(weight)
            slopes.append(None)
            curvatures.append(None)
        else:
            inputs.append(h)
            h, d1, d2 = step(h)
            weights.append(None)
            slopes.append(d1)
            curvatures.append(d2)
    return _Passes(inputs, weights, slopes, curvatures, h)


def chain_products(
    model: nn.Module,
    layout: ParamLayout,
    params: dict[str, Tensor],
    inputs: tuple[Any, ...],
    target: Any,
    criterion: Callable[..., Tensor],
) -> ChainProducts | None:
    """The batch's `ChainProducts`, or ``None`` where ``model`` is not a chain it can verify.

    Args:
        model: The module, in the state the caller set up (eval mode, hesse's context).
        layout: The selected parameters.
        params: Their current values by name (the layout's names).
        inputs: The model's inputs: one tensor ``(B, ..., d_in)`` for the route.
        target: The criterion's target.
        criterion: ``criterion(outputs, target)``, a scalar.

    Returns:
        The products' object, whose forward pass matched the model's own on this batch.
    """
    chain = chain_of(model, layout)
    if chain is None or len(inputs) != 1 or not isinstance(inputs[0], Tensor):
        return None
    x = inputs[0]
    if x.dtype != layout.dtype or x.ndim < 2 or x.device != layout.device:
        return None
    if chain.flatten:
        x = x.flatten(1)
    first = next((s for s in chain.steps if isinstance(s, _Linear)), None)
    if first is None or x.shape[-1] != first.module.in_features:
        return None
    with torch.no_grad():
        params = {n: t.detach() for n, t in params.items()}
        passes = _forward(chain, params, x.reshape(-1, x.shape[-1]))
        z = passes.outputs.reshape(*x.shape[:-1], passes.outputs.shape[-1])
        # The model's own forward pass must give the same outputs: anything the structure
        # checks missed (a patched class, an unusual module state) leaves the route here.
        reference = evaluate(model, params, inputs)
        if not isinstance(reference, Tensor) or reference.shape != z.shape:
            return None
        scale = float(reference.abs().max()) if reference.numel() else 0.0
        if not math.isfinite(scale):  # NaN or infinite outputs: the general path reports them
            return None
        tol = 16 * torch.finfo(z.dtype).eps
        if not torch.allclose(z, reference, rtol=tol, atol=tol * scale):
            return None

    known = known_loss(criterion, z, target)
    if known is not None:
        # Cross-entropy and MSE in closed form (rows (B, C), any K in the middle).
        return ChainProducts(
            chain, layout, passes, known.gradient, known.hessian_product, known=known
        )

    def loss_of_outputs(out: Tensor) -> Tensor:
        return criterion_loss(criterion, out, target)

    try:
        # A criterion torch.func cannot transform (an autograd.Function without
        # setup_context, a NumPy round trip) leaves the products to the general path and its
        # fallbacks (one vmap cannot batch fails in the products: the operators fall back).
        gz, hz = vjp(grad(loss_of_outputs), z)[:2]
    except (RuntimeError, NotImplementedError) as err:
        if _out_of_memory(err):
            raise
        return None
    out_shape, width = tuple(z.shape), z.shape[-1]

    def h_of(dots: Tensor) -> Tensor:
        # (rows, K, C) -> (K, *outputs' shape): vmap over the columns, and back.
        rows, k = dots.shape[:2]
        z_dot = dots.transpose(0, 1).reshape(k, *out_shape)
        # Owned: the products update it in place (vmap may return an expanded tensor).
        product = vmap(lambda t: hz(t)[0])(z_dot)
        return product.reshape(k, rows, width).transpose(0, 1).contiguous()

    return ChainProducts(chain, layout, passes, gz, h_of)
