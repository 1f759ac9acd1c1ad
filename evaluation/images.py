"""Images in and out of the latent space (docs/methods/README.md ("Images and latents")).

Loading follows the reference's `load_512` (cure-lab/PnPInversion `utils/utils.py`): center-crop
to the target aspect ratio along the longer side, then PIL's default resize (bicubic), then
x = uint8 / 127.5 - 1. Unlike the reference it accepts greyscale, palette and alpha images
(alpha is dropped, as the reference's `[:, :, :3]` does) and sizes other than 512x512 (any
multiple of 64, the UNet's total downsampling x 8 of the VAE). Encoding is the posterior *mean*
times the VAE scale factor (0.18215); decoding divides by it and converts to uint8 by truncation,
as the reference's `latent2image` does. Two more differences: a photo is turned upright by its EXIF
orientation tag (the reference edits a sideways phone photo sideways; `orient=False` reads the
pixels as stored), and an image over a pixel limit (default PIL's own, about 89 megapixels) is
refused from its header, before its pixels are decoded.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import Tensor

from ldm.errors import ImageError
from ldm.files import atomic_path
from ldm.model import StableDiffusion

MULTIPLE = 64


def parse_size(text: str | int | tuple[int, int]) -> tuple[int, int]:
    """"512" -> (512, 512); "768x512" -> (width 768, height 512); each a positive multiple of 64."""
    if isinstance(text, int):
        size = (text, text)
    elif isinstance(text, tuple):
        size = text
    else:
        parts = text.lower().split("x")
        try:
            values = [int(p) for p in parts]
        except ValueError:
            raise ImageError(f"--size {text!r}: expected N or WIDTHxHEIGHT in pixels, e.g. 512 or 768x512") from None
        if len(values) not in (1, 2):
            raise ImageError(f"--size {text!r}: expected N or WIDTHxHEIGHT in pixels, e.g. 512 or 768x512")
        size = (values[0], values[-1])
    for v in size:
        if v <= 0 or v % MULTIPLE:
            raise ImageError(f"--size {size[0]}x{size[1]}: width and height must be positive multiples of {MULTIPLE}")
    return size


DEFAULT_MAX_PIXELS = 89_478_485  # PIL's own decompression-bomb limit (1 GiB of 32-bit pixels / 3)
ORIENTATION_TAG = 0x0112  # EXIF Orientation: 1 = as stored; 2..8 = mirrored and/or rotated


@contextlib.contextmanager
def _open_image(path: Path, max_pixels: int) -> Iterator[Image.Image]:
    """Image.open with our pixel limit in place of PIL's decompression-bomb check: an image over
    `max_pixels` is one ImageError naming the option that raises the limit, checked from the
    header before any pixel is decoded, instead of PIL's warning or traceback. PIL's check is its
    module setting MAX_IMAGE_PIXELS; it is lifted only while the file is opened and restored."""
    if not path.is_file():
        raise ImageError(f"{path}: no such image file" + (" (it is a directory)" if path.is_dir() else ""))
    saved = Image.MAX_IMAGE_PIXELS
    try:
        Image.MAX_IMAGE_PIXELS = None
        img = Image.open(path)
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise ImageError(f"{path}: cannot read image ({err})") from None
    finally:
        Image.MAX_IMAGE_PIXELS = saved
    with img:
        width, height = img.size
        if width * height > max_pixels:
            raise ImageError(f"{path}: {width}x{height} is {width * height / 1e6:.0f} megapixels, more than the "
                             f"limit of {max_pixels / 1e6:.0f} (a decompression bomb?); raise it with --max-pixels")
        yield img


def orientation(img: Image.Image) -> int:
    """The EXIF orientation tag of an open image (1, as stored, when absent or invalid)."""
    value = img.getexif().get(ORIENTATION_TAG, 1)
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def read_rgb(path: str | os.PathLike[str], max_pixels: int = DEFAULT_MAX_PIXELS, orient: bool = True) -> np.ndarray:
    """(H, W, 3) uint8 of any image PIL reads; greyscale/palette expanded, alpha dropped; turned
    upright by its EXIF orientation tag unless `orient` is False (the pixels as stored, which is
    what the reference reads: a phone photo taken sideways is then edited sideways)."""
    p = Path(path)
    with _open_image(p, max_pixels) as img:
        try:
            img.load()
            if orient and orientation(img) != 1:
                img = ImageOps.exif_transpose(img)
            if img.mode in ("I;16", "I;16B", "I;16L", "I"):
                # 16/32-bit greyscale: keep the top 8 bits instead of PIL's clipping to 255
                arr = np.asarray(img, dtype=np.float64)
                peak = 65535.0 if arr.max() > 255 else 255.0
                img = Image.fromarray(np.clip(arr * 255.0 / peak, 0, 255).astype(np.uint8), "L")
            elif img.mode == "F":
                arr = np.asarray(img, dtype=np.float64)
                img = Image.fromarray(np.clip(arr * 255.0 if arr.max() <= 1.0 else arr, 0, 255).astype(np.uint8), "L")
            rgb = img.convert("RGB")  # RGBA/LA: alpha dropped (no compositing), as [:, :, :3] does
        except (UnidentifiedImageError, OSError, ValueError) as err:
            raise ImageError(f"{p}: cannot read image ({err})") from None
    return np.asarray(rgb, dtype=np.uint8)


def center_crop_resize(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Crop the centered region of aspect width:height, then resize to size = (width, height).

    For a square target this is exactly the reference's crop (offset (long - short) // 2).
    """
    h, w = image.shape[:2]
    tw, th = size
    if w * th > h * tw:  # too wide: crop columns
        cw, ch = (h * tw) // th, h
    else:
        cw, ch = w, (w * th) // tw
    top, left = (h - ch) // 2, (w - cw) // 2
    image = image[top : top + ch, left : left + cw]
    # PIL's default filter (bicubic for RGB), as the reference's resize((512, 512)) call
    return np.asarray(Image.fromarray(image).resize((tw, th)), dtype=np.uint8)


def load_image(path: str | os.PathLike[str], size: str | int | tuple[int, int] = 512,
               max_pixels: int = DEFAULT_MAX_PIXELS, orient: bool = True) -> np.ndarray:
    """(H, W, 3) uint8 ready to encode: read (read_rgb), center-cropped and resized to `size`."""
    return center_crop_resize(read_rgb(path, max_pixels, orient), parse_size(size))


def check_image(image: np.ndarray) -> None:
    """An (H, W, 3) uint8 array whose sides are multiples of 64, or ImageError."""
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ImageError(f"expected an (H, W, 3) uint8 image, got {image.dtype} {tuple(image.shape)}")
    h, w = image.shape[:2]
    if h % MULTIPLE or w % MULTIPLE or not h or not w:
        raise ImageError(f"image size {w}x{h}: width and height must be positive multiples of {MULTIPLE} "
                         "(load it with load_image(path, size))")


def file_info(path: str | os.PathLike[str], max_pixels: int = DEFAULT_MAX_PIXELS,
              orient: bool = True) -> dict[str, object]:
    """What run.json records of an input image: path, size as stored, SHA-256 of the file, its EXIF
    orientation tag and whether it was applied."""
    p = Path(path)
    digest = hashlib.sha256(p.read_bytes()).hexdigest()
    with _open_image(p, max_pixels) as img:
        width, height = img.size
        tag = orientation(img)
    return {"path": str(p), "width": width, "height": height, "sha256": digest, "exif_orientation": tag,
            "orientation_applied": orient and tag != 1}


def to_tensor(image: np.ndarray) -> Tensor:
    """(H, W, 3) uint8 -> (1, 3, H, W) float32 in [-1, 1]."""
    return (torch.from_numpy(np.array(image, dtype=np.uint8, copy=True)).float() / 127.5 - 1).permute(2, 0, 1).unsqueeze(0)


@torch.no_grad()
def encode(sd: StableDiffusion, image: np.ndarray) -> Tensor:
    """(H, W, 3) uint8 -> z0 (1, 4, H/8, W/8) float32: posterior mean x scale_factor."""
    x = to_tensor(image).to(sd.device, sd.dtype)
    return sd.vae.encode(x).mean.float() * sd.config.vae.scale_factor


@torch.no_grad()
def decode(sd: StableDiffusion, latents: Tensor) -> np.ndarray:
    """(B, 4, h, w) -> (B, 8h, 8w, 3) uint8; x/2 + 0.5 clamped, * 255 truncated like the reference.

    One image at a time: the decoder's full-resolution activations are the largest tensors of an
    edit (192 MiB per 256-px image in fp32, 0.75 GiB at 512 px), and a batch multiplies them while
    saving no time at these sizes."""
    images = []
    for k in range(latents.shape[0]):
        x = sd.vae.decode((latents[k : k + 1] / sd.config.vae.scale_factor).to(sd.device, sd.dtype)).float()
        images.append(((x / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy() * 255).astype(np.uint8))
    return np.concatenate(images)


def save_png(path: str | os.PathLike[str], image: np.ndarray) -> None:
    """Write (H, W, 3) uint8 as PNG atomically."""
    with atomic_path(path) as tmp:
        Image.fromarray(image).save(tmp, format="PNG")


def image_mse_psnr(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """MSE over uint8 pixel values (0..255) and PSNR in dB (inf when identical)."""
    if a.shape != b.shape:
        raise ValueError(f"image shapes differ: {a.shape} vs {b.shape}")
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    psnr = float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))
    return mse, psnr
