"""Scanned documents: PDFs and multi-page TIFFs, opened from untrusted bytes and rendered page by page.

A document terminal scans to PDF or multi-page TIFF. Each selected page is
turned into one RGB picture that the engine answers like a camera frame. The
bytes come from devices and shares edgevl does not control, so every way a
document can be hostile ends in an ``ImageError`` with its own code: it is
encrypted, unreadable, has more pages than the rule takes, or holds an embedded
image larger than the pixel limit (a decompression bomb is refused before any
pixel of it is decoded). Scripts, forms and embedded files are never run or
read: only page content is rendered. All of this runs in the model worker,
under its memory cap.
"""

from __future__ import annotations

import io
import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

from PIL import Image

from edgevl.errors import ImageError
from edgevl.images import DEFAULT_PIXEL_LIMIT, MAX_SIDE, decode_frame, decode_image, image_suffix, is_pdf

PageSelection = Literal["all", "first"] | tuple[int, ...]
# A page is rendered to fit the encoder's pixel budget; beyond this resolution a
# small page (a receipt, a label) gains nothing but pixels to shrink again.
MAX_RENDER_DPI = 300
# The PDF format's own limit on a page side is 200 inches (14,400 points); with a
# user unit a page can claim more.  No paper is larger than this.
MAX_PAGE_POINTS = 14_400 * 4


def is_multipage_tiff(data: bytes) -> bool:
    """Whether ``data`` is a TIFF with more than one page (a one-page TIFF is answered as an image)."""
    if image_suffix(data) != ".tif":
        return False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data), formats=["TIFF"]) as probe:
                return int(getattr(probe, "n_frames", 1)) > 1
    except Exception:
        return False  # the image path names what is wrong with it


def is_document(data: bytes) -> bool:
    return is_pdf(data) or is_multipage_tiff(data)


def select_pages(selection: PageSelection, page_count: int, max_pages: int) -> list[int]:
    """The 1-based page numbers to answer, in order; ``too_many_pages`` when they are more than ``max_pages``."""
    if selection == "first":
        wanted = [1]
    elif selection == "all":
        wanted = list(range(1, page_count + 1))
    else:
        wanted = list(selection)
    if len(wanted) > max_pages:
        raise ImageError(f"the document has {page_count} pages; this rule answers at most {max_pages} "
                         "(max_pages)", "too_many_pages")
    return wanted


class Document:
    """An opened document: its format, its page count and its pages rendered on demand."""

    format: str
    page_count: int

    def render(self, number: int, max_pixels: int) -> Image.Image:
        """Page ``number`` (1-based) as an RGB picture for an encoder budget of ``max_pixels``."""
        if not 1 <= number <= self.page_count:
            raise ImageError(f"the document has no page {number} (it has {self.page_count})", "page_not_found")
        return self._render(number, max_pixels)

    def _render(self, number: int, max_pixels: int) -> Image.Image:  # pragma: no cover - interface
        raise NotImplementedError

    def close(self) -> None:  # pragma: no cover - interface
        raise NotImplementedError


class PdfDocument(Document):
    format = "PDF"

    def __init__(self, data: bytes, pixel_limit: int) -> None:
        import pypdfium2 as pdfium

        self.pixel_limit = pixel_limit
        try:
            self.pdf = pdfium.PdfDocument(data)
        except pdfium.PdfiumError as exc:
            text = str(exc)
            if "password" in text.lower():
                raise ImageError("the PDF is encrypted; edgevl reads only unprotected documents",
                                 "document_encrypted") from None
            raise ImageError(f"not a readable PDF: {text}", "document_unreadable") from None
        self.page_count = len(self.pdf)
        if self.page_count < 1:
            self.pdf.close()
            raise ImageError("the PDF has no pages", "document_unreadable")

    def _render(self, number: int, max_pixels: int) -> Image.Image:
        import pypdfium2 as pdfium
        import pypdfium2.raw as raw

        try:
            page = self.pdf[number - 1]
        except pdfium.PdfiumError as exc:
            raise ImageError(f"page {number} cannot be read: {exc}", "page_unreadable") from None
        try:
            width, height = page.get_size()
            if not (math.isfinite(width) and math.isfinite(height)) or width < 1 or height < 1:
                raise ImageError(f"page {number} has no area ({width:g} x {height:g} points)", "page_unreadable")
            if max(width, height) > MAX_PAGE_POINTS or max(width, height) / min(width, height) > 100:
                raise ImageError(f"page {number} is {width / 72:.1f} x {height / 72:.1f} inches: not a page "
                                 "edgevl renders", "page_too_large")
            # Embedded pictures are decoded whole whatever the scale of the rendering: one larger than the
            # pixel limit is a decompression bomb, refused before any pixel of it is decoded.  (One hidden
            # deeper in nested forms than this search goes still ends at the worker's memory cap.)
            for obj in page.get_objects(filter=(raw.FPDF_PAGEOBJ_IMAGE,), max_depth=64):
                px_w, px_h = obj.get_px_size()
                if px_w * px_h > self.pixel_limit or max(px_w, px_h) > MAX_SIDE:
                    raise ImageError(f"page {number} holds a {px_w}x{px_h} picture; the limit is "
                                     f"{self.pixel_limit} pixels", "image_too_large")
            # The scale that fills the encoder's pixel budget, no more: the page is never rendered large and
            # shrunk.  Rotation is applied by the renderer, from the page's own /Rotate.
            scale = min(math.sqrt(max_pixels / (width * height)), MAX_RENDER_DPI / 72)
            # The renderer rounds a side up: the scale is taken down to whole pixels so that it stays in budget.
            scale = min(max(1, math.floor(width * scale)) / width, max(1, math.floor(height * scale)) / height)
            scale *= 1 - 1e-9
            bitmap = page.render(scale=scale, may_draw_forms=False, fill_color=(255, 255, 255, 255))
            picture: Image.Image = bitmap.to_pil().convert("RGB")
        except pdfium.PdfiumError as exc:
            raise ImageError(f"page {number} cannot be rendered: {exc}", "page_unreadable") from None
        finally:
            page.close()
        return picture

    def close(self) -> None:
        self.pdf.close()


class TiffDocument(Document):
    format = "TIFF"

    def __init__(self, data: bytes, pixel_limit: int) -> None:
        self.pixel_limit = pixel_limit
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self.tiff = Image.open(io.BytesIO(data), formats=["TIFF"])
                self.page_count = int(getattr(self.tiff, "n_frames", 1))
        except Exception as exc:
            raise ImageError(f"not a readable TIFF: {exc}", "document_unreadable") from None

    def _render(self, number: int, max_pixels: int) -> Image.Image:
        try:
            self.tiff.seek(number - 1)
        except Exception as exc:
            raise ImageError(f"page {number} cannot be read: {exc}", "page_unreadable") from None
        # The same checks and conversion as a single image's; the engine resizes to max_pixels.
        picture = decode_frame(self.tiff, self.pixel_limit, f"page {number}")
        # The frame object is reused by the next seek: the page must own its pixels.
        return picture.copy() if picture is self.tiff else picture

    def close(self) -> None:
        self.tiff.close()


@contextmanager
def open_document(data: bytes, pixel_limit: int = DEFAULT_PIXEL_LIMIT) -> Iterator[Document]:
    """The document in ``data`` (a PDF, or a TIFF of several pages), closed on exit."""
    document: Document = PdfDocument(data, pixel_limit) if is_pdf(data) else TiffDocument(data, pixel_limit)
    try:
        yield document
    finally:
        document.close()


ALARM_IMAGE_SIDE = 1280  # long side of a published alarm frame: enough to see the defect, small for MQTT


def alarm_jpeg(data: bytes, page: int | None = None) -> bytes:
    """The upright frame (or the document's ``page``) as a JPEG of at most ``ALARM_IMAGE_SIDE`` pixels on its
    long side."""
    if page is None:
        picture = decode_image(data).image.copy()
    else:
        with open_document(data) as document:
            picture = document.render(page, ALARM_IMAGE_SIDE * ALARM_IMAGE_SIDE)
    picture.thumbnail((ALARM_IMAGE_SIDE, ALARM_IMAGE_SIDE))
    out = io.BytesIO()
    picture.save(out, "JPEG", quality=85)
    return out.getvalue()
