"""What the optimizer steps: parameter groups, the batch size for small data, and the weight EMA.

    optimizer = build_optimizer(model, cfg, head_path="fc", batch_size=512)
    ema = EMA(model, decay=0.99); ema.update(model, step); ema.model  # evaluate with this
"""

from __future__ import annotations

import copy

import torch

from visionrecipe.models import checkpoint as ckpt
from visionrecipe.config import Config
from visionrecipe.recipes import lr_per_1024


def small_data_batch(batch_size: int, n_train: int, processes: int = 1) -> int:
    """The recipe's batch, shrunk for small data so an epoch has at least 16 steps (a power of two,
    at least 32 and a multiple of the process count): 1,293 digits at batch 512 would give the
    whole run 20 steps."""
    while batch_size > 32 and n_train // batch_size < 16:
        batch_size //= 2
    return max(processes, batch_size - batch_size % processes)


def build_optimizer(model: torch.nn.Module, cfg: Config, head_path: str, batch_size: int) -> torch.optim.Optimizer:
    """Param groups: backbone (lr × backbone_lr_mult) and head; no weight decay on biases and norms."""
    lr = cfg.optim.lr * (batch_size / 1024 if lr_per_1024(cfg) else 1.0)
    head_prefix = head_path + "."
    norm_biases = {id(m.bias) for m in model.modules()
                   if isinstance(m, torch.nn.modules.batchnorm._NormBase) and m.bias is not None}
    groups: dict[tuple[bool, str], list] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad and not name.startswith(head_prefix) and not cfg.model.freeze_backbone:
            continue  # frozen by the model itself (fastnet's whitening layer)
        is_head = name.startswith(head_prefix)
        kind = "norm_bias" if id(param) in norm_biases else ("decay" if param.ndim > 1 else "no_decay")
        groups.setdefault((is_head, kind), []).append(param)
    param_groups = []
    for (is_head, kind), params in sorted(groups.items()):
        mult = 1.0 if is_head else cfg.model.backbone_lr_mult
        if kind == "norm_bias":
            mult *= cfg.optim.bias_lr_mult
        param_groups.append({"params": params, "lr": lr * mult, "is_head": is_head,
                             "weight_decay": cfg.optim.weight_decay / (cfg.optim.bias_lr_mult if kind == "norm_bias" else 1.0)
                             if kind != "no_decay" else 0.0})
    name = cfg.optim.optimizer
    if name == "sgd":
        return torch.optim.SGD(param_groups, lr=lr, momentum=cfg.optim.momentum, nesterov=bool(cfg.optim.nesterov),
                               foreach=True)
    # foreach: one kernel per op over all tensors; PyTorch's CPU default is a Python loop per tensor
    if name == "adam":
        return torch.optim.Adam(param_groups, lr=lr, foreach=True)
    if name == "adamw":
        return torch.optim.AdamW(param_groups, lr=lr, foreach=True)
    return torch.optim.Adagrad(param_groups, lr=lr, foreach=True)


class EMA:
    """Exponential moving average of weights (and a copy of BatchNorm buffers), used for evaluation."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.model = copy.deepcopy(ckpt.unwrap(model)).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.decay = decay

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        # Warm-up so early averages are not dominated by the random init.
        decay = min(self.decay, (1 + step) / (10 + step))
        source = ckpt.unwrap(model)
        ema_params = list(self.model.parameters())
        torch._foreach_lerp_(ema_params, [p.detach() for p in source.parameters()], 1 - decay)
        for ema_buffer, buffer in zip(self.model.buffers(), source.buffers()):
            ema_buffer.copy_(buffer)
