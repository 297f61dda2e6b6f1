"""Evaluation shared between the processes of a distributed run.

    logits = sharded_logits(world, model, split.images, mean, std, tta=True, device=device)

Each process scores its share of the batches `predict_logits` would run, and every process
gets all the logits back, in order; with one process it is `predict_logits` itself.
"""

from __future__ import annotations

import torch

from visionrecipe.evaluate.scoring import eval_batch, predict_logits
from visionrecipe.system import World


def sharded_logits(world: World, model: torch.nn.Module, images: torch.Tensor, mean, std, **options) -> torch.Tensor:
    """`predict_logits` of all `images`, its batches dealt out to the processes; every process
    gets all the logits, in order. Each process scores rank 0's weights (copied to it first)
    on the very batches one process would run, so each image is scored exactly once and the
    metrics are those of a single process, identical everywhere."""
    if world.size == 1:
        return predict_logits(model, images, mean, std, **options)
    world.broadcast_module(model)
    batch = options.get("batch_size") or eval_batch(images)
    starts = range(0, len(images), batch)
    mine = {start: predict_logits(model, images[start:start + batch], mean, std, **options)
            for start in starts[world.rank::world.size]}
    merged: dict[int, torch.Tensor] = {}
    for part in world.gather(mine):
        merged.update(part)
    if not merged:
        return torch.zeros(0, 0)
    return torch.cat([merged[start] for start in starts])
