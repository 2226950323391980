"""Image -> text by masked text diffusion (D-DiT), on the text denoiser of `models.adapters.text_denoiser`:
sampling with every reverse step recorded, captioning, VQA with question templates, judging against the scene,
the ranking-based I->T baseline (a registry scorer picks the best grammar caption), and the evaluation.

    >>> res = caption_image(image)                        # CaptionResult: .caption, .sample (TextSample)
    >>> res.to_json()                                     # {"caption": "a red circle", "steps": [[...], ...]}
    >>> answer_question(image, "how many circles ?").answer   # "two"
    >>> evaluate_text_diffusion(pipe, n_scenes=300, split="validation")   # accuracies with n and Wilson CIs

Sampling (`sample_text`): the generated positions start as `[MASK]`; reverse step k of K unmasks
`m_{k-1} - m_k` of them, m_k = floor(M (1 - k/K)) (M generated positions, so the masks fall to 0 at step K),
choosing the positions by the confidence of their predicted token ("confidence"), at random ("random") or the
leftmost first ("left-to-right"); a
committed token never changes, a prefix (the question) is never masked. Splits: validation scenes
`sample_dataset(VAL_SEED)`, test `sample_dataset(TEST_SEED)` (docs/text_diffusion.md).
"""
from __future__ import annotations

import dataclasses
import functools
import math
import time
from pathlib import Path
from typing import Literal, Sequence, get_args

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

from interp.scorers import MatchOptions, get_scorer
from interp.stats import rate
from models.adapters.text_denoiser import WORD_MAPS, TextDenoiser, TextVocab, load_text_denoiser
from models.limits import MAX_CANDIDATES
from models.loading import load_pipeline, with_unet
from models.shapes import world
from models.training.text_diffusion import (
    DEFAULT_OUT,
    QUESTION_TASKS,
    TEST_SEED,
    VAL_SEED,
    encode_latents,
    image_reading,
    scene_questions,
    size_group,
)
from models.unet_pass import native_size

__all__ = ["DEFAULTS", "ORDERS", "SPLITS", "UnmaskStep", "TextSample", "CaptionResult", "AnswerResult", "load_adapter",
           "reading_pipe", "sample_text", "caption_image", "answer_question", "judge_caption", "answer_from_caption",
           "ranking_candidates", "rank_caption", "eval_scenes", "evaluate_text_diffusion", "check_question"]

Order = Literal["confidence", "random", "left-to-right"]
ORDERS: tuple[str, ...] = get_args(Order)  # the sampler's, the CLI's and the checks' one list
SPLITS = {"validation": VAL_SEED, "test": TEST_SEED}
# sampling options chosen on validation scenes (docs/text_diffusion.md, "Choices on validation")
DEFAULTS = {"caption_length": 9, "caption_steps": 9, "answer_steps": 2, "order": "confidence", "temperature": 0.0}
TOP_K = 5


# ------------------------------------------------------------------------------------------------
# Sampling
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class UnmaskStep:
    """One reverse step of `sample_text` (positions 0..L-1 of the text, the prefix included).

    Attributes:
        tokens: the words after this step, `[MASK]` where still masked                          [L]
        ids: the same as vocabulary ids                                                           [L]
        unmasked: the positions committed at this step
        top_words / top_probs: per position, the top-k predicted words and probabilities at this step
            (the prediction the step committed from; prefix positions hold their word with probability 1) [L][k]
        attention: per text position, its joint attention over the image tokens at this step (mean over
            heads and layers), when recorded                                                      [L][N] or None
    """

    tokens: list[str]
    ids: list[int]
    unmasked: list[int]
    top_words: list[list[str]]
    top_probs: list[list[float]]
    attention: list[list[float]] | None = None


@dataclasses.dataclass
class TextSample:
    """A whole reverse process.

    Attributes:
        steps: one UnmaskStep per reverse step                                                     [K]
        prefix_len: P, positions kept unmasked (the question); length: L, all positions
        words: the final words (prefix, generated words, PAD)                                      [L]
        text: the generated words up to the first PAD, joined by spaces
        committed_at: per position, the step index (0-based) it was committed at; -1 for the prefix [L]
        confidence: per position, the probability of its word when committed; 1.0 for the prefix   [L]
        grid: per UNet block, its image-token grid (h, w), in attention column order
        order / seed / temperature: the options sampled with
    """

    steps: list[UnmaskStep]
    prefix_len: int
    length: int
    words: list[str]
    text: str
    committed_at: list[int]
    confidence: list[float]
    grid: list[tuple[int, int]]
    order: str
    seed: int
    temperature: float

    def steps_tokens(self) -> list[list[str]]:
        """The CLI's `steps`: per reverse step, the token list (`[MASK]` where masked)."""
        return [list(s.tokens) for s in self.steps]


@torch.no_grad()
def sample_text(model: TextDenoiser, vocab: TextVocab, feats: dict[str, torch.Tensor], prefix: Sequence[int] = (),
                length: int | None = None, steps: int = 8, order: Order = "confidence", seed: int = 0,
                temperature: float = 0.0, top_k: int = TOP_K, record_attention: bool = False) -> TextSample:
    """Generate the text after `prefix` by reverse masked diffusion, recording every step.

    Args:
        model / vocab: the text denoiser and its vocabulary.
        feats: the image's UNet reading, per block `[1, C, h, w]` (+ word maps; `image_reading`).
        prefix: ids kept unmasked at the start (a question), P of them.
        length: L, all positions (default the model's max_len); must leave at least one generated position.
        steps: K >= 1 reverse steps.
        order: "confidence" (commit the most confident predictions first), "random", or "left-to-right" (the
            leftmost masked positions first: a caption's subject is named before its relation, as in
            semi-autoregressive masked-diffusion decoding).
        seed: seeds the random order and the sampling (temperature > 0).
        temperature: 0 = each position's most probable word (never `[MASK]`); > 0 samples from the softmax at it.
        top_k: candidates recorded per position and step.
        record_attention: record each text position's joint attention over the image tokens.
    Returns:
        TextSample.
    Raises:
        ValueError: bad length, steps, order or temperature.
    """
    L = model.config.max_len if length is None else int(length)
    P = len(prefix)
    if not P < L <= model.config.max_len:
        raise ValueError(f"length must be in {P + 1}..{model.config.max_len} (prefix {P} + at least one generated "
                         f"position), got {L}")
    if int(steps) < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if order not in ORDERS:
        raise ValueError(f"order must be one of {', '.join(ORDERS)}, got {order!r}")
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    K, M = int(steps), L - P
    g = torch.Generator().manual_seed(int(seed))
    dev = next(model.parameters()).device
    img = model.image_tokens({b: v.to(dev) for b, v in feats.items()})  # [1, N, D], reused every step
    maps = feats[WORD_MAPS].to(dev) if WORD_MAPS in feats else None  # the text's marks (word_marks) change per step
    ids = torch.full((1, L), vocab.mask_id, dtype=torch.long, device=dev)
    if P:
        ids[0, :P] = torch.as_tensor(list(prefix), dtype=torch.long)
    committed_at = [-1] * P + [None] * M
    confidence = [1.0] * P + [0.0] * M
    remaining = M
    out_steps = []
    for k in range(1, K + 1):
        out = model(None, ids, output_attentions=record_attention, image_tokens=img, word_maps=maps)
        logits = out.logits[0].float()
        logits[:, vocab.mask_id] = -math.inf
        probs = torch.softmax(logits, -1)  # [L, V]
        if temperature > 0:
            gumbel = -torch.log(-torch.log(torch.rand(probs.shape, generator=g).clamp(1e-20, 1)))
            pred = (logits / temperature + gumbel.to(dev)).argmax(-1)
        else:
            pred = probs.argmax(-1)
        conf = probs.gather(1, pred[:, None])[:, 0]  # [L]
        masked = (ids[0] == vocab.mask_id).nonzero()[:, 0].tolist()
        target = int(math.floor(M * (1 - k / K))) if k < K else 0
        n_new = max(0, remaining - target)
        if order == "confidence":
            ranked = sorted(masked, key=lambda i: -float(conf[i]))
        elif order == "left-to-right":
            ranked = masked  # ascending positions
        else:
            perm = torch.randperm(len(masked), generator=g).tolist()
            ranked = [masked[i] for i in perm]
        new = sorted(ranked[:n_new])
        for i in new:
            ids[0, i] = pred[i]
            committed_at[i] = k - 1
            confidence[i] = float(conf[i])
        remaining -= len(new)
        tp, ti = probs.topk(min(top_k, probs.shape[-1]), -1)
        top_words = [vocab.decode(row) for row in ti.tolist()]
        top_probs = [[round(float(p), 4) for p in row] for row in tp]
        for i in range(P):
            top_words[i], top_probs[i] = [vocab.id_to_word[int(ids[0, i])]], [1.0]
        att = None
        if record_attention:
            a = torch.stack([x[0] for x in out.attentions]).mean((0, 1))  # [N+L, N+L], mean over layers, heads
            N = out.n_image
            att = a[N:, :N].cpu().tolist()
        out_steps.append(UnmaskStep(vocab.decode(ids[0].tolist()), ids[0].tolist(), new, top_words, top_probs, att))
    words = vocab.decode(ids[0].tolist())
    gen = vocab.decode(ids[0, P:].tolist(), stop_at_pad=True)
    return TextSample(out_steps, P, L, words, " ".join(gen), committed_at, confidence, list(model.grid), order,
                      int(seed), float(temperature))


# ------------------------------------------------------------------------------------------------
# Loading and the image's features
# ------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=4)
def _load(folder: str):
    return load_text_denoiser(folder)


def load_adapter(folder: str | Path | None = None):
    """(model, vocab, extra timestep or None, info) of the text denoiser in `folder` (default the bundled
    assets/adapters/shapes-v1-ddit), cached. ValueError (one line) when there is none."""
    return _load(str(Path(folder or DEFAULT_OUT)))


def image_features(pipe, model: TextDenoiser, extra, images: Sequence, noise_seed: int = 0
                   ) -> dict[str, torch.Tensor]:
    """The denoiser's UNet reading of PIL images (native size, RGB): per block `[B, C, h, w]` (+ the word maps of a
    denoiser trained with them, `image_reading`)."""
    h, w = native_size(pipe)
    arr = np.stack([np.asarray(im.convert("RGB").resize((w, h))) for im in images])
    z = encode_latents(pipe, arr)
    return image_reading(pipe, z, model.config, noise_seed=noise_seed, extra=extra)


def _open_image(image):
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, (str, Path)):
        try:
            with Image.open(image) as im:
                return im.convert("RGB")
        except (OSError, UnidentifiedImageError) as e:
            raise ValueError(f"cannot read image {str(image)!r}: {type(e).__name__}") from None
    raise ValueError(f"image must be a PIL image or a file path, got {type(image).__name__}")


def check_question(question: str, vocab: TextVocab, max_len: int) -> list[int]:
    """The question's ids; ValueError (one line) when it is empty, too long (it must leave 2 positions for the
    answer) or has a word outside the vocabulary. A missing final "?" is added."""
    if not isinstance(question, str) or not question.strip():
        raise ValueError("the question is empty; e.g. 'how many circles ?'")
    q = question.lower().replace("?", " ?").split()
    if q[-1] != "?":
        q.append("?")
    if len(q) > max_len - 2:
        raise ValueError(f"the question has {len(q)} words (with '?'); at most {max_len - 2}")
    return vocab.encode(q)


# ------------------------------------------------------------------------------------------------
# Captioning and VQA (the app's and the CLI's entry points)
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class CaptionResult:
    """A generated caption: `caption` (the text), `sample` (the TextSample), `unet_evals` (1: one row)."""

    caption: str
    sample: TextSample
    unet_evals: int = 1

    def to_json(self) -> dict:
        return {"caption": self.caption, "steps": self.sample.steps_tokens()}


@dataclasses.dataclass
class AnswerResult:
    """A generated answer: `question`, `answer` (the text), `sample`, `unet_evals`."""

    question: str
    answer: str
    sample: TextSample
    unet_evals: int = 1

    def to_json(self) -> dict:
        return {"question": self.question, "answer": self.answer, "steps": self.sample.steps_tokens()}


def _options(length, steps, order, seed, temperature, default_steps):
    steps = default_steps if steps is None else steps
    order = DEFAULTS["order"] if order is None else order
    temperature = DEFAULTS["temperature"] if temperature is None else temperature
    for name, v in (("steps", steps), ("seed", seed)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise ValueError(f"{name} must be an integer, got {v!r}")
    if not 1 <= steps <= 64:
        raise ValueError(f"steps must be in 1..64, got {steps}")
    if length is not None and (isinstance(length, bool) or not isinstance(length, (int, np.integer))):
        raise ValueError(f"length must be an integer, got {length!r}")
    return length, int(steps), order, int(seed), float(temperature)


def caption_image(image, pipe=None, adapter: str | Path | None = None, length: int | None = None,
                  steps: int | None = None, order: Order | None = None, seed: int = 0, temperature: float | None = None,
                  record_attention: bool = False) -> CaptionResult:
    """Caption an image by masked text diffusion.

    Args:
        image: a PIL image or an image file path.
        pipe: the diffusion pipeline whose UNet the adapter reads (default: the bundled model).
        adapter: the text-denoiser folder (default assets/adapters/shapes-v1-ddit).
        length / steps / order / temperature: sampling options (`sample_text`; None = `DEFAULTS`).
        seed: the sampling seed. record_attention: keep the joint attention of every step (the app's view).
    Returns:
        CaptionResult (`.to_json()` = {"caption", "steps"}).
    Raises:
        ValueError: unreadable image, bad options, no adapter.

    Example:
        >>> caption_image("red_circle.png").caption       # "a red circle"
    """
    img = _open_image(image)
    model, vocab, extra, _ = load_adapter(adapter)
    length = DEFAULTS["caption_length"] if length is None else length
    length, steps, order, seed, temperature = _options(length, steps, order, seed, temperature,
                                                       DEFAULTS["caption_steps"])
    pipe = reading_pipe(pipe if pipe is not None else _default_pipe(), adapter)
    feats = image_features(pipe, model, extra, [img])
    s = sample_text(model, vocab, feats, (), min(length, model.config.max_len), steps, order, seed, temperature,
                    record_attention=record_attention)
    return CaptionResult(s.text, s)


def answer_question(image, question: str, pipe=None, adapter: str | Path | None = None, steps: int | None = None,
                    order: Order | None = None, seed: int = 0, temperature: float | None = None,
                    length: int | None = None, record_attention: bool = False) -> AnswerResult:
    """Answer a question about an image: the question is the kept prefix, the answer the generated suffix.

    Args:
        image: a PIL image or a file path. question: e.g. "how many circles ?", "what color is the square ?",
            "what shape is the red object ?", "where is the red circle ?" (a missing "?" is added).
        length: all positions (question + answer + padding); default the question's length + 2.
        others: as `caption_image`.
    Returns:
        AnswerResult (`.to_json()` = {"question", "answer", "steps"}).
    Raises:
        ValueError: unreadable image; empty, too long or out-of-vocabulary question; bad options; no adapter.

    Example:
        >>> answer_question("two_circles.png", "how many circles ?").answer   # "two"
    """
    img = _open_image(image)
    model, vocab, extra, _ = load_adapter(adapter)
    prefix = check_question(question, vocab, model.config.max_len)
    length = len(prefix) + 2 if length is None else length
    length, steps, order, seed, temperature = _options(length, steps, order, seed, temperature,
                                                       DEFAULTS["answer_steps"])
    pipe = reading_pipe(pipe if pipe is not None else _default_pipe(), adapter)
    feats = image_features(pipe, model, extra, [img])
    s = sample_text(model, vocab, feats, prefix, length, steps, order, seed, temperature,
                    record_attention=record_attention)
    return AnswerResult(" ".join(vocab.decode(prefix)), s.text, s)


def _default_pipe():
    return load_pipeline()


def reading_pipe(pipe, adapter: str | Path | None = None):
    """The pipeline whose UNet the adapter reads: `pipe` itself, or, for a dual-mode adapter (its folder holds the
    UNet fine-tuned with it, `unet/`), `pipe` with that UNet (`models.loading.with_unet`; `pipe` unchanged)."""
    unet_dir = Path(adapter or DEFAULT_OUT) / "unet"
    return with_unet(pipe, unet_dir) if (unet_dir / "config.json").exists() else pipe


# ------------------------------------------------------------------------------------------------
# Judging against the scene
# ------------------------------------------------------------------------------------------------
def judge_caption(caption: str, scene: world.Scene) -> dict:
    """Judge a generated caption against the scene: every object's color and shape, the count and the relation.

    A relation caption is right with either role order ("a A left of a B" = "a B right of a A"); a size word, when
    given, must be the object's size.

    Returns:
        {"ok": bool, "parsed": bool, "kind_ok", "colors_ok", "shapes_ok", "count_ok", "relation_ok"} (None where a
        part does not apply).

    Example:
        >>> judge_caption("a blue square right of a red circle", scene)["ok"]
    """
    res = {"ok": False, "parsed": False, "kind_ok": False, "colors_ok": None, "shapes_ok": None, "count_ok": None,
           "relation_ok": None}
    try:
        p = world.parse_caption(caption)
    except world.CaptionError:
        return res
    res["parsed"] = True
    objs = scene.objects
    res["kind_ok"] = p.kind == scene.kind
    if p.kind == "relation" and scene.kind == "relation":
        a, b = objs
        p1, p2 = p.phrases

        def same(ph, o):
            return ph.color == o.color and ph.shape == o.shape

        if same(p1, a) and same(p2, b):
            res["relation_ok"] = p.relation == scene.relation
        elif same(p1, b) and same(p2, a):
            res["relation_ok"] = p.relation == world.OPPOSITE[scene.relation]
        else:
            res["relation_ok"] = False
        res["colors_ok"] = sorted(ph.color for ph in p.phrases) == sorted(o.color for o in objs)
        res["shapes_ok"] = sorted(ph.shape for ph in p.phrases) == sorted(o.shape for o in objs)
        res["count_ok"] = True
        res["ok"] = bool(res["relation_ok"] and res["colors_ok"] and res["shapes_ok"])
        return res
    ph = p.phrases[0]
    n = ph.count if p.kind != "relation" else 2
    res["count_ok"] = n == len(objs)
    res["colors_ok"] = p.kind != "relation" and all(o.color == ph.color for o in objs)
    res["shapes_ok"] = p.kind != "relation" and all(o.shape == ph.shape for o in objs)
    size_ok = ph.size is None or all(o.size == ph.size for o in objs)
    res["ok"] = bool(res["kind_ok"] and res["count_ok"] and res["colors_ok"] and res["shapes_ok"] and size_ok)
    return res


def answer_from_caption(caption: str, question: str) -> str | None:
    """The answer a caption implies to a template question (how the ranking baseline answers), or None when the
    caption does not parse or says nothing about it."""
    try:
        scene = world.scene_from_caption(caption, np.random.default_rng(0))
    except (world.CaptionError, RuntimeError):
        return None
    q = " ".join(question.lower().replace("?", " ?").split())
    return {qq: a for _, qq, a in scene_questions(scene)}.get(q)


# ------------------------------------------------------------------------------------------------
# Ranking-based I->T baseline
# ------------------------------------------------------------------------------------------------
def ranking_candidates(scene: world.Scene) -> list[str]:
    """The grammar captions the ranking baseline picks from for a scene.

    single: the 18 color-shape captions without a size word; count: the 36 count captions; relation: the scene's
    two objects in both roles with the 4 relations (8) plus its hard negatives (`world.negatives`: attribute swap,
    each object's color or shape changed) — the ranking is told the relation scene's objects up to one attribute
    (1 224 relation captions would cost ~5 000 UNet rows an image).
    """
    if scene.kind == "single":
        return [c for c in world.grammar_captions("single") if len(c.split()) == 3]
    if scene.kind == "count":
        return world.grammar_captions("count")
    a, b = scene.objects
    out = [world.caption_of("relation", [x, y], r) for x, y in ((a, b), (b, a)) for r in world.RELATIONS]
    for c in world.negatives(scene).values():
        if c not in out:
            out.append(c)
    return out


def rank_caption(pipe, image, scene: world.Scene, scorer: str = "auto", options=None) -> tuple[str, int]:
    """(best candidate caption, UNet sample-forwards) by a registry scorer over `ranking_candidates(scene)`,
    scored in chunks of at most `models.limits.MAX_CANDIDATES` (same noise draw for every chunk)."""
    sc = get_scorer(scorer)
    options = options or MatchOptions(scorer=scorer)
    cands = ranking_candidates(scene)
    best, best_s, evals = None, -math.inf, 0
    for c0 in range(0, len(cands), MAX_CANDIDATES):
        res = sc.score(pipe, image, cands[c0: c0 + MAX_CANDIDATES], options)
        evals += int(res.unet_evals)
        cap, s = res.ranking()[0]
        if s > best_s:
            best, best_s = cap, s
    return best, evals


# ------------------------------------------------------------------------------------------------
# Evaluation
# ------------------------------------------------------------------------------------------------
def eval_scenes(split: str, n: int) -> list[world.Scene]:
    """The split's scenes: `world.sample_dataset(SPLITS[split], n, exclude_compositional=True)` (a smaller n is a
    prefix). ValueError for an unknown split."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    return world.sample_dataset(SPLITS[split], n, exclude_compositional=True)


def _grouped(rows: list[dict], key: str, by: str) -> dict:
    groups: dict = {}
    for r in rows:
        groups.setdefault(str(r[by]), []).append(bool(r[key]))
    return {g: rate(v) for g, v in sorted(groups.items())}


def evaluate_text_diffusion(pipe=None, n_scenes: int = 300, split: str = "validation",
                            adapter: str | Path | None = None, caption_length: int | None = None,
                            caption_steps: int | None = None, answer_steps: int | None = None,
                            order: Order | None = None, temperature: float | None = None, seed: int = 0,
                            ranking: bool = True, n_ranking: int | None = None, scorer: str = "auto",
                            tasks: Sequence[str] = ("caption", "vqa"), progress: bool = True) -> dict:
    """Captioning and VQA accuracy of the text denoiser on held-out scenes, beside the ranking baseline.

    Args:
        pipe: the pipeline (default the bundled model). n_scenes: scenes of the split (mix 25 / 45 / 30 %).
        split: "validation" (every choice) or "test" (read once). adapter: the denoiser folder.
        caption_length / caption_steps / answer_steps / order / temperature: sampling (None = `DEFAULTS`).
        ranking: also the ranking baseline on the first `n_ranking` scenes (default all), with `scorer`.
        tasks: "caption" and / or "vqa".
    Returns:
        {"split", "n_scenes", "options", "caption": {"overall", "by_kind", "by_size", "by_count", "parsed"},
         "vqa": {"overall", "by_task", "by_size", "by_count", "by_task_size"}, "ranking": {same for its caption and
         its caption's answers, "n_scenes"}, "cost": {"unet_evals_per_image": {"text_diffusion", "ranking"},
         "denoiser_forwards_per_image", "seconds"}, "examples": first few}; every rate is
        {"rate", "k", "n", "ci95"} (`interp.stats.rate`).
    """

    pipe = reading_pipe(pipe if pipe is not None else _default_pipe(), adapter)
    model, vocab, extra, info = load_adapter(adapter)
    c = model.config
    L = min(DEFAULTS["caption_length"] if caption_length is None else caption_length, c.max_len)
    Kc = DEFAULTS["caption_steps"] if caption_steps is None else caption_steps
    Ka = DEFAULTS["answer_steps"] if answer_steps is None else answer_steps
    order = DEFAULTS["order"] if order is None else order
    temperature = DEFAULTS["temperature"] if temperature is None else temperature
    scenes = eval_scenes(split, n_scenes)
    t0 = time.time()
    cap_rows, vqa_rows, rank_rows, rank_vqa, examples = [], [], [], [], []
    forwards = 0
    n_rank = len(scenes) if n_ranking is None else min(n_ranking, len(scenes))
    rank_evals = 0
    for b0 in tqdm(range(0, len(scenes), 32), desc=f"eval {split}", disable=not progress):
        chunk = scenes[b0: b0 + 32]
        images = [world.render(s) for s in chunk]
        feats = image_features(pipe, model, extra, images, noise_seed=0)
        for j, (s, img) in enumerate(zip(chunk, images)):
            f = {b: v[j: j + 1] for b, v in feats.items()}
            meta = {"kind": s.kind, "size": size_group(s), "count": len(s.objects)}
            if "caption" in tasks:
                smp = sample_text(model, vocab, f, (), L, Kc, order, seed, temperature)
                forwards += Kc
                judge = judge_caption(smp.text, s)
                cap_rows.append(meta | {"ok": judge["ok"], "parsed": judge["parsed"]})
                if len(examples) < 12:
                    examples.append({"truth": s.caption, "caption": smp.text, "ok": judge["ok"]})
            qs = scene_questions(s) if "vqa" in tasks else []
            for task, q, a in qs:
                prefix = vocab.encode(q)
                smp = sample_text(model, vocab, f, prefix, len(prefix) + 2, Ka, order, seed, temperature)
                forwards += Ka
                vqa_rows.append(meta | {"task": task, "ok": smp.text == a})
            if ranking and b0 + j < n_rank:
                best, ev = rank_caption(pipe, img, s, scorer)
                rank_evals += ev
                rank_rows.append(meta | {"ok": judge_caption(best, s)["ok"], "parsed": True})
                for task, q, a in qs:
                    rank_vqa.append(meta | {"task": task, "ok": answer_from_caption(best, q) == a})

    def cap_summary(rows):
        return {"overall": rate([r["ok"] for r in rows]), "by_kind": _grouped(rows, "ok", "kind"),
                "by_size": _grouped(rows, "ok", "size"), "by_count": _grouped(rows, "ok", "count"),
                "parsed": rate([r["parsed"] for r in rows])}

    def vqa_summary(rows):
        by_ts = {}
        for t in QUESTION_TASKS:
            sub = [r for r in rows if r["task"] == t]
            if sub:
                by_ts[t] = {"by_size": _grouped(sub, "ok", "size"), "by_count": _grouped(sub, "ok", "count")}
        return {"overall": rate([r["ok"] for r in rows]), "by_task": _grouped(rows, "ok", "task"),
                "by_size": _grouped(rows, "ok", "size"), "by_count": _grouped(rows, "ok", "count"),
                "by_task_size_count": by_ts}

    out = {"split": split, "n_scenes": len(scenes), "adapter": {"timestep": c.timestep, "mode": c.mode,
                                                                "trained_steps": c.trained_steps, **info},
           "options": {"caption_length": L, "caption_steps": Kc, "answer_steps": Ka, "order": order,
                       "temperature": temperature, "seed": seed}}
    if cap_rows:
        out["caption"] = cap_summary(cap_rows)
    if vqa_rows:
        out["vqa"] = vqa_summary(vqa_rows)
    if rank_rows:
        out["ranking"] = {"scorer": scorer, "n_scenes": len(rank_rows), "caption": cap_summary(rank_rows)}
        if rank_vqa:
            out["ranking"]["vqa"] = vqa_summary(rank_vqa)
    out["cost"] = {"unet_evals_per_image": {"text_diffusion": 1 + len(c.word_maps),  # blocks row + a row a map prompt
                                            "ranking": round(rank_evals / max(1, len(rank_rows)), 1)},
                   "denoiser_forwards_per_image": round(forwards / max(1, len(scenes)), 2),
                   "seconds": round(time.time() - t0, 1)}
    out["examples"] = examples
    return out
