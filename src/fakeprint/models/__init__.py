"""Model registry. ``create_model(name)``; ``list_models()``; one file per family."""

from . import ensemble, failed, fpnet, hybrid, skipconcnn, threecnn  # noqa: F401  (registers the models)
from .registry import count_parameters, create_model, describe, list_models, register_model

__all__ = ["count_parameters", "create_model", "describe", "list_models", "register_model"]
