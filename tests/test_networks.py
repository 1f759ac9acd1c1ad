"""Our UNet, VAE and CLIP text encoder compute what diffusers' / transformers' do, with the
original checkpoint's parameter names, for SD-1 and SD-2 shapes (test_networks_sd2.py has the rest
of SD-2: the penultimate-layer text output, float32 attention, the full-size SD-2.1 networks).

Weights travel by an independent key map: our state dict is written under the original
checkpoint's prefixes and converted by diffusers' own single-file conversion code
(`convert_ldm_unet_checkpoint`, `convert_ldm_vae_checkpoint`), then loaded strictly into the
diffusers model. If any of our names or shapes differed from the original layout, that strict
load would fail; if any computation differed, the outputs would.
"""

from __future__ import annotations

import pytest
import torch

from ldm.config import SD14, TINY, TINY_SD2, SDConfig, TextConfig, UNetConfig, VAEConfig
from ldm.model import build_networks, random_state_dict

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
from benchmarks.diffusers_nets import (  # noqa: E402
    diffusers_unet,
    diffusers_vae,
    to_diffusers_unet,
    to_diffusers_vae,
    to_transformers_clip,
    transformers_clip,
)

# An SD-shaped tiny config: attention at full resolution, none at the last level (as SD-1.4).
SD_SHAPED = SDConfig(
    unet=UNetConfig(block_out_channels=(32, 64), attention_levels=(True, False), num_heads=(8, 8), context_dim=32),
    vae=VAEConfig(block_out_channels=(32, 64)),
    text=TextConfig(vocab_size=1000, hidden_size=32, intermediate_size=37, num_layers=5, num_heads=4),
)
# SD-2-shaped: linear projections, three levels with attention on the first two and a different
# head count at every level (head dims 16, 16 and 8 in the middle block), a context width unlike
# any channel width, a 3-layer GELU text tower.
SD2_SHAPED = SDConfig(
    unet=UNetConfig(
        block_out_channels=(32, 64, 64), attention_levels=(True, True, False), num_heads=(2, 4, 8),
        context_dim=48, use_linear_projection=True,
    ),  # fmt: skip
    vae=TINY.vae,
    text=TextConfig(vocab_size=1000, hidden_size=48, intermediate_size=96, num_layers=3, num_heads=6,
                    hidden_act="gelu", pad_token="!"),  # fmt: skip
)
CONFIGS = [TINY, SD_SHAPED, TINY_SD2, SD2_SHAPED]
CONFIG_IDS = ["tiny-sd", "sd-shaped", "tiny-sd2", "sd2-shaped"]


def random_nets(config: SDConfig, seed: int = 0, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    nets = build_networks(config)
    for net in nets.values():
        net.load_state_dict(random_state_dict(net, generator, dtype), assign=True)
        net.eval()
    return nets


def max_rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours - ref).abs().max() / ref.abs().max()).item()


@pytest.mark.parametrize("config", CONFIGS, ids=CONFIG_IDS)
@pytest.mark.parametrize("latent_hw", [(16, 16), (8, 16)], ids=["square", "non-square"])
def test_unet_matches_diffusers(config: SDConfig, latent_hw):
    ours = random_nets(config)["unet"]
    ref = diffusers_unet(config.unet).eval()
    ref.load_state_dict(to_diffusers_unet(ours.state_dict(), ref), strict=True)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, *latent_hw, generator=g)
    context = torch.randn(2, 77, config.unet.context_dim, generator=g)
    for t in (torch.tensor([1, 999]), torch.tensor([981.0, 21.0])):
        with torch.no_grad():
            out, expected = ours(x, t, context), ref(x, t, context).sample
        assert out.shape == expected.shape
        assert (out - expected).abs().max() <= 1e-5 * max(1.0, expected.abs().max().item())


# SD-2 keeps SD-1's VAE (test_networks_sd2.py checks the presets say so).
@pytest.mark.parametrize("config", [TINY, SD_SHAPED], ids=["tiny-sd", "sd-shaped"])
@pytest.mark.parametrize("image_hw", [(64, 64), (64, 128)], ids=["square", "non-square"])
def test_vae_matches_diffusers(config: SDConfig, image_hw):
    ours = random_nets(config)["vae"]
    ref = diffusers_vae(config.vae).eval()
    ref.load_state_dict(to_diffusers_vae(ours.state_dict(), ref), strict=True)
    g = torch.Generator().manual_seed(2)
    x = torch.rand(1, 3, *image_hw, generator=g) * 2 - 1
    with torch.no_grad():
        post, ref_post = ours.encode(x), ref.encode(x).latent_dist
        assert max_rel_err(post.mean, ref_post.mean) <= 1e-5
        assert max_rel_err(post.logvar, ref_post.logvar) <= 1e-5
        z = torch.randn_like(post.mean)
        assert max_rel_err(ours.decode(z), ref.decode(z).sample) <= 1e-5


@pytest.mark.parametrize("config", CONFIGS, ids=CONFIG_IDS)
def test_text_encoder_matches_transformers(config: SDConfig):
    ours = random_nets(config)["text"]
    ref = transformers_clip(config.text).eval()
    ref.load_state_dict(to_transformers_clip(ours.state_dict(), ref), strict=False)
    missing = set(ref.state_dict()) - set(to_transformers_clip(ours.state_dict(), ref))
    assert missing <= {"text_model.embeddings.position_ids", "embeddings.position_ids"}
    eos = 49407 if config.text.vocab_size > 49407 else config.text.vocab_size - 1
    ids = torch.full((2, 77), eos)
    ids[0, :6] = torch.tensor([eos - 1, 320, 1125, 539, 320, 2368]) % config.text.vocab_size
    ids[1, :3] = torch.tensor([eos - 1, 42, 7])
    with torch.no_grad():
        assert max_rel_err(ours(ids), ref(ids).last_hidden_state) <= 1e-5


def test_sd14_parameter_counts_and_tensor_counts():
    nets = build_networks(SD14)  # meta device: shapes only
    counts = {name: (len(net.state_dict()), sum(p.numel() for p in net.parameters())) for name, net in nets.items()}
    assert counts == {"unet": (686, 859_520_964), "vae": (248, 83_653_863), "text": (196, 123_060_480)}


def test_sd14_names_and_shapes_equal_the_original_layout():
    nets = build_networks(SD14)
    unet, vae = nets["unet"].state_dict(), nets["vae"].state_dict()
    # Spot checks from the "Representative keys and shapes" table of docs/weights.md.
    table = {
        "input_blocks.1.1.proj_in.weight": (320, 320, 1, 1),
        "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 768),
        "input_blocks.1.1.transformer_blocks.0.ff.net.0.proj.weight": (2560, 320),
        "input_blocks.3.0.op.weight": (320, 320, 3, 3),
        "input_blocks.4.0.skip_connection.weight": (640, 320, 1, 1),
        "middle_block.1.transformer_blocks.0.ff.net.0.proj.weight": (10240, 1280),
        "output_blocks.2.1.conv.weight": (1280, 1280, 3, 3),
        "output_blocks.5.2.conv.weight": (1280, 1280, 3, 3),
        "output_blocks.8.2.conv.weight": (640, 640, 3, 3),
        "output_blocks.11.0.skip_connection.weight": (320, 640, 1, 1),
        "out.2.weight": (4, 320, 3, 3),
    }
    assert {k: tuple(unet[k].shape) for k in table} == table
    vae_table = {
        "encoder.down.0.downsample.conv.weight": (128, 128, 3, 3),
        "encoder.down.1.block.0.nin_shortcut.weight": (256, 128, 1, 1),
        "encoder.mid.attn_1.q.weight": (512, 512, 1, 1),
        "encoder.conv_out.weight": (8, 512, 3, 3),
        "decoder.up.3.upsample.conv.weight": (512, 512, 3, 3),
        "decoder.up.1.block.0.nin_shortcut.weight": (256, 512, 1, 1),
        "decoder.up.0.block.0.conv1.weight": (128, 256, 3, 3),
        "quant_conv.weight": (8, 8, 1, 1),
    }
    assert {k: tuple(vae[k].shape) for k in vae_table} == vae_table
    # Every key: diffusers' converter maps our full layout onto exactly diffusers' SD-1.4 keys.
    with torch.device("meta"):
        ref_unet, ref_vae = diffusers_unet(SD14.unet), diffusers_vae(SD14.vae)
        ref_text = transformers_clip(SD14.text)
    for ours, ref, convert in ((unet, ref_unet, to_diffusers_unet), (vae, ref_vae, to_diffusers_vae)):
        mapped = convert(ours, ref)
        assert {k: tuple(v.shape) for k, v in mapped.items()} == {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    text = to_transformers_clip(nets["text"].state_dict(), ref_text)
    assert {k: tuple(v.shape) for k, v in text.items()} == {k: tuple(v.shape) for k, v in ref_text.state_dict().items()}


def test_sd14_attention_sites():
    sites = build_networks(SD14)["unet"].attn_sites()
    assert len(sites) == 32 and sum(s.kind == "self" for s in sites) == 16
    blocks = [(s.index, s.place, s.level, s.heads, s.head_dim) for s in sites if s.kind == "cross"]
    expected = (
        [(i, "down", i // 2, 8, (40, 80, 160)[i // 2]) for i in range(6)]
        + [(6, "mid", 3, 8, 160)]
        + [(7 + i, "up", 2 - i // 3, 8, (160, 80, 40)[i // 3]) for i in range(9)]
    )
    assert blocks == expected


def full_size_pair(name: str, config: SDConfig = SD14):
    """One full-size network of ours and its diffusers twin, sharing random fp32 weights."""
    generator = torch.Generator().manual_seed(0)
    ours = build_networks(config)[name]
    ours.load_state_dict(random_state_dict(ours, generator, torch.float32), assign=True)
    with torch.device("meta"):
        ref = {"unet": diffusers_unet, "vae": diffusers_vae, "text": transformers_clip}[name](getattr(config, name))
    convert = {"unet": to_diffusers_unet, "vae": to_diffusers_vae, "text": to_transformers_clip}[name]
    mapped = convert(ours.state_dict(), ref)
    ref.load_state_dict(mapped, strict=False, assign=True)
    for buf_name, buf in list(ref.named_buffers()):
        assert buf_name.endswith("position_ids")
        owner = ref.get_submodule(buf_name.rsplit(".", 1)[0])
        owner.register_buffer("position_ids", torch.arange(77)[None], persistent=False)
    return ours.eval(), ref.eval()


def test_full_size_unet_forward_matches_diffusers():
    ours, ref = full_size_pair("unet")
    g = torch.Generator().manual_seed(3)
    x, context = torch.randn(1, 4, 16, 16, generator=g), torch.randn(1, 77, 768, generator=g)
    with torch.no_grad():
        assert max_rel_err(ours(x, 501, context), ref(x, 501, context).sample) <= 1e-5


def test_full_size_vae_matches_diffusers():
    ours, ref = full_size_pair("vae")
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(4)) * 2 - 1
    with torch.no_grad():
        assert max_rel_err(ours.encode(x).mean, ref.encode(x).latent_dist.mean) <= 1e-5
        z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5))
        assert max_rel_err(ours.decode(z), ref.decode(z).sample) <= 1e-5


def test_full_size_text_encoder_matches_transformers():
    ours, ref = full_size_pair("text")
    ids = torch.full((1, 77), 49407)
    ids[0, :7] = torch.tensor([49406, 320, 1125, 539, 320, 2368, 49407])
    with torch.no_grad():
        assert max_rel_err(ours(ids), ref(ids).last_hidden_state) <= 1e-5
