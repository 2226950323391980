"""Tests for the fixed matching benchmarks (models.shapes.benchmarks) and their evaluation (interp.tasks.matching_eval)."""
from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from interp.scorers import MatchOptions, ScoreResult, Scorer
from interp.tasks.matching_eval import compare_scorers, evaluate_matching, item_outcome
from models.shapes import benchmarks as bm
from models.shapes import world

ROOT = Path(__file__).resolve().parent.parent
TS = (200, 600)  # two timesteps keep the tiny-pipe runs short


@pytest.fixture(scope="module")
def loaded():
    return {name: bm.load_benchmark(name) for name in bm.BENCHMARKS}


def _oracle(bench, mode="true"):
    """A Scorer that knows the answers: looks the image up by its pixels.

    mode "true": the true caption scores 1, others 0; "reversed": the opposite; "subject_only": true
    ordering on comvg items of type "subject" only, reversed elsewhere.
    """
    truth = {}
    for it in bench.items:
        for k in range(len(it.images)):
            key = it.image(k).tobytes()
            assert key not in truth, "two images of a benchmark have identical pixels"
            truth[key] = (it, it.captions[it.answers[k]])

    class Oracle(Scorer):
        name = f"oracle_{mode}"

        def score(self, pipe, image, captions, options=MatchOptions()):
            it, true = truth[image.tobytes()]
            good = mode == "true" or (mode == "subject_only" and it.type == "subject")
            return ScoreResult(self.name, list(captions), [float((c == true) == good) for c in captions],
                               unet_calls=len(options.timesteps), unet_evals=len(options.timesteps) * len(captions))

    return Oracle()


class TestBuild:
    def test_building_twice_is_identical(self, tmp_path):
        """Two builds of each benchmark give byte-identical JSON and PNG files."""
        for name in bm.BENCHMARKS:
            a = bm.build_benchmark(name, tmp_path / "a" / name, n=12)
            b = bm.build_benchmark(name, tmp_path / "b" / name, n=12)
            assert (a / "benchmark.json").read_bytes() == (b / "benchmark.json").read_bytes()
            pngs = sorted(p.name for p in (a / "images").glob("*.png"))
            assert pngs and pngs == sorted(p.name for p in (b / "images").glob("*.png"))
            for p in pngs:
                assert (a / "images" / p).read_bytes() == (b / "images" / p).read_bytes()

    def test_committed_sets_equal_a_fresh_build(self, tmp_path):
        """The committed files are what the code builds now (JSON bytes and pixels)."""
        for name in bm.BENCHMARKS:
            fresh = bm.build_benchmark(name, tmp_path / name)
            committed = bm.DEFAULT_ROOT / name
            assert (fresh / "benchmark.json").read_bytes() == (committed / "benchmark.json").read_bytes(), \
                f"{name}: rebuild with `python -m models.shapes.benchmarks`"
            f, c = bm.load_benchmark(fresh), bm.load_benchmark(name)
            for it_f, it_c in list(zip(f.items, c.items))[::7]:
                for k in range(len(it_f.images)):
                    assert np.array_equal(np.asarray(it_f.image(k)), np.asarray(it_c.image(k)))

    def test_another_seed_gives_other_items(self, tmp_path):
        """A different seed changes the captions (the seed is actually used)."""
        a = bm.load_benchmark(bm.build_benchmark("comvg", tmp_path / "a", n=10))
        b = bm.load_benchmark(bm.build_benchmark("comvg", tmp_path / "b", n=10, seed=7))
        assert b.seed == 7
        assert [it.captions for it in a.items] != [it.captions for it in b.items]

    def test_rebuild_removes_stale_images(self, tmp_path):
        """Rebuilding a folder with fewer items leaves no images of the earlier build."""
        bm.build_benchmark("counting", tmp_path / "c", n=10)
        bm.build_benchmark("counting", tmp_path / "c", n=4)
        assert len(list((tmp_path / "c" / "images").glob("*.png"))) == 4

    def test_unknown_name_and_version_mismatch_raise(self, tmp_path):
        """Unknown names raise ValueError / FileNotFoundError; a version mismatch asks for a rebuild."""
        with pytest.raises(ValueError):
            bm.build_benchmark("vqa", tmp_path / "x")
        with pytest.raises(FileNotFoundError):
            bm.load_benchmark("vqa")
        folder = bm.build_benchmark("counting", tmp_path / "v", n=3)
        d = json.loads((folder / "benchmark.json").read_text())
        d["version"] = bm.BENCHMARK_VERSION + 1
        (folder / "benchmark.json").write_text(json.dumps(d))
        with pytest.raises(ValueError, match="rebuild"):
            bm.load_benchmark(folder)


class TestCommittedSets:
    def test_sizes_types_and_splits(self, loaded):
        """Each set has its documented size, balanced types and a stratified 10% train split."""
        for name, b in loaded.items():
            n = bm.SIZES[name]
            assert len(b.items) == n and b.version == bm.BENCHMARK_VERSION and b.seed == bm.SEEDS[name]
            types = Counter(it.type for it in b.items)
            assert set(types) == set(bm.TYPES[name])
            assert max(types.values()) - min(types.values()) <= 1
            train = b.split("train")
            assert len(train) == round(0.10 * n)
            assert len(train) + len(b.split("test")) == n
            train_types = Counter(it.type for it in train)
            assert all(train_types[t] >= int(0.10 * types[t]) for t in types)
            assert len({it.id for it in b.items}) == n

    def test_readme_documents_sizes_and_command(self, loaded):
        """The README's table rows match the sets (items, seed, train / test) and name the build command."""
        text = (bm.DEFAULT_ROOT / "README.md").read_text()
        assert "python -m models.shapes.benchmarks" in text
        for name, b in loaded.items():
            row = re.search(rf"^\| {name} \| (\d+) \| (\d+) \| .* \| (\d+) / (\d+) \|$", text, re.M)
            assert row, name
            assert [int(g) for g in row.groups()] == [len(b.items), b.seed, len(b.split("train")),
                                                      len(b.split("test"))]

    def test_images_are_renders_of_their_scenes(self, loaded):
        """Every 5th item's images are 64x64 RGB and equal the render of their scene record."""
        for b in loaded.values():
            for it in b.items[::5]:
                for k in range(len(it.images)):
                    img = it.image(k)
                    assert img.size == (64, 64) and img.mode == "RGB"
                    assert np.array_equal(np.asarray(img), np.asarray(world.render(it.scene(k))))
                    assert it.scene(k).caption == it.captions[it.answers[k]]

    def test_every_caption_parses(self, loaded):
        """All captions are in the world's grammar and distinct within their item."""
        for b in loaded.values():
            for it in b.items:
                for c in it.captions:
                    world.parse_caption(c)
                assert len(set(it.captions)) == len(it.captions)


class TestWinoground:
    def test_swap_items_reorder_the_same_words(self, loaded):
        """swap_attributes / swap_roles captions are the same multiset of words in a different order."""
        items = [it for it in loaded["winoground"].items if it.type != "flip_relation"]
        assert items
        for it in items:
            w0, w1 = (c.split() for c in it.captions)
            assert Counter(w0) == Counter(w1) and w0 != w1

    def test_flip_relation_items_differ_in_the_relation_only(self, loaded):
        """flip_relation captions share both phrases and have opposite relations."""
        for it in (i for i in loaded["winoground"].items if i.type == "flip_relation"):
            p0, p1 = (world.parse_caption(c) for c in it.captions)
            assert p1.relation == world.OPPOSITE[p0.relation]
            assert [(p.color, p.shape) for p in p0.phrases] == [(p.color, p.shape) for p in p1.phrases]

    def test_swap_types_are_what_they_say(self, loaded):
        """swap_attributes keeps the shapes in place and swaps the colors; swap_roles swaps whole phrases."""
        for it in loaded["winoground"].items:
            p0, p1 = (world.parse_caption(c).phrases for c in it.captions)
            if it.type == "swap_attributes":
                assert [p.shape for p in p0] == [p.shape for p in p1]
                assert [p.color for p in p0] == [p.color for p in p1][::-1]
            elif it.type == "swap_roles":
                assert [(p.color, p.shape) for p in p0] == [(p.color, p.shape) for p in p1][::-1]

    def test_caption_k_describes_image_k(self, loaded):
        """answers are [0, 1] and each image's scene has its caption's relation and phrases."""
        for it in loaded["winoground"].items:
            assert it.answers == [0, 1] and len(it.images) == 2
            for k in range(2):
                s, p = it.scene(k), world.parse_caption(it.captions[k])
                assert s.relation == p.relation
                assert [(o.color, o.shape) for o in s.objects] == [(q.color, q.shape) for q in p.phrases]


class TestComVG:
    def test_negative_differs_in_the_stated_role_only(self, loaded):
        """subject / object / predicate negatives change exactly that part of the parsed caption."""
        for it in loaded["comvg"].items:
            pos, neg = (world.parse_caption(c) for c in it.captions)
            diff = {"subject": pos.phrases[0] != neg.phrases[0], "object": pos.phrases[1] != neg.phrases[1],
                    "predicate": pos.relation != neg.relation}
            assert [k for k, v in diff.items() if v] == [it.type], it.id
            assert it.meta["negative_type"].startswith(it.type) or (
                it.type == "predicate" and it.meta["negative_type"] == "flip_relation")

    def test_attribute_named_by_negative_type_changes(self, loaded):
        """subject_color changes the subject's color (not its shape), object_shape the object's shape, etc."""
        for it in loaded["comvg"].items:
            key = it.meta["negative_type"]
            if key == "flip_relation":
                continue
            role, attr = key.split("_")
            k = 0 if role == "subject" else 1
            a, b = (world.parse_caption(c).phrases[k] for c in it.captions)
            other = "shape" if attr == "color" else "color"
            assert getattr(a, attr) != getattr(b, attr) and getattr(a, other) == getattr(b, other)


class TestCounting:
    def test_negative_changes_count_or_color(self, loaded):
        """change_count flips two <-> three only; change_color changes the color only."""
        for it in loaded["counting"].items:
            (a,), (b,) = (world.parse_caption(c).phrases for c in it.captions)
            assert a.shape == b.shape
            if it.type == "change_count":
                assert {a.count, b.count} == {2, 3} and a.color == b.color
            else:
                assert a.count == b.count and a.color != b.color
            assert len(it.scene().objects) == a.count


class TestRefCOCOg:
    def test_ten_distinct_captions_one_true(self, loaded):
        """10 distinct captions; exactly one is the image's caption and `answers` points to it."""
        for it in loaded["refcocog"].items:
            assert len(it.captions) == 10 == len(set(it.captions))
            assert it.meta["sources"].count("true") == 1
            assert [c == it.scene().caption for c in it.captions].count(True) == 1
            assert it.captions[it.answers[0]] == it.scene().caption

    def test_negatives_are_hard_or_unrelated(self, loaded):
        """Hard negatives are the scene's world.negatives; random ones name no color-shape pair of the image."""
        n_hard = 0
        for it in loaded["refcocog"].items:
            s = it.scene()
            present = {(o.color, o.shape) for o in s.objects}
            for c, src in zip(it.captions, it.meta["sources"]):
                if src == "random":
                    assert not {(p.color, p.shape) for p in world.parse_caption(c).phrases} & present
                elif src != "true":
                    n_hard += 1
                    assert world.parse_caption(c).kind == s.kind
                    if src in ("swap_attributes", "swap_roles", "flip_relation", "change_count"):  # no random draw
                        assert c == world.negatives(s)[src]
            assert sum(src not in ("true", "random") for src in it.meta["sources"]) <= 5
        assert n_hard >= 2 * len(loaded["refcocog"].items)


class TestMetricLogic:
    def test_item_outcome_by_hand(self, loaded):
        """Hand-made score tables give the expected text / image / group and rank outcomes; ties are misses."""
        wino = loaded["winoground"].items[0]
        assert item_outcome("group", wino, [[2, 1], [0, 3]]) == {"text": True, "image": True, "group": True}
        assert item_outcome("group", wino, [[2, 1], [0, 3]][::-1]) == {"text": False, "image": False, "group": False}
        # text right, image wrong: image 1 scores everything higher
        assert item_outcome("group", wino, [[2, 1], [5, 6]]) == {"text": True, "image": False, "group": False}
        assert item_outcome("group", wino, [[1, 1], [0, 3]])["text"] is False
        assert item_outcome("group", wino, [[2, 1], [2, 3]]) == {"text": True, "image": False, "group": False}
        ref = loaded["refcocog"].items[0]
        a = ref.answers[0]
        scores = np.arange(10.0)
        scores[a], scores[9] = scores[9], scores[a]  # true caption = 9: rank 1
        assert item_outcome("topk", ref, [scores.tolist()])["rank"] == 1
        scores[a] = 4.0  # ties with one caption, below 5 -> rank 1 + 5 (ties count against)
        assert item_outcome("topk", ref, [scores.tolist()]) == {"rank": 6, "top1": False, "top5": False}
        with pytest.raises(ValueError):
            item_outcome("pair", loaded["comvg"].items[0], [[1.0, 2.0, 3.0]])

    @pytest.mark.parametrize("name", bm.BENCHMARKS)
    def test_oracle_scores_one_and_reversed_zero(self, loaded, name):
        """A scorer that prefers the true caption gets every metric 1; the reversed one gets 0."""
        b = loaded[name]
        opts = MatchOptions(timesteps=TS)
        good = evaluate_matching(None, b, opts, scorer=_oracle(b))
        bad = evaluate_matching(None, b, opts, scorer=_oracle(b, "reversed"))
        keys = [k for k in good["metrics"] if k != "mean_rank"]
        assert keys == [k for k in bm.CHANCE[name]]
        assert all(good["metrics"][k] == 1.0 for k in keys)
        assert all(bad["metrics"][k] == 0.0 for k in keys)
        assert good["n_items"] == len(b.split("test")) and good["unet_evals_per_pair"] == len(TS)
        if name == "refcocog":
            assert good["metrics"]["mean_rank"] == 1.0 and bad["metrics"]["mean_rank"] == 10.0

    def test_per_type_accounting(self, loaded):
        """A scorer right on comvg "subject" items only scores 1 there, 0 on the others, 1/3 overall."""
        b = loaded["comvg"]
        res = evaluate_matching(None, b, MatchOptions(timesteps=TS), split="all", scorer=_oracle(b, "subject_only"))
        assert res["by_type"]["subject"] == {"accuracy": 1.0, "n": 50}
        assert res["by_type"]["object"]["accuracy"] == 0.0 == res["by_type"]["predicate"]["accuracy"]
        assert res["metrics"]["accuracy"] == pytest.approx(1 / 3)
        assert res["unet_calls"] == len(TS) * 150


class TestEvaluateMatching:
    @pytest.mark.parametrize("name", bm.BENCHMARKS)
    def test_tiny_pipe_keys_ranges_and_cost(self, tiny_pipe, loaded, name):
        """On the tiny pipe with limit=2: the documented keys, metrics in [0, 1], S evals per pair (lse)."""
        res = evaluate_matching(tiny_pipe, loaded[name], MatchOptions(scorer="lse", timesteps=TS), limit=2)
        for k in ("benchmark", "split", "n_items", "metrics", "by_type", "chance", "unet_calls", "unet_evals",
                  "pairs", "unet_evals_per_pair", "items", "options"):
            assert k in res
        assert res["n_items"] == 2 and set(res["metrics"]) >= set(bm.CHANCE[name])
        assert all(0.0 <= res["metrics"][k] <= 1.0 for k in bm.CHANCE[name])
        n_images = sum(len(it.images) for it in loaded[name].split("test")[:2])
        n_caps = len(loaded[name].items[0].captions)
        assert res["unet_calls"] == len(TS) * n_images
        assert res["pairs"] == n_images * n_caps
        assert res["unet_evals_per_pair"] == len(TS)
        json.dumps(res)

    @pytest.mark.parametrize("name, k", [("comvg", 2), ("refcocog", 10)])
    def test_denoise_norm_pays_for_the_uncond_row(self, tiny_pipe, loaded, name, k):
        """denoise_norm: S * (1 + 1/K) sample-forwards per pair (one "" row shared by the K captions)."""
        res = evaluate_matching(tiny_pipe, loaded[name], MatchOptions(scorer="denoise_norm", timesteps=TS), limit=1)
        assert res["unet_evals_per_pair"] == pytest.approx(len(TS) * (1 + 1 / k))

    def test_compare_scorers_matches_separate_runs(self, tiny_pipe, loaded):
        """compare_scorers' shared pass gives each option set the scores of its own evaluate_matching run."""
        opts = [MatchOptions(scorer="lse", timesteps=TS), MatchOptions(scorer="denoise", timesteps=TS),
                MatchOptions(scorer="denoise_norm", timesteps=TS)]
        rep = compare_scorers(tiny_pipe, loaded["winoground"], opts, limit=1, per_item=True)
        assert [r["label"] for r in rep["table"]] == rep["labels"] and len(rep["labels"]) == 3
        for lab, o in zip(rep["labels"], opts):
            alone = evaluate_matching(tiny_pipe, loaded["winoground"], o, limit=1)
            got = rep["results"][lab]
            assert np.allclose(got["items"][0]["scores"], alone["items"][0]["scores"], rtol=1e-5, atol=1e-7)
            assert got["metrics"] == alone["metrics"]
            assert got["unet_evals_per_pair"] == alone["unet_evals_per_pair"]
        # one pass per image serves all three: 2 images x S calls, with the "" row
        assert rep["shared_pass"]["unet_calls"] == 2 * len(TS)
        assert rep["shared_pass"]["unet_evals"] == 2 * len(TS) * 3

    def test_bad_options_raise(self, loaded):
        """Unknown scorers, differing timesteps in a comparison and an empty selection raise ValueError."""
        with pytest.raises(ValueError, match="scorer"):
            evaluate_matching(None, loaded["comvg"], MatchOptions(scorer="denoize"))  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="timesteps"):
            compare_scorers(None, loaded["comvg"], [MatchOptions(timesteps=(100,)), MatchOptions(timesteps=(200,))])
        with pytest.raises(ValueError):
            evaluate_matching(None, loaded["comvg"], MatchOptions(), limit=0, scorer=_oracle(loaded["comvg"]))


def test_evaluate_matching_prints_wilson_intervals(loaded):
    """The JSON of eval-matching holds each rate with n and a Wilson interval around it."""
    b = loaded["comvg"]
    res = evaluate_matching(None, b, MatchOptions(timesteps=(300,)), scorer=_oracle(b, "subject_only"))
    iv = res["intervals"]["correct"]
    assert iv["n"] == res["n_items"] and iv["rate"] == pytest.approx(res["metrics"]["accuracy"])
    assert 0 < iv["ci95"][0] < iv["rate"] < iv["ci95"][1] < 1
