"""Scene checker: detect the shapes in an image and judge it against a caption of the shapes world.

Detection works without any learned model, so it can score generated (imperfect) images:

1. Every pixel is explained as an alpha blend between the background and one palette color (`world.COLORS`;
   the background is the median grey of the image, `world.BACKGROUND` if too little of it is grey): for each
   color the best blend weight ``alpha`` in [0, 1] and the residual distance to that blend are computed, and
   the color with the smallest residual wins. A pixel is foreground if its alpha is at least 0.5 (half
   covered), its residual is small (close to a palette color or a blend of it) and it is saturated (grey-ish
   pixels are background). Anti-aliased edges therefore keep the object's color instead of snapping to a
   neighbouring palette color (a red/background blend is nearer to orange than to red or the background).
2. Foreground pixels are grouped into 8-connected components (`scipy.ndimage.label`); a component is named
   after the color most of its pixels vote for (a component with two strong colors is split by color), and
   components smaller than ~12 pixels (at 64x64; scaled with the image area) are dropped.
3. The shape is the ideal circle / square / upward triangle filling the component's box whose coverage best
   matches the component's soft coverage (alpha), by soft IoU. The box may grow by a pixel or so, and the
   ideal shape may be blurred a little, which keeps the decision robust to noise and blurry edges (a fill-ratio
   rule, area / box area: ~1 square, ~pi/4 circle, ~1/2 triangle, is the same idea but breaks when a single
   stray pixel widens the box).

`check` then parses the caption with `world.parse_caption` and applies the rules of its kind (see `check`).

Strict mode (`check(..., strict=True)`, issue 20) also counts what the steps above let pass: ink (pixels at least
`INK_DIST` from the background) that no detection explains, i.e. off-palette or greyish blobs and palette specks
under the minimum area, forms unknown objects (`unknown_objects`); a detection whose best shape fit is below
`MIN_SHAPE_FIT` or whose box is elongated (`MAX_ASPECT`) has an unknown shape; and a single caption's size word
must agree with the object's extent. The default mode is unchanged. Agreement of both modes with labels of
generated images: docs/checker.md.

Example:
    >>> rng = np.random.default_rng(0)
    >>> scene = world.sample_scene(rng, "relation")
    >>> image = world.render(scene)
    >>> check(image, scene.caption)["correct"]
    True
    >>> check(image, world.negatives(scene)["flip_relation"])["relation_ok"]
    False
    >>> check(image, scene.caption, strict=True)["unknown_objects"]
    []
"""
from __future__ import annotations

import dataclasses
import itertools
from typing import Any

import numpy as np
from PIL import Image
from scipy import ndimage

from models.shapes import world

_PALETTE_NAMES: tuple[str, ...] = tuple(world.COLORS)
_PALETTE = np.array([world.COLORS[c] for c in _PALETTE_NAMES], np.float32)  # [C, 3]
_BG = np.array(world.BACKGROUND, np.float32)

# Pixel classification (RGB units 0..255).
MIN_ALPHA = 0.5  # blend weight from which a pixel counts as covered by an object
MAX_RESIDUAL = 60.0  # distance to the best background/color blend above which a pixel is ignored
MIN_SATURATION = 40.0  # max(rgb) - min(rgb) below which a pixel is grey-ish, i.e. background
# Components.
MIN_AREA_64 = 12  # smallest kept component, in pixels at 64x64 (scaled with the image area)
SPLIT_SHARE = 0.3  # a second color with at least this share of a component (and MIN_AREA pixels) splits it
# Shape: the ideal shape (circle, square, upward triangle) filling the box that best matches the soft coverage.
TEMPLATE_SUPERSAMPLE = 4  # samples per pixel and axis at 64x64 (fewer in larger images)
# Pixel sizes below are at 64x64 and scale with the image width.
BOX_GROW = (0.0, 0.5, 1.0)  # pixels each side of the detected box is grown by when fitting a shape
BOX_GROW_TOP = (0.0, 1.0, 2.0)  # extra pixels at the top
TEMPLATE_BLUR = (0.0, 0.7, 1.4)  # gaussian blurs (pixels) the ideal shapes are also compared with
# Size: extents (in pixels at 64x64) below this are "small", above "big" (midway between world.SIZE_PX ranges).
SIZE_THRESHOLD_64 = (world.SIZE_PX["small"][1] + world.SIZE_PX["big"][0]) / 2
SQUARE_INSET = 0.88  # world._draw draws squares at 88% of the object's extent
# Strict mode (`check(..., strict=True)`); fixed from renders before any generation was labelled.
INK_DIST = 60.0  # RGB distance from the background from which a pixel is "ink" (about alpha 0.25 of a color)
UNKNOWN_MIN_AREA_64 = 8  # smallest unexplained ink blob (pixels at 64x64) counted as an unknown object
EXPLAIN_RADIUS_64 = 2  # ink within this many pixels (at 64x64) of a detected object belongs to it (its edge)
MIN_SHAPE_FIT = 0.7  # best soft IoU below which a blob is an "unknown" shape (renders: >= 0.81 with noise)
MAX_ASPECT = 1.5  # box side ratio above which a blob is an "unknown" shape (world objects have square boxes)


@dataclasses.dataclass(frozen=True)
class Detection:
    """One detected object.

    Attributes:
        color: Palette color name (a key of `world.COLORS`).
        shape: "circle", "square" or "triangle".
        box: Bounding box (x0, y0, x1, y1) in pixels of the input image (x1, y1 exclusive).
        center: Center (cx, cy) of the box, like `world.Obj.center`.
        area: Number of pixels of the component.
    """

    color: str
    shape: str
    box: tuple[float, float, float, float]
    center: tuple[float, float]
    area: int


def _to_array(image: Image.Image | np.ndarray) -> np.ndarray:
    """Return the image as float32 [H, W, 3] in 0..255."""
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[2] < 3:
        raise ValueError(f"expected an RGB image [H, W, 3], got shape {arr.shape}")
    arr = arr[..., :3]
    if arr.dtype != np.uint8 and arr.max() <= 1.0:  # tolerate float images in [0, 1]
        arr = arr * 255.0
    return arr.astype(np.float32)


def _pixel_model(image: Image.Image | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-pixel color labels (-1: background / ignored) and blend weights `alpha` [H, W, C] per color."""
    labels, alpha, _ = _pixel_model_ink(image)
    return labels, alpha


def _pixel_model_ink(image: Image.Image | np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`_pixel_model`'s labels and alpha, and each pixel's RGB distance from the background [H, W]."""
    rgb = _to_array(image)
    saturation = rgb.max(-1) - rgb.min(-1)
    greyish = saturation < MIN_SATURATION / 2
    # the background is the grey the image actually has (generated images drift a little); default: world's
    bg = np.median(rgb[greyish], axis=0) if greyish.mean() >= 0.25 else _BG
    x = rgb - bg  # [H, W, 3], offset from the background
    d = _PALETTE - bg  # [C, 3], direction of each color from the background
    alpha = np.clip(np.einsum("hwk,ck->hwc", x, d) / (d * d).sum(1), 0.0, 1.0)  # [H, W, C]
    resid = np.linalg.norm(x[:, :, None, :] - alpha[..., None] * d, axis=-1)  # [H, W, C]
    best = resid.argmin(-1)
    a = np.take_along_axis(alpha, best[..., None], -1)[..., 0]
    r = np.take_along_axis(resid, best[..., None], -1)[..., 0]
    fg = (a >= MIN_ALPHA) & (r <= MAX_RESIDUAL) & (saturation >= MIN_SATURATION)
    return np.where(fg, best, -1), alpha, np.linalg.norm(x, axis=-1)


def classify_pixels(image: Image.Image | np.ndarray) -> np.ndarray:
    """Label every pixel with a palette color index or -1 for background / ignored.

    Args:
        image: PIL image or uint8 array [H, W, 3].

    Returns:
        int array [H, W]: index into `world.COLORS` (in its order), or -1.
    """
    return _pixel_model(image)[0]


def _templates(boxes: np.ndarray, x0: int, y0: int, h: int, w: int, ss: int = 4) -> np.ndarray:
    """Coverage of each ideal shape filling each box, on the [h, w] pixel grid starting at (x0, y0).

    Args:
        boxes: [M, 4] boxes (x0, y0, x1, y1) in image pixels.
        ss: Samples per pixel and axis.

    Returns:
        [3, M, h, w] coverage in [0, 1], shapes in the order of `world.SHAPES`.
    """
    off = (np.arange(ss) + 0.5) / ss
    u = (x0 + np.arange(w)[:, None] + off).reshape(1, 1, -1)  # [1, 1, w*ss] sample x
    v = (y0 + np.arange(h)[:, None] + off).reshape(1, -1, 1)  # [1, h*ss, 1] sample y
    bx0, by0, bx1, by1 = (boxes[:, i, None, None] for i in range(4))
    cx, cy, rx, ry = (bx0 + bx1) / 2, (by0 + by1) / 2, (bx1 - bx0) / 2, (by1 - by0) / 2
    inside_y = (v >= by0) & (v <= by1)
    masks = {
        "circle": ((u - cx) / rx) ** 2 + ((v - cy) / ry) ** 2 <= 1.0,
        "square": (u >= bx0) & (u <= bx1) & inside_y,
        "triangle": inside_y & (np.abs(u - cx) <= rx * (v - by0) / (by1 - by0)),
    }
    m = np.stack([masks[k] for k in world.SHAPES]).astype(np.float32)  # [3, M, h*ss, w*ss]
    return m.reshape(3, len(boxes), h, ss, w, ss).mean((3, 5))


def _blur_matrix(n: int, sigma: float) -> np.ndarray:
    """[n, n] matrix of a 1-D gaussian blur with zero padding (identity for sigma 0)."""
    if sigma <= 0:
        return np.eye(n, dtype=np.float32)
    r = int(np.ceil(4 * sigma))
    norm = np.exp(-np.arange(-r, r + 1) ** 2 / (2 * sigma**2)).sum()
    i = np.arange(n)
    return (np.exp(-((i[:, None] - i[None, :]) ** 2) / (2 * sigma**2)) / norm).astype(np.float32)


def _blur(x: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur (zero padding) of the last two axes of `x`, as two matrix products."""
    if sigma <= 0:
        return x
    *lead, h, w = x.shape
    y = x.reshape(-1, w) @ _blur_matrix(w, sigma).T  # rows
    y = _blur_matrix(h, sigma) @ y.reshape(-1, h, w).transpose(1, 0, 2).reshape(h, -1)  # columns
    return y.reshape(h, -1, w).transpose(1, 0, 2).reshape(*lead, h, w)


def _shape_scores(
    alpha: np.ndarray, box: tuple[float, float, float, float], x0: int, y0: int, scale: float = 1.0
) -> dict[str, float]:
    """Best soft IoU between the coverage `alpha` (a crop at (x0, y0)) and each ideal shape.

    Each shape is fitted to the detected box grown by up to a pixel per side (a triangle also by up to two more
    pixels at the top: blur thins out its apex first) and compared unblurred and slightly blurred, so that
    blurred or noisy edges do not bias the comparison. `scale` is the image width / 64.
    """
    h, w = alpha.shape
    grow = [(g * scale, t * scale) for g in BOX_GROW for t in BOX_GROW_TOP]
    boxes = np.array([(box[0] - g, box[1] - g - t, box[2] + g, box[3] + g) for g, t in grow], np.float32)
    ss = max(1, round(TEMPLATE_SUPERSAMPLE / scale))
    temps = _templates(boxes, x0, y0, h, w, ss)  # [3, M, h, w]
    allowed = np.array([[t == 0 or k == "triangle" for _, t in grow] for k in world.SHAPES])  # [3, M]
    best = np.zeros(len(world.SHAPES))
    a = alpha.astype(np.float32)
    for sigma in TEMPLATE_BLUR:
        tb = _blur(temps, sigma * scale)
        iou = np.minimum(a, tb).sum((2, 3)) / np.maximum(np.maximum(a, tb).sum((2, 3)), 1e-6)
        best = np.maximum(best, np.where(allowed, iou, 0.0).max(1))
    return {k: float(v) for k, v in zip(world.SHAPES, best)}


def detect(image: Image.Image | np.ndarray) -> list[Detection]:
    """Detect the colored shapes of an image.

    Args:
        image: PIL image or uint8 array [H, W, 3] (any square-ish size; thresholds scale with the width).

    Returns:
        Detections sorted top-to-bottom, then left-to-right.
    """
    return [d for d, _, _ in _detect(image)[0]]


@dataclasses.dataclass(frozen=True)
class UnknownObject:
    """A blob of ink that no palette detection explains (strict mode): off-palette, greyish, or a speck.

    Attributes:
        box: Bounding box (x0, y0, x1, y1) in pixels of the input image (x1, y1 exclusive).
        center: Center (cx, cy) of the box.
        area: Number of unexplained ink pixels.
        rgb: Mean color of those pixels (0..255).
    """

    box: tuple[float, float, float, float]
    center: tuple[float, float]
    area: int
    rgb: tuple[float, float, float]


def _detect(image: Image.Image | np.ndarray) -> tuple[list[tuple[Detection, float, np.ndarray]], np.ndarray]:
    """Detections with their best shape fit (soft IoU) and pixel mask, sorted like `detect`; and the ink
    distance map [H, W] (RGB distance from the background)."""
    labels, alpha, ink = _pixel_model_ink(image)
    h, w = labels.shape
    scale = w / world.IMAGE_SIZE
    min_area = max(3, int(round(MIN_AREA_64 * scale * (h / world.IMAGE_SIZE))))
    eight = np.ones((3, 3), int)
    comps, _ = ndimage.label(labels >= 0, structure=eight)
    parts: list[tuple[int, np.ndarray]] = []  # (color index, full-image mask)
    sizes = np.bincount(comps.ravel())
    for k in np.nonzero(sizes >= min_area)[0]:
        if k == 0:  # background
            continue
        comp = comps == k
        n = int(sizes[k])
        votes = np.bincount(labels[comp], minlength=len(_PALETTE_NAMES))
        strong = [int(c) for c in np.argsort(-votes) if votes[c] >= max(min_area, SPLIT_SHARE * n)]
        if len(strong) <= 1:
            parts.append((int(votes.argmax()), comp))
            continue
        for c in strong:  # differently colored objects touch: split the component by color
            sub, m = ndimage.label(comp & (labels == c), structure=eight)
            parts += [(c, sub == j) for j in range(1, m + 1) if (sub == j).sum() >= min_area]
    fg = labels >= 0
    out: list[tuple[Detection, float, np.ndarray]] = []
    for c, m in parts:
        ys, xs = np.nonzero(m)
        box = (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1))
        # compare shapes on the soft coverage around the box, other objects' pixels removed
        pad = int(np.ceil(2 * scale))
        y0, y1 = max(int(box[1]) - pad - pad // 2, 0), min(int(box[3]) + pad, h)
        x0, x1 = max(int(box[0]) - pad, 0), min(int(box[2]) + pad, w)
        cov = np.where(fg[y0:y1, x0:x1] & ~m[y0:y1, x0:x1], 0.0, alpha[y0:y1, x0:x1, c])
        scores = _shape_scores(cov, box, x0, y0, scale)
        out.append((Detection(
            color=_PALETTE_NAMES[c],
            shape=max(scores, key=scores.get),
            box=box,
            center=((box[0] + box[2]) / 2, (box[1] + box[3]) / 2),
            area=int(m.sum()),
        ), max(scores.values()), m))
    return sorted(out, key=lambda t: (t[0].center[1], t[0].center[0])), ink


def unknown_objects(image: Image.Image | np.ndarray, min_area_64: float = UNKNOWN_MIN_AREA_64) -> list[UnknownObject]:
    """Blobs of ink (pixels at least `INK_DIST` from the background) that no detection explains.

    A detection explains its own pixels and every pixel within `EXPLAIN_RADIUS_64` of them (its blurred edge).
    What is left is grouped into 8-connected components; those of at least `UNKNOWN_MIN_AREA_64` pixels (at
    64x64, scaled with the image area) are unknown objects: off-palette or greyish blobs, and palette specks
    too small for `detect`.

    Args:
        image: PIL image or uint8 array [H, W, 3].
        min_area_64: Smallest blob kept, in pixels at 64x64 (lower it to see the blobs strict mode ignores).

    Returns:
        Unknown objects sorted top-to-bottom, then left-to-right.
    """
    return _unknown_objects(_to_array(image), _detect(image), min_area_64)


def _unknown_objects(rgb: np.ndarray, detected, min_area_64: float = UNKNOWN_MIN_AREA_64) -> list[UnknownObject]:
    found, ink = detected
    h, w = ink.shape
    scale = w / world.IMAGE_SIZE
    explained = np.zeros((h, w), bool)
    for _, _, m in found:
        explained |= m
    radius = max(1, int(round(EXPLAIN_RADIUS_64 * scale)))
    explained = ndimage.binary_dilation(explained, np.ones((3, 3), bool), iterations=radius)
    comps, n = ndimage.label((ink >= INK_DIST) & ~explained, structure=np.ones((3, 3), int))
    min_area = max(1, int(round(min_area_64 * scale * (h / world.IMAGE_SIZE))))
    out = []
    for k in range(1, n + 1):
        m = comps == k
        area = int(m.sum())
        if area < min_area:
            continue
        ys, xs = np.nonzero(m)
        box = (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1))
        out.append(UnknownObject(box, ((box[0] + box[2]) / 2, (box[1] + box[3]) / 2), area,
                                 tuple(float(v) for v in rgb[m].mean(0))))
    return sorted(out, key=lambda u: (u.center[1], u.center[0]))


def _known_shape(det: Detection, fit: float) -> bool:
    """Whether a detection looks like a world shape: good enough best fit and a near-square box."""
    w, h = det.box[2] - det.box[0], det.box[3] - det.box[1]
    return fit >= MIN_SHAPE_FIT and max(w, h) / max(min(w, h), 1e-6) <= MAX_ASPECT


def size_of(det: Detection, image_width: int = world.IMAGE_SIZE) -> str:
    """"small" or "big" from the detection's extent (squares are corrected for their inset)."""
    ext = max(det.box[2] - det.box[0], det.box[3] - det.box[1]) * world.IMAGE_SIZE / image_width
    if det.shape == "square":
        ext /= SQUARE_INSET
    return "small" if ext < SIZE_THRESHOLD_64 else "big"


def relation_holds(subject: Detection, obj: Detection, relation: str) -> bool:
    """Whether `subject RELATION obj` holds: the center displacement's dominant axis and sign match."""
    ux, uy = world.REL_DIRECTION[relation]
    dx, dy = subject.center[0] - obj.center[0], subject.center[1] - obj.center[1]
    along = dx * ux + dy * uy
    across = abs(dx * uy - dy * ux)
    return along > across


def _matches(det: Detection, phrase: world.Phrase) -> bool:
    return det.color == phrase.color and det.shape == phrase.shape


def _agreement(det: Detection, phrase: world.Phrase) -> int:
    return int(det.color == phrase.color) + int(det.shape == phrase.shape)


def check(image: Image.Image | np.ndarray, caption: str | world.Scene, strict: bool = False) -> dict[str, Any]:
    """Judge an image against a caption (or a scene's caption) of the shapes world.

    Rules by caption kind:
        single: exactly one object, of the caption's color and shape. If the caption has a size word,
            "size_ok" reports whether the object's extent agrees (not part of "correct" unless strict).
        relation: exactly two objects, the phrases matched to distinct detections of the right color and
            shape ("objects_ok"), and the relation holding between them ("relation_ok");
            correct = objects_ok and relation_ok. If the objects are wrong but one assignment of the two
            detections to the phrases agrees on more attributes than the other, "relation_ok" is judged
            on it (so a relation can be right while an attribute is wrong); otherwise it is False.
        count: exactly N objects ("count_ok"), all of the caption's color and shape; "found" is the number of
            matching detections.

    Strict mode (`strict=True`) counts what the default mode lets pass:
        * unknown objects (`unknown_objects`): off-palette or greyish blobs and palette specks of at least
          `UNKNOWN_MIN_AREA_64` pixels are objects too, of no caption's color, so they break "exactly one /
          two / N objects";
        * unknown shapes: a detection whose best shape fit is below `MIN_SHAPE_FIT`, or whose box is more
          elongated than `MAX_ASPECT`, has shape "unknown" and matches no phrase;
        * size words: a single caption's size word must agree with the object's extent ("size_ok" is part of
          "correct").
    The default mode is exactly the checker validated on renders and reconstructions.

    Args:
        image: PIL image or uint8 array [H, W, 3].
        caption: A caption of the grammar or a `world.Scene` (its caption is used).
        strict: Judge with the strict rules above.

    Returns:
        Dict with "kind", "caption", "correct", "detections" (list of dicts) and the kind's details above.
        Strict mode adds "strict" (True), "unknown_objects" (list of dicts: box, center, area, rgb),
        "shape_fits" (best soft IoU per detection, in the order of "detections"; a detection of unknown
        shape has shape "unknown" there) and "n_objects" (detections + unknown objects).

    Raises:
        world.CaptionError: If the caption is outside the grammar.

    Example:
        >>> check(world.render(scene), scene.caption)["correct"]
        >>> check(image, "a small red circle", strict=True)["unknown_objects"]
    """
    text = caption.caption if isinstance(caption, world.Scene) else caption
    parsed = world.parse_caption(text)
    arr = _to_array(image)
    if strict:
        detected = _detect(arr)
        dets = [d if _known_shape(d, fit) else dataclasses.replace(d, shape="unknown") for d, fit, _ in detected[0]]
        unknown = _unknown_objects(arr, detected)
    else:
        dets, unknown = detect(arr), []
    out: dict[str, Any] = {"kind": parsed.kind, "caption": " ".join(parsed.words),
                           "detections": [dataclasses.asdict(d) for d in dets]}
    n_objects = len(dets) + len(unknown)
    if parsed.kind == "single":
        ph = parsed.phrases[0]
        ok = n_objects == 1 and len(dets) == 1 and _matches(dets[0], ph)
        out["correct"] = ok
        if ph.size is not None:
            out["size_ok"] = n_objects == 1 and len(dets) == 1 and size_of(dets[0], arr.shape[1]) == ph.size
            if strict:
                out["correct"] = ok and out["size_ok"]
    elif parsed.kind == "relation":
        p_subj, p_obj = parsed.phrases
        objects_ok = relation_ok = False
        if len(dets) == 2:
            # assignments (subject, object) ranked by how many attributes agree with the phrases
            agree = {pair: _agreement(pair[0], p_subj) + _agreement(pair[1], p_obj)
                     for pair in itertools.permutations(dets, 2)}
            top = max(agree.values())
            best = [pair for pair, v in agree.items() if v == top]
            objects_ok = top == 4 and n_objects == 2
            if top == 4 or (top > 0 and len(best) == 1):
                relation_ok = any(relation_holds(s, o, parsed.relation) for s, o in best)
        out.update(objects_ok=objects_ok, relation_ok=relation_ok, correct=objects_ok and relation_ok)
    else:
        ph = parsed.phrases[0]
        found = sum(_matches(d, ph) for d in dets)
        count_ok = n_objects == ph.count
        out.update(count_ok=count_ok, asked=ph.count, found=found, correct=count_ok and found == ph.count)
    if strict:
        out.update(strict=True, unknown_objects=[dataclasses.asdict(u) for u in unknown],
                   shape_fits=[fit for _, fit, _ in detected[0]], n_objects=n_objects)
    return out
