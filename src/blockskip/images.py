"""Checking an image received from outside (a field capture, a photo a board sends to a worker):
JPEG or PNG, a pixel limit read from the header before anything is decoded, and a full decode.
Used by the board's capture spool (blockskip.edge.spool) and the host worker alike.
"""

from __future__ import annotations

import io
import warnings

from PIL import Image, UnidentifiedImageError

FORMATS = {"JPEG": "jpg", "PNG": "png"}


class CaptureError(Exception):
    """A capture that is refused; `code` goes into the ack's error."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


def image_format(data: bytes, max_pixels: int | None = None) -> str:
    """Return "JPEG" or "PNG" if `data` decodes as such an image, else raise CaptureError(not_image).
    With `max_pixels`, an image with more pixels is refused (`too_large`) from its header, before
    any pixel is decoded: a small compressed file can hold a huge image."""
    try:
        with warnings.catch_warnings():  # the pixel limit below is ours; PIL's bomb warning is noise here
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
        with img:
            fmt = img.format
            width, height = img.size
            if max_pixels is not None and width * height > max_pixels:
                raise CaptureError("too_large", f"image is {width} x {height} = {width * height} pixels; "
                                                f"the limit is {max_pixels} (max_capture_pixels)")
            img.load()  # decode the pixels: a truncated or corrupt file fails here
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise CaptureError("not_image", f"payload does not decode as an image: {err}") from err
    if fmt not in FORMATS:
        raise CaptureError("not_image", f"image format {fmt} is not accepted (JPEG or PNG)")
    return fmt
