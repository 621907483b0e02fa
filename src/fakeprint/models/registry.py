"""Model registry: adding a model is one decorated factory function (timm style)."""

from __future__ import annotations

import inspect
from collections.abc import Callable

from torch import nn

from fakeprint.core.errors import FakeprintError

_MODELS: dict[str, Callable[..., nn.Module]] = {}
_DESCRIPTIONS: dict[str, str] = {}


def first_paragraph(doc: str | None) -> str:
    """A docstring's first paragraph on one line: a model's description in ``fakeprint models`` (its first line
    alone would cut a wrapped first sentence short)."""
    return " ".join(inspect.cleandoc(doc or "").split("\n\n")[0].split())


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register ``fn`` under its name; ``fn(num_classes=5, **kwargs)`` must return an ``nn.Module``."""
    name = fn.__name__
    if name in _MODELS:
        raise ValueError(f"model {name!r} registered twice")
    _MODELS[name] = fn
    _DESCRIPTIONS[name] = first_paragraph(fn.__doc__)
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
