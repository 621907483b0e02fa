"""How many images a model should see per forward pass on the CPU (activations sized to the cache)."""

from __future__ import annotations

import torch
from torch import nn

# Activations of one forward slice should fit in about half of a server CPU's last-level cache: pushed through a
# network 256 images at a time, a full-resolution first layer's output (2.5 MB an image for the dilated ThreeCNN)
# spills to memory, and 2 cores then spend more time waiting for it than computing (the full-width network, the
# `accurate` model until round 8: 133 images/s in whole batches of 256, 205 in slices of 6; benchmarks/cpu_inference.py, docs/MODEL_CARD.md).
CPU_SLICE_BYTES = 16 * 2**20


def cpu_micro_batch(model: nn.Module, image_shape: tuple[int, ...] = (3, 100, 100),
                    budget: int = CPU_SLICE_BYTES) -> int:
    """How many images ``model`` should see per forward pass on the CPU: ``budget`` over the largest activation
    of one image (measured once per model and image shape with forward hooks), between 4 and 64; 0 (whole
    batches) for a model with ``slices_itself`` set, which slices where it pays itself."""
    if getattr(model, "slices_itself", False):  # it runs its own parts in slices (models.hybrid): whole batches
        return 0
    memo = model.__dict__.setdefault("_fakeprint_micro_batch", {})
    if image_shape in memo:
        return memo[image_shape]
    largest = [0]

    def hook(_m, _i, out):
        if isinstance(out, torch.Tensor):
            largest[0] = max(largest[0], out.numel() * out.element_size())

    leaves = [m for m in model.modules() if not any(True for _ in m.children())]
    handles = [m.register_forward_hook(hook) for m in leaves]
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, *image_shape, device=next(iter(model.parameters())).device))
    except Exception:  # noqa: BLE001 - a model that cannot be probed is run on whole batches
        largest[0] = 0
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    memo[image_shape] = int(min(64, max(4, budget // largest[0]))) if largest[0] else 0
    return memo[image_shape]
