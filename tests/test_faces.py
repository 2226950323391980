"""The app and the CLI refuse the same bad inputs with the same one-line message (models.limits, interp.tasks.inputs)."""
from __future__ import annotations

import gradio as gr
import numpy as np
import pytest

import app
import cli
from interp.scorers import scorer_names
from models.limits import MAX_SEED, MAX_STEPS
from models.shapes import world

GOOD = dict(prompt="a red circle", seed="0", steps="2", guidance="3")
CAPS = ["a red circle left of a blue square", "a blue square left of a red circle"]


@pytest.fixture(scope="module")
def png(tmp_path_factory):
    p = tmp_path_factory.mktemp("faces") / "scene.png"
    world.render(world.scene_from_caption(CAPS[0], np.random.default_rng(0))).save(p)
    return p


@pytest.fixture(scope="module")
def bad_png(tmp_path_factory):
    p = tmp_path_factory.mktemp("faces_bad") / "bad.png"
    p.write_text("not an image")
    return p


# (case, face, overrides, message): "generate" cases run app.generate and `cli.py generate`; "match" cases run
# app.match and `cli.py rank`. `{bad}` stands for the unreadable image's path.
CASES = [
    ("empty prompt", "generate", {"prompt": ""}, "the prompt is empty"),
    ("OOV prompt", "generate", {"prompt": "a red zebra"}, "words outside the model's vocabulary: zebra; it knows: "
     + ", ".join(world.WORDS)),
    ("steps 0", "generate", {"steps": "0"}, f"steps must be a whole number in 1..{MAX_STEPS}, got 0"),
    ("steps 10000", "generate", {"steps": "10000"}, f"steps must be a whole number in 1..{MAX_STEPS}, got 10000"),
    ("guidance -5", "generate", {"guidance": "-5"}, "guidance must be a number in 0..30, got -5"),
    ("guidance nan", "generate", {"guidance": "nan"}, "guidance must be a number in 0..30, got nan"),
    ("seed 1e20", "generate", {"seed": "1e20"},
     f"seed must be a whole number in 0..{MAX_SEED}, got 100000000000000000000"),
    ("seed -1", "generate", {"seed": "-1"}, f"seed must be a whole number in 0..{MAX_SEED}, got -1"),
    ("timestep out of range", "match", {"timesteps": ["1000"]}, "timestep must be a whole number in 0..999, got 1000"),
    ("one caption only", "match", {"captions": CAPS[:1]}, "ranking needs at least 2 captions, got 1"),
    ("unknown scorer", "match", {"scorer": "nope"},
     f"unknown scorer 'nope'; choose one of {', '.join(scorer_names())}"),
    ("unreadable image", "match", {"image": "{bad}"}, "cannot read image {bad}: UnidentifiedImageError"),
]


def _app_value(key: str, v: str):
    """The app's widgets give numbers, not text."""
    return float(v) if key in ("seed", "steps", "guidance") else v


@pytest.mark.parametrize("case,face,over,message", CASES, ids=[c[0] for c in CASES])
def test_app_and_cli_say_the_same(case, face, over, message, tiny_pipe_dir, png, bad_png, tmp_path, capsys):
    """The app raises gr.Error(M); the CLI exits 2 with exactly M on stderr."""
    model = str(tiny_pipe_dir)
    message = message.replace("{bad}", str(bad_png))
    if face == "generate":
        v = {**GOOD, **over}
        with pytest.raises(gr.Error) as err:
            app.generate(v["prompt"], model, *(_app_value(k, v[k]) for k in ("seed", "steps", "guidance")))
        argv = ["generate", "--prompt", v["prompt"], "--seed", v["seed"], "--steps", v["steps"],
                "--guidance", v["guidance"], "--model", model, "--out", str(tmp_path / "x.png")]
    else:
        v = {"image": str(png), "captions": CAPS, "scorer": "lse", "timesteps": ["300"], **over}
        v["image"] = v["image"].replace("{bad}", str(bad_png))
        with pytest.raises(gr.Error) as err:
            app.match(v["image"], "\n".join(v["captions"]), model, v["scorer"], " ".join(v["timesteps"]))
        argv = ["rank", "--image", v["image"], "--captions", *v["captions"], "--scorer", v["scorer"],
                "--timesteps", *v["timesteps"], "--model", model]
    assert err.value.message == message
    code = cli.main(argv)
    assert (code, capsys.readouterr().err) == (2, message + "\n")


def test_tuned_model_missing_says_how_to_train(tiny_pipe_dir, tmp_path, capsys):
    """A model without a DPT stage-2 LoRA: the app's Self-correction with "DPT-tuned model" and `cli.py generate
    --lora` (plain and --self-correct) say the same line, with the command that trains one."""
    model = str(tiny_pipe_dir)
    with pytest.raises(gr.Error) as err:
        app.self_correction("a red circle", model, 0, 2, 3.0, 1.0, "noise_only", True)
    message = err.value.message
    assert message.startswith("no DPT stage-2 LoRA in ") and "train-dpt --stage 2" in message
    capsys.readouterr()  # the app's model loading may have written progress bars
    for extra in ([], ["--self-correct"]):
        code = cli.main(["generate", "--prompt", "a red circle", "--steps", "2", "--model", model,
                         "--out", str(tmp_path / "x.png"), "--lora", *extra])
        assert (code, capsys.readouterr().err) == (2, message + "\n")


def test_contrast_objective_outside_the_grammar(tiny_pipe_dir, tmp_path, capsys):
    """Self-correction with the contrast objective on a prompt outside the shapes-world grammar (no negatives to
    contrast with): the app and `cli.py generate --self-correct --objective contrast` say the same line."""
    model = str(tiny_pipe_dir)
    with pytest.raises(gr.Error) as err:
        app.self_correction("a red circle and a red circle", model, 0, 2, 3.0, 1.0, "noise_only", False, "contrast")
    message = err.value.message
    assert message.startswith("the contrast objective needs negatives")
    capsys.readouterr()
    code = cli.main(["generate", "--prompt", "a red circle and a red circle", "--steps", "2", "--model", model,
                     "--out", str(tmp_path / "x.png"), "--self-correct", "--objective", "contrast"])
    assert (code, capsys.readouterr().err) == (2, message + "\n")
