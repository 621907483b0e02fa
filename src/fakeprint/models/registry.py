"""Model registry: adding a model is one decorated factory function (timm style)."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from ..errors import FakeprintError

_MODELS: dict[str, Callable[..., nn.Module]] = {}
_DESCRIPTIONS: dict[str, str] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register ``fn`` under its name; ``fn(num_classes=5, **kwargs)`` must return an ``nn.Module``."""
    name = fn.__name__
    if name in _MODELS:
        raise ValueError(f"model {name!r} registered twice")
    _MODELS[name] = fn
    _DESCRIPTIONS[name] = (fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else ""
    return fn


def create_model(name: str, num_classes: int = 5, **kwargs) -> nn.Module:
    if name not in _MODELS:
        raise FakeprintError(f"unknown model {name!r} (known: {', '.join(list_models())})")
    try:
        return _MODELS[name](num_classes=num_classes, **kwargs)
    except (TypeError, ValueError) as e:
        raise FakeprintError(f"model {name!r}: bad model_args ({e})") from None


def list_models() -> list[str]:
    return sorted(_MODELS)


def describe(name: str) -> str:
    return _DESCRIPTIONS.get(name, "")


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
