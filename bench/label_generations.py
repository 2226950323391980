"""Label generations by eye, and measure how well the scene checker agrees with the labels (issue 20).

Three steps:

1. ``generate``: one image per held-out prompt of the shipped model (prompts drawn with ``--prompt-seed``,
   never the test seed ``EVAL_SEED``; image i uses seed ``--seed + i``; the model's default steps and
   guidance), saved under ``OUT/images/NNN.png`` with ``OUT/prompts.jsonl`` and contact sheets
   ``OUT/sheets/sheet_KK.png`` (cells upscaled, each with its index, caption and a ruler of the small/big
   size threshold) to look at.
2. Labelling is done by a person looking at the sheets; the labels live in ``assets/labels/generations_v1.jsonl``
   (one JSON object per image: index, prompt, kind, seed, label "right"/"wrong", errors, note, regen).
3. ``agreement``: both checker modes (default and strict) against the labels, per kind, with Wilson 95%
   intervals and the confusion, as JSON.

    python -m bench.label_generations generate --out /tmp/labels
    python -m bench.label_generations agreement --images /tmp/labels/images --labels assets/labels/generations_v1.jsonl
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

PROMPT_SEED = 30_001  # neither training (0), the test prompts (EVAL_SEED = 10_007) nor the sweeps (20_011/12)
IMAGE_SEED = 30_001  # image i is generated with seed IMAGE_SEED + i
N_PER_KIND = 70
SHEET_COLS, SHEET_ROWS = 4, 5
CELL_SCALE = 4  # 64 px -> 256 px per cell (nearest neighbour), so that small objects stay visible


def regen_command(n_per_kind: int, prompt_seed: int, seed: int, batch_size: int) -> str:
    """The command that regenerates the labelled images exactly (image i: OUT/images/{i:03d}.png).

    The batch size is part of it: batches of another size may change the CPU results in the last bits.
    """
    return (f"python -m bench.label_generations generate --n-per-kind {n_per_kind} "
            f"--prompt-seed {prompt_seed} --seed {seed} --batch-size {batch_size} --out /tmp/labels")


def contact_sheet(images, captions, indices, cols: int = SHEET_COLS, scale: int = CELL_SCALE):
    """A grid of upscaled images, each with its index and caption above it and a size ruler below it.

    The ruler is as long as the checker's small/big threshold (`checker.SIZE_THRESHOLD_64`), in the cell's scale.
    """
    from PIL import Image, ImageDraw

    from models.shapes import checker

    side = images[0].size[0] * scale
    head, foot, gap = 14, 8, 6
    rows = (len(images) + cols - 1) // cols
    sheet = Image.new("RGB", (cols * (side + gap) + gap, rows * (side + head + foot + gap) + gap), (255, 255, 255))
    d = ImageDraw.Draw(sheet)
    ruler = checker.SIZE_THRESHOLD_64 * side / 64
    for k, (img, cap, idx) in enumerate(zip(images, captions, indices)):
        x = gap + (k % cols) * (side + gap)
        y = gap + (k // cols) * (side + head + foot + gap)
        d.text((x, y), f"{idx:03d} {cap}", fill=(0, 0, 0))
        sheet.paste(img.resize((side, side), Image.NEAREST), (x, y + head))
        yr = y + head + side + 3
        d.line((x, yr, x + ruler, yr), fill=(0, 0, 0), width=2)
    return sheet


def cmd_generate(a) -> int:
    import torch

    from interp.tasks.generation_eval import EVAL_SEED, held_out_prompts
    from models import load_pipeline
    from models.sampling import generate_images

    if a.prompt_seed == EVAL_SEED:
        raise SystemExit("--prompt-seed is the test prompts' seed; label other prompts")
    if a.threads:
        torch.set_num_threads(a.threads)
    out = Path(a.out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "sheets").mkdir(exist_ok=True)
    pairs = held_out_prompts(a.n_per_kind, a.prompt_seed)
    seeds = [a.seed + i for i in range(len(pairs))]
    with open(out / "prompts.jsonl", "w") as f:
        for i, ((kind, cap), s) in enumerate(zip(pairs, seeds)):
            f.write(json.dumps({"index": i, "kind": kind, "prompt": cap, "seed": s,
                                "regen": regen_command(a.n_per_kind, a.prompt_seed, a.seed, a.batch_size)}) + "\n")
    pipe = load_pipeline(a.model)
    caps = [c for _, c in pairs]

    def done(n):
        print(f"{n}/{len(caps)}", flush=True)

    imgs = generate_images(pipe, caps, seeds, batch_size=a.batch_size, callback=done)
    for i, img in enumerate(imgs):
        img.save(out / "images" / f"{i:03d}.png")
    per = SHEET_COLS * SHEET_ROWS
    for k in range(0, len(imgs), per):
        idx = list(range(k, min(k + per, len(imgs))))
        contact_sheet([imgs[i] for i in idx], [caps[i] for i in idx], idx).save(out / "sheets" / f"sheet_{k // per:02d}.png")
    print(f"wrote {len(imgs)} images and {(len(imgs) + per - 1) // per} sheets to {out}")
    return 0


def wilson(k: int, n: int) -> list[float] | None:
    """Wilson 95% interval of k successes out of n (None for n = 0)."""
    from scipy.stats import binomtest

    if n == 0:
        return None
    ci = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    return [float(ci.low), float(ci.high)]


def agreement_table(labels: list[dict], verdicts: dict[str, list[dict]]) -> dict:
    """Per mode and kind (and "all"): agreement of the checker's `correct` with the label, and the confusion.

    Args:
        labels: label records (need "kind" and "label" in {"right", "wrong"}).
        verdicts: mode name -> checker verdicts, aligned with `labels`.

    Returns:
        {mode: {kind: {n, agree, rate, wilson95, checker_right_label_wrong, checker_wrong_label_right,
        both_right, both_wrong, checker_rate, label_rate}}}.
    """
    kinds = sorted({r["kind"] for r in labels}, key=["single", "relation", "count"].index) + ["all"]
    out: dict = {}
    for mode, vs in verdicts.items():
        out[mode] = {}
        for kind in kinds:
            rows = [(r["label"] == "right", bool(v["correct"])) for r, v in zip(labels, vs)
                    if kind == "all" or r["kind"] == kind]
            n = len(rows)
            agree = sum(lab == chk for lab, chk in rows)
            out[mode][kind] = {
                "n": n, "agree": agree, "rate": agree / n if n else None, "wilson95": wilson(agree, n),
                "checker_right_label_wrong": sum(chk and not lab for lab, chk in rows),
                "checker_wrong_label_right": sum(lab and not chk for lab, chk in rows),
                "both_right": sum(lab and chk for lab, chk in rows),
                "both_wrong": sum(not lab and not chk for lab, chk in rows),
                "label_rate": sum(lab for lab, _ in rows) / n if n else None,
                "checker_rate": sum(chk for _, chk in rows) / n if n else None,
            }
    return out


def strict_diagnostics(labels: list[dict], images, strict: list[dict]) -> dict:
    """How often each strict rule fires on the labelled images, and how far the "right" ones are from firing.

    Returns:
        Indices of images with unknown objects / unknown-shape detections / size-word failures; on images
        labelled right: the lowest shape fits (min, 1st, 5th percentile, median), the largest box aspect, and
        the largest unexplained ink blob (pixels) that stays below the unknown-object minimum area.
    """
    import numpy as np

    from models.shapes import checker

    fits, aspect, below = [], 1.0, 0
    for r, im, v in zip(labels, images, strict):
        if r["label"] != "right":
            continue
        fits += v["shape_fits"]
        for d in v["detections"]:
            w, h = d["box"][2] - d["box"][0], d["box"][3] - d["box"][1]
            aspect = max(aspect, max(w, h) / min(w, h))
        below = max([below, *(u.area for u in checker.unknown_objects(im, min_area_64=1)
                              if u.area < checker.UNKNOWN_MIN_AREA_64)])
    return {
        "unknown_objects": [r["index"] for r, v in zip(labels, strict) if v["unknown_objects"]],
        "unknown_shapes": [r["index"] for r, v in zip(labels, strict) if any(d["shape"] == "unknown" for d in v["detections"])],
        "size_word_captions": sum("size_ok" in v for v in strict),
        "size_failures": [r["index"] for r, v in zip(labels, strict) if v.get("size_ok") is False],
        "right_labelled": {"shape_fit_min_p1_p5_median": [round(float(x), 3) for x in np.percentile(fits, [0, 1, 5, 50])],
                           "aspect_max": round(aspect, 3), "largest_blob_below_min_area": below,
                           "min_shape_fit": checker.MIN_SHAPE_FIT, "max_aspect": checker.MAX_ASPECT,
                           "unknown_min_area_64": checker.UNKNOWN_MIN_AREA_64},
    }


def cmd_agreement(a) -> int:
    from PIL import Image

    from models.shapes import checker

    labels = [json.loads(line) for line in open(a.labels) if line.strip()]
    images = [Image.open(Path(a.images) / f"{r['index']:03d}.png").convert("RGB") for r in labels]
    verdicts = {"default": [checker.check(im, r["prompt"]) for im, r in zip(images, labels)],
                "strict": [checker.check(im, r["prompt"], strict=True) for im, r in zip(images, labels)]}
    res = {"command": " ".join(["python", "-m", "bench.label_generations", *sys.argv[1:]]),
           "labels": a.labels, "n": len(labels), "agreement": agreement_table(labels, verdicts),
           "strict_diagnostics": strict_diagnostics(labels, images, verdicts["strict"])}
    if a.disagreements:
        rows = []
        for r, vd, vs in zip(labels, verdicts["default"], verdicts["strict"]):
            if vd["correct"] != (r["label"] == "right") or vs["correct"] != (r["label"] == "right"):
                rows.append({"index": r["index"], "kind": r["kind"], "prompt": r["prompt"], "label": r["label"],
                             "errors": r.get("errors", []), "note": r.get("note", ""),
                             "default": vd["correct"], "strict": vs["correct"],
                             "detections": [(d["color"], d["shape"], d["area"]) for d in vs["detections"]],
                             "unknown_objects": vs.get("unknown_objects", []), "size_ok": vs.get("size_ok")})
        Path(a.disagreements).write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    text = json.dumps(res, indent=2)
    if a.out:
        Path(a.out).write_text(text + "\n")
    print(text)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("generate", help="generate the images to label, and contact sheets")
    g.add_argument("--out", default="/tmp/labels")
    g.add_argument("--model", default=None, help="bundled model when omitted")
    g.add_argument("--n-per-kind", type=int, default=N_PER_KIND)
    g.add_argument("--prompt-seed", type=int, default=PROMPT_SEED)
    g.add_argument("--seed", type=int, default=IMAGE_SEED)
    g.add_argument("--batch-size", type=int, default=16)
    g.add_argument("--threads", type=int, default=None)
    g.set_defaults(func=cmd_generate)
    s = sub.add_parser("agreement", help="both checker modes against the labels")
    s.add_argument("--images", default="/tmp/labels/images")
    s.add_argument("--labels", default="assets/labels/generations_v1.jsonl")
    s.add_argument("--out", default=None, help="also write the JSON here")
    s.add_argument("--disagreements", default=None, help="write the images where a mode disagrees (JSONL)")
    s.set_defaults(func=cmd_agreement)
    a = p.parse_args(argv)
    return a.func(a)


if __name__ == "__main__":
    sys.exit(main())
