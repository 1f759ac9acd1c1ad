"""Controllers vs naive re-implementations written here from the reference code's behaviour
(docs/methods.md), in the references' own structure: probabilities materialised (B*heads, N, M), the batch split with chunk / halves, layers
and steps found by counting attention calls (P2P, MasaCtrl) or by timestep membership and module
names (PnP), LocalBlend from the "down_cross[2:4] + up_cross[:3]" store lists. Both run a few steps
of the same loop on a small SD-shaped UNet (attention at three levels, like SD-1.4; q/k weights
doubled so that attention is peaked and borrowed maps matter) at latent 16, i.e. 128 px; the
references' 512-px token thresholds are scaled with the latent (32*32 -> 8*8, 16x16 maps -> 4x4),
which is the rule our level-based selection states.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from control.base import StepWindow
from control.masactrl import MutualSelfAttention
from control.p2p import P2PSettings, make_p2p
from control.pnp import PlugAndPlay
from control.words import cross_replace_schedule, equalizer, refinement_mapper, replacement_mapper, word_positions
from ldm.config import TINY, SDConfig, UNetConfig
from ldm.context import BatchLayout, Row
from ldm.model import StableDiffusion
from samplers.loop import denoise
from samplers.prox import Proximal
from samplers.schedule import Schedule
from samplers.inversion import Inversion

STEPS = 6
LATENT = 16
SOURCE = "a round cake with orange frosting on a wooden plate"
TARGET = "a square cake with orange frosting on a wooden plate"


@pytest.fixture(scope="module")
def sd() -> StableDiffusion:
    cfg = SDConfig(
        unet=UNetConfig(block_out_channels=(32, 32, 64, 64), attention_levels=(True, True, True, False),
                        num_heads=(2, 2, 2, 2), context_dim=32),
        vae=TINY.vae, text=TINY.text,
    )
    model = StableDiffusion.tiny_random(seed=0, config=cfg)
    with torch.no_grad():  # peaked attention, so that borrowing maps makes a visible difference
        for name, p in model.unet.named_parameters():
            if name.endswith(("to_q.weight", "to_k.weight")):
                p.mul_(2.0)
    return model


@pytest.fixture(scope="module")
def z_T() -> torch.Tensor:
    return torch.randn(1, 4, LATENT, LATENT, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def plain(sd, z_T) -> torch.Tensor:
    """The uncontrolled run of the P2P prompts."""
    return run(sd, z_T, (SOURCE, TARGET), None)


def run(sd, z_T, prompts, controller, layout=None, **kw) -> torch.Tensor:
    layout = layout or BatchLayout.cfg()
    emb = {Row("source", "uncond"): sd.embed([""]), Row("target", "uncond"): sd.embed([""]),
           Row("source", "cond"): sd.embed([prompts[0]]), Row("target", "cond"): sd.embed([prompts[1]])}
    emb.update(kw.pop("emb", {}))
    controllers = () if controller is None else (controller,)
    return denoise(sd, layout, emb, z_T=z_T, controllers=controllers, steps=STEPS, **kw).latents


def n_calls(sd) -> int:
    return len(sd.unet.attn_sites())


# ---------------------------------------------------------------- naive references (reference structure)


def to_ref(x):  # (B, h, N, d) -> (B*h, N, d), the references' "(batch heads)" layout
    return x.reshape(-1, *x.shape[2:])


def softmax_attn(q, k):
    return (torch.einsum("bid,bjd->bij", q, k) * q.shape[-1] ** -0.5).softmax(-1)


class RefP2P:
    """AttentionStore + AttentionControlEdit + (Refine | Replace) [+ Reweight] + LocalBlend, by counting."""

    def __init__(self, calls_per_step, cross_fn, cross_alpha, self_steps, max_tokens, blend=None):
        self.calls_per_step, self.cross_fn, self.cross_alpha = calls_per_step, cross_fn, cross_alpha
        self.self_steps, self.max_tokens, self.blend = self_steps, max_tokens, blend
        self.cur_call = self.cur_step = self.counter = 0
        self.step_store = {"down_cross": [], "mid_cross": [], "up_cross": []}
        self.store = {}

    def attend(self, q, k, v, site, ctx):
        b, h = q.shape[:2]
        attn = softmax_attn(to_ref(q), to_ref(k))
        is_cross = site.kind == "cross"
        half = attn[attn.shape[0] // 2:]  # only the conditional half is controlled
        attn[attn.shape[0] // 2:] = self.forward(half, is_cross, site.place)
        self.cur_call += 1
        if self.cur_call == self.calls_per_step:
            self.cur_call, self.cur_step = 0, self.cur_step + 1
            self.between_steps()
        out = torch.einsum("bij,bjd->bid", attn, to_ref(v))
        return out.reshape(b, h, *out.shape[1:])

    def forward(self, attn, is_cross, place):
        if is_cross and attn.shape[1] <= self.max_tokens:
            self.step_store[f"{place}_cross"].append(attn)  # a view: holds the post-edit map
        s0, s1 = self.self_steps
        if is_cross or s0 <= self.cur_step < s1:
            a = attn.reshape(2, attn.shape[0] // 2, *attn.shape[1:])
            base, rep = a[0], a[1:]
            if is_cross:
                w = self.cross_alpha[self.cur_step]
                a[1:] = self.cross_fn(base, rep) * w + (1 - w) * rep
            elif rep.shape[2] <= self.max_tokens:
                a[1:] = base.unsqueeze(0)
        return attn

    def between_steps(self):
        if not self.store:
            self.store = self.step_store
        else:
            for key in self.store:
                for i in range(len(self.store[key])):
                    self.store[key][i] += self.step_store[key][i]
        self.step_store = {"down_cross": [], "mid_cross": [], "up_cross": []}

    def end_step(self, ctx, x):
        if self.blend is None:
            return x
        alpha_layers, start, side = self.blend
        self.counter += 1
        if self.counter <= start:
            return x
        maps = self.store["down_cross"][2:4] + self.store["up_cross"][:3]
        maps = torch.cat([m.reshape(2, -1, 1, side, side, 77) for m in maps], dim=1)
        m = (maps * alpha_layers.reshape(2, 1, 1, 1, 1, 77)).sum(-1).mean(1)
        m = F.max_pool2d(m, (3, 3), (1, 1), padding=(1, 1))
        m = F.interpolate(m, size=x.shape[2:])
        m = m / m.max(2, keepdim=True)[0].max(3, keepdim=True)[0]
        mask = m.gt(0.3)
        mask = (mask[:1] + mask).float()
        return x[:1] + mask * (x - x[:1])

    def features(self, h, site, ctx):
        return h

    def begin_step(self, ctx):
        pass

    def start(self, run):
        pass


def ref_refine(mapper, alphas):
    def fn(base, rep):
        return base[:, :, mapper[None]].permute(2, 0, 1, 3) * alphas + rep * (1 - alphas)
    return fn


def ref_reweight(eq, inner):
    def fn(base, rep):
        return inner(base, rep)[None] * eq[None, None, None, None, :]
    return fn


def ref_replace(m):
    return lambda base, rep: torch.einsum("hpw,bwn->bhpn", base, m[None])


class RefMasa:
    """MutualSelfAttentionControl: layer = call // 2, tgt queries of each CFG half on the src K/V."""

    def __init__(self, calls_per_step, start_step, start_layer, total_steps=50, total_layers=16):
        self.calls_per_step = calls_per_step
        self.steps, self.layers = range(start_step, total_steps), range(start_layer, total_layers)
        self.cur_call = self.cur_step = 0

    def attend(self, q, k, v, site, ctx):
        b, h, n, d = q.shape
        qr, kr, vr = to_ref(q), to_ref(k), to_ref(v)
        if site.kind == "cross" or self.cur_step not in self.steps or self.cur_call // 2 not in self.layers:
            out = torch.einsum("bij,bjd->bid", softmax_attn(qr, kr), vr).reshape(b, h, n, d)
        else:
            halves = []
            for qh, kh, vh in zip(qr.chunk(2), kr.chunk(2), vr.chunk(2)):
                qq = qh.reshape(-1, h, n, d).permute(1, 0, 2, 3).reshape(h, -1, d)  # h (b n) d
                a = (torch.einsum("hid,hjd->hij", qq, kh[:h]) * d ** -0.5).softmax(-1)
                o = torch.einsum("hij,hjd->hid", a, vh[:h])
                halves.append(o.reshape(h, -1, n, d).permute(1, 0, 2, 3))
            out = torch.cat(halves)
        self.cur_call += 1
        if self.cur_call == self.calls_per_step:
            self.cur_call, self.cur_step = 0, self.cur_step + 1
        return out

    def features(self, h, site, ctx):
        return h

    def begin_step(self, ctx):
        pass

    def end_step(self, ctx, x):
        return x

    def start(self, run):
        pass


class RefPnP:
    """pnp_utils: batch [source, uncond, cond]; modules picked by name, steps by timestep membership."""

    ATTN = {1: [1, 2], 2: [0, 1, 2], 3: [0, 1, 2]}  # up_blocks[i].attentions[j] of SD-1.x

    def __init__(self, timesteps, qk_t=0.5, conv_t=0.8):
        self.qk_ts = timesteps[: int(len(timesteps) * qk_t)]
        self.conv_ts = timesteps[: int(len(timesteps) * conv_t)]

    def attend(self, q, k, v, site, ctx):
        parts = site.name.split(".")
        if site.kind == "self" and parts[0] == "output_blocks" and ctx.timestep in self.qk_ts:
            block = int(parts[1])  # CompVis output_blocks.k = diffusers up_blocks[k // 3], item k % 3
            if block % 3 in self.ATTN.get(block // 3, []):
                q, k = q.clone(), k.clone()
                q[1], q[2], k[1], k[2] = q[0], q[0], k[0], k[0]
        b, h, n, d = q.shape
        return torch.einsum("bij,bjd->bid", softmax_attn(to_ref(q), to_ref(k)), to_ref(v)).reshape(b, h, n, d)

    def features(self, h, site, ctx):
        if site.name == "output_blocks.4.0" and ctx.timestep in self.conv_ts:  # up_blocks[1].resnets[1]
            h = h.clone()
            h[1], h[2] = h[0], h[0]
        return h

    def begin_step(self, ctx):
        pass

    def end_step(self, ctx, x):
        return x

    def start(self, run):
        pass


def rel(a, b) -> float:
    return float((a - b).norm() / b.norm())


# ---------------------------------------------------------------- equivalence with the naive references


@pytest.mark.parametrize("blend", [True, False])
def test_p2p_refine_equals_naive_reference(sd, z_T, plain, blend):
    tok = sd.tokenizer
    settings = P2PSettings(blend=("cake", "cake") if blend else None)
    ours = make_p2p(tok, SOURCE, TARGET, STEPS, settings)
    mapper, alphas = refinement_mapper(tok, SOURCE, TARGET)
    fn = ref_refine(mapper, alphas)
    lb = None
    if blend:
        fn = ref_reweight(equalizer(tok, TARGET, {"cake": 2.0}), fn)
        cols = torch.zeros(2, 77)
        cols[0, word_positions(tok, SOURCE, "cake")] = 1
        cols[1, word_positions(tok, TARGET, "cake")] = 1
        lb = (cols, int(0.2 * STEPS), LATENT // 4)
    ref = RefP2P(n_calls(sd), fn, cross_replace_schedule(tok, TARGET, STEPS, 0.4), (0, int(0.6 * STEPS)),
                 (LATENT // 2) ** 2, lb)
    a = run(sd, z_T, (SOURCE, TARGET), ours)
    b = run(sd, z_T, (SOURCE, TARGET), ref)
    assert rel(a, b) < 1e-4
    assert rel(a[1], plain[1]) > 1e-2  # the edit did something
    assert torch.equal(a[0], plain[0])  # the source branch is never edited


def test_p2p_replace_equals_naive_reference(sd, z_T):
    tok = sd.tokenizer
    src, tgt = "a photo of a cat on grass", "a photo of a tiramisu on grass"
    ours = make_p2p(tok, src, tgt, STEPS, P2PSettings(replace=True, cross=0.8, self_=0.5))
    ref = RefP2P(n_calls(sd), ref_replace(replacement_mapper(tok, src, tgt)),
                 cross_replace_schedule(tok, tgt, STEPS, 0.8), (0, int(0.5 * STEPS)), (LATENT // 2) ** 2)
    a, b = run(sd, z_T, (src, tgt), ours), run(sd, z_T, (src, tgt), ref)
    assert rel(a, b) < 1e-4


def test_masactrl_equals_naive_reference(sd, z_T):
    ours = MutualSelfAttention(start_step=2, start_layer=10)
    ref = RefMasa(n_calls(sd), start_step=2, start_layer=10)
    prompts = ("", TARGET)
    a, b = run(sd, z_T, prompts, ours), run(sd, z_T, prompts, ref)
    plain = run(sd, z_T, prompts, None)
    assert rel(a, b) < 1e-4
    assert rel(a[1], plain[1]) > 1e-2
    assert ours.sites_touched == 6  # self-attention of blocks 10..15


def pnp_setup(sd, z_T):
    layout = BatchLayout((Row("reference", "cond"), Row("target", "uncond"), Row("target", "cond")))
    traj = [torch.randn(1, 4, LATENT, LATENT, generator=torch.Generator().manual_seed(10 + i)) for i in range(STEPS + 1)]
    inv = Inversion("test", tuple(traj))
    emb = {Row("reference", "cond"): sd.embed([""]), Row("target", "uncond"): sd.embed(["ugly, blurry"]),
           Row("target", "cond"): sd.embed([TARGET])}
    return layout, inv, emb


def test_pnp_equals_naive_reference(sd, z_T):
    layout, inv, emb = pnp_setup(sd, z_T)
    ours = PlugAndPlay(sd.unet.attn_sites(), sd.unet.res_sites(), STEPS)
    ref = RefPnP(list(Schedule(steps=STEPS).timesteps))
    a = denoise(sd, layout, emb, inversion=inv, controllers=(ours,)).latents
    b = denoise(sd, layout, emb, inversion=inv, controllers=(ref,)).latents
    plain = denoise(sd, layout, emb, inversion=inv).latents
    assert rel(a, b) < 1e-4
    assert rel(a, plain) > 1e-2
    assert ours.sites_touched == 8 + 1  # self-attention of decoder blocks 8..15, one ResBlock


# ---------------------------------------------------------------- no-op controllers are exact


def test_controllers_that_edit_nothing_reproduce_the_uncontrolled_run_bit_for_bit(sd, z_T, plain):
    idle_p2p = make_p2p(sd.tokenizer, SOURCE, TARGET, STEPS, P2PSettings(cross=0.0, self_=0.0))
    assert torch.equal(run(sd, z_T, (SOURCE, TARGET), idle_p2p), plain)
    assert torch.equal(run(sd, z_T, (SOURCE, TARGET), MutualSelfAttention(start_step=STEPS)), plain)
    assert idle_p2p.sites_touched == 0
    layout, inv, emb = pnp_setup(sd, z_T)
    idle_pnp = PlugAndPlay(sd.unet.attn_sites(), sd.unet.res_sites(), STEPS, feature_frac=0.0, attn_frac=0.0)
    a = denoise(sd, layout, emb, inversion=inv, controllers=(idle_pnp,)).latents
    b = denoise(sd, layout, emb, inversion=inv).latents
    assert torch.equal(a, b)


def test_p2p_reports_the_sites_it_edits(sd, z_T):
    p2p = make_p2p(sd.tokenizer, SOURCE, TARGET, STEPS, P2PSettings())
    run(sd, z_T, (SOURCE, TARGET), p2p)
    sites = sd.unet.attn_sites()
    expected = sum(s.kind == "cross" or s.level >= 1 for s in sites)  # level 0 (64x64 at 512 px) keeps its self map
    assert p2p.sites_touched == expected == 16 + 11


def test_a_controller_reused_for_a_second_run_starts_clean(sd, z_T):
    """The loop starts every controller before step 0: LocalBlend's accumulated maps and the site
    report of the first run do not leak into the second."""
    reused = make_p2p(sd.tokenizer, SOURCE, TARGET, STEPS, P2PSettings(blend=("cake", "cake")))
    first = run(sd, z_T, (SOURCE, TARGET), reused)
    touched = set(reused.touched)
    second = run(sd, z_T, (SOURCE, TARGET), reused)
    assert torch.equal(first, second) and reused.touched == touched


def test_step_window_bounds():
    assert StepWindow.of(0.6, 50) == StepWindow(0, 30)
    assert 29 in StepWindow.of(0.6, 50) and 30 not in StepWindow.of(0.6, 50)
    assert StepWindow.of((0.2, 0.5), 50) == StepWindow(10, 25)


# ---------------------------------------------------------------- proximal guidance


def naive_prox(u, c, scale, q, mode):
    d = (c - u).flatten().tolist()
    mags = sorted(abs(x) for x in d)
    pos = q * (len(mags) - 1)  # linear interpolation between order statistics
    lo = int(pos)
    tau = mags[lo] + (pos - lo) * (mags[min(lo + 1, len(mags) - 1)] - mags[lo])
    out = []
    for x in d:
        y = x - min(max(x, -tau), tau)
        if mode == "l1":
            y = y - tau if y > 0 else y
            y = y + tau if y < 0 else y
        out.append(y)
    return u + scale * torch.tensor(out).reshape(u.shape)


@pytest.mark.parametrize("mode", ["l0", "l1"])
def test_proximal_guidance_equals_naive(mode):
    g = torch.Generator().manual_seed(3)
    u, c = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    ours = Proximal(7.5, 0.75, mode).combine(u, c)
    assert torch.allclose(ours, naive_prox(u, c, 7.5, 0.75, mode), atol=1e-5)
    d = (ours - u) / 7.5
    assert float((d == 0).float().mean()) >= 0.74  # three quarters of the direction dropped
