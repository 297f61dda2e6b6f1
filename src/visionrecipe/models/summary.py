"""Layer-by-layer size, parameter and MAC tables, worked out as the seed article does by hand.

Usage::

    from visionrecipe.models import count_parameters, format_layer_table, layer_table

    rows = layer_table("seedcnn", num_classes=10, image_size=32)
    rows[0]  # {"layer": "features.0", "type": "Conv2d(3, 64, k=3, s=1, p=1)",
             #  "input_shape": [3, 32, 32], "output_shape": [64, 32, 32], "params": 1792,
             #  "macs": 1769472, "arithmetic": "(32 + 2*1 - 3)/1 + 1 = 32"}
    print(format_layer_table(rows))

Rows come from forward hooks on one dummy image (batch 1, eval mode so batch norm works
on 1x1 maps), in the order the layers run. A row is kept for every layer that owns
parameters or changes its input's shape (convs, linears, pools, batch norms, flatten);
activations and dropout are left out. MACs (multiply-accumulates) count only convs and
linears: Conv2d = out_h * out_w * out_c * (in_c / groups) * kh * kw, Linear = in * out
per output vector. The ``arithmetic`` entry shows the spatial size rule
(n + 2p - k)/s + 1 for convs and pools, floored when the division is not exact.
"""

from __future__ import annotations

import torch
from torch import nn

from visionrecipe.models.registry import create_model

POOLS = (nn.MaxPool2d, nn.AvgPool2d)


def count_parameters(model: nn.Module) -> int:
    """Number of parameters in ``model``, trainable or frozen, each shared tensor once."""
    return sum(p.numel() for p in model.parameters())


def parameter_count(name: str, num_classes: int, **kwargs) -> int:
    """count_parameters of create_model(name, num_classes, **kwargs), built on the meta device: shapes
    without storage or initialisation, so a VGG's 134 M parameters cost milliseconds, not seconds."""
    with torch.device("meta"):
        return count_parameters(create_model(name, num_classes, **kwargs))


def _pair(value) -> tuple[int, int]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value, value)


def _one(value) -> str:
    a, b = _pair(value)
    return str(a) if a == b else f"({a},{b})"


def _describe(module: nn.Module) -> str:
    if isinstance(module, nn.Conv2d):
        groups = f", g={module.groups}" if module.groups > 1 else ""
        return (f"Conv2d({module.in_channels}, {module.out_channels}, k={_one(module.kernel_size)}, "
                f"s={_one(module.stride)}, p={_one(module.padding)}{groups})")
    if isinstance(module, nn.Linear):
        return f"Linear({module.in_features}, {module.out_features})"
    if isinstance(module, POOLS):
        return f"{type(module).__name__}(k={_one(module.kernel_size)}, s={_one(module.stride)}, p={_one(module.padding)})"
    if isinstance(module, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)):
        return f"{type(module).__name__}({_one(module.output_size)})"
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return f"{type(module).__name__}({module.num_features})"
    return type(module).__name__


def _arithmetic(module: nn.Module, n: int) -> str:
    """The output side worked out from input side n, e.g. "(32 + 2*1 - 3)/1 + 1 = 32"."""
    if not isinstance(module, (nn.Conv2d, *POOLS)) or isinstance(module.padding, str):
        return ""
    k, s, p = _pair(module.kernel_size)[0], _pair(module.stride)[0], _pair(module.padding)[0]
    d = _pair(getattr(module, "dilation", 1))[0]
    k_text = str(k) if d == 1 else f"{d}*({k}-1)+1"  # a dilated kernel spans d*(k-1)+1 pixels
    span = n + 2 * p - (d * (k - 1) + 1)
    fraction = f"({n} + 2*{p} - {k_text})/{s}"
    if span % s:
        fraction = f"floor({fraction})"
    return f"{fraction} + 1 = {span // s + 1}"


def _macs(module: nn.Module, output: torch.Tensor) -> int:
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        return output[0].numel() * (module.in_channels // module.groups) * kh * kw
    if isinstance(module, nn.Linear):
        # Inputs with token dimensions (ViT) apply the Linear once per output vector.
        return output[0].numel() * module.in_features
    return 0


def module_layer_table(model: nn.Module, input_shape: tuple[int, int, int]) -> list[dict]:
    """Rows for ``model`` run on one dummy image of ``input_shape`` (C, H, W)."""
    rows, counted, handles = [], set(), []

    def hook(name: str, module: nn.Module, inputs, output) -> None:
        if isinstance(output, (tuple, list)):
            output = output[0]
        if not torch.is_tensor(output) or not inputs or not torch.is_tensor(inputs[0]):
            return
        # A module run twice (shared weights) owns its parameters only once.
        params = 0 if id(module) in counted else sum(p.numel() for p in module.parameters(recurse=False))
        counted.add(id(module))
        in_shape, out_shape = list(inputs[0].shape[1:]), list(output.shape[1:])
        macs = _macs(module, output)
        if params or macs or in_shape != out_shape:
            side = in_shape[-1] if len(in_shape) == 3 else 0
            rows.append({
                "layer": name or "(model)", "type": _describe(module),
                "input_shape": in_shape, "output_shape": out_shape,
                "params": params, "macs": macs, "arithmetic": _arithmetic(module, side),
            })

    for name, module in model.named_modules():
        # Non-leaf modules with parameters of their own (a ViT's cls token) get a row too,
        # so the table's total always equals count_parameters(model).
        if not any(True for _ in module.children()) or any(True for _ in module.parameters(recurse=False)):
            handles.append(module.register_forward_hook(lambda m, i, o, name=name: hook(name, m, i, o)))
    was_training = model.training
    reference = next(model.parameters(), torch.empty(0))
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, *input_shape, device=reference.device, dtype=reference.dtype))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return rows


def layer_table(name: str, *, num_classes: int = 10, in_channels: int = 3, image_size: int = 32, **options) -> list[dict]:
    """Rows for registered model ``name`` built with these arguments (see module docstring)."""
    model = create_model(name, num_classes, in_channels=in_channels, image_size=image_size, **options)
    return module_layer_table(model, (in_channels, image_size, image_size))


def format_layer_table(rows: list[dict]) -> str:
    """An aligned text table of ``rows`` with a totals row for parameters and MACs."""
    header = ("layer", "type", "output", "params", "MACs", "spatial size")
    lines = [
        (r["layer"], r["type"], "x".join(map(str, r["output_shape"])),
         f"{r['params']:,}", f"{r['macs']:,}", r.get("arithmetic", ""))
        for r in rows
    ]
    total = ("total", "", "", f"{sum(r['params'] for r in rows):,}", f"{sum(r['macs'] for r in rows):,}", "")
    table = [header, *lines, total]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    numeric = {3, 4}  # right-align the numbers so their digits line up

    def render(row) -> str:
        cells = [c.rjust(w) if i in numeric else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))]
        return "  ".join(cells).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([render(header), rule, *map(render, lines), rule, render(total)])
