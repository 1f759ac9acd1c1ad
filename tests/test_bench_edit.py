"""The work of one edit, and `invedit bench edit`.

- A fused DirectInversion + P2P edit evaluates exactly 200 UNet rows at 50 steps (50 inversion
  rows, 3 editing rows per step: the source's unconditional row, whose prediction the pin discards,
  is not evaluated), counted by a counting wrapper around the UNet (the oracle), not read from the
  code's own bookkeeping alone; the methods that read that row keep it (MasaCtrl, proximal
  guidance: 250).
- No inversion builds a weight gradient, even when the caller's model has requires_grad on.
- The tensor tracker of `bench edit` counts what operators make and not views of older tensors
  (a weight seen through `w.t()`), against counts written by hand.
- Its peak RSS is the process's own (VmHWM, not the ru_maxrss a child inherits) and restarts at a
  reset, so the benchmark's peak is that of the timed edits.
- `bench edit` runs end to end on tests/data/tiny-sd (1 repeat, few steps) and writes its results
  file; its agreement check fails on a different edit, and its gate needs agreeing targets and our
  source on z0 whatever the baseline's source did. No timing is asserted.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

import cli
from benchmarks.edit_bench import LiveTensorBytes, agreement, edit_agreement, peak_rss_bytes, reset_peak_rss
from evaluation.api import edit, invert
from evaluation.images import load_image
from evaluation.registry import Registry
from ldm.model import StableDiffusion

IMAGE = Path(__file__).parent / "data" / "oracle" / "input.png"
SOURCE, TARGET = "a round cake on a plate", "a square cake on a plate"


class CountingUNet(nn.Module):
    """Counts the batch rows of every call to the wrapped UNet."""

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.inner, self.rows = unet, 0

    def forward(self, x, t, context, ctx=None):
        self.rows += x.shape[0]
        return self.inner(x, t, context, ctx)

    def attn_sites(self):
        return self.inner.attn_sites()

    def res_sites(self):
        return self.inner.res_sites()


def test_fused_direct_inversion_edit_is_200_unet_rows_at_50_steps():
    sd = StableDiffusion.tiny_random()
    counter = CountingUNet(sd.unet)
    sd.unet = counter
    spec = Registry().edit_spec("directinversion+p2p", source=SOURCE, target=TARGET, blend=("cake", "cake"), steps=50)
    result = edit(sd, load_image(str(IMAGE), 64), spec)
    assert counter.rows == 200
    assert result.unet_rows == {"inversion": 50, "edit": 150, "total": 200}


@pytest.mark.parametrize("name, options", [("directinversion+masactrl", {}), ("directinversion+p2p", {"prox": "l0"})])
def test_edits_that_read_the_source_uncond_row_keep_it(name, options):
    """MasaCtrl edits the unconditional rows too; proximal guidance thresholds over the whole batch."""
    sd = StableDiffusion.tiny_random()
    counter = CountingUNet(sd.unet)
    sd.unet = counter
    spec = Registry().edit_spec(name, source=SOURCE, target=TARGET, steps=10, **options)
    edit(sd, load_image(str(IMAGE), 64), spec)
    assert counter.rows == 10 + 40


@pytest.mark.parametrize("name", ["ddim", "direct", "negative-prompt", "null-text", "pix2pix-zero-inversion"])
def test_no_inversion_builds_weight_gradients(name):
    sd = StableDiffusion.tiny_random()
    sd.requires_grad_(True)  # a caller's model with gradients on: the inversion must still build none
    image = load_image(str(IMAGE), 64)
    inversion = invert(sd, image, Registry().inversion_spec(name, prompt=SOURCE, steps=3), target=TARGET)
    assert len(inversion.trajectory) == 4
    assert [n for n, p in sd.named_parameters() if p.grad is not None] == []


def test_bench_edit_runs_end_to_end_and_writes_its_results(tmp_path):
    code = cli.main(["bench", "edit", "--model", str(Path(__file__).parent / "data" / "tiny-sd"), "--size", "128",
                     "--steps", "4", "--warmup", "0", "--repeats", "1", "--bf16", "no", "--out", str(tmp_path)])
    result = json.loads((tmp_path / "edit-cpu.json").read_text())
    assert (tmp_path / "edit-cpu.json").with_suffix(".md").is_file()
    assert result["ours"]["rows"]["total"] == 4 + 3 * 4  # inversion + edit (no source uncond row)
    assert result["diffusers"]["rows"]["total"] == 4 + 2 * 4 + 4 * 4  # + the separate offset pass
    assert set(result["ours"]["stages_s"]) == {"encode", "inversion", "edit", "decode"}
    assert result["ours"]["memory"]["tracked_peak_tensor_bytes"] > 0
    assert code == (0 if result["agreement"]["agree"] else 1)
    assert result["agreement"]["agree"], result["agreement"]


def test_the_agreement_check_fails_on_a_different_edit():
    sd = StableDiffusion.tiny_random()
    image = load_image(str(IMAGE), 64)
    registry = Registry()
    one = edit(sd, image, registry.edit_spec("directinversion+p2p", source=SOURCE, target=TARGET, steps=4))
    again = edit(sd, image, registry.edit_spec("directinversion+p2p", source=SOURCE, target=TARGET, steps=4))
    other = edit(sd, image, registry.edit_spec("directinversion+p2p", source=SOURCE, target="a square cake on a table",
                                               steps=4), inversion=one.inversion)
    assert agreement(again.latents, one.latents)["agree"]
    verdict = agreement(other.latents, one.latents)
    assert not verdict["agree"] and verdict["rel_rms"][1] > verdict["tolerance"]
    assert verdict["rel_rms"][0] <= 1e-6  # the source branch is pinned to the same trajectory


def test_the_tensor_tracker_counts_what_operators_make_and_not_views_of_older_tensors():
    weight = torch.randn(256, 256)  # made before: 256 KiB that must not count, not even through a view
    with LiveTensorBytes() as tracker:
        view = weight.t()
        a = torch.ones(1000)  # 4000 bytes
        b = a * 2  # 4000 more: the peak, 8000
        del a
        c = b + view[0, :1000].sum()  # 4000 again with a freed: live 8000 (+ the 4-byte sum, freed)
        del b, c
    assert tracker.peak == 8000 + 4
    assert tracker.live == 0


def test_the_gate_needs_agreeing_targets_and_our_source_on_z0_whatever_the_baselines_source():
    z0 = torch.randn(1, 4, 8, 8)
    target = torch.randn(1, 4, 8, 8)
    ours = torch.cat([z0, target])
    drifted = torch.cat([z0 + 5 * torch.randn_like(z0), target * (1 + 1e-4)])  # a baseline whose source drifted
    verdict = edit_agreement(ours, drifted, z0)
    assert verdict["agree"]
    assert verdict["source_from_z0"]["ours"] == 0.0 and verdict["source_from_z0"]["diffusers"] > 1
    assert not edit_agreement(torch.cat([z0 * 1.1, target]), drifted, z0)["agree"]  # our source off z0
    assert not edit_agreement(torch.cat([z0, target + 1]), drifted, z0)["agree"]  # another edit


def test_the_peak_rss_counts_from_the_reset_and_sees_a_new_allocation():
    """Linux only (VmHWM, clear_refs); the reset makes the benchmark's peak that of the timed edits."""
    if not Path("/proc/self/status").is_file() or not reset_peak_rss():
        pytest.skip("no /proc peak-RSS reset on this system")
    before = peak_rss_bytes()
    block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
    assert peak_rss_bytes() >= before + 60 * 2**20
    del block
    reset_peak_rss()
    assert peak_rss_bytes() < before + 60 * 2**20  # the freed block no longer counts
