"""Decode an untrusted upload into a fully loaded 8-bit RGB ``PIL.Image``.

Gradio may hand the app bytes, a file path, a file object, a PIL image or a
numpy array, and any of them may be hostile or broken. ``load_image`` refuses
oversized images from the header alone (before pixel data is decoded), turns
every decoding failure into one ``ImageLoadError`` with a one-line message,
and normalises orientation (EXIF), colour mode (palette, alpha, CMYK, 16-bit,
float) and animation (first frame) so the encoders always see plain RGB.

No Pillow global is changed. Pillow's own decompression-bomb guard still runs
inside ``Image.open``: it refuses anything over ``2 * Image.MAX_IMAGE_PIXELS``
(about 179 MP) before the size is visible here, so a ``max_pixels`` above that
has no effect, and images over ``Image.MAX_IMAGE_PIXELS`` log Pillow's warning.
"""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import ExifTags, Image, ImageOps

# 48 MP phone photos (8064x6048 = 48.8 MP) still load, while one decoded RGB
# image stays under 150 MB; the encoders downsample to ~224 px anyway.
DEFAULT_MAX_PIXELS = 50_000_000

# Transparent pixels are shown on white, as most viewers and web pages do.
BACKGROUND_RGB = (255, 255, 255)

# Photo and web formats people actually upload. Everything else Pillow can parse
# (EPS runs Ghostscript, PSD, FITS, ...) is refused before decoding to keep the
# attack surface small. HEIF is only present when a plugin such as pillow-heif is.
ACCEPTED_FORMATS = frozenset({"JPEG", "MPO", "PNG", "GIF", "WEBP", "BMP", "TIFF", "AVIF", "HEIF"})

# 16-bit grey has a fixed range (0..65535) and is scaled; 32-bit integer and float modes have no fixed white
# point, so they are stretched by their own range.
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})
_HIGH_DEPTH_MODES = frozenset({"I", "F"}) | _SIXTEEN_BIT_MODES

# ISO-BMFF brands of HEIC/HEIF files, to name the format when Pillow cannot read it.
_HEIF_BRANDS = frozenset({b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"mif1", b"msf1"})

# Leading bytes of common formats, to call a file with a broken header corrupt rather than "not an image".
_SIGNATURES = {b"\x89PNG\r\n\x1a\n": "PNG", b"\xff\xd8\xff": "JPEG", b"GIF87a": "GIF", b"GIF89a": "GIF"}

ImageSource = bytes | str | os.PathLike | BinaryIO | Image.Image | np.ndarray


class ImageLoadError(ValueError):
    """An upload that cannot become an RGB image; the message is one line fit for the user."""


def load_image(source: ImageSource, *, max_pixels: int = DEFAULT_MAX_PIXELS, name: str | None = None) -> Image.Image:
    """Decode ``source`` into a new, fully loaded RGB image.

    Args:
        source: encoded bytes, a file path, a binary file object, a PIL image
            (used as is, at its current frame) or a uint8 numpy array of shape
            (H, W), (H, W, 3) or (H, W, 4).
        max_pixels: largest width * height accepted; checked against the header
            before any pixel data is decoded.
        name: file name used in error messages; taken from the source when None.

    Raises:
        ImageLoadError: empty, unreadable, corrupt, unsupported or too large input.
        TypeError: ``source`` is none of the types above.
    """
    name = name or _name_of(source)
    prefix = f"{name}: " if name else ""
    if isinstance(source, Image.Image):
        return _to_loaded_rgb(source, max_pixels=max_pixels, prefix=prefix)
    if isinstance(source, np.ndarray):
        return _to_loaded_rgb(_image_from_array(source, prefix), max_pixels=max_pixels, prefix=prefix)
    with _open(_read_bytes(source, prefix), prefix) as image:
        return _to_loaded_rgb(image, max_pixels=max_pixels, prefix=prefix)


def _name_of(source: object) -> str | None:
    """The base name of the file behind ``source``, if it has one."""
    if isinstance(source, (str, os.PathLike)):
        return Path(source).name
    path = getattr(source, "filename", None) or getattr(source, "name", None)
    return os.path.basename(path) if isinstance(path, str) and path else None


def _read_bytes(source: object, prefix: str) -> bytes:
    """All bytes of a bytes-like object, a path or a binary file object."""
    if source is None:
        raise ImageLoadError("no image was provided")
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source)
    if isinstance(source, io.TextIOBase):
        raise ImageLoadError(f"{prefix}file object must be opened in binary mode")
    try:
        if isinstance(source, (str, os.PathLike)):
            return Path(source).read_bytes()
        if hasattr(source, "read"):
            return bytes(source.read())
    except (OSError, ValueError) as exc:  # ValueError: the file object is closed
        raise ImageLoadError(f"{prefix}cannot read file ({getattr(exc, 'strerror', None) or _one_line(exc)})") from exc
    raise TypeError(f"cannot load an image from {type(source).__name__}: expected bytes, a path, "
                    "a binary file, a PIL image or a uint8 numpy array")


def _image_from_array(array: np.ndarray, prefix: str) -> Image.Image:
    """Wrap a uint8 (H, W), (H, W, 3) or (H, W, 4) array as an L, RGB or RGBA image."""
    shape_ok = array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4))
    if array.dtype != np.uint8 or not shape_ok or 0 in array.shape:
        raise ImageLoadError(f"{prefix}array of shape {array.shape} and dtype {array.dtype} is not an image "
                             "(expected non-empty uint8 HxW, HxWx3 or HxWx4)")
    return Image.fromarray(np.ascontiguousarray(array))


def _open(data: bytes, prefix: str) -> Image.Image:
    """Parse the header of an encoded image (no pixel data is decoded yet)."""
    if not data:
        raise ImageLoadError(f"{prefix}empty file (0 bytes)")
    with _pillow_errors(prefix):
        try:
            image = Image.open(io.BytesIO(data))
        except Image.UnidentifiedImageError:
            raise ImageLoadError(prefix + _unrecognised_reason(data)) from None
    if image.format not in ACCEPTED_FORMATS:
        image.close()
        raise ImageLoadError(f"{prefix}unsupported image format {image.format} "
                             f"(accepted: {', '.join(sorted(ACCEPTED_FORMATS))})")
    if image.format == "PNG":  # Pillow's decoder skips chunk CRCs; libpng refuses bad ones, and so do we
        with _pillow_errors(prefix), Image.open(io.BytesIO(data)) as probe:
            probe.verify()
    return image


@contextlib.contextmanager
def _pillow_errors(prefix: str) -> Iterator[None]:
    """Turn whatever Pillow raises on hostile data into one ImageLoadError."""
    try:
        yield
    except ImageLoadError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageLoadError(f"{prefix}image is too large, refused by Pillow's decompression-bomb guard "
                             f"({_one_line(exc)})") from None
    except Exception as exc:  # plugins raise OSError, SyntaxError, ValueError, struct.error, ...
        raise ImageLoadError(f"{prefix}truncated or corrupt image data ({_one_line(exc)})") from exc


def _unrecognised_reason(data: bytes) -> str:
    """Why Pillow could not identify ``data``, naming SVG and HEIC which people do upload."""
    head = data[:1024].lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if head.startswith(b"<") and b"<svg" in head:
        return "SVG (vector) images are not supported; export it as PNG or JPEG"
    if data[4:8] == b"ftyp" and data[8:12] in _HEIF_BRANDS:
        return "HEIC/HEIF image: unsupported format in this Pillow build; convert it to JPEG or PNG"
    for signature, format_name in _SIGNATURES.items():
        if data.startswith(signature):
            return f"truncated or corrupt image data (unreadable {format_name} header)"
    return "not an image (unrecognised file format)"


def _to_loaded_rgb(image: Image.Image, *, max_pixels: int, prefix: str) -> Image.Image:
    """Check the size, decode the pixels, apply EXIF orientation and convert to a new RGB image."""
    _check_size(image.size, max_pixels=max_pixels, prefix=prefix)
    with _pillow_errors(prefix):
        image.load()
    _check_size(image.size, max_pixels=max_pixels, prefix=prefix)  # a GIF frame may grow the canvas
    return _to_rgb(_apply_exif_orientation(image), prefix)


def _check_size(size: tuple[int, int], *, max_pixels: int, prefix: str) -> None:
    width, height = size
    if width <= 0 or height <= 0:
        raise ImageLoadError(f"{prefix}image has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise ImageLoadError(f"{prefix}image is {width}x{height} = {width * height:,} pixels, "
                             f"above the limit of {max_pixels:,} (max_pixels)")


def _apply_exif_orientation(image: Image.Image) -> Image.Image:
    """Rotate/flip as the EXIF Orientation tag says; broken EXIF leaves the pixels as they are."""
    try:
        if image.getexif().get(ExifTags.Base.Orientation, 1) != 1:
            return ImageOps.exif_transpose(image)
    except Exception:  # malformed metadata is no reason to refuse a decodable picture
        pass
    return image


def _to_rgb(image: Image.Image, prefix: str) -> Image.Image:
    """A new 8-bit RGB copy of a loaded image of any mode, transparency composited on white."""
    if image.mode in _HIGH_DEPTH_MODES:
        transparent = image.info.get("transparency")  # a grey value marked transparent (PNG tRNS)
        values = np.asarray(image)
        image = _scale_to_8bit(values) if image.mode in _SIXTEEN_BIT_MODES else _stretch_to_8bit(values)
        if isinstance(transparent, int):
            alpha = Image.fromarray(np.where(values == transparent, 0, 255).astype(np.uint8))
            image = Image.merge("LA", (image, alpha))
    if image.has_transparency_data:
        rgba = image.convert("RGBA")
        composite = Image.new("RGB", rgba.size, BACKGROUND_RGB)
        composite.paste(rgba, mask=rgba)  # exact round((c * a + bg * (255 - a)) / 255)
        return composite
    try:
        return image.convert("RGB")
    except ValueError as exc:
        raise ImageLoadError(f"{prefix}unsupported colour mode {image.mode}") from exc


def _scale_to_8bit(values: np.ndarray) -> Image.Image:
    """16-bit grey levels onto 0..255 as a viewer shows them (v * 255 / 65535, rounded half up)."""
    levels = np.floor(values.astype(np.float64) * 255 / 65535 + 0.5).astype(np.uint8)
    return Image.fromarray(levels)


def _stretch_to_8bit(values: np.ndarray) -> Image.Image:
    """Map a 32-bit integer or float image's own finite value range (it has no fixed one) linearly onto 0..255,
    rounding half up.

    A flat image has no range to stretch, so its value is clipped to 0..255.
    """
    values = values.astype(np.float64)  # (H, W)
    finite = values[np.isfinite(values)]
    low, high = (finite.min(), finite.max()) if finite.size else (0.0, 0.0)
    values = np.nan_to_num(values, nan=low, posinf=high, neginf=low)
    if high > low:
        values = (values - low) * 255 / (high - low)
    levels = np.floor(np.clip(values, 0, 255) + 0.5).astype(np.uint8)
    return Image.fromarray(levels)


def _one_line(exc: BaseException) -> str:
    """The exception's message squeezed onto one line."""
    return " ".join(str(exc).split()) or type(exc).__name__
