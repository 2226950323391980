"""Head atlas: per-(layer, head) word-class table from grounding rows, and its figures."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from interp.grounding import grounding_table
from interp.head_atlas import atlas_grid, atlas_table
from interp.tasks.faithfulness import save_atlas
from models.shapes import world
from models.trace import AttentionTrace, LayerInfo

BOS, EOS = "<|startoftext|>", "<|endoftext|>"

# (layer, head) -> {word_class: (energy at t=100, energy at t=900)}; pointing / iou derived below
ENERGY = {
    ("down.0", 0): {"color": (0.9, 0.2), "shape": (0.1, 0.5), "count": (0.4, 0.4)},  # color overall, shape at t=900
    ("down.0", 1): {"color": (0.3, 0.3), "shape": (0.7, 0.6), "size": (0.2, 0.2)},   # shape
    ("up.0", 0): {"color": (0.2, 0.2), "count": (0.8, 0.9)},                          # count
    ("up.0", 1): {"size": (0.6, 0.7), "shape": (0.1, 0.1)},                           # size
    ("up.0", 2): {"color": (0.5, 0.5), "shape": (0.5, 0.5)},                          # tie: first class wins
}


def _rows(energy=ENERGY):
    """Two rows (two words) per (layer, head, timestep, class) with the table's energies; iou = 1 - energy
    (so iou's best is another class), pointing = energy > 0.45."""
    rows = []
    for (layer, head), by_class in energy.items():
        for step, t in enumerate((100.0, 900.0)):
            for cls, es in by_class.items():
                for jitter in (-0.05, 0.05):
                    e = es[step] + jitter
                    rows.append({"layer": layer, "head": head, "step": step, "timestep": t, "word_class": cls,
                                 "word": cls, "energy": e, "iou": 1 - e, "pointing": e > 0.45})
    rows.append({"layer": "down.0", "head": 0, "step": 0, "timestep": 100.0, "word_class": "relation",
                 "word": "left", "energy": 5.0, "iou": 5.0, "pointing": True})  # ignored class
    return rows


@pytest.fixture(scope="module")
def table():
    return atlas_table(_rows())


class TestAtlasTable:
    def test_one_entry_per_layer_head_in_order(self, table):
        """Entries follow the rows' layer order, heads ascending."""
        assert [(e["layer"], e["head"]) for e in table] == list(ENERGY)

    def test_best_class_per_head(self, table):
        """The best class by energy is the class with the highest mean energy."""
        best = {(e["layer"], e["head"]): e["best"]["energy"]["class"] for e in table}
        assert best == {("down.0", 0): "color", ("down.0", 1): "shape", ("up.0", 0): "count",
                        ("up.0", 1): "size", ("up.0", 2): "color"}
        first = table[0]
        assert first["best_class"] == "color" and first["best_score"] == pytest.approx(0.55)

    def test_means_per_class_and_ignored_classes(self, table):
        """by_class holds the mean of every metric and the row count; other classes are left out."""
        bc = table[0]["by_class"]
        assert set(bc) == {"color", "shape", "count"}
        assert bc["color"]["energy"] == pytest.approx((0.9 + 0.2) / 2)
        assert bc["color"]["iou"] == pytest.approx(1 - (0.9 + 0.2) / 2)
        assert bc["color"]["pointing"] == pytest.approx(0.5)  # 0.85 and 0.95 point, 0.15 and 0.25 do not
        assert bc["color"]["n"] == 4
        assert table[0]["n"] == 12

    def test_best_depends_on_metric(self, table):
        """Each metric has its own best class (iou = 1 - energy here picks the weakest energy class)."""
        assert table[0]["best"]["iou"]["class"] == "shape"
        other = atlas_table(_rows(), metric="iou")
        assert other[0]["best_class"] == "shape"

    def test_per_timestep_best(self, table):
        """Per timestep (ascending) the best class can differ from the overall one."""
        ts = table[0]["by_timestep"]
        assert [t["timestep"] for t in ts] == [100.0, 900.0]
        assert [t["best"]["energy"]["class"] for t in ts] == ["color", "shape"]
        assert ts[1]["by_class"]["shape"]["energy"] == pytest.approx(0.5)

    def test_unknown_metric(self):
        """An unknown metric is a ValueError."""
        with pytest.raises(ValueError):
            atlas_table(_rows(), metric="accuracy")

    def test_grid_has_gaps_for_missing_heads(self, table):
        """The grid spans every head seen; a layer without that head has an empty cell."""
        layers, heads, cells = atlas_grid(table)
        assert layers == ["down.0", "up.0"] and heads == [0, 1, 2]
        assert cells[0][2] is None
        assert cells[1][0]["class"] == "count"
        _, _, at900 = atlas_grid(table, timestep=900.0)
        assert at900[0][0]["class"] == "shape"

    def test_from_grounding_table(self):
        """On a hand-made trace, the head that attends to the object for the color word is a color head."""
        cap = "a red circle"
        scene = world.Scene("single", (world.Obj("red", "circle", "big", (8.0, 8.0, 32.0, 32.0)),), cap)
        tokens = [BOS, "a", "red", "circle", EOS]
        x = torch.full((1, 2, 8, 8, len(tokens)), 0.01)
        x[0, 0, 1:4, 1:4, 2] = 1.0  # head 0: "red" on the object, "circle" uniform
        x[0, 1, 1:4, 1:4, 3] = 1.0  # head 1: "circle" on the object, "red" uniform
        tr = AttentionTrace(cap, tokens, list(range(len(tokens))), [300.0], [LayerInfo("L", "L", 2, 8, 8)], None,
                            {"L": x.half()})
        t = atlas_table(grounding_table(tr, scene))
        assert [(e["head"], e["best_class"]) for e in t] == [(0, "color"), (1, "shape")]


class TestFigures:
    def test_matplotlib_atlas(self, table):
        """The figure has a layers x heads image, one score text per filled cell and a legend of the classes."""
        from matplotlib.figure import Figure

        from interp.figures import CLASS_COLORS, atlas_figure

        fig = atlas_figure(table)
        assert isinstance(fig, Figure)
        ax = fig.axes[0]
        img = np.asarray(ax.images[0].get_array())
        assert img.shape[:2] == (2, 3)
        assert len(ax.texts) == len(table)
        assert sorted(t.get_text() for t in fig.legends[0].get_texts()) == ["color", "count", "shape", "size"]
        # hue: the count cell is tinted toward the count color, more than toward the others
        def unit(v):
            return (1 - np.asarray(v, float)) / np.linalg.norm(1 - np.asarray(v, float))

        dist = {c: np.linalg.norm(unit(img[1, 0]) - unit(rgb)) for c, rgb in CLASS_COLORS.items()}
        assert min(dist, key=dist.get) == "count"
        assert np.allclose(img[0, 2], img[0, 2][0])  # the empty cell is gray

    def test_plotly_atlas(self, table):
        """The plotly figure is a heatmap with one value per cell, NaN for missing heads, and hover text."""
        import plotly.graph_objects as go

        from interp.figures import atlas_plotly

        fig = atlas_plotly(table)
        assert isinstance(fig, go.Figure)
        hm = fig.data[0]
        assert hm.type == "heatmap"
        z = np.asarray(hm.z, float)
        assert z.shape == (2, 3) and math.isnan(z[0, 2])
        assert "best: count" in hm.customdata[1][0]
        assert int(z[1][0]) != int(z[0][0])  # different best classes land in different color blocks

    def test_save_atlas(self, table, tmp_path):
        """save_atlas writes atlas.json (the table) and a PNG."""
        out = save_atlas(table, tmp_path / "atlas")
        d = json.loads(out["json"].read_text())
        assert d["metric"] == "energy" and len(d["table"]) == len(table)
        assert out["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
