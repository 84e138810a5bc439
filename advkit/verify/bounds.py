"""Bound propagation: interval bounds (IBP) and linear relaxations (CROWN, alpha-CROWN).

A model (an ``nn.Sequential`` chain, nested chains allowed) is read into a :class:`Network`:
a chain of *ops*, each affine (Linear, Conv2d, the Normalize layer, eval-mode BatchNorm,
AvgPool2d, Flatten) or not (ReLU, MaxPool2d). *Position* ``i`` is the tensor entering op
``i``; position 0 is the input, position ``len(ops)`` the logits.

* IBP (Gowal et al. 2018, arXiv 1810.12715): intervals pushed forward, layer by layer.
* CROWN (Zhang et al. 2018, arXiv 1811.00866): a linear function of one position is bounded
  from below by a linear function of the input, walking the chain backwards and replacing
  each ReLU by a linear lower or upper bound (the chord above an unstable neuron; below
  it, slope 1 when ``u > -l`` else 0, the paper's adaptive choice), then minimised over
  the input set. Bounds on each ReLU's input (needed for its relaxation) come first, by
  the same backward pass from that position.
* alpha-CROWN (Xu et al. 2021, arXiv 2011.13824): the lower slopes of unstable ReLUs are
  free in [0, 1]; projected gradient ascent (Adam) on them tightens the final bounds.

Choices (all sound; they differ from auto_LiRPA's defaults only where noted):

* Input set ``ball(x, eps) ∩ box``. IBP starts from the box ``[x - eps, x + eps] ∩ box``
  (for Linf the set itself; for L2 and L1 the smallest box containing it). CROWN
  minimises ``a · x' + d`` over the ball with the dual norm, ``a · x - eps ||a||_*``
  (``||·||_2`` for L2, ``||·||_inf`` for L1), and over that box, and keeps the larger
  of the two (each is a valid lower bound; the exact minimum over ball ∩ box would be
  tighter still). For Linf the box is exact.
* Intermediate bounds: CROWN runs only on the neurons IBP leaves unstable (``l < 0 < u``;
  a neuron IBP proves stable has an exact relaxation already), and by default keeps the
  tighter of the two bounds (``intersect_ibp``; ``False`` keeps CROWN's, like auto_LiRPA's
  sparse intermediate bounds).
* MaxPool2d under CROWN: below, ``max_j x_j >= x_k`` for the ``k`` with the largest lower
  bound in the window; above, ``x_k`` when ``l_k`` is at least every other upper bound in
  the window (the max is then ``x_k`` exactly), else the constant ``max_j u_j``.
* alpha-CROWN optimises one slope per unstable neuron and per specification row
  (intermediate bounds stay CROWN's), starting from CROWN's slopes and keeping the best
  bound seen, so it is never looser than CROWN.

Everything is pure torch and batched; it runs where the model and inputs are, in their
dtype. The functions keep autograd's graph through the model's parameters (certified
training builds on that); :func:`advkit.verify.certify` runs them without gradients.
"""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from advkit.models.normalize import Normalize
from advkit.threat import ThreatModel

Interval = tuple[Tensor, Tensor]

#: Elements one backward pass may hold at once (A's batch x rows x widest layer); the rows
#: of an intermediate layer's specification are split into chunks under it.
MAX_ELEMENTS = 2 ** 25

#: Lower slopes of unstable ReLUs CROWN may use: the paper's adaptive rule, or the zero
#: slope (which makes CROWN provably no looser than IBP, see :func:`layer_bounds`).
LOWER_SLOPES = ("adaptive", "zero")


# --------------------------------------------------------------------------------------
# Ops: the layers bounds propagate through
# --------------------------------------------------------------------------------------

class _Op(abc.ABC):
    """One layer of the chain. ``kind`` is ``"affine"``, ``"relu"`` or ``"maxpool"``."""

    kind = "affine"

    def __init__(self, name: str) -> None:
        self.name = name

    @abc.abstractmethod
    def forward(self, x: Tensor) -> Tensor:
        """The layer itself, on a batch."""

    @abc.abstractmethod
    def interval(self, lower: Tensor, upper: Tensor) -> Interval:
        """Elementwise bounds on the output over the box ``[lower, upper]`` (IBP)."""

    def transpose(self, a: Tensor) -> tuple[Tensor, Tensor]:
        """For an affine op ``f(h) = W h + b`` and rows ``a`` (N, S, *out): ``(a W, a b)``.

        Only affine ops have one; CROWN relaxes ReLU and MaxPool instead of calling this.
        """
        raise TypeError(f"{type(self).__name__} is not affine: it has no transpose")


def _rows(a: Tensor, shape: tuple[int, ...]) -> Tensor:
    """Fold the batch and row axes of ``a`` (N, S, *out) into one for a layer call."""
    return a.reshape(-1, *shape)


class _Linear(_Op):
    def __init__(self, name: str, weight: Tensor, bias: Tensor | None) -> None:
        super().__init__(name)
        self.weight, self.bias = weight, bias

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)

    def interval(self, lower: Tensor, upper: Tensor) -> Interval:
        mid, rad = (upper + lower) / 2, (upper - lower) / 2
        center, radius = F.linear(mid, self.weight, self.bias), F.linear(rad, self.weight.abs())
        return center - radius, center + radius

    def transpose(self, a: Tensor) -> tuple[Tensor, Tensor]:
        bias = a @ self.bias if self.bias is not None else a.new_zeros(a.shape[:2])
        return a @ self.weight, bias


class _Conv(_Op):
    def __init__(self, name: str, weight: Tensor, bias: Tensor | None,
                 geometry: tuple[tuple[int, int], ...], groups: int,
                 shapes: tuple[tuple[int, ...], tuple[int, ...]]) -> None:
        super().__init__(name)
        self.weight, self.bias, self.groups = weight, bias, groups
        self.stride, self.padding, self.dilation = geometry
        self.in_shape, self.out_shape = shapes

    def _conv(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)

    def forward(self, x: Tensor) -> Tensor:
        return self._conv(x, self.weight, self.bias)

    def interval(self, lower: Tensor, upper: Tensor) -> Interval:
        mid, rad = (upper + lower) / 2, (upper - lower) / 2
        center = self._conv(mid, self.weight, self.bias)
        radius = self._conv(rad, self.weight.abs(), None)
        return center - radius, center + radius

    def transpose(self, a: Tensor) -> tuple[Tensor, Tensor]:
        n, s = a.shape[:2]
        # The adjoint of a convolution is its input gradient (a transposed convolution
        # whose output padding torch works out from the input size).
        back = torch.nn.grad.conv2d_input((n * s, *self.in_shape), self.weight,
                                          _rows(a, self.out_shape), self.stride, self.padding,
                                          self.dilation, self.groups)
        bias = (a.sum(dim=(-2, -1)) @ self.bias if self.bias is not None
                else a.new_zeros(n, s))
        return back.view(n, s, *self.in_shape), bias


class _Scale(_Op):
    """``x * scale + shift`` with per-channel (or per-feature) ``scale`` and ``shift``:
    the Normalize layer and eval-mode batch norm."""

    def __init__(self, name: str, scale: Tensor, shift: Tensor) -> None:
        super().__init__(name)
        self.scale, self.shift = scale, shift

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale + self.shift

    def interval(self, lower: Tensor, upper: Tensor) -> Interval:
        a, b = self.forward(lower), self.forward(upper)
        return torch.minimum(a, b), torch.maximum(a, b)

    def transpose(self, a: Tensor) -> tuple[Tensor, Tensor]:
        return a * self.scale, (a * self.shift).flatten(2).sum(-1)


class _Reshape(_Op):
    def __init__(self, name: str, in_shape: tuple[int, ...], out_shape: tuple[int, ...]
                 ) -> None:
        super().__init__(name)
        self.in_shape, self.out_shape = in_shape, out_shape

    def forward(self, x: Tensor) -> Tensor:
        return x.reshape(x.shape[0], *self.out_shape)

    def interval(self, lower: Tensor, upper: Tensor) -> Interval:
        return self.forward(lower), self.forward(upper)

    def transpose(self, a: Tensor) -> tuple[Tensor, Tensor]:
        return a.reshape(*a.shape[:2], *self.in_shape), a.new_zeros(a.shape[:2])


class _ReLU(_Op):
    kind = "relu"

    def forward(self, x: Tensor) -> Tensor:
        return x.clamp_min(0)

    def interval(self, lower: Tensor, upper: Tensor) -> Interval:
        return lower.clamp_min(0), upper.clamp_min(0)

    @staticmethod
    def adaptive_slope(lower: Tensor, upper: Tensor) -> Tensor:
        """CROWN's lower slope for unstable neurons: 1 when ``u > -l``, else 0 (the choice
        that minimises the relaxation's area)."""
        return (upper > -lower).to(lower.dtype)

    def backward(self, a: Tensor, lower: Tensor, upper: Tensor, slope: Tensor | str
                 ) -> tuple[Tensor, Tensor]:
        """Rows ``a`` (N, S, *shape) on the ReLU's output -> rows on its input, and the
        constant, for a lower bound: positive coefficients take the lower relaxation
        (``slope * z``), negative ones the chord ``u (z - l) / (u - l)``."""
        lower, upper = lower.unsqueeze(1), upper.unsqueeze(1)
        active, unstable = lower >= 0, (lower < 0) & (upper > 0)
        chord = upper / (upper - lower).clamp_min(torch.finfo(lower.dtype).tiny)
        up_slope = torch.where(unstable, chord, active.to(a.dtype))
        up_bias = torch.where(unstable, -chord * lower, 0.0)
        if isinstance(slope, str):
            slope = (self.adaptive_slope(lower, upper) if slope == "adaptive"
                     else torch.zeros_like(lower))
        low_slope = torch.where(unstable, slope, active.to(a.dtype))
        neg = a.clamp_max(0)
        # One pass per term over A (the largest tensor here), the constant as a product.
        back = a * torch.where(a > 0, low_slope, up_slope)
        return back, torch.einsum("nsd,nd->ns", neg.flatten(2), up_bias.flatten(1))


class _MaxPool(_Op):
    kind = "maxpool"

    def __init__(self, name: str, pool: nn.MaxPool2d, in_shape: tuple[int, ...],
                 out_shape: tuple[int, ...]) -> None:
        super().__init__(name)
        self.kernel, self.stride = _pair(pool.kernel_size), _pair(pool.stride)
        self.padding, self.dilation = _pair(pool.padding), _pair(pool.dilation)
        self.in_shape, self.out_shape = in_shape, out_shape

    def forward(self, x: Tensor) -> Tensor:
        return F.max_pool2d(x, self.kernel, self.stride, self.padding, self.dilation)

    def interval(self, lower: Tensor, upper: Tensor) -> Interval:
        return self.forward(lower), self.forward(upper)  # max is monotone: exact

    def _windows(self, t: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, C, window, L): every pooling window's values, padding as
        -inf (the value max pooling pads with)."""
        ph, pw = self.padding
        t = F.pad(t, (pw, pw, ph, ph), value=-math.inf)
        cols = F.unfold(t, self.kernel, dilation=self.dilation, stride=self.stride)
        return cols.view(t.shape[0], t.shape[1], self.kernel[0] * self.kernel[1], -1)

    def backward(self, a: Tensor, lower: Tensor, upper: Tensor) -> tuple[Tensor, Tensor]:
        n, s = a.shape[:2]
        lw, uw = self._windows(lower), self._windows(upper)
        k = lw.argmax(dim=2, keepdim=True)  # (N, C, 1, L): the largest lower bound
        others = uw.scatter(2, k, -math.inf).amax(dim=2)
        exact = lw.gather(2, k).squeeze(2) >= others  # x_k is the max on the whole set
        top = uw.amax(dim=2)
        a = a.reshape(n, s, a.shape[2], -1)
        pos, neg = a.clamp_min(0), a.clamp_max(0)
        exact = exact.unsqueeze(1)
        coef = pos + torch.where(exact, neg, 0.0)
        bias = torch.where(exact, 0.0, neg * top.unsqueeze(1)).flatten(2).sum(-1)
        window = torch.zeros(n, s, *lw.shape[1:], dtype=a.dtype, device=a.device)
        window.scatter_(3, k.unsqueeze(1).expand(n, s, -1, -1, -1), coef.unsqueeze(3))
        c, h, w = self.in_shape
        ph, pw = self.padding
        # fold is unfold's adjoint: it adds up the windows' coefficients where they overlap.
        back = F.fold(window.view(n * s, -1, window.shape[-1]), (h + 2 * ph, w + 2 * pw),
                      self.kernel, dilation=self.dilation, stride=self.stride)
        back = back[:, :, ph:ph + h, pw:pw + w]
        return back.reshape(n, s, c, h, w), bias


def _pair(v: int | tuple[int, ...]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _conv_padding(conv: nn.Conv2d) -> tuple[int, int]:
    if conv.padding_mode != "zeros":
        raise ValueError(f"Conv2d with padding_mode={conv.padding_mode!r} is not supported "
                         "by bound propagation; use padding_mode='zeros'")
    if isinstance(conv.padding, str):
        if conv.padding == "valid":
            return (0, 0)
        totals = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size, strict=True)]
        if any(t % 2 for t in totals):
            raise ValueError("Conv2d(padding='same') with an even kernel pads asymmetrically, "
                             "which bound propagation does not support; pad explicitly")
        return (totals[0] // 2, totals[1] // 2)
    return _pair(conv.padding)


# --------------------------------------------------------------------------------------
# Reading a model into a chain of ops
# --------------------------------------------------------------------------------------

SUPPORTED = ("Linear", "Conv2d", "ReLU", "Flatten", "Unflatten", "Normalize", "BatchNorm1d",
             "BatchNorm2d", "AvgPool2d", "MaxPool2d", "Identity", "Dropout")


@dataclass(frozen=True)
class Network:
    """A model as a chain of ops that bounds propagate through.

    ``shapes[i]`` is the per-sample shape at position ``i`` (the input of ``ops[i]``);
    ``shapes[-1]`` is the logits' shape. Build it with :func:`network`.
    """

    ops: tuple[_Op, ...]
    shapes: tuple[tuple[int, ...], ...]

    def forward(self, x: Tensor) -> Tensor:
        for op in self.ops:
            x = op.forward(x)
        return x

    @property
    def num_classes(self) -> int:
        return self.shapes[-1][0]

    @property
    def relu_positions(self) -> list[int]:
        """Positions of every ReLU's input (its pre-activation), in order."""
        return [i for i, op in enumerate(self.ops) if op.kind == "relu"]


def _leaves(module: nn.Module, prefix: str) -> list[tuple[str, nn.Module]]:
    if isinstance(module, nn.Sequential):
        return [leaf for name, child in module.named_children()
                for leaf in _leaves(child, f"{prefix}.{name}" if prefix else name)]
    return [(prefix or "0", module)]


def network(model: nn.Module, example: Tensor) -> Network:
    """Read ``model`` into a :class:`Network` (shapes from ``example``, one or more inputs).

    The model must be in eval mode and an ``nn.Sequential`` chain (nested chains allowed)
    of the layers in :data:`SUPPORTED`. Each op is checked against its layer on
    ``example[:1]``, so a layer misread would be refused here, not give wrong bounds.

    Raises:
        ValueError: a train-mode model, a model that is not a chain, an unsupported layer
            (named with its position) or layer option.
    """
    if any(m.training for m in model.modules()):
        raise ValueError("bounds of a model in train mode mean nothing (batch norm and "
                         "dropout change with the batch): call model.eval() first")
    if not isinstance(model, nn.Sequential):
        raise ValueError(
            f"bound propagation reads nn.Sequential chains; {type(model).__name__} has its "
            "own forward, whose order of layers cannot be read from its modules. Rebuild it "
            f"as nn.Sequential of the supported layers ({', '.join(SUPPORTED)})")
    x = example[:1].detach()
    ops: list[_Op] = []
    shapes = [tuple(x.shape[1:])]
    for position, (name, layer) in enumerate(_leaves(model, "")):
        label = f"layer {name} ({type(layer).__name__}, position {position})"
        with torch.no_grad():
            out = layer(x)
        # Read in the caller's grad mode: an op's tensors derived from parameters (batch
        # norm's scale, a spectrally normalised weight) then stay on autograd's graph, so a
        # loss on the bounds trains them (certified training).
        op = _read_layer(layer, label, x, out)
        if op is not None:
            with torch.no_grad():
                mine = op.forward(x)
            scale = 1e-4 * (1 + out.abs().max().item())
            if mine.shape != out.shape or (mine - out).abs().max().item() > scale:
                raise ValueError(f"{label}: bound propagation reads this layer differently "
                                 "from its forward; it is not supported as configured")
            ops.append(op)
            shapes.append(tuple(out.shape[1:]))
        x = out
    if len(shapes[-1]) != 1:
        raise ValueError(f"the model must return logits of shape (N, classes) (got per-sample "
                         f"shape {shapes[-1]}): end it with Flatten/Linear")
    return Network(tuple(ops), tuple(shapes))


def _read_layer(layer: nn.Module, label: str, x: Tensor, out: Tensor) -> _Op | None:
    in_shape, out_shape = tuple(x.shape[1:]), tuple(out.shape[1:])
    if isinstance(layer, nn.Identity | nn.Dropout):
        return None  # the identity (dropout in eval mode too)
    if isinstance(layer, nn.Linear):
        if len(in_shape) != 1:
            raise ValueError(f"{label}: Linear on inputs of shape {in_shape} is not supported; "
                             "put a Flatten before it")
        return _Linear(label, layer.weight, layer.bias)
    if isinstance(layer, nn.Conv2d):
        geometry = (_pair(layer.stride), _conv_padding(layer), _pair(layer.dilation))
        return _Conv(label, layer.weight, layer.bias, geometry, layer.groups,
                     (in_shape, out_shape))
    if isinstance(layer, nn.ReLU):
        return _ReLU(label)
    if isinstance(layer, nn.Flatten | nn.Unflatten):
        return _Reshape(label, in_shape, out_shape)
    if isinstance(layer, Normalize):
        std, mean = layer.std.view(-1, 1, 1), layer.mean.view(-1, 1, 1)
        return _Scale(label, 1 / std, -mean / std)
    if isinstance(layer, nn.BatchNorm1d | nn.BatchNorm2d):
        if layer.running_mean is None or layer.running_var is None:
            raise ValueError(f"{label}: batch norm without running statistics normalises "
                             "with the batch's own, even in eval mode; bounds need "
                             "track_running_stats=True")
        scale = torch.rsqrt(layer.running_var + layer.eps)
        if layer.weight is not None:
            scale = scale * layer.weight
        shift = -layer.running_mean * scale
        if layer.bias is not None:
            shift = shift + layer.bias
        # Per channel: (C, 1, 1) for images, (C,) for features (BatchNorm1d on (N, C)).
        view = (-1,) + (1,) * (len(in_shape) - 1)
        return _Scale(label, scale.view(view), shift.view(view))
    if isinstance(layer, nn.AvgPool2d):
        if layer.ceil_mode or (not layer.count_include_pad and _pair(layer.padding) != (0, 0)):
            raise ValueError(f"{label}: AvgPool2d with ceil_mode=True or count_include_pad="
                             "False averages partial windows by their own size; use the "
                             "defaults (ceil_mode=False, count_include_pad=True)")
        kh, kw = _pair(layer.kernel_size)
        channels = in_shape[0]
        divisor = layer.divisor_override or kh * kw
        # Average pooling is a depthwise convolution with a constant kernel.
        kernel = torch.full((channels, 1, kh, kw), 1.0 / divisor, dtype=x.dtype,
                            device=x.device)
        geometry = (_pair(layer.stride or layer.kernel_size), _pair(layer.padding), (1, 1))
        return _AvgPool(label, kernel, None, geometry, channels, (in_shape, out_shape))
    if isinstance(layer, nn.MaxPool2d):
        if layer.ceil_mode or layer.return_indices:
            raise ValueError(f"{label}: MaxPool2d with ceil_mode=True or return_indices=True "
                             "is not supported; use the defaults")
        return _MaxPool(label, layer, in_shape, out_shape)
    raise ValueError(f"{label} is not supported by bound propagation; supported layers: "
                     f"{', '.join(SUPPORTED)}")


class _AvgPool(_Conv):
    """A depthwise convolution with a constant, positive kernel."""

    def interval(self, lower: Tensor, upper: Tensor) -> Interval:
        return self.forward(lower), self.forward(upper)  # positive weights: monotone


# --------------------------------------------------------------------------------------
# The input set
# --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class InputSet:
    """``ball(center, eps) ∩ [lo, hi]``, per sample, and the box ``[lower, upper]``
    (``[center - eps, center + eps] ∩ [lo, hi]``) that contains it."""

    center: Tensor
    eps: float
    norm: str
    lower: Tensor
    upper: Tensor

    @classmethod
    def from_threat(cls, x: Tensor, threat: ThreatModel) -> InputSet:
        lo, hi = threat.bounds
        return cls(x, threat.eps, threat.norm, (x - threat.eps).clamp(lo, hi),
                   (x + threat.eps).clamp(lo, hi))

    def box_lower(self, a: Tensor, lower: Tensor, upper: Tensor) -> Tensor:
        """min of ``a · h`` (rows ``a``: N, S, *shape) over the box ``[lower, upper]``."""
        mid, rad = (upper + lower) / 2, (upper - lower) / 2
        flat = a.flatten(2)
        return (torch.einsum("nsd,nd->ns", flat, mid.flatten(1))
                - torch.einsum("nsd,nd->ns", flat.abs(), rad.flatten(1)))

    def minimum(self, a: Tensor) -> Tensor:
        """A lower bound on ``min a · x'`` over the set (exact for Linf); rows (N, S)."""
        box = self.box_lower(a, self.lower, self.upper)
        if self.norm == "linf":
            return box
        flat = a.flatten(2)
        dual = flat.norm(dim=-1) if self.norm == "l2" else flat.abs().amax(dim=-1)
        ball = torch.einsum("nsd,nd->ns", flat, self.center.flatten(1)) - self.eps * dual
        return torch.maximum(ball, box)


# --------------------------------------------------------------------------------------
# IBP, CROWN, alpha-CROWN
# --------------------------------------------------------------------------------------

def _first_linear(net: Network, region: InputSet) -> tuple[int, Interval] | None:
    """For an L2 or L1 ball and a model that starts with per-channel scalings and
    reshapes, then a Linear or Conv2d layer (L1: ungrouped): that layer's exact bounds over
    the ball, ``W' x + b' ± eps ||W'_i||_*`` (``W'`` the composed map), and its position."""
    if region.norm == "linf":
        return None
    scale = torch.ones(net.shapes[0], dtype=region.center.dtype, device=region.center.device)
    for i, op in enumerate(net.ops):
        if isinstance(op, _Scale):
            scale = scale * op.scale  # op.scale broadcasts against the current shape
        elif isinstance(op, _Reshape):
            scale = scale.expand(op.in_shape).reshape(op.out_shape)
        elif isinstance(op, _Linear):
            weight = op.weight * scale.flatten()
            dual = weight.norm(dim=1) if region.norm == "l2" else weight.abs().amax(dim=1)
            return i + 1, _around_center(net, region, i, dual)
        elif isinstance(op, _Conv) and (region.norm == "l2" or op.groups == 1):
            # Each output's row of the convolution is its kernel times the scalings over
            # its receptive field (zero where the padding is): the dual norm of that row.
            s = scale.expand(op.in_shape).unsqueeze(0)
            if region.norm == "l2":
                dual = op._conv(s * s, op.weight * op.weight, None).clamp_min(0).sqrt()[0]
            else:
                patches = F.unfold(s, op.weight.shape[-2:], op.dilation, op.padding,
                                   op.stride)[0]                      # (C*k*k, L)
                dual = (op.weight.abs().flatten(1)[:, :, None] * patches[None]).amax(1)
                dual = dual.view(op.out_shape)
            return i + 1, _around_center(net, region, i, dual)
        else:
            return None
    return None


def _around_center(net: Network, region: InputSet, i: int, dual: Tensor) -> Interval:
    """``f(center) ± eps * dual`` for the affine chain ``ops[:i + 1]`` (``eps`` one per
    sample or one for all)."""
    center = region.center
    for before in net.ops[:i + 1]:
        center = before.forward(center)
    eps = region.eps
    if isinstance(eps, Tensor):
        eps = eps.reshape(-1, *([1] * (center.dim() - 1)))
    return center - eps * dual, center + eps * dual


def interval_bounds(net: Network, region: InputSet) -> list[Interval]:
    """IBP: an interval at every position (``len(net.ops) + 1`` of them).

    It starts from the box containing the input set. For an L2 or L1 ball, the first
    Linear or Conv2d layer (after Normalize/Flatten only; for L1 an ungrouped Conv2d) is
    bounded exactly over the ball instead where that is tighter (as auto_LiRPA's IBP does).
    """
    first = _first_linear(net, region)
    bounds = [(region.lower, region.upper)]
    for i, op in enumerate(net.ops):
        lower, upper = op.interval(*bounds[-1])
        if first is not None and first[0] == i + 1:
            lower, upper = torch.maximum(lower, first[1][0]), torch.minimum(upper, first[1][1])
        bounds.append((lower, upper))
    return bounds


def backward_lower(net: Network, region: InputSet, bounds: list[Interval], spec: Tensor,
                   position: int | None = None, *, slopes: dict[int, Tensor] | None = None,
                   lower_slope: str = "adaptive") -> Tensor:
    """CROWN: lower bounds on ``spec · h`` over the input set, ``h`` the tensor at
    ``position`` (the logits by default); ``spec`` is (N, S, *shape) -> (N, S).

    ``bounds[i]`` must hold sound bounds on every nonlinear op's input before
    ``position``. ``slopes`` maps a ReLU's op index to its lower slopes (N, S, *shape)
    (alpha-CROWN); the others take ``lower_slope``.
    """
    position = len(net.ops) if position is None else position
    a, const = spec, spec.new_zeros(spec.shape[:2])
    for i in reversed(range(position)):
        op = net.ops[i]
        if op.kind == "relu":
            slope = slopes[i] if slopes is not None and i in slopes else lower_slope
            a, bias = op.backward(a, *bounds[i], slope)
        elif op.kind == "maxpool":
            a, bias = op.backward(a, *bounds[i])
        else:
            a, bias = op.transpose(a)
        const = const + bias
    return region.minimum(a) + const


def ibp_lower(net: Network, region: InputSet, bounds: list[Interval], spec: Tensor
              ) -> Tensor:
    """IBP's lower bounds on ``spec · logits``, with ``spec`` folded into the affine ops
    after the last nonlinear one (for margins, ``z_y - z_j`` is bounded as one linear
    function of the last hidden layer rather than as a difference of two intervals)."""
    last = max((i + 1 for i, op in enumerate(net.ops) if op.kind != "affine"), default=0)
    a, const = spec, spec.new_zeros(spec.shape[:2])
    for op in reversed(net.ops[last:]):
        a, bias = op.transpose(a)
        const = const + bias
    if last == 0:
        return region.minimum(a) + const  # an affine model: exact over the input set
    return region.box_lower(a, *bounds[last]) + const


def _chunk_rows(net: Network, position: int, batch: int) -> int:
    widest = max(math.prod(shape) for shape in net.shapes[:position + 1])
    return max(1, MAX_ELEMENTS // max(1, 2 * batch * widest))


def _refine(net: Network, region: InputSet, bounds: list[Interval], position: int,
            ibp: Interval, intersect_ibp: bool, lower_slope: str) -> Interval:
    """CROWN bounds at ``position`` on the neurons IBP leaves unstable."""
    lower, upper = ibp
    n = lower.shape[0]
    shape = net.shapes[position]
    if net.ops[position].kind == "relu":
        open_ = ((lower < 0) & (upper > 0)).flatten(1)
    else:  # max pooling reads every input's bounds
        open_ = torch.ones_like(lower, dtype=torch.bool).flatten(1)
    counts = open_.sum(dim=1)
    total = int(counts.max().item()) if n else 0
    if total == 0:
        return lower, upper
    # Each sample's open neurons first (a stable sort keeps their order), padded rows last.
    order = torch.sort(open_.to(torch.uint8), dim=1, descending=True, stable=True).indices
    order = order[:, :total]
    valid = torch.arange(total, device=lower.device) < counts.unsqueeze(1)
    low, up = lower.flatten(1).clone(), upper.flatten(1).clone()
    step = _chunk_rows(net, position, n)
    dim = low.shape[1]
    for start in range(0, total, step):
        idx = order[:, start:start + step]
        s = idx.shape[1]
        spec = lower.new_zeros(n, 2 * s, dim)
        rows = torch.arange(s, device=lower.device).expand(n, s)
        spec[torch.arange(n, device=lower.device)[:, None], rows, idx] = 1.0
        spec[torch.arange(n, device=lower.device)[:, None], rows + s, idx] = -1.0
        bound = backward_lower(net, region, bounds, spec.view(n, 2 * s, *shape), position,
                               lower_slope=lower_slope)
        new_low, new_up = bound[:, :s], -bound[:, s:]
        old_low, old_up = low.gather(1, idx), up.gather(1, idx)
        if intersect_ibp:
            new_low, new_up = torch.maximum(new_low, old_low), torch.minimum(new_up, old_up)
        keep = valid[:, start:start + s]
        low = low.scatter(1, idx, torch.where(keep, new_low, old_low))
        up = up.scatter(1, idx, torch.where(keep, new_up, old_up))
    return low.view_as(lower), up.view_as(upper)


def layer_bounds(net: Network, region: InputSet, method: str = "crown", *,
                 intersect_ibp: bool = True, lower_slope: str = "adaptive") -> list[Interval]:
    """Bounds at every position: IBP's, or CROWN's at the inputs of nonlinear ops.

    Args:
        net: the model, from :func:`network`.
        region: the input set.
        method: ``"ibp"`` (intervals only) or ``"crown"`` (each nonlinear op's input
            that an affine op computes is bounded by a CROWN backward pass through
            everything below it; between, intervals).
        intersect_ibp: keep the tighter of CROWN's and IBP's bounds (both sound).
        lower_slope: ``"adaptive"`` (CROWN) or ``"zero"``: with ``"zero"`` and
            ``method="ibp"`` intermediate bounds, :func:`backward_lower` is never looser
            than IBP (the zero slope and the chord each concretise to IBP's own ReLU
            interval, and an affine map's interval concretisation only loosens).

    Returns:
        ``len(net.ops) + 1`` intervals (lower, upper), each (N, *shape); entry ``i`` for
        a ReLU op ``i`` is its pre-activation bounds (what MILP big-M constants need).
    """
    if method not in ("ibp", "crown"):
        raise ValueError(f"method must be 'ibp' or 'crown' (got {method!r})")
    if lower_slope not in LOWER_SLOPES:
        raise ValueError(f"lower_slope must be one of {', '.join(LOWER_SLOPES)} "
                         f"(got {lower_slope!r})")
    first = _first_linear(net, region)
    bounds = [(region.lower, region.upper)]
    diagonal = True  # every op so far maps a box onto a box (scalings and reshapes)
    for i, op in enumerate(net.ops):
        interval = op.interval(*bounds[-1])
        nxt = i + 1
        # After diagonal maps, one more affine op's interval is exact over a box (Linf),
        # and _first_linear's over a ball: CROWN could not do better there.
        exact = diagonal and region.norm == "linf"
        if first is not None and first[0] == nxt:
            interval = (torch.maximum(interval[0], first[1][0]),
                        torch.minimum(interval[1], first[1][1]))
            exact = True
        diagonal = diagonal and isinstance(op, _Scale | _Reshape)
        if (method == "crown" and not exact and op.kind == "affine" and nxt < len(net.ops)
                and net.ops[nxt].kind != "affine"):
            interval = _refine(net, region, bounds + [interval], nxt, interval,
                               intersect_ibp, lower_slope)
        bounds.append(interval)
    return bounds


def alpha_crown_lower(net: Network, region: InputSet, bounds: list[Interval], spec: Tensor,
                      *, steps: int = 20, lr: float = 0.1) -> Tensor:
    """alpha-CROWN: CROWN's bounds on ``spec · logits`` with the lower slopes of unstable
    ReLUs optimised (Adam, ``steps`` steps at learning rate ``lr``, projected onto
    [0, 1]), one slope per neuron and per row of ``spec``. Starts at CROWN's adaptive
    slopes and returns the best bound of every row over all ``steps + 1`` evaluations."""
    if steps < 0 or not lr > 0:
        raise ValueError(f"alpha-CROWN needs steps >= 0 and lr > 0 (got {steps}, {lr})")
    n, s = spec.shape[:2]
    slopes = {}
    for i, op in enumerate(net.ops):
        if op.kind == "relu":
            init = _ReLU.adaptive_slope(*bounds[i]).unsqueeze(1)
            slopes[i] = init.expand(n, s, *init.shape[2:]).detach().clone().requires_grad_()
    best = None
    optimiser = torch.optim.Adam(list(slopes.values()), lr=lr) if slopes else None
    for step in range(steps + 1):
        with torch.enable_grad():
            bound = backward_lower(net, region, bounds, spec, slopes=slopes)
            loss = -bound.sum()  # the samples' and rows' slopes are separate: one sum
        best = bound.detach() if best is None else torch.maximum(best, bound.detach())
        if step == steps or optimiser is None:
            break
        # Gradients for the slopes only: the model's parameters are left untouched.
        grads = torch.autograd.grad(loss, list(slopes.values()))
        for slope, grad in zip(slopes.values(), grads, strict=True):
            slope.grad = grad
        optimiser.step()
        with torch.no_grad():
            for slope in slopes.values():
                slope.clamp_(0, 1)
    return best
