"""Checkpoints: weights as safetensors, metadata as JSON, both written atomically.

``NAME.safetensors`` + ``NAME.json``. Loading never unpickles: weights come only from safetensors, and
the metadata is validated (known model, matching shapes) before the weights are used. Resume state
(optimizer, scheduler) is loaded with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import io
import json
import time
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from fakeprint.core.errors import CheckpointError, FakeprintError
from fakeprint.core.io import atomic_write
from fakeprint.models import create_model, list_models
from fakeprint.models.metadata import check_metadata_fields

FORMAT = "fakeprint-checkpoint/1"


def _unwrap(model: nn.Module) -> nn.Module:
    model = getattr(model, "module", model)        # DDP
    return getattr(model, "_orig_mod", model)      # torch.compile


def save_checkpoint(stem: Path, model: nn.Module, meta: dict[str, Any]) -> Path:
    """Save ``stem.safetensors`` and ``stem.json``; returns the safetensors path."""
    stem = Path(stem)
    state = {k: v.detach().cpu().contiguous() for k, v in _unwrap(model).state_dict().items()}
    meta = {"format": FORMAT, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **meta}
    for key in ("model", "num_classes"):
        if key not in meta:
            raise ValueError(f"checkpoint metadata needs {key!r}")
    weights = stem.with_suffix(".safetensors")
    atomic_write(weights, st_save(state, metadata={"format": FORMAT, "model": str(meta["model"])}))
    atomic_write(stem.with_suffix(".json"), (json.dumps(meta, indent=2, default=str) + "\n").encode())
    return weights


def update_metadata(path: str | Path, fields: dict[str, Any]) -> Path:
    """Add or replace ``fields`` in a checkpoint's JSON metadata (the weights are untouched); refuses the
    model shipped inside the package. Returns the JSON path."""
    weights = resolve_checkpoint(path)
    if is_shipped(weights):
        raise CheckpointError(f"{weights}: the shipped model is not changed in place (tools/ship_default_model.py "
                              "ships a new one)")
    meta_path = weights.with_suffix(".json")
    meta = json.loads(meta_path.read_text()) | fields
    atomic_write(meta_path, (json.dumps(meta, indent=2, default=str) + "\n").encode())
    return meta_path


DEFAULT_NAME = "default"
# the models shipped inside the package, by the name every command accepts in place of a checkpoint path:
# ``default`` (the preset ``default``: a statistics head of two hidden layers beside the CNN, since round 12),
# ``accurate`` (the most accurate on clean files, by 10 images of 1,250: preset ``accurate``, feature set v5),
# ``fast`` (preset ``fast``, the CNN alone: twice the others' speed, 3-4 points less accurate) and ``robust``
# (preset ``robust``: the default's recipe trained on perturbed copies of its files as well); docs/MODEL_CARD.md
SHIPPED_NAMES = (DEFAULT_NAME, "accurate", "fast", "robust")


def shipped_model_path(name: str = DEFAULT_NAME) -> Path | None:
    """The model ``name`` shipped inside the package (``weights/NAME.safetensors`` + ``.json``), if there is one."""

    path = Path(str(resources.files("fakeprint") / "weights" / f"{name}.safetensors"))
    return path if path.is_file() and path.with_suffix(".json").is_file() else None


def is_shipped(path: str | Path) -> bool:
    """Whether ``path`` is inside the installed package (one of the shipped models)."""

    return Path(path).resolve().is_relative_to(Path(str(resources.files("fakeprint"))).resolve())


def output_dir(checkpoint: Path, name: str) -> Path:
    """Where a command writes its results by default: ``name`` beside the checkpoint, except for a checkpoint
    inside the installed package (a shipped model), whose results go to ``./name-default`` (``./name-fast``)."""
    if is_shipped(checkpoint):
        return Path.cwd() / f"{name}-{Path(checkpoint).stem}"
    return Path(checkpoint).parent / name


def results_dir(checkpoints: list, name: str) -> Path:
    """Where a command writes results for ``checkpoints`` by default: ``output_dir`` of the only one (an ``.onnx``
    file as it is), or ``./NAME-ensemble-of-N`` for several (an ensemble belongs to no one run folder)."""
    if len(checkpoints) > 1:
        return Path.cwd() / f"{name}-ensemble-of-{len(checkpoints)}"
    first = Path(checkpoints[0])
    return output_dir(first if str(first).endswith(".onnx") else resolve_checkpoint(first), name)


def resolve_checkpoint(path: str | Path) -> Path:
    """Accept a run folder (-> its last checkpoint, the one its report describes; ``best`` for runs that have
    no ``last``), a stem, ``.safetensors`` or ``.json``; ``default``: the model shipped in the package (unless
    a file or folder of that name is in the working directory); likewise ``accurate`` and ``fast`` (``SHIPPED_NAMES``)."""
    p = Path(path)
    if str(path) in SHIPPED_NAMES and not p.exists():
        shipped = shipped_model_path(str(path))
        if shipped is None:
            raise CheckpointError(f"{str(path)!r}: no such model is shipped in this installation")
        return shipped
    if p.is_dir():
        p = p / "last.safetensors" if (p / "last.safetensors").exists() else p / "best.safetensors"
    elif p.suffix == ".json" or p.suffix != ".safetensors" and not p.exists():
        p = p.with_suffix(".safetensors")
    if not p.exists():
        raise CheckpointError(f"{path}: checkpoint not found")
    return p


def read_json_metadata(path: Path, fmt: str, missing_hint: str, kind: str) -> dict[str, Any]:
    """A metadata JSON object whose ``format`` is ``fmt``; ``CheckpointError`` naming the file otherwise."""
    try:
        meta = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: metadata file missing ({missing_hint})") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != fmt:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise CheckpointError(f"{path}: not {kind} (format {found!r})")
    return meta


def read_metadata(path: str | Path) -> dict[str, Any]:
    weights = resolve_checkpoint(path)
    meta_path = weights.with_suffix(".json")
    meta = read_json_metadata(meta_path, FORMAT, "a checkpoint is NAME.safetensors + NAME.json", "a fakeprint checkpoint")
    if meta.get("model") not in list_models():
        raise CheckpointError(f"{meta_path}: unknown model {meta.get('model')!r} (known: {', '.join(list_models())})")
    n = meta.get("num_classes")
    if not isinstance(n, int) or isinstance(n, bool) or not 2 <= n <= MAX_CLASSES:
        raise CheckpointError(f"{meta_path}: bad num_classes {n!r} (an integer from 2 to {MAX_CLASSES})")
    classes = meta.get("classes")
    if classes is not None and (not isinstance(classes, list) or len(classes) != n
                                or not all(isinstance(c, str) and c for c in classes)):
        raise CheckpointError(f"{meta_path}: 'classes' must list {n} class names (num_classes), got {classes!r}")
    if not isinstance(meta.get("model_args", {}), dict):
        raise CheckpointError(f"{meta_path}: model_args must be a mapping")
    check_metadata_fields(meta, meta_path)
    return meta


MAX_CLASSES = 10_000


def _header_shapes(raw: bytes, weights: Path) -> dict[str, tuple[int, ...]]:
    """Tensor shapes from a safetensors header, read without loading any tensor."""
    try:
        size = int.from_bytes(raw[:8], "little")
        header = json.loads(raw[8 : 8 + size])
        return {k: tuple(int(d) for d in v["shape"]) for k, v in header.items() if k != "__metadata__"}
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{weights}: corrupt safetensors header ({e})") from None


def _build_checked(meta: dict[str, Any], shapes: dict[str, tuple[int, ...]], weights: Path) -> nn.Module:
    """Build the model on the ``meta`` device first (no memory), check it against the file's tensor shapes,
    and only then build it for real: absurd metadata fails as a one-line error before any allocation."""
    args = _model_args(meta)
    try:
        with torch.device("meta"):
            ghost = create_model(meta["model"], meta["num_classes"], **args)
    except Exception as e:  # noqa: BLE001 - any constructor failure on absurd arguments is a refusal
        why = str(e) if isinstance(e, FakeprintError) else f"{type(e).__name__}: {e}"
        raise CheckpointError(f"{weights.with_suffix('.json')}: metadata field 'model_args' "
                              f"{str(meta.get('model_args'))[:80]} does not build a {meta['model']!r} "
                              f"({why[:160]})") from None
    expected = {k: tuple(v.shape) for k, v in ghost.state_dict().items()}
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected))
    wrong = [k for k in expected if k in shapes and shapes[k] != expected[k]]
    if missing or unexpected or wrong:
        detail = "; ".join(
            s for s in (
                f"missing {missing[:3]}" if missing else "",
                f"unexpected {unexpected[:3]}" if unexpected else "",
                f"shape mismatch {[(k, shapes[k], expected[k]) for k in wrong[:3]]}" if wrong else "",
            ) if s
        )
        raise CheckpointError(f"{weights}: weights do not fit model {meta['model']!r}: {detail}")
    return create_model(meta["model"], meta["num_classes"], **args)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Build the model named in the metadata and load its safetensors weights (shapes checked first)."""
    weights = resolve_checkpoint(path)
    meta = read_metadata(weights)
    raw = weights.read_bytes()
    if len(raw) < 10 or raw[8:9] != b"{":
        raise CheckpointError(
            f"{weights}: not a safetensors file; refusing to load it (fakeprint never unpickles checkpoints)"
        )
    model = _build_checked(meta, _header_shapes(raw, weights), weights)
    try:
        state = st_load(raw)
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{weights}: corrupt safetensors file ({e})") from None
    model.load_state_dict(state)
    model.eval()
    return model.to(map_location), meta


def _model_args(meta: dict[str, Any]) -> dict[str, Any]:
    args = dict(meta.get("model_args") or {})
    for k, v in args.items():
        if isinstance(v, list):
            args[k] = tuple(v)
    return args


def save_resume_state(path: Path, state: dict[str, Any]) -> None:
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write(path, buf.getvalue())


def load_resume_state(path: Path) -> dict[str, Any]:
    """Optimizer/scheduler/epoch state, loaded with ``weights_only=True`` (no arbitrary code)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: resume state not found") from None
    except Exception as e:  # noqa: BLE001 - any unpickling refusal or corruption is a refusal
        raise CheckpointError(f"{path}: refusing to load resume state ({type(e).__name__}: {str(e)[:200]})") from None
