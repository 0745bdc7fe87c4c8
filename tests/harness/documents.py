"""Test documents: multi-page PDFs and TIFFs, and the hostile documents a scanner share may hold."""

from __future__ import annotations

import io
import zlib

import pikepdf
from PIL import Image

from tests.harness.images import noise_image


def pages(count: int, seed: int = 0, size: tuple[int, int] = (200, 280)) -> list[Image.Image]:
    """Different pages (noise, so that every page gives the random model a different input)."""
    return [noise_image(*size, seed=seed + i) for i in range(count)]


def pdf_of(images: list[Image.Image]) -> bytes:
    buf = io.BytesIO()
    images[0].save(buf, "PDF", save_all=True, append_images=images[1:], resolution=72)
    return buf.getvalue()


def tiff_of(images: list[Image.Image]) -> bytes:
    buf = io.BytesIO()
    images[0].save(buf, "TIFF", save_all=True, append_images=images[1:], compression="tiff_lzw")
    return buf.getvalue()


def _saved(pdf: pikepdf.Pdf, **kwargs: object) -> bytes:
    buf = io.BytesIO()
    pdf.save(buf, **kwargs)  # type: ignore[arg-type]
    return buf.getvalue()


def encrypted_pdf() -> bytes:
    with pikepdf.open(io.BytesIO(pdf_of(pages(1)))) as pdf:
        return _saved(pdf, encryption=pikepdf.Encryption(user="secret", owner="owner"))


def blank_pages_pdf(count: int, width: float = 612, height: float = 792) -> bytes:
    """``count`` empty pages of ``width`` x ``height`` points."""
    pdf = pikepdf.Pdf.new()
    for _ in range(count):
        pdf.add_blank_page(page_size=(width, height))
    return _saved(pdf)


def bomb_pdf(side: int = 12_000) -> bytes:
    """One page showing a ``side`` x ``side`` grey picture that is a few MB compressed and ``side``² bytes
    decoded."""
    pdf = pikepdf.Pdf.new()
    pdf.add_blank_page(page_size=(612, 792))
    data = zlib.compress(bytes(side * side), 9)
    image = pikepdf.Stream(pdf, data)
    image.Type, image.Subtype = pikepdf.Name.XObject, pikepdf.Name.Image
    image.Width, image.Height, image.BitsPerComponent = side, side, 8
    image.ColorSpace, image.Filter = pikepdf.Name.DeviceGray, pikepdf.Name.FlateDecode
    page = pdf.pages[0]
    page.Resources = pikepdf.Dictionary(XObject=pikepdf.Dictionary(Im0=image))
    page.Contents = pikepdf.Stream(pdf, b"q 612 0 0 792 0 0 cm /Im0 Do Q")
    return _saved(pdf)


def scripted_pdf() -> bytes:
    """A two-page PDF with JavaScript run on opening and an embedded executable: both must be ignored."""
    with pikepdf.open(io.BytesIO(pdf_of(pages(2, seed=40)))) as pdf:
        script = pikepdf.Dictionary(S=pikepdf.Name.JavaScript, JS=pikepdf.String("app.alert('pwned');"))
        pdf.Root.OpenAction = script
        attachment = pikepdf.AttachedFileSpec(pdf, b"MZ\x90\x00 not really a program", filename="run.exe")
        pdf.attachments["run.exe"] = attachment
        return _saved(pdf)
