"""Documents from untrusted bytes: pages rendered to fit, page selection, and every hostile document a code."""

from __future__ import annotations

import io

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgevl.documents import is_document, open_document, select_pages
from edgevl.errors import ImageError
from edgevl.images import accepted_suffix
from edgevl.rules import Rule
from tests.harness.documents import (
    blank_pages_pdf,
    bomb_pdf,
    encrypted_pdf,
    pages,
    pdf_of,
    scripted_pdf,
    tiff_of,
)
from tests.harness.images import encode, noise_image

MAX_PIXELS = 448 * 448


def _render_all(data: bytes, selection: object = "all", max_pages: int = 50) -> list[tuple[int, int]]:
    with open_document(data) as document:
        numbers = select_pages(selection, document.page_count, max_pages)  # type: ignore[arg-type]
        return [document.render(n, MAX_PIXELS).size for n in numbers]


def test_every_page_of_a_pdf_is_rendered_to_fit_the_pixel_budget_not_larger() -> None:
    # A4 at 72 dpi is 595 x 842 points: rendered at the scale that fills the budget, aspect kept.
    data = pdf_of(pages(3, size=(595, 842)))
    sizes = _render_all(data)
    assert len(sizes) == 3
    for w, h in sizes:
        assert w * h <= MAX_PIXELS
        assert w * h > 0.95 * MAX_PIXELS, "rendered small and blown up, or much smaller than it may be"
        assert abs(w / h - 595 / 842) < 0.01
    # A 200 x 200 inch drawing is rendered to the same budget, never at a fixed resolution.
    assert _render_all(blank_pages_pdf(1, 14_400, 14_400)) == [(448, 448)]


def test_a_small_page_is_not_rendered_beyond_300_dpi() -> None:
    w, h = _render_all(blank_pages_pdf(1, 72, 36))[0]  # a 1 x 0.5 inch label
    assert (w, h) == (300, 150)


def test_multipage_tiff_pages_keep_their_pixels() -> None:
    images = pages(3, size=(120, 90))
    data = tiff_of(images)
    assert is_document(data)
    with open_document(data) as document:
        assert document.format == "TIFF"
        rendered = [document.render(n, MAX_PIXELS) for n in (1, 2, 3)]
    assert [r.tobytes() for r in rendered] == [i.tobytes() for i in images]
    # One page is an image, answered as images are.
    assert not is_document(tiff_of(images[:1]))
    assert not is_document(encode(noise_image(8, 8), "PNG"))


@pytest.mark.parametrize(("selection", "expected"), [
    ("all", [1, 2, 3, 4]), ("first", [1]), ((2, 4), [2, 4]), ((4, 1), [4, 1]),
])
def test_page_selection(selection: object, expected: list[int]) -> None:
    assert select_pages(selection, 4, 50) == expected  # type: ignore[arg-type]


def test_a_listed_page_the_document_lacks_is_that_pages_error() -> None:
    with open_document(pdf_of(pages(2))) as document, pytest.raises(ImageError) as err:
        document.render(3, MAX_PIXELS)
    assert err.value.code == "page_not_found"


def test_rules_take_pages_and_max_pages_and_refuse_nonsense() -> None:
    base = {"name": "r", "question": [{"id": "q", "ask": "a"}]}
    assert Rule.model_validate({**base, "pages": [1, 3]}).pages == (1, 3)
    assert "*.pdf" in Rule.model_validate(base).patterns
    for bad in ({"pages": []}, {"pages": [0]}, {"pages": [2, 2]}, {"pages": "last"},
                {"pages": [1, 2, 3], "max_pages": 2}, {"max_pages": 0}):
        with pytest.raises(ValueError, match="pages"):
            Rule.model_validate({**base, **bad})


@pytest.mark.parametrize(("make", "code"), [
    (encrypted_pdf, "document_encrypted"),
    (lambda: pdf_of(pages(3))[:5000], "document_unreadable"),
    (lambda: b"%PDF-1.7\n" + bytes(range(256)) * 4, "document_unreadable"),
    (lambda: blank_pages_pdf(10_000), "too_many_pages"),
    (bomb_pdf, "image_too_large"),
    (lambda: blank_pages_pdf(1, 14_400, 20), "page_too_large"),
])
def test_hostile_documents_get_their_code(make: object, code: str) -> None:
    with pytest.raises(ImageError) as err:
        _render_all(make())  # type: ignore[operator]
    assert err.value.code == code


def test_ten_thousand_pages_are_fine_when_the_rule_takes_the_first() -> None:
    assert len(_render_all(blank_pages_pdf(10_000), "first")) == 1


def test_scripts_and_embedded_files_are_ignored() -> None:
    assert len(_render_all(scripted_pdf())) == 2


def test_inputs_that_sniff_formats_take_pdf() -> None:
    assert accepted_suffix(pdf_of(pages(1))) == ".pdf"
    assert accepted_suffix(b"garbage before the header " + pdf_of(pages(1))) == ".pdf"


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=st.binary(max_size=4096), cut=st.integers(min_value=0, max_value=20_000),
       flip=st.lists(st.integers(min_value=0, max_value=20_000), max_size=8))
def test_any_bytes_that_look_like_a_document_give_pages_or_an_image_error(body: bytes, cut: int,
                                                                         flip: list[int]) -> None:
    """Random bytes after a PDF header, and real PDFs and TIFFs cut short or with bytes flipped."""
    real = bytearray(pdf_of(pages(2, size=(40, 30))) if cut % 2 else tiff_of(pages(2, size=(40, 30))))
    for i in flip:
        real[i % len(real)] ^= 0xFF
    for data in (b"%PDF-1.4\n" + body, bytes(real[: max(cut, 8)]), bytes(real)):
        if not is_document(data):
            continue
        code = None
        try:
            _render_all(data)
        except ImageError as exc:
            code = exc.code
        assert code in {None, "document_unreadable", "document_encrypted", "page_unreadable", "page_too_large",
                        "image_unreadable", "image_too_large", "too_many_pages", "page_not_found"}


def test_the_alarm_frame_of_a_document_is_its_alarming_page() -> None:
    from PIL import Image

    from edgevl.documents import ALARM_IMAGE_SIDE, alarm_jpeg

    images = [noise_image(900, 600, seed=1), Image.new("RGB", (900, 600), (255, 0, 0))]  # 12.5 x 8.3 inches
    frame = Image.open(io.BytesIO(alarm_jpeg(pdf_of(images), page=2)))
    assert frame.format == "JPEG"
    assert max(frame.size) == ALARM_IMAGE_SIDE, "rendered for the alarm, not at the model's budget"
    red, green, blue = frame.convert("RGB").getpixel((frame.width // 2, frame.height // 2))
    assert red > 200, "page 2, the red one"
    assert max(green, blue) < 60
