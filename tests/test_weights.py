"""`invedit convert` turns the three real-world SD-1.x layouts into our directory, safely.

Oracles: diffusers / transformers models with every tensor randomised (biases and norms included),
written to disk by their own `save_pretrained` (diffusers folders) or under original CompVis keys
produced by this file's own rename table (docs/weights.md, "Key mapping") -- and that table is itself checked
against diffusers' single-file conversion code (`convert_ldm_*_checkpoint`), so the test keys
never come from our module names. Each converted directory is loaded with
`StableDiffusion.load` and must compute what the diffusers / transformers models compute.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
import shutil
import struct
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import cli
from ldm.config import SDConfig, TextConfig, UNetConfig, VAEConfig
from ldm.errors import WeightsError
from ldm.model import StableDiffusion
from weights.convert import convert
from weights.safeload import read_state_dict

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
from diffusers.loaders.single_file_utils import (  # noqa: E402
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
)

REPO = Path(__file__).resolve().parents[1]
TINY_SD = REPO / "tests" / "data" / "tiny-sd"
PROMPTS = [
    "a photo of a cat sitting on a wooden bench",
    "A painting of a squirrel eating a burger, oil on canvas",
    "two dogs running on the beach at sunset, 4k",
    "an astronaut riding a horse",
]

# SD-shaped tiny pipeline: attention at full resolution, none at the last level.
UNET_KW = dict(
    sample_size=16,
    block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    layers_per_block=2,
    attention_head_dim=8,
    cross_attention_dim=32,
    norm_num_groups=32,
)
VAE_KW = dict(
    block_out_channels=(32, 64),
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    layers_per_block=2,
    latent_channels=4,
    norm_num_groups=32,
)
CLIP_KW = dict(
    vocab_size=49408,
    hidden_size=32,
    intermediate_size=37,
    num_hidden_layers=3,
    num_attention_heads=4,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    bos_token_id=49406,
    eos_token_id=49407,
    pad_token_id=49407,
)
# The same architecture in our config format (what --config gets for the single-file layouts).
SD_SHAPED = SDConfig(
    unet=UNetConfig(block_out_channels=(32, 64), attention_levels=(True, False), num_heads=(8, 8), context_dim=32),
    vae=VAEConfig(block_out_channels=(32, 64)),
    text=TextConfig(hidden_size=32, intermediate_size=37, num_layers=3, num_heads=4),
)


# --- reference models --------------------------------------------------------------------------


def randomise_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every tensor random: fan-in scaled weights, norm scales near 1, non-zero biases."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.state_dict().items():
            if not p.is_floating_point():
                continue
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(math.prod(p.shape[1:])))
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return module.eval()


def reference_models(seed: int, unet_kw=UNET_KW, vae_kw=VAE_KW, clip_kw=CLIP_KW):
    unet = randomise_(diffusers.UNet2DConditionModel(**unet_kw), seed)
    vae = randomise_(diffusers.AutoencoderKL(**vae_kw), seed + 1)
    text = randomise_(transformers.CLIPTextModel(transformers.CLIPTextConfig(**clip_kw)), seed + 2)
    return unet, vae, text


def write_diffusers_folder(folder: Path, unet, vae, text, **save_kw) -> Path:
    unet.save_pretrained(folder / "unet", **save_kw)
    vae.save_pretrained(folder / "vae", **save_kw)
    text.save_pretrained(folder / "text_encoder", **save_kw)
    shutil.copytree(TINY_SD / "tokenizer", folder / "tokenizer")
    return folder


def assert_close(ours: torch.Tensor, ref: torch.Tensor, tol: float = 1e-5) -> float:
    err = (ours.float() - ref.float()).abs().max().item()
    assert ours.shape == ref.shape
    assert err <= tol * max(1.0, ref.abs().max().item()), err
    return err


def assert_same_outputs(sd: StableDiffusion, unet, vae, text) -> None:
    """Our loaded networks compute what the reference models compute, on fixed inputs."""
    g = torch.Generator().manual_seed(7)
    ctx_dim = unet.config.cross_attention_dim
    x = torch.randn(2, 4, 16, 16, generator=g)
    context = torch.randn(2, 77, ctx_dim, generator=g)
    image = torch.rand(1, 3, 64, 64, generator=g) * 2 - 1
    ids = torch.full((2, 77), 49407)
    ids[:, 0] = 49406
    ids[0, 1:6] = torch.tensor([320, 1125, 539, 320, 2368])
    ids[1, 1:3] = torch.tensor([42, 7])
    with torch.no_grad():
        for t in (torch.tensor([1, 999]), torch.tensor([981.0, 21.0])):
            assert_close(sd.unet(x, t, context), unet(x, t, context).sample)
        ours, ref = sd.vae.encode(image), vae.encode(image).latent_dist
        assert_close(ours.mean, ref.mean)
        assert_close(ours.logvar, ref.logvar)
        z = torch.randn(1, 4, 8, 8, generator=g)
        assert_close(sd.vae.decode(z), vae.decode(z).sample)
        assert_close(sd.text(ids), text(ids).last_hidden_state)


# --- the original CompVis layout, from the rules of docs/weights.md (independent of weights/layouts.py) --

RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
          "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}  # fmt: skip
VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out",
            "query": "q", "key": "k", "value": "v", "proj_attn": "proj_out"}  # fmt: skip


def original_unet_key(key: str, per: int, up_has_attention: set[int]) -> str:
    fixed = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}  # fmt: skip
    head, _, leaf = key.rpartition(".")
    if head in fixed:
        return f"{fixed[head]}.{leaf}"

    def resnet(rest: str) -> str:
        first, _, tail = rest.partition(".")
        return f"{RESNET[first]}.{tail}"

    if m := re.fullmatch(r"down_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", key):
        b, j = int(m[1]), int(m[2])
        return f"input_blocks.{1 + b * (per + 1) + j}.0.{resnet(m[3])}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.*)", key):
        return f"input_blocks.{1 + int(m[1]) * (per + 1) + int(m[2])}.1.{m[3]}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", key):
        return f"input_blocks.{(int(m[1]) + 1) * (per + 1)}.0.op.{m[2]}"
    if m := re.fullmatch(r"mid_block\.resnets\.(\d)\.(.*)", key):
        return f"middle_block.{2 * int(m[1])}.{resnet(m[2])}"
    if m := re.fullmatch(r"mid_block\.attentions\.0\.(.*)", key):
        return f"middle_block.1.{m[1]}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", key):
        return f"output_blocks.{int(m[1]) * (per + 1) + int(m[2])}.0.{resnet(m[3])}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.*)", key):
        return f"output_blocks.{int(m[1]) * (per + 1) + int(m[2])}.1.{m[3]}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", key):
        b = int(m[1])
        return f"output_blocks.{b * (per + 1) + per}.{2 if b in up_has_attention else 1}.conv.{m[2]}"
    raise AssertionError(f"no original-layout rule for {key}")


def original_vae_key(key: str, n_levels: int) -> str:
    key = key.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
    key = re.sub(r"encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", key)
    key = re.sub(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", key)
    key = re.sub(
        r"decoder\.up_blocks\.(\d+)\.resnets\.", lambda m: f"decoder.up.{n_levels - 1 - int(m[1])}.block.", key
    )
    key = re.sub(
        r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.", lambda m: f"decoder.up.{n_levels - 1 - int(m[1])}.upsample.", key
    )
    key = re.sub(r"mid_block\.resnets\.(\d)\.", lambda m: f"mid.block_{int(m[1]) + 1}.", key)
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.*)\.(weight|bias)", key):
        return f"{m[1]}.mid.attn_1.{VAE_ATTN[m[2]]}.{m[3]}"
    return key


def original_layout(unet_sd: dict, vae_sd: dict, text_sd: dict, per: int, n_vae_levels: int) -> dict:
    """diffusers/transformers state dicts -> one original-layout state dict (CompVis prefixes)."""
    up_attn = {int(k.split(".")[1]) for k in unet_sd if re.match(r"up_blocks\.\d+\.attentions\.", k)}
    out = {f"model.diffusion_model.{original_unet_key(k, per, up_attn)}": v for k, v in unet_sd.items()}
    for k, v in vae_sd.items():
        new = original_vae_key(k, n_vae_levels)
        out[f"first_stage_model.{new}"] = v[:, :, None, None] if ".attn_1." in new and v.ndim == 2 else v
    for k, v in text_sd.items():
        if not k.endswith("position_ids"):
            out[f"cond_stage_model.transformer.text_model.{k.removeprefix('text_model.')}"] = v
    return out


def ema_copy(unet_sd_ema: dict, per: int) -> dict:
    """model_ema.* keys as diffusers' extract_ema reads them: dots removed after `model_ema.`."""
    up_attn = {int(k.split(".")[1]) for k in unet_sd_ema if re.match(r"up_blocks\.\d+\.attentions\.", k)}
    ema = {}
    for k, v in unet_sd_ema.items():
        full = f"model.diffusion_model.{original_unet_key(k, per, up_attn)}"
        ema["model_ema." + "".join(full.split(".")[1:])] = v
    return ema


def test_the_test_layout_is_what_diffusers_reads():
    """Our test table reproduces the original keys: diffusers' converter maps them back exactly."""
    unet, vae, text = reference_models(0)
    unet2 = randomise_(diffusers.UNet2DConditionModel(**UNET_KW), 99)
    orig = original_layout(unet.state_dict(), vae.state_dict(), text.state_dict(), 2, 2)
    orig.update(ema_copy(unet2.state_dict(), 2))
    cfg = dict(unet.config)
    for extract_ema, ref in ((False, unet), (True, unet2)):
        back = convert_ldm_unet_checkpoint(orig, cfg, extract_ema=extract_ema)
        assert back.keys() == ref.state_dict().keys()
        assert all(torch.equal(back[k], v) for k, v in ref.state_dict().items())
    back = convert_ldm_vae_checkpoint(orig, dict(vae.config))
    assert back.keys() == vae.state_dict().keys()
    assert all(torch.equal(back[k].reshape(v.shape), v) for k, v in vae.state_dict().items())
    back = {k.removeprefix("text_model."): v for k, v in convert_ldm_clip_checkpoint(orig).items()}
    assert back.keys() == text.state_dict().keys()


# --- fixtures -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def refs():
    return reference_models(0)


@pytest.fixture(scope="module")
def non_ema_unet():
    return randomise_(diffusers.UNet2DConditionModel(**UNET_KW), 50)


@pytest.fixture(scope="module")
def config_json(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cfg") / "config.json"
    path.write_text(json.dumps(SD_SHAPED.to_dict()))
    return path


LIGHTNING_MODULE = "pytorch_lightning.callbacks.model_checkpoint"


def _lightning_callback_class() -> type:
    """A class named as pytorch_lightning's ModelCheckpoint (the key of a ckpt's `callbacks`)."""

    def __init__(self) -> None:
        self.best_model_score = np.float64(0.123)
        self.monitor = "val/loss"

    return type("ModelCheckpoint", (), {"__module__": LIGHTNING_MODULE, "__init__": __init__})


@pytest.fixture(scope="module")
def lightning_ckpt(tmp_path_factory, refs, non_ema_unet) -> Path:
    """An sd-v1-4.ckpt-shaped file: Lightning wrapper, callbacks keyed by the ModelCheckpoint class,
    numpy scalars, schedule buffers, position_ids, and an EMA UNet copy (the reference weights)."""
    unet, vae, text = refs
    state = original_layout(non_ema_unet.state_dict(), vae.state_dict(), text.state_dict(), 2, 2)
    state.update(ema_copy(unet.state_dict(), 2))
    state["model_ema.decay"] = torch.tensor(0.9999)
    state["model_ema.num_updates"] = torch.tensor(1000, dtype=torch.int32)
    state["betas"] = torch.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2
    state["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    callback = _lightning_callback_class()
    ckpt = {
        "epoch": 6,
        "global_step": 470000,
        "pytorch-lightning_version": "1.4.2",
        "state_dict": state,
        "callbacks": {callback: {"best_model_score": np.float64(0.5), "current_score": np.float64(0.25)}},
        "callback_instance": callback(),
    }
    path = tmp_path_factory.mktemp("ckpt") / "sd-v1-4.ckpt"
    # The real pickler looks the class up under Lightning's module path, so that module must exist
    # while the file is written (Lightning itself is not installed).
    with pytest.MonkeyPatch.context() as mp:
        for name in ("pytorch_lightning", "pytorch_lightning.callbacks", LIGHTNING_MODULE):
            mp.setitem(sys.modules, name, types.ModuleType(name))
        sys.modules[LIGHTNING_MODULE].ModelCheckpoint = callback
        torch.save(ckpt, path)
    return path


@pytest.fixture(scope="module")
def original_safetensors(tmp_path_factory, refs) -> Path:
    unet, vae, text = refs
    state = original_layout(unet.state_dict(), vae.state_dict(), text.state_dict(), 2, 2)
    path = tmp_path_factory.mktemp("st") / "sd-v1-4.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


# --- round trips ---------------------------------------------------------------------------------


def test_diffusers_folder_safetensors_round_trip(tmp_path, refs):
    src = write_diffusers_folder(tmp_path / "src", *refs)
    dst = convert(src, tmp_path / "model")
    sd = StableDiffusion.load(dst)
    assert sd.config.unet.attention_levels == (True, False) and sd.config.unet.num_heads == (8, 8)
    assert_same_outputs(sd, *refs)


def test_diffusers_folder_fp16_bin_variant_round_trip(tmp_path, refs):
    """`.bin` pickles of the fp16 variant; converted to fp32, they compute what the fp16-rounded
    reference computes in fp32."""
    rounded = [copy.deepcopy(m) for m in refs]
    for r in rounded:
        r.load_state_dict({k: v.half().float() for k, v in r.state_dict().items()})
    src = tmp_path / "src"
    unet16, vae16, text16 = (copy.deepcopy(m).half() for m in refs)
    unet16.save_pretrained(src / "unet", safe_serialization=False, variant="fp16")
    vae16.save_pretrained(src / "vae", safe_serialization=False, variant="fp16")
    # transformers 5 only writes safetensors; write the .bin the way transformers 4 did (with the
    # `text_model.` level and the position_ids buffer).
    text16.config.save_pretrained(src / "text_encoder")
    state = {f"text_model.{k}": v for k, v in text16.state_dict().items()}
    state["text_model.embeddings.position_ids"] = torch.arange(77)[None]
    torch.save(state, src / "text_encoder" / "pytorch_model.fp16.bin")
    shutil.copytree(TINY_SD / "tokenizer", src / "tokenizer")
    assert (src / "unet" / "diffusion_pytorch_model.fp16.bin").is_file()
    sd = StableDiffusion.load(convert(src, tmp_path / "model", dtype="fp32"))
    assert sd.dtype == torch.float32
    assert_same_outputs(sd, *rounded)


def test_original_safetensors_round_trip(tmp_path, refs, original_safetensors, config_json):
    dst = convert(original_safetensors, tmp_path / "model", config=config_json)
    assert_same_outputs(StableDiffusion.load(dst), *refs)


def test_lightning_ckpt_uses_ema_by_default_and_non_ema_on_request(
    tmp_path, refs, non_ema_unet, lightning_ckpt, config_json
):
    # Plain weights_only loading cannot read it (callback class, numpy scalars); ours can.
    with pytest.raises(Exception, match="pytorch_lightning|numpy|Unsupported global"):
        torch.load(lightning_ckpt, weights_only=True)
    sd = StableDiffusion.load(convert(lightning_ckpt, tmp_path / "ema", config=config_json))
    assert_same_outputs(sd, *refs)
    sd = StableDiffusion.load(convert(lightning_ckpt, tmp_path / "raw", ema=False, config=SD_SHAPED))
    assert_same_outputs(sd, non_ema_unet, *refs[1:])


def test_cli_converts_to_the_requested_dtype(tmp_path, original_safetensors, config_json, capsys):
    for flag, dtype in (("fp16", torch.float16), ("bf16", torch.bfloat16)):
        dst = tmp_path / flag
        rc = cli.main(["convert", str(original_safetensors), str(dst), "--dtype", flag, "--config", str(config_json)])
        assert rc == 0
        for name in ("unet", "vae", "text"):
            assert {t.dtype for t in load_file(str(dst / f"{name}.safetensors")).values()} == {dtype}
        assert StableDiffusion.load(dst).dtype == dtype


def test_cli_ema_flags(tmp_path, refs, non_ema_unet, lightning_ckpt, config_json):
    common = ["--config", str(config_json)]
    assert cli.main(["convert", str(lightning_ckpt), str(tmp_path / "ema"), "--ema", *common]) == 0
    assert cli.main(["convert", str(lightning_ckpt), str(tmp_path / "raw"), "--no-ema", *common]) == 0
    ema, raw = (load_file(str(tmp_path / d / "unet.safetensors")) for d in ("ema", "raw"))
    # out.2 is the final conv in the original layout, conv_out in diffusers'.
    assert torch.equal(ema["out.2.weight"], refs[0].state_dict()["conv_out.weight"])
    assert torch.equal(raw["out.2.weight"], non_ema_unet.state_dict()["conv_out.weight"])


def test_ema_flag_on_a_file_without_ema_is_refused(tmp_path, original_safetensors, config_json):
    with pytest.raises(WeightsError, match="no EMA"):
        convert(original_safetensors, tmp_path / "m", ema=True, config=config_json)
    assert not (tmp_path / "m").exists()


# --- the oracle pipeline ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_sd_bin(tmp_path_factory) -> Path:
    """tests/data/tiny-sd with its weights as .bin pickles (the layout the oracle shipped)."""
    folder = tmp_path_factory.mktemp("tiny") / "tiny-sd"
    shutil.copytree(TINY_SD, folder)
    for sub, name in (("unet", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model"),
                      ("text_encoder", "pytorch_model")):  # fmt: skip
        st = folder / sub / ("model.safetensors" if sub == "text_encoder" else f"{name}.safetensors")
        torch.save(load_file(str(st)), folder / sub / f"{name}.bin")
        st.unlink()
    return folder


def test_tiny_sd_oracle_pipeline_converts_and_matches(tmp_path, tiny_sd_bin):
    dst = convert(tiny_sd_bin, tmp_path / "tiny")
    sd = StableDiffusion.load(dst)
    unet = diffusers.UNet2DConditionModel.from_pretrained(TINY_SD / "unet").eval()
    vae = diffusers.AutoencoderKL.from_pretrained(TINY_SD / "vae").eval()
    text = transformers.CLIPTextModel.from_pretrained(TINY_SD / "text_encoder").eval()
    assert_same_outputs(sd, unet, vae, text)
    # ... and the prompt path end to end: our tokenizer + text encoder = transformers' pair.
    hf_tok = transformers.CLIPTokenizer.from_pretrained(TINY_SD / "tokenizer")
    ids = hf_tok(PROMPTS, padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        assert_close(sd.embed(PROMPTS), text(ids).last_hidden_state)


# --- tokenizer -------------------------------------------------------------------------------------


def test_converted_tokenizer_gives_the_source_tokenizers_ids(tmp_path, refs, original_safetensors, config_json):
    """diffusers folder: the folder's own files; single file: the bundled derivation, which must
    equal the real CLIP vocabulary (tests/data/tiny-sd/tokenizer)."""
    hf = transformers.CLIPTokenizer.from_pretrained(TINY_SD / "tokenizer")
    expected = hf(PROMPTS, padding="max_length", max_length=77, return_tensors="pt").input_ids
    folder = convert(write_diffusers_folder(tmp_path / "src", *refs), tmp_path / "from-folder")
    single = convert(original_safetensors, tmp_path / "from-file", config=config_json)
    for dst in (folder, single):
        assert torch.equal(StableDiffusion.load(dst).tokenizer(PROMPTS), expected)
    source_vocab = json.loads((TINY_SD / "tokenizer" / "vocab.json").read_text())
    assert json.loads((single / "tokenizer" / "vocab.json").read_text()) == source_vocab


# --- security ----------------------------------------------------------------------------------------


class RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_pickle_that_would_run_code_is_refused(tmp_path, legacy, capsys):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    payload = {"state_dict": {"model.diffusion_model.out.2.bias": torch.zeros(4)}, "x": RunsCode(marker)}
    torch.save(payload, path, _use_new_zipfile_serialization=not legacy)
    with pytest.raises(WeightsError, match=r"refusing to unpickle.*(posix|os)\.system"):
        read_state_dict(path)
    assert cli.main(["convert", str(path), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "system" in err
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_numpy1_scalar_pickle_loads_with_inert_stand_ins(tmp_path):
    """A legacy-format checkpoint written under numpy 1 names `numpy.core.multiarray.scalar`."""
    path = tmp_path / "np1.ckpt"
    weights = {"a.weight": torch.arange(6.0).reshape(2, 3)}
    torch.save({"state_dict": weights, "score": np.float64(0.5)}, path, _use_new_zipfile_serialization=False)
    data = path.read_bytes()
    assert b"cnumpy._core.multiarray\nscalar\n" in data
    path.write_bytes(data.replace(b"cnumpy._core.multiarray\nscalar\n", b"cnumpy.core.multiarray\nscalar\n"))
    got = read_state_dict(path)
    assert got.keys() == {"a.weight"} and torch.equal(got["a.weight"], weights["a.weight"])


# --- bad input: one line, exit code 2, destination untouched ---------------------------------------


def _single(tmp_path: Path, name: str, tensors: dict) -> Path:
    path = tmp_path / name
    save_file({k: torch.zeros(s) for k, s in tensors.items()}, str(path))
    return path


U, V, T = "model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer.text_model."
BASE = {V + "encoder.conv_in.weight": (128, 3, 3, 3), T + "final_layer_norm.weight": (768,)}
BASE2 = {V + "encoder.conv_in.weight": (128, 3, 3, 3), "cond_stage_model.model.ln_final.weight": (1024,)}
BAD_FILES = {
    # CLIP ViT-L keys but 1024-wide cross-attention: SD-1-shaped by its text tower, so the SD-1.4
    # config check names the mismatch.
    "sd1-text-1024-context": (
        {U + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 1024), **BASE}, "do not match the config"
    ),
    "sd2-no-prediction": ({U + "out.2.bias": (4,), V + "decoder.conv_in.weight": (512, 4, 3, 3),
                           "cond_stage_model.model.ln_final.weight": (1024,)}, "SD-2.x .*--prediction eps"),  # fmt: skip
    "sd2-inpainting": ({U + "input_blocks.0.0.weight": (320, 9, 3, 3), **BASE2}, "SD-2.x UNet .*inpainting"),
    "sd2-depth": ({U + "input_blocks.0.0.weight": (320, 5, 3, 3), "depth_model.model.x": (1,), **BASE2},
                  "SD-2.x UNet .*depth-to-image.*MiDaS"),  # fmt: skip
    "sd2-upscaler": ({U + "input_blocks.0.0.weight": (256, 7, 3, 3), U + "label_emb.weight": (1000, 1024), **BASE2},
                     "x4 upscaler"),  # fmt: skip
    "sd2-unclip": ({U + "label_emb.0.0.weight": (1280, 1024), "embedder.model.visual.proj": (1280, 1024), **BASE2},
                   "SD-2.x unCLIP"),  # fmt: skip
    "sd3": ({U + "joint_blocks.0.x_block.attn.qkv.weight": (4608, 1536), **BASE}, "SD-3 / Flux"),
    "sdxl": ({U + "label_emb.0.0.weight": (1280, 2816), "conditioner.embedders.0.transformer.x": (1,)}, "SDXL"),
    "inpainting": ({U + "input_blocks.0.0.weight": (320, 9, 3, 3), **BASE}, "SD-1.x UNet .*inpainting"),
    "vae-only": ({"encoder.conv_in.weight": (128, 3, 3, 3), "decoder.conv_out.weight": (3, 128, 3, 3)}, "VAE-only"),
    "lora": ({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": (4, 320)}, "LoRA"),
    "lora-peft": ({"unet.down_blocks.0.attentions.0.proj_in.lora_A.weight": (4, 320)}, "LoRA"),
}


def _bad_inputs(tmp_path: Path, original_safetensors: Path) -> dict[str, tuple[Path, str]]:
    cases = {name: (_single(tmp_path, f"{name}.safetensors", t), msg) for name, (t, msg) in BAD_FILES.items()}
    huge = tmp_path / "bad-header.safetensors"
    huge.write_bytes(struct.pack("<Q", 10**12) + b'{"a": {}}')
    cases["bad-header"] = (huge, "does not fit the file size")
    lying = tmp_path / "bad-offsets.safetensors"
    header = json.dumps({"a": {"dtype": "F32", "shape": [1000], "data_offsets": [0, 4000]}}).encode()
    lying.write_bytes(struct.pack("<Q", len(header)) + header + bytes(16))
    cases["bad-offsets"] = (lying, "truncated safetensors file")
    rnd = tmp_path / "random.ckpt"
    rnd.write_bytes(bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8)))
    cases["random-bytes"] = (rnd, "unrecognised file format|not a readable|corrupt")
    data = original_safetensors.read_bytes()
    trunc = tmp_path / "truncated.safetensors"
    trunc.write_bytes(data[: len(data) // 2])
    cases["truncated-safetensors"] = (trunc, "truncated")
    ckpt = tmp_path / "full.ckpt"
    torch.save({"state_dict": load_file(str(original_safetensors))}, ckpt)
    trunc_ckpt = tmp_path / "truncated.ckpt"
    trunc_ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    cases["truncated-ckpt"] = (trunc_ckpt, "truncated or corrupt")
    cases["missing"] = (tmp_path / "does-not-exist.ckpt", "does not exist")
    sd2 = tmp_path / "sd2-folder"
    shutil.copytree(TINY_SD, sd2)
    cfg = json.loads((sd2 / "unet" / "config.json").read_text())
    (sd2 / "unet" / "config.json").write_text(json.dumps({**cfg, "cross_attention_dim": 1024}))
    cases["context-mismatch-folder"] = (sd2, "text encoder width 32 does not match the UNet cross-attention width 1024")
    xl = tmp_path / "sdxl-folder"
    shutil.copytree(TINY_SD, xl)
    (xl / "unet" / "config.json").write_text(json.dumps({**cfg, "addition_embed_type": "text_time"}))
    cases["sdxl-folder"] = (xl, "SDXL")
    inp = tmp_path / "inpaint-folder"
    shutil.copytree(TINY_SD, inp)
    (inp / "unet" / "config.json").write_text(json.dumps({**cfg, "in_channels": 9}))
    cases["inpainting-folder"] = (inp, "inpainting")
    for name, update, message in (
        ("depth-folder", {"in_channels": 5}, "depth-to-image"),
        ("upscaler-folder", {"in_channels": 7, "num_class_embeds": 1000}, "x4 upscaler"),
        ("unclip-folder", {"class_embed_type": "projection"}, "class_embed_type='projection'"),
    ):
        folder = tmp_path / name
        shutil.copytree(TINY_SD, folder)
        (folder / "unet" / "config.json").write_text(json.dumps({**cfg, **update}))
        cases[name] = (folder, message)
    no_tok = tmp_path / "no-tokenizer-folder"
    shutil.copytree(TINY_SD, no_tok)
    shutil.rmtree(no_tok / "tokenizer")
    cases["no-tokenizer-folder"] = (no_tok, "tokenizer: no tokenizer files")
    return cases


def test_bad_inputs_give_one_line_and_exit_code_2(tmp_path, original_safetensors, capsys):
    for name, (src, message) in _bad_inputs(tmp_path, original_safetensors).items():
        dst = tmp_path / f"out-{name}"
        rc = cli.main(["convert", str(src), str(dst)])
        err = capsys.readouterr().err
        assert rc == 2, name
        assert err.count("\n") == 1 and err.startswith("invedit convert: error:"), (name, err)
        assert re.search(message, err), (name, err)
        assert not dst.exists(), name
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert leftovers == []


def test_unwritable_destination_and_existing_destination_are_refused(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    assert cli.main(["convert", str(TINY_SD), str(blocker / "model")]) == 2
    assert "cannot be created" in capsys.readouterr().err
    assert blocker.read_text() == "not a directory"
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    assert cli.main(["convert", str(TINY_SD), str(existing)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert [p.name for p in existing.iterdir()] == ["keep.txt"]


def test_non_sd14_single_file_without_config_names_the_mismatch(tmp_path, original_safetensors, capsys):
    assert cli.main(["convert", str(original_safetensors), str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert "do not match the config" in err and "--config" in err and err.count("\n") == 1
    assert not (tmp_path / "m").exists()


def test_cli_subprocess_missing_path_exit_code_2(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "cli", "convert", str(tmp_path / "nope.ckpt"), str(tmp_path / "out")],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "does not exist" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_diffusers_head_count_from_num_attention_heads_and_lists(tmp_path):
    from weights.identify import unet_config_from_diffusers

    cfg = json.loads((TINY_SD / "unet" / "config.json").read_text())
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**cfg, "attention_head_dim": 4}))
    assert unet_config_from_diffusers(path).num_heads == (4, 4, 4, 4)
    path.write_text(json.dumps({**cfg, "attention_head_dim": 8, "num_attention_heads": [2, 4, 8, 16]}))
    assert unet_config_from_diffusers(path).num_heads == (2, 4, 8, 16)
