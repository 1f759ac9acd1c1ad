"""StableDiffusion.load accepts exactly our directory format and refuses anything else with a
WeightsError naming the file and the problem, before copying any tensor."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from ldm.errors import WeightsError
from ldm.model import StableDiffusion, open_model
from ldm.tokenizer import write_bundled_tokenizer


def write_dir(sd: StableDiffusion, directory: Path, tamper=None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name in ("unet", "vae", "text"):
        state = {k: v.contiguous() for k, v in getattr(sd, name).state_dict().items()}
        if tamper:
            tamper(name, state)
        save_file(state, str(directory / f"{name}.safetensors"))
    (directory / "config.json").write_text(json.dumps(sd.config.to_dict()))
    write_bundled_tokenizer(directory / "tokenizer")
    return directory


@pytest.fixture(scope="module")
def tiny() -> StableDiffusion:
    return StableDiffusion.tiny_random(seed=0)


def test_round_trip_gives_the_same_weights_and_outputs(tiny, tmp_path):
    loaded = StableDiffusion.load(write_dir(tiny, tmp_path / "m"))
    for name in ("unet", "vae", "text"):
        a, b = getattr(tiny, name).state_dict(), getattr(loaded, name).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(loaded.embed(["a cat"]), tiny.embed(["a cat"]))
    half = StableDiffusion.load(tmp_path / "m", dtype=torch.float16)
    assert half.dtype == torch.float16 and not any(p.requires_grad for p in half.parameters())


def test_tiny_random_is_seeded_without_touching_the_global_rng():
    state = torch.random.get_rng_state()
    a, b, c = (StableDiffusion.tiny_random(seed=s).unet.out[2].weight for s in (3, 3, 4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(state, torch.random.get_rng_state())


@pytest.mark.parametrize(
    "tamper, message",
    [
        (lambda n, s: s.pop("out.2.weight") if n == "unet" else None, "1 missing keys"),
        (lambda n, s: s.update(extra=torch.zeros(1)) if n == "vae" else None, "1 unexpected keys"),
        (lambda n, s: s.update({"out.2.bias": torch.zeros(5)}) if n == "unet" else None, r"shape \(5,\)"),
        (lambda n, s: s.update({"out.2.bias": torch.zeros(4, dtype=torch.int32)}) if n == "unet" else None, "dtype I32"),
    ],
    ids=["missing-key", "extra-key", "wrong-shape", "integer-dtype"],
)
def test_mismatching_files_are_refused(tiny, tmp_path, tamper, message):
    with pytest.raises(WeightsError, match=message):
        StableDiffusion.load(write_dir(tiny, tmp_path / "m", tamper))


def test_truncated_and_missing_files_are_refused(tiny, tmp_path):
    directory = write_dir(tiny, tmp_path / "m")
    data = (directory / "vae.safetensors").read_bytes()
    (directory / "vae.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match="vae.safetensors"):
        StableDiffusion.load(directory)
    (directory / "vae.safetensors").unlink()
    with pytest.raises(WeightsError, match="vae.safetensors is missing"):
        StableDiffusion.load(directory)
    with pytest.raises(WeightsError, match="no config.json"):
        open_model(str(tmp_path / "nowhere"))


def test_wrong_family_config_is_refused(tiny, tmp_path):
    directory = write_dir(tiny, tmp_path / "m")
    config = json.loads((directory / "config.json").read_text())
    config["unet"]["num_heads"] = [3, 3, 3, 3]  # 32 channels do not split into 3 heads
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(WeightsError, match="not a valid invedit model config"):
        StableDiffusion.load(directory)


@pytest.mark.parametrize("dtype, tolerance", [(torch.bfloat16, 5e-2), (torch.float16, 5e-3)])
def test_half_precision_models_run_on_cpu_close_to_fp32(tiny, dtype, tolerance):
    """GroupNorm32 computes in fp32 whatever the weight dtype (CPU group_norm refuses mixed dtypes)."""
    low = StableDiffusion.tiny_random(seed=0, dtype=dtype)
    z = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = tiny.unet(z, 501, tiny.embed(["a cat", "a dog"]))
        out = low.unet(z.to(dtype), 501, low.embed(["a cat", "a dog"]))
        decoded = low.vae.decode(z.to(dtype))
    assert out.dtype == dtype and decoded.dtype == dtype
    assert ((out.float() - ref).norm() / ref.norm()).item() < tolerance


def test_directories_written_before_sd2_support_load_as_eps_models_padded_with_eos(tiny, tmp_path):
    """Older config.json files lack prediction_type, upcast_attention and pad_token, and older
    tokenizer folders hold only vocab.json + merges.txt: they are SD-1 models, and load as such."""
    directory = write_dir(tiny, tmp_path / "m")
    config = json.loads((directory / "config.json").read_text())
    for section, key in (("unet", "prediction_type"), ("unet", "upcast_attention"), ("text", "pad_token")):
        del config[section][key]
    (directory / "config.json").write_text(json.dumps(config))
    (directory / "tokenizer" / "special_tokens_map.json").unlink()
    sd = StableDiffusion.load(directory)
    assert sd.config == tiny.config and sd.config.unet.prediction_type == "epsilon"
    assert sd.tokenizer(["a cat"])[0, 3:].tolist() == [49407] * 74
