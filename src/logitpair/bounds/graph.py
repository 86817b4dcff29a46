"""A model as a DAG of :mod:`~logitpair.bounds.ops`: traced with ``torch.fx``, checked, converted.

The model's ``forward`` is traced symbolically (``torch.nn`` layers and the models' input
``Normalize``, recognised by its class name and its ``mean``/``std`` buffers, stay whole), so
``nn.Sequential`` nesting and modules whose ``forward`` calls their children (``LeNet``:
``classifier(features(x))``; the residual blocks of ``preact-resnet18``:
``conv2(relu(bn2(conv1(out)))) + shortcut``) flatten into one :class:`~logitpair.bounds.dag.Dag`
in the traced order (topological). Every layer takes one tensor, the output of an earlier node or
the input; an addition ``a + b`` (``operator.add``, ``torch.add``, ``Tensor.add``) takes two of the
same shape and becomes an :class:`~logitpair.bounds.ops.Add` node; ``Identity`` and ``Dropout``
are no nodes. The model returns one tensor, every other node is used, and the DAG's output on an
example is compared with the model's. Anything else is a :class:`~logitpair.errors.ConfigError`
naming the layer.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from logitpair.bounds.dag import INPUT, Dag
from logitpair.bounds.ops import Add, ChannelAffine, Conv, Dense, MaxPool, Op, Pool, ReLU, Reshape
from logitpair.errors import ConfigError

SUPPORTED = (
    "Linear, Conv2d (dilation 1, groups 1), ReLU (module, F.relu, torch.relu), MaxPool2d (kernel = stride, "
    "no padding), Flatten, AvgPool2d, AdaptiveAvgPool2d, BatchNorm1d/2d (running statistics), Normalize "
    "(mean/std buffers), Identity, Dropout, Sequential nesting, global mean over (2, 3), F.avg_pool2d, "
    "F.adaptive_avg_pool2d, residual additions (a + b, torch.add) of two tensors of one shape"
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


def _add_op(node: fx.Node) -> Op:
    if len(node.args) != 2 or node.kwargs or not all(isinstance(a, fx.Node) for a in node.args):
        raise unsupported(f"the addition {node.name} of {node.args} {node.kwargs} (only the sum of two tensors)")
    return Add()


def _pool_op(node: fx.Node) -> Op:
    fn, args, kwargs = node.target, node.args[1:], dict(node.kwargs)
    if any(isinstance(a, fx.Node) for a in (*args, *kwargs.values())):
        raise unsupported(f"{node.name} ({getattr(fn, '__name__', fn)}) with a tensor argument")
    return Pool(lambda z: fn(z, *args, **kwargs))  # type: ignore[operator]


_FUNCTIONS: dict[object, Callable[[fx.Node], Op]] = {
    F.relu: lambda n: ReLU(),
    torch.relu: lambda n: ReLU(),
    torch.flatten: _flatten_op,
    torch.mean: _mean_op,
    F.adaptive_avg_pool2d: _pool_op,
    F.avg_pool2d: _pool_op,
    operator.add: _add_op,
    torch.add: _add_op,
}
_METHODS: dict[str, Callable[[fx.Node], Op]] = {
    "relu": lambda n: ReLU(),
    "flatten": _flatten_op,
    "mean": _mean_op,
    "add": _add_op,
}


def _node_op(node: fx.Node, modules: dict[str, nn.Module]) -> Op | None:
    if node.op == "call_module":
        return _module_op(modules[str(node.target)])
    if node.op == "call_function" and node.target in _FUNCTIONS:
        return _FUNCTIONS[node.target](node)
    if node.op == "call_method" and node.target in _METHODS:
        return _METHODS[str(node.target)](node)
    name = getattr(node.target, "__name__", node.target)
    raise unsupported(f"the operation {name!r} ({node.op}) in the model's forward")


def _tensor_inputs(node: fx.Node, op: Op | None) -> list[fx.Node]:
    """The nodes whose outputs ``node`` reads: both terms of an addition (possibly one node
    twice), the one tensor of any other layer."""
    if isinstance(op, Add):
        return list(node.args)  # type: ignore[arg-type]
    tensors = node.all_input_nodes
    if len(tensors) != 1:
        raise ConfigError(
            f"bound propagation: {node.name} ({node.op} {node.target}) takes the tensors "
            f"{[t.name for t in tensors]}; only an addition may take two"
        )
    return tensors


def _trace(model: nn.Module) -> fx.Graph:
    try:
        graph = _Tracer().trace(model)
    except Exception as exc:  # fx raises many types on data-dependent control flow
        raise ConfigError(
            f"bound propagation could not trace {type(model).__name__}.forward as a graph of layers: {exc}"
        ) from exc
    placeholders = [n.name for n in graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        raise ConfigError(f"bound propagation needs a forward of one input tensor, got {placeholders}")
    return graph


def _output(node: fx.Node, index: dict[fx.Node, int]) -> int:
    out = node.args[0]
    if not isinstance(out, fx.Node):
        raise ConfigError(f"bound propagation needs a model that returns one tensor, got {out}")
    return index[out]


def _check_used(dag: Dag, out: int) -> None:
    """Every node but the output feeds a later one (the output is then the last node)."""
    for k in range(len(dag.ops)):
        if k != out and not dag.consumers[k]:
            raise ConfigError(f"bound propagation: the model computes {dag.names[k]} and does not use it")


def trace_dag(model: nn.Module) -> Dag:
    """The model's layers as a DAG of ops, in forward order (no shapes yet); Identity and
    Dropout are no nodes (their consumers read their input)."""
    graph = _trace(model)
    modules = dict(model.named_modules())
    index: dict[fx.Node, int] = {}
    ops: list[Op] = []
    inputs: list[tuple[int, ...]] = []
    names: list[str] = []
    out = INPUT
    for node in graph.nodes:
        if node.op == "placeholder":
            index[node] = INPUT
        elif node.op == "output":
            out = _output(node, index)
        else:
            op = _node_op(node, modules)
            ins = tuple(index[t] for t in _tensor_inputs(node, op))
            if op is None:
                index[node] = ins[0]
                continue
            index[node] = len(ops)
            ops.append(op)
            inputs.append(ins)
            names.append(node.name)
    dag = Dag(ops, inputs, names)
    _check_used(dag, out)
    return dag


def _shaped_forward(dag: Dag, k: int, values: list[Tensor]) -> Tensor:
    """Node ``k`` on ``values``, setting its op's shapes (an addition's terms must have one shape)."""
    op = dag.ops[k]
    shapes = [tuple(v.shape[1:]) for v in values]
    if len(set(shapes)) > 1:
        raise unsupported(f"the addition {dag.names[k]} of tensors of shapes {shapes} (no broadcasting)")
    op.in_shape = shapes[0]
    z = op.forward(*values)
    op.out_shape = tuple(z.shape[1:])
    return z


def build_dag(model: nn.Module, example: Tensor) -> Dag:
    """The DAG with its shapes, set by running ``example`` (one point suffices) through it.

    In eval mode the DAG's output is compared with the model's, so a forward that does more
    than the traced layers (or BatchNorm with other statistics) is an error, not a wrong bound."""
    dag = trace_dag(model)
    with torch.no_grad():
        z = dag.evaluate(example[:1], functools.partial(_shaped_forward, dag))
        if not model.training:
            expected = model(example[:1])
            if expected.shape != z.shape or not torch.allclose(expected, z, rtol=1e-4, atol=1e-5):
                raise ConfigError(
                    f"bound propagation: the layers traced from {type(model).__name__} do not reproduce its output"
                )
    return dag
