"""The background LPIPS network without torchvision (evaluation/pie/squeeze_lpips.py) gives
torchmetrics' LPIPS-SqueezeNet values.

Independent values: ORACLE below was computed by torchmetrics 1.9.0's own network
(`_NoTrainLpips(net="squeeze")`, its backbone built by torchvision 0.28.0's `squeezenet1_1`, the
checkpoint loaded into it strictly; torchvision's Python package was used without its compiled
operators, which SqueezeNet does not use) on the inputs these functions make: a torchvision-format SqueezeNet 1.1
checkpoint with seeded random values (`random_checkpoint`) and seeded image pairs (`image_pairs`),
with torchmetrics' bundled heads. torchvision cannot be imported here, so the values are recorded;
where it imports, `test_matches_torchmetrics_own_network` recomputes them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("torchmetrics")  # the heads ship with it
from evaluation.pie import networks
from evaluation.pie.pixels import lpips
from ldm.errors import WeightsError

# torchvision's squeezenet1_1: (index in features, inplanes, squeeze, expand1x1, expand3x3) per Fire
FIRES = ((3, 64, 16, 64, 64), (4, 128, 16, 64, 64), (6, 128, 32, 128, 128), (7, 256, 32, 128, 128),
         (9, 256, 48, 192, 192), (10, 384, 48, 192, 192), (11, 384, 64, 256, 256), (12, 512, 64, 256, 256))
SIZES = ((64, 64), (100, 100), (97, 130))  # odd sizes exercise the ceil-mode pooling
# torchmetrics' value per image pair of image_pairs(), in order (see the module docstring)
ORACLE = {
    (64, 64): (0.06895534694194794, 0.08470422029495239),
    (100, 100): (0.07502064853906631, 0.07526007294654846),
    (97, 130): (0.07598495483398438, 0.0728214681148529),
}


def checkpoint_shapes() -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of torchvision's squeezenet1_1 state dict, classifier included."""
    shapes: dict[str, tuple[int, ...]] = {"features.0.weight": (64, 3, 3, 3), "features.0.bias": (64,)}
    for index, inplanes, squeeze, e1, e3 in FIRES:
        for name, (out, inp, k) in {"squeeze": (squeeze, inplanes, 1), "expand1x1": (e1, squeeze, 1),
                                    "expand3x3": (e3, squeeze, 3)}.items():
            shapes[f"features.{index}.{name}.weight"] = (out, inp, k, k)
            shapes[f"features.{index}.{name}.bias"] = (out,)
    shapes["classifier.1.weight"], shapes["classifier.1.bias"] = (1000, 512, 1, 1), (1000,)
    return shapes


def random_checkpoint(seed: int = 0) -> dict[str, torch.Tensor]:
    """He-scaled normal weights, small biases, from one seeded generator in name order."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in checkpoint_shapes().items():
        fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
        scale = (2.0 / fan_in) ** 0.5 if len(shape) > 1 else 0.05
        out[name] = torch.randn(shape, generator=g) * scale
    return out


def image_pairs(size: tuple[int, int], seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Two batches of 2 images in [-1, 1]: noise, and the same noise half-mixed with other noise."""
    g = torch.Generator().manual_seed(seed)
    a = torch.rand((2, 3, *size), generator=g) * 2 - 1
    b = (a + torch.rand((2, 3, *size), generator=g) * 2 - 1) / 2
    return a, b


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("lpips") / "squeezenet1_1.pth"
    torch.save(random_checkpoint(), path)
    return path


@pytest.mark.parametrize("size", SIZES)
def test_matches_torchmetrics_values(checkpoint: Path, size):
    net = networks.load_lpips(checkpoint)
    a, b = image_pairs(size)
    got = net(a, b).reshape(-1).tolist()
    np.testing.assert_allclose(got, ORACLE[size], rtol=1e-5, atol=1e-7)


def test_identical_images_are_zero_and_a_masked_pair_positive(checkpoint: Path):
    net = networks.load_lpips(checkpoint)
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    other = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    keep = np.zeros((64, 64), bool)
    keep[8:40, 8:40] = True
    assert lpips(image, image, net, keep) == 0.0
    assert lpips(image, other, net, keep) > 0.0


def test_a_checkpoint_of_another_network_is_one_line_naming_it(tmp_path: Path):
    path = tmp_path / "other.pth"
    torch.save({"features.0.weight": torch.zeros(8, 3, 3, 3)}, path)
    with pytest.raises(WeightsError, match="not torchvision's SqueezeNet 1.1 checkpoint") as err:
        networks.load_lpips(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def _torchvision_imports() -> bool:
    try:
        import torchvision  # noqa: F401
    except Exception:  # a torchvision built for another torch fails with RuntimeError/OSError, not ImportError
        return False
    return True


@pytest.mark.skipif(not _torchvision_imports(), reason="torchvision does not import beside this torch build")
def test_matches_torchmetrics_own_network(checkpoint: Path):
    from torchmetrics.functional.image.lpips import _NoTrainLpips

    reference = _NoTrainLpips(net="squeeze", pretrained=True, pnet_rand=True)
    state = torch.load(checkpoint, weights_only=True)
    for k, part in enumerate(reference.net.slices):
        for index in part._modules:
            part._modules[index].load_state_dict(
                {n.split(".", 2)[2]: v for n, v in state.items() if n.startswith(f"features.{index}.")})
    ours = networks.load_lpips(checkpoint)
    for size in SIZES:
        a, b = image_pairs(size)
        torch.testing.assert_close(ours(a, b), reference(a, b), rtol=1e-5, atol=1e-7)
