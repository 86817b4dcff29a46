"""One small object per layer type, with the three things bound propagation asks of a layer.

Every op maps a batch ``z`` of shape ``(N, *in_shape)`` to ``(N, *out_shape)`` and offers

- ``forward(z)``: the layer itself (the DAG's output is checked against the model's);
- ``ibp(l, u, rtol)``: an interval ``[l, u]`` of its inputs to one of its outputs (Gowal et al. 2018);
- ``back(A, ...) -> (A', bias, mag)``: a linear lower bound ``A·out ≥ A'·in + bias`` pulled back
  through the layer (CROWN, Zhang et al. 2018). ``A`` has shape ``(B, S, *out_shape)`` (S rows
  of a specification per point), ``A'`` shape ``(B, S, *in_shape)``; ``bias`` and ``mag``
  (the sum of the absolute values of the terms summed into ``bias``, for the round-off margin)
  have shape ``(B, S)``.

Affine ops (:class:`Dense`, :class:`Conv`, :class:`ChannelAffine`, :class:`Reshape`,
:class:`Pool`) and the two-input :class:`Add` (a residual connection: ``forward(a, b)``,
``ibp(l_a, u_a, rtol, (l_b, u_b))``, ``back`` the same ``A`` for both inputs) pull back exactly; :class:`ReLU` and :class:`MaxPool` are ``nonlinear`` and
take the interval of their inputs (and, for the ReLU, optional lower slopes ``alpha``). A ReLU
followed by a max-pool is pulled back in one step on the pooled shape
(:meth:`MaxPool.back_after_relu`, what :func:`~logitpair.bounds.propagate.backward` uses).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from math import prod

import torch
import torch.nn.functional as F
from torch import Tensor


def _rest(t: Tensor) -> tuple[int, ...]:
    """The dimensions after (B, S)."""
    return tuple(range(2, t.dim()))


class Op(ABC):
    """Base class: shapes are set by :func:`logitpair.bounds.graph.build_dag` on an example
    (``in_shape``: the first input's)."""

    nonlinear = False
    in_shape: tuple[int, ...] = ()
    out_shape: tuple[int, ...] = ()

    @abstractmethod
    def forward(self, z: Tensor) -> Tensor:
        """The op on a batch ``z`` (the traced layer's output), used to check the traced graph."""


class Affine(Op):
    """``z -> L(z) + b``: ``forward``, ``linear_abs(r) = |L| r`` and ``back`` define it."""

    @abstractmethod
    def linear_abs(self, r: Tensor) -> Tensor:
        """``|L| r``: the linear part with absolute weights applied to a radius ``r``."""

    @abstractmethod
    def back(self, A: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(A L, A b, |A| |b|)``: the coefficients pulled back through the op, its bias term and magnitude."""

    def ibp(self, lower: Tensor, upper: Tensor, rtol: float) -> tuple[Tensor, Tensor]:
        """Centre and radius: ``L(mid) + b ± |L|(rad)``, the radius widened by ``rtol`` times the
        magnitude of the terms (``|L|(|mid| + rad)`` and the result) against round-off."""
        mid, rad = (upper + lower) / 2, (upper - lower) / 2
        centre = self.forward(mid)
        radius = self.linear_abs(rad * (1 + rtol) + rtol * mid.abs()) + rtol * centre.abs()
        return centre - radius, centre + radius


class Dense(Affine):
    """``nn.Linear``."""

    def __init__(self, weight: Tensor, bias: Tensor | None) -> None:
        self.weight, self.bias = weight, bias

    def forward(self, z: Tensor) -> Tensor:
        return F.linear(z, self.weight, self.bias)

    def linear_abs(self, r: Tensor) -> Tensor:
        return F.linear(r, self.weight.abs())

    def back(self, A: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        if self.bias is None:
            zero = A.new_zeros(A.shape[:2])
            return A @ self.weight, zero, zero
        return A @ self.weight, A @ self.bias, A.abs() @ self.bias.abs()


class Conv(Affine):
    """``nn.Conv2d`` with dilation 1 and groups 1 (any stride and zero padding)."""

    def __init__(self, weight: Tensor, bias: Tensor | None, stride: tuple[int, int], padding: tuple[int, int]) -> None:
        self.weight, self.bias, self.stride, self.padding = weight, bias, stride, padding

    def forward(self, z: Tensor) -> Tensor:
        return F.conv2d(z, self.weight, self.bias, self.stride, self.padding)

    def linear_abs(self, r: Tensor) -> Tensor:
        return F.conv2d(r, self.weight.abs(), None, self.stride, self.padding)

    def back(self, A: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        b, s = A.shape[:2]
        k = self.weight.shape[-2:]
        extra = tuple(
            self.in_shape[1 + d] - ((self.out_shape[1 + d] - 1) * self.stride[d] - 2 * self.padding[d] + k[d])
            for d in range(2)
        )
        flat = A.reshape(b * s, *self.out_shape)
        out = F.conv_transpose2d(flat, self.weight, None, self.stride, self.padding, extra)
        out = out.reshape(b, s, *self.in_shape)
        if self.bias is None:
            zero = A.new_zeros(b, s)
            return out, zero, zero
        l1 = torch.linalg.vector_norm(A, 1, dim=(-2, -1))
        return out, A.sum((-2, -1)) @ self.bias, l1 @ self.bias.abs()


class ChannelAffine(Affine):
    """Per-channel ``z * scale + shift``: BatchNorm in eval mode, the models' ``Normalize``.

    ``scale`` and ``shift`` are shaped to broadcast against the trailing dimensions, e.g.
    ``(C, 1, 1)`` for images and ``(C,)`` for features."""

    def __init__(self, scale: Tensor, shift: Tensor) -> None:
        self.scale, self.shift = scale, shift

    def forward(self, z: Tensor) -> Tensor:
        return z * self.scale + self.shift

    def linear_abs(self, r: Tensor) -> Tensor:
        return r * self.scale.abs()

    def back(self, A: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        terms = A * self.shift
        return A * self.scale, terms.sum(_rest(A)), terms.abs().sum(_rest(A))


class Reshape(Affine):
    """``nn.Flatten`` / ``torch.flatten``: a reshape to ``out_shape``."""

    def __init__(self, start_dim: int = 1) -> None:
        self.start_dim = start_dim

    def forward(self, z: Tensor) -> Tensor:
        return z.flatten(self.start_dim)

    def linear_abs(self, r: Tensor) -> Tensor:
        return self.forward(r)

    def back(self, A: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        zero = A.new_zeros(A.shape[:2])
        return A.reshape(*A.shape[:2], *self.in_shape), zero, zero


class Pool(Affine):
    """A linear map with non-negative weights and no bias (average pools, a global mean),
    pulled back by its vector-Jacobian product."""

    def __init__(self, fn: Callable[[Tensor], Tensor]) -> None:
        self.fn = fn

    def forward(self, z: Tensor) -> Tensor:
        return self.fn(z)

    def linear_abs(self, r: Tensor) -> Tensor:
        return self.fn(r)

    def back(self, A: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        b, s = A.shape[:2]
        with torch.enable_grad():
            z = A.new_zeros(b * s, *self.in_shape, requires_grad=True)
            (out,) = torch.autograd.grad(self.fn(z), z, A.reshape(b * s, *self.out_shape), create_graph=A.requires_grad)
        zero = A.new_zeros(b, s)
        return out.reshape(b, s, *self.in_shape), zero, zero


class Add(Op):
    """``a + b``: a residual connection, the sum of two nodes' outputs of the same shape (a node of
    a :class:`~logitpair.bounds.dag.Dag` with two inputs).

    IBP: centres and radii add, the radius widened by ``rtol`` times the magnitude of the terms
    (as :meth:`Affine.ibp`). The pull-back is exact: ``A·(a + b) = A·a + A·b``, so ``back`` returns
    ``A`` itself, the coefficients of every input (the backward pass adds it to each input's)."""

    def forward(self, z: Tensor, *others: Tensor) -> Tensor:
        for other in others:
            z = z + other
        return z

    def ibp(self, lower: Tensor, upper: Tensor, rtol: float, *others: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        """``lower, upper``: the first input's interval; ``others``: the other inputs' intervals."""
        pairs = ((lower, upper), *others)
        mids = [(up + lo) / 2 for lo, up in pairs]
        rads = [(up - lo) / 2 for lo, up in pairs]
        centre = self.forward(*mids)
        radius = self.forward(*(r * (1 + rtol) + rtol * m.abs() for m, r in zip(mids, rads))) + rtol * centre.abs()
        return centre - radius, centre + radius

    def back(self, A: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        zero = A.new_zeros(A.shape[:2])
        return A, zero, zero


def relu_upper(lower: Tensor, upper: Tensor) -> tuple[Tensor, Tensor]:
    """Slope and intercept of the upper line of a ReLU on ``[l, u]`` (the chord where unstable)."""
    unstable = (lower < 0) & (upper > 0)
    chord = upper / (upper - lower).where(unstable, torch.ones_like(upper))
    slope = torch.where(unstable, chord, (lower >= 0).to(upper.dtype))
    return slope, torch.where(unstable, -lower * slope, torch.zeros_like(upper))


def relu_lower_slope(lower: Tensor, upper: Tensor) -> Tensor:
    """CROWN's adaptive lower slope: 1 where ``u > -l`` else 0 (exact 1 / 0 on stable neurons)."""
    return ((upper > -lower) & (upper > 0)).to(upper.dtype)


class ReLU(Op):
    """``nn.ReLU`` / ``F.relu``: lower line ``alpha·z`` (``alpha`` in [0, 1]; CROWN's choice by
    default), upper line the chord ``u (z - l) / (u - l)`` on unstable neurons."""

    nonlinear = True

    def forward(self, z: Tensor) -> Tensor:
        return z.clamp(min=0)

    def ibp(self, lower: Tensor, upper: Tensor, rtol: float) -> tuple[Tensor, Tensor]:
        return lower.clamp(min=0), upper.clamp(min=0)

    def back(
        self, A: Tensor, lower: Tensor, upper: Tensor, alpha: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        up_slope, up_icpt = relu_upper(lower, upper)
        low_slope = relu_lower_slope(lower, upper)[:, None]
        if alpha is not None:
            unstable = ((lower < 0) & (upper > 0))[:, None]
            low_slope = torch.where(unstable, alpha, low_slope)
        pos, neg = A.clamp(min=0), A.clamp(max=0)
        terms = neg * up_icpt[:, None]
        return pos * low_slope + neg * up_slope[:, None], terms.sum(_rest(A)), -terms.sum(_rest(A))


class MaxPool(Op):
    """``nn.MaxPool2d`` with kernel = stride, no padding, dilation 1.

    IBP: the max of the lower and of the upper bounds. CROWN: lower line ``z_j`` (the window's
    input with the largest lower bound, always ≤ the max); upper line ``z_j`` where that input
    dominates (its lower bound ≥ every other upper bound: then the max is ``z_j``), otherwise
    the constant ``max_i u_i`` (the interval fallback). The pull-back writes each window's
    coefficient at its selected input only (a broadcast product with a one-hot mask, channels
    last: the layout ``conv_transpose2d`` is fastest on); after a ReLU, the ReLU's lines are read
    at the selected inputs alone (:meth:`back_after_relu`), a quarter of the work for k = 2."""

    nonlinear = True

    def __init__(self, kernel: int) -> None:
        self.kernel = kernel

    def forward(self, z: Tensor) -> Tensor:
        return F.max_pool2d(z, self.kernel)

    def ibp(self, lower: Tensor, upper: Tensor, rtol: float) -> tuple[Tensor, Tensor]:
        return self.forward(lower), self.forward(upper)

    def _unpool(self, coef: Tensor, mask: Tensor) -> Tensor:
        """``coef`` (B, S, C, Ho, Wo) placed at the selected input of each window: ``mask``
        (B, Ho, k, Wo, k, C) one-hot per window; ``(B, S, *in_shape)``, zeros where the pool drops.
        One broadcast product writes the result, channels last (the layout the convolution
        pulled back next is fastest on)."""
        k = self.kernel
        b, s, c, ho, wo = coef.shape
        out = coef.permute(0, 1, 3, 4, 2)[:, :, :, None, :, None] * mask[:, None]
        out = out.reshape(b, s, ho * k, wo * k, c)
        h, w = self.in_shape[1:]
        if (h, w) != (ho * k, wo * k):
            out = F.pad(out, (0, 0, 0, w - wo * k, 0, h - ho * k))
        return out.permute(0, 1, 4, 2, 3)

    def relaxation(self, lower: Tensor, upper: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Per point and window: the selected input (``best`` (B, C, Ho·Wo), its flat index in
        the channel's H·W; ``mask`` (B, Ho, k, Wo, k, C) its one-hot), whether it dominates
        (``dominated``) and the constant upper line where it does not (``up_const``, 0 where it
        does). The selection is ``max_pool2d``'s index of the largest lower bound."""
        low_max, best = F.max_pool2d(lower, self.kernel, return_indices=True)
        best = best.flatten(2)
        knocked = upper.flatten(2).scatter(2, best, float("-inf")).view_as(upper)
        others = self.forward(knocked)
        dominated = low_max >= others
        up_const = torch.where(dominated, torch.zeros_like(others), self.forward(upper))
        k = self.kernel
        b, c, ho, wo = low_max.shape
        onehot = lower.new_zeros(b, c, lower.shape[-2] * lower.shape[-1]).scatter_(2, best, 1.0).view_as(lower)
        mask = onehot[:, :, : ho * k, : wo * k].permute(0, 2, 3, 1).reshape(b, ho, k, wo, k, c)
        return best, mask, dominated, up_const

    def back(
        self, A: Tensor, lower: Tensor, upper: Tensor, alpha: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        _, mask, dominated, up_const = self.relaxation(lower, upper)
        pos, neg = A.clamp(min=0), A.clamp(max=0)
        coef = pos + neg * dominated[:, None].to(A.dtype)
        bias = _dot(neg, up_const)
        return self._unpool(coef, mask), bias, -_dot(neg, up_const.abs())

    def back_after_relu(
        self, A: Tensor, bounds: tuple[Tensor, Tensor], relu_bounds: tuple[Tensor, Tensor], alpha: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """``ReLU.back(MaxPool.back(A))`` fused on the pooled shape: only the selected input of
        each window gets a non-zero coefficient, so the ReLU's lines are read there alone (the
        coefficients are the same products as the two pull-backs'; the bias sums are reordered).

        ``A ≥ 0``: ``A·lower slope``; ``A < 0``, dominated: ``A·upper slope``, bias ``A·intercept``;
        ``A < 0``, not dominated: 0, bias ``A·max u``."""
        best, mask, dominated, up_const = self.relaxation(*bounds)
        up_slope, up_icpt = relu_upper(*relu_bounds)
        low_slope = relu_lower_slope(*relu_bounds)

        def pick(t: Tensor) -> Tensor:
            return t.flatten(2).gather(2, best).view_as(dominated)

        us, icpt = pick(up_slope), pick(up_icpt)
        if alpha is None:
            ls = pick(low_slope)[:, None]
        else:
            unstable = (relu_bounds[0] < 0) & (relu_bounds[1] > 0)
            slopes = torch.where(unstable[:, None], alpha, low_slope[:, None])
            b, s = slopes.shape[:2]
            ls = slopes.flatten(3).gather(3, best[:, None].expand(b, s, -1, -1)).view(b, s, *dominated.shape[1:])
        pos, neg = A.clamp(min=0), A.clamp(max=0)
        coef = pos * ls + neg * (us * dominated.to(us.dtype))[:, None]
        const = torch.where(dominated, icpt, up_const)
        return self._unpool(coef, mask), _dot(neg, const), -_dot(neg, const.abs())


def _dot(A: Tensor, v: Tensor) -> Tensor:
    """``sum over the trailing dims of A[b, s] * v[b]``: (B, S) by a batched matrix product."""
    return (A.flatten(2) @ v.flatten(1)[:, :, None]).squeeze(-1)


def numel(shape: tuple[int, ...]) -> int:
    """Elements per point of a shape without the batch dimension."""
    return prod(shape)
