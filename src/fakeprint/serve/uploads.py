"""Reading uploads safely: request and file sizes, file counts, image formats and pixel counts.

Every refusal is an ``ApiError`` (HTTP status, a short machine-readable code, a sentence for people); the
app turns it into ``{"error": code, "detail": sentence}``.
"""

from __future__ import annotations

import io
import struct
import warnings
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError
from python_multipart.multipart import parse_options_header
from starlette.datastructures import FormData, UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import Request

from ..data.dataset import to_rgb_array

# Formats a client may send. Others (EPS, which would run Ghostscript; PSD; FITS ...) are refused unopened.
ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF")
FILES_FIELD = "files"
MB = 1024 * 1024


@dataclass(frozen=True)
class Limits:
    """What one request may carry. ``max_pixels`` is checked from the image header before decoding."""

    max_file_bytes: int = 10 * MB
    max_request_bytes: int = 32 * MB
    max_files: int = 32
    max_pixels: int = 4096 * 4096
    max_fields: int = 8  # form fields that are not files (ignored, but bounded)

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


class ApiError(Exception):
    """A refusal to send to the client as ``{"error": code, "detail": detail}`` with HTTP ``status``."""

    def __init__(self, status: int, code: str, detail: str):
        super().__init__(detail)
        self.status, self.code, self.detail = status, code, detail


class _BodyTooLarge(Exception):
    pass


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

    async def limited_receive() -> dict[str, Any]:
        nonlocal received
        message = await request.receive()
        if message["type"] == "http.request":
            received += len(message.get("body", b""))
            if received > limits.max_request_bytes:
                raise _BodyTooLarge
        return message

    try:
        return await Request(request.scope, limited_receive).form(
            max_files=limits.max_files, max_fields=limits.max_fields, max_part_size=64 * 1024)
    except _BodyTooLarge:
        raise ApiError(413, "request_too_large",
                       f"the request body is larger than the limit of {limits.max_request_bytes:,} bytes") from None
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


def decode_upload(data: bytes, name: str, max_pixels: int) -> np.ndarray:
    """Bytes of an image file -> 100 x 100 x 3 uint8, checking the declared size before decoding."""
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
                im.load()
                return to_rgb_array(im)
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

