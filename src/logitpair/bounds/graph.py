"""A model as a chain of :mod:`~logitpair.bounds.ops`: traced with ``torch.fx``, checked, converted.

The model's ``forward`` is traced symbolically (``torch.nn`` layers and the models' input
``Normalize``, recognised by its class name and its ``mean``/``std`` buffers, stay whole), so
``nn.Sequential`` nesting and modules whose ``forward`` calls their children one after the
other (``LeNet``: ``classifier(features(x))``) flatten into one chain. Each step must take the
previous step's output and nothing else; the chain's output on an example is compared with the
model's. Anything else is a :class:`~logitpair.errors.ConfigError` naming the layer.
"""

from __future__ import annotations

import itertools
import operator
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from logitpair.bounds.ops import ChannelAffine, Conv, Dense, MaxPool, Op, Pool, ReLU, Reshape
from logitpair.errors import ConfigError

SUPPORTED = (
    "Linear, Conv2d (dilation 1, groups 1), ReLU (module, F.relu, torch.relu), MaxPool2d (kernel = stride, "
    "no padding), Flatten, AvgPool2d, AdaptiveAvgPool2d, BatchNorm1d/2d (running statistics), Normalize "
    "(mean/std buffers), Identity, Dropout, Sequential nesting, global mean over (2, 3)"
)


def is_normalize(module: nn.Module) -> bool:
    """The models' ``Normalize`` layer, by duck typing: ``(x - mean) / std`` with those buffers."""
    buffers = dict(module.named_buffers(recurse=False))
    return type(module).__name__ == "Normalize" and {"mean", "std"} <= buffers.keys()


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return is_normalize(m) or super().is_leaf_module(m, module_qualified_name)


def unsupported(what: str) -> ConfigError:
    return ConfigError(f"bound propagation does not support {what}; supported: {SUPPORTED}")


def _pair(v: int | tuple[int, ...]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _conv(m: nn.Conv2d) -> Op:
    if _pair(m.dilation) != (1, 1) or m.groups != 1 or m.padding_mode != "zeros" or isinstance(m.padding, str):
        raise unsupported(f"Conv2d with dilation {m.dilation}, groups {m.groups}, padding {m.padding!r}")
    return Conv(m.weight, m.bias, _pair(m.stride), _pair(m.padding))


def _maxpool(m: nn.MaxPool2d) -> Op:
    k, s = _pair(m.kernel_size), _pair(m.stride if m.stride is not None else m.kernel_size)
    if k[0] != k[1] or k != s or _pair(m.padding) != (0, 0) or _pair(m.dilation) != (1, 1) or m.ceil_mode:
        raise unsupported(
            f"MaxPool2d({m.kernel_size}, stride={m.stride}, padding={m.padding}, ceil_mode={m.ceil_mode})"
        )
    return MaxPool(k[0])


def _batchnorm(m: nn.modules.batchnorm._BatchNorm) -> Op:
    if m.running_mean is None or m.running_var is None:
        raise unsupported(f"{type(m).__name__} without running statistics")
    scale = torch.rsqrt(m.running_var + m.eps)
    if m.weight is not None:
        scale = scale * m.weight
    shift = -m.running_mean * scale + (m.bias if m.bias is not None else 0.0)
    trailing = (1, 1) if isinstance(m, nn.BatchNorm2d) else ()
    return ChannelAffine(scale.view(-1, *trailing), shift.view(-1, *trailing))


def _normalize(m: nn.Module) -> Op:
    mean, std = m.mean.flatten(), m.std.flatten()
    return ChannelAffine((1 / std).view(-1, 1, 1), (-mean / std).view(-1, 1, 1))


def _flatten(m: nn.Flatten) -> Op:
    if m.start_dim != 1 or m.end_dim != -1:
        raise unsupported(f"Flatten(start_dim={m.start_dim}, end_dim={m.end_dim})")
    return Reshape(1)


_MODULES: dict[type, Callable[[nn.Module], Op | None]] = {
    nn.Linear: lambda m: Dense(m.weight, m.bias),
    nn.Conv2d: _conv,
    nn.ReLU: lambda m: ReLU(),
    nn.MaxPool2d: _maxpool,
    nn.Flatten: _flatten,
    nn.AvgPool2d: lambda m: Pool(m.forward),
    nn.AdaptiveAvgPool2d: lambda m: Pool(m.forward),
    nn.BatchNorm1d: _batchnorm,
    nn.BatchNorm2d: _batchnorm,
    nn.Identity: lambda m: None,
    nn.Dropout: lambda m: None,
}


def _module_op(module: nn.Module) -> Op | None:
    if is_normalize(module):
        return _normalize(module)
    convert = _MODULES.get(type(module))
    if convert is None:
        raise unsupported(f"layer {type(module).__name__}")
    return convert(module)


def _mean_op(node: fx.Node) -> Op:
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    keepdim = node.kwargs.get("keepdim", False) or (len(node.args) > 2 and node.args[2])
    if tuple(dims or ()) not in ((2, 3), (-2, -1)) or keepdim:
        raise unsupported(f"mean over {dims} (keepdim={keepdim})")
    return Pool(lambda z: z.mean((2, 3)))


def _flatten_op(node: fx.Node) -> Op:
    start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
    if start != 1 or len(node.args) > 2 or "end_dim" in node.kwargs:
        raise unsupported(f"flatten with arguments {node.args[1:]} {node.kwargs}")
    return Reshape(1)


_FUNCTIONS: dict[object, Callable[[fx.Node], Op]] = {
    F.relu: lambda n: ReLU(),
    torch.relu: lambda n: ReLU(),
    torch.flatten: _flatten_op,
    torch.mean: _mean_op,
}
_METHODS: dict[str, Callable[[fx.Node], Op]] = {"relu": lambda n: ReLU(), "flatten": _flatten_op, "mean": _mean_op}


def _node_op(node: fx.Node, modules: dict[str, nn.Module]) -> Op | None:
    if node.op == "call_module":
        return _module_op(modules[str(node.target)])
    if node.op == "call_function" and node.target in _FUNCTIONS:
        return _FUNCTIONS[node.target](node)
    if node.op == "call_method" and node.target in _METHODS:
        return _METHODS[str(node.target)](node)
    if node.target in (operator.add, torch.add, "add"):
        raise unsupported("a residual addition (the models' residual blocks are not supported yet)")
    name = getattr(node.target, "__name__", node.target)
    raise unsupported(f"the operation {name!r} ({node.op}) in the model's forward")


def _trace(model: nn.Module) -> fx.Graph:
    try:
        return _Tracer().trace(model)
    except Exception as exc:  # fx raises many types on data-dependent control flow
        raise ConfigError(
            f"bound propagation could not trace {type(model).__name__}.forward as a chain of layers: {exc}"
        ) from exc


def _check_chain(node: fx.Node, previous: fx.Node) -> None:
    tensors = [a for a in node.all_input_nodes]
    if tensors != [previous] or len(previous.users) != 1:
        raise ConfigError(
            f"bound propagation needs a chain of layers; {node.name} ({node.op} {node.target}) takes "
            f"{[t.name for t in tensors]} after {previous.name}"
        )


def trace_chain(model: nn.Module) -> list[Op]:
    """The model's layers as a list of ops, in forward order (no shapes yet)."""
    graph = _trace(model)
    modules = dict(model.named_modules())
    nodes = [n for n in graph.nodes if n.op != "output"]
    converted = [_node_op(n, modules) for n in nodes if n.op != "placeholder"]
    for previous, node in itertools.pairwise(nodes):
        _check_chain(node, previous)
    return [op for op in converted if op is not None]


def build_chain(model: nn.Module, example: Tensor) -> list[Op]:
    """The chain with its shapes, set by running ``example`` (one point suffices) through it.

    In eval mode the chain's output is compared with the model's, so a forward that does more
    than the traced layers (or BatchNorm with other statistics) is an error, not a wrong bound."""
    ops = trace_chain(model)
    z = example[:1]
    with torch.no_grad():
        for op in ops:
            op.in_shape = tuple(z.shape[1:])
            z = op.forward(z)
            op.out_shape = tuple(z.shape[1:])
        if not model.training:
            expected = model(example[:1])
            if expected.shape != z.shape or not torch.allclose(expected, z, rtol=1e-4, atol=1e-5):
                raise ConfigError(
                    f"bound propagation: the layers traced from {type(model).__name__} do not reproduce its output"
                )
    return ops
