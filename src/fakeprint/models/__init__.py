"""Model registry. ``create_model(name)``; ``list_models()``; one file per family."""

from fakeprint.models import ensemble, failed, fpnet, hybrid, skipconcnn, threecnn  # noqa: F401  (registers the models)
from fakeprint.models.registry import count_parameters, create_model, describe, list_models, register_model

__all__ = ["count_parameters", "create_model", "describe", "list_models", "register_model"]
