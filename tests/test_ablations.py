"""The reference runner's ablation rows (docs/methods/direct-inversion.md "Ablations",
docs/methods/null-text.md "Ablations"): each name resolves to settings of an existing method, and
each setting moves the result the way the ablation means it to. Tiny-sd weights at 64 px, 10 steps,
guidance 7.5: one module fixture holds the DDIM pass every case starts from."""

from __future__ import annotations

import pytest
import torch

from evaluation.images import encode, load_image
from evaluation.registry import Registry
from inversion.ddim import invert_ddim
from inversion.direct import DirectSettings, invert_direct, offsets
from inversion.method import InversionTask
from inversion.null_text import NullTextSettings, applied, invert_null_text
from ldm.context import BatchLayout
from ldm.errors import UsageError
from samplers.ddim import ddim_inverse_step, ddim_step
from samplers.loop import denoise
from samplers.schedule import Schedule
from tests.determinism import one_thread
from tests.oracle_fixtures import ORACLE, SOURCE, TARGET

STEPS = 10
W = 7.5


@pytest.fixture(scope="module")
def case(oracle_sd):
    z0 = encode(oracle_sd, load_image(ORACLE / "input.png", 64))  # (1, 4, 8, 8)
    null, src, tgt = oracle_sd.embed(["", SOURCE, TARGET]).split(1)
    task = InversionTask(z0, src, null, Schedule(STEPS), W, target=tgt)
    shared = task.with_trajectory(invert_ddim(oracle_sd, task).trajectory)
    return {"sd": oracle_sd, "z0": z0, "null": null, "src": src, "tgt": tgt, "task": task, "shared": shared}


def reconstruct(case, inversion, scale=W):
    c = torch.cat([case["null"], case["src"]])
    return denoise(case["sd"], BatchLayout.cfg(("source",)), c, inversion=inversion, guidance=scale).latents


def edit(case, inversion, scale=W):
    """[source, target] after a plain edit (no controller): the target sees only the inversion."""
    c = torch.cat([case["null"], case["null"], case["src"], case["tgt"]])
    return denoise(case["sd"], BatchLayout.cfg(), c, inversion=inversion, guidance=scale).latents


def dist(a, b) -> float:
    return float(((a - b) ** 2).mean().sqrt())


@pytest.mark.parametrize("name, inversion, settings, run", [
    ("directinversion+p2p_guidance_0_1", "direct", {"inversion_guidance": 0.0}, {"guidance": 1.0}),
    ("directinversion+p2p_guidance_25_75", "direct", {"inversion_guidance": 2.5}, {"guidance": 7.5}),
    ("directinversion+p2p_guidance_75_5", "direct", {"inversion_guidance": 7.5}, {"guidance": 5.0}),
    ("ablation_directinversion_04+p2p", "direct", {"offset_scale": 0.4}, {}),
    ("ablation_directinversion_08+p2p", "direct", {"offset_scale": 0.8}, {}),
    ("ablation_directinversion_interval_2+p2p", "direct", {"interval": 2}, {}),
    ("ablation_directinversion_interval_49+p2p", "direct", {"interval": 49}, {}),
    ("ablation_directinversion_add-target+p2p", "direct", {"target_offset": "target", "form": "offset"}, {}),
    ("ablation_directinversion_add-source+p2p", "direct", {"target_offset": "source", "form": "offset"}, {}),
    ("ablation_null-text-inversion_single_branch+p2p", "null-text", {"apply": "source"}, {}),
    ("ablation_null-latent-inversion+p2p", "null-text", {"apply": "source-offset"}, {}),
])
def test_reference_ablation_names_resolve_to_settings(name, inversion, settings, run) -> None:
    spec = Registry().edit_spec(name, source="a cat", target="a dog")
    assert spec.inversion.name == inversion and spec.method.name == "p2p"
    defaults = spec.inversion.settings().as_dict()
    assert spec.inversion_settings.as_dict() == {**defaults, **settings}
    assert spec.guidance == run.get("guidance", 7.5)


def test_target_offsets_need_the_offset_form() -> None:
    with pytest.raises(UsageError, match="--direct-form offset"):
        DirectSettings(target_offset="target")


def test_scaled_and_interval_offsets_match_the_reference_loop(case) -> None:
    """`offsets` against the reference's offset_calculate_not_full / _skip_step transcribed here:
    d = scale (L[-2-i] - z_rec), zeroed when i % s != 0, and the pass continues from z_rec + d."""
    sd, task = case["sd"], case["shared"]
    traj = task.trajectory
    scale, interval = 0.8, 3
    context = torch.cat([case["null"], case["null"], case["src"], case["tgt"]])
    z = torch.cat([traj[-1], traj[-1]])  # [src, tgt]
    expected = []
    with torch.no_grad():
        for i, t in enumerate(task.schedule.timesteps):
            e = sd.unet(torch.cat([z, z]), torch.tensor(t), context).float()
            e_u, e_c = e.chunk(2)
            z_rec = ddim_step(z, e_u + W * (e_c - e_u), t, task.schedule)
            d = (traj[-2 - i] - z_rec) * scale if i % interval == 0 else torch.zeros_like(z_rec)
            expected.append(d)
            z = z_rec + d
    weights = DirectSettings(offset_scale=scale, interval=interval).weights(STEPS)
    source, target = offsets(sd, task, traj, weights)
    for i in range(STEPS):
        torch.testing.assert_close(source[i], expected[i][:1], rtol=0, atol=1e-5)
        torch.testing.assert_close(target[i], expected[i][1:], rtol=0, atol=1e-5)


@pytest.mark.parametrize("values", [{"offset_scale": 0.4}, {"interval": 3}])
def test_fused_and_offset_forms_agree_on_the_scaled_ablations(case, values) -> None:
    outs = [edit(case, invert_direct(case["sd"], case["shared"], DirectSettings(form=form, **values)))
            for form in ("fused", "offset")]
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=1e-4)


def test_weaker_offsets_leave_the_source_further_from_the_photo(case) -> None:
    """Offset scale 1 > 0.8 > 0.4, and interval 1 < 2 < 49: the less the source is corrected, the
    further its reconstruction ends from z0 (at 10 steps, interval 49 corrects step 0 only)."""
    z0 = case["z0"]

    def err(**values) -> float:
        return dist(reconstruct(case, invert_direct(case["sd"], case["shared"], DirectSettings(**values))), z0)

    by_scale = [err(offset_scale=s) for s in (1.0, 0.8, 0.4)]
    by_interval = [err(interval=s) for s in (1, 2, 49)]
    assert by_scale[0] < 1e-4 and by_interval[0] < 1e-4
    assert by_scale[0] < by_scale[1] < by_scale[2], by_scale
    assert by_interval[0] < by_interval[1] < by_interval[2], by_interval


def test_inversion_guidance_inverts_under_cfg_and_the_source_stays_pinned(case) -> None:
    """Inversion guidance 0 inverts with E("") alone, 1 is the plain (conditional) trajectory; at
    any inversion guidance the pinned source still reconstructs the photo."""
    sd, task = case["sd"], case["task"]
    plain = invert_direct(sd, task, DirectSettings())
    assert plain.cost.unet_rows == STEPS
    z = case["z0"]
    with torch.no_grad():
        for t in reversed(task.schedule.timesteps):  # the inversion under E("") alone, transcribed
            z = ddim_inverse_step(z, sd.unet(z, torch.tensor(t), case["null"]).float(), t, task.schedule)
    for i_scale in (0.0, 2.5):
        inv = invert_direct(sd, case["shared"], DirectSettings(inversion_guidance=i_scale))
        assert inv.cost.unet_rows == 2 * STEPS  # the shared plain trajectory is not used
        assert dist(inv.z_T, plain.z_T) > 1e-2
        if i_scale == 0.0:
            torch.testing.assert_close(inv.z_T, z, rtol=0, atol=1e-4)
        for f in (1.0, 5.0):
            assert dist(reconstruct(case, inv, f), case["z0"]) < 1e-4


def test_target_offsets_move_the_target(case) -> None:
    """add-target adds the target's own offset (recorded from the pivot under the target prompt),
    add-source the source's. Both leave the source pinned and change the target; add-target pins
    the target to the trajectory too, which undoes the edit."""
    sd, task = case["sd"], case["shared"]
    default = edit(case, invert_direct(sd, task, DirectSettings(form="offset")))
    outs = {k: edit(case, invert_direct(sd, task, DirectSettings(form="offset", target_offset=k)))
            for k in ("target", "source")}
    for k, out in outs.items():
        torch.testing.assert_close(out[0], default[0], rtol=0, atol=1e-5)
        assert dist(out[1], default[1]) > 1e-2, k
    # the target's own offsets were recorded from the pivot in the edit's batch: without a
    # controller they pin the target onto the source's trajectory (measured 0.0; add-source 0.93,
    # the default 1.27 apart)
    assert dist(outs["target"][1], outs["target"][0]) < 1e-5
    assert dist(outs["source"][1], outs["source"][0]) > 1e-2


@pytest.fixture(scope="module")
def null_texts(case):
    """Three Adam rounds per step are enough to move U[i] away from E(""); the single-branch form
    applies the default's embeddings (the same optimisation) to the source row only."""
    sd, task = case["sd"], case["shared"]
    with one_thread():  # the two optimisations are compared bit for bit (tests/determinism.py)
        both = invert_null_text(sd, task, NullTextSettings(inner_steps=3))
        latent = invert_null_text(sd, task, NullTextSettings(inner_steps=3, apply="source-offset"))
    return {"both": both, "source": applied(both, NullTextSettings(apply="source")), "source-offset": latent}


def test_single_branch_null_text_keeps_the_source_and_frees_the_target(case, null_texts) -> None:
    both, single = edit(case, null_texts["both"]), edit(case, null_texts["source"])
    torch.testing.assert_close(single[0], both[0], rtol=0, atol=1e-5)  # the same U on the source
    assert dist(single[1], both[1]) > 1e-2  # the target is guided by E("") instead
    # without a controller the target sees nothing of U: the DDIM edit's target, from the same z_T
    ddim = edit(case, invert_ddim(case["sd"], case["shared"]))
    torch.testing.assert_close(single[1], ddim[1], rtol=0, atol=1e-5)


def test_null_latent_offsets_are_what_the_optimised_nulls_change(case, null_texts) -> None:
    """The null-latent ablation (the reference's null_latent_calculate) transcribed here: along the
    reconstruction the optimised U[i] make, D[i] = z_{i+1} - ddim_step(z_i, CFG(E(""), E(src))).
    Its edit keeps E("") on every row, so the target is the single-branch target; the source
    follows the same trajectory by offsets (the two differ by rounding, which an unpinned
    guidance-7.5 trajectory amplifies, as the reference's own null-text rows do)."""
    sd, task = case["sd"], case["shared"]
    latent, single = null_texts["source-offset"], null_texts["source"]
    z, sched = task.trajectory[-1], task.schedule
    with torch.no_grad(), one_thread():  # as the fixture's inversions ran
        for i, t in enumerate(sched.timesteps):
            def step(u):
                e_u, e_c = sd.unet(torch.cat([z, z]), torch.tensor(t), torch.cat([u, case["src"]])).float().chunk(2)
                return ddim_step(z, e_u + W * (e_c - e_u), t, sched)
            z_next = step(latent.null_embeddings[i])
            torch.testing.assert_close(latent.corrections.values[i], z_next - step(case["null"]), rtol=0, atol=1e-5)
            z = z_next
    for a, b in zip(latent.null_embeddings, single.null_embeddings):
        assert torch.equal(a, b)  # the same optimisation
    edits = edit(case, latent), edit(case, single)
    torch.testing.assert_close(edits[0][1], edits[1][1], rtol=0, atol=1e-5)
    assert latent.cost.unet_rows == single.cost.unet_rows + 2 * STEPS
    assert single.null_roles == ("source",) and null_texts["both"].null_roles is None
    assert not latent.exact_source and latent.corrections.kind == "offset"
    ddim_err = dist(reconstruct(case, invert_ddim(case["sd"], case["shared"])), case["z0"])
    errs = [dist(reconstruct(case, inv), case["z0"]) for inv in (latent, single)]
    print("null-latent / single-branch / DDIM reconstruction RMS:", errs, ddim_err,
          "source rows apart:", dist(edits[0][0], edits[1][0]))
    assert max(errs) < ddim_err
