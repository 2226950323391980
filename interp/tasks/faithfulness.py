"""Faithful attention: are a model's words where its maps say? Side-by-side word maps of several models on
one held-out render, scored against the world's exact masks, and a model's head atlas.

Orchestration over existing pieces, returning plain data (no UI here):
    * `render_scene`: a held-out scene of the shapes world (`models.shapes.world`), seeded by the caller;
    * `compare_word_maps`: per model the default aggregate word maps of one noised UNet call
      (`interp.tasks.matching.word_maps_for_image`), scored per word with `interp.grounding`'s pointing game
      and energy inside the word's mask (`word_mask_pairs`, `pointing_game`, `energy_inside`);
    * `atlas_for_model`: `interp.head_atlas.atlas_table` over the per-slice grounding rows of
      `interp.tasks.grounding_eval.evaluate_grounding` on held-out renders.

Example:
    >>> scene = render_scene(3, "relation")
    >>> res = compare_word_maps({"token loss": pipe_a, "plain": pipe_b}, world.render(scene), None, 300, scene=scene)
    >>> res["models"]["plain"]["mean_energy"], atlas_for_model(pipe_a)[0]["best"]["energy"]
"""
from __future__ import annotations

import json
import numbers
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
from PIL import Image

from models.shapes import world

from interp.grounding import energy_inside, pointing_game, word_mask_pairs
from interp.tasks.grounding_eval import GROUNDING_SEED, evaluate_grounding
from interp.figures import atlas_figure
from interp.head_atlas import atlas_table
from interp.tasks.matching import DEFAULT_MAP_TIMESTEP, validate_captions, word_maps_for_image

__all__ = ["SCENE_SEED", "render_scene", "compare_word_maps", "atlas_for_model", "save_atlas"]

SCENE_SEED = GROUNDING_SEED  # mixed with the caller's seed: the training data's streams (integer seeds) never meet it


def _int(value, what: str, lo: int | None = None, hi: int | None = None) -> int:
    """An integer (a float only when integral; never a bool) in [lo, hi), or ValueError naming `what`."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{what} must be a whole number, got {value!r}")
    if isinstance(value, numbers.Integral):
        v = int(value)
    else:
        f = float(value)
        if not np.isfinite(f) or f != int(f):
            raise ValueError(f"{what} must be a whole number, got {value!r}")
        v = int(f)
    if lo is not None and v < lo:
        raise ValueError(f"{what} must be at least {lo}, got {v}" if hi is None
                         else f"{what} must lie in {lo}..{hi - 1}, got {v}")
    if hi is not None and v >= hi:
        raise ValueError(f"{what} must lie in {lo}..{hi - 1}, got {v}")
    return v


def _n_train(pipe) -> int:
    return int(pipe.scheduler.config.num_train_timesteps)


def render_scene(seed: int, kind: str) -> world.Scene:
    """A held-out scene of the shapes world (render it with `world.render`).

    Args:
        seed: non-negative; the same seed and kind always give the same scene.
        kind: one of `world.KINDS` ("single", "relation", "count").
    Raises:
        ValueError: a negative or non-integer seed, an unknown kind.
    """
    s = _int(seed, "scene seed", lo=0)
    if not isinstance(kind, str) or kind not in world.KINDS:
        raise ValueError(f"unknown scene kind {kind!r}; expected one of {', '.join(world.KINDS)}")
    return world.sample_scene(np.random.default_rng([SCENE_SEED, s]), kind)


def _mean(values: Sequence[float | None]) -> float | None:
    v = [float(x) for x in values if x is not None]
    return float(np.mean(v)) if v else None


@torch.no_grad()
def compare_word_maps(pipes: Mapping[str, object], image: Image.Image, caption: str | None, timestep: int,
                      noise_seed: int = 0, scene: world.Scene | None = None) -> dict:
    """Each model's default aggregate word maps of one image, and (with `scene`) their faithfulness per word.

    Per model: one noised UNet call at `timestep` with the noise of `noise_seed` (the same draw for every
    model), all layers and heads averaged, sub-word tokens summed per word, maps at the image's size
    (`interp.tasks.matching.word_maps_for_image`). With the scene's exact masks, per word: the pointing game
    (map's argmax inside the word's mask) and the energy inside the mask (`interp.grounding`); relation
    words and "a" have no mask and get None.

    Args:
        pipes: {model name: pipeline}; at least one. The same pipeline may appear under two names.
        image: a PIL image (e.g. `world.render(scene)`).
        caption: the caption; None takes the scene's. With a scene it must be the scene's caption.
        timestep: a training timestep in [0, num_train_timesteps) of every model.
        noise_seed: seeds the noise (non-negative).
        scene: the scene the image renders (masks); None for maps only.
    Returns:
        {"words": [W], "caption", "timestep", "models": {name: {"maps" float32 [W, H, W_img] (>= 0),
         "metrics": [{"word", "word_class", "pointing" (bool | None), "energy" (float | None),
                      "area" (mask area fraction: a uniform map's energy; None without a mask)}] or None
                     without a scene,
         "mean_pointing", "mean_energy" (over the masked words; None without a scene)}}}
    Raises:
        ValueError: no models, an empty caption, a caption that is not the scene's, a bad timestep or seed.
    """
    if not pipes:
        raise ValueError("no models to compare")
    if not isinstance(image, Image.Image):
        raise ValueError(f"expected a PIL image, got {type(image).__name__}")
    if caption is None:
        if scene is None:
            raise ValueError("give a caption or a scene")
        caption = scene.caption
    [caption] = validate_captions([caption], min_count=1)
    if scene is not None and caption != scene.caption:
        raise ValueError(f"caption {caption!r} is not the scene's caption {scene.caption!r}")
    t = _int(timestep, "timestep", lo=0, hi=min(_n_train(p) for p in pipes.values()))
    ns = _int(noise_seed, "noise seed", lo=0)

    words = caption.split()
    classes = world.word_classes(caption)
    pairs = None
    out: dict = {"words": words, "caption": caption, "timestep": t, "models": {}}
    for name, pipe in pipes.items():
        got, maps = word_maps_for_image(pipe, image, caption, timestep=t, noise_seed=ns)
        if list(got) != words:
            raise ValueError(f"model {name!r} returned maps for words {got}, expected {words}")
        maps = maps.float().cpu()
        entry: dict = {"maps": maps, "metrics": None, "mean_pointing": None, "mean_energy": None}
        if scene is not None:
            if maps.shape[-1] != maps.shape[-2]:
                raise ValueError(f"square maps expected, got {tuple(maps.shape[-2:])}")
            if pairs is None:
                pairs = {i: mask for i, _, _, mask in word_mask_pairs(scene, size=int(maps.shape[-1]))}
            metrics = []
            for i, (w, cls) in enumerate(zip(words, classes)):
                mask = pairs.get(i)
                hit = pointing_game(maps[i], mask) if mask is not None else None
                energy = energy_inside(maps[i], mask) if mask is not None else None
                area = float((np.asarray(mask) > 0.5).mean()) if mask is not None else None
                metrics.append({"word": w, "word_class": cls, "pointing": hit, "energy": energy, "area": area})
            entry.update(metrics=metrics, mean_pointing=_mean([m["pointing"] for m in metrics]),
                         mean_energy=_mean([m["energy"] for m in metrics]))
        out["models"][name] = entry
    return out


def atlas_for_model(pipe, n_scenes: int = 12, timesteps: Sequence[int] = (DEFAULT_MAP_TIMESTEP,),
                    seed: int = GROUNDING_SEED, noise_seed: int = 0) -> list[dict]:
    """The head atlas of a model on held-out renders (`interp.head_atlas.atlas_table`).

    The rows are `evaluate_grounding`'s per-slice grounding table (one noised, traced UNet call per
    timestep per scene, every layer x head x step x masked word scored against the exact masks), on the
    scenes `interp.tasks.grounding_eval.held_out_scenes(n_scenes, seed)`, as `cli.py eval-grounding --atlas-dir`.

    Args:
        pipe: a Stable-Diffusion-family pipeline.
        n_scenes: held-out scenes (>= 1), cycling over single / relation / count.
        timesteps: training timesteps in [0, num_train_timesteps), at least one.
        seed: the scenes' seed (>= 0); noise_seed: the noise's seed (>= 0).
    Returns:
        the atlas table: one dict per (layer, head) (see `atlas_table`).
    Raises:
        ValueError: a bad n_scenes, timestep or seed.
    """
    n = _int(n_scenes, "number of scenes", lo=1)
    if isinstance(timesteps, (str, bytes)) or not isinstance(timesteps, Sequence) or not timesteps:
        raise ValueError("timesteps must be a non-empty list of whole numbers")
    hi = _n_train(pipe)
    ts = [_int(t, "timestep", lo=0, hi=hi) for t in timesteps]
    res = evaluate_grounding(pipe, n_scenes=n, timesteps=ts, seed=_int(seed, "scene seed", lo=0),
                             noise_seed=_int(noise_seed, "noise seed", lo=0), return_rows=True)
    return atlas_table(res["rows"])


def save_atlas(table: Sequence[dict], folder: str | Path, metric: str = "energy") -> dict[str, Path]:
    """Write atlas.json (the table and the metric the figure shows) and atlas.png (`atlas_figure`)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    jpath, ppath = folder / "atlas.json", folder / "atlas.png"
    classes = list(dict.fromkeys(c for e in table for c in e["by_class"]))
    jpath.write_text(json.dumps({"metric": metric, "classes": classes, "table": list(table)}, indent=1))
    fig = atlas_figure(table, metric=metric)
    fig.savefig(ppath, dpi=120, bbox_inches="tight")
    return {"json": jpath, "png": ppath}
