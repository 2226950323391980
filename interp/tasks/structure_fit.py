"""Fit what the structure score would otherwise assume: each relation word's direction, learned from the true
captions of a benchmark's train split (`interp.structure.learn_relation_directions`).

    >>> dirs = fit_relation_directions(pipe, "winoground", MatchOptions())
    >>> StructureScorer(config=StructureConfig(directions=dirs)).score(pipe, image, captions, MatchOptions())
"""
from __future__ import annotations

from pathlib import Path

from models.shapes.benchmarks import Benchmark, load_benchmark
from models.unet_pass import encode_image, noised_unet_pass

from interp.scorers import MatchOptions
from interp.structure import StructureConfig, learn_relation_directions, relation_displacement

__all__ = ["fit_relation_directions"]


def fit_relation_directions(pipe, benchmark: Benchmark | str | Path, options: MatchOptions = MatchOptions(),
                            split: str = "train", config: StructureConfig = StructureConfig()
                            ) -> tuple[tuple[str, tuple[float, float]], ...]:
    """Relation directions from the word maps of each train image under its true caption (one noised pass each,
    at `options.timesteps` / `options.noise_seed`). Empty when the split has no relation captions."""
    b = benchmark if isinstance(benchmark, Benchmark) else load_benchmark(benchmark)
    found = []
    for it in b.split(split):
        for k, a in enumerate(it.answers):
            cap = it.captions[a]
            res = noised_unet_pass(pipe, encode_image(pipe, it.image(k)), [cap], list(options.timesteps),
                                   noise_seed=options.noise_seed, logits=False)
            d = relation_displacement(res.traces[0], cap, config)
            if d is not None:
                found.append(d)
    return learn_relation_directions(found) if found else ()
