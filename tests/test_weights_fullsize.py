"""A full-size random SD-1.4 checkpoint in the original layout converts with every tensor and shape,
and an interrupted conversion leaves nothing that loads.

The key/shape table comes from diffusers' and transformers' SD-1.4 models built on the meta device,
renamed to the original layout by test_weights.py's original-layout table (itself checked against
diffusers' converter there) -- not from our modules. Tensors are fp16 to keep the file at 2.1 GB.
The conversion runs in a subprocess that reports its own wall time and peak RSS (printed, not
asserted: no timing assertions in tests).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from ldm.config import SD14, SDConfig
from ldm.errors import WeightsError
from ldm.model import StableDiffusion

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
from test_weights import REPO, original_layout  # noqa: E402

SD14_UNET = dict(
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    layers_per_block=2,
    attention_head_dim=8,
    cross_attention_dim=768,
)
SD14_VAE = dict(
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=2,
    latent_channels=4,
)
SD14_CLIP = dict(
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
    num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
)  # fmt: skip

CONVERT = """
import json, resource, sys, time
from weights.convert import convert
start = time.perf_counter()
convert(sys.argv[1], sys.argv[2])
print(json.dumps({"seconds": time.perf_counter() - start,
                  "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))
"""


def sd14_original_shapes() -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        unet = diffusers.UNet2DConditionModel(**SD14_UNET)
        vae = diffusers.AutoencoderKL(**SD14_VAE)
        text = transformers.CLIPTextModel(transformers.CLIPTextConfig(**SD14_CLIP))
    state = original_layout(unet.state_dict(), vae.state_dict(), text.state_dict(), 2, 4)
    return {k: tuple(v.shape) for k, v in state.items()}


@pytest.fixture(scope="module")
def full_ckpt(tmp_path_factory):
    """sd-v1-4.ckpt-shaped: Lightning wrapper, 1130 fp16 tensors with their own storages."""
    shapes = sd14_original_shapes()
    pool = torch.randn(1 << 26, generator=torch.Generator().manual_seed(0)).half()
    state = {}
    for i, (key, shape) in enumerate(shapes.items()):
        n = torch.Size(shape).numel()
        start = (i * 7_919_017) % (pool.numel() - n) if n < pool.numel() else 0
        state[key] = pool[start : start + n].clone().reshape(shape)  # own storage, distinct values
    path = tmp_path_factory.mktemp("full") / "sd-v1-4.ckpt"
    torch.save({"state_dict": state, "global_step": 470000}, path)
    spot = {k: state[k].clone() for k in list(state)[::97]}
    del state, pool
    yield path, shapes, spot
    path.unlink()  # 2 GB: do not leave it in pytest's retained temp directories


def test_full_size_sd14_checkpoint_converts_every_tensor(tmp_path, full_ckpt):
    src, shapes, spot = full_ckpt
    dst = tmp_path / "sd14"
    proc = subprocess.run(
        [sys.executable, "-c", CONVERT, str(src), str(dst)], cwd=REPO, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr
    stats = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"\nfull-size SD-1.4 fp16 conversion: {stats['seconds']:.1f} s, peak RSS {stats['peak_rss_gib']:.2f} GiB")
    prefixes = {"unet": "model.diffusion_model.", "vae": "first_stage_model.",
                "text": "cond_stage_model.transformer.text_model."}  # fmt: skip
    for name, count in (("unet", 686), ("vae", 248), ("text", 196)):
        with safe_open(str(dst / f"{name}.safetensors"), "pt") as f:
            got = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
            want = {k[len(prefixes[name]) :]: s for k, s in shapes.items() if k.startswith(prefixes[name])}
            assert len(got) == count and got == want
            assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}
            for key, value in spot.items():
                if key.startswith(prefixes[name]):
                    assert torch.equal(f.get_tensor(key[len(prefixes[name]) :]), value), key
    assert SDConfig.from_dict(json.loads((dst / "config.json").read_text())) == SD14
    sd = StableDiffusion.load(dst)  # the strict key/shape/dtype check of the loading side
    assert sd.config == SD14 and sd.dtype == torch.float16
    del sd
    shutil.rmtree(dst)


def test_killed_conversion_leaves_nothing_loadable(tmp_path, full_ckpt):
    src, _, _ = full_ckpt
    dst = tmp_path / "sd14"
    proc = subprocess.Popen([sys.executable, "-c", CONVERT, str(src), str(dst)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        partial: list[Path] = []
        while time.monotonic() < deadline and proc.poll() is None:
            partial = [
                p for p in tmp_path.iterdir() if p.name.startswith(".sd14.") and (p / "unet.safetensors").exists()
            ]
            if partial:
                break
            time.sleep(0.01)
        assert partial and proc.poll() is None, "the conversion was not caught while writing"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert not dst.exists()
    with pytest.raises(WeightsError):
        StableDiffusion.load(dst)
    with pytest.raises(WeightsError):  # the hidden leftover is not a model directory either
        StableDiffusion.load(partial[0])
    shutil.rmtree(partial[0])
