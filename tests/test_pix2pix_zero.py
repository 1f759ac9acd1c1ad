"""pix2pix-zero (control/pix2pix_zero.py, control/cross_guidance.py, control/caption.py) on the tiny
random model, against a naive transcription of the reference's two denoising passes written here
(pix2pixzero/pix2pix-zero `edit_pipeline.py` as cure-lab/PnPInversion runs it: batch-2 CFG with the
caption as negative prompt, the maps of every cross-attention layer, SGD on both CFG rows, the
uncond row's latent stepped, DirectInversion's offsets added to the edit), with diffusers'
DDIMScheduler for the steps.

- pix2pix-zero's own inversion (inversion/pix2pix_zero.py): its noise regularisation and its
  shifted inverse steps equal transcriptions of the reference's, and the reference's pair names
  resolve to it (pinned for directinversion+pix2pix-zero);
- both reference pairs (ddim+, directinversion+pix2pix-zero) equal the transcription;
- guidance amount 0 is, bit for bit, the plain edit of the same direction;
- identical prompts give a zero direction, and the edit then is the reconstruction, bit for bit;
- with guidance the edited branch's cross-attention maps are closer to the reconstruction's;
- every UNet call that builds a graph has batch 1; no parameter gets a gradient; a second edit
  gives the same result;
- sentence files give the mean of per-sentence embeddings; BLIP captions (a tiny random BLIP built
  here) are transformers' beam search with LAVIS' prompt, and become the inverted prompt;
- the command line writes the edit with its cost; bad files and a missing captioner are one line.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler

import cli
from control.caption import Captioner
from control.cross_guidance import sentence_direction
from evaluation.api import edit, plan_edit
from evaluation.images import load_image, to_tensor
from evaluation.registry import Registry
from inversion.pix2pix_zero import Pix2PixZeroInversionSettings, regularize_noise
from ldm.context import AttnContext, BatchLayout, Row
from ldm.errors import WeightsError
from ldm.model import StableDiffusion
from samplers.loop import denoise
from samplers.schedule import Schedule
from tests.determinism import one_thread
from tests.oracle_fixtures import ORACLE

SRC = "a round cake with orange frosting on a wooden plate"
TGT = "a square cake with orange frosting on a wooden plate"
STEPS, GUIDANCE, AMOUNT = 4, 7.5, 0.1  # AMOUNT: the reference's guidance amount
REGISTRY = Registry()


@pytest.fixture(scope="module")
def sd() -> StableDiffusion:
    return StableDiffusion.tiny_random(seed=0)


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    """128 px: at 64 px the tiny UNet's 1x1 middle level normalises groups of two numbers, whose
    near-zero variances make the guidance gradient spike, and rounding then decides the edit."""
    return load_image(ORACLE / "input.png", 128)


@pytest.fixture(scope="module")
def small() -> np.ndarray:
    return load_image(ORACLE / "input.png", 64)


def spec(name: str = "ddim+pix2pix-zero", target: str = TGT, **values):
    return REGISTRY.edit_spec(name, source=SRC, target=target, steps=STEPS, guidance=GUIDANCE,
                              **{"xa_guidance": AMOUNT, **values})


class Maps:
    """Naive cross-attention maps of every call: softmax(Q K^T / sqrt(d)) per site, (B, heads, N, 77)."""

    def __init__(self) -> None:
        self.maps: dict[int, torch.Tensor] = {}
        self.calls: list[dict[int, torch.Tensor]] = []

    def start(self, run) -> None:
        self.calls = []

    def begin_step(self, ctx) -> None:
        self.maps = {}
        self.calls.append(self.maps)

    def attend(self, q, k, v, site, ctx):
        if site.kind == "cross":
            self.maps[site.index] = (q.float() @ k.float().transpose(-1, -2) * q.shape[-1] ** -0.5).softmax(-1)
        return None

    def features(self, h, site, ctx):
        return h

    def end_step(self, ctx, latents):
        return latents


def unet(sd, x, t, context, maps: Maps | None = None):
    if maps is not None:
        maps.begin_step(None)
    layout = BatchLayout.cfg(("target",))
    return sd.unet(x, t, context, AttnContext(0, int(t), STEPS, layout, (maps,) if maps is not None else ()))


def naive(sd, trajectory, cap, direction, amount, latent_list=None):
    """The reference's EditingPipeline.__call__, transcribed: returns (reconstruction, edit)."""
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1)
    sched.set_timesteps(STEPS)
    prompt = torch.cat([cap, cap])
    latents, reference, offsets = trajectory[-1], [], []
    with torch.no_grad():
        for i, t in enumerate(sched.timesteps):
            maps = Maps()
            e_u, e_c = unet(sd, torch.cat([latents] * 2), t, prompt, maps).chunk(2)
            reference.append(maps.maps)
            latents = sched.step(e_u + GUIDANCE * (e_c - e_u), t, latents).prev_sample
            if latent_list is not None:
                offsets.append(latent_list[-2 - i] - latents)
                latents = latents + offsets[-1]
    reconstruction = latents
    prompt_edit = prompt.clone()
    prompt_edit[1:2] += direction
    latents = trajectory[-1]
    for i, t in enumerate(sched.timesteps):
        x_in = torch.cat([latents] * 2).detach().clone().requires_grad_(True)
        maps = Maps()
        unet(sd, x_in, t, prompt_edit, maps)
        loss = 0.0
        for s, ref in reference[i].items():
            curr = maps.maps[s].flatten(0, 1)  # (2 * heads, N, 77)
            loss = loss + ((curr - ref.flatten(0, 1)) ** 2).sum((1, 2)).mean(0)
        loss.backward()
        with torch.no_grad():
            x_in -= amount * x_in.grad  # SGD, lr = guidance amount
            e_u, e_c = unet(sd, x_in, t, prompt_edit).chunk(2)
            latents = sched.step(e_u + GUIDANCE * (e_c - e_u), t, x_in[0:1]).prev_sample
            if latent_list is not None:
                latents = latents + offsets[i]
    return reconstruction, latents


def embeddings(sd):
    """E(caption) as the edit reads it (one text-encoder call over "", the prompts) and the direction
    as the hook computes it (one call over the distinct sentences)."""
    cap = sd.embed(["", SRC, TGT])[1:2]
    src, tgt = sd.embed([SRC, TGT]).split(1)
    return cap, tgt - src


@pytest.mark.parametrize("name", ["ddim+pix2pix-zero", "directinversion+pix2pix-zero"])
def test_both_reference_pairs_equal_a_naive_transcription_of_the_reference(sd, image, name) -> None:
    result = edit(sd, image, spec(name))
    trajectory = result.inversion.trajectory
    cap, direction = embeddings(sd)
    latent_list = trajectory if name.startswith("directinversion") else None
    rec, edited = naive(sd, trajectory, cap, direction, AMOUNT, latent_list)
    torch.testing.assert_close(result.latents[0:1], rec, rtol=1e-4, atol=1e-4)
    # batch-1 gradients round unlike the reference's batch-2 ones: measured 8e-5 to 1.3e-4
    torch.testing.assert_close(result.latents[1:2], edited, rtol=1e-3, atol=1e-3)
    unguided = naive(sd, trajectory, cap, direction, 0.0, latent_list)[1]
    assert float((edited - unguided).abs().max()) > 0.1  # the guidance did something
    if latent_list is not None:  # DirectInversion's reconstruction is the inverted latent
        torch.testing.assert_close(result.latents[0:1], trajectory[0], rtol=0, atol=1e-5)
    assert result.unet_rows == {"inversion": STEPS, "prepare": 2 * STEPS, "edit": STEPS * (2 + 3),
                                "total": STEPS * 8}
    assert len(result.sites) == len([s for s in sd.unet.attn_sites() if s.kind == "cross"])  # the maps it steers by


def transcribed_autocorrelation(x, rng):
    """The reference's DDIMInversion.auto_corr_loss, random_shift=True."""
    x = x.squeeze(0)
    reg_loss = 0.0
    for ch_idx in range(x.shape[0]):
        noise = x[ch_idx][None, None, :, :]
        while True:
            roll_amount = rng.randrange(noise.shape[2] // 2)
            reg_loss += (noise * torch.roll(noise, shifts=roll_amount, dims=2)).mean() ** 2
            reg_loss += (noise * torch.roll(noise, shifts=roll_amount, dims=3)).mean() ** 2
            if noise.shape[2] <= 8:
                break
            noise = torch.nn.functional.avg_pool2d(noise, kernel_size=2)
    return reg_loss


def test_the_noise_regularisation_is_the_references(sd) -> None:
    eps = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(0))  # three pyramid levels
    rng = random.Random(1234)
    e_t = eps.clone()
    for _ in range(5):
        for _ in range(5):
            var = e_t.detach().clone().requires_grad_(True)
            transcribed_autocorrelation(var, rng).backward()
            e_t = e_t - 20.0 * var.grad.detach() / 5
        var = e_t.detach().clone().requires_grad_(True)
        (var.var() + var.mean() ** 2 - 1 - torch.log(var.var() + 1e-7)).backward()
        e_t = (e_t - 20.0 * var.grad.detach()).detach()
    mine = regularize_noise(eps, Pix2PixZeroInversionSettings(), random.Random(1234))
    torch.testing.assert_close(mine, e_t, rtol=1e-5, atol=1e-6)
    assert float((mine - eps).abs().max()) > 1e-3


def test_the_inverse_steps_read_the_references_shifted_alpha_bars(sd, small) -> None:
    """With the regularisers off, L[k+1] = eq. 12 from ab[t-1] to ab[t+19] (ab[999] at the end)."""
    plain = Pix2PixZeroInversionSettings(ac_weight=0.0, kl_weight=0.0, latent="mean")
    result = edit(sd, small, REGISTRY.edit_spec(inversion="pix2pix-zero-inversion", method="pix2pix-zero", source=SRC,
                                                target=TGT, steps=STEPS, xa_guidance=0.0, **plain.as_dict()))
    ab = Schedule().alphas_cumprod
    cap = sd.embed(["", SRC, TGT])[1:2]
    z, want = result.z0, [result.z0]
    with torch.no_grad():
        for t in (1, 251, 501, 751):
            e = sd.unet(z, t, cap)
            a_t, a_next = ab[t - 1], ab[t + 249] if t + 250 <= 1000 else ab[999]
            z = a_next.sqrt() * (z - (1 - a_t).sqrt() * e) / a_t.sqrt() + (1 - a_next).sqrt() * e
            want.append(z)
    for got, expected in zip(result.inversion.trajectory, want):
        # the loop's UNet call and this one round apart by up to 2e-5 on some CPUs (1.7e-5 measured);
        # reading ab[t] instead of ab[t-1] makes sqrt(1 - ab) 40 % larger at t = 1
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    sampled = edit(sd, small, spec(xa_guidance=0.0)).inversion.trajectory[0]  # the reference's posterior sample
    with torch.no_grad():
        posterior = sd.vae.encode(to_tensor(small))
        noise = torch.randn(posterior.mean.shape, generator=torch.Generator().manual_seed(1234))
    torch.testing.assert_close(sampled, (posterior.mean + (0.5 * posterior.logvar).exp() * noise) * 0.18215)
    pinned = REGISTRY.pair("directinversion+pix2pix-zero")
    assert pinned.inversion.settings == {"direct": True} and REGISTRY.pair("ddim+pix2pix-zero").inversion.settings == {}


def test_guidance_zero_is_the_plain_edit_of_the_direction_bit_for_bit(sd, small) -> None:
    result = edit(sd, small, spec(xa_guidance=0.0))
    cap, direction = embeddings(sd)
    plain = denoise(sd, BatchLayout.cfg(("target",)), torch.cat([cap, cap + direction]), inversion=result.inversion,
                    guidance=GUIDANCE)
    assert torch.equal(result.latents[1:2], plain.latents)


def test_identical_prompts_give_a_zero_direction_and_the_reconstruction_bit_for_bit(sd, small) -> None:
    assert torch.equal(sentence_direction(sd, [SRC], [SRC]), torch.zeros(1, 77, 32))
    for name in ("ddim+pix2pix-zero", "directinversion+pix2pix-zero"):
        result = edit(sd, small, spec(name, target=SRC))
        assert torch.equal(result.latents[1], result.latents[0]), name


def test_guidance_pulls_the_edited_maps_toward_the_reconstructions(sd, image) -> None:
    """Sum over steps and sites of ||M_edit - M_rec||^2 at the loop's own UNet calls, maps measured here."""
    cap, _ = embeddings(sd)
    texts = torch.cat([cap, cap])
    inversion = edit(sd, image, spec(xa_guidance=0.0)).inversion
    rec = Maps()
    denoise(sd, BatchLayout.cfg(("source",)), texts, z_T=inversion.z_T, steps=STEPS, controllers=(rec,), guidance=GUIDANCE)
    distances = []
    for amount in (0.0, AMOUNT, 1.0):
        plan = plan_edit(sd, spec(xa_guidance=amount))
        edited = Maps()
        denoise(sd, plan.layout, texts, inversion=plan.prepare(sd, inversion, {SRC: cap}, False), controllers=(edited,),
                hooks=plan.hooks, guidance=GUIDANCE)
        distances.append(sum(float((e[k] - r[k]).pow(2).sum()) for e, r in zip(edited.calls, rec.calls) for k in e))
    # measured 17.17, 16.71, 14.71; larger steps overshoot on the tiny model (3: 20.4)
    assert distances[2] < 0.9 * distances[0] and distances[1] < distances[0], distances


class SpyUNet(torch.nn.Module):
    """The UNet, recording the batch size of every call that builds an autograd graph."""

    def __init__(self, inner) -> None:
        super().__init__()
        self.inner = inner
        self.config = inner.config
        self.graph_batches: list[int] = []

    def attn_sites(self):
        return self.inner.attn_sites()

    def res_sites(self):
        return self.inner.res_sites()

    def forward(self, x, t, context, ctx=None):
        if torch.is_grad_enabled() and x.requires_grad:
            self.graph_batches.append(x.shape[0])
        return self.inner(x, t, context, ctx)


def test_backward_passes_run_at_batch_1_no_parameter_gets_a_gradient_and_a_second_edit_agrees(sd, small) -> None:
    spy = StableDiffusion(sd.config, SpyUNet(sd.unet), sd.vae, sd.text, sd.tokenizer)
    with one_thread():  # compared bit for bit (tests/determinism.py)
        first = edit(spy, small, spec("directinversion+pix2pix-zero"))
        assert spy.unet.graph_batches == [1] * (2 * STEPS)  # two CFG rows, one at a time, every step
        second = edit(spy, small, spec("directinversion+pix2pix-zero"))
        checkpointed = edit(sd, small, spec("directinversion+pix2pix-zero", xa_checkpoint=True))
    assert torch.equal(first.latents, second.latents)
    assert all(p.grad is None for p in sd.parameters())
    torch.testing.assert_close(checkpointed.latents, first.latents, rtol=1e-5, atol=1e-5)


def test_sentence_files_give_the_mean_of_each_sentences_embedding(sd, tmp_path) -> None:
    cats, dogs = tmp_path / "cats.txt", tmp_path / "dogs.txt"
    cats.write_text("a cat on a sofa\n\na cat  sleeping\n")
    dogs.write_text("a dog on a sofa\na dog sleeping\na small dog\n")
    s = spec(source_sentences=str(cats), target_sentences=str(dogs), xa_guidance=0.0)
    direction = plan_edit(sd, s).hooks[0]
    with torch.no_grad():
        mine = sentence_direction(sd, direction.source, direction.target)
        each = [sd.embed([line])[0] for line in ("a cat on a sofa", "a cat sleeping")]  # one call per sentence
        want = (torch.stack([sd.embed([d])[0] for d in ("a dog on a sofa", "a dog sleeping", "a small dog")]).mean(0)
                - torch.stack(each).mean(0))[None]
    torch.testing.assert_close(mine, want, rtol=1e-5, atol=1e-5)
    assert direction.source == ("a cat on a sofa", "a cat sleeping")


@pytest.fixture(scope="module")
def blip_dir(tmp_path_factory) -> Path:
    """A random BLIP captioner, 32 px input, with a 25-word BERT vocabulary."""
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipProcessor

    try:
        from transformers import BlipImageProcessorPil as ImageProcessor
    except ImportError:
        from transformers import BlipImageProcessor as ImageProcessor
    path = tmp_path_factory.mktemp("blip")
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", "a", "picture", "of", "cake", "round", "square",
             "plate", "wooden", "orange", "on", "with", "the", "table", "red", "cat", "dog", "sitting", "white", "small"]
    (path / "vocab.txt").write_text("\n".join(words) + "\n")
    torch.manual_seed(0)
    text = dict(vocab_size=len(words), hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                encoder_hidden_size=32, pad_token_id=0, bos_token_id=5, sep_token_id=3, eos_token_id=3,
                max_position_embeddings=64)
    vision = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                  patch_size=8)
    BlipForConditionalGeneration(BlipConfig(text_config=text, vision_config=vision, projection_dim=32)).save_pretrained(path)
    tokenizer = BertTokenizer(str(path / "vocab.txt"), bos_token="[DEC]")
    BlipProcessor(image_processor=ImageProcessor(size={"height": 32, "width": 32}), tokenizer=tokenizer).save_pretrained(path)
    return path


def test_the_blip_caption_is_lavis_beam_search_and_becomes_the_inverted_prompt(sd, small, blip_dir) -> None:
    from transformers import BlipForConditionalGeneration, BlipProcessor

    image = small
    caption = Captioner.load(str(blip_dir))(image)
    model, processor = BlipForConditionalGeneration.from_pretrained(blip_dir), BlipProcessor.from_pretrained(blip_dir)
    pixels = processor(images=image, return_tensors="pt").pixel_values
    prompt = torch.tensor([[5, 6, 7, 8]])  # [DEC] a picture of: LAVIS' primed decoder, no [SEP]
    with torch.no_grad():
        ids = model.vision_model(pixel_values=pixels)[0]
        out = model.text_decoder.generate(input_ids=prompt, encoder_hidden_states=ids, num_beams=3, min_length=10,
                                          max_length=30, eos_token_id=3, pad_token_id=0, repetition_penalty=1.0)
    want = processor.decode(out[0], skip_special_tokens=True)[len("a picture of "):]
    assert caption == " ".join(want.split()) and caption
    result = edit(sd, image, spec(captioner=str(blip_dir), xa_guidance=0.0))
    assert result.inversion_prompt == caption and result.spec.method_settings.caption == caption
    with pytest.raises(WeightsError, match="--captioner"):
        Captioner.load(str(blip_dir.parent / "no-blip-here"))


def test_the_command_line_writes_the_edit_and_its_cost(tmp_path) -> None:
    out = tmp_path / "out"
    argv = ["edit", "--model", "tiny-random", "--image", str(ORACLE / "input.png"), "--size", "64", "--steps", "3",
            "--source", SRC, "--target", TGT, "--method", "directinversion+pix2pix-zero", "--xa-guidance", "0.5",
            "--caption", "a round cake on a plate", "--no-progress", "-o", str(out)]
    assert cli.main(argv) == 0
    run = json.loads((out / "run.json").read_text())
    assert run["spec"]["method"] == "pix2pix-zero" and run["spec"]["method_settings"]["xa_guidance"] == 0.5
    assert run["metrics"]["unet_rows"] == {"inversion": 3, "prepare": 6, "edit": 15, "total": 24}
    assert (out / "edited.png").is_file() and (out / "grid.png").is_file()


BAD = {
    "sentence file missing": (["--source-sentences", "/nonexistent/cats.txt"], "--source-sentences /nonexistent/cats.txt"),
    "caption and captioner": (["--caption", "a cake", "--captioner", "/x"], "--caption or --captioner, not both"),
    "captioner missing": (["--captioner", "/nonexistent/blip"], "--captioner"),
    "null-text inversion": (["--inversion", "null-text"], "works with --inversion pix2pix-zero-inversion or ddim or direct"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line_exit_2(tmp_path, capsys, case) -> None:
    extra, message = BAD[case]
    argv = ["edit", "--model", "tiny-random", "--image", str(ORACLE / "input.png"), "--size", "64", "--steps", "2",
            "--source", SRC, "--target", TGT, "--control", "pix2pix-zero", "--no-progress", "-o", str(tmp_path / "o")]
    assert cli.main(argv + extra) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "o").exists()
