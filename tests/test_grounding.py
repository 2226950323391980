"""Grounding metrics: single-map scores, word masks, the per-slice table, aggregates, ranking, the token loss."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from interp.grounding import (DEFAULT_THRESHOLDS, aggregate_maps, best_iou, energy_inside, grounding_table,
                              pointing_game, rank_slices, score_maps, summarize, word_mask_pairs)
from interp.heatmaps import layer_maps, token_heatmaps
from models.shapes import world
from models.trace import AttentionTrace, LayerInfo, trace

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def _scene(caption: str, seed: int = 0) -> world.Scene:
    return world.scene_from_caption(caption, np.random.default_rng(seed))


def _binary(mask: np.ndarray) -> np.ndarray:
    return (mask > 0.5).astype(np.float32)


@pytest.fixture(scope="module")
def mask() -> np.ndarray:
    """A soft 64x64 mask of one big object."""
    s = world.Scene("single", (world.Obj("red", "circle", "big", (10.0, 14.0, 30.0, 34.0)),), "a red circle")
    return world.object_masks(s)[0]


class TestPointingGame:
    def test_perfect_map_points_inside(self, mask):
        """A map equal to the mask has its argmax inside it."""
        assert pointing_game(_binary(mask), mask) is True

    def test_peak_outside_fails(self, mask):
        """A map peaked on a pixel outside the mask fails."""
        m = np.full_like(mask, 0.1)
        ys, xs = np.nonzero(mask <= 0.5)
        m[ys[0], xs[0]] = 1.0
        assert pointing_game(m, mask) is False

    def test_low_resolution_map_is_resized(self, mask):
        """A 16x16 map peaked on a cell whose 4x4 block lies inside the mask points inside."""
        block = _binary(mask).reshape(16, 4, 16, 4).min((1, 3))
        cy, cx = map(int, np.argwhere(block == 1)[0])
        m = np.zeros((16, 16), np.float32)
        m[cy, cx] = 1.0
        assert pointing_game(m, mask) is True
        assert pointing_game(m, 1 - _binary(mask)) is False


class TestEnergyInside:
    def test_perfect_map_has_all_energy_inside(self, mask):
        """A map equal to the (binary) mask has energy 1."""
        assert energy_inside(_binary(mask), mask) == pytest.approx(1.0)

    def test_uniform_map_gives_area_fraction(self, mask):
        """A uniform map's energy is the binarised mask's area fraction, at any map resolution."""
        area = float((mask > 0.5).mean())
        assert energy_inside(np.ones_like(mask), mask) == pytest.approx(area, abs=1e-6)
        assert energy_inside(np.full((8, 8), 3.0), mask) == pytest.approx(area, abs=1e-6)

    def test_map_outside_has_no_energy_inside(self, mask):
        """A map that lies entirely outside the mask has energy 0."""
        assert energy_inside(1 - _binary(mask), mask) == pytest.approx(0.0)

    def test_empty_map_scores_zero(self, mask):
        """A map with no mass has energy 0 rather than NaN."""
        assert energy_inside(np.zeros_like(mask), mask) == 0.0


class TestBestIou:
    def test_perfect_map_has_iou_one(self, mask):
        """A map equal to the (binary) mask has IoU 1."""
        iou, thr = best_iou(_binary(mask), mask)
        assert iou == pytest.approx(1.0) and thr in DEFAULT_THRESHOLDS

    def test_threshold_search_finds_the_level_that_excludes_a_halo(self, mask):
        """Mask at 1 and a halo at 0.6: only thresholds above 0.6 give IoU 1; below, |mask| / |mask + halo|."""
        inside = _binary(mask).astype(bool)
        halo = (F.max_pool2d(torch.from_numpy(inside[None].astype(np.float32)), 7, 1, 3)[0].numpy() > 0) & ~inside
        m = np.where(inside, 1.0, np.where(halo, 0.6, 0.0)).astype(np.float32)
        iou, thr = best_iou(m, mask)
        assert iou == pytest.approx(1.0) and thr == min(t for t in DEFAULT_THRESHOLDS if t > 0.6)
        low, low_thr = best_iou(m, mask, thresholds=(0.2, 0.4))
        assert low == pytest.approx(inside.sum() / (inside | halo).sum()) and low_thr == 0.2

    def test_matches_brute_force_search(self, mask):
        """The one-pass search equals a per-threshold loop on a smooth random map."""
        rng = np.random.default_rng(0)
        m = F.interpolate(torch.from_numpy(rng.random((1, 1, 8, 8), np.float32)), size=(64, 64), mode="bilinear")[0, 0]
        n = ((m - m.min()) / (m.max() - m.min())).numpy()
        b = mask > 0.5
        ious = [((n >= t) & b).sum() / ((n >= t) | b).sum() for t in DEFAULT_THRESHOLDS]
        iou, thr = best_iou(m, mask)
        assert iou == pytest.approx(max(ious), abs=1e-6)
        assert thr == DEFAULT_THRESHOLDS[int(np.argmax(ious))]

    def test_constant_map_predicts_nothing(self, mask):
        """A constant map has IoU 0 (its normalised map is all zeros)."""
        assert best_iou(np.ones_like(mask), mask)[0] == 0.0


class TestWordMaskPairs:
    def test_single(self):
        """'a red circle': color and shape words get the object's mask; 'a' is left out."""
        s = _scene("a red circle")
        pairs = word_mask_pairs(s)
        obj = world.object_masks(s)[0]
        assert [(i, w, c) for i, w, c, _ in pairs] == [(1, "red", "color"), (2, "circle", "shape")]
        assert all(np.array_equal(m, obj) for *_, m in pairs)

    def test_single_with_size_word(self):
        """'a small red circle': the size word gets the object's mask too."""
        s = _scene("a small red circle")
        pairs = word_mask_pairs(s)
        assert [(i, c) for i, _, c, _ in pairs] == [(1, "size"), (2, "color"), (3, "shape")]
        assert all(np.array_equal(m, world.object_masks(s)[0]) for *_, m in pairs)

    def test_relation(self):
        """'a red circle left of a blue square': each phrase's words get their own object; relation words nothing."""
        s = _scene("a red circle left of a blue square")
        pairs = word_mask_pairs(s)
        objs = world.object_masks(s)
        assert [(i, w) for i, w, _, _ in pairs] == [(1, "red"), (2, "circle"), (6, "blue"), (7, "square")]
        for i, _, _, m in pairs:
            assert np.array_equal(m, objs[0 if i < 3 else 1])
        assert not np.array_equal(objs[0], objs[1])

    def test_count(self):
        """'three green triangles': number, color and plural shape all get the union of the objects."""
        s = _scene("three green triangles")
        pairs = word_mask_pairs(s)
        objs = world.object_masks(s)
        assert [(i, c) for i, _, c, _ in pairs] == [(0, "count"), (1, "color"), (2, "shape")]
        for *_, m in pairs:
            assert np.array_equal(m, objs.max(0))
            assert (m > 0.5).sum() > max((o > 0.5).sum() for o in objs)

    def test_mask_size_follows_argument(self):
        """Masks come at the requested resolution."""
        assert {m.shape for *_, m in word_mask_pairs(_scene("two red circles"), size=32)} == {(32, 32)}


# ------------------------------------------------------------------------------------------------
# Traces: one from the tiny pipeline, and hand-made ones with known maps
# ------------------------------------------------------------------------------------------------
TINY_CAPTION = "a red circle left of a blue square"
TINY_STEPS = (800, 500, 200)


@pytest.fixture(scope="module")
def tiny(tiny_pipe):
    """(trace, scene) of direct UNet calls at three timesteps on a noised latent of the scene's render."""
    scene = _scene(TINY_CAPTION)
    image = torch.from_numpy(np.asarray(world.render(scene), np.float32)).permute(2, 0, 1)[None] / 127.5 - 1
    tok = tiny_pipe.tokenizer([TINY_CAPTION], padding="max_length", max_length=tiny_pipe.tokenizer.model_max_length,
                              return_tensors="pt")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        latent = tiny_pipe.vae.encode(image).latent_dist.mean * tiny_pipe.vae.config.scaling_factor
        emb = tiny_pipe.text_encoder(tok.input_ids)[0]
        with trace(tiny_pipe, prompts=[TINY_CAPTION]) as t:
            for step in TINY_STEPS:
                ts = torch.tensor([step])
                noised = tiny_pipe.scheduler.add_noise(latent, torch.randn(latent.shape, generator=g), ts)
                tiny_pipe.unet(noised, ts, encoder_hidden_states=emb)
    return t.trace, scene


def _synthetic(scene: world.Scene, heads: list[int] | None = None) -> AttentionTrace:
    """Layer 'exact' (64x64): head 0 = each word's binary mask (uniform for unmasked tokens), head 1 uniform;
    layer 'flat' (16x16): uniform everywhere."""
    words = scene.caption.split()
    toks = [BOS, *words, EOS]
    exact = torch.ones(2, 2, 64, 64, len(toks))
    for i, _, _, m in word_mask_pairs(scene):
        exact[:, 0, :, :, i + 1] = torch.from_numpy(_binary(m))
    layers = [LayerInfo("l.exact", "exact", 2, 64, 64), LayerInfo("l.flat", "flat", 2, 16, 16)]
    probs = {"exact": exact.half(), "flat": torch.ones(2, 2, 16, 16, len(toks)).half()}
    return AttentionTrace(scene.caption, toks, list(range(len(toks))), [900.0, 100.0], layers, heads, probs)


class TestGroundingTable:
    def test_one_row_per_layer_head_step_masked_word(self, tiny):
        """Rows are exactly the product of layers, heads, steps and masked words."""
        tr, scene = tiny
        rows = grounding_table(tr, scene)
        masked = [i for i, *_ in word_mask_pairs(scene)]
        want = {(l.alias, h, s, w) for l in tr.layers for h in range(l.heads) for s in range(len(TINY_STEPS))
                for w in masked}
        got = [(r["layer"], r["head"], r["step"], r["word_index"]) for r in rows]
        assert len(got) == len(want) == len(set(got)) and set(got) == want
        assert {r["timestep"] for r in rows} == set(map(float, TINY_STEPS))

    def test_metric_values_in_range(self, tiny):
        """Pointing is a bool, energy and IoU lie in [0, 1], thresholds come from the search grid."""
        tr, scene = tiny
        rows = grounding_table(tr, scene)
        assert all(isinstance(r["pointing"], bool) for r in rows)
        assert all(0.0 <= r["energy"] <= 1.0 + 1e-6 and 0.0 <= r["iou"] <= 1.0 for r in rows)
        assert {r["iou_threshold"] for r in rows} <= set(DEFAULT_THRESHOLDS)
        assert {r["word_class"] for r in rows} == {"color", "shape"}

    def test_rows_match_single_map_metrics(self, tiny):
        """A row equals the scalar metrics on that slice's upsampled word map."""
        tr, scene = tiny
        rows = grounding_table(tr, scene)
        masks = {i: m for i, _, _, m in word_mask_pairs(scene)}
        for r in (rows[0], rows[len(rows) // 2], rows[-1]):
            m = layer_maps(tr, r["layer"], steps=[r["step"]], heads=[r["head"]])[r["word_index"] + 1]
            up = F.interpolate(m[None, None], size=(64, 64), mode="bilinear", align_corners=False)[0, 0]
            mk = masks[r["word_index"]]
            assert r["pointing"] == pointing_game(up, mk)
            assert r["energy"] == pytest.approx(energy_inside(up, mk), abs=1e-6)
            assert (r["iou"], r["iou_threshold"]) == pytest.approx(best_iou(up, mk), abs=1e-6)

    def test_caption_must_match_trace(self, tiny):
        """A scene whose caption the trace does not spell is refused, also when it is a prefix."""
        tr, _ = tiny
        with pytest.raises(ValueError, match="do not spell"):
            grounding_table(tr, _scene("a red circle"))

    def test_exact_maps_score_perfectly(self):
        """A head whose maps are the masks scores pointing 1, energy 1, IoU 1 on every word."""
        scene = _scene("a big red circle", seed=3)
        rows = [r for r in grounding_table(_synthetic(scene), scene) if (r["layer"], r["head"]) == ("exact", 0)]
        assert rows and all(r["pointing"] and r["energy"] == pytest.approx(1.0) and r["iou"] == pytest.approx(1.0)
                            for r in rows)

    def test_uniform_maps_score_area_fraction(self):
        """Uniform heads have energy equal to each word mask's area fraction."""
        scene = _scene("two blue squares", seed=1)
        area = {i: float((m > 0.5).mean()) for i, _, _, m in word_mask_pairs(scene)}
        rows = [r for r in grounding_table(_synthetic(scene), scene) if r["layer"] == "flat" or r["head"] == 1]
        assert rows and all(r["energy"] == pytest.approx(area[r["word_index"]], abs=1e-4) for r in rows)

    def test_heads_are_model_head_indices(self):
        """With a head selection, rows carry the model's head indices."""
        scene = _scene("a red circle")
        rows = grounding_table(_synthetic(scene, heads=[3, 5]), scene)
        assert {r["head"] for r in rows} == {3, 5}
        assert all(r["energy"] == pytest.approx(1.0) for r in rows if (r["layer"], r["head"]) == ("exact", 3))


class TestAggregates:
    def test_mean_is_token_heatmaps_default(self, tiny):
        """'mean' is the all-layer, head and step mean."""
        tr, _ = tiny
        torch.testing.assert_close(aggregate_maps(tr, "mean"), token_heatmaps(tr, size=64))

    def test_daam_is_the_layer_sum(self, tiny):
        """'daam' sums over layers: the mean times the number of layers."""
        tr, _ = tiny
        torch.testing.assert_close(aggregate_maps(tr, "daam"), aggregate_maps(tr, "mean") * len(tr.layers))

    def test_best_layer_is_that_layers_maps(self, tiny):
        """'best_layer' is the chosen layer's heads-and-steps mean."""
        tr, _ = tiny
        torch.testing.assert_close(aggregate_maps(tr, "best_layer", layer="up.2.attn.0"),
                                   token_heatmaps(tr, layers=["up.2.attn.0"], size=64))

    def test_best_head_is_that_heads_step_mean(self, tiny):
        """'best_head' is the chosen head's step mean, upsampled."""
        tr, _ = tiny
        m = tr.probs["down.1.attn.0"][:, 2].float().mean(0).permute(2, 0, 1)[None]
        want = F.interpolate(m, size=(64, 64), mode="bilinear", align_corners=False)[0]
        torch.testing.assert_close(aggregate_maps(tr, "best_head", layer="down.1.attn.0", head=2), want)

    def test_weighted_combines_heads_with_normalised_weights(self, tiny):
        """'weighted' is the weight-normalised sum of head maps; scaling all weights changes nothing."""
        tr, _ = tiny
        a = aggregate_maps(tr, "best_head", layer="mid.attn.0", head=1)
        b = aggregate_maps(tr, "best_head", layer="up.1.attn.1", head=3)
        got = aggregate_maps(tr, "weighted", weights={("mid.attn.0", 1): 3.0, ("up.1.attn.1", 3): 1.0})
        torch.testing.assert_close(got, 0.75 * a + 0.25 * b)
        scaled = aggregate_maps(tr, "weighted", weights={("mid.attn.0", 1): 30.0, ("up.1.attn.1", 3): 10.0})
        torch.testing.assert_close(scaled, got)

    def test_weighted_rejects_negative_weights(self, tiny):
        """Negative weights are an error."""
        tr, _ = tiny
        with pytest.raises(ValueError, match="non-negative"):
            aggregate_maps(tr, "weighted", weights={("mid.attn.0", 0): 1.0, ("mid.attn.0", 1): -0.5})

    def test_unknown_aggregate_is_an_error(self, tiny):
        """An unknown aggregate name is refused, naming the options."""
        with pytest.raises(ValueError, match="best_head"):
            aggregate_maps(tiny[0], "median")

    def test_best_head_by_model_index_scores_perfectly(self):
        """On a head selection, 'best_head' takes the model's head index; the exact head scores energy 1."""
        scene = _scene("a small green triangle", seed=2)
        tr = _synthetic(scene, heads=[4, 7])
        rows = score_maps(aggregate_maps(tr, "best_head", layer="exact", head=4), tr, scene)
        assert len(rows) == 3 and all(r["energy"] == pytest.approx(1.0) and r["pointing"] for r in rows)
        flat = score_maps(aggregate_maps(tr, "best_head", layer="exact", head=7), tr, scene)
        assert all(r["energy"] < 0.5 for r in flat)


class TestRankAndSummarize:
    def test_rank_puts_the_exact_layer_and_head_first(self):
        """On hand-made traces the mask-shaped layer and head rank first by energy."""
        rows = []
        for cap in ("a red circle", "two blue squares", "a yellow square above a green circle"):
            scene = _scene(cap)
            rows += grounding_table(_synthetic(scene), scene)
        ranked = rank_slices(rows)
        assert ranked["layers"][0][0] == "exact" and ranked["heads"][0] == (("exact", 0), pytest.approx(1.0))
        assert [s for _, s in ranked["heads"]] == sorted((s for _, s in ranked["heads"]), reverse=True)

    def test_rank_scores_are_means(self):
        """A layer's score is the mean of the chosen metric over its rows."""
        rows = [{"layer": l, "head": h, "energy": e, "iou": i, "pointing": p}
                for l, h, e, i, p in [("a", 0, 0.2, 0.9, True), ("a", 1, 0.4, 0.1, False), ("b", 0, 0.5, 0.0, False)]]
        assert rank_slices(rows)["layers"] == [("b", 0.5), ("a", pytest.approx(0.3))]
        assert rank_slices(rows, by="iou")["heads"][0] == (("a", 0), 0.9)
        assert rank_slices(rows, by="pointing")["layers"][0] == ("a", 0.5)

    def test_summarize_groups_by_keys(self):
        """Means and counts per group; several keys give tuple keys."""
        rows = [{"word_class": c, "layer": l, "energy": e, "iou": e / 2, "pointing": e > 0.5}
                for c, l, e in itertools.product(("color", "shape"), ("x", "y"), (0.2, 0.8))]
        rows.append({"word_class": "color", "layer": "x", "energy": 1.0, "iou": 0.5, "pointing": True})
        s = summarize(rows)
        assert s["shape"] == {"pointing": 0.5, "energy": pytest.approx(0.5), "iou": pytest.approx(0.25), "n": 4}
        assert s["color"]["n"] == 5 and s["color"]["energy"] == pytest.approx(3.0 / 5)
        assert summarize(rows, by=("word_class", "layer"))[("color", "x")]["n"] == 3


class TestTokenLoss:
    """`token_loss` of the bundled training (TokenCompose-style): (sum, count) over valid tokens and heads."""

    @staticmethod
    def _case(leak: float):
        from models.training.bundled import token_loss

        torch.manual_seed(0)
        tmask = torch.zeros(1, 3, 16)
        tmask[0, 1, :5] = 1
        tmask[0, 2, 8:] = 1
        probs = torch.rand(1, 2, 16, 3) * tmask.transpose(1, 2)[:, None]  # all mass inside each token's mask
        probs[..., 1, 2] += leak  # token 2's map leaks onto a query outside its mask
        valid = torch.tensor([[0.0, 1.0, 1.0]])
        return token_loss(probs, tmask, valid)

    def test_zero_when_maps_lie_inside_masks(self):
        """Maps entirely inside their masks give zero loss."""
        total, count = self._case(leak=0.0)
        assert total.item() == pytest.approx(0.0, abs=1e-6) and count.item() == 4

    def test_positive_when_mass_leaks_outside(self):
        """Mass outside the mask gives a positive loss that grows with the leak."""
        small, _ = self._case(leak=0.1)
        large, _ = self._case(leak=1.0)
        assert 0 < small.item() < large.item()

    def test_invalid_tokens_do_not_count(self):
        """A token marked invalid (no object) adds nothing, whatever its map."""
        from models.training.bundled import token_loss

        probs = torch.rand(1, 2, 16, 2)
        tmask = torch.zeros(1, 2, 16)
        total, count = token_loss(probs, tmask, torch.tensor([[0.0, 0.0]]))
        assert total.item() == 0.0 and count.item() == 0
