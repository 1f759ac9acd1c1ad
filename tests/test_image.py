"""Image I/O (evaluation/images.py) against the reference's load_512 / image2latent / latent2image
(docs/methods/README.md "Images and latents"), re-written here from that description, and
diffusers' VAE."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.errors import ImageError
from evaluation.images import decode, encode, load_image, parse_size
from tests.oracle_fixtures import TINY_SD


def reference_load_512(path) -> np.ndarray:
    """The reference's load_512 with its default (zero) crop offsets."""
    image = np.array(Image.open(path))[:, :, :3]
    h, w, _ = image.shape
    if h < w:
        offset = (w - h) // 2
        image = image[:, offset : offset + h]
    elif w < h:
        offset = (h - w) // 2
        image = image[offset : offset + w]
    return np.array(Image.fromarray(image).resize((512, 512)))


def noise_image(h: int, w: int, channels: int = 3, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, size=(h // 8 + 1, w // 8 + 1, channels), dtype=np.uint8)
    # blocky, so resizing has structure to preserve
    return np.kron(base, np.ones((8, 8, 1), dtype=np.uint8))[:h, :w]


@pytest.mark.parametrize("shape", [(300, 200), (200, 300), (512, 512), (640, 600)])
def test_rgb_and_rgba_load_like_the_reference(tmp_path, shape) -> None:
    for channels, mode in ((3, "RGB"), (4, "RGBA")):
        path = tmp_path / f"im{channels}.png"
        Image.fromarray(noise_image(*shape, channels), mode).save(path)
        np.testing.assert_array_equal(load_image(path), reference_load_512(path))


def test_greyscale_palette_and_16_bit_images_load_as_rgb(tmp_path) -> None:
    rgb = noise_image(200, 260)
    grey = Image.fromarray(rgb[:, :, 0], "L")
    grey.save(tmp_path / "grey.png")
    grey.convert("RGB").save(tmp_path / "grey_rgb.png")
    np.testing.assert_array_equal(load_image(tmp_path / "grey.png"), reference_load_512(tmp_path / "grey_rgb.png"))

    pal = Image.fromarray(rgb).quantize(16)
    pal.save(tmp_path / "pal.png")
    pal.convert("RGB").save(tmp_path / "pal_rgb.png")
    np.testing.assert_array_equal(load_image(tmp_path / "pal.png"), reference_load_512(tmp_path / "pal_rgb.png"))

    wide = Image.fromarray(rgb[:, :, 0].astype(np.uint16) * 257)  # 16-bit greyscale, same picture
    assert wide.mode.startswith("I")
    wide.save(tmp_path / "grey16.png")
    np.testing.assert_array_equal(load_image(tmp_path / "grey16.png"), load_image(tmp_path / "grey.png"))


def test_non_square_sizes_crop_the_centre_to_the_aspect_ratio(tmp_path) -> None:
    src = noise_image(400, 1000)
    Image.fromarray(src).save(tmp_path / "wide.png")
    out = load_image(tmp_path / "wide.png", "768x512")  # width 768, height 512: aspect 1.5 -> 600 x 400 crop
    assert out.shape == (512, 768, 3)
    want = np.array(Image.fromarray(src[:, 200:800]).resize((768, 512)))
    np.testing.assert_array_equal(out, want)
    assert load_image(tmp_path / "wide.png", 256).shape == (256, 256, 3)
    assert parse_size("512") == (512, 512) and parse_size("640x384") == (640, 384) and parse_size(128) == (128, 128)


@pytest.mark.parametrize("size", ["100", "512x100", "0", "-64", "abc", "64x64x64", "64.0"])
def test_sizes_that_are_not_multiples_of_64_are_refused(size) -> None:
    with pytest.raises(ImageError, match=str(size).split("x")[0] if size[0].isdigit() else "size"):
        parse_size(size)


def test_missing_and_unreadable_files_raise_image_error(tmp_path) -> None:
    with pytest.raises(ImageError, match="no such image file"):
        load_image(tmp_path / "absent.png")
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    with pytest.raises(ImageError, match="cannot read image"):
        load_image(bad)
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(ImageError, match="empty.jpg"):
        load_image(tmp_path / "empty.jpg")


def test_encode_is_the_posterior_mean_times_scale_and_decode_truncates(oracle_sd) -> None:
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(TINY_SD / "vae").eval()
    image = noise_image(64, 64)
    x = torch.from_numpy(image).float().div(127.5).sub(1).permute(2, 0, 1).unsqueeze(0)
    with torch.no_grad():
        want = vae.encode(x).latent_dist.mean * 0.18215
        z = encode(oracle_sd, image)
        torch.testing.assert_close(z, want, rtol=1e-4, atol=1e-4)
        ref = vae.decode(z / 0.18215).sample
    ref = (ref / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    ref = (ref * 255).astype(np.uint8)  # the reference's latent2image: truncation
    ours = decode(oracle_sd, z)
    assert ours.dtype == np.uint8 and ours.shape == (1, 64, 64, 3)
    # equal up to a float-rounding flip of the truncation at a few pixels
    assert np.abs(ours.astype(int) - ref.astype(int)).max() <= 1
    assert (ours == ref).mean() > 0.99
