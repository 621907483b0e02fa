"""Rewrites that leave a model's outputs unchanged and make it faster on the CPU.

- **BatchNorm folding** (inference): in eval mode a BatchNorm after a convolution is an affine map per channel, so
  it folds into the convolution's weights and bias (``torch.nn.utils.fusion.fuse_conv_bn_eval``) and costs nothing.
- **ReLU after max-pooling** (inference and training): ReLU is monotone, so ``maxpool(relu(x)) ==
  relu(maxpool(x))``; applied after the pool it touches a quarter of the values. The gradients are the same too:
  where a window's maximum is positive both orders pass the gradient to the same element, and where it is not, the
  ReLU's zero derivative stops it in both. Modules without parameters move, so a state dict keeps its keys.
- **2x2 max-pooling from strided views** (inference): ``nn.MaxPool2d(2)`` as two element-wise maxima of strided
  views of the input, 1.3-2x faster than the pooling kernel in channels-last layout on 2 CPU cores (and 10x in
  NCHW), exactly equal.

On 2 CPU cores the BatchNorms and the ReLUs before pooling were about a third of the dilated ThreeCNN's
inference time (``benchmarks/cpu_inference.py`` measures both ways); the moved ReLUs make a training step of
ThreeCNN about 15% faster (``benchmarks/train_throughput.py``). ``fuse_for_inference``'s copy cannot be trained or
saved as a checkpoint of the original architecture; ``relu_after_pool`` can (the training path runs it).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval


def fuse_for_inference(model: nn.Module) -> nn.Module:
    """An eval-mode copy of ``model`` with every Conv2d -> BatchNorm2d pair of a Sequential folded into the
    convolution, every ReLU that ends a block directly followed by a 2D max-pool moved after the pool, and each
    such 2x2 pool with its ReLU made one ``MaxPool2ReLU``. The original is left untouched."""
    fused = copy.deepcopy(model).eval()
    for module in list(fused.modules()):
        if isinstance(module, nn.Sequential):
            _fold_batchnorms(module)
    relu_after_pool(fused)
    for module in list(fused.modules()):
        if isinstance(module, nn.Sequential):
            _strided_pools(module)
    return fused.eval()  # the Identity and Sequential modules put in place are new, in training mode until now


def relu_after_pool(model: nn.Module) -> nn.Module:
    """``model`` itself, each ReLU that ends a block of a Sequential directly followed by a 2D max-pool moved after
    the pool (``Sequential(pool, ReLU)``): the same outputs and gradients, the same state dict keys, faster."""
    for module in list(model.modules()):
        if isinstance(module, nn.Sequential):
            _relu_after_pool(module)
    return model


class MaxPool2ReLU(nn.Module):
    """``relu(max_pool2d(x, 2))`` (kernel 2, stride 2, no padding, odd edges dropped) from two element-wise maxima
    of strided views: in inference, where nothing needs the pool's indices. Under autograd, tracing or ONNX export
    it runs the pooling operator itself."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or x.dim() != 4:
            return F.relu(F.max_pool2d(x, 2))
        h, w = int(x.shape[2]) // 2 * 2, int(x.shape[3]) // 2 * 2
        x = x[:, :, :h, :w]
        rows = torch.maximum(x[:, :, :, 0::2], x[:, :, :, 1::2])
        return torch.maximum(rows[:, :, 0::2], rows[:, :, 1::2]).relu_()


def _fold_batchnorms(seq: nn.Sequential) -> None:
    names = list(seq._modules)
    for a, b in zip(names, names[1:], strict=False):
        conv, bn = seq._modules[a], seq._modules[b]
        if isinstance(conv, nn.Conv2d) and type(bn) is nn.BatchNorm2d and bn.track_running_stats \
                and bn.running_mean is not None:
            seq._modules[a] = fuse_conv_bn_eval(conv, bn)
            seq._modules[b] = nn.Identity()


def _relu_after_pool(seq: nn.Sequential) -> None:
    names = list(seq._modules)
    for a, b in zip(names, names[1:], strict=False):
        block, pool = seq._modules[a], seq._modules[b]
        if not (isinstance(pool, nn.MaxPool2d) and isinstance(block, nn.Sequential) and len(block)
                and type(block[-1]) is nn.ReLU):
            continue
        block[-1] = nn.Identity()
        seq._modules[b] = nn.Sequential(pool, nn.ReLU(inplace=True))


def _plain_2x2(pool: nn.Module) -> bool:
    def pair(v: object) -> tuple:
        return tuple(v) if isinstance(v, (tuple, list)) else (v, v)

    return (type(pool) is nn.MaxPool2d and pair(pool.kernel_size) == (2, 2) and pair(pool.stride) == (2, 2)
            and pair(pool.padding) == (0, 0) and pair(pool.dilation) == (1, 1) and not pool.ceil_mode
            and not pool.return_indices)


def _strided_pools(seq: nn.Sequential) -> None:
    for name, child in list(seq._modules.items()):
        if isinstance(child, nn.Sequential) and len(child) == 2 and _plain_2x2(child[0]) \
                and type(child[1]) is nn.ReLU:
            seq._modules[name] = MaxPool2ReLU()
