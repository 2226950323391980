"""Command line: output contracts and one-line errors (run in-process on a tiny pipeline)."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

import cli
from models.shapes import world


@pytest.fixture(scope="module")
def render_png(tmp_path_factory):

    p = tmp_path_factory.mktemp("img") / "scene.png"
    world.render(world.scene_from_caption("a red circle left of a blue square", np.random.default_rng(0))).save(p)
    return p


def _run(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


class TestGenerate:
    def test_generate_writes_image_and_json(self, capsys, tiny_pipe_dir, tmp_path):
        """generate writes the PNG and prints one JSON object."""
        code, out, _ = _run(capsys, "generate", "--prompt", "a red circle", "--seed", 0, "--steps", 2,
                            "--out", tmp_path / "x.png", "--model", tiny_pipe_dir, "--json")
        assert code == 0
        meta = json.loads(out)
        assert meta["seed"] == 0 and Image.open(tmp_path / "x.png").size == (64, 64)

    @pytest.mark.parametrize("args,match", [
        (["--prompt", " "], "prompt is empty"),
        (["--prompt", "a red circle", "--steps", "0"], "steps"),
    ])
    def test_bad_inputs(self, capsys, tmp_path, args, match):
        """Bad inputs exit 2 with one line on stderr."""
        code, _, err = _run(capsys, "generate", *args, "--out", tmp_path / "x.png")
        assert code == 2 and match in err and err.count("\n") == 1

    def test_unknown_model(self, capsys, tmp_path):
        """An unknown model exits 2 with one line."""
        code, _, err = _run(capsys, "generate", "--prompt", "a red circle", "--out", tmp_path / "x.png",
                            "--model", tmp_path / "nope")
        assert code == 2 and err.count("\n") == 1


class TestMaps:
    def test_maps_json_contract(self, capsys, tiny_pipe_dir, render_png):
        """maps prints tokens (the prompt's words) and one non-negative 2-D map per word at image size."""
        prompt = "a red circle left of a blue square"
        code, out, _ = _run(capsys, "maps", "--image", render_png, "--prompt", prompt, "--model", tiny_pipe_dir, "--json")
        assert code == 0
        d = json.loads(out)
        assert d["tokens"] == prompt.split()
        assert len(d["maps"]) == 8 and all(len(m) == 64 and len(m[0]) == 64 for m in d["maps"])
        assert min(v for m in d["maps"] for row in m for v in row) >= 0

    @pytest.mark.parametrize("args,match", [
        (["--image", "/no/such.png", "--prompt", "a red circle"], "image not found"),
        (["--prompt", "a red zebra"], "outside the model's vocabulary"),
        (["--prompt", "a red circle", "--timestep", "1000"], "timestep"),
        (["--prompt", "a red circle", "--timestep", "-1"], "timestep"),
    ])
    def test_maps_bad_inputs(self, capsys, tiny_pipe_dir, render_png, args, match):
        """Unreadable image, out-of-vocabulary prompt, out-of-range timestep: exit 2, one line."""
        if "--image" not in args:
            args = ["--image", str(render_png), *args]
        code, _, err = _run(capsys, "maps", *args, "--model", tiny_pipe_dir)
        assert code == 2 and match in err and err.count("\n") == 1

    def test_unreadable_image(self, capsys, tiny_pipe_dir, tmp_path):
        """A file that is not an image is reported in one line."""
        bad = tmp_path / "bad.png"
        bad.write_text("not an image")
        code, _, err = _run(capsys, "maps", "--image", bad, "--prompt", "a red circle", "--model", tiny_pipe_dir)
        assert code == 2 and "cannot read image" in err


class TestRank:
    def test_rank_json_sorted(self, capsys, tiny_pipe_dir, render_png):
        """rank prints a JSON list of {caption, score} sorted best first."""
        caps = ["a red circle left of a blue square", "a blue square left of a red circle", "two green triangles"]
        code, out, _ = _run(capsys, "rank", "--image", render_png, "--captions", *caps, "--model", tiny_pipe_dir, "--json")
        assert code == 0
        r = json.loads(out)
        assert sorted(x["caption"] for x in r) == sorted(caps)
        assert [x["score"] for x in r] == sorted((x["score"] for x in r), reverse=True)

    @pytest.mark.parametrize("scorer", ["denoise", "denoise_norm", "structure", "head_weighted"])
    def test_rank_with_each_scorer(self, capsys, tiny_pipe_dir, render_png, scorer):
        """Every scorer ranks all captions, best first."""
        caps = ["a red circle left of a blue square", "a red circle right of a blue square"]
        code, out, _ = _run(capsys, "rank", "--image", render_png, "--captions", *caps, "--model", tiny_pipe_dir,
                            "--scorer", scorer, "--timesteps", 300, "--json")
        r = json.loads(out)
        assert code == 0 and sorted(x["caption"] for x in r) == sorted(caps)
        assert r[0]["score"] >= r[1]["score"]

    @pytest.mark.parametrize("caps,match", [([], "no captions"), (["a red circle"], "at least 2"),
                                            (["a red circle", " "], "caption 2 is empty")])
    def test_rank_bad_captions(self, capsys, render_png, caps, match):
        """No captions, one caption, an empty caption: exit 2 with one line."""
        code, _, err = _run(capsys, "rank", "--image", render_png, "--captions", *caps)
        assert code == 2 and match in err and err.count("\n") == 1


class TestScore:
    def test_score_prints_breakdown(self, capsys, tiny_pipe_dir, render_png):
        """score prints each caption's score, its layer x timestep table and the UNet evaluations."""
        code, out, _ = _run(capsys, "score", "--image", render_png, "--captions", "a red circle", "--model",
                            tiny_pipe_dir, "--timesteps", 200, 600, "--scorer", "lse", "--json")
        d = json.loads(out)
        assert code == 0 and set(d["scores"]) == {"a red circle"} and d["unet_evals"] == 2
        assert len(d["breakdowns"]["a red circle"]["table"]) == 7

    def test_default_scorer_is_routed(self, capsys, tiny_pipe_dir, render_png):
        """Without --scorer, score routes: captions naming different things go to the denoising error."""
        code, out, _ = _run(capsys, "score", "--image", render_png, "--captions", "a red circle", "two blue squares",
                            "--model", tiny_pipe_dir, "--timesteps", 300, "--json")
        d = json.loads(out)
        assert code == 0 and d["routed_to"] == "denoise" and d["unet_evals"] == 2

    def test_score_head_weighted_prints_attribution_table(self, capsys, tiny_pipe_dir, render_png):
        """With head weighting, each caption comes with its [layers x heads] attribution table."""
        code, out, _ = _run(capsys, "score", "--image", render_png, "--captions", "a red circle", "--model",
                            tiny_pipe_dir, "--timesteps", 300, "--scorer", "head_weighted", "--json")
        d = json.loads(out)
        assert code == 0 and len(d["layers"]) == 7
        table = d["per_caption"]["a red circle"]["table"]
        assert len(table) == 7 and all(len(r) == 4 for r in table)


class TestEvalMatching:
    def test_eval_matching_json(self, capsys, tiny_pipe_dir):
        """eval-matching prints metrics, per-split accuracies and unet_calls_per_pair as one JSON object."""
        code, out, _ = _run(capsys, "eval-matching", "--benchmark", "counting", "--limit", 1, "--timesteps", 500,
                            "--model", tiny_pipe_dir, "--json")
        assert code == 0
        d = json.loads(out)
        assert 0 <= d["metrics"]["accuracy"] <= 1 and d["unet_calls_per_pair"] == 1
        assert set(d["per_split"]) <= {"change_count", "change_color"} and d["per_split"]

    def test_unknown_benchmark(self, capsys):
        """An unknown benchmark exits 2 with one line naming the known ones."""
        code, _, err = _run(capsys, "eval-matching", "--benchmark", "nope")
        assert code == 2 and "winoground" in err and err.count("\n") == 1


class TestEvalGrounding:
    def test_eval_grounding_json_and_atlas(self, capsys, tiny_pipe_dir, tmp_path):
        """eval-grounding prints metrics per word class and aggregate, and saves the head atlas."""
        code, out, _ = _run(capsys, "eval-grounding", "--n-scenes", 3, "--timesteps", 300, "--model", tiny_pipe_dir,
                            "--atlas-dir", tmp_path / "atlas", "--json")
        assert code == 0
        d = json.loads(out)
        assert set(d["aggregates"]) == {"mean", "daam", "best_layer", "best_head", "weighted"}
        assert 0 <= d["by_class"]["color"]["energy"] <= 1
        assert (tmp_path / "atlas" / "atlas.png").exists() and (tmp_path / "atlas" / "atlas.json").exists()

    def test_bad_timestep(self, capsys):
        """An out-of-range timestep exits 2 with one line."""
        code, _, err = _run(capsys, "eval-grounding", "--timesteps", 5000)
        assert code == 2 and "timestep" in err and err.count("\n") == 1


class TestPromptLearningCli:
    def test_train_prompt_then_score_with_it(self, capsys, tiny_pipe_dir, render_png, tmp_path):
        """train-prompt saves a prompt file that score --attn-prompt then applies (scores change)."""
        f = tmp_path / "p.safetensors"
        code, out, _ = _run(capsys, "train-prompt", "--benchmark", "counting", "--out", f, "--steps", 2, "--lr", 0.05,
                            "--timesteps", 300, "--model", tiny_pipe_dir, "--json")
        assert code == 0 and f.exists() and json.loads(out)["steps"] == 2
        base = ["score", "--image", render_png, "--captions", "a red circle", "--model", tiny_pipe_dir,
                "--timesteps", 300, "--json"]
        _, plain, _ = _run(capsys, *base)
        code, prompted, _ = _run(capsys, *base, "--attn-prompt", f)
        assert code == 0
        assert json.loads(plain)["scores"] != json.loads(prompted)["scores"]

    def test_missing_prompt_file(self, capsys, tiny_pipe_dir, render_png):
        """A missing prompt file exits 2 with one line."""
        code, _, err = _run(capsys, "score", "--image", render_png, "--captions", "a red circle", "--model",
                            tiny_pipe_dir, "--attn-prompt", "/no/such/prompt.safetensors")
        assert code == 2 and "attention prompt" in err and err.count("\n") == 1


class TestSampleGrid:
    def test_sample_grid_png(self, capsys, tiny_pipe_dir, tmp_path):
        """sample-grid writes a PNG of n prompts per kind and reports how many the checker passed."""
        code, out, _ = _run(capsys, "sample-grid", "--out", tmp_path / "g.png", "--n-per-kind", 1, "--steps", 2,
                            "--model", tiny_pipe_dir)
        d = json.loads(out)
        assert code == 0 and d["n"] == 3 and 0 <= d["correct"] <= 3
        assert Image.open(tmp_path / "g.png").size[0] > 200


class TestEvalGeneration:
    def test_eval_generation_json_keys(self, capsys, tiny_pipe_dir):
        """eval-generation prints single / relation / count fractions and n."""
        code, out, _ = _run(capsys, "eval-generation", "--n-per-kind", 1, "--steps", 2, "--model", tiny_pipe_dir, "--json")
        d = json.loads(out)
        assert code == 0 and d["n"] == 3
        assert all(0 <= d[k] <= 1 for k in ("single", "relation", "count"))


class TestDPTAndTextDiffusion:
    """The DPT and D-DiT commands on the bundled model and its shipped adapters."""

    def test_generate_self_correct_json_holds_the_trajectory(self, capsys, tmp_path):
        out, traj = tmp_path / "x.png", tmp_path / "traj"
        code, stdout, _ = _run(capsys, "generate", "--prompt", "two red circles", "--steps", 4, "--self-correct",
                               "--eta", 100, "--out", out, "--trajectory-out", traj, "--json")
        d = json.loads(stdout)
        assert code == 0 and Image.open(out).size == (64, 64)
        assert all(len(d["trajectory"][k]) == 4 for k in ("score", "grad_norm", "latent_change"))
        assert (traj / "trajectory.json").exists() or any(traj.iterdir())
        assert d["objective"] == "score" and d["negatives"] == []

    def test_generate_self_correct_contrast_objective(self, capsys, tmp_path):
        """--objective contrast: the JSON names the negatives and its scores are log-probabilities (<= 0)."""
        code, stdout, _ = _run(capsys, "generate", "--prompt", "two red circles", "--steps", 2, "--self-correct",
                               "--eta", 100, "--objective", "contrast", "--out", tmp_path / "x.png", "--json")
        d = json.loads(stdout)
        assert code == 0 and d["objective"] == "contrast" and d["negatives"][0] == "three red circles"
        assert all(v <= 0 for v in d["trajectory"]["score"])

    def test_generate_self_correct_x0_read_and_step_range(self, capsys, tmp_path):
        """--read x0 --step-range 1:3: only steps 1 and 2 are corrected (their scores are numbers, the others
        null), each correction costs the x0 read's 2 UNet calls; the JSON says read and range."""
        code, stdout, _ = _run(capsys, "generate", "--prompt", "two red circles", "--steps", 4, "--self-correct",
                               "--eta", 3, "--objective", "contrast", "--read", "x0", "--step-range", "1:3",
                               "--out", tmp_path / "x.png", "--json")
        d = json.loads(stdout)
        assert code == 0 and d["read"] == "x0" and d["step_range"] == [1, 3]
        assert [v is None for v in d["trajectory"]["score"]] == [True, False, False, True]

    def test_generate_best_of_keeps_the_adapters_choice(self, capsys, tmp_path):
        """--best-of 2: two samples, the first at --seed; the kept image is the higher-scored one, and it is the
        plain generate's image at that seed (up to batching's rounding)."""
        out, plain = tmp_path / "x.png", tmp_path / "p.png"
        code, stdout, _ = _run(capsys, "generate", "--prompt", "two red circles", "--steps", 3, "--seed", 5,
                               "--best-of", 2, "--out", out, "--json")
        d = json.loads(stdout)
        assert code == 0 and d["best_of"] == 2 and d["seeds"][0] == 5 and len(d["scores"]) == 2
        assert d["seed"] == d["seeds"][int(np.argmax(d["scores"]))] and d["unet_calls"] == 2 * 3 + 2
        _run(capsys, "generate", "--prompt", "two red circles", "--steps", 3, "--seed", d["seed"], "--out", plain)
        diff = np.abs(np.asarray(Image.open(out), dtype=int) - np.asarray(Image.open(plain), dtype=int))
        assert diff.max() <= 2  # the N samples run in one batch: float rounding moves a pixel level at most

    @pytest.mark.parametrize("args,match", [
        (["--best-of", "1"], "best of N must be a whole number in 2..8"),
        (["--best-of", "x"], "best of N must be a whole number in 2..8"),
        (["--best-of", "2", "--self-correct"], "--best-of and --self-correct are two ways to steer"),
    ])
    def test_bad_best_of(self, capsys, tmp_path, args, match):
        code, _, err = _run(capsys, "generate", "--prompt", "a red circle", "--steps", 2, *args,
                            "--out", tmp_path / "x.png")
        assert code == 2 and err.startswith(match) and err.count("\n") == 1

    @pytest.mark.parametrize("args,match", [
        (["--self-correct", "--step-range", "3:1"], "the corrected steps 3:1 are empty"),
        (["--self-correct", "--step-range", "0:9"], "the corrected steps' STOP must be a whole number in 1..4"),
        (["--self-correct", "--step-range", "5"], "the corrected steps must be START:STOP"),
        (["--step-range", "0:2"], "--step-range needs --self-correct"),
    ])
    def test_bad_step_range(self, capsys, tmp_path, args, match):
        code, _, err = _run(capsys, "generate", "--prompt", "a red circle", "--steps", 4, *args,
                            "--out", tmp_path / "x.png")
        assert code == 2 and err.startswith(match) and err.count("\n") == 1

    @pytest.mark.parametrize("eta", ["-1", "nan", "1e9"])
    def test_bad_eta(self, capsys, tmp_path, eta):
        code, _, err = _run(capsys, "generate", "--prompt", "a red circle", "--self-correct", "--eta", eta,
                            "--out", tmp_path / "x.png")
        assert code == 2 and err.startswith("eta must be") and err.count("\n") == 1

    def test_ground_returns_a_box_in_pixels(self, capsys, render_png):
        code, stdout, _ = _run(capsys, "ground", "--image", render_png, "--expression", "the red circle")
        d = json.loads(stdout)
        x0, y0, x1, y1 = d["box"]
        assert code == 0 and 0 <= x0 < x1 <= 64 and 0 <= y0 < y1 <= 64 and 0 <= d["score"] <= 1

    def test_ground_refuses_unknown_words(self, capsys, render_png):
        code, _, err = _run(capsys, "ground", "--image", render_png, "--expression", "the red dog")
        assert code == 2 and "dog" in err and err.count("\n") == 1

    def test_caption_and_vqa_contract(self, capsys, render_png):
        code, stdout, _ = _run(capsys, "caption", "--image", render_png, "--json")
        d = json.loads(stdout)
        assert code == 0 and isinstance(d["caption"], str) and d["caption"]
        masks = [sum(t == "[MASK]" for t in step) for step in d["steps"]]
        assert masks == sorted(masks, reverse=True) and masks[-1] == 0
        code, stdout, _ = _run(capsys, "vqa", "--image", render_png, "--question", "how many circles ?", "--json")
        d = json.loads(stdout)
        assert code == 0 and d["answer"] and all(s[:4] == ["how", "many", "circles", "?"] for s in d["steps"])

    @pytest.mark.parametrize("question,match", [(" ", "empty"), ("how many dogs ?", "dogs")])
    def test_vqa_bad_questions(self, capsys, render_png, question, match):
        code, _, err = _run(capsys, "vqa", "--image", render_png, "--question", question)
        assert code == 2 and match in err and err.count("\n") == 1


class TestTrainDptFlags:
    @pytest.mark.parametrize("args,match", [
        (["--neg-focus", "subject_colour"], "--neg-focus: expected one of"),
        (["--neg-focus-p", "1.5"], "--neg-focus-p must be"),
        (["--lr-schedule", "linear"], "--lr-schedule: expected one of"),
    ])
    def test_bad_flags(self, capsys, tmp_path, args, match):
        """train-dpt's new flags are checked before anything loads: exit 2, one line."""
        code, _, err = _run(capsys, "train-dpt", "--stage", "2", *args, "--work-dir", tmp_path / "w",
                            "--model", tmp_path / "nope")
        assert code == 2 and match in err and err.count("\n") == 1
