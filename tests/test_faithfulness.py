"""Faithfulness view: held-out scenes, word maps of several models scored against exact masks, head atlas."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from interp.tasks.faithfulness import atlas_for_model, compare_word_maps, render_scene
from interp.grounding import aggregate_maps, score_maps, word_mask_pairs
from interp.tasks.grounding_eval import held_out_scenes
from interp.head_atlas import CLASSES
from interp.heatmaps import merge_subwords
from models.shapes import world
from models.unet_pass import encode_image, noised_unet_pass

from conftest import build_tiny_pipeline

RELATION_WORDS = {"left", "right", "of", "above", "below", "a"}


@pytest.fixture(scope="module")
def other_pipe(tmp_path_factory):
    """A second tiny model (other random init) for side-by-side comparisons."""
    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny_other"), seed=1)


@pytest.fixture(scope="module")
def scene():
    return render_scene(5, "relation")


@pytest.fixture(scope="module")
def compared(tiny_pipe, other_pipe, scene):
    return compare_word_maps({"tiny": tiny_pipe, "other": other_pipe}, world.render(scene), None, 300, scene=scene)


class TestRenderScene:
    @pytest.mark.parametrize("kind", world.KINDS)
    def test_kind_and_seed_determine_the_scene(self, kind):
        """The same seed and kind give the same scene, of that kind; other seeds give other scenes."""
        a, b = render_scene(7, kind), render_scene(7, kind)
        assert a == b and a.kind == kind
        assert len({render_scene(s, kind).to_dict().__repr__() for s in range(6)}) > 1

    def test_not_the_plain_integer_seed_stream(self):
        """The scene is not what an integer-seeded generator (the training data's kind of stream) draws."""
        assert render_scene(0, "relation") != world.sample_scene(np.random.default_rng(0), "relation")

    @pytest.mark.parametrize("seed,kind,match", [(-1, "single", "seed"), (1.5, "single", "seed"),
                                                 ("3", "single", "seed"), (True, "single", "seed"),
                                                 (0, "pairs", "kind"), (0, None, "kind")])
    def test_bad_seed_or_kind(self, seed, kind, match):
        """A negative or non-integer seed, or an unknown kind: ValueError naming it."""
        with pytest.raises(ValueError, match=match):
            render_scene(seed, kind)


class TestCompareWordMaps:
    def test_maps_per_model_non_negative_at_image_size(self, compared, scene):
        """Each model gets one map per caption word at the image's size, all >= 0."""
        words = scene.caption.split()
        assert compared["words"] == words and list(compared["models"]) == ["tiny", "other"]
        for r in compared["models"].values():
            assert r["maps"].shape == (len(words), world.IMAGE_SIZE, world.IMAGE_SIZE)
            assert float(r["maps"].min()) >= 0 and float(r["maps"].sum()) > 0

    def test_maps_are_the_default_aggregate_of_one_noised_call(self, compared, tiny_pipe, scene):
        """The maps equal the mean aggregate of an independently run noised pass, summed per word."""
        tr = noised_unet_pass(tiny_pipe, encode_image(tiny_pipe, world.render(scene)), [scene.caption], [300],
                              noise_seed=0, logits=False).traces[0]
        agg = aggregate_maps(tr, "mean", size=world.IMAGE_SIZE)
        groups = merge_subwords(tr.tokens, scene.caption.split())
        ref = torch.stack([agg[g].sum(0) for g in groups])
        torch.testing.assert_close(compared["models"]["tiny"]["maps"], ref, rtol=1e-5, atol=1e-7)

    def test_metrics_match_grounding_on_the_same_maps(self, compared, tiny_pipe, scene):
        """Pointing and energy per masked word equal interp.grounding.score_maps on an independent pass."""
        tr = noised_unet_pass(tiny_pipe, encode_image(tiny_pipe, world.render(scene)), [scene.caption], [300],
                              noise_seed=0, logits=False).traces[0]
        ref = {r["word_index"]: r for r in score_maps(aggregate_maps(tr, "mean", size=world.IMAGE_SIZE), tr, scene)}
        got = compared["models"]["tiny"]["metrics"]
        assert len(ref) == 4
        for i, m in enumerate(got):
            if i in ref:
                assert m["pointing"] == ref[i]["pointing"] and m["energy"] == pytest.approx(ref[i]["energy"], abs=1e-6)
            else:
                assert m["word"] in RELATION_WORDS and m["pointing"] is None and m["energy"] is None
        r = compared["models"]["tiny"]
        assert r["mean_energy"] == pytest.approx(np.mean([x["energy"] for x in ref.values()]), abs=1e-6)
        assert r["mean_pointing"] == pytest.approx(np.mean([x["pointing"] for x in ref.values()]))

    def test_energy_and_area_by_hand(self, compared, scene):
        """Energy is the map's share inside the binarised mask; area the mask's share of the image."""
        masks = world.word_masks(scene)
        for name, r in compared["models"].items():
            for i, m in enumerate(r["metrics"]):
                if masks[i] is None:
                    assert m["area"] is None
                    continue
                mp, inside = r["maps"][i].numpy().astype(np.float64), masks[i] > 0.5
                assert m["energy"] == pytest.approx(mp[inside].sum() / mp.sum(), rel=1e-4)
                assert m["area"] == pytest.approx(inside.mean())
                assert m["pointing"] == bool(inside.flat[int(np.argmax(mp))])
                assert m["word_class"] == world.word_classes(scene.caption)[i]

    def test_a_model_given_twice_gives_identical_results(self, tiny_pipe, scene):
        """The same model under two names: identical maps and metrics (same noise for every model)."""
        res = compare_word_maps({"x": tiny_pipe, "y": tiny_pipe}, world.render(scene), scene.caption, 300, scene=scene)
        x, y = res["models"]["x"], res["models"]["y"]
        assert torch.equal(x["maps"], y["maps"]) and x["metrics"] == y["metrics"]

    def test_different_models_give_different_maps(self, compared):
        """Each model is run on its own: two random inits do not share maps."""
        assert not torch.allclose(compared["models"]["tiny"]["maps"], compared["models"]["other"]["maps"])

    def test_noise_seed_changes_the_maps(self, tiny_pipe, scene):
        """Another noise draw gives other maps."""
        img = world.render(scene)
        a = compare_word_maps({"m": tiny_pipe}, img, scene.caption, 600, noise_seed=0)["models"]["m"]["maps"]
        b = compare_word_maps({"m": tiny_pipe}, img, scene.caption, 600, noise_seed=1)["models"]["m"]["maps"]
        assert not torch.allclose(a, b)

    def test_count_words_share_the_union_mask(self, tiny_pipe):
        """In a count scene every word has a mask (the union of the objects), so no metric is None."""
        sc = render_scene(2, "count")
        res = compare_word_maps({"m": tiny_pipe}, world.render(sc), None, 300, scene=sc)
        ms = res["models"]["m"]["metrics"]
        assert [m["word_class"] for m in ms] == ["count", "color", "shape"]
        assert all(m["pointing"] is not None for m in ms)
        assert len({m["area"] for m in ms}) == 1

    def test_without_a_scene_maps_only(self, tiny_pipe, scene):
        """Without masks: maps, no metrics."""
        r = compare_word_maps({"m": tiny_pipe}, world.render(scene), "a red circle", 300)["models"]["m"]
        assert r["maps"].shape[0] == 3 and r["metrics"] is None and r["mean_energy"] is None

    @pytest.mark.parametrize("kw,match", [({"timestep": -1}, "timestep"), ({"timestep": 1000}, "timestep"),
                                          ({"timestep": 2.5}, "timestep"), ({"timestep": True}, "timestep"),
                                          ({"noise_seed": -1}, "noise seed"),
                                          ({"caption": "a blue square"}, "not the scene's caption"),
                                          ({"caption": "  "}, "empty")])
    def test_bad_inputs(self, tiny_pipe, scene, kw, match):
        """Bad timestep, noise seed or caption: ValueError with a message."""
        args = {"caption": None, "timestep": 300, **kw}
        with pytest.raises(ValueError, match=match):
            compare_word_maps({"m": tiny_pipe}, world.render(scene), args.pop("caption"), args.pop("timestep"),
                              scene=scene, **args)

    def test_no_models_or_no_caption(self, tiny_pipe, scene):
        """No models, or neither caption nor scene: ValueError."""
        with pytest.raises(ValueError, match="no models"):
            compare_word_maps({}, world.render(scene), None, 300, scene=scene)
        with pytest.raises(ValueError, match="caption or a scene"):
            compare_word_maps({"m": tiny_pipe}, world.render(scene), None, 300)


class TestAtlasForModel:
    @pytest.fixture(scope="class")
    def table(self, tiny_pipe):
        return atlas_for_model(tiny_pipe, n_scenes=3, timesteps=(300,))

    def test_one_entry_per_layer_and_head(self, table, tiny_pipe, scene):
        """Every cross-attention layer x head of the model has an entry, in UNet order."""
        tr = noised_unet_pass(tiny_pipe, encode_image(tiny_pipe, world.render(scene)), [scene.caption], [300],
                              logits=False).traces[0]
        want = [(info.alias, h) for info in tr.layers for h in range(info.heads)]
        assert [(e["layer"], e["head"]) for e in table] == want

    def test_rows_count_every_masked_word_of_the_held_out_scenes(self, table):
        """Each entry pools one row per masked word of each held-out scene and timestep; scores in [0, 1]."""
        n = sum(len(word_mask_pairs(s)) for s in held_out_scenes(3))
        for e in table:
            assert e["n"] == n and set(e["by_class"]) <= set(CLASSES)
            assert [t["timestep"] for t in e["by_timestep"]] == [300]
            assert all(0 <= v["energy"] <= 1 and 0 <= v["pointing"] <= 1 for v in e["by_class"].values())

    def test_two_timesteps_double_the_rows(self, table, tiny_pipe):
        """Each timestep adds one UNet call per scene: twice the rows, one atlas slice per timestep."""
        two = atlas_for_model(tiny_pipe, n_scenes=3, timesteps=(300, 700))
        assert [e["n"] for e in two] == [2 * e["n"] for e in table]
        assert [t["timestep"] for t in two[0]["by_timestep"]] == [300, 700]

    def test_deterministic(self, table, tiny_pipe):
        """Same arguments, same atlas."""
        again = atlas_for_model(tiny_pipe, n_scenes=3, timesteps=(300,))
        assert [e["by_class"] for e in again] == [e["by_class"] for e in table]

    @pytest.mark.parametrize("kw,match", [({"n_scenes": 0}, "number of scenes"), ({"timesteps": ()}, "timesteps"),
                                          ({"timesteps": (1000,)}, "timestep"), ({"timesteps": "300"}, "timesteps"),
                                          ({"timesteps": (1.5,)}, "timestep"), ({"seed": -1}, "seed")])
    def test_bad_inputs(self, tiny_pipe, kw, match):
        """Bad scene count, timesteps or seed: ValueError before any model call."""
        with pytest.raises(ValueError, match=match):
            atlas_for_model(tiny_pipe, **kw)
