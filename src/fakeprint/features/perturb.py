"""Named, seeded perturbations of image *files*, as images reach a user: re-saved by a website or a messenger,
resized, cropped, blurred, noisy, or several of these in a row.

A perturbation takes a decoded uint8 image and returns the bytes of the file a user would have: every lossy step
is a real encoder (Pillow's libjpeg and libwebp), every geometric one a real resampling filter, and the result is
written as that file (JPEG, WebP, or PNG when the last step is lossless). The file is then read through
fakeprint's own decode path (``data.dataset.decode_bytes``, the same as ``predict`` on a path and the service on
an upload), never approximated on tensors.

A spec is ``KIND[:key=value,...]``, several joined by ``+`` (applied left to right):

| kind | keys (default) | what |
| --- | --- | --- |
| ``jpeg`` | ``q`` (90), ``sub`` (420: 4:2:0 chroma; 444; 422) | one JPEG save |
| ``jpeg2`` | ``q`` (90), ``q2`` (75), ``sub`` (420) | saved at ``q``, decoded, saved again at ``q2`` (double JPEG) |
| ``webp`` | ``q`` (80) | one lossy WebP save |
| ``resize`` | ``s`` (scale, 0.5) or ``size`` (pixels), ``filter`` (bicubic) | resampled to that size (nearest, bilinear, bicubic, lanczos, box, hamming) |
| ``crop`` | ``f`` (0.9) | the centre ``f`` of each side kept |
| ``blur`` | ``r`` (0.6) | Gaussian blur of radius ``r`` (Pillow's ``GaussianBlur``) |
| ``noise`` | ``sigma`` (4) | Gaussian noise of standard deviation ``sigma`` (0-255 scale), seeded |
| ``none`` | | the file as it was (lossless PNG) |

A bad spec is a ``FakeprintError`` naming it. ``SUITES`` lists the named sets the robustness command runs.
(ImageNet-C's severities, packaged as ``imagecorruptions``, are tensor-level and need OpenCV and scikit-image;
the strengths here are instead the ones images meet: JPEG 50-95, WebP 60-90, 0.5-2x resizing, 70-95% crops.)
"""

from __future__ import annotations

import io
import os
import threading
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter

from fakeprint.core.errors import FakeprintError
from fakeprint.data.dataset import decode_bytes

FILTERS = {"nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR,
           "bicubic": Image.Resampling.BICUBIC, "lanczos": Image.Resampling.LANCZOS, "box": Image.Resampling.BOX,
           "hamming": Image.Resampling.HAMMING}
SUBSAMPLING = {"444": 0, "422": 1, "420": 2}
_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


@dataclass(frozen=True)
class Step:
    kind: str
    args: dict[str, float | str]


def _num(spec: str, key: str, value: str, low: float, high: float) -> float:
    try:
        v = float(value)
    except ValueError:
        raise FakeprintError(f"perturbation {spec!r}: {key}={value!r} is not a number") from None
    if not low <= v <= high:
        raise FakeprintError(f"perturbation {spec!r}: {key}={value} is outside {low:g}..{high:g}")
    return v


# kind -> {key: (default, parser)}; parsers take (spec, key, value)
KINDS: dict[str, dict[str, tuple[float | str, Callable[[str, str, str], float | str]]]] = {
    "none": {},
    "jpeg": {"q": (90, lambda s, k, v: int(_num(s, k, v, 1, 100))),
             "sub": ("420", lambda s, k, v: _choice(s, k, v, SUBSAMPLING))},
    "jpeg2": {"q": (90, lambda s, k, v: int(_num(s, k, v, 1, 100))),
              "q2": (75, lambda s, k, v: int(_num(s, k, v, 1, 100))),
              "sub": ("420", lambda s, k, v: _choice(s, k, v, SUBSAMPLING))},
    "webp": {"q": (80, lambda s, k, v: int(_num(s, k, v, 1, 100)))},
    "resize": {"s": (0.5, lambda s, k, v: _num(s, k, v, 0.05, 8)), "size": (0, lambda s, k, v: int(_num(s, k, v, 1, 1600))),
               "filter": ("bicubic", lambda s, k, v: _choice(s, k, v, FILTERS))},
    "crop": {"f": (0.9, lambda s, k, v: _num(s, k, v, 0.1, 1))},
    "blur": {"r": (0.6, lambda s, k, v: _num(s, k, v, 0, 20))},
    "noise": {"sigma": (4.0, lambda s, k, v: _num(s, k, v, 0, 128))},
}


def _choice(spec: str, key: str, value: str, options: dict) -> str:
    if value not in options:
        raise FakeprintError(f"perturbation {spec!r}: {key}={value!r} is not one of {', '.join(options)}")
    return value


def parse(spec: str) -> list[Step]:
    """``jpeg:q=75,sub=444+resize:s=0.5`` -> its steps; ``FakeprintError`` naming the spec on any mistake."""
    if not isinstance(spec, str) or not spec.strip():
        raise FakeprintError(f"perturbation {spec!r}: empty (e.g. jpeg:q=90, webp:q=80, resize:s=0.75)")
    steps = []
    for part in spec.strip().split("+"):
        kind, _, rest = part.strip().partition(":")
        if kind not in KINDS:
            raise FakeprintError(f"perturbation {spec!r}: unknown kind {kind!r} (known: {', '.join(KINDS)})")
        args = {k: d for k, (d, _) in KINDS[kind].items()}
        for item in filter(None, (x.strip() for x in rest.split(","))):
            key, eq, value = item.partition("=")
            if not eq or key not in KINDS[kind]:
                known = ", ".join(KINDS[kind]) or "none"
                raise FakeprintError(f"perturbation {spec!r}: {item!r} is not key=value with a key of {kind} "
                                     f"({known})")
            args[key] = KINDS[kind][key][1](spec, key, value)
        steps.append(Step(kind, args))
    return steps


def _apply(step: Step, im: Image.Image, rng: np.random.Generator) -> tuple[Image.Image, bytes | None]:
    """One step: the image after it, and the file bytes when the step is an encoder (None otherwise)."""
    a = step.args
    if step.kind in ("jpeg", "jpeg2"):
        data = _save(im, "JPEG", quality=int(a["q"]), subsampling=SUBSAMPLING[str(a["sub"])])
        if step.kind == "jpeg2":
            data = _save(Image.open(io.BytesIO(data)).convert("RGB"), "JPEG", quality=int(a["q2"]),
                         subsampling=SUBSAMPLING[str(a["sub"])])
        return Image.open(io.BytesIO(data)).convert("RGB"), data
    if step.kind == "webp":
        data = _save(im, "WEBP", quality=int(a["q"]), method=4)
        return Image.open(io.BytesIO(data)).convert("RGB"), data
    if step.kind == "resize":
        w, h = ((int(a["size"]),) * 2 if a["size"] else
                (max(1, round(im.width * float(a["s"]))), max(1, round(im.height * float(a["s"])))))
        return im.resize((w, h), FILTERS[str(a["filter"])]), None
    if step.kind == "crop":
        f = float(a["f"])
        w, h = max(1, round(im.width * f)), max(1, round(im.height * f))
        left, top = (im.width - w) // 2, (im.height - h) // 2
        return im.crop((left, top, left + w, top + h)), None
    if step.kind == "blur":
        return im.filter(ImageFilter.GaussianBlur(float(a["r"]))), None
    if step.kind == "noise":
        x = np.asarray(im, dtype=np.float32) + rng.normal(0, float(a["sigma"]), (im.height, im.width, 3))
        return Image.fromarray(np.clip(x + 0.5, 0, 255).astype(np.uint8)), None
    return im, None


def _save(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def perturb_file(image: np.ndarray, spec: str | list[Step], seed: int = 0) -> bytes:
    """The file a user would have after ``spec`` happened to ``image`` (uint8 H x W x 3): the last encoder's
    bytes, or a lossless PNG when the last step is geometric or noise."""
    steps = parse(spec) if isinstance(spec, str) else spec
    im = Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8))
    rng = np.random.default_rng(seed)
    data = None
    for step in steps:
        im, data = _apply(step, im, rng)
    return data if data is not None else _save(im, "PNG")


def decoded_copies(images: np.ndarray, specs: list, seeds: list[int]) -> np.ndarray:
    """Each uint8 image after its own spec (a string or parsed steps) and seed, read back as fakeprint reads files;
    in threads (the encoders and decoders free the GIL)."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1)))
    jobs = [_pool.submit(lambda im, s, sd: decode_bytes(perturb_file(im, s, sd), "a perturbed copy"), im, s, sd)
            for im, s, sd in zip(images, specs, seeds, strict=True)]
    return np.stack([j.result() for j in jobs]) if jobs else images


def perturbed_images(images: np.ndarray, spec: str, seed: int = 0) -> np.ndarray:
    """Every image after ``spec``, as fakeprint reads the resulting file (N x 100 x 100 x 3 uint8)."""
    steps = parse(spec)
    base = zlib.crc32(spec.encode()) ^ (seed * 1_000_003)
    return decoded_copies(images, [steps] * len(images), [base + i for i in range(len(images))])


def strength(spec: str) -> tuple[str, float]:
    """(family, strength) of a one-step spec, for plots: JPEG and WebP by quality, resize by scale (or size/100),
    crop by fraction, blur by radius, noise by sigma; chains are their own family at strength 0."""
    steps = parse(spec)
    if len(steps) != 1:
        return "chain", 0.0
    s = steps[0]
    value = {"jpeg": s.args.get("q"), "jpeg2": s.args.get("q2"), "webp": s.args.get("q"),
             "resize": (s.args["size"] / 100 if s.args.get("size") else s.args.get("s")), "crop": s.args.get("f"),
             "blur": s.args.get("r"), "noise": s.args.get("sigma"), "none": 0.0}[s.kind]
    family = s.kind + (f" ({s.args['sub']})" if s.kind == "jpeg" else "") + (
        f" ({s.args['filter']})" if s.kind == "resize" else "")
    return family, float(value or 0.0)


SUITES: dict[str, tuple[str, ...]] = {
    "quick": ("none", "jpeg:q=90", "jpeg:q=75", "webp:q=80", "resize:s=0.75", "resize:s=2", "crop:f=0.9",
              "blur:r=0.6"),
    "default": (
        "none",
        "jpeg:q=95", "jpeg:q=90", "jpeg:q=75", "jpeg:q=50", "jpeg:q=90,sub=444", "jpeg:q=75,sub=444",
        "jpeg2:q=90,q2=75", "webp:q=90", "webp:q=80", "webp:q=60",
        "resize:s=0.5", "resize:s=0.75", "resize:s=1.5", "resize:s=2", "resize:s=0.75,filter=bilinear",
        "resize:s=0.75,filter=lanczos", "resize:s=2,filter=nearest",
        "crop:f=0.95", "crop:f=0.9", "crop:f=0.8", "crop:f=0.7",
        "blur:r=0.3", "blur:r=0.6", "blur:r=1.0", "noise:sigma=2", "noise:sigma=5",
        "jpeg:q=90+resize:s=0.75", "resize:s=2+jpeg:q=85", "crop:f=0.9+webp:q=80", "blur:r=0.6+jpeg:q=90",
    ),
}


def suite(name_or_specs: str) -> list[str]:
    """A named suite, or comma-free specs separated by ``;`` (each checked)."""
    if name_or_specs in SUITES:
        return list(SUITES[name_or_specs])
    specs = [s.strip() for s in name_or_specs.split(";") if s.strip()]
    if not specs:
        raise FakeprintError(f"--suite {name_or_specs!r}: a suite name ({', '.join(SUITES)}) or specs separated "
                             "by ';'")
    for s in specs:
        parse(s)
    return specs
