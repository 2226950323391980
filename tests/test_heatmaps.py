"""Heat maps over traces: aggregation, word merges, overlays (on hand-made traces)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from interp.heatmaps import layer_maps, merge_subwords, normalize, overlay, token_heatmaps, word_heatmaps
from models.trace import AttentionTrace, LayerInfo


def _trace(tokens, layers):
    """A trace whose layer `alias` holds the given `[steps, heads, h, w, tokens]` tensor."""
    infos = [LayerInfo(a, a, t.shape[1], t.shape[2], t.shape[3]) for a, t in layers.items()]
    return AttentionTrace(" ".join(t for t in tokens if not t.startswith("<|")), list(tokens),
                          list(range(len(tokens))), [900.0, 500.0], infos, None,
                          {a: t.half() for a, t in layers.items()})


class TestAggregation:
    def test_layer_maps_average_steps_and_heads(self):
        """A layer's map is the mean over the selected steps and heads, tokens first."""
        x = torch.rand(2, 3, 4, 4, 5)
        t = _trace(["<|startoftext|>", "a", "b", "c", "<|endoftext|>"], {"L": x})
        torch.testing.assert_close(layer_maps(t, "L"), x.half().float().mean((0, 1)).permute(2, 0, 1))
        torch.testing.assert_close(layer_maps(t, 0, steps=[1], heads=[2]), x.half().float()[1, 2].permute(2, 0, 1))

    def test_upsampling_keeps_constant_maps(self):
        """A constant low-resolution map stays constant after upsampling to the image size."""
        x = torch.full((2, 1, 4, 4, 3), 0.25)
        t = _trace(["<|startoftext|>", "a", "<|endoftext|>"], {"L": x})
        m = token_heatmaps(t, size=16)
        assert m.shape == (3, 16, 16)
        torch.testing.assert_close(m, torch.full_like(m, 0.25))

    def test_mean_vs_sum_over_layers(self):
        """DAAM's sum over layers is the layer mean times the number of layers."""
        t = _trace(["<|startoftext|>", "a", "<|endoftext|>"],
                   {"A": torch.rand(2, 2, 4, 4, 3), "B": torch.rand(2, 2, 8, 8, 3)})
        torch.testing.assert_close(token_heatmaps(t, layer_reduce="sum", size=8),
                                   2 * token_heatmaps(t, size=8))

    def test_peak_lands_where_the_layer_puts_it(self):
        """A map peaked in one cell peaks at the matching place after upsampling."""
        x = torch.zeros(1, 1, 4, 4, 2)
        x[0, 0, 3, 0, 1] = 1.0
        t = _trace(["<|startoftext|>", "a"], {"L": x})
        m = token_heatmaps(t, size=64)[1]
        r, c = divmod(int(m.argmax()), 64)
        assert r >= 48 and c < 16


class TestWords:
    def test_merge_subwords(self):
        """Sub-word tokens group into their words; BOS/EOS are skipped."""
        toks = ["<|startoftext|>", "a", "zeb", "ra", "red", "<|endoftext|>"]
        assert merge_subwords(toks, ["a", "zebra", "red"]) == [[1], [2, 3], [4]]

    def test_merge_subwords_mismatch(self):
        """Tokens that do not spell the words raise."""
        with pytest.raises(ValueError):
            merge_subwords(["<|startoftext|>", "a", "b"], ["ab", "c"])

    def test_word_maps_sum_subword_maps(self):
        """A word's map is the sum of its tokens' maps."""
        x = torch.rand(1, 1, 4, 4, 4)
        t = _trace(["<|startoftext|>", "zeb", "ra", "<|endoftext|>"], {"L": x})
        words, maps = word_heatmaps(t, words=["zebra"], size=4)
        assert words == ["zebra"]
        torch.testing.assert_close(maps[0], token_heatmaps(t, size=4)[1:3].sum(0))


class TestOverlay:
    def test_normalize_range_and_constant(self):
        """Min-max normalisation maps to [0, 1]; a constant map becomes zeros."""
        n = normalize(np.array([[1.0, 3.0], [2.0, 5.0]]))
        assert n.min() == 0 and n.max() == 1
        assert not normalize(np.ones((3, 3))).any()

    def test_overlay_size_and_changes_image(self):
        """The overlay has the image's size and differs from it where the map is hot."""
        img = Image.new("RGB", (64, 64), (128, 128, 128))
        heat = np.zeros((16, 16))
        heat[:4, :4] = 1
        out = overlay(img, heat)
        assert out.size == (64, 64)
        a = np.asarray(out, np.int16)
        hot, cold = a[:8, :8].reshape(-1, 3).mean(0), a[-8:, -8:].reshape(-1, 3).mean(0)
        assert hot[0] > hot[2] and cold[2] > cold[0]  # jet: hot is red, cold is blue
