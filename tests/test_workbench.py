"""The Generate & look tab's task functions on the tiny pipeline: the stored trace's views, any word's map, edits."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from interp.tasks import workbench as wb

PROMPT = "a red circle left of a blue square"


@pytest.fixture(scope="module")
def gen(tiny_pipe):
    return wb.traced_generation(tiny_pipe, PROMPT, seed=0, steps=3, guidance=3.0)


class TestTracedGeneration:
    def test_words_groups_previews_and_queries(self, gen):
        """One group of token columns per word, one x0 preview per step, queries for every layer."""
        assert gen.words == PROMPT.split() and gen.groups == [[i] for i in range(1, 9)]
        assert len(gen.previews) == gen.trace.n_steps == 3 and gen.previews[0].size == gen.image.size
        assert set(gen.trace.queries) == set(gen.trace.probs)
        s, h, y, x, _ = gen.trace.probs["mid.attn.0"].shape
        assert gen.trace.queries["mid.attn.0"].shape[:4] == (s, h, y, x)
        assert gen.settings == {"prompt": PROMPT, "negative_prompt": "", "seed": 0, "steps": 3, "guidance": 3.0,
                                "scheduler": "model default"}

    def test_queries_reproduce_the_stored_maps(self, tiny_pipe, gen):
        """softmax(q k^T * scale) over the padded prompt's keys gives back the traced probabilities."""
        tok = tiny_pipe.tokenizer
        ids = tok(PROMPT, padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids
        with torch.no_grad():
            hp = tiny_pipe.text_encoder(ids)[0][0]
            mods = dict(tiny_pipe.unet.named_modules())
            for l in gen.trace.layers:
                a = mods[l.name]
                k = a.to_k(hp).reshape(hp.shape[0], a.heads, -1).permute(1, 0, 2)
                p = (torch.einsum("shxyd,hkd->shxyk", gen.trace.queries[l.alias].float(), k) * a.scale).softmax(-1)
                assert torch.allclose(p[..., :gen.trace.n_real], gen.trace.probs[l.alias].float(), atol=2e-3)

    def test_same_seed_same_image(self, tiny_pipe, gen):
        """Generating again with the same settings gives the same pixels."""
        again = wb.traced_generation(tiny_pipe, PROMPT, seed=0, steps=3, guidance=3.0)
        assert again.image.tobytes() == gen.image.tobytes()

    def test_scheduler_and_negative_prompt(self, tiny_pipe, gen):
        """Another scheduler or a negative prompt changes the image; the model's scheduler is restored after."""
        before = type(tiny_pipe.scheduler)
        other = wb.traced_generation(tiny_pipe, PROMPT, seed=0, steps=3, guidance=3.0, scheduler="Euler")
        neg = wb.traced_generation(tiny_pipe, PROMPT, seed=0, steps=3, guidance=3.0, negative_prompt="a green square")
        assert type(tiny_pipe.scheduler) is before and len(other.previews) == 3
        assert other.image.tobytes() != gen.image.tobytes() and neg.image.tobytes() != gen.image.tobytes()
        with pytest.raises(ValueError, match="unknown scheduler"):
            wb.traced_generation(tiny_pipe, PROMPT, steps=2, scheduler="nope")

    def test_progress_is_called_per_step(self, tiny_pipe):
        """The progress callback sees every step."""
        seen = []
        wb.traced_generation(tiny_pipe, "a red circle", steps=3, progress=lambda i, n: seen.append((i, n)))
        assert seen == [(1, 3), (2, 3), (3, 3)]


class TestViews:
    def test_step_frame(self, gen):
        """The player's frame: the step's preview, the word's map over it, and a caption naming step and word."""
        prev, heat, caption = wb.step_frame(gen, 2, 1)
        assert prev is gen.previews[1] and heat.size == prev.size and "step 2 of 3" in caption and "circle" in caption
        with pytest.raises(ValueError, match="step"):
            wb.step_frame(gen, 2, 3)
        with pytest.raises(ValueError, match="words"):
            wb.step_frame(gen, 8, 0)

    def test_model_view_is_layers_by_heads(self, gen):
        """One thumbnail per layer x head, row-major, labelled by layer alias and head."""
        cells = wb.model_view(gen, 2, 0)
        heads = max(l.heads for l in gen.trace.layers)
        assert len(cells) == len(gen.trace.layers) * heads
        assert [c for _, c in cells[:heads]] == [f"{gen.trace.layers[0].alias} h{h}" for h in range(heads)]
        assert len({im.tobytes() for im, _ in cells}) > 1

    def test_slice_overlays_by_generation(self, gen):
        """Slicing a generation labels maps by its words; a step out of range is an error."""
        assert [w for _, w in wb.slice_overlays(gen.image, gen, "all", "all", "1 (t=0)")] == gen.words
        with pytest.raises(ValueError, match="step"):
            wb.slice_overlays(gen.image, gen, "all", "all", "9")

    def test_any_word_map(self, tiny_pipe, gen):
        """A word not in the prompt gets a non-negative map at the image size, from the stored queries."""
        calls = []
        h = tiny_pipe.unet.register_forward_pre_hook(lambda *a: calls.append(1))
        try:
            m, toks = wb.any_word_map(tiny_pipe, gen, "green")
        finally:
            h.remove()
        assert calls == [] and toks == ["green"] and m.shape == (gen.image.height, gen.image.width)
        assert float(m.min()) >= 0 and float(m.max()) <= 1
        m2, _ = wb.any_word_map(tiny_pipe, gen, "triangle")
        assert not torch.allclose(m, m2)

    def test_any_word_needs_queries(self, tiny_pipe, gen):
        """A trace without queries says so."""
        import dataclasses

        bare = dataclasses.replace(gen, trace=dataclasses.replace(gen.trace, queries={}))
        with pytest.raises(ValueError, match="no queries"):
            wb.any_word_map(tiny_pipe, bare, "green")


class TestEdit:
    def test_edit_changes_the_image_and_scale_one_does_not(self, tiny_pipe, gen):
        """Suppressing a word changes the image; scale 1 reproduces it; the processors come back after."""
        procs = dict(tiny_pipe.unet.attn_processors)
        off = wb.edited_generation(tiny_pipe, gen, 2, 0.0)
        same = wb.edited_generation(tiny_pipe, gen, 2, 1.0)
        assert off.image.tobytes() != gen.image.tobytes()
        assert np.abs(np.asarray(same.image, float) - np.asarray(gen.image, float)).max() <= 1
        assert dict(tiny_pipe.unet.attn_processors) == procs
        boxed = wb.edited_generation(tiny_pipe, gen, 2, 0.0, box=(0, 0, 0.5, 1))
        assert boxed.image.tobytes() not in (gen.image.tobytes(), off.image.tobytes())

    @pytest.mark.parametrize("text,ok", [("", None), ("0 0 .5 1", (0, 0, 0.5, 1)), ("0,0,1,1", (0, 0, 1, 1)),
                                         ("1 0 0 1", False), ("0 0 1", False), ("a b c d", False), ("nan 0 1 1", False)])
    def test_parse_box(self, text, ok):
        """Boxes are four fractions with x0 < x1 and y0 < y1; empty is the whole image."""
        if ok is False:
            with pytest.raises(ValueError, match="box"):
                wb.parse_box(text)
        else:
            assert wb.parse_box(text) == ok


class TestTraceCache:
    def test_lru_bounded_in_bytes(self):
        """The oldest entries go once the bytes exceed the bound; a get refreshes an entry; unknown keys say why."""
        cache = wb.TraceCache(250, size_of=lambda v: 100)
        a, b = cache.put("a"), cache.put("b")
        assert cache.get(a) == "a"
        c = cache.put("c")
        assert len(cache) == 2 and cache.bytes == 200 and cache.get(a) == "a" and cache.get(c) == "c"
        with pytest.raises(ValueError, match="generate an image first"):
            cache.get(b)
        with pytest.raises(ValueError, match="generate an image first"):
            cache.get(None)

    def test_a_big_entry_stays_alone(self):
        """An entry larger than the bound is kept (the newest result is always there)."""
        cache = wb.TraceCache(10, size_of=len)
        cache.put("x" * 5)
        k = cache.put("y" * 50)
        assert len(cache) == 1 and cache.get(k) == "y" * 50
