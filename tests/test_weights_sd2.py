"""`invedit convert` reads SD-2.x checkpoints: original single files (OpenCLIP text keys with fused
in-projections) and diffusers folders; the prediction type is read, identified or refused as
weights/prediction.py documents; the tokenizer and its "!" padding come from the checkpoint.

Oracles, as in tests/test_weights.py: diffusers / transformers models with every tensor random,
written by their own `save_pretrained` (folders), or under original keys by this file's own tables:
the UNet/VAE table of test_weights.py and the OpenCLIP table below, which is checked against
diffusers' single-file converter (`convert_open_clip_checkpoint`). Each converted directory must
compute what the reference models compute.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

import cli
from ldm.config import SD21_V, SDConfig, TextConfig, UNetConfig, VAEConfig
from ldm.errors import WeightsError
from ldm.model import StableDiffusion, build_networks
from weights import layouts
from weights.convert import convert
from weights.identify import identify_single_file

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint  # noqa: E402
from test_weights import (  # noqa: E402
    PROMPTS,
    TINY_SD,
    VAE_KW,
    assert_close,
    assert_same_outputs,
    original_layout,
    randomise_,
)

# SD-2-shaped tiny pipeline: linear projections, attention on two levels with different head
# counts (head dim 16), fp32 attention, a 3-layer GELU text tower (OpenCLIP has one layer more).
UNET2_KW = dict(
    sample_size=16,
    block_out_channels=(32, 64, 64),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    layers_per_block=2,
    attention_head_dim=(2, 4, 4),
    cross_attention_dim=48,
    norm_num_groups=32,
    use_linear_projection=True,
    upcast_attention=True,
)
CLIP2_KW = dict(
    vocab_size=49408, hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=6,
    max_position_embeddings=77, hidden_act="gelu", bos_token_id=49406, eos_token_id=49407, pad_token_id=0,
)  # fmt: skip
# The same architecture as our config, without the two settings the converter decides.
SD2_SHAPED = SDConfig(
    unet=UNetConfig(block_out_channels=(32, 64, 64), attention_levels=(True, True, False), num_heads=(2, 4, 4),
                    context_dim=48, use_linear_projection=True, upcast_attention=True),  # fmt: skip
    vae=VAEConfig(block_out_channels=(32, 64)),
    text=TextConfig(hidden_size=48, intermediate_size=96, num_layers=3, num_heads=6, hidden_act="gelu"),
)
OC = "cond_stage_model.model."


def architecture_only(config: SDConfig) -> dict:
    data = config.to_dict()
    del data["unet"]["prediction_type"], data["text"]["pad_token"]
    return data


# --- the OpenCLIP layout, independent of weights/layouts.py ---------------------------------------

OPEN_CLIP_BLOCK = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "self_attn.out_proj": "attn.out_proj",
                   "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}  # fmt: skip


def open_clip_layout(text_sd: dict, seed: int = 5) -> dict:
    """transformers CLIPTextModel state -> OpenCLIP keys under `cond_stage_model.model.`: q, k, v
    fused into in_proj, plus what a real SD-2 file also holds: one more (final) residual block,
    which SD-2 never reads, the text projection and the logit scale."""
    sd = {k.removeprefix("text_model."): v for k, v in text_sd.items() if not k.endswith("position_ids")}
    out = {
        OC + "token_embedding.weight": sd.pop("embeddings.token_embedding.weight"),
        OC + "positional_embedding": sd.pop("embeddings.position_embedding.weight"),
        OC + "ln_final.weight": sd.pop("final_layer_norm.weight"),
        OC + "ln_final.bias": sd.pop("final_layer_norm.bias"),
    }
    n = 1 + max(int(k.split(".")[2]) for k in sd)
    for i in range(n):
        block, hf = f"{OC}transformer.resblocks.{i}.", f"encoder.layers.{i}."
        for kind in ("weight", "bias"):
            out[f"{block}attn.in_proj_{kind}"] = torch.cat([sd.pop(f"{hf}self_attn.{p}_proj.{kind}") for p in "qkv"])
            for ours, theirs in OPEN_CLIP_BLOCK.items():
                out[f"{block}{theirs}.{kind}"] = sd.pop(f"{hf}{ours}.{kind}")
    assert not sd, sorted(sd)
    g = torch.Generator().manual_seed(seed)
    first = f"{OC}transformer.resblocks.0."
    for key in [k for k in out if k.startswith(first)]:  # the final block: random, never read
        out[key.replace(first, f"{OC}transformer.resblocks.{n}.")] = torch.randn(out[key].shape, generator=g)
    width = out[OC + "ln_final.weight"].shape[0]
    out[OC + "text_projection"] = torch.randn(width, width, generator=g)
    out[OC + "logit_scale"] = torch.tensor(4.6052)
    return out


def sd2_original(unet, vae, text) -> dict:
    state = original_layout(unet.state_dict(), vae.state_dict(), {}, 2, 2)
    state.update(open_clip_layout(text.state_dict()))
    return state


def test_the_open_clip_table_is_what_diffusers_reads():
    text = randomise_(transformers.CLIPTextModel(transformers.CLIPTextConfig(**CLIP2_KW)), 3)
    back = convert_open_clip_checkpoint(text, open_clip_layout(text.state_dict()))
    back = {k.removeprefix("text_model."): v for k, v in back.items()}
    # diffusers skips SD-2's final block by its full-size index (23); here it is block 3.
    extra = {k for k in back if k.startswith("encoder.layers.3.")}
    assert extra and set(back) - extra == set(text.state_dict())
    assert all(torch.equal(back[k], v) for k, v in text.state_dict().items())


def test_full_size_sd21_original_keys_map_onto_our_networks():
    """Shapes only (meta device): diffusers' SD-2.1 UNet and VAE under original keys and the full
    24-block OpenCLIP ViT-H/14 tower map onto exactly the names and shapes of our SD21_V networks."""
    with torch.device("meta"):
        unet = diffusers.UNet2DConditionModel(
            block_out_channels=(320, 640, 1280, 1280),
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, attention_head_dim=(5, 10, 20, 20),
            cross_attention_dim=1024, use_linear_projection=True,
        )  # fmt: skip
        vae = diffusers.AutoencoderKL(**{**VAE_KW, "block_out_channels": (128, 256, 512, 512),
                                         "down_block_types": ("DownEncoderBlock2D",) * 4,
                                         "up_block_types": ("UpDecoderBlock2D",) * 4})  # fmt: skip
        text = transformers.CLIPTextModel(transformers.CLIPTextConfig(
            vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
            hidden_act="gelu"))  # fmt: skip
        nets = build_networks(SD21_V)
    ours = {name: {k: tuple(v.shape) for k, v in net.state_dict().items()} for name, net in nets.items()}
    state = original_layout(unet.state_dict(), vae.state_dict(), {}, 2, 4)
    with torch.device("meta"):
        state.update(open_clip_layout(text.state_dict()))
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    assert identify_single_file(Path("sd21.ckpt"), shapes) == "SD-2.x"
    assert shapes[OC + "transformer.resblocks.23.attn.in_proj_weight"] == (3072, 1024)
    mapped, unknown = layouts.text_from_open_clip(layouts.strip_prefix(state, OC), SD21_V.text.num_layers)
    assert unknown == [] and {k: tuple(v.shape) for k, v in mapped.items()} == ours["text"]
    for prefix, name in (("model.diffusion_model.", "unet"), ("first_stage_model.", "vae")):
        assert {k[len(prefix) :]: v for k, v in shapes.items() if k.startswith(prefix)} == ours[name]
    assert len(ours["text"]) == 372 and len(ours["unet"]) == 686


# --- fixtures -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def refs2():
    unet = randomise_(diffusers.UNet2DConditionModel(**UNET2_KW), 20)
    vae = randomise_(diffusers.AutoencoderKL(**VAE_KW), 21)
    text = randomise_(transformers.CLIPTextModel(transformers.CLIPTextConfig(**CLIP2_KW)), 22)
    return unet, vae, text


def sd2_tokenizer(folder: Path) -> Path:
    """SD-2's tokenizer as transformers 5 saves it: tokenizer.json + tokenizer_config.json only."""
    hf = transformers.CLIPTokenizer.from_pretrained(str(TINY_SD / "tokenizer"), pad_token="!")
    hf.save_pretrained(str(folder))
    assert sorted(p.name for p in folder.iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
    return folder


def write_sd2_folder(folder: Path, refs2, prediction_type: str | None = "v_prediction") -> Path:
    unet, vae, text = refs2
    unet.save_pretrained(folder / "unet")
    vae.save_pretrained(folder / "vae")
    text.save_pretrained(folder / "text_encoder")
    sd2_tokenizer(folder / "tokenizer")
    if prediction_type is not None:
        diffusers.DDIMScheduler(prediction_type=prediction_type).save_pretrained(folder / "scheduler")
    return folder


@pytest.fixture(scope="module")
def sd2_folder(tmp_path_factory, refs2) -> Path:
    return write_sd2_folder(tmp_path_factory.mktemp("sd2") / "src", refs2)


@pytest.fixture(scope="module")
def sd2_safetensors(tmp_path_factory, refs2) -> Path:
    path = tmp_path_factory.mktemp("sd2-st") / "sd2.safetensors"
    save_file({k: v.contiguous() for k, v in sd2_original(*refs2).items()}, str(path))
    return path


@pytest.fixture(scope="module")
def config2_json(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cfg2") / "config.json"
    path.write_text(json.dumps(architecture_only(SD2_SHAPED)))
    return path


def hf_ids(folder: Path, prompts: list[str]) -> torch.Tensor:
    hf = transformers.CLIPTokenizer.from_pretrained(str(folder))
    return hf(prompts, padding="max_length", max_length=77, return_tensors="pt").input_ids


# --- round trips ---------------------------------------------------------------------------------


def test_sd2_diffusers_folder_converts_with_its_prediction_type_tokenizer_and_outputs(tmp_path, refs2, sd2_folder):
    sd = StableDiffusion.load(convert(sd2_folder, tmp_path / "model"))
    assert sd.config.unet.prediction_type == "v_prediction" and sd.config.unet.upcast_attention
    assert sd.config.unet.num_heads == (2, 4, 4) and sd.config.text.hidden_act == "gelu"
    assert sd.config.text.pad_token == "!"
    assert_same_outputs(sd, *refs2)
    expected = hf_ids(sd2_folder / "tokenizer", PROMPTS)
    assert torch.equal(sd.tokenizer(PROMPTS), expected) and expected[0, -1] == 0  # padded with "!"
    with torch.no_grad():
        assert_close(sd.embed(PROMPTS), refs2[2](expected).last_hidden_state)


@pytest.mark.parametrize("container", ["safetensors", "ckpt"])
def test_sd2_original_single_file_converts_and_matches_diffusers(tmp_path, refs2, sd2_safetensors, config2_json,
                                                                  container):  # fmt: skip
    src = sd2_safetensors
    if container == "ckpt":  # Stability's files: a Lightning wrapper around the same keys
        src = tmp_path / "sd2.ckpt"
        torch.save({"state_dict": sd2_original(*refs2), "global_step": 110000}, src)
    sd = StableDiffusion.load(convert(src, tmp_path / "model", config=config2_json, prediction_type="v"))
    assert sd.config == dataclasses.replace(
        SD2_SHAPED,
        unet=dataclasses.replace(SD2_SHAPED.unet, prediction_type="v_prediction"),
        text=dataclasses.replace(SD2_SHAPED.text, pad_token="!"),  # not in the JSON: the family's
    )
    assert_same_outputs(sd, *refs2)
    # No tokenizer in a single file: the bundled vocabulary with SD-2's padding.
    assert torch.equal(sd.tokenizer(PROMPTS), hf_ids(sd2_tokenizer(tmp_path / "sd2-tokenizer"), PROMPTS))


# --- the prediction type -------------------------------------------------------------------------


def _convert_cli(src: Path, dst: Path, *extra: str) -> tuple[int, str]:
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = cli.main(["convert", str(src), str(dst), *extra])
    return rc, err.getvalue()


def test_sd2_single_file_without_a_statement_is_refused_until_prediction_is_given(tmp_path, sd2_safetensors,
                                                                                  config2_json):  # fmt: skip
    rc, err = _convert_cli(sd2_safetensors, tmp_path / "m", "--config", str(config2_json))
    assert rc == 2 and err.count("\n") == 1 and "--prediction eps" in err and str(sd2_safetensors) in err
    assert not (tmp_path / "m").exists()
    for flag, expected in (("eps", "epsilon"), ("v", "v_prediction")):
        dst = tmp_path / flag
        assert _convert_cli(sd2_safetensors, dst, "--config", str(config2_json), "--prediction", flag)[0] == 0
        assert json.loads((dst / "config.json").read_text())["unet"]["prediction_type"] == expected


@pytest.mark.parametrize(
    "metadata, expected",
    [
        ({"modelspec.prediction_type": "v"}, "v_prediction"),
        ({"modelspec.prediction_type": "epsilon"}, "epsilon"),
        ({"modelspec.architecture": "stable-diffusion-v2-768-v"}, "v_prediction"),
        ({"modelspec.architecture": "stable-diffusion-v2-512"}, "epsilon"),
        ({"ss_v_parameterization": "True"}, "v_prediction"),
    ],
)
def test_sd2_single_file_prediction_from_safetensors_metadata(tmp_path, refs2, config2_json, metadata, expected):
    src = tmp_path / "sd2.safetensors"
    save_file({k: v.contiguous() for k, v in sd2_original(*refs2).items()}, str(src), metadata=metadata)
    dst = convert(src, tmp_path / "m", config=config2_json)
    assert StableDiffusion.load(dst).config.unet.prediction_type == expected
    # --prediction overrides what the file says.
    flipped = "eps" if expected == "v_prediction" else "v"
    other = convert(src, tmp_path / "m2", config=config2_json, prediction_type=flipped)
    assert StableDiffusion.load(other).config.unet.prediction_type != expected


@pytest.mark.parametrize("parameterization, expected", [("v", "v_prediction"), (None, "epsilon")])
def test_sd2_single_file_prediction_from_the_ldm_yaml_beside_it(tmp_path, sd2_safetensors, config2_json,
                                                                parameterization, expected):  # fmt: skip
    src = tmp_path / "v2-1_768-ema-pruned.safetensors"
    shutil.copyfile(sd2_safetensors, src)
    params = {"linear_start": 0.00085, "linear_end": 0.012, "timesteps": 1000, "first_stage_key": "jpg"}
    if parameterization:
        params["parameterization"] = parameterization
    config = {"model": {"target": "ldm.models.diffusion.ddpm.LatentDiffusion", "params": params}}
    src.with_suffix(".yaml").write_text(yaml.safe_dump(config))
    dst = convert(src, tmp_path / "m", config=config2_json)
    assert json.loads((dst / "config.json").read_text())["unet"]["prediction_type"] == expected


def test_config_json_may_state_the_prediction_type_and_padding(tmp_path, sd2_safetensors):
    stated = SD2_SHAPED.to_dict()
    stated["unet"]["prediction_type"] = "v_prediction"
    stated["text"]["pad_token"] = "<|endoftext|>"
    sd = StableDiffusion.load(convert(sd2_safetensors, tmp_path / "m", config=stated))
    assert sd.config.unet.prediction_type == "v_prediction" and sd.tokenizer(["a cat"])[0, -1] == 49407


def test_sd2_folder_prediction_from_its_scheduler_config_or_refused_without_one(tmp_path, refs2):
    eps = write_sd2_folder(tmp_path / "eps", refs2, prediction_type="epsilon")
    assert StableDiffusion.load(convert(eps, tmp_path / "m-eps")).config.unet.prediction_type == "epsilon"
    assert StableDiffusion.load(convert(eps, tmp_path / "m-v", prediction_type="v")).config.unet.prediction_type == (
        "v_prediction"
    )  # fmt: skip
    bare = write_sd2_folder(tmp_path / "bare", refs2, prediction_type=None)
    rc, err = _convert_cli(bare, tmp_path / "m-bare")
    assert rc == 2 and err.count("\n") == 1 and "SD-2.x" in err and "--prediction" in err
    sample = write_sd2_folder(tmp_path / "sample", refs2, prediction_type="sample")
    rc, err = _convert_cli(sample, tmp_path / "m-sample")
    assert rc == 2 and "prediction_type 'sample'" in err and "scheduler_config.json" in err
    assert not any((tmp_path / d).exists() for d in ("m-bare", "m-sample"))


def test_sd1_checkpoints_without_a_statement_predict_eps(tmp_path):
    shutil.copytree(TINY_SD, tmp_path / "sd1")
    shutil.rmtree(tmp_path / "sd1" / "scheduler")
    sd = StableDiffusion.load(convert(tmp_path / "sd1", tmp_path / "m"))
    assert sd.config.unet.prediction_type == "epsilon" and sd.config.text.pad_token == "<|endoftext|>"


# --- the tokenizer of a diffusers folder ---------------------------------------------------------


def test_sd2_folder_tokenizer_with_only_tokenizer_json_pads_with_the_family_token(tmp_path, refs2, sd2_folder):
    src = tmp_path / "src"
    shutil.copytree(sd2_folder, src)
    (src / "tokenizer" / "tokenizer_config.json").unlink()
    sd = StableDiffusion.load(convert(src, tmp_path / "m"))
    assert sd.config.text.pad_token == "!"
    assert torch.equal(sd.tokenizer(PROMPTS), hf_ids(sd2_folder / "tokenizer", PROMPTS))
    assert sorted(p.name for p in (tmp_path / "m" / "tokenizer").iterdir()) == ["tokenizer.json"]


def test_added_tokens_must_fit_the_text_encoder(tmp_path, refs2, sd2_folder):
    """A fine-tune's added token is read from the folder; one the text encoder cannot embed is refused."""
    src = tmp_path / "src"
    shutil.copytree(sd2_folder, src)
    hf = transformers.CLIPTokenizer.from_pretrained(str(src / "tokenizer"))
    hf.add_tokens(["<cat-toy>"])
    shutil.rmtree(src / "tokenizer")
    hf.save_pretrained(str(src / "tokenizer"))
    with pytest.raises(WeightsError, match="49409 tokens .* embeds only 49408"):
        convert(src, tmp_path / "refused")
    text = refs2[2]
    grown = randomise_(transformers.CLIPTextModel(transformers.CLIPTextConfig(**{**CLIP2_KW, "vocab_size": 49409})), 22)
    shutil.rmtree(src / "text_encoder")
    grown.save_pretrained(src / "text_encoder")
    sd = StableDiffusion.load(convert(src, tmp_path / "m"))
    ids = sd.tokenizer(["a <cat-toy> on a table"])
    assert 49408 in ids[0].tolist() and text.config.vocab_size == 49408
    assert torch.equal(ids, hf_ids(src / "tokenizer", ["a <cat-toy> on a table"]))
