"""The one image decode, with PIL and numpy only: training, predict, the ONNX path and the server.

    array = read_image_array("cat.jpg", image_size=32, channels=3)   # uint8 3×32×32, as in training
    array = read_image_array(upload_bytes, image_size=32, formats=("PNG", "JPEG"))
    array = read_image_array("cat.jpg", image_size=146, crop=128)      # resize 146, centre crop 128
    pixels = decode_pil(path_or_file, 32, 3)            # uint8 H×W×C (or H×W), PIL errors raised

Every path through it sees the same pixels: EXIF orientation applied, every mode turned into RGB
(or L for one channel; 16-bit greyscale scaled, not clipped), then the one resize policy: the
shorter side resized to ``image_size`` (aspect kept), then the centre ``crop``×``crop`` square
(``crop`` defaults to ``image_size``). It is done in one bilinear resample (PIL's antialiasing) of
the matching centre square of the source, so a square image is resized exactly as before and a
30×20 photo is never squashed. Training stores images this way, and evaluate, predict, the ONNX
path and the server decode this way (model.json's "preprocess" records the numbers). Importing
this module never imports torch (`predict model.onnx` relies on it; data/decode.py adds the torch
side).
"""

from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from visionrecipe.errors import VisionRecipeError

# Truncated files must fail loudly: with this True, PIL pads them with grey and a
# half-downloaded JPEG would silently become training data.
ImageFile.LOAD_TRUNCATED_IMAGES = False

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def _to_mode(img: Image.Image, channels: int) -> Image.Image:
    if img.mode in _SIXTEEN_BIT_MODES:
        # Scale 0–65535 to 0–255 rather than PIL's clip at 255 (which turns 16-bit scans white).
        wide = np.clip(np.asarray(img).astype(np.int64), 0, 65535)
        img = Image.fromarray(((wide + 128) // 257).astype(np.uint8), mode="L")
    target = "RGB" if channels == 3 else "L"
    return img if img.mode == target else img.convert(target)


def centre_box(width: int, height: int, image_size: int, crop: int | None = None) -> tuple[float, ...]:
    """The source region (left, top, right, bottom) that "shorter side to image_size, then the
    centre crop×crop" keeps: a centred square of side shorter·crop/image_size."""
    side = min(width, height) * (crop or image_size) / image_size
    left, top = (width - side) / 2, (height - side) / 2
    return (left, top, left + side, top + side)


def decode_pil(opened, image_size: int | None, channels: int, formats=None, crop: int | None = None) -> np.ndarray:
    """A path or file object to uint8 H×W or H×W×C (S×S with an image_size, see the module's
    policy; native size without); formats (e.g. ("PNG", "JPEG")) limits the PIL plugins tried,
    None tries all. PIL's own exceptions propagate: `unreadable_reason` words them."""
    with Image.open(opened, formats=formats) as img:
        img.load()  # decode now: truncated data raises here, not later
        ImageOps.exif_transpose(img, in_place=True)
        img = _to_mode(img, channels)
        if image_size is not None:
            out = crop or image_size
            box = centre_box(*img.size, image_size, crop)
            if img.size != (out, out) or box != (0, 0, out, out):
                img = img.resize((out, out), Image.Resampling.BILINEAR, box=box)
        return np.asarray(img)


def image_shape(opened) -> tuple[int, int]:
    """(width, height) as decode_pil will see it (EXIF turns applied), from the header only."""
    with Image.open(opened) as img:
        size = img.size
        # EXIF orientations 5-8 turn the image a quarter: width and height swap.
        return size[::-1] if img.getexif().get(0x0112, 1) in (5, 6, 7, 8) else size


def unreadable_reason(exc: Exception, source) -> str:
    """Why `decode_pil` failed on `source` (a path or file object), in one line."""
    if isinstance(exc, UnidentifiedImageError):
        empty = isinstance(source, (str, os.PathLike)) and os.path.getsize(source) == 0
        return "empty file (0 bytes)" if empty else "not an image PIL can read"
    # PIL raises many types on malformed input (OSError, SyntaxError, struct.error,
    # IndexError, DecompressionBombError...).
    return " ".join(str(exc).split()) or type(exc).__name__


def read_image_array(source, *, image_size: int | None, channels: int = 3, formats=None,
                     crop: int | None = None) -> np.ndarray:
    """Decode a path or bytes to uint8 C×H×W; anything wrong is a one-line VisionRecipeError
    naming the file (``formats`` may limit the decoders, as the server does)."""
    if channels not in (1, 3):
        raise VisionRecipeError(f"channels must be 1 or 3, got {channels!r}")
    is_bytes = isinstance(source, (bytes, bytearray, memoryview))
    name = "image bytes" if is_bytes else os.fspath(source)
    opened = io.BytesIO(bytes(source)) if is_bytes else source
    try:
        array = decode_pil(opened, image_size, channels, formats, crop)
    except FileNotFoundError:
        raise VisionRecipeError(f"no such image file: {name}") from None
    except IsADirectoryError:
        raise VisionRecipeError(f"expected an image file, got a folder: {name}") from None
    except Exception as exc:  # PIL raises many types on malformed input
        raise VisionRecipeError(f"unreadable image {name}: {unreadable_reason(exc, opened)}") from None
    array = array[:, :, None] if array.ndim == 2 else array
    return np.ascontiguousarray(array.transpose(2, 0, 1))
