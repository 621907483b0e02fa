"""The service's request and response shapes, as its OpenAPI schema publishes them."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from fakeprint.engine.predictions import REASONS
from fakeprint.interfaces.serve.uploads import (
    FILES_FIELD,
)


class ErrorBody(BaseModel):
    error: str = Field(description="a short machine-readable code, e.g. file_too_large")
    detail: str = Field(description="what went wrong, for people")


class CamBody(BaseModel):
    png: str = Field(description="the heat map (100x100, inferno colours) as a data:image/png;base64 URL")
    layer: str = Field(description="the convolution the map comes from")
    target: str = Field(description="the class the map explains (the predicted one)")
    grid: list[int] = Field(description="the resolution of that layer's activations (height, width)")
    empty: bool = Field(description="true when no location raised the class score (the map is all zeros)")
    member: str | None = Field(default=None, description="a routed model's: the member whose map it is, the one "
                                                         "that answered (absent for other models)")


Reason = Literal[REASONS]  # why an answer is flagged uncertain (engine.predict.REASONS)


class ImageResult(BaseModel):
    filename: str
    label: str = Field(description="the predicted class name")
    label_index: int
    confidence: float = Field(description="the predicted class's probability (temperature-scaled where the model "
                                          "is calibrated)")
    uncertain: bool | None = Field(default=None, description="true when the answer is not to be trusted: its "
                                   "confidence is below what the model's calibration on held-out images trusts, "
                                   "the image is one flat colour, or (a routed model) its statistics are far from "
                                   "every training image's (absent: no calibration)")
    uncertain_reasons: list[Reason] | None = Field(
        default=None, description="why the answer is flagged uncertain ([] when it is not; absent: no calibration)")
    resized_from: list[int] | None = Field(default=None, description="the upload's own [width, height] when it "
                                           "was not 100x100 and had to be resized (which blurs the traces the model "
                                           "reads); absent for 100x100 images")
    probabilities: dict[str, float] = Field(description="class name -> probability (they sum to 1)")
    file_perturbed: float | None = Field(default=None, description="a routed model's: the probability that the file "
                                         "was re-encoded, resized, cropped or blurred (absent for other models)")
    time_ms: float = Field(description="this image's decoding plus its share of the batched model call "
                                       "(and of the Grad-CAM pass when asked for)")
    cam: CamBody | None = None


class PredictResponse(BaseModel):
    model: str
    backend: str
    count: int
    total_ms: float = Field(description="server time for the whole request, upload parsing included")
    results: list[ImageResult]


class ModelInfo(BaseModel):
    name: str
    backend: str
    source: str = Field(description="the checkpoint or ONNX file name")
    classes: list[str]
    num_classes: int
    metrics: dict[str, Any] = Field(description="the last training epoch's figures recorded in the checkpoint "
                                                "(empty for a model trained on every image)")
    held_out: dict[str, Any] | None = Field(
        default=None, description="accuracy on images the model (or, for a model trained on every image, the same "
                                  "recipe) never trained on, with the split, epoch selection and TTA it was measured "
                                  "with; null when there is none")
    tta: str = Field(description="the test-time augmentation applied to every prediction (none, flip, dihedral)")
    calibration: dict[str, Any] | None = Field(default=None, description="temperature, uncertain-flag threshold and "
                                               "calibration errors fitted on held-out images; null when none")
    input_size: dict[str, int]
    normalization: str
    gradcam: dict[str, Any]
    members: list[dict[str, Any]] | None = Field(
        default=None, description="for an ensemble: each member's name, backend, TTA and its own held-out figure "
                                  "(the ensemble's probabilities are their mean, uncalibrated); null for one model")
    route: dict[str, Any] | None = Field(
        default=None, description="for a routed model: the detector's threshold on the probability that a file was "
                                  "re-encoded, resized or edited (from it, the second member answers) and the two "
                                  "members (pristine files, perturbed files); null otherwise")
    limits: dict[str, int | float]
    batching: dict[str, int | float] | None = Field(
        default=None, description="dynamic batching: images per model call (max_batch), how long the oldest "
                                  "request waits for company (max_wait_ms), how long any request may wait for its "
                                  "model call before 503 deadline_exceeded (deadline_s), how many model calls run at "
                                  "once (model_calls)")
    version: str


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    s: {"model": ErrorBody, "description": d} for s, d in {
        400: "malformed multipart body, or no 'files' field", 401: "an API token is required and was missing or "
        "wrong", 408: "the request body did not arrive in time", 413: "a file, the request, an image's pixel "
        "count, the request's pixel count or the number of files is over the limit", 415: "not "
        "multipart/form-data, or a file that is not an image", 422: "an image that cannot be decoded, or a bad "
        "query parameter", 503: "the upload queue is full, or the request waited past its deadline for the model "
        "(queue_full, deadline_exceeded): retry after the Retry-After header's seconds"}.items()
}


PREDICT_BODY = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": [FILES_FIELD],
    "properties": {FILES_FIELD: {"type": "array", "items": {"type": "string", "format": "binary"},
                                 "description": "one or more images (PNG, JPEG, WebP, BMP, GIF, TIFF)"}}}}}}}
