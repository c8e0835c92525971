"""The one inference preprocessing and image decoding errors."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from model.preprocessing import IMAGE_SIZE, MEAN, STD, ImageError, decode_image, preprocess, preprocess_batch, to_rgb


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def raw_png(width: int, height: int, bit_depth: int, color_type: int, rows: bytes) -> bytes:
    """A PNG written chunk by chunk: the 16-bit colour types Pillow cannot save, and bomb headers."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def png_16_bit(samples: np.ndarray, color_type: int) -> bytes:
    """samples: uint16 [H, W, channels] of PNG colour type 0 (grey), 2 (RGB), 4 (grey, alpha) or 6 (RGBA)."""
    height, width = samples.shape[:2]
    rows = b"".join(b"\0" + row.tobytes() for row in samples.astype(">u2").reshape(height, -1))
    return raw_png(width, height, 16, color_type, rows)


def test_solid_color_normalizes_to_the_documented_values():
    out = preprocess(np.full((32, 32, 3), (255, 0, 128), dtype=np.uint8))
    assert out.shape == (3, IMAGE_SIZE, IMAGE_SIZE) and out.dtype == np.float32
    expected = (np.array([255, 0, 128]) / 255.0 - MEAN) / STD
    np.testing.assert_allclose(out[:, 64, 64], expected, rtol=1e-5)


def test_resize_is_bilinear_to_128():
    ramp = np.tile(np.linspace(0, 255, 32).astype(np.uint8)[None, :, None], (32, 1, 3))
    out = preprocess(ramp)
    row = out[0, 0]
    assert np.all(np.diff(row) >= -1e-6)  # a ramp stays a monotonic ramp
    assert len(np.unique(np.round(row, 4))) > 64  # interpolated, not nearest-neighbour


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "BMP", "GIF"])
def test_formats_decode_to_rgb(fmt):
    image = Image.new("RGB", (40, 30), (200, 10, 10))
    decoded = decode_image(encode(image, fmt))
    assert decoded.mode == "RGB" and decoded.size == (40, 30)
    assert abs(int(np.asarray(decoded)[15, 20, 0]) - 200) < 12


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P", "CMYK", "I;16"])
def test_any_mode_becomes_rgb(mode):
    image = Image.new("RGB", (16, 16), (90, 90, 90)).convert(mode)
    fmt = "JPEG" if mode == "CMYK" else "PNG"
    assert decode_image(encode(image, fmt)).mode == "RGB"


def test_16_bit_grey_png_decodes_to_the_8_bit_values_it_widens():
    """Such a PNG opens as mode I;16, which convert("RGB") clipped at 255: nearly all white."""
    grey = np.arange(256, dtype=np.uint8).reshape(16, 16)
    decoded = decode_image(encode(Image.fromarray(grey.astype(np.uint16) * 257), "PNG"))
    np.testing.assert_array_equal(np.asarray(decoded), np.repeat(grey[..., None], 3, axis=2))


def test_16_bit_pngs_of_each_colour_type_decode_to_the_same_top_bytes():
    """Pillow reduces 16-bit RGB, RGBA and grey with alpha to their top bytes itself: 16-bit grey
    takes them too, so one grey decodes alike in each."""
    grey = np.random.default_rng(0).integers(0, 65536, (8, 8, 1), dtype=np.uint16)
    opaque = np.full_like(grey, 65535)
    expected = np.repeat((grey >> 8).astype(np.uint8), 3, axis=2)
    rgb = np.repeat(grey, 3, axis=2)
    for color_type, samples in [(0, grey), (2, rgb), (4, np.concatenate([grey, opaque], axis=2)),
                                (6, np.concatenate([rgb, opaque], axis=2))]:
        decoded = decode_image(png_16_bit(samples, color_type))
        np.testing.assert_array_equal(np.asarray(decoded), expected, err_msg=f"colour type {color_type}")


@pytest.mark.parametrize("mode,key,other", [
    ("RGBA", None, None), ("LA", None, None), ("P", 1, None),  # an alpha channel, a palette entry
    ("L", 200, 90), ("RGB", (200, 10, 10), (90, 90, 90)),  # a colour key (PNG's tRNS)
])
def test_transparent_pixels_are_composited_on_black_whether_by_alpha_or_by_a_colour_key(mode, key, other):
    """A colour key was ignored in grey and RGB PNGs: the keyed colour reached the model as it is
    stored, where the same picture with an alpha channel gave black."""
    if key is None or mode == "P":
        rgba = np.full((4, 4, 4), (90, 90, 90, 255), np.uint8)
        rgba[0, 0] = (200, 10, 10, 0)  # one transparent pixel
        image = Image.fromarray(rgba).convert(mode) if mode != "P" else Image.fromarray(rgba[..., :3]).quantize(2)
        if mode == "P":
            key = int(np.asarray(image)[0, 0])
    else:
        image = Image.new(mode, (4, 4), other)
        image.putpixel((0, 0), key)
    decoded = np.asarray(decode_image(encode(image, "PNG", **({"transparency": key} if key is not None else {}))))
    assert tuple(decoded[0, 0]) == (0, 0, 0)
    assert tuple(decoded[1, 1]) == (90, 90, 90)


def test_a_16_bit_grey_colour_key_makes_only_its_own_value_transparent():
    """The key is a 16-bit value: matched on the top bytes, 255 other values would go black with it."""
    samples = np.array([[51400, 51401]], dtype=np.uint16)
    decoded = np.asarray(decode_image(encode(Image.fromarray(samples), "PNG", transparency=51400)))
    np.testing.assert_array_equal(decoded[0], [[0, 0, 0], [200, 200, 200]])


def test_a_colour_key_is_matched_as_pillow_decodes_low_bit_grey_and_16_bit_rgb():
    """Pillow scales 2-bit grey to 8 bits and reduces 16-bit RGB to its top bytes, leaving the key as
    stored: a 2-bit key of 3 missed its own (white) pixels, a 16-bit RGB key blackened other colours."""
    def with_key(png: bytes, key: bytes) -> bytes:  # a tRNS chunk before the IDAT
        at = png.index(b"IDAT") - 4
        return png[:at] + struct.pack(">I", len(key)) + b"tRNS" + key + struct.pack(">I", zlib.crc32(b"tRNS" + key)) + png[at:]

    grey = with_key(raw_png(4, 1, 2, 0, b"\0" + bytes([0b11100100])), struct.pack(">H", 3))  # values 3, 2, 1, 0
    assert np.asarray(decode_image(grey))[0, :, 0].tolist() == [0, 170, 85, 0]  # the 3 (white) keyed out
    samples = np.array([[[0xFFFF, 0, 0], [0xFF00, 0, 0]]], dtype=np.uint16)
    rgb = with_key(png_16_bit(samples, 2), struct.pack(">HHH", 0xFFFF, 0, 0))
    assert np.asarray(decode_image(rgb))[0].tolist() == [[255, 0, 0], [255, 0, 0]]  # none blackened


@pytest.mark.parametrize("dtype", ["<u2", ">u2"])  # modes I;16 and I;16B
def test_16_bit_grey_arrays_preprocess_as_their_8_bit_values(dtype):
    grey = np.arange(256, dtype=np.uint8).reshape(16, 16)
    image = Image.fromarray((grey.astype(np.uint16) * 257).astype(dtype))
    np.testing.assert_array_equal(preprocess(image), preprocess(Image.fromarray(grey)))


@pytest.mark.parametrize("mode", ["I", "F"])
def test_32_bit_modes_are_refused_by_name(mode):
    """No one scale takes their samples to 8 bits (convert() clips at 255); no format taken decodes to them."""
    with pytest.raises(ImageError, match=f"image mode '{mode}' \\(32-bit samples\\) is not taken"):
        to_rgb(Image.new(mode, (4, 4), 1000))


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
@pytest.mark.parametrize("orientation, stored", [(6, Image.Transpose.ROTATE_90), (8, Image.Transpose.ROTATE_270),
                                                  (3, Image.Transpose.ROTATE_180)])
def test_a_photo_stored_sideways_with_an_exif_orientation_is_turned_upright(fmt, orientation, stored):
    """A phone stores a portrait photo sideways with an orientation tag, which viewers (the page's
    preview too) apply: the model saw it sideways (a horse answered as a bird)."""
    upright = np.zeros((20, 40, 3), np.uint8)
    upright[:, :20] = 255  # the left half white
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(Image.fromarray(upright).transpose(stored), fmt, exif=exif, **({"quality": 95} if fmt != "PNG" else {}))
    decoded = np.asarray(decode_image(data)).astype(int)
    assert decoded.shape == (20, 40, 3)
    assert decoded[:, :18].min() > 200 and decoded[:, 22:].max() < 50


def test_an_orientation_in_imagemagicks_raw_exif_profile_of_a_png_is_applied_too():
    """ImageMagick writes a PNG's EXIF as a text chunk ("Raw profile type exif"), not an eXIf chunk:
    looking only for the latter left such a photo sideways."""
    from PIL import PngImagePlugin

    upright = np.zeros((20, 40, 3), np.uint8)
    upright[:, :20] = 255
    exif = Image.Exif()
    exif[0x0112] = 6
    raw = b"Exif\x00\x00" + exif.tobytes()[6:] if exif.tobytes().startswith(b"Exif") else exif.tobytes()
    text = PngImagePlugin.PngInfo()
    text.add_text("Raw profile type exif", f"\nexif\n{len(raw):8d}\n" + raw.hex())
    data = encode(Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90), "PNG", pnginfo=text)
    assert Image.open(io.BytesIO(data)).getexif().get(0x0112) == 6  # Pillow reads it
    decoded = np.asarray(decode_image(data)).astype(int)
    assert decoded.shape == (20, 40, 3) and decoded[:, :18].min() > 200 and decoded[:, 22:].max() < 50


def test_an_unreadable_exif_block_leaves_the_pixels_as_stored():
    image = Image.new("RGB", (8, 4), (10, 200, 30))
    data = encode(image, "JPEG", exif=b"Exif\x00\x00garbage-not-tiff", quality=95)
    decoded = decode_image(data)
    assert decoded.size == (8, 4) and abs(int(np.asarray(decoded)[2, 4, 1]) - 200) < 10


def test_gif_uses_the_first_frame():
    frames = [Image.new("RGB", (8, 8), color) for color in [(255, 0, 0), (0, 0, 255)]]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
    assert tuple(np.asarray(decode_image(data))[0, 0]) == (255, 0, 0)


@pytest.mark.parametrize(
    "data,message",
    [
        (b"", "empty file"),
        (b"hello, this is text", "not a recognized image format"),
    ],
)
def test_bad_bytes_raise_a_named_cause(data, message):
    with pytest.raises(ImageError, match=message):
        decode_image(data)


@pytest.mark.parametrize("fmt", ["SPIDER", "TIFF", "PPM"])
def test_formats_pillow_knows_but_this_model_does_not_take_are_refused_by_name(fmt):
    """A 200x200 SPIDER file used to raise StopIteration from the frame iterator, which asyncio
    cannot hand to a future: its upload hung. Such formats are now refused at the header."""
    image = Image.new("F" if fmt == "SPIDER" else "RGB", (200, 200))
    with pytest.raises(ImageError, match=r"not a recognized image format \(this model takes JPEG, PNG, WEBP"):
        decode_image(encode(image, fmt))


def test_any_exception_while_decoding_is_an_image_error(monkeypatch):
    """Pillow's decoders raise more than they document (NotImplementedError for some DDS files):
    every one is the bytes' fault, named, never another type. A fake decoder (the real failures
    need crafted files of formats now refused) stands in for them."""
    data = encode(Image.new("RGB", (8, 8)), "PNG")

    def load(self):
        raise NotImplementedError("unsupported pixel flags")

    monkeypatch.setattr(Image.Image, "load", load)
    with pytest.raises(ImageError, match="corrupt or truncated image: unsupported pixel flags"):
        decode_image(data)


def test_truncated_image_is_reported():
    data = encode(Image.new("RGB", (64, 64), (1, 2, 3)), "PNG")
    with pytest.raises(ImageError, match="corrupt or truncated"):
        decode_image(data[: len(data) // 2])


def test_pixel_limit_rejects_before_decoding():
    data = encode(Image.new("L", (4000, 4000)), "PNG")  # small file, 16 Mpx once decoded
    with pytest.raises(ImageError, match="4000x4000 = 16000000 pixels, over the pixel limit of 1000000"):
        decode_image(data, max_pixels=1_000_000)
    assert decode_image(data, max_pixels=20_000_000).size == (4000, 4000)


def test_a_bomb_past_pillows_own_limit_cites_the_callers_limit():
    """Image.open refuses this 100000x100000 header itself (over 2 x Image.MAX_IMAGE_PIXELS), with
    its own limit in the message: the caller's lower limit is the one to cite."""
    bomb = raw_png(100_000, 100_000, 1, 0, b"\0" * 1024)
    with pytest.raises(ImageError, match=r"^image is 10000000000 pixels, over the pixel limit of 1000000$"):
        decode_image(bomb, max_pixels=1_000_000)
    with pytest.raises(ImageError, match=r"over the pixel limit \(a decompression bomb\?\): .* exceeds limit of"):
        decode_image(bomb)  # no limit of the caller's: Pillow's is the one


def test_batch_stacks_in_order():
    images = [np.full((32, 32, 3), v, dtype=np.uint8) for v in (0, 255)]
    batch = preprocess_batch(images)
    assert batch.shape == (2, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert batch[0].mean() < batch[1].mean()
    assert preprocess_batch([]).shape == (0, 3, IMAGE_SIZE, IMAGE_SIZE)
