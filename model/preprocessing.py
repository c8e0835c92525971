"""The one inference preprocessing: decode, RGB, resize to 128x128, scale to [0, 1], normalize.

Evaluation, export verification and the service all call `preprocess`; training augmentation
(model/augmentation.py) ends in the same `to_normalized_chw`.
"""

from __future__ import annotations

import contextlib
import io
import re
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from model.spec import INPUT_SHAPE

IMAGE_SIZE = INPUT_SHAPE[1]
MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
# Resampling for every resize to the network's size, here and in training.
RESAMPLE = Image.Resampling.BILINEAR
# What a client must do to send a tensor the model takes, as the service publishes it (the tensor
# model's metadata and config `parameters`), made from the values above.
CONTRACT = {
    "input_size": f"{IMAGE_SIZE}x{IMAGE_SIZE}",
    "resampling": f"{RESAMPLE.name.lower()} (Pillow's Image.Resampling.{RESAMPLE.name}), from the RGB image to "
                  f"{IMAGE_SIZE}x{IMAGE_SIZE}",
    "channel_order": "RGB",
    "orientation": "turned upright as the image's EXIF orientation tag says, as viewers show it",
    "layout": "NCHW",
    "scale": "1/255 (8-bit values to [0, 1])",
    "mean": ",".join(f"{v:g}" for v in MEAN),
    "std": ",".join(f"{v:g}" for v in STD),
    "formula": "(value / 255 - mean) / std, per channel",
}
# The image formats this model takes (Pillow's names) and their file suffixes, for uploads and for
# data sets alike. Pillow opens many more (SPIDER, DDS, PSD, ...), whose decoders fail in ways of
# their own; they are refused by name instead.
FORMATS = {"JPEG": (".jpg", ".jpeg"), "PNG": (".png",), "WEBP": (".webp",), "BMP": (".bmp",), "GIF": (".gif",)}
SUFFIXES = tuple(suffix for suffixes in FORMATS.values() for suffix in suffixes)
# EXIF's orientation tag (also in PNG's eXIf chunk and ImageMagick's raw profile, which getexif reads).
ORIENTATION = 0x0112
# The modes of 16-bit grey (Pillow opens a 16-bit grey PNG as I;16, a uint16 array becomes one):
# convert() would clip 0..65535 at 255, nearly all white.
_SIXTEEN_BIT_GREY = ("I;16", "I;16L", "I;16B", "I;16N")
# (v / 255 - mean) / std for every 8-bit value v of each channel: one table look-up per pixel.
_NORMALIZED = ((np.arange(256, dtype=np.float32)[None, :] / 255.0 - MEAN[:, None]) / STD[:, None]).astype(np.float32)


# The leading bytes of a file of each format that are proof enough of it (not BMP's "BM").
SIGNATURES = {"PNG": (b"\x89PNG\r\n\x1a\n",), "JPEG": (b"\xff\xd8\xff",), "GIF": (b"GIF87a", b"GIF89a")}


def signed_format(data: bytes) -> str | None:
    """The format whose signature `data` starts with (WebP: RIFF....WEBP), or None."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return next((name for name, signatures in SIGNATURES.items() if data.startswith(signatures)), None)


class ImageError(ValueError):
    """The bytes are not an image this model can take; the message says why."""


@contextlib.contextmanager
def _naming_the_cause(max_pixels: int | None = None, data: bytes = b""):
    """Pillow's exceptions, for undecodable bytes, as ImageError with the cause. Any exception while
    decoding is the bytes' fault (Pillow's decoders raise more kinds than they document), so none
    escapes as another type: a caller answers every one as bad input. A file that Pillow cannot
    identify but that starts as one of FORMATS does is that format's, cut short or corrupt in its
    header: not "a format this model does not take"."""
    try:
        with warnings.catch_warnings():
            # Pillow warns, then errors, on decompression bombs; open_image's explicit limit decides.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            yield
    except ImageError:
        raise
    except UnidentifiedImageError:
        if fmt := signed_format(data):
            raise ImageError(f"corrupt or truncated image: a {fmt} file whose header cannot be read") from None
        raise ImageError(f"not a recognized image format (this model takes {', '.join(FORMATS)})") from None
    except Image.DecompressionBombError as exc:
        # Image.open refuses past twice Pillow's own limit (~179 Mpx) before the size reaches
        # open_image: its message has the pixel count, to cite with the caller's lower limit.
        pixels = re.search(r"\((\d+) pixels\)", str(exc))
        if max_pixels is not None and pixels and int(pixels[1]) > max_pixels:
            raise ImageError(f"image is {pixels[1]} pixels, over the pixel limit of {max_pixels}") from None
        raise ImageError(f"image is over the pixel limit (a decompression bomb?): {exc}") from None
    except Exception as exc:
        raise ImageError(f"corrupt or truncated image: {exc or type(exc).__name__}") from None


def open_image(data: bytes, max_pixels: int | None = None) -> Image.Image:
    """Read the header only: format and size known and checked, no pixel decoded yet."""
    if not data:
        raise ImageError("empty file")
    with _naming_the_cause(max_pixels, data):
        image = Image.open(io.BytesIO(data), formats=list(FORMATS))
        width, height = image.size
    if max_pixels is not None and width * height > max_pixels:
        raise ImageError(f"image is {width}x{height} = {width * height} pixels, over the pixel limit of {max_pixels}")
    return image


def load_rgb(image: Image.Image) -> Image.Image:
    """Decode an opened image (first frame of animations) to RGB, turned upright as its EXIF
    orientation says (a phone's photo is stored sideways with a tag: a viewer shows it upright, and
    the model must see what the user sees); ImageError with the cause."""
    with _naming_the_cause():
        image.seek(0)
        _colour_key_as_decoded(image)
        image.load()
    try:  # turned only where a tag says so: exif_transpose copies even an upright image (+70% on 1 Mpx)
        if image.getexif().get(ORIENTATION, 1) != 1 or "xmp" in image.info or "XML:com.adobe.xmp" in image.info:
            ImageOps.exif_transpose(image, in_place=True)
    except Exception:  # an unreadable EXIF block: the pixels decoded, as stored
        pass
    return to_rgb(image)


def _colour_key_as_decoded(image: Image.Image) -> None:
    """A PNG colour key in the terms of the samples Pillow decodes (before it decodes them): Pillow
    scales 1-, 2- and 4-bit grey to 8 bits (x 255 / (2^bits - 1)) and reduces 16-bit RGB to its top
    bytes, but leaves the key as stored, which then matched the wrong pixels or none. The grey key is
    scaled alike; a 16-bit RGB key, which no reduced pixel can match exactly, is dropped."""
    key = image.info.get("transparency")
    if image.format != "PNG" or image.mode not in ("L", "RGB") or key is None or not image.tile:
        return
    stored = image.tile[0].args
    stored = stored[0] if isinstance(stored, tuple) else stored
    if stored in ("L;1", "L;2", "L;4") and isinstance(key, int):
        image.info["transparency"] = key * 255 // ((1 << int(stored[-1])) - 1)
    elif stored != image.mode:
        del image.info["transparency"]


def decode_image(data: bytes, max_pixels: int | None = None) -> Image.Image:
    """Decode image bytes (first frame of animations) to RGB; ImageError with the cause otherwise."""
    return load_rgb(open_image(data, max_pixels))


def to_rgb(image: Image.Image) -> Image.Image:
    """Any mode of 8- or 16-bit samples to RGB; transparency, by an alpha channel or by a colour key
    (PNG's tRNS in grey, RGB and palette images; GIF's), is composited on black, as a decoder
    without alpha would."""
    key = image.info.get("transparency")
    if image.mode == "RGB" and key is None:
        return image
    if image.mode in _SIXTEEN_BIT_GREY:
        # The top byte, as Pillow itself reduces PNG's 16-bit RGB, RGBA and grey with alpha: a grey
        # decodes alike in each, and 8-bit values widened (x 257) come back exactly. The key is a
        # 16-bit value: matched before the reduction, which would make 255 others match it too.
        samples = np.asarray(image)
        grey = (samples >> 8).astype(np.uint8)
        if isinstance(key, int):
            grey[samples == key] = 0
        return Image.fromarray(grey).convert("RGB")
    if image.mode in ("I", "F"):
        # 32-bit samples have no one scale to 8 bits (none of FORMATS decodes to them).
        raise ImageError(f"image mode {image.mode!r} (32-bit samples) is not taken: send 8- or 16-bit images")
    if image.mode in ("RGBA", "LA", "PA") or key is not None:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def to_normalized_chw(image: Image.Image) -> np.ndarray:
    """An RGB image (128x128 here; 32x32 sources for training's fast first layer) to float32
    [3, H, W], scaled to [0, 1] and normalized."""
    planes = np.ascontiguousarray(np.asarray(image).transpose(2, 0, 1))  # look-ups on contiguous planes: 2x faster
    out = np.empty(planes.shape, np.float32)
    for c in range(3):
        np.take(_NORMALIZED[c], planes[c], out=out[c], mode="clip")
    return out


def preprocess(image: Image.Image | np.ndarray) -> np.ndarray:
    """An RGB image (PIL, or uint8 HxWx3 array) to the network's float32 [3, 128, 128] input."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    image = to_rgb(image)
    if image.size != (IMAGE_SIZE, IMAGE_SIZE):
        image = image.resize((IMAGE_SIZE, IMAGE_SIZE), RESAMPLE)
    return to_normalized_chw(image)


def preprocess_batch(images) -> np.ndarray:
    """Several images to one float32 [N, 3, 128, 128] batch."""
    if not len(images):
        return np.zeros((0, 3, IMAGE_SIZE, IMAGE_SIZE), np.float32)
    return np.stack([preprocess(image) for image in images])
