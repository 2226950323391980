"""Export what a view shows: images and figures as PNG, a generation's trace as safetensors with a JSON manifest,
scores and tables as JSON and CSV. Every writer returns the paths it wrote; every format loads back
(`load_trace_export`, `json.load`, `csv.reader`).

Example:
    >>> paths = export_generation(gen, "out/")        # image.png, word_maps.png, trace.safetensors, manifest.json
    >>> tr, manifest = load_trace_export(paths[-1])
    >>> export_table(["rank", "caption", "score"], rows, "out/", "ranking")   # ranking.json, ranking.csv
"""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any, Sequence

from models.trace import AttentionTrace

from interp.figures import word_map_sheet
from interp.tasks.workbench import TracedGeneration

__all__ = ["export_generation", "export_table", "export_json", "export_figure", "load_trace_export"]


def _clean(v: Any) -> Any:
    """JSON-safe: NaN / inf -> None, numpy scalars -> Python."""
    if hasattr(v, "item") and not isinstance(v, (list, dict)):
        try:
            v = v.item()
        except (ValueError, AttributeError):
            pass
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {str(k): _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    return v


def export_json(obj: Any, path: str | Path) -> Path:
    """`obj` as indented JSON (NaN written as null)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_clean(obj), indent=1))
    return path


def export_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], folder: str | Path, stem: str) -> list[Path]:
    """A table as `<stem>.json` (a list of {header: value}) and `<stem>.csv`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rows = [list(r) for r in rows]
    j = export_json([dict(zip(headers, r)) for r in rows], folder / f"{stem}.json")
    c = folder / f"{stem}.csv"
    with c.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(headers)
        w.writerows(_clean(rows))
    return [j, c]


def export_figure(fig, path: str | Path, dpi: int = 120) -> Path:
    """A matplotlib figure as PNG (plotly figures carry their own PNG button in the app)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    return path


def export_generation(gen: TracedGeneration, folder: str | Path) -> list[Path]:
    """A generation: `image.png`, `word_maps.png` (labelled, with the colour scale), `trace.safetensors` (every
    layer x head x step map, and the queries when kept) and `manifest.json` (settings, words, their token columns,
    layers, timesteps, tensor shapes) — the manifest last."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    img = folder / "image.png"
    gen.image.save(img)
    sheet = export_figure(word_map_sheet(gen.image, gen.words, gen.word_maps), folder / "word_maps.png")
    tr = gen.trace.save(folder / "trace.safetensors")
    manifest = {
        "format": "discolens-trace/1", "trace": tr.name, "image": img.name, "word_maps": sheet.name,
        "settings": gen.settings, "words": gen.words, "word_token_columns": gen.groups, "tokens": gen.trace.tokens,
        "timesteps": gen.trace.timesteps, "layers": [l.alias for l in gen.trace.layers],
        "shapes": {f"probs/{k}": list(v.shape) for k, v in gen.trace.probs.items()}
        | {f"queries/{k}": list(v.shape) for k, v in gen.trace.queries.items()},
        "dims": {"probs": "[steps, heads, h, w, tokens]", "queries": "[steps, heads, h, w, head_dim]"},
    }
    return [img, sheet, tr, export_json(manifest, folder / "manifest.json")]


def load_trace_export(manifest_path: str | Path) -> tuple[AttentionTrace, dict]:
    """The trace and manifest of an `export_generation` folder, from its manifest's path."""
    manifest_path = Path(manifest_path)
    manifest = json.loads(manifest_path.read_text())
    return AttentionTrace.load(manifest_path.parent / manifest["trace"]), manifest
