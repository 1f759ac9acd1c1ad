"""The SD-2.x networks (linear projections, 64-wide heads with per-level counts, 1024-wide context,
the OpenCLIP ViT-H/14 text tower with GELU read at its penultimate layer) compute what diffusers'
UNet2DConditionModel and transformers' CLIPTextModel compute, at full size here; the tiny SD-2
shapes (TINY_SD2, SD2_SHAPED) run in tests/test_networks.py's parity tests beside SD-1's.

Weights travel as there: our UNet state dict goes through diffusers' own single-file converter
(`convert_ldm_unet_checkpoint`) and loads strictly into the diffusers model, so a wrong name or
shape fails the load and a wrong computation fails the comparison. SD-2 keeps SD-1's VAE, whose
parity tests live in tests/test_networks.py (see the first test here).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from control.base import ControllerBase
from ldm.config import SD14, SD20_BASE, SD20_V, SD21_BASE, SD21_V, TINY, TINY_SD2, UNetConfig
from ldm.context import AttnContext, BatchLayout
from ldm.model import StableDiffusion, build_networks

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
from test_networks import (  # noqa: E402
    SD2_SHAPED,
    diffusers_unet,
    full_size_pair,
    max_rel_err,
    random_nets,
    to_diffusers_unet,
    to_transformers_clip,
    transformers_clip,
)

PAD = 0  # "!": SD-2's padding id


def sd2_ids(vocab_size: int) -> torch.Tensor:
    """Two prompts as SD-2 feeds them: BOS, content, EOS, then "!" padding to 77."""
    bos, eos = (49406, 49407) if vocab_size > 49407 else (vocab_size - 2, vocab_size - 1)
    ids = torch.full((2, 77), PAD)
    ids[0, :7] = torch.tensor([bos, 320, 1125, 539, 320, 2368, eos]) % vocab_size
    ids[1, :4] = torch.tensor([bos, 42, 7, eos])
    return ids


def test_sd2_presets_keep_the_sd1_vae_and_differ_only_where_sd2_does():
    """SD-2 uses SD-1's autoencoder unchanged, so the VAE parity tests of test_networks.py (TINY,
    and SD-1.4 at full size) are the SD-2 VAE's too."""
    for config in (SD20_BASE, SD20_V, SD21_BASE, SD21_V):
        assert config.vae == SD14.vae
    assert TINY_SD2.vae == TINY.vae
    changed = {f.name for f in dataclasses.fields(UNetConfig) if getattr(SD21_V.unet, f.name) != getattr(SD14.unet, f.name)}
    assert changed == {"num_heads", "context_dim", "use_linear_projection", "upcast_attention", "prediction_type"}
    assert SD21_V.unet.num_heads == (5, 10, 20, 20) and SD20_BASE.unet.prediction_type == "epsilon"
    assert (SD20_V.unet.prediction_type, SD20_V.unet.upcast_attention) == ("v_prediction", False)


def test_sd2_text_output_is_the_penultimate_layer_of_the_full_tower_then_the_final_norm():
    """What FrozenOpenCLIPEmbedder(layer="penultimate") computes: run the whole tower (one layer
    more than we build), take the hidden state entering its last layer, apply the final norm."""
    cfg = SD2_SHAPED.text
    ours = random_nets(SD2_SHAPED)["text"]
    full = transformers_clip(dataclasses.replace(cfg, num_layers=cfg.num_layers + 1)).eval()
    state = to_transformers_clip(ours.state_dict(), full)
    last = cfg.num_layers  # the layer SD-2 never reads: random weights of its own
    extra = {k: torch.randn(v.shape) for k, v in full.state_dict().items() if f"layers.{last}." in k}
    full.load_state_dict({**state, **extra}, strict=False)
    ids = sd2_ids(cfg.vocab_size)
    with torch.no_grad():
        hidden = full(ids, output_hidden_states=True).hidden_states
        assert len(hidden) == cfg.num_layers + 2  # embeddings + every layer's output
        norm = full.get_submodule(next(n for n, _ in full.named_modules() if n.endswith("final_layer_norm")))
        assert max_rel_err(ours(ids), norm(hidden[-2])) <= 1e-5
        assert max_rel_err(ours(ids), full(ids).last_hidden_state) > 1e-2  # the last layer matters


def test_sd21_networks_have_diffusers_names_shapes_and_parameter_counts():
    """Every key: diffusers' converter maps our SD-2.1 UNet onto exactly the keys and shapes of
    diffusers' SD-2.1 UNet; our text tower has transformers' ViT-H/14 (23 layers) keys and shapes."""
    nets = build_networks(SD21_V)  # meta device: shapes only
    with torch.device("meta"):
        ref_unet, ref_text = diffusers_unet(SD21_V.unet), transformers_clip(SD21_V.text)
    mapped = to_diffusers_unet(nets["unet"].state_dict(), ref_unet)
    ref_unet_shapes = {k: tuple(v.shape) for k, v in ref_unet.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in mapped.items()} == ref_unet_shapes
    text = to_transformers_clip(nets["text"].state_dict(), ref_text)
    ref_shapes = {k: tuple(v.shape) for k, v in ref_text.state_dict().items() if not k.endswith("position_ids")}
    assert {k: tuple(v.shape) for k, v in text.items()} == ref_shapes
    counts = {name: (len(net.state_dict()), sum(p.numel() for p in net.parameters())) for name, net in nets.items()}
    assert counts == {"unet": (686, 865_910_724), "vae": (248, 83_653_863), "text": (372, 340_387_840)}
    assert counts["unet"][1] == sum(p.numel() for p in ref_unet.parameters())
    assert counts["text"][1] == sum(p.numel() for p in ref_text.parameters())
    assert tuple(nets["unet"].state_dict()["input_blocks.1.1.proj_in.weight"].shape) == (320, 320)


def test_sd21_attention_sites_are_64_wide_with_per_level_head_counts():
    sites = build_networks(SD21_V)["unet"].attn_sites()
    assert len(sites) == 32 and {s.head_dim for s in sites} == {64}
    heads = [(s.place, s.level, s.heads) for s in sites if s.kind == "cross"]
    expected = [("down", i // 2, (5, 10, 20)[i // 2]) for i in range(6)] + [("mid", 3, 20)]
    expected += [("up", 2 - i // 3, (20, 10, 5)[i // 3]) for i in range(9)]
    assert heads == expected


class DtypeRecorder(ControllerBase):
    """Notes the dtype each attention layer hands on, then leaves the call to plain attention."""

    def __init__(self) -> None:
        super().__init__()
        self.dtypes: set[torch.dtype] = set()

    def attend(self, q, k, v, site, ctx):
        self.dtypes |= {q.dtype, k.dtype, v.dtype}
        return None


def test_upcast_attention_runs_an_fp16_models_attention_in_fp32():
    dtype = torch.float16
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    ref = StableDiffusion.tiny_random(seed=0, config=TINY_SD2)
    with torch.no_grad():
        expected = ref.unet(z, 501, ref.embed(["a cat", "a dog"]))
    seen = {}
    for upcast in (True, False):
        config = dataclasses.replace(TINY_SD2, unet=dataclasses.replace(TINY_SD2.unet, upcast_attention=upcast))
        sd = StableDiffusion.tiny_random(seed=0, dtype=dtype, config=config)
        recorder = DtypeRecorder()
        ctx = AttnContext(step=0, timestep=501, num_steps=1, layout=BatchLayout.cfg(("source",)), controllers=(recorder,))
        with torch.no_grad():
            out = sd.unet(z.to(dtype), 501, sd.embed(["a cat", "a dog"]), ctx)
        assert out.dtype == dtype
        seen[upcast] = recorder.dtypes
        if upcast:
            assert ((out.float() - expected).norm() / expected.norm()).item() < 5e-3
    assert seen == {True: {torch.float32}, False: {dtype}}


def test_full_size_sd21_unet_forward_matches_diffusers():
    ours, ref = full_size_pair("unet", SD21_V)
    g = torch.Generator().manual_seed(3)
    x, context = torch.randn(1, 4, 8, 16, generator=g), torch.randn(1, 77, 1024, generator=g)
    with torch.no_grad():
        assert max_rel_err(ours(x, 501, context), ref(x, 501, context).sample) <= 1e-5


def test_full_size_sd21_text_encoder_matches_transformers():
    ours, ref = full_size_pair("text", SD21_V)
    ids = sd2_ids(49408)[:1]
    with torch.no_grad():
        assert max_rel_err(ours(ids), ref(ids).last_hidden_state) <= 1e-5
