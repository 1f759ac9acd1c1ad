"""The seven PIE-Bench metrics (+ source CLIP) on known inputs, against values computed here.

CLIP and DINO run on tiny random-weight models saved as transformers folders and loaded through
the same loader a user's folder goes through. LPIPS: the masking and scaling around the network
are tested here with an injected network, the offline weight lookup with files; the network itself
against torchmetrics' values in test_pie_lpips.py.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

pytest.importorskip("torchmetrics")  # the eval extra
from evaluation.pie import networks
from evaluation.pie.clip import ClipScore
from evaluation.pie.metrics import METRICS, kept_pixels
from evaluation.pie.pixels import lpips, mse, psnr, ssim
from evaluation.pie.structure import StructureDistance, StructureSettings, resized_size
from ldm.errors import WeightsError
from tests.pie_fixtures import make_tiny_clip, make_tiny_dino, photo

H = W = 512


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> Path:
    return make_tiny_clip(tmp_path_factory.mktemp("clip"))


@pytest.fixture(scope="module")
def dino_dir(tmp_path_factory) -> Path:
    return make_tiny_dino(tmp_path_factory.mktemp("dino"))


def rect_mask(top: int, left: int, bottom: int, right: int) -> np.ndarray:
    mask = np.zeros((H, W), bool)
    mask[top:bottom, left:right] = True
    mask[0], mask[-1], mask[:, 0], mask[:, -1] = True, True, True, True
    return mask


# --- pixel metrics -----------------------------------------------------------------------------


def test_identical_images_give_psnr_inf_mse_0_ssim_1():
    image = photo(3)
    keep = ~rect_mask(100, 100, 200, 300)
    assert psnr(image, image, keep) == math.inf
    assert mse(image, image, keep) == 0.0
    assert ssim(image, image, keep) == pytest.approx(1.0, abs=1e-6)
    assert psnr(image, image) == math.inf and ssim(image, image) == pytest.approx(1.0, abs=1e-6)


def test_background_mse_and_psnr_by_hand():
    source = np.full((H, W, 3), 100, np.uint8)
    edit = source.copy()
    mask = rect_mask(50, 50, 150, 250)
    edit[50:150, 50:250] = 255  # inside the edit region: must not count
    edit[300:310, 20:30] = 110  # 10x10 background pixels off by 10 levels in all 3 channels
    keep = ~mask
    # masked images are compared over the whole frame: 300 differing values of 3 * 512 * 512
    expected_mse = 300 * (10 / 255) ** 2 / (3 * H * W)
    assert mse(source, edit, keep) == pytest.approx(expected_mse, rel=1e-4)
    assert psnr(source, edit, keep) == pytest.approx(10 * math.log10(1 / expected_mse), rel=1e-5)
    # the whole image (no mask) sees the edit region too
    whole = (300 * (10 / 255) ** 2 + 100 * 200 * 3 * (155 / 255) ** 2) / (3 * H * W)
    assert mse(source, edit) == pytest.approx(whole, rel=1e-4)


def test_change_inside_the_mask_leaves_every_background_metric_perfect():
    source = photo(4)
    mask = rect_mask(100, 150, 300, 400)
    edit = source.copy()
    edit[100:300, 150:400] = 255 - edit[100:300, 150:400]
    keep = ~mask
    assert psnr(source, edit, keep) == math.inf
    assert mse(source, edit, keep) == 0.0
    assert ssim(source, edit, keep) == pytest.approx(1.0, abs=1e-6)
    assert ssim(source, edit) < 0.9  # the same change seen by the whole-image SSIM


def test_lpips_gets_both_images_masked_and_mapped_to_minus_one_one():
    source, edit = photo(5), photo(6)
    keep = ~rect_mask(10, 10, 100, 100)
    seen = []

    def network(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        seen.append((a, b))
        return (a - b).abs().mean().reshape(1, 1, 1, 1)

    value = lpips(source, edit, network, keep)
    a, b = seen[0]
    expected_a = np.where(keep[..., None], source / 255.0, 0.0) * 2 - 1
    assert a.shape == (1, 3, H, W)
    assert np.allclose(a[0].permute(1, 2, 0).numpy(), expected_a, atol=1e-6)
    assert float(a[0, :, 50, 50].max()) == -1.0 and float(b[0, :, 0, 0].max()) == -1.0  # masked out -> -1
    assert value == pytest.approx(float(np.abs(expected_a - (np.where(keep[..., None], edit / 255.0, 0.0) * 2 - 1)).mean()), rel=1e-5)


def test_nan_rules_follow_the_empty_part():
    background, edit_part = METRICS["psnr_unedit_part"], METRICS["clip_similarity_target_image_edit_part"]
    everything = np.ones((H, W), bool)
    assert kept_pixels(background, everything) is None  # no background -> NaN
    assert kept_pixels(edit_part, np.zeros((H, W), bool)) is None  # no edited part -> NaN
    assert kept_pixels(background, None) is None and kept_pixels(edit_part, None) is None  # no mask (TI2I)
    mask = rect_mask(5, 5, 10, 10)
    assert np.array_equal(kept_pixels(background, mask), ~mask)
    assert np.array_equal(kept_pixels(edit_part, mask), mask)


# --- LPIPS weights -----------------------------------------------------------------------------


def test_missing_lpips_weights_is_one_line_naming_the_file_and_the_option(tmp_path: Path):
    with pytest.raises(WeightsError) as err:
        networks.load_lpips(tmp_path / "squeeze.pth")
    message = str(err.value)
    assert str(tmp_path / "squeeze.pth") in message and "--lpips" in message and "squeezenet1_1" in message
    assert "\n" not in message


# --- CLIP ----------------------------------------------------------------------------------------


def clip_by_hand(folder: Path, image: np.ndarray, prompt: str) -> float:
    """max(100 cos, 0) from the model's two towers, the image prepared with PIL and numpy here:
    bicubic resize to 32 (the tiny processor's size), scale 1/255, CLIP's mean/std."""
    from transformers import CLIPModel, CLIPTokenizer

    model = CLIPModel.from_pretrained(folder).eval()
    tokenizer = CLIPTokenizer.from_pretrained(folder)
    small = np.asarray(Image.fromarray(image).resize((32, 32), Image.BICUBIC), np.float32) / 255
    mean, std = np.array([0.48145466, 0.4578275, 0.40821073]), np.array([0.26862954, 0.26130258, 0.27577711])
    pixels = torch.from_numpy(((small - mean) / std).astype(np.float32)).permute(2, 0, 1)[None]
    tokens = tokenizer([prompt], return_tensors="pt")
    with torch.no_grad():
        img = model.get_image_features(pixel_values=pixels)
        txt = model.get_text_features(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask)
    img, txt = (getattr(x, "pooler_output", x)[0] for x in (img, txt))
    return max(100 * float(F.cosine_similarity(img, txt, dim=0)), 0.0)


def test_clip_whole_and_edited_part_match_the_definition(clip_dir: Path):
    scorer = ClipScore(*networks.load_clip(str(clip_dir)))
    image = photo(7)
    mask = rect_mask(100, 100, 400, 300)
    prompt = "a slanted rusty mountain bicycle on the road"
    whole = scorer(image, prompt)
    masked_by_hand = (image * mask[..., None]).astype(np.uint8)
    part = scorer(image, prompt, mask)
    assert whole == pytest.approx(clip_by_hand(clip_dir, image, prompt), abs=2e-3)
    assert part == pytest.approx(clip_by_hand(clip_dir, masked_by_hand, prompt), abs=2e-3)
    assert whole > 0 and part > 0 and abs(whole - part) > 0.1  # the mask changed what CLIP saw


def test_clip_score_is_clamped_at_zero(clip_dir: Path):
    model, processor = networks.load_clip(str(clip_dir))
    image, prompt = photo(7), "a dog"
    positive = ClipScore(model, processor)(image, prompt)
    with torch.no_grad():
        model.text_projection.weight.neg_()  # flips every text embedding: cos -> -cos
    assert positive > 0
    assert ClipScore(model, processor)(image, prompt) == 0.0


def test_missing_clip_or_dino_is_one_line_naming_the_option(tmp_path: Path):
    for load, option, name in ((networks.load_clip, "--clip", "openai/clip-vit-large-patch14"),
                               (networks.load_dino, "--dino", "facebook/dino-vitb8")):
        with pytest.raises(WeightsError) as err:
            load(str(tmp_path / "none"))
        message = str(err.value)
        assert option in message and name in message and str(tmp_path / "none") in message
        assert "\n" not in message
    (tmp_path / "empty").mkdir()
    with pytest.raises(WeightsError, match="folder .*empty"):
        networks.load_dino(str(tmp_path / "empty"))


# --- structure distance --------------------------------------------------------------------------


def test_resize_rule_is_torchvision_resize_224_max_480():
    assert resized_size(512, 512, 224, 480) == (224, 224)
    assert resized_size(512, 1024, 224, 480) == (224, 448)  # short side 224, aspect kept
    assert resized_size(1024, 512, 224, 480) == (448, 224)
    assert resized_size(512, 2048, 224, 480) == (120, 480)  # long side capped: 224 * 480 / 896


def structure_by_hand(model: torch.nn.Module, source: np.ndarray, edit: np.ndarray) -> float:
    """Keys captured by a hook on the last key projection; 0..255 input, ImageNet mean/std."""
    key_layer = [m for name, m in model.named_modules() if name.endswith(("k_proj", "attention.key"))][-1]
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)

    def similarity(image: np.ndarray) -> torch.Tensor:
        captured = []
        handle = key_layer.register_forward_hook(lambda mod, inp, out: captured.append(out))
        x = torch.from_numpy(image).float().permute(2, 0, 1)[None]
        x = F.interpolate(x, size=(224, 224), mode="bilinear", align_corners=False)
        with torch.no_grad():
            model(pixel_values=(x - mean) / std)
        handle.remove()
        keys = captured[0][0]  # (197, 32)
        return torch.stack([F.cosine_similarity(k, keys, dim=1, eps=0) for k in keys])

    return float(((similarity(source) - similarity(edit)) ** 2).mean())


def test_structure_distance_matches_the_definition_and_is_zero_for_identical_images(dino_dir: Path):
    model = networks.load_dino(str(dino_dir))
    distance = StructureDistance(model)
    source, edit = photo(8), photo(9)
    assert distance(source, source) == 0.0
    value = distance(source, edit)
    assert value > 0
    assert value == pytest.approx(structure_by_hand(model, source, edit), rel=1e-4)


def test_structure_network_sees_the_unscaled_0_255_input(dino_dir: Path):
    distance = StructureDistance(networks.load_dino(str(dino_dir)))
    image = np.full((H, W, 3), 255, np.uint8)
    x = distance.pixel_values(image)
    assert x.shape == (1, 3, 224, 224)
    # (255 - 0.485) / 0.229 for red: the reference normalises 0..255 values with [0, 1] statistics
    assert float(x[0, 0, 0, 0]) == pytest.approx((255 - 0.485) / 0.229, rel=1e-6)


def test_antialias_setting_reaches_the_resize(dino_dir: Path):
    model = networks.load_dino(str(dino_dir))
    source, edit = photo(8), photo(9)
    plain = StructureDistance(model, StructureSettings(antialias=False))
    smooth = StructureDistance(model, StructureSettings(antialias=True))
    x = torch.from_numpy(source).float().permute(2, 0, 1)[None]
    expected = F.interpolate(x, size=(224, 224), mode="bilinear", align_corners=False, antialias=True)
    assert torch.allclose(smooth.pixel_values(source) * smooth.std + smooth.mean, expected, atol=1e-3)
    assert plain(source, edit) != smooth(source, edit)
