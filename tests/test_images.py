"""capdemo.images: every input is generated here, so each case states its exact expected outcome."""

from __future__ import annotations

import io
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from capdemo.images import DEFAULT_MAX_PIXELS, ImageLoadError, load_image

RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------- builders


def encode(image: Image.Image, fmt: str, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def grey_png(width: int, height: int, idat: bytes) -> bytes:
    """An 8-bit greyscale PNG with a hand-written IHDR (valid CRCs) and the given IDAT payload."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # depth 8, colour type 0 = grey
    return PNG_SIGNATURE + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def black_png(width: int, height: int) -> bytes:
    """A complete black greyscale PNG: filter byte 0 + zero pixels per row, deflated."""
    return grey_png(width, height, zlib.compress(bytes(width + 1) * height, 9))


def tiny_idat_png(width: int, height: int) -> bytes:
    """A PNG declaring ``width x height`` whose IDAT is a cut-off deflate stream, so decoding it must fail."""
    return grey_png(width, height, zlib.compress(bytes(width + 1))[:-4])


def noise_rgb(width: int, height: int) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def rgb_values(image: Image.Image) -> np.ndarray:
    assert image.mode == "RGB"
    return np.asarray(image)


def rgb_pixels(image: Image.Image) -> list[tuple[int, int, int]]:
    """Row-major list of RGB triples."""
    return [tuple(int(v) for v in pixel) for pixel in rgb_values(image).reshape(-1, 3)]


# ---------------------------------------------------------------- broken and non-images


def test_truncated_jpeg_is_corrupt():
    data = encode(noise_rgb(64, 64), "JPEG")
    with pytest.raises(ImageLoadError, match=r"^half\.jpg: truncated or corrupt image data"):
        load_image(data[: len(data) // 2], name="half.jpg")


def test_png_with_bad_ihdr_crc_is_corrupt_not_unknown():
    data = bytearray(encode(noise_rgb(8, 8), "PNG"))
    data[29] ^= 0xFF  # bytes 29..32 are the IHDR CRC
    with pytest.raises(ImageLoadError, match=r"^x\.png: truncated or corrupt image data \(unreadable PNG header\)"):
        load_image(bytes(data), name="x.png")


def test_png_with_bad_idat_crc_is_corrupt():
    data = bytearray(encode(noise_rgb(8, 8), "PNG"))
    start = data.index(b"IDAT")
    length = int.from_bytes(data[start - 4 : start], "big")
    data[start + 4 + length] ^= 0xFF  # first byte of the IDAT CRC; the pixel data stays intact
    with pytest.raises(ImageLoadError, match=r"^x\.png: truncated or corrupt image data .*checksum"):
        load_image(bytes(data), name="x.png")


def test_text_file_named_jpg_is_not_an_image(tmp_path: Path):
    path = tmp_path / "photo.jpg"
    path.write_text("this is a caption, not a picture\n")
    with pytest.raises(ImageLoadError) as error:
        load_image(path)
    assert str(error.value) == "photo.jpg: not an image (unrecognised file format)"


@pytest.mark.parametrize("source", [b"", bytearray(), io.BytesIO()])
def test_zero_bytes_is_refused(source):
    with pytest.raises(ImageLoadError, match=r"^empty\.png: empty file \(0 bytes\)$"):
        load_image(source, name="empty.png")


def test_empty_file_on_disk_is_named_from_its_path(tmp_path: Path):
    (tmp_path / "blank.webp").write_bytes(b"")
    with pytest.raises(ImageLoadError, match=r"^blank\.webp: empty file"):
        load_image(str(tmp_path / "blank.webp"))


@pytest.mark.parametrize("text", [
    b'<?xml version="1.0" encoding="UTF-8"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="4" height="4"/>',
    b'\xef\xbb\xbf  \n<svg viewBox="0 0 4 4"><rect width="4" height="4"/></svg>',
])
def test_svg_is_refused_by_name(text: bytes):
    with pytest.raises(ImageLoadError, match=r"^logo\.svg: SVG \(vector\) images are not supported"):
        load_image(text, name="logo.svg")


def test_heic_that_pillow_cannot_read_is_an_unsupported_format():
    heic_header = struct.pack(">I", 24) + b"ftypheic" + bytes(4) + b"mif1heic" + bytes(64)
    with pytest.raises(ImageLoadError, match=r"^IMG_0001\.HEIC: HEIC/HEIF image: unsupported format"):
        load_image(heic_header, name="IMG_0001.HEIC")


def test_parseable_but_unaccepted_format_is_refused():
    with pytest.raises(ImageLoadError, match=r"^a\.ppm: unsupported image format PPM \(accepted: .*PNG"):
        load_image(encode(noise_rgb(4, 4), "PPM"), name="a.ppm")


def test_missing_file_none_and_wrong_types():
    with pytest.raises(ImageLoadError, match=r"^nope\.png: cannot read file \(No such file or directory\)$"):
        load_image(Path("/nonexistent/dir/nope.png"))
    with pytest.raises(ImageLoadError, match=r"^no image was provided$"):
        load_image(None)
    with pytest.raises(TypeError, match="cannot load an image from int"):
        load_image(42)


def test_text_mode_file_object_is_refused(tmp_path: Path):
    path = tmp_path / "a.png"
    path.write_bytes(encode(noise_rgb(2, 2), "PNG"))
    with open(path) as text_file, pytest.raises(ImageLoadError, match=r"^a\.png: .*binary mode"):
        load_image(text_file)
    with open(path, "rb") as closed_file:
        pass
    with pytest.raises(ImageLoadError, match=r"^a\.png: cannot read file \(.*closed file\)$"):
        load_image(closed_file)


# ---------------------------------------------------------------- size limits


def test_one_pixel_image_loads():
    image = load_image(encode(Image.new("RGB", (1, 1), (12, 34, 56)), "PNG"))
    assert image.size == (1, 1)
    assert image.getpixel((0, 0)) == (12, 34, 56)


def test_declared_size_above_max_pixels_is_refused_with_exact_message():
    with pytest.raises(ImageLoadError) as error:
        load_image(tiny_idat_png(10_000, 6_000), name="big.png")
    assert str(error.value) == (
        f"big.png: image is 10000x6000 = 60,000,000 pixels, above the limit of {DEFAULT_MAX_PIXELS:,} (max_pixels)"
    )


def test_size_is_checked_before_pixel_data_is_decoded():
    data = tiny_idat_png(2_000, 2_000)
    with pytest.raises(ImageLoadError, match=r"2000x2000 = 4,000,000 pixels, above the limit of 1,000,000"):
        load_image(data, max_pixels=1_000_000)
    with pytest.raises(ImageLoadError, match="truncated or corrupt image data"):
        load_image(data, max_pixels=4_000_000)  # within the limit, so decoding starts and finds the damage


def test_declared_20000_squared_is_refused_even_with_a_raised_limit():
    data = tiny_idat_png(20_000, 20_000)  # 400 MP: Pillow's own guard (2 * MAX_IMAGE_PIXELS) fires inside open
    for max_pixels in (DEFAULT_MAX_PIXELS, 10**9):
        with pytest.raises(ImageLoadError, match=r"^big\.png: image is too large.*decompression-bomb.*400000000"):
            load_image(data, name="big.png", max_pixels=max_pixels)


def test_pillow_bomb_warning_raised_as_error_is_still_an_image_load_error():
    data = tiny_idat_png(10_000, 10_000)  # 100 MP: between MAX_IMAGE_PIXELS and twice that
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with pytest.raises(ImageLoadError, match="decompression-bomb"):
            load_image(data, max_pixels=10**9)
    with pytest.warns(Image.DecompressionBombWarning), pytest.raises(ImageLoadError, match="10000x10000"):
        load_image(data)


def test_decompression_bomb_refused_by_limit_and_accepted_when_raised():
    bomb = black_png(3_000, 3_000)
    assert len(bomb) < 20_000  # 9 MP of pixels in a few kilobytes
    with pytest.raises(ImageLoadError, match=r"3000x3000 = 9,000,000 pixels, above the limit of 1,000,000"):
        load_image(bomb, max_pixels=1_000_000)
    image = load_image(bomb, max_pixels=9_000_000)
    assert image.mode == "RGB" and image.size == (3_000, 3_000)
    assert image.getextrema() == ((0, 0), (0, 0), (0, 0))


def test_image_without_pixels_is_refused():
    with pytest.raises(ImageLoadError, match=r"image has no pixels \(0x5\)"):
        load_image(Image.new("RGB", (0, 5)))


# ---------------------------------------------------------------- colour modes


def test_16_bit_png_is_scaled_to_8_bits_as_a_viewer_shows_it():
    gradient = Image.fromarray(np.array([[1000, 1400, 2000, 3000, 30000, 65535]], dtype=np.uint16))
    data = encode(gradient, "PNG")
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    # v * 255 / 65535, rounded half up: a dark image stays dark, a flat mid-grey stays mid-grey
    expected = np.array([4, 5, 8, 12, 117, 255], dtype=np.uint8)
    values = rgb_values(load_image(data))
    assert values.shape == (1, 6, 3)
    np.testing.assert_array_equal(values, np.repeat(expected[None, :, None], 3, axis=2))


def test_16_bit_png_transparency_is_composited_on_white():
    grey = Image.fromarray(np.array([[0, 30000]], dtype=np.uint16))
    data = encode(grey, "PNG", transparency=0)  # tRNS: value 0 is transparent
    assert Image.open(io.BytesIO(data)).info.get("transparency") == 0
    np.testing.assert_array_equal(rgb_values(load_image(data))[0, :, 0], [255, 117])


def test_float_image_ignores_non_finite_values_for_the_range():
    floats = Image.fromarray(np.array([[-1.0, 0.0, 1.0, np.nan, np.inf]], dtype=np.float32))
    assert floats.mode == "F"
    # range -1..1; NaN -> low end, +inf -> high end
    np.testing.assert_array_equal(rgb_values(load_image(floats))[0, :, 0], [0, 128, 255, 0, 255])


def test_flat_16_bit_image_keeps_its_level():
    flat = Image.fromarray(np.full((2, 2), 30000, dtype=np.uint16))
    assert np.unique(rgb_values(load_image(encode(flat, "PNG")))).tolist() == [117]


def test_palette_png_with_transparency_is_composited_on_white():
    palette_image = Image.new("P", (3, 1))
    palette_image.putpalette([255, 0, 0, 0, 0, 255, 0, 255, 0])  # index 0 red, 1 blue, 2 green
    palette_image.putdata([0, 1, 2])
    data = encode(palette_image, "PNG", transparency=bytes([255, 0, 128]))  # alpha per index
    assert Image.open(io.BytesIO(data)).mode == "P"
    # green at alpha 128 on white: R = B = round(255 * 127 / 255) = 127, G = 255
    assert rgb_pixels(load_image(data)) == [RED, WHITE, (127, 255, 127)]


def test_la_image_is_composited_on_white():
    la = Image.fromarray(np.array([[[100, 128], [100, 255], [100, 0]]], dtype=np.uint8), "LA")
    data = encode(la, "PNG")
    assert Image.open(io.BytesIO(data)).mode == "LA"
    # round((100 * 128 + 255 * 127) / 255) = round(177.2) = 177
    assert rgb_pixels(load_image(data)) == [(177, 177, 177), (100, 100, 100), WHITE]


def test_rgba_is_composited_on_white_exactly():
    pixels = np.array([[[200, 100, 0, 0], [200, 100, 0, 255], [200, 100, 0, 64], [10, 20, 30, 1]]], dtype=np.uint8)
    image = load_image(encode(Image.fromarray(pixels), "PNG"))
    # c * a / 255 + 255 * (255 - a) / 255, rounded: a=64 -> (241.2, 216.1, 191.0); a=1 -> (254.0, 254.1, 254.1)
    assert rgb_pixels(image) == [WHITE, (200, 100, 0), (241, 216, 191), (254, 254, 254)]


def test_cmyk_jpeg_becomes_rgb():
    data = encode(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG", quality=95)  # pure red ink
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    red, green, blue = load_image(data).getpixel((8, 8))
    assert red > 245 and green < 10 and blue < 10


def test_bilevel_image_becomes_black_and_white():
    bilevel = Image.new("1", (2, 1))
    bilevel.putpixel((1, 0), 1)
    assert rgb_pixels(load_image(encode(bilevel, "PNG"))) == [(0, 0, 0), WHITE]


@pytest.mark.parametrize(("orientation", "red_corner"), [(6, (18, 1)), (8, (1, 38))])
def test_exif_orientation_is_applied(orientation: int, red_corner: tuple[int, int]):
    stored = Image.new("RGB", (40, 20), (128, 128, 128))  # as stored: 40 wide, 20 high
    stored.paste(RED, (0, 0, 4, 4))  # mark the stored top-left corner
    exif = Image.Exif()
    exif[0x0112] = orientation  # 6: display rotated 90 deg clockwise; 8: counter-clockwise
    image = load_image(encode(stored, "JPEG", exif=exif, quality=95))
    assert image.size == (20, 40)
    red, green, _ = image.getpixel(red_corner)
    assert red > 200 and green < 60
    assert abs(image.getpixel((10, 20))[0] - 128) < 8  # the middle stays grey


# ---------------------------------------------------------------- animations take the first frame


def frames() -> list[Image.Image]:
    return [Image.new("RGB", (8, 8), colour) for colour in (RED, GREEN, BLUE)]


@pytest.mark.parametrize(("fmt", "params"), [("GIF", {}), ("WEBP", {"lossless": True}), ("PNG", {})])
def test_animated_image_gives_its_first_frame(fmt: str, params: dict):
    first, *rest = frames()
    data = encode(first, fmt, save_all=True, append_images=rest, duration=100, **params)
    assert getattr(Image.open(io.BytesIO(data)), "n_frames", 1) == 3
    image = load_image(data)
    assert image.size == (8, 8) and image.getextrema() == ((255, 255), (0, 0), (0, 0))


# ---------------------------------------------------------------- in-memory sources


def test_numpy_arrays_of_each_shape():
    grey = np.array([[0, 90], [180, 255]], dtype=np.uint8)  # (H, W)
    np.testing.assert_array_equal(rgb_values(load_image(grey)), np.repeat(grey[..., None], 3, axis=2))
    colour = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)  # (H, W, 3)
    loaded = load_image(colour)
    assert loaded.size == (3, 2)
    np.testing.assert_array_equal(rgb_values(loaded), colour)
    with_alpha = np.array([[[200, 100, 0, 64], [1, 2, 3, 255]]], dtype=np.uint8)  # (H, W, 4)
    assert rgb_pixels(load_image(with_alpha)) == [(241, 216, 191), (1, 2, 3)]


@pytest.mark.parametrize("array", [
    np.zeros((4, 4), dtype=np.float32),
    np.zeros((4, 4, 2), dtype=np.uint8),
    np.zeros((4, 4, 3, 1), dtype=np.uint8),
    np.zeros((0, 4, 3), dtype=np.uint8),
])
def test_numpy_arrays_that_are_not_images_are_refused(array: np.ndarray):
    with pytest.raises(ImageLoadError, match=rf"array of shape \({array.shape[0]}, .*expected non-empty uint8"):
        load_image(array)


def test_numpy_array_size_limit():
    with pytest.raises(ImageLoadError, match=r"image is 30x20 = 600 pixels, above the limit of 599"):
        load_image(np.zeros((20, 30, 3), dtype=np.uint8), max_pixels=599)


def test_pil_image_passthrough_is_a_new_loaded_copy():
    original = noise_rgb(5, 4)
    loaded = load_image(original)
    assert loaded is not original and loaded.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(loaded), np.asarray(original))
    loaded.putpixel((0, 0), (1, 2, 3))
    assert original.getpixel((0, 0)) != (1, 2, 3)


def test_lazily_opened_pil_image_and_paths_and_file_objects_agree(tmp_path: Path):
    path = tmp_path / "n.png"
    path.write_bytes(encode(noise_rgb(6, 3), "PNG"))
    expected = np.asarray(noise_rgb(6, 3))
    with path.open("rb") as handle:
        from_handle = load_image(handle)
    with Image.open(path) as lazy:
        from_lazy = load_image(lazy)
    for image in (load_image(str(path)), load_image(path), from_handle, from_lazy, load_image(path.read_bytes())):
        np.testing.assert_array_equal(rgb_values(image), expected)


def test_corrupt_lazily_opened_pil_image_is_refused_with_its_file_name(tmp_path: Path):
    data = encode(noise_rgb(64, 64), "JPEG")
    path = tmp_path / "cut.jpg"
    path.write_bytes(data[: len(data) // 2])
    with Image.open(path) as lazy, pytest.raises(ImageLoadError, match=r"^cut\.jpg: truncated or corrupt"):
        load_image(lazy)


# ---------------------------------------------------------------- fuzzing


SEEDS = {
    "png": encode(noise_rgb(6, 5), "PNG"),
    "png_rgba": encode(Image.new("RGBA", (4, 4), (1, 2, 3, 4)), "PNG"),
    "jpeg": encode(noise_rgb(16, 16), "JPEG"),
    "gif": encode(frames()[0], "GIF", save_all=True, append_images=frames()[1:]),
}


def check_loads_to_rgb_or_refuses(data: bytes) -> None:
    try:
        image = load_image(data, max_pixels=1_000_000)
    except ImageLoadError as error:
        assert "\n" not in str(error)
    else:
        assert image.mode == "RGB" and 0 < image.width * image.height <= 1_000_000
        image.tobytes()  # fully decoded


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=512))
def test_fuzz_arbitrary_bytes(data: bytes):
    check_loads_to_rgb_or_refuses(data)


def with_fixed_png_crcs(data: bytes) -> bytes:
    """Recompute every chunk CRC so that mutations reach the PNG decoder instead of the checksum test."""
    fixed, position = bytearray(data[:8]), 8
    while position + 8 <= len(data):
        length = int.from_bytes(data[position : position + 4], "big")
        kind_and_body = data[position + 4 : position + 8 + length]
        fixed += data[position : position + 4] + kind_and_body + struct.pack(">I", zlib.crc32(kind_and_body))
        position += 12 + length
    return bytes(fixed + data[position:])


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.sampled_from(sorted(SEEDS)),
    flips=st.lists(st.tuples(st.integers(min_value=0), st.integers(min_value=0, max_value=255)), max_size=6),
    keep=st.floats(min_value=0.0, max_value=1.0),
    fix_crcs=st.booleans(),
)
def test_fuzz_mutated_valid_images(seed: str, flips: list[tuple[int, int]], keep: float, fix_crcs: bool):
    data = bytearray(SEEDS[seed])
    for position, value in flips:
        data[position % len(data)] = value
    data = bytes(data[: max(1, round(len(data) * keep))])
    check_loads_to_rgb_or_refuses(with_fixed_png_crcs(data) if fix_crcs and seed.startswith("png") else data)
