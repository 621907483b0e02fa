"""Reading uploads safely: request and file sizes, file counts, image formats and pixel counts.

Every refusal is an ``ApiError`` (HTTP status, a short machine-readable code, a sentence for people); the
app turns it into ``{"error": code, "detail": sentence}``.
"""

from __future__ import annotations

import io
import struct
import time
import warnings
from dataclasses import asdict, dataclass
from typing import Any

import anyio
import numpy as np
from PIL import Image, UnidentifiedImageError
from python_multipart.multipart import parse_options_header
from starlette.datastructures import FormData, UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request

from fakeprint.data.dataset import decode_reduced, to_rgb_array

# Formats a client may send. Others (EPS, which would run Ghostscript; PSD; FITS ...) are refused unopened.
ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF")
FILES_FIELD = "files"
# A stalled body's refusal: the connection cannot carry another request. (Not for a body that is too large:
# closing while the client still sends makes its TCP stack reset the connection before it reads the answer.)
CLOSE = {"Connection": "close"}
MB = 1024 * 1024


@dataclass(frozen=True)
class Limits:
    """What one request may carry, and how long and how many requests the service waits for.

    Pixel counts are read from each image's header before anything is decoded: ``max_pixels`` per image
    (default 2048x2048, already 420 times the model's 100x100 input) and ``max_request_pixels`` for all the
    images of one request together. ``header_timeout``: seconds a connection may take to send a request's
    headers; ``body_idle_timeout``: the longest pause inside a body; ``body_timeout``: the whole body.
    ``queue``: uploads that may wait for a worker; beyond ``workers + queue`` the service answers 503 with
    Retry-After before reading the body, so memory stays bounded by ``(workers + queue) * max_request_bytes``.
    ``heavy_pixels``: a request whose images declare more pixels than this together decodes on at most half of
    the workers, so that clients of big images never hold every decoder. ``refusal_delay``: a request refused for
    what it sent (400, 401, 413, 415, 422) is answered no sooner than this many seconds after it arrived, waiting
    without CPU: a client that keeps sending what is refused (oversized images, a wrong token) gets a few answers a
    second, not hundreds, and leaves the cores to the others; 0 answers at once."""

    max_file_bytes: int = 10 * MB
    max_request_bytes: int = 32 * MB
    max_files: int = 32
    max_pixels: int = 2048 * 2048
    max_request_pixels: int = 4 * 2048 * 2048
    max_fields: int = 8  # form fields that are not files (ignored, but bounded)
    header_timeout: float = 10.0
    body_idle_timeout: float = 10.0
    body_timeout: float = 60.0
    queue: int = 16
    heavy_pixels: int = 1024 * 1024
    refusal_delay: float = 0.25

    def as_dict(self) -> dict[str, int | float]:
        return asdict(self)


class ApiError(Exception):
    """A refusal to send to the client as ``{"error": code, "detail": detail}`` with HTTP ``status``."""

    def __init__(self, status: int, code: str, detail: str, headers: dict[str, str] | None = None):
        super().__init__(detail)
        self.status, self.code, self.detail, self.headers = status, code, detail, headers


class _BodyTooLarge(Exception):
    pass


class _BodyTimeout(Exception):
    pass


class ClientGone(Exception):
    """The client closed the connection before its request body was complete (nothing to answer)."""

    def __init__(self, received: int):
        super().__init__(f"client disconnected after {received:,} body bytes")
        self.received = received


def check_content_type(request: Request) -> None:
    """415 unless the request is ``multipart/form-data`` with a boundary."""
    header = request.headers.get("content-type")
    if not header:
        raise ApiError(415, "unsupported_media_type",
                       f"no Content-Type: send multipart/form-data with the images in the field {FILES_FIELD!r}")
    media, params = parse_options_header(header)
    if media != b"multipart/form-data":
        raise ApiError(415, "unsupported_media_type",
                       f"Content-Type {media.decode('latin-1')!r} is not accepted: send multipart/form-data "
                       f"with the images in the field {FILES_FIELD!r}")
    if not params.get(b"boundary"):
        raise ApiError(400, "invalid_multipart", "the multipart/form-data Content-Type has no boundary parameter")


async def read_form(request: Request, limits: Limits) -> FormData:
    """Parse the multipart body, refusing it (413) as soon as it grows past ``max_request_bytes``, whether or
    not the client sent a Content-Length."""
    length = request.headers.get("content-length")
    if length is not None:
        try:
            n = int(length)
        except ValueError:
            raise ApiError(400, "invalid_request", f"Content-Length {length!r} is not a number") from None
        if n > limits.max_request_bytes:
            raise ApiError(413, "request_too_large",
                           f"the request has {n:,} bytes; the limit is {limits.max_request_bytes:,}")
    received = 0
    deadline = time.monotonic() + limits.body_timeout

    async def limited_receive() -> dict[str, Any]:
        nonlocal received
        wait = min(limits.body_idle_timeout, deadline - time.monotonic())
        try:
            with anyio.fail_after(max(wait, 0.0)):
                message = await request.receive()
        except TimeoutError:
            raise _BodyTimeout from None
        if message["type"] == "http.request":
            received += len(message.get("body", b""))
            if received > limits.max_request_bytes:
                raise _BodyTooLarge
        elif message["type"] == "http.disconnect":
            raise ClientGone(received)
        return message

    try:
        return await Request(request.scope, limited_receive).form(
            max_files=limits.max_files, max_fields=limits.max_fields, max_part_size=64 * 1024)
    except _BodyTooLarge:
        raise ApiError(413, "request_too_large",
                       f"the request body is larger than the limit of {limits.max_request_bytes:,} bytes") from None
    except _BodyTimeout:
        raise ApiError(408, "request_timeout",
                       f"the request body did not arrive in time ({received:,} bytes received; a body may pause "
                       f"{limits.body_idle_timeout:g} s at most and must be complete within "
                       f"{limits.body_timeout:g} s)", CLOSE) from None
    except ClientDisconnect:
        raise ClientGone(received) from None
    except HTTPException as e:  # starlette's multipart errors
        detail = str(e.detail)
        if detail.startswith("Too many files"):
            raise ApiError(413, "too_many_files", f"at most {limits.max_files} files per request") from None
        raise ApiError(400, "invalid_multipart", f"malformed multipart body: {detail}") from None
    except (ValueError, UnicodeDecodeError, KeyError) as e:
        raise ApiError(400, "invalid_multipart", f"malformed multipart body: {e}") from None


def uploaded_files(form: FormData, limits: Limits) -> list[UploadFile]:
    """The uploads in the ``files`` field, each within the per-file size limit."""
    if FILES_FIELD not in form:
        raise ApiError(400, "missing_files", f"no complete {FILES_FIELD!r} field (none sent, or the body ended "
                       f"early): send one or more images as multipart/form-data field {FILES_FIELD!r}")
    items = form.getlist(FILES_FIELD)
    not_files = [i for i, f in enumerate(items) if not isinstance(f, UploadFile)]
    if not_files:
        raise ApiError(400, "invalid_files_field",
                       f"the {FILES_FIELD!r} field must hold file uploads (item {not_files[0]} is a plain text value)")
    if len(items) > limits.max_files:
        raise ApiError(413, "too_many_files", f"{len(items)} files sent; at most {limits.max_files} per request")
    for i, f in enumerate(items):
        size = f.size if f.size is not None else _size(f)
        if size > limits.max_file_bytes:
            raise ApiError(413, "file_too_large",
                           f"file {i} ({display_name(f, i)!r}) has {size:,} bytes; the limit is {limits.max_file_bytes:,}")
    return items


def _size(f: UploadFile) -> int:
    pos = f.file.tell()
    f.file.seek(0, io.SEEK_END)
    size = f.file.tell()
    f.file.seek(pos)
    return size


def display_name(f: UploadFile, i: int) -> str:
    return (f.filename or f"file-{i}")[:255]


def check_pixels(blobs: list[tuple[str, bytes]], limits: Limits) -> int:
    """Read every image's declared size from its header (nothing is decoded) and refuse the request (413)
    when one image is over ``max_pixels`` or all of them together are over ``max_request_pixels``; the pixels
    declared by the images whose header could be read."""
    total = 0
    for name, data in blobs:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                with Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS) as im:
                    w, h = im.size
        except Image.DecompressionBombError as e:  # over twice PIL's limit, which the app keeps at max_pixels
            raise ApiError(413, "image_too_large",
                           f"{name!r} declares more pixels than the limit of {limits.max_pixels:,} ({e})") from None
        except Exception:  # not an image, or a broken header: decode_upload names the problem
            continue
        if w * h > limits.max_pixels:
            raise ApiError(413, "image_too_large",
                           f"{name!r} declares {w}x{h} = {w * h:,} pixels; the limit is {limits.max_pixels:,} per image")
        total += w * h
        if total > limits.max_request_pixels:
            raise ApiError(413, "request_too_many_pixels",
                           f"the images of this request declare {total:,} pixels or more (up to {name!r}); the "
                           f"limit is {limits.max_request_pixels:,} per request: send fewer or smaller images")
    return total


def decode_upload(data: bytes, name: str, max_pixels: int) -> tuple[np.ndarray, tuple[int, int]]:
    """Bytes of an image file -> (100 x 100 x 3 uint8, the image's own (width, height)), checking the declared
    size before decoding (large JPEGs are decoded at reduced scale: ``data.dataset.decode_reduced``)."""
    if not data:
        raise ApiError(415, "not_an_image", f"{name!r} is empty")
    try:
        with warnings.catch_warnings():
            # PIL (its limit set to ours by the app) warns above the limit, which the check below turns into a
            # refusal with the image's size, and raises at twice the limit, before anything else is read.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS) as im:
                w, h = im.size  # from the header; nothing decoded yet
                if w * h > max_pixels:
                    raise ApiError(413, "image_too_large",
                                   f"{name!r} declares {w}x{h} = {w * h:,} pixels; the limit is {max_pixels:,}")
                if w < 1 or h < 1:
                    raise ApiError(422, "corrupt_image", f"{name!r} declares an empty {w}x{h} image")
                decode_reduced(im)
                im.load()
                return to_rgb_array(im), (w, h)
    except ApiError:
        raise
    except Image.DecompressionBombError as e:
        raise ApiError(413, "image_too_large",
                       f"{name!r} declares more pixels than the limit of {max_pixels:,} ({e})") from None
    except UnidentifiedImageError:
        raise ApiError(415, "not_an_image",
                       f"{name!r} is not an image in an accepted format ({', '.join(ALLOWED_FORMATS)})") from None
    except (OSError, ValueError, SyntaxError, EOFError, MemoryError, IndexError, TypeError, struct.error) as e:
        raise ApiError(422, "corrupt_image", f"{name!r} cannot be decoded ({type(e).__name__}: {str(e)[:200]})") from None

