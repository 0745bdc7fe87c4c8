"""Untrusted image bytes: every bad input becomes a typed error, every good one an upright RGB picture."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from edgevl.errors import ImageError
from edgevl.images import crop_image, decode_image
from tests.harness.images import encode, noise_image


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims a huge size, with almost no data: a decompression bomb."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "BMP", "TIFF", "GIF"])
def test_accepted_formats_decode_to_rgb(fmt: str) -> None:
    decoded = decode_image(encode(noise_image(64, 48), fmt))
    assert decoded.format == fmt
    assert decoded.image.mode == "RGB"
    assert (decoded.width, decoded.height) == (64, 48)
    assert len(decoded.sha256) == 64


def test_empty_bytes() -> None:
    with pytest.raises(ImageError) as err:
        decode_image(b"")
    assert err.value.code == "image_empty"


@pytest.mark.parametrize("data", [b"hello, this is a text file\n" * 10, b"%PDF-1.4\n%...", b"\x00" * 1000])
def test_not_an_image_is_unsupported(data: bytes) -> None:
    with pytest.raises(ImageError) as err:
        decode_image(data)
    assert err.value.code == "unsupported_format"


@pytest.mark.parametrize("fmt", ["ICO", "PCX", "TGA", "PPM"])
def test_known_but_refused_formats_name_themselves(fmt: str) -> None:
    with pytest.raises(ImageError) as err:
        decode_image(encode(noise_image(32, 32), fmt))
    assert err.value.code == "unsupported_format"
    assert "not accepted" in err.value.message


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_truncated_images_are_unreadable(fmt: str) -> None:
    data = encode(noise_image(256, 256), fmt)
    with pytest.raises(ImageError) as err:
        decode_image(data[: len(data) // 2])
    assert err.value.code == "image_unreadable"
    if fmt != "WEBP":  # libwebp refuses a cut file before Pillow knows its format
        assert fmt in err.value.message


def test_corrupt_body_is_unreadable() -> None:
    data = bytearray(encode(noise_image(128, 128), "PNG"))
    data[100:400] = b"\xff" * 300  # breaks the IDAT chunk's CRC and zlib stream
    with pytest.raises(ImageError) as err:
        decode_image(bytes(data))
    assert err.value.code == "image_unreadable"


def test_decompression_bomb_is_refused_before_decoding() -> None:
    bomb = _png_header_only(60000, 60000)
    assert len(bomb) < 200
    with pytest.raises(ImageError) as err:
        decode_image(bomb)
    assert err.value.code == "image_too_large"
    with pytest.raises(ImageError) as err:
        decode_image(_png_header_only(12000, 10000))  # 120 MP, below Pillow's own bomb limit... but above ours
    assert err.value.code == "image_too_large"


def test_pixel_limit_is_configurable() -> None:
    with pytest.raises(ImageError) as err:
        decode_image(encode(noise_image(100, 100), "PNG"), pixel_limit=5000)
    assert err.value.code == "image_too_large"


def test_exif_orientation_is_applied() -> None:
    img = noise_image(40, 20)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    decoded = decode_image(encode(img, "JPEG", exif=exif.tobytes()))
    assert (decoded.width, decoded.height) == (20, 40)


def test_modes_convert_to_rgb() -> None:
    cmyk = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # red
    assert decode_image(encode(cmyk, "JPEG")).image.getpixel((8, 8))[0] > 200

    arr16 = np.full((8, 8), 65535, dtype=np.uint16)
    arr16[0, 0] = 0
    grey16 = Image.fromarray(arr16)
    out = decode_image(encode(grey16, "PNG")).image
    assert out.getpixel((4, 4)) == (255, 255, 255)  # scaled, not clipped garbage
    assert out.getpixel((0, 0)) == (0, 0, 0)

    arr_mid = np.full((8, 8), 32896, dtype=np.uint16)
    assert decode_image(encode(Image.fromarray(arr_mid), "PNG")).image.getpixel((1, 1)) == (128, 128, 128)

    palette = Image.new("P", (8, 8), 0)
    palette.putpalette([0, 0, 0] * 256)
    palette.info["transparency"] = 0
    assert decode_image(encode(palette, "PNG", transparency=0)).image.getpixel((2, 2)) == (255, 255, 255)

    la = Image.new("LA", (8, 8), (0, 0))  # black, fully transparent
    assert decode_image(encode(la, "PNG")).image.getpixel((2, 2)) == (255, 255, 255)

    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 255))
    assert decode_image(encode(rgba, "PNG")).image.getpixel((2, 2)) == (255, 0, 0)

    one_bit = Image.new("1", (8, 8), 1)
    assert decode_image(encode(one_bit, "TIFF")).image.getpixel((2, 2)) == (255, 255, 255)


def test_gif_first_frame_only() -> None:
    red = Image.new("RGB", (10, 10), (255, 0, 0))
    blue = Image.new("RGB", (10, 10), (0, 0, 255))
    data = encode(red, "GIF", save_all=True, append_images=[blue])
    pixel = decode_image(data).image.getpixel((5, 5))
    assert pixel[0] > 200
    assert pixel[2] < 50


def test_crop() -> None:
    img = noise_image(100, 50)
    assert crop_image(img, (10, 5, 30, 20)).size == (30, 20)
    assert crop_image(img, (90, 40, 30, 20)).size == (10, 10)  # clipped to the image
    with pytest.raises(ImageError) as err:
        crop_image(img, (200, 0, 10, 10))
    assert err.value.code == "crop_outside_image"


_SEEDS = {fmt: encode(noise_image(24, 16, seed=3), fmt) for fmt in ("JPEG", "PNG", "WEBP", "BMP", "TIFF", "GIF")}
_CODES = {"image_empty", "image_unreadable", "unsupported_format", "image_too_large"}


@st.composite
def _mutated(draw: st.DrawFn) -> bytes:
    """A real image of an accepted format, then cut, flipped, overwritten or grown at random."""
    data = bytearray(_SEEDS[draw(st.sampled_from(sorted(_SEEDS)))])
    for _ in range(draw(st.integers(0, 6))):
        op = draw(st.sampled_from(["flip", "cut", "write", "insert"]))
        at = draw(st.integers(0, max(0, len(data) - 1)))
        if op == "flip" and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "cut":
            del data[at:]
        elif op == "write":
            chunk = draw(st.binary(min_size=1, max_size=8))
            data[at : at + len(chunk)] = chunk
        else:
            data[at:at] = draw(st.binary(min_size=1, max_size=64))
    return bytes(data)


@settings(deadline=None)
@given(data=st.one_of(_mutated(), st.binary(max_size=512)))
def test_any_bytes_decode_to_rgb_or_a_typed_error(data: bytes) -> None:
    error: ImageError | None = None
    try:
        decoded = decode_image(data)
    except ImageError as exc:
        error = exc
    if error is not None:
        assert error.code in _CODES, error.code
        assert error.message
        return
    assert decoded.image.mode == "RGB"
    assert decoded.image.size == (decoded.width, decoded.height)
    assert decoded.width * decoded.height > 0
