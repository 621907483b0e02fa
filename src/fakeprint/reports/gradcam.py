"""Grad-CAM: where the model looked, from the gradients at its last convolution.

For an image and a class c, with ``A`` the activations of the target convolution (K maps of h x w) and
``g = d score_c / d A``, the map is ``relu(sum_k mean(g_k) * A_k)``, upsampled to the input size and scaled
to [0, 1] (Selvaraju et al., 2017). ``score_c`` is the model's output for c (a logit, or a log-probability
for models such as the ensemble that return those).

The target is found by running the model once and recording the order in which its ``nn.Conv2d`` layers
execute: the last convolution with a spatial kernel (a 1x1 projection shortcut that happens to run last, as
in a residual block, is passed over in favour of the block's 3x3 convolution), or the last one of any kind.
This works for every registered model, including ensembles whose frozen members run under
``torch.no_grad()``: a pre-hook on the target switches gradients back on for the rest of that member's
forward pass.

``GradCAM`` registers its hooks only for the duration of a call and serialises calls with a lock; give it
a model of its own (``copy.deepcopy``) when other threads run the same model at the same time.
"""

from __future__ import annotations

import base64
import io
import threading
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from fakeprint.data.dataset import IMAGE_SIZE
from fakeprint.data.loader import tensor_view
from fakeprint.features.preprocess import normalize, to_float


def conv_execution_order(model: nn.Module, size: int = IMAGE_SIZE) -> list[str]:
    """Names of the model's ``nn.Conv2d`` modules in the order they run on a ``1 x 3 x size x size`` input."""
    order: list[str] = []
    handles = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Conv2d):
            handles.append(mod.register_forward_hook(lambda m, i, o, name=name: order.append(name)))
    was_training = model.training
    try:
        model.eval()
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        with torch.no_grad():
            model(torch.zeros(1, 3, size, size, device=device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    seen: set[str] = set()
    return [n for n in order if not (n in seen or seen.add(n))]


def find_target_layer(model: nn.Module, size: int = IMAGE_SIZE) -> str:
    """The name of the convolution Grad-CAM uses (see the module docstring)."""
    order = conv_execution_order(model, size)
    if not order:
        raise ValueError(f"{type(model).__name__} has no nn.Conv2d layer: Grad-CAM needs one")
    modules = dict(model.named_modules())
    spatial = [n for n in order if tuple(modules[n].kernel_size) != (1, 1)]
    return (spatial or order)[-1]


@dataclass
class CamResult:
    """``maps[i]`` is image i's heat map (H x W floats in [0, 1]) for class ``classes[i]``; for a routed model
    ``members[i]`` is the index of the member whose map it is, ``grids[i]`` that member's grid (None otherwise)."""

    maps: np.ndarray
    classes: np.ndarray
    layer: str
    grid: tuple[int, int]  # the resolution of the target layer's activations
    members: np.ndarray | None = None
    grids: list[tuple[int, int]] | None = None


class GradCAM:
    """Grad-CAM for a classifier that takes normalised N x 3 x H x W float batches.

    >>> cam = GradCAM(model)                       # target: the last convolution
    >>> result = cam(uint8_images)                 # N x H x W x 3 uint8, explains the predicted classes
    >>> result.maps.shape                          # (N, H, W), values in [0, 1]
    """

    def __init__(self, model: nn.Module, target_layer: str | None = None, norm: str = "imagenet"):
        self.model = model
        self.norm = norm
        self.layer = target_layer or find_target_layer(model)
        modules = dict(model.named_modules())
        if self.layer not in modules:
            raise ValueError(f"no layer named {self.layer!r} in {type(model).__name__}")
        self.module = modules[self.layer]
        self._lock = threading.Lock()

    def __call__(self, images: np.ndarray | torch.Tensor, classes: np.ndarray | list[int] | None = None,
                 batch_size: int = 32) -> CamResult:
        """Heat maps for N x H x W x 3 uint8 images; ``classes`` defaults to each image's predicted class."""
        n = images.shape[0]
        maps, chosen, grid = [], [], (0, 0)
        for start in range(0, n, batch_size):
            chunk = images[start : start + batch_size]
            if isinstance(chunk, np.ndarray):
                chunk = tensor_view(chunk)
            cls = None if classes is None else torch.as_tensor(np.asarray(classes)[start : start + batch_size])
            m, c, grid = self._batch(chunk, cls)
            maps.append(m)
            chosen.append(c)
        if not maps:
            return CamResult(np.zeros((0, *images.shape[1:3]), np.float32), np.zeros(0, np.int64), self.layer, grid)
        return CamResult(np.concatenate(maps), np.concatenate(chosen), self.layer, grid)

    def _batch(self, images: torch.Tensor, classes: torch.Tensor | None) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
        param = next(self.model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        # contiguous: to_float's channels-last view crashes some CPU backward kernels in torch 2.13
        x = normalize(to_float(images.to(device)), self.norm).contiguous()
        store: dict[str, torch.Tensor] = {}

        def pre_hook(module, args):
            torch.set_grad_enabled(True)  # undone when an enclosing no_grad block (an ensemble member) exits

        def hook(module, args, output):
            act = output if output.requires_grad else output.detach().requires_grad_(True)  # frozen members
            store["act"] = act
            return act.clone()  # later in-place ops (ReLU(inplace=True)) must not overwrite what we keep

        with self._lock:
            was_training = self.model.training
            self.model.eval()
            handles = [self.module.register_forward_pre_hook(pre_hook), self.module.register_forward_hook(hook)]
            try:
                with torch.enable_grad():
                    out = self.model(x).float()
                    if classes is None:
                        classes = out.argmax(1)
                    classes = classes.to(out.device).long()
                    act = store.get("act")
                    if act is None:
                        raise RuntimeError(f"layer {self.layer!r} did not run in the forward pass")
                    score = out.gather(1, classes.view(-1, 1)).sum()  # images are independent in eval mode
                    (grad,) = torch.autograd.grad(score, act, allow_unused=True)
                if grad is None:
                    raise RuntimeError(f"no gradient reached layer {self.layer!r}")
            finally:
                for h in handles:
                    h.remove()
                self.model.train(was_training)
        with torch.no_grad():
            weights = grad.mean(dim=(2, 3), keepdim=True)
            cam = F.relu((weights * act.detach()).sum(dim=1, keepdim=True))
            grid = (int(cam.shape[2]), int(cam.shape[3]))
            cam = F.interpolate(cam, size=tuple(images.shape[1:3]), mode="bilinear", align_corners=False)
            cam = cam[:, 0]
            peak = cam.flatten(1).amax(dim=1).view(-1, 1, 1)
            cam = torch.where(peak > 0, cam / peak.clamp_min(1e-12), torch.zeros_like(cam)).clamp_(0, 1)
        return cam.cpu().numpy().astype(np.float32), classes.cpu().numpy(), grid


class RoutedGradCAM:
    """Grad-CAM for a routed model (``engine.predict.RoutedClassifier``): each image's map is the one of the member
    that answered it. The file detector only chooses the member; the answer, probabilities included, is that
    member's, so its map explains the answer exactly. ``cams[i]`` explains member i; ``names[i]`` is its name.

    >>> cam = RoutedGradCAM([GradCAM(pristine_model), GradCAM(robust_model)], ["default", "robust"])
    >>> result = cam(uint8_images, classes=labels, routes=clf.routes(predictions.file_perturbed))
    """

    def __init__(self, cams: list[GradCAM], names: list[str]):
        if len(cams) != len(names) or not cams:
            raise ValueError("RoutedGradCAM needs one name per member's GradCAM")
        self.cams, self.names = list(cams), list(names)
        layers = {c.layer for c in self.cams}
        self.layer = layers.pop() if len(layers) == 1 else "; ".join(
            f"{n}: {c.layer}" for n, c in zip(self.names, self.cams, strict=True))

    def __call__(self, images: np.ndarray | torch.Tensor, classes: np.ndarray | list[int] | None = None,
                 routes: np.ndarray | None = None, batch_size: int = 32) -> CamResult:
        """Heat maps of N x H x W x 3 uint8 images; ``routes[i]``: the member that answered image i (None: all the
        first member's)."""
        n = int(images.shape[0])
        routes = np.zeros(n, np.int64) if routes is None else np.asarray(routes, np.int64)
        if routes.shape != (n,) or (n and not 0 <= routes.min() <= routes.max() < len(self.cams)):
            raise ValueError(f"routes must hold one member index (0-{len(self.cams) - 1}) per image")
        maps = np.zeros((n, *images.shape[1:3]), np.float32)
        chosen = np.zeros(n, np.int64)
        grid, grids = (0, 0), [(0, 0)] * n
        for which, cam in enumerate(self.cams):
            idx = np.flatnonzero(routes == which)
            if not len(idx):
                continue
            part = images[torch.from_numpy(idx)] if isinstance(images, torch.Tensor) else images[idx]
            got = cam(part, None if classes is None else np.asarray(classes)[idx], batch_size)
            maps[idx], chosen[idx], grid = got.maps, got.classes, got.grid
            for i in idx:
                grids[i] = got.grid
        return CamResult(maps, chosen, self.layer, grid, routes, grids)


def colorize(cam: np.ndarray, colormap: str = "inferno") -> np.ndarray:
    """An H x W map in [0, 1] -> H x W x 3 uint8 colours."""
    from matplotlib import colormaps

    lut = (colormaps[colormap](np.linspace(0, 1, 256))[:, :3] * 255 + 0.5).astype(np.uint8)
    return lut[np.clip(np.rint(cam * 255), 0, 255).astype(np.uint8)]


def to_png_data_url(cam: np.ndarray, colormap: str = "inferno") -> str:
    """An H x W map in [0, 1] as a ``data:image/png;base64,...`` URL of its colourised heat map."""
    buf = io.BytesIO()
    Image.fromarray(colorize(cam, colormap)).save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
