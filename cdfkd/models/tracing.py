"""Find sensible stages in any classifier by tracing it: the automatic stage rule.

Attention transfer and feature losses read a model's *stages*: maps at its successive
resolutions, each the state of the whole trunk at that point. For a module written
anywhere, they are found from its ``torch.fx`` graph (torchvision's ``NodePathTracer``,
which names every node by the module it runs in) with shapes propagated from one image:

1. keep the *cut* nodes (every input -> output path passes through them: a residual
   block's output, never a node inside one of its branches) before the first global
   pooling;
2. keep the 4-D maps among them, in (B, C, H, W) or, when more resolutions read square
   that way, (B, H, W, C) layout (Swin), whose side never grows along the path;
3. per resolution, the node that ends the shallowest module (``layer1`` rather than
   ``layer1.1.relu``; a block's output rather than an op inside the next, striding
   block), the last such one on ties;
4. the deepest ``max_stages`` resolutions.

Each stage is returned as a :class:`~cdfkd.models.taps.Tap` on the module it ends, so
the forward itself is never replaced by the traced graph. Measured on torchvision's
classification models at 1x32x32 (resnet18: layer1..layer4; mobilenet_v3_small:
features.1, features.3, features.8, features). A model fx cannot trace (data-dependent
control flow) is refused with the fix: name its stages.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator

import torch
from torch import fx, nn

from cdfkd.models.taps import Layout, Tap

# Global pooling ends the spatial trunk (a strided AvgPool2d, as in DenseNet's
# transitions, does not).
_POOL_MODULES = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Flatten)
_POOL_FUNCTIONS = {
    torch.flatten,
    torch.mean,
    nn.functional.adaptive_avg_pool2d,
    nn.functional.adaptive_max_pool2d,
}
_POOL_METHODS = {"mean", "flatten"}
_CALL_SUFFIX = re.compile(r"^(.*)_(\d+)$")


class TraceError(ValueError):
    """fx could not trace the model; the message says to name its stages instead."""


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode inside; every submodule's own mode restored afterwards
    (a probe must neither move BatchNorm statistics nor unfreeze a frozen part)."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, training in modes:
            m.training = training


def trace(model: nn.Module) -> tuple[fx.GraphModule, dict[fx.Node, str]]:
    """The eval-mode fx graph of ``model`` (leaf modules shared, not copied) and each node's
    qualified name (``layer1.0.relu_1``: the 2nd call of ``layer1.0.relu``)."""
    # The one place torchvision's private tracer defaults are used (torchvision.ops as
    # leaves, math autowrapped): create_feature_extractor traces with the same ones.
    from torchvision.models import feature_extraction as fe

    tracer = fe.NodePathTracer(**fe._set_default_tracer_kwargs(None))
    with eval_mode(model):
        try:
            graph = tracer.trace(model)
        except Exception as err:
            raise TraceError(
                f"{type(model).__name__} cannot be traced by torch.fx to find its stages "
                f"({type(err).__name__}: {str(err).splitlines()[0][:200]}); name them instead "
                "(stages: [module names], e.g. the outputs of its blocks)"
            ) from None
    return fx.GraphModule(tracer.root, graph), tracer.node_to_qualname


def _cut_nodes(nodes: list[fx.Node]) -> list[fx.Node]:
    """Nodes every input -> output path goes through (no data edge jumps over them)."""
    index = {n: i for i, n in enumerate(nodes)}
    reach, cuts = -1, []
    for i, n in enumerate(nodes):
        if n.op not in ("get_attr", "placeholder") and reach <= i:
            cuts.append(n)
        if n.op != "get_attr":
            reach = max([reach, *(index[u] for u in n.users if u in index)])
    return cuts


def _is_global_pool(gm: fx.GraphModule, n: fx.Node) -> bool:
    if n.op == "call_module":
        return isinstance(gm.get_submodule(str(n.target)), _POOL_MODULES)
    if n.op == "call_function":
        return n.target in _POOL_FUNCTIONS
    return n.op == "call_method" and n.target in _POOL_METHODS


def _end_depth(nodes: list[fx.Node], qual: dict[fx.Node, str]) -> dict[fx.Node, int]:
    """Per node, the smallest depth of a module (dotted prefix of its name) it is the last
    node of: ``layer1.1.relu_1`` ends ``layer1`` (depth 1), while mobilenet's
    ``features.2.block.0.2`` ends only ``features.2.block.0`` (depth 4)."""
    last: dict[str, fx.Node] = {}
    for n in nodes:
        if n in qual:
            parts = qual[n].split(".")
            for k in range(1, len(parts) + 1):
                last[".".join(parts[:k])] = n
    depth = {}
    for n in nodes:
        if n in qual:
            parts = qual[n].split(".")
            depth[n] = next(k for k in range(1, len(parts) + 1) if last[".".join(parts[:k])] is n)
    return depth


def _module_tap(name: str, modules: dict[str, nn.Module], gm: fx.GraphModule) -> Tap | None:
    """The tap reading what node-name prefix ``name`` ends, if that is a module's output."""
    if name in modules:
        # A leaf module's node is its first call (later calls carry a suffix); a
        # container ends at its last node, i.e. its last call.
        leaf = any(n.op == "call_module" and n.target == name for n in gm.graph.nodes)
        return Tap(name, call=0 if leaf else -1)
    found = _CALL_SUFFIX.match(name)
    if found and found.group(1) in modules:
        return Tap(found.group(1), call=int(found.group(2)))
    return None  # a function node (an add, a reshape): no module to tap


def _spatial(shape: tuple[int, ...], layout: Layout) -> tuple[int, int, int]:
    return (shape[3], shape[1], shape[2]) if layout == "nhwc" else (shape[1], shape[2], shape[3])


def auto_stages(model: nn.Module, example: torch.Tensor, max_stages: int = 4) -> list[Tap]:
    """The stages of ``model`` by the rule above, for inputs like ``example`` (1, C, H, W).

    Returns up to ``max_stages`` taps, shallow to deep; ``[]`` when the model keeps no
    4-D maps (a ViT's tokens: see ``cdfkd.models.torchvision_models``).
    """
    from torch.fx.passes.shape_prop import ShapeProp

    gm, qual = trace(model)
    with eval_mode(model), torch.no_grad():
        ShapeProp(gm).propagate(example)
    nodes = list(gm.graph.nodes)
    depth = _end_depth(nodes, qual)
    modules = dict(model.named_modules())
    trunk: list[tuple[fx.Node, Tap]] = []
    for n in _cut_nodes(nodes):
        if _is_global_pool(gm, n) or n.op == "output":
            break
        shape = getattr(n.meta.get("tensor_meta"), "shape", None)
        if n not in qual or shape is None or len(shape) != 4:
            continue
        tap = _module_tap(".".join(qual[n].split(".")[: depth[n]]), modules, gm)
        if tap is not None:
            trunk.append((n, tap))
    side = example.shape[-1]
    layouts: list[list[tuple[int, int, Tap]]] = []
    for layout in ("nchw", "nhwc"):
        kept, prev = [], side
        for n, tap in trunk:
            _, h, w = _spatial(tuple(n.meta["tensor_meta"].shape), layout)
            if h != w or h > prev:  # square inputs give square maps; (B, H, W, C) read as
                continue  # NCHW does not
            prev = h
            kept.append((h, depth[n], Tap(tap.module, tap.call, layout=layout)))
        layouts.append(kept)
    # The layout under which more resolutions read as square, non-growing maps wins.
    chosen = max(layouts, key=lambda kept: len({h for h, _, _ in kept}))
    best: dict[int, tuple[int, Tap]] = {}
    for h, d, tap in chosen:
        if h not in best or d <= best[h][0]:
            best[h] = (d, tap)
    return [tap for _, tap in best.values()][-max_stages:]
