"""DPT self-correction on the tiny pipeline: exactness at eta = 0, trajectories, both readings."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from interp.tasks.self_correction import Trajectory, generate_self_corrected
from models.sampling import generate_images
from models.training import dpt as tdpt


@pytest.fixture(scope="module")
def adapter(tiny_pipe):
    torch.manual_seed(0)
    return tdpt.new_adapter(tiny_pipe, ("up_blocks.1",), width=32, heads=2, ff=64, n_queries=6, n_match=2,
                            sem_dim=8, dropout=0.0).eval()


@pytest.mark.parametrize("reading", ["noise_only", "latent"])
def test_eta_zero_is_the_plain_sampler(tiny_pipe, adapter, reading):
    """eta = 0 gives exactly models.sampling's image for the same seed."""
    [plain] = generate_images(tiny_pipe, ["a red circle"], [7], steps=4, guidance=3.0)
    img, traj = generate_self_corrected(tiny_pipe, "a red circle", seed=7, eta=0.0, steps=4, guidance=3.0,
                                        reading=reading, adapter=adapter)
    assert np.array_equal(np.asarray(plain), np.asarray(img))
    assert traj.unet_calls == 4 and traj.unet_backwards == 0 and np.isnan(traj.s_before).all()


def test_correction_changes_the_image_and_records(tiny_pipe, adapter):
    """eta > 0 records s before / after, gradient norms and maps, previews; the readings differ."""
    kw = dict(seed=3, eta=50.0, steps=3, guidance=3.0, adapter=adapter, step_range=(1, None))
    img_a, ta = generate_self_corrected(tiny_pipe, "two red circles", reading="noise_only", **kw)
    img_b, tb = generate_self_corrected(tiny_pipe, "two red circles", reading="latent", **kw)
    [plain] = generate_images(tiny_pipe, ["two red circles"], [3], steps=3, guidance=3.0)
    assert not np.array_equal(np.asarray(img_a), np.asarray(plain))
    assert not np.array_equal(np.asarray(img_a), np.asarray(img_b))
    assert np.isnan(ta.s_before[0]) and not np.isnan(ta.s_before[1]) and not np.isnan(ta.s_after[2])
    assert ta.grad_map.shape == (3, 16, 16) and ta.grad_map[1].sum() > 0 and ta.grad_map[0].sum() == 0
    assert ta.previews.shape == (3, 64, 64, 3) and ta.previews.dtype == np.uint8
    assert ta.latent_change[1] == pytest.approx(50.0 * ta.grad_norm[1], rel=1e-5)
    assert ta.unet_calls == 3 + 2 * 2 and ta.unet_backwards == 2


def test_small_step_raises_s(tiny_pipe, adapter):
    """With a small eta (a step of 1e-2 / |grad|) the score after the correction is above the score before."""
    kw = dict(seed=1, steps=2, guidance=3.0, adapter=adapter, reading="latent", step_range=(1, None))
    _, probe = generate_self_corrected(tiny_pipe, "a red circle", eta=1e-6, **kw)
    eta = 1e-2 / probe.grad_norm[1]
    _, tr = generate_self_corrected(tiny_pipe, "a red circle", eta=eta, **kw)
    assert tr.grad_norm[1] == pytest.approx(probe.grad_norm[1], rel=1e-4)
    assert tr.s_after[1] > tr.s_before[1]


def test_trajectory_round_trip(tiny_pipe, adapter, tmp_path):
    """A trajectory saves to safetensors + JSON and loads back identically (NaNs included)."""
    _, tr = generate_self_corrected(tiny_pipe, "a red circle", seed=2, eta=1.0, steps=3, guidance=3.0,
                                    adapter=adapter, step_range=(1, 2))
    back = Trajectory.load(tr.save(tmp_path / "traj"))
    assert back == tr
    assert np.isnan(back.s_before[0]) and back.grad_map.dtype == np.float32


def test_bad_reading(tiny_pipe, adapter):
    with pytest.raises(ValueError, match="unknown reading"):
        generate_self_corrected(tiny_pipe, "a red circle", eta=0.1, steps=2, reading="both", adapter=adapter)


def test_contrast_objective_is_the_log_softmax_and_rises(tiny_pipe, adapter):
    """objective "contrast": the recorded value is log p(y | z_t) among y and the world's negatives (the
    log-softmax of the adapter's scores at its temperature, checked against itm_scores_at); a small step raises it;
    the trajectory keeps the negatives and saves them."""
    kw = dict(seed=1, steps=2, guidance=3.0, adapter=adapter, reading="latent", step_range=(1, None),
              objective="contrast")
    _, probe = generate_self_corrected(tiny_pipe, "two red circles", eta=1e-6, **kw)
    assert probe.negatives == ["three red circles", "two orange circles", "two red triangles"]
    assert probe.objective == "contrast" and probe.s_before[1] < 0  # a log-probability
    eta = 1e-2 / probe.grad_norm[1]
    _, tr = generate_self_corrected(tiny_pipe, "two red circles", eta=eta, **kw)
    assert tr.s_after[1] > tr.s_before[1]
    # the same value by hand on a latent: log_softmax(scale * s)[0]
    z = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        s = tdpt.itm_scores_at(tiny_pipe, adapter, z, ["two red circles", *probe.negatives], 300)
        lp, s0 = tdpt.itm_contrast_at(tiny_pipe, adapter, z, "two red circles", probe.negatives, 300)
    want = torch.log_softmax(s * adapter.logit_scale.exp(), 0)[0]
    assert float(lp.detach()) == pytest.approx(float(want.detach()), abs=1e-5)
    assert float(s0.detach()) == pytest.approx(float(s[0].detach()), abs=1e-6)


def test_contrast_needs_negatives_and_a_known_objective(tiny_pipe, adapter):
    """A prompt outside the world's grammar needs explicit negatives (given ones are used); unknown objective."""
    with pytest.raises(ValueError, match="not a shapes-world caption"):
        generate_self_corrected(tiny_pipe, "a photo of a dog", eta=0.1, steps=2, adapter=adapter,
                                objective="contrast")
    _, tr = generate_self_corrected(tiny_pipe, "a red circle", eta=0.1, steps=2, adapter=adapter,
                                    objective="contrast", negatives=["a blue circle"], previews=False)
    assert tr.negatives == ["a blue circle"] and not np.isnan(tr.s_before[0])
    with pytest.raises(ValueError, match="unknown objective"):
        generate_self_corrected(tiny_pipe, "a red circle", eta=0.1, steps=2, adapter=adapter, objective="clip")


def test_x0_read_is_the_score_of_the_predicted_x0_and_rises(tiny_pipe, adapter):
    """read "x0": the recorded value is the adapter's score of the step's guided x0 prediction (noised at the
    adapter's t with noise seed 0; checked by hand), a small step raises it, a correction costs 2 UNet calls and 2
    backwards, eta = 0 is still the plain sampler, and the trajectory keeps `read` through save / load."""
    from interp.tasks.self_correction import _x0

    kw = dict(seed=1, steps=2, guidance=3.0, adapter=adapter, reading="latent", step_range=(1, None), read="x0",
              previews=False)
    _, probe = generate_self_corrected(tiny_pipe, "two red circles", eta=1e-6, **kw)
    assert probe.read == "x0" and probe.unet_calls == 2 + 2 + 2 and probe.unet_backwards == 2
    eta = 1e-2 / probe.grad_norm[1]
    _, tr = generate_self_corrected(tiny_pipe, "two red circles", eta=eta, **kw)
    assert tr.s_after[1] > tr.s_before[1]
    # by hand: step 0 plain, then the x0 prediction at step 1 and its score
    sched = tiny_pipe.scheduler
    sched.set_timesteps(2)
    t0, t1 = [int(t) for t in sched.timesteps]
    pe, ne = tiny_pipe.encode_prompt("two red circles", "cpu", 1, True, None)
    emb = torch.cat([ne, pe])
    z = tiny_pipe.prepare_latents(1, 4, 64, 64, emb.dtype, "cpu", [torch.Generator("cpu").manual_seed(1)], None)

    def guided(z, t):
        u, c = tiny_pipe.unet(torch.cat([z] * 2), t, encoder_hidden_states=emb, return_dict=False)[0].chunk(2)
        return u + 3.0 * (c - u)

    with torch.no_grad():
        z = sched.step(guided(z, t0), t0, z, return_dict=False)[0]
        s = tdpt.itm_scores(tiny_pipe, adapter, _x0(tiny_pipe, z, guided(z, t1), t1), ["two red circles"])
    assert probe.s_before[1] == pytest.approx(float(s[0]), abs=1e-4)
    [plain] = generate_images(tiny_pipe, ["two red circles"], [1], steps=2, guidance=3.0)
    img, _ = generate_self_corrected(tiny_pipe, "two red circles", **{**kw, "eta": 0.0})
    assert np.array_equal(np.asarray(plain), np.asarray(img))
    with pytest.raises(ValueError, match="unknown read"):
        generate_self_corrected(tiny_pipe, "a red circle", eta=0.1, steps=2, adapter=adapter, read="x1")


def test_best_of_seeds_start_at_the_plain_seed_and_stay_in_range():
    from interp.tasks.self_correction import best_of_seeds

    assert best_of_seeds(5, 3) == [5, 1_000_008, 2_000_011]
    assert best_of_seeds(2**32 - 1, 2) == [2**32 - 1, 1_000_002] and len(set(best_of_seeds(0, 8))) == 8
