"""Decoding of untrusted image bytes into RGB pictures.

Images come from cameras, shares and brokers the appliance does not control, so
decoding is restricted to a few formats, guarded against decompression bombs
before any pixel is decoded, and every failure maps to an ``ImageError`` code.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from edgevl.errors import ImageError
from edgevl.records import ImageInfo

ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "TIFF", "GIF")
# 100 megapixels covers the largest industrial line-scan and document cameras;
# a 1 KB PNG claiming more is a decompression bomb.
DEFAULT_PIXEL_LIMIT = 100_000_000
MAX_SIDE = 65_500


@dataclass(frozen=True)
class DecodedImage:
    """An RGB picture plus the facts the result record reports about its source bytes."""

    image: Image.Image
    sha256: str
    width: int
    height: int
    format: str

    def meta(self) -> ImageInfo:
        return {"sha256": self.sha256, "width": self.width, "height": self.height, "format": self.format}


def _identify_other(data: bytes) -> str | None:
    """Name the format of bytes Pillow knows but edgevl does not accept."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as probe:
                return str(probe.format)
    except Exception:
        return None


def _to_rgb(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16-bit sensors (and PNG 16-bit grey, loaded as "I"): scale to 8 bits
        # instead of clipping everything above 255 to white.
        arr = np.asarray(img, dtype=np.int64)
        arr8 = np.clip(arr // 257, 0, 255).astype(np.uint8)
        return Image.fromarray(arr8, "L").convert("RGB")
    if mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
        scale = 255.0 / (hi - lo) if hi > lo else 0.0
        arr8 = np.nan_to_num((arr - lo) * scale).clip(0, 255).astype(np.uint8)
        return Image.fromarray(arr8, "L").convert("RGB")
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        mode == "P" and "transparency" in img.info
    ) or (mode in ("L", "RGB") and "transparency" in img.info)
    if has_alpha:
        # Transparent areas become white, as on the paper or screen the image shows.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def decode_image(data: bytes, pixel_limit: int = DEFAULT_PIXEL_LIMIT) -> DecodedImage:
    """Decode untrusted bytes into an upright RGB image or raise ``ImageError``."""
    if not data:
        raise ImageError("the image is empty (0 bytes)", "image_empty")
    digest = hashlib.sha256(data).hexdigest()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img: Image.Image = Image.open(io.BytesIO(data), formats=list(ALLOWED_FORMATS))
    except UnidentifiedImageError:
        other = _identify_other(data)
        if other:
            raise ImageError(
                f"{other} images are not accepted; use one of {', '.join(ALLOWED_FORMATS)}",
                "unsupported_format",
            ) from None
        raise ImageError(
            f"not a recognised image (expected {', '.join(ALLOWED_FORMATS)})", "unsupported_format"
        ) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(f"image rejected as a decompression bomb: {exc}", "image_too_large") from None
    except Exception as exc:
        raise ImageError(f"cannot read the image header: {exc}", "image_unreadable") from None

    fmt = str(img.format)
    rgb = decode_frame(img, pixel_limit, f"the {fmt} image")
    return DecodedImage(image=rgb, sha256=digest, width=rgb.width, height=rgb.height, format=fmt)


def decode_frame(img: Image.Image, pixel_limit: int, what: str) -> Image.Image:
    """The current frame of an opened image as an upright RGB picture, checked against ``pixel_limit``
    before any pixel is decoded (``what`` names it in errors: an image, or a page of a document)."""
    width, height = img.size
    if width <= 0 or height <= 0:
        raise ImageError(f"{what} has no pixels ({width}x{height})", "image_unreadable")
    if width > MAX_SIDE or height > MAX_SIDE or width * height > pixel_limit:
        raise ImageError(
            f"{what} is {width}x{height} = {width * height} pixels; the limit is {pixel_limit}",
            "image_too_large",
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img.load()
            upright = ImageOps.exif_transpose(img) or img
            rgb = _to_rgb(upright)
            rgb.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(f"{what} rejected as a decompression bomb: {exc}", "image_too_large") from None
    except MemoryError:
        raise ImageError(f"{what} is too large to decode in memory", "image_too_large") from None
    except Exception as exc:
        raise ImageError(f"corrupt or truncated {what}: {exc}", "image_unreadable") from None
    return rgb


def crop_image(img: Image.Image, box: tuple[int, int, int, int] | None) -> Image.Image:
    """Crop ``[x, y, width, height]`` (in upright pixels), clipped to the image."""
    if box is None:
        return img
    x, y, w, h = box
    left, top = max(0, x), max(0, y)
    right, bottom = min(img.width, x + w), min(img.height, y + h)
    if right <= left or bottom <= top:
        raise ImageError(
            f"crop [{x}, {y}, {w}, {h}] lies outside the {img.width}x{img.height} image",
            "crop_outside_image",
        )
    return img.crop((left, top, right, bottom))


def image_suffix(data: bytes) -> str | None:
    """The file suffix of a format edgevl reads (images and PDF documents), from the leading bytes; None for
    anything else."""
    if data.startswith(b"\xff\xd8\xff"):
        return ".jpg"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return ".png"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return ".gif"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return ".webp"
    if data[:2] == b"BM":
        return ".bmp"
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return ".tif"
    if is_pdf(data):
        return ".pdf"
    return None


def is_pdf(data: bytes) -> bool:
    # PDF readers accept up to 1 KB of garbage before the header, and so does edgevl.
    return b"%PDF-" in data[:1024]


def accepted_suffix(data: bytes) -> str:
    """``image_suffix``, or ``ImageError`` (``unsupported_format``) for bytes of no accepted format: the inputs
    that keep an image before the worker decodes it (MQTT, HTTP) refuse other bytes at once."""
    suffix = image_suffix(data)
    if suffix is None:
        raise ImageError("not an image or document edgevl reads (JPEG, PNG, WebP, BMP, TIFF, GIF or PDF)",
                         "unsupported_format")
    return suffix
