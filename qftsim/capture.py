"""Capture a float torch.nn.Module into a small graph of the supported ops (torch.fx).

The captured FGraph is canonical: BatchNorm folded into the conv or linear
before it, zero padding folded into the conv after it, ReLU/ReLU6/Hardtanh/
clamp fused into the conv, linear or add before it where that is their only
consumer, Identity/Dropout removed, AdaptiveAvgPool2d(1) an average pool
over the whole map. Anything else raises QftsimError naming the node.
The FGraph also runs in float, so calibration and bias correction can
compare the quantized graph with the float one node by node.
"""

from __future__ import annotations

import functools
import math
import operator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from qftsim import arith
from qftsim.errors import QftsimError

SUPPORTED = ("Conv2d (incl. depthwise/grouped), ConvTranspose2d, Linear, BatchNorm2d (folded), ReLU, ReLU6, "
             "Hardtanh, clamp, Identity, Dropout, ZeroPad2d/F.pad (into a conv), MaxPool2d, AvgPool2d, "
             "AdaptiveAvgPool2d(1), Flatten/view/reshape, mean over any axes but the batch, add, mul (two tensors, "
             "broadcasting), cat (any axis but the batch), split/chunk/slicing (step 1, any axis but the batch), "
             "F.interpolate/Upsample (nearest at whole ratios, bilinear without align_corners), and as look-up "
             "tables Sigmoid, Hardswish, Hardsigmoid, SiLU, GELU (both forms), Tanh, LeakyReLU, ELU")
# pointwise functions that become exact look-up tables over the input's integer range; a node's attrs hold the
# function's name and its parameters (GELU's approximate, LeakyReLU's negative_slope, ELU's alpha)
LUT_FUNCTIONS = {"sigmoid": torch.sigmoid, "hardswish": F.hardswish, "hardsigmoid": F.hardsigmoid, "silu": F.silu,
                 "tanh": torch.tanh, "gelu": F.gelu, "leaky_relu": F.leaky_relu, "elu": F.elu}
PARAMETRIZED_LUTS = ("gelu", "leaky_relu", "elu")
INF = math.inf


def lut_function(attrs: dict):
    """The real function of a look-up table node, with its parameters bound."""
    params = {k: v for k, v in attrs.items() if k != "function"}
    return functools.partial(LUT_FUNCTIONS[attrs["function"]], **params)


def _lut(name, ins, function: str, **params) -> FNode:
    return FNode(name, "lut", ins[:1], {"function": function, **params})


@dataclass
class FNode:
    """One op of the canonical float graph; `act` is a fused clamp (lo, hi) in real units."""

    name: str
    kind: str  # input conv linear add mul cat maxpool avgpool mean reshape clamp lut resize slice zero_insert
    inputs: list[str]
    attrs: dict = field(default_factory=dict)
    weight: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    act: tuple[float, float] | None = None
    shape: tuple[int, ...] = ()  # without batch

    @property
    def nonnegative(self) -> bool:
        """Output provably >= 0 (after a ReLU-like clamp): unsigned under `signed: auto`."""
        return self.act is not None and self.act[0] >= 0


@dataclass
class FGraph:
    nodes: list[FNode]
    output: str

    def node(self, name: str) -> FNode:
        return next(n for n in self.nodes if n.name == name)

    def consumers(self, name: str) -> list[FNode]:
        return [n for n in self.nodes if name in n.inputs]

    def run(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Float outputs of every node (BN folded, activations fused) for a batch."""
        return {n.name: out for n, _, out in self.stream(x, keep_all=True)}

    def last_uses(self) -> dict[str, int]:
        """For each tensor that some node reads, the index of the last node reading it."""
        return {s: i for i, n in enumerate(self.nodes) for s in n.inputs}

    def stream(self, x: torch.Tensor, keep_all: bool = False):
        """Yield (node, its inputs, its float output) in order, each tensor dropped after its last use.

        Holding every activation of a large network for a calibration batch
        can take more memory than the machine has; a walk needs only the live ones."""
        last_use = self.last_uses()
        env = {}
        for i, n in enumerate(self.nodes):
            ins = [env[s] for s in n.inputs]
            out = x if n.kind == "input" else float_op(n, ins)
            yield n, ins, out
            env[n.name] = out
            if not keep_all:
                drop_dead(env, n, i, last_use)


def drop_dead(env: dict, node: FNode, index: int, last_use: dict[str, int]) -> None:
    """Delete from `env` the inputs of `node` (the `index`-th node) that no later node reads."""
    for s in set(node.inputs):
        if last_use[s] == index:
            del env[s]


def float_op(n: FNode, xs: list[torch.Tensor]) -> torch.Tensor:
    """The float semantics of one canonical node (before its fused clamp is applied, then with it)."""
    a = n.attrs
    if n.kind == "conv":
        pt, pl, pb, pr = a["padding"]
        y = F.conv2d(F.pad(xs[0], (pl, pr, pt, pb)), n.weight.to(xs[0]), n.bias.to(xs[0]),
                     a["stride"], 0, a["dilation"], a["groups"])
    elif n.kind == "linear":
        y = F.linear(xs[0], n.weight.to(xs[0]), n.bias.to(xs[0]))
    elif n.kind == "add":
        y = xs[0] + xs[1]
    elif n.kind == "mul":
        y = xs[0] * xs[1]
    elif n.kind == "cat":
        y = torch.cat(xs, dim=a["axis"])
    elif n.kind == "zero_insert":
        y = arith.zero_insert(xs[0], a["stride"], 0.0)
    elif n.kind == "slice":
        y = xs[0].narrow(a["axis"], a["start"], a["stop"] - a["start"])
    elif n.kind == "resize":
        y = F.interpolate(xs[0], size=a["size"], mode=a["mode"], **({"align_corners": False}
                                                                    if a["mode"] == "bilinear" else {}))
    elif n.kind == "maxpool":
        pt, pl, pb, pr = a["padding"]
        y = F.max_pool2d(F.pad(xs[0], (pl, pr, pt, pb), value=-INF), a["kernel"], a["stride"])
    elif n.kind == "avgpool":
        pt, pl, pb, pr = a["padding"]
        kh, kw = a["kernel"]
        total = F.avg_pool2d(F.pad(xs[0], (pl, pr, pt, pb)), (kh, kw), a["stride"], divisor_override=1)
        if a["count_include_pad"]:
            y = total / (kh * kw)
        else:
            ones = torch.ones_like(xs[0][:1, :1])
            y = total / F.avg_pool2d(F.pad(ones, (pl, pr, pt, pb)), (kh, kw), a["stride"], divisor_override=1)
    elif n.kind == "mean":
        y = xs[0].mean(dim=a["axes"], keepdim=a["keepdim"])
    elif n.kind == "reshape":
        y = xs[0].reshape((xs[0].shape[0],) + n.shape)
    elif n.kind == "clamp":
        y = xs[0]
    elif n.kind == "lut":
        y = lut_function(a)(xs[0])
    else:
        raise AssertionError(n.kind)
    return y.clamp(*n.act) if n.act is not None else y


# ---------------------------------------------------------------- tracing

def capture(model: nn.Module, example: torch.Tensor) -> FGraph:
    """Trace `model` (eval mode) on `example` (a batch) into the canonical FGraph."""
    set_eval_mode(model)
    try:  # a torch.export program is a graph already: kept as it is, with the module paths in its nodes' meta
        gm = model if isinstance(model, fx.GraphModule) else fx.symbolic_trace(model)
    except Exception as exc:  # fx raises many types for dynamic control flow
        raise QftsimError(f"cannot trace the model with torch.fx ({type(exc).__name__}: {exc}); "
                          "control flow on tensor values is not supported") from None
    with torch.no_grad():
        ShapeProp(gm).propagate(example.float())
    nodes: list[FNode] = []
    alias: dict[str, str] = {}  # removed identity nodes -> their input
    consts: dict[str, torch.Tensor] = {}  # get_attr nodes (parameters of a torch.export program)
    splits: dict[str, tuple] = {}  # split/chunk nodes -> (input, axis, [(start, stop) of each part])
    unsupported: list[UnsupportedOp] = []
    taken = {node.name for node in gm.graph.nodes}
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            consts[node.name] = _get_attr(gm, node.target).detach()
            continue
        if node.op == "output":
            out = node.args[0]
            if isinstance(out, (tuple, list)) and len(out) == 1:  # a torch.export program returns a tuple
                out = out[0]
            if not isinstance(out, fx.Node):
                raise QftsimError("the model must return a single tensor")
            output = alias.get(out.name, out.name)
            continue
        try:
            fnode = _convert(gm, node, alias, consts, splits)
        except UnsupportedOp as exc:  # keep going: the user hears of every op at once
            unsupported.append(exc)
            continue
        if fnode is not None and isinstance(node.target, torch._ops.OpOverload):
            alias[node.name] = fnode.name = _module_path_name(node, taken)  # later nodes read it by this name
        if fnode is None:
            continue
        meta = node.meta.get("tensor_meta")
        fnode.shape = tuple(meta.shape[1:]) if meta is not None else ()
        nodes.append(fnode)
    if unsupported:
        raise _unsupported_summary(unsupported)
    graph = FGraph(nodes, output)
    _canonicalize(graph)
    return graph


def _get_attr(gm, target: str) -> torch.Tensor:
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def set_eval_mode(model: nn.Module) -> None:
    """Eval mode, where the module allows it (a torch.export program's module is always in it)."""
    try:
        model.eval()
    except NotImplementedError:
        pass


def _arg_names(args, alias, consts=()) -> list[str]:
    return [alias.get(a.name, a.name) for a in args if isinstance(a, fx.Node) and a.name not in consts]


def _pair(v) -> list[int]:
    return [int(v), int(v)] if isinstance(v, int) else [int(x) for x in v]


class UnsupportedOp(QftsimError):
    """One op that capture cannot take; capture gathers them all into one error."""

    def __init__(self, node, what: str):
        stack = node.meta.get("nn_module_stack") or {}
        self.what, self.where = what, (node.target if node.op == "call_module" else
                                       next(reversed(stack.values()), (node.name,))[0] if stack else node.name)
        super().__init__(f"node {node.name!r}: unsupported op {what}; supported: {SUPPORTED}")


def _module_path_name(node: fx.Node, taken: set[str]) -> str:
    """A torch.export op's name from the module that ran it, as torch.fx names a traced module's nodes
    (`blocks_0_conv1_0`, not `conv2d_default_5`); an op in a module's own forward (a residual add) gets the op
    after the path (`blocks_0_add`). `taken` holds the names in use; a repeat gets a suffix."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return node.name
    taken.discard(node.name)  # the node's own name, which it gives up
    path, kind = next(reversed(stack.values()))
    name = path.replace(".", "_") or node.name
    if not str(getattr(kind, "__module__", kind)).startswith("torch.nn.modules"):
        name = f"{name}_{node.target._opname}" if path else node.target._opname
    unique, count = name, 0
    while unique in taken:
        count += 1
        unique = f"{name}_{count}"
    taken.add(unique)
    return unique


def _unsupported(node, what) -> QftsimError:
    return UnsupportedOp(node, what)


def _unsupported_summary(errors: list[UnsupportedOp]) -> QftsimError:
    """Every unsupported op of the model in one line: op, module paths, count."""
    by_op: dict[str, list[str]] = {}
    for e in errors:
        by_op.setdefault(e.what, []).append(str(e.where))
    parts = [f"{what} x{len(where)} (at {', '.join(where[:3])}{', ...' if len(where) > 3 else ''})"
             for what, where in by_op.items()]
    return QftsimError(f"the model has {len(errors)} unsupported op{'s' if len(errors) > 1 else ''}: "
                       f"{'; '.join(parts)}. Supported: {SUPPORTED}")


SPLITS = {torch.split: "split", torch.chunk: "chunk", "split": "split", "chunk": "chunk",
          torch.ops.aten.split.Tensor: "split", torch.ops.aten.split_with_sizes.default: "split",
          torch.ops.aten.chunk.default: "chunk"}
RESIZES = {F.interpolate: None, torch.ops.aten.upsample_nearest2d.vec: "nearest",
           torch.ops.aten.upsample_bilinear2d.vec: "bilinear"}


def _convert(gm: fx.GraphModule, node: fx.Node, alias: dict, consts: dict, splits: dict) -> FNode | None:
    name = node.name
    if node.op == "placeholder":
        return FNode(name, "input", [])
    ins = _arg_names(node.args, alias, consts)
    if node.op in ("call_function", "call_method"):
        if node.target in SPLITS:  # no node of its own: each of its parts that is used becomes a slice
            splits[name] = (ins[0], *_split_bounds(node, SPLITS[node.target]))
            return None
        if node.target is operator.getitem and isinstance(node.args[0], fx.Node):
            if node.args[0].name in splits:
                source, axis, bounds = splits[node.args[0].name]
                start, stop = bounds[node.args[1]]
                return FNode(name, "slice", [source], {"axis": axis, "start": start, "stop": stop})
            if isinstance(node.args[1], (tuple, slice)):
                return _slicing(node, name, ins, node.args[1])
        if node.target in RESIZES:
            return _resize(node, name, ins, RESIZES.get(node.target))
    if node.op == "call_function" and node.target is torch.ops.aten.slice.Tensor:
        a = _schema_arguments(node)
        dim = int(a["dim"]) % len(_input_shape(node))
        part = slice(a["start"], a["end"], a["step"])
        if part.indices(_input_shape(node)[dim]) == (0, _input_shape(node)[dim], 1):  # x[:, ...] on that axis
            return _identity(name, ins, alias)
        return _slicing(node, name, ins, (slice(None),) * dim + (part,))
    if node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload):
        return _from_aten(node, name, ins, alias, consts)
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        return _from_module(node, name, mod, ins, alias)
    if node.op == "call_function":
        return _from_function(node, name, ins, alias)
    if node.op == "call_method":
        return _from_method(node, name, ins, alias)
    raise _unsupported(node, f"{node.op} {node.target}")


def _identity(name, ins, alias):
    alias[name] = ins[0]
    return None


def _act(name, ins, lo, hi):
    return FNode(name, "clamp", ins[:1], act=(float(lo), float(hi)))


def _from_module(node, name, mod, ins, alias):
    if isinstance(mod, (nn.Identity, nn.Dropout)):
        return _identity(name, ins, alias)
    if type(mod).__name__ == "GuardsFn":  # torch.export's check of the input shapes: nothing to compute
        return None
    if isinstance(mod, nn.Conv2d):
        if mod.padding_mode != "zeros":
            raise _unsupported(node, f"Conv2d padding_mode={mod.padding_mode}")
        if isinstance(mod.padding, str):
            raise _unsupported(node, f"Conv2d padding={mod.padding!r} (give explicit padding)")
        ph, pw = _pair(mod.padding)
        bias = mod.bias.detach() if mod.bias is not None else torch.zeros(mod.out_channels)
        return FNode(name, "conv", ins, {"stride": _pair(mod.stride), "padding": [ph, pw, ph, pw],
                                         "dilation": _pair(mod.dilation), "groups": mod.groups},
                     mod.weight.detach().double(), bias.double())
    if isinstance(mod, nn.ConvTranspose2d):
        if mod.padding_mode != "zeros":
            raise _unsupported(node, f"ConvTranspose2d padding_mode={mod.padding_mode}")
        bias = mod.bias.detach() if mod.bias is not None else torch.zeros(mod.out_channels)
        return _conv_transpose(node, name, ins, mod.weight.detach().double(), bias.double(), mod.stride, mod.padding,
                               mod.output_padding, mod.groups, mod.dilation)
    if isinstance(mod, nn.Linear):
        bias = mod.bias.detach() if mod.bias is not None else torch.zeros(mod.out_features)
        return FNode(name, "linear", ins, {}, mod.weight.detach().double(), bias.double())
    if isinstance(mod, nn.BatchNorm2d):
        return FNode(name, "bn", ins, {"mean": mod.running_mean.double(), "var": mod.running_var.double(),
                                       "gamma": (mod.weight if mod.affine else torch.ones_like(mod.running_mean))
                                       .detach().double(),
                                       "beta": (mod.bias if mod.affine else torch.zeros_like(mod.running_mean))
                                       .detach().double(), "eps": mod.eps})
    if isinstance(mod, nn.ReLU):
        return _act(name, ins, 0, INF)
    if isinstance(mod, nn.ReLU6):
        return _act(name, ins, 0, 6)
    if isinstance(mod, nn.Hardtanh):
        return _act(name, ins, mod.min_val, mod.max_val)
    if isinstance(mod, nn.ZeroPad2d):
        return _pad(name, ins, mod.padding)
    if isinstance(mod, nn.MaxPool2d):
        return _pool(node, name, ins, "maxpool", mod.kernel_size, mod.stride, mod.padding, mod.dilation,
                     mod.ceil_mode, True)
    if isinstance(mod, nn.AvgPool2d):
        return _pool(node, name, ins, "avgpool", mod.kernel_size, mod.stride, mod.padding, 1, mod.ceil_mode,
                     mod.count_include_pad, mod.divisor_override)
    if isinstance(mod, nn.AdaptiveAvgPool2d):
        return _global_pool(node, name, ins, mod.output_size)
    if isinstance(mod, nn.Flatten):
        return _flatten(node, name, ins, mod.start_dim, mod.end_dim)
    if isinstance(mod, nn.Upsample):
        if mod.mode == "bilinear" and mod.align_corners:
            raise _unsupported(node, "Upsample bilinear with align_corners=True")
        return _resize(node, name, ins, mod.mode)
    for cls, fn in ((nn.Sigmoid, "sigmoid"), (nn.Hardswish, "hardswish"), (nn.Hardsigmoid, "hardsigmoid"),
                    (nn.SiLU, "silu"), (nn.Tanh, "tanh")):
        if isinstance(mod, cls):
            return _lut(name, ins, fn)
    if isinstance(mod, nn.GELU):
        return _lut(name, ins, "gelu", approximate=mod.approximate)
    if isinstance(mod, nn.LeakyReLU):
        return _lut(name, ins, "leaky_relu", negative_slope=float(mod.negative_slope))
    if isinstance(mod, nn.ELU):
        return _lut(name, ins, "elu", alpha=float(mod.alpha))
    raise _unsupported(node, type(mod).__name__)


def _kw(node, index, key, default):
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(key, default)


def _from_function(node, name, ins, alias):
    t = node.target
    if t is operator.getitem and node.args[1] == 0:  # first result of an ATen batch norm
        return _identity(name, ins, alias)
    if t in (operator.add, torch.add):
        if len(ins) != 2:
            raise _unsupported(node, "add of a tensor and a constant")
        return FNode(name, "add", ins)
    if t in (operator.mul, torch.mul):
        return _mul(node, name, ins)
    if t is torch.mean:
        return _mean(node, name, ins, _kw(node, 1, "dim", None), _kw(node, 2, "keepdim", False))
    if t is torch.cat:
        return _cat(node, name, _arg_names(node.args[0], alias), _kw(node, 1, "dim", 0))
    if t in (F.relu, torch.relu):
        return _act(name, ins, 0, INF)
    if t is F.relu6:
        return _act(name, ins, 0, 6)
    if t is F.hardtanh:
        return _act(name, ins, _kw(node, 1, "min_val", -1.0), _kw(node, 2, "max_val", 1.0))
    if t is torch.clamp:
        lo, hi = _kw(node, 1, "min", None), _kw(node, 2, "max", None)
        return _act(name, ins, -INF if lo is None else lo, INF if hi is None else hi)
    if t is torch.flatten:
        return _flatten(node, name, ins, _kw(node, 1, "start_dim", 0), _kw(node, 2, "end_dim", -1))
    if t is F.pad:
        pad, mode, value = _kw(node, 1, "pad", None), _kw(node, 2, "mode", "constant"), _kw(node, 3, "value", 0)
        if mode != "constant" or (value or 0) != 0 or len(pad) != 4:
            raise _unsupported(node, "F.pad other than 2-D zero padding")
        return _pad(name, ins, pad)
    if t is F.max_pool2d:
        kernel = _kw(node, 1, "kernel_size", None)
        return _pool(node, name, ins, "maxpool", kernel, _kw(node, 2, "stride", None) or kernel,
                     _kw(node, 3, "padding", 0), _kw(node, 4, "dilation", 1), _kw(node, 5, "ceil_mode", False), True)
    if t is F.adaptive_avg_pool2d:
        return _global_pool(node, name, ins, _kw(node, 1, "output_size", None))
    if t is F.dropout:
        return _identity(name, ins, alias)
    if t is F.gelu:
        return _lut(name, ins, "gelu", approximate=_kw(node, 1, "approximate", "none"))
    if t is F.leaky_relu:
        return _lut(name, ins, "leaky_relu", negative_slope=float(_kw(node, 1, "negative_slope", 0.01)))
    if t is F.elu:
        return _lut(name, ins, "elu", alpha=float(_kw(node, 1, "alpha", 1.0)))
    for fn_name, fn in LUT_FUNCTIONS.items():
        if fn_name not in PARAMETRIZED_LUTS and t in (fn, getattr(F, fn_name, None), getattr(torch, fn_name, None)):
            return _lut(name, ins, fn_name)
    raise _unsupported(node, getattr(t, "__name__", str(t)))


def _const(consts, arg):
    return None if arg is None else consts[arg.name].double()


def _schema_arguments(node) -> dict:
    """An ATen call's arguments by name, positional or keyword, with the op schema's defaults filled in
    (torch.export writes `aten.conv2d(x, w)` for a bias-free conv at default stride and padding)."""
    values = {}
    for i, argument in enumerate(node.target._schema.arguments):
        if i < len(node.args):
            values[argument.name] = node.args[i]
        elif argument.name in node.kwargs:
            values[argument.name] = node.kwargs[argument.name]
        elif argument.has_default_value():
            values[argument.name] = argument.default_value
    return values


def _from_aten(node, name, ins, alias, consts):
    """ATen ops, as in the module of a torch.export program (.pt2)."""
    aten = torch.ops.aten
    t, args = node.target, node.args
    if t is aten.conv2d.default:
        a = _schema_arguments(node)
        w, b = _const(consts, a["weight"]), _const(consts, a["bias"])
        stride, padding, dilation, groups = a["stride"], a["padding"], a["dilation"], a["groups"]
        ph, pw = _pair(padding)
        return FNode(name, "conv", ins[:1], {"stride": _pair(stride), "padding": [ph, pw, ph, pw],
                                             "dilation": _pair(dilation), "groups": int(groups)},
                     w, b if b is not None else torch.zeros(w.shape[0], dtype=torch.float64))
    if t is aten.conv_transpose2d.input:
        a = _schema_arguments(node)
        w, b = _const(consts, a["weight"]), _const(consts, a["bias"])
        groups = int(a["groups"])
        return _conv_transpose(node, name, ins[:1], w, b if b is not None else torch.zeros(
            w.shape[1] * groups, dtype=torch.float64), a["stride"], a["padding"], a["output_padding"], groups,
            a["dilation"])
    if t is aten.linear.default:
        a = _schema_arguments(node)
        w, b = _const(consts, a["weight"]), _const(consts, a["bias"])
        return FNode(name, "linear", ins[:1], {}, w, b if b is not None else torch.zeros(w.shape[0],
                                                                                           dtype=torch.float64))
    if t in (aten._native_batch_norm_legit_no_training.default, aten.batch_norm.default):
        gamma, beta, mean, var = (_const(consts, a) for a in args[1:5])
        eps = args[6] if t is aten._native_batch_norm_legit_no_training.default else args[7]
        return FNode(name, "bn", ins[:1], {"mean": mean, "var": var, "eps": eps,
                                           "gamma": gamma if gamma is not None else torch.ones_like(mean),
                                           "beta": beta if beta is not None else torch.zeros_like(mean)})
    if t in (aten.relu.default, aten.relu_.default):
        return _act(name, ins, 0, INF)
    if t in (aten.hardtanh.default, aten.hardtanh_.default):
        return _act(name, ins, args[1] if len(args) > 1 else -1.0, args[2] if len(args) > 2 else 1.0)
    if t is aten.clamp.default:
        lo, hi = (list(args[1:]) + [None, None])[:2]
        return _act(name, ins, -INF if lo is None else lo, INF if hi is None else hi)
    if t in (aten.add.Tensor, aten.add_.Tensor):
        return FNode(name, "add", ins)
    if t in (aten.mul.Tensor, aten.mul_.Tensor):
        return _mul(node, name, ins)
    if t is aten.cat.default:
        return _cat(node, name, _arg_names(args[0], alias, consts), args[1] if len(args) > 1 else 0)
    if t is aten.max_pool2d.default:
        a = _schema_arguments(node)
        return _pool(node, name, ins, "maxpool", a["kernel_size"], a["stride"] or a["kernel_size"], a["padding"],
                     a["dilation"], a["ceil_mode"], True)
    if t is aten.avg_pool2d.default:
        a = _schema_arguments(node)
        return _pool(node, name, ins, "avgpool", a["kernel_size"], a["stride"] or a["kernel_size"], a["padding"], 1,
                     a["ceil_mode"], a["count_include_pad"], a["divisor_override"])
    if t is aten.adaptive_avg_pool2d.default:
        return _global_pool(node, name, ins, args[1])
    if t is aten.mean.dim:
        a = _schema_arguments(node)
        return _mean(node, name, ins, a["dim"], a["keepdim"])
    if t is aten.flatten.using_ints:
        return _flatten(node, name, ins, args[1] if len(args) > 1 else 0, args[2] if len(args) > 2 else -1)
    if t in (aten.view.default, aten.reshape.default):
        return FNode(name, "reshape", ins[:1])
    if t in (aten.dropout.default, aten.clone.default, aten.contiguous.default, aten.alias.default):
        return _identity(name, ins, alias)
    if t is aten.constant_pad_nd.default:
        if (args[2] if len(args) > 2 else 0) != 0 or len(args[1]) != 4:
            raise _unsupported(node, "padding other than 2-D zero padding")
        return _pad(name, ins, args[1])
    if t in (aten.gelu.default, aten.gelu_.default):
        return _lut(name, ins, "gelu", approximate=_schema_arguments(node)["approximate"])
    if t in (aten.leaky_relu.default, aten.leaky_relu_.default):
        return _lut(name, ins, "leaky_relu", negative_slope=float(_schema_arguments(node)["negative_slope"]))
    if t in (aten.elu.default, aten.elu_.default):
        a = _schema_arguments(node)
        if a["scale"] != 1 or a["input_scale"] != 1:
            raise _unsupported(node, "elu with scale or input_scale (selu)")
        return _lut(name, ins, "elu", alpha=float(a["alpha"]))
    for fn_name in set(LUT_FUNCTIONS) - set(PARAMETRIZED_LUTS):
        if t in (getattr(aten, fn_name).default, getattr(aten, f"{fn_name}_").default):
            return _lut(name, ins, fn_name)
    raise _unsupported(node, str(t))


def _from_method(node, name, ins, alias):
    method = node.target
    if method in ("contiguous",):
        return _identity(name, ins, alias)
    if method == "size":
        return None  # only used to build a view shape; the batch dimension is kept as is
    if method in ("view", "reshape", "flatten"):
        if method == "flatten":
            return _flatten(node, name, ins, _kw(node, 1, "start_dim", 0), _kw(node, 2, "end_dim", -1))
        return FNode(name, "reshape", ins[:1])
    if method == "relu":
        return _act(name, ins, 0, INF)
    if method in ("mul", "mul_"):
        return _mul(node, name, ins)
    if method == "mean":
        return _mean(node, name, ins, _kw(node, 1, "dim", None), _kw(node, 2, "keepdim", False))
    if method in ("sigmoid", "tanh"):
        return _lut(name, ins, method)
    raise _unsupported(node, f"Tensor.{method}")


def _conv_transpose(node, name, ins, weight, bias, stride, padding, output_padding, groups, dilation):
    """A transposed convolution as the convolution that computes it: on the input with stride - 1 zeros between
    neighbours (a zero_insert node, made in canonicalization), stride 1, the kernel flipped with its in and out
    channels swapped, padding dilation * (kernel - 1) - padding (plus output_padding at the bottom and right).
    So its accumulator and MAC order are a convolution's."""
    (sh, sw), (ph, pw), (oh, ow), (dh, dw) = (_pair(v) for v in (stride, padding, output_padding, dilation))
    cin, cout_g, kh, kw = weight.shape
    edge_h, edge_w = dh * (kh - 1) - ph, dw * (kw - 1) - pw
    if min(edge_h, edge_w) < 0:
        raise _unsupported(node, "ConvTranspose2d with padding above dilation * (kernel - 1)")
    w = weight.reshape(groups, cin // groups, cout_g, kh, kw).transpose(1, 2).reshape(groups * cout_g,
                                                                                      cin // groups, kh, kw)
    return FNode(name, "conv", ins[:1], {"stride": [1, 1], "padding": [edge_h, edge_w, edge_h + oh, edge_w + ow],
                                         "dilation": [dh, dw], "groups": int(groups), "zero_insert": [sh, sw],
                                         "transposed": True},
                 w.flip(2, 3).contiguous(), bias)


def _input_shape(node) -> tuple[int, ...]:
    """The shape (batch included) of the node's first input (of the first of a list: cat's)."""
    first = node.args[0][0] if isinstance(node.args[0], (list, tuple)) else node.args[0]
    return tuple(first.meta["tensor_meta"].shape)


def _axis(node, dim) -> int:
    """A dim argument as an axis of the input (negative ones counted from the end); the batch is refused."""
    axis = int(dim) % len(_input_shape(node))
    if axis == 0:
        raise _unsupported(node, f"{node.target} on the batch axis")
    return axis


def _cat(node, name, ins, dim):
    return FNode(name, "cat", ins, {"axis": _axis(node, dim)})


def _split_bounds(node, kind: str):
    """(axis, [(start, stop) of each part]) of torch.split / torch.chunk."""
    axis = _axis(node, _kw(node, 2, "dim", 0))
    size = _input_shape(node)[axis]
    sizes = _kw(node, 1, "split_size_or_sections" if kind == "split" else "chunks", None)
    if sizes is None:
        sizes = _kw(node, 1, "split_size", None) or _kw(node, 1, "split_sizes", None)
    if kind == "chunk":
        sizes = -(-size // int(sizes))
    if isinstance(sizes, int):
        sizes = [min(sizes, size - start) for start in range(0, size, sizes)]
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    return axis, [(start, start + int(part)) for start, part in zip(starts, sizes)]


def _slicing(node, name, ins, index):
    """x[:, a:b] (one sliced axis, step 1) as a slice node; anything else is refused in one line."""
    index = index if isinstance(index, tuple) else (index,)
    shape = _input_shape(node)
    cut = [(axis, part) for axis, part in enumerate(index) if part != slice(None)]
    if (len(cut) != 1 or not isinstance(cut[0][1], slice) or cut[0][0] == 0 or Ellipsis in index
            or cut[0][1].step not in (None, 1)):
        raise _unsupported(node, f"indexing {index} (only one sliced axis but the batch, step 1)")
    axis, part = cut[0]
    start, stop, _ = part.indices(shape[axis])
    if start >= stop:
        raise _unsupported(node, f"an empty slice {part}")
    return FNode(name, "slice", ins[:1], {"axis": axis, "start": start, "stop": stop})


def _resize(node, name, ins, mode=None):
    """F.interpolate / nn.Upsample / ATen upsampling: nearest at whole ratios, bilinear (half-pixel)."""
    if node.target is F.interpolate:
        mode, align = _kw(node, 3, "mode", "nearest"), _kw(node, 4, "align_corners", None)
    else:
        align = _schema_arguments(node).get("align_corners") if isinstance(node.target, torch._ops.OpOverload) else None
    in_hw = _input_shape(node)[2:]
    out_hw = tuple(node.meta["tensor_meta"].shape[2:])
    if mode not in ("nearest", "bilinear") or len(in_hw) != 2:
        raise _unsupported(node, f"{mode} interpolation (nearest and bilinear, 2-D)")
    if mode == "bilinear" and align:
        raise _unsupported(node, "bilinear interpolation with align_corners=True")
    if mode == "nearest" and any(o % i for i, o in zip(in_hw, out_hw)):
        raise _unsupported(node, f"nearest interpolation from {in_hw} to {out_hw} (only whole ratios)")
    return FNode(name, "resize", ins[:1], {"mode": mode, "size": list(out_hw)})


def _mul(node, name, ins):
    if len(ins) != 2:
        raise _unsupported(node, "mul of a tensor and a constant")
    return FNode(name, "mul", ins)


def _mean(node, name, ins, dims, keepdim):
    """A mean over `dims` (negative ones counted from the end) with its own output scale."""
    rank = len(node.args[0].meta["tensor_meta"].shape)
    dims = [dims] if isinstance(dims, int) else list(dims or [])
    axes = sorted({int(d) % rank for d in dims})
    if not dims or 0 in axes:
        raise _unsupported(node, "mean over the batch axis (give the axes, without 0)")
    return FNode(name, "mean", ins[:1], {"axes": axes, "keepdim": bool(keepdim)})


def _flatten(node, name, ins, start, end):
    if start != 1 or end != -1:
        raise _unsupported(node, f"flatten(start_dim={start}, end_dim={end}) (only the batch is kept)")
    return FNode(name, "reshape", ins[:1])


def _pad(name, ins, padding):
    left, right, top, bottom = (padding,) * 4 if isinstance(padding, int) else padding
    return FNode(name, "pad", ins, {"padding": [int(top), int(left), int(bottom), int(right)]})


def _pool(node, name, ins, kind, kernel, stride, padding, dilation, ceil_mode, count_include_pad, divisor=None):
    if ceil_mode or _pair(dilation) != [1, 1] or divisor is not None:
        raise _unsupported(node, f"{kind} with ceil_mode, dilation or divisor_override")
    kh, kw = _pair(kernel)
    ph, pw = _pair(padding)
    attrs = {"kernel": [kh, kw], "stride": _pair(stride if stride else kernel), "padding": [ph, pw, ph, pw]}
    if kind == "avgpool":  # max pooling has no count: the IntModel refuses the attribute there
        attrs["count_include_pad"] = bool(count_include_pad)
    return FNode(name, kind, ins, attrs)


def _global_pool(node, name, ins, output_size):
    if _pair(output_size) != [1, 1]:
        raise _unsupported(node, f"adaptive average pooling to {output_size} (only 1)")
    return FNode(name, "avgpool", ins, {"global": True})


# ---------------------------------------------------------------- canonical form

def _canonicalize(g: FGraph) -> None:
    for n in list(g.nodes):
        if n.kind == "conv" and "zero_insert" in n.attrs:
            stride = n.attrs.pop("zero_insert")
            c, h, w = g.node(n.inputs[0]).shape
            zeros = FNode(f"{n.name}_zeros", "zero_insert", n.inputs, {"stride": stride},
                          shape=(c, (h - 1) * stride[0] + 1, (w - 1) * stride[1] + 1))
            g.nodes.insert(g.nodes.index(n), zeros)
            n.inputs = [zeros.name]
    for n in list(g.nodes):
        if n.kind == "avgpool" and n.attrs.get("global"):
            _, h, w = g.node(n.inputs[0]).shape
            n.attrs = {"kernel": [h, w], "stride": [1, 1], "padding": [0, 0, 0, 0], "count_include_pad": True}
    for n in list(g.nodes):
        if n.kind == "bn":
            _fold_bn(g, n)
    for n in list(g.nodes):
        if n.kind == "pad":
            _fold_pad(g, n)
    for n in list(g.nodes):
        if n.kind == "clamp":
            _fuse_clamp(g, n)
    for n in g.nodes:
        if n.kind == "reshape" and len(n.shape) != 1:
            raise QftsimError(f"node {n.name!r}: reshape to {n.shape}; only flattening to (batch, features) "
                              "is supported")


def _remove(g: FGraph, n: FNode) -> None:
    """Drop n, rewiring its consumers (and the output) to n's input."""
    for c in g.consumers(n.name):
        c.inputs = [n.inputs[0] if s == n.name else s for s in c.inputs]
    if g.output == n.name:
        g.output = n.inputs[0]
    g.nodes.remove(n)


def _sole_producer(g: FGraph, n: FNode, kinds) -> FNode | None:
    producer = g.node(n.inputs[0])
    ok = producer.kind in kinds and len(g.consumers(producer.name)) == 1 and g.output != producer.name
    return producer if ok else None


def _fold_bn(g: FGraph, bn: FNode) -> None:
    producer = _sole_producer(g, bn, ("conv", "linear"))
    if producer is None or producer.act is not None:
        raise QftsimError(f"node {bn.name!r}: BatchNorm2d must directly follow a Conv2d or Linear "
                          "that feeds nothing else (it is folded into it)")
    a = bn.attrs
    factor = a["gamma"] / torch.sqrt(a["var"] + a["eps"])
    producer.weight = producer.weight * factor.view(-1, *([1] * (producer.weight.dim() - 1)))
    producer.bias = (producer.bias - a["mean"]) * factor + a["beta"]
    _remove(g, bn)


def _fold_pad(g: FGraph, pad: FNode) -> None:
    consumers = g.consumers(pad.name)
    if len(consumers) != 1 or consumers[0].kind != "conv":
        raise QftsimError(f"node {pad.name!r}: zero padding is supported only directly before a Conv2d")
    conv = consumers[0]
    conv.attrs["padding"] = [c + p for c, p in zip(conv.attrs["padding"], pad.attrs["padding"])]
    _remove(g, pad)


def _fuse_clamp(g: FGraph, clamp: FNode) -> None:
    producer = _sole_producer(g, clamp, ("conv", "linear", "add", "mul"))
    if producer is None:
        return  # stays a standalone clamp
    lo, hi = clamp.act
    if producer.act is not None:
        lo, hi = max(lo, producer.act[0]), min(hi, producer.act[1])
    producer.act = (lo, hi)
    _remove(g, clamp)
