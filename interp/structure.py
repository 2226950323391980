"""A structure-aware attention score: does the cross-attention layout agree with the caption's structure?

Same trace and same UNet calls as the LSE scorer (`interp.lse`); only the read-out differs. Pure functions
over traces; the registered scorer ("structure", `interp.scorers.structure`) runs the noised pass.

Read-out, per caption:
 1. Parse the caption (`models.shapes.world.parse_caption`) into noun phrases (their content words: number,
    size, color, shape) and the relation. Captions outside the grammar are bound leniently
    (`bind_caption`): every run of consecutive content words is a phrase, and a relation is kept when a
    relation expression ("left of", "right of", "above", "below") stands between exactly two phrases.
    When nothing can be bound (no phrase of two words and fewer than two phrases), or when the trace's
    tokens do not spell the caption, the caption falls back to the LSE score (`interp.lse.lse_score`)
    with a note.
 2. Word maps: `interp.heatmaps.word_heatmaps` (default aggregate: all layers averaged, heads and steps
    averaged, bilinearly resized to `size` x `size`); each map is clamped at 0 and normalised to a
    probability distribution p_w over the size^2 positions (a map without mass becomes uniform).
 3. Terms, with HI(p, q) = sum_i min(p_i, q_i) the histogram intersection (1: same distribution,
    0: disjoint supports):

        within_k  = mean over unordered word pairs {a, b} of phrase k of HI(p_a, p_b)
                    (color-shape, size-color, size-shape, number-color, ...; phrases of >= 2 words)
        within    = mean over those phrases of within_k
        cross     = mean over word pairs (a in phrase k, b in phrase l), k < l, of HI(p_a, p_b)
                    (only with two or more phrases; 0 otherwise)
        binding   = within - w_cross * cross                               in [-w_cross, 1]

        P_k       = mean of the phrase's p_w (a distribution); centroid c_k = sum_i P_k(i) (x_i, y_i) with
                    (x_i, y_i) = ((col + 0.5) / size, (row + 0.5) / size), image coordinates, y down
        d         = c_1 - c_2  (subject minus object)
        relation  = d . REL_DIRECTION[relation]                             in (-1, 1)
                    positive when the subject's attention lies on the relation's side of the object's

        score     = binding + w_rel * relation  [+ w_lse * LSE score, off by default]

    Single captions: binding only (within). Count captions: binding only (number, color and plural shape
    should share one map: the union of the objects); there is no term for the map's spread over several
    blobs, so a count change ("two" vs "three") is invisible to this score.
    Defaults: size 16, w_rel 1, w_cross 1, w_lse 0.

Caveat: binding alone does not see content. "a red circle" and "a blue circle" on a single object both
bind well if the model attends to the object for every word; the score is made for compositional
hard negatives (swapped attributes, swapped roles, flipped relations), not for attribute changes.

    >>> res = noised_unet_pass(pipe, encode_image(pipe, image), captions, [300])
    >>> s = structure_score(res.traces[0], captions[0])
    >>> s.score, s.binding, s.relation, s.as_dict()["phrases"]
    >>> evaluate_matching(pipe, "comvg", MatchOptions(scorer="structure", timesteps=(300,)))
"""
from __future__ import annotations

import dataclasses
import itertools
from typing import Sequence

import numpy as np
import torch

from models.shapes import world
from models.trace import AttentionTrace

from interp.heatmaps import word_heatmaps
from interp.lse import ScoreBreakdown, lse_score

__all__ = ["StructureConfig", "Binding", "PhraseTerms", "StructureScore", "bind_caption", "histogram_intersection",
           "word_distributions", "structure_score", "structure_scores", "lse_kwargs", "relation_displacement",
           "learn_relation_directions"]

CONTENT = ("size", "color", "shape", "count")
LSE_DEFAULTS = {"source": "probs", "layers": None, "pooling": "lse", "lam": 1.0, "tokens": "words"}


@dataclasses.dataclass(frozen=True)
class StructureConfig:
    """How word maps are aggregated and the terms weighted.

    size: side of the word maps (positions = size^2); layers / heads / steps: the aggregate's selection
    (None = all; heads and steps are indices into the trace's kept heads / steps); w_rel, w_cross, w_lse:
    the weights of the formula in the module docstring.
    """

    size: int = 16
    layers: tuple[int | str, ...] | None = None
    heads: tuple[int, ...] | None = None
    steps: tuple[int, ...] | None = None
    w_rel: float = 1.0
    w_cross: float = 1.0
    w_lse: float = 0.0
    # relation word -> unit direction (x, y) of subject minus object; None: the world's hard-coded
    # `REL_DIRECTION` (what the relation words mean), else directions learned from data (`learn_relation_directions`)
    directions: tuple[tuple[str, tuple[float, float]], ...] | None = None

    def direction(self, relation: str) -> tuple[float, float] | None:
        """The relation's direction; None when directions were learned and this relation was never seen."""
        table = world.REL_DIRECTION if self.directions is None else dict(self.directions)
        return tuple(float(v) for v in table[relation]) if relation in table else None


@dataclasses.dataclass(frozen=True)
class Binding:
    """What of a caption can be bound: phrases (word indices into `words`), the relation, and how found."""

    words: tuple[str, ...]
    phrases: tuple[tuple[int, ...], ...]
    relation: str | None
    relation_idx: tuple[int, ...]
    kind: str  # "single" | "relation" | "count" (grammar) or "lenient" (outside the grammar)
    note: str | None = None

    @property
    def scoreable(self) -> bool:
        """At least one within-phrase pair or two phrases to compare."""
        return any(len(p) >= 2 for p in self.phrases) or len(self.phrases) >= 2

    @property
    def bound_words(self) -> list[str]:
        """Words that enter a term: phrase words when a pair or a second phrase exists."""
        if not self.scoreable:
            return []
        return [self.words[i] for p in self.phrases for i in p if len(p) >= 2 or len(self.phrases) >= 2]


@dataclasses.dataclass
class PhraseTerms:
    """One noun phrase's terms: its words, within-phrase overlap (None for a one-word phrase), the
    overlap of each word pair ("red-circle": HI) and the centroid (x, y) of its merged map in [0, 1]."""

    words: list[str]
    word_idx: list[int]
    overlap: float | None
    pair_overlaps: dict[str, float]
    centroid: tuple[float, float]


@dataclasses.dataclass
class StructureScore:
    """A caption's structure score and its terms (see the module docstring for the formula).

    method "structure" or "lse" (fallback: then `score` is the LSE score and `lse` its breakdown);
    binding = within - w_cross * cross; relation (None without a relation) = displacement . direction;
    displacement = centroid(subject) - centroid(object) in image units; note says what was bound or why
    the score fell back.
    """

    caption: str
    score: float
    method: str
    kind: str | None = None
    binding: float | None = None
    within: float | None = None
    cross: float | None = None
    relation: float | None = None
    relation_word: str | None = None
    direction: tuple[float, float] | None = None
    displacement: tuple[float, float] | None = None
    phrases: list[PhraseTerms] = dataclasses.field(default_factory=list)
    bound_words: list[str] = dataclasses.field(default_factory=list)
    weights: dict[str, float] = dataclasses.field(default_factory=dict)
    size: int | None = None
    note: str | None = None
    lse: ScoreBreakdown | None = None

    def as_dict(self) -> dict:
        """Plain data (JSON-ready)."""
        d = {k: getattr(self, k) for k in ("caption", "score", "method", "kind", "binding", "within", "cross",
                                           "relation", "relation_word", "bound_words", "weights", "size", "note")}
        d["direction"] = list(self.direction) if self.direction is not None else None
        d["displacement"] = list(self.displacement) if self.displacement is not None else None
        d["phrases"] = [{"words": p.words, "word_idx": p.word_idx, "overlap": p.overlap,
                         "pair_overlaps": dict(p.pair_overlaps), "centroid": list(p.centroid)} for p in self.phrases]
        d["lse"] = self.lse.as_dict() if self.lse is not None else None
        return d


# ----------------------------------------------------------------------------------------------
# Parsing
# ----------------------------------------------------------------------------------------------
def _normalize(caption: str) -> str:
    return " ".join(str(caption).strip().lower().split())


def bind_caption(caption: str) -> Binding:
    """Phrases and relation of a caption: the grammar's parse, or a lenient one outside the grammar."""
    text = _normalize(caption)
    try:
        p = world.parse_caption(text)
        return Binding(p.words, tuple(tuple(ph.word_idx) for ph in p.phrases), p.relation, tuple(p.relation_idx),
                       p.kind)
    except world.CaptionError:
        pass
    words = tuple(text.split())
    classes = world.word_classes(text)
    phrases, run = [], []
    for i, c in enumerate(classes):
        if c in CONTENT:
            run.append(i)
        elif run:
            phrases.append(tuple(run))
            run = []
    if run:
        phrases.append(tuple(run))
    relation, rel_idx = None, ()
    if len(phrases) == 2:  # a relation expression inside the gap between the two phrases
        gap = range(phrases[0][-1] + 1, phrases[1][0])
        for rel in world.RELATIONS:
            n = len(rel.split())
            hit = next((s for s in gap if s + n - 1 in gap and " ".join(words[s:s + n]) == rel), None)
            if hit is not None:
                relation, rel_idx = rel, tuple(range(hit, hit + n))
                break
    b = Binding(words, tuple(phrases), relation, rel_idx, "lenient")
    bound = b.bound_words
    if not b.scoreable:
        note = f"outside the grammar and nothing to bind (content words: {[words[i] for p in phrases for i in p]})"
    else:
        parts = ["'" + " ".join(words[i] for i in p) + "'" for p in phrases]
        note = f"outside the grammar; bound phrases {', '.join(parts)} (words {bound})"
        note += f"; relation '{relation}'" if relation else "; no known relation between two phrases"
        left = [w for k, w in enumerate(words) if classes[k] == "relation" and k not in rel_idx]
        if left:
            note += f"; unused relation words {left}"
    return dataclasses.replace(b, note=note)


# ----------------------------------------------------------------------------------------------
# Maps and terms
# ----------------------------------------------------------------------------------------------
def histogram_intersection(p, q) -> float:
    """sum_i min(p_i, q_i) of two distributions (any equal shapes)."""
    a = torch.as_tensor(np.asarray(p, np.float64)) if not torch.is_tensor(p) else p.double()
    b = torch.as_tensor(np.asarray(q, np.float64)) if not torch.is_tensor(q) else q.double()
    return float(torch.minimum(a, b).sum())


def word_distributions(trace: AttentionTrace, words: Sequence[str], config: StructureConfig = StructureConfig()
                       ) -> torch.Tensor:
    """Word maps as distributions, float64 `[words, size, size]`, each summing to 1 (uniform if no mass)."""
    _, maps = word_heatmaps(trace, words=list(words), size=int(config.size),
                            layers=list(config.layers) if config.layers is not None else None,
                            heads=list(config.heads) if config.heads is not None else None,
                            steps=list(config.steps) if config.steps is not None else None)
    m = maps.double().clamp(min=0)
    mass = m.sum((-2, -1), keepdim=True)
    uniform = torch.full_like(m, 1.0 / (m.shape[-1] * m.shape[-2]))
    return torch.where(mass > 0, m / mass.clamp(min=1e-300), uniform)


def _centroid(P: torch.Tensor) -> tuple[float, float]:
    h, w = P.shape
    ys = (torch.arange(h, dtype=torch.float64) + 0.5) / h
    xs = (torch.arange(w, dtype=torch.float64) + 0.5) / w
    return float((P.sum(0) * xs).sum()), float((P.sum(1) * ys).sum())


def _lse(trace: AttentionTrace, lse_kw: dict | None) -> tuple[ScoreBreakdown, str | None]:
    kw = {**LSE_DEFAULTS, **(lse_kw or {})}
    note = None
    if kw["source"] == "logits" and not trace.logits:
        kw["source"] = "probs"
        note = "logits not traced: LSE on probs"
    return lse_score(trace, **kw), note


def _fallback(trace, caption, why: str, lse_kw, config: StructureConfig) -> StructureScore:
    b, n2 = _lse(trace, lse_kw)
    note = f"LSE fallback: {why}" + (f" ({n2})" if n2 else "")
    return StructureScore(caption, float(b.score), "lse", note=note, lse=b, size=int(config.size),
                          weights={"w_rel": config.w_rel, "w_cross": config.w_cross, "w_lse": config.w_lse})


def structure_score(trace: AttentionTrace, caption: str | None = None, config: StructureConfig = StructureConfig(),
                    lse_kw: dict | None = None) -> StructureScore:
    """Structure score of one traced caption (formula in the module docstring).

    Args:
        trace: the caption's AttentionTrace (e.g. from models.unet_pass.noised_unet_pass).
        caption: the caption (default: the trace's prompt); its words must be spelled by the trace's tokens.
        config: aggregation and weights.
        lse_kw: options of the LSE fallback / LSE term (`interp.lse.lse_score` keywords; default
            source="probs", all layers, pooling "lse", lam 1, tokens "words"); logits fall back to probs
            when the trace holds none.
    """
    caption = trace.prompt if caption is None else caption
    b = bind_caption(caption)
    if not b.scoreable:
        return _fallback(trace, caption, b.note or "nothing to bind", lse_kw, config)
    try:
        P = word_distributions(trace, b.words, config)
    except ValueError as e:
        return _fallback(trace, caption, f"the trace's tokens do not spell the caption ({e})", lse_kw, config)

    terms: list[PhraseTerms] = []
    withins = []
    for ph in b.phrases:
        pairs = {f"{b.words[i]}-{b.words[j]}": histogram_intersection(P[i], P[j])
                 for i, j in itertools.combinations(ph, 2)}
        ov = float(np.mean(list(pairs.values()))) if pairs else None
        if ov is not None:
            withins.append(ov)
        merged = P[list(ph)].mean(0)
        terms.append(PhraseTerms([b.words[i] for i in ph], list(ph), ov, pairs, _centroid(merged)))
    within = float(np.mean(withins)) if withins else 0.0
    cross_vals = [histogram_intersection(P[i], P[j])
                  for k, l in itertools.combinations(range(len(b.phrases)), 2)
                  for i in b.phrases[k] for j in b.phrases[l]]
    cross = float(np.mean(cross_vals)) if cross_vals else None
    binding = within - config.w_cross * (cross or 0.0)

    relation = direction = displacement = None
    if b.relation is not None and len(terms) == 2:
        c1, c2 = terms[0].centroid, terms[1].centroid
        displacement = (c1[0] - c2[0], c1[1] - c2[1])
        direction = config.direction(b.relation)
        if direction is not None:
            relation = displacement[0] * direction[0] + displacement[1] * direction[1]
    score = binding + config.w_rel * (relation or 0.0)
    lse_b, note = None, b.note
    if config.w_lse:
        lse_b, n2 = _lse(trace, lse_kw)
        score += config.w_lse * float(lse_b.score)
        if n2:
            note = f"{note}; {n2}" if note else n2
    return StructureScore(caption, float(score), "structure", b.kind, float(binding), within, cross, relation,
                          b.relation, direction, displacement, terms, b.bound_words,
                          {"w_rel": config.w_rel, "w_cross": config.w_cross, "w_lse": config.w_lse},
                          int(config.size), note, lse_b)


def structure_scores(traces: Sequence[AttentionTrace], captions: Sequence[str],
                     config: StructureConfig = StructureConfig(), lse_kw: dict | None = None,
                     all_or_none: bool = True) -> dict[str, StructureScore]:
    """`structure_score` of each (trace, caption) pair: {caption: StructureScore}.

    all_or_none: when any caption falls back to LSE, score every caption with LSE (scores compared
    against each other must be on one scale); each note says which caption forced it.
    """
    traces, captions = list(traces), list(captions)
    if len(traces) != len(captions):
        raise ValueError(f"{len(traces)} traces for {len(captions)} captions")
    scored = [structure_score(t, c, config, lse_kw) for t, c in zip(traces, captions)]
    fell = list(dict.fromkeys(s.caption for s in scored if s.method == "lse"))
    if all_or_none and fell and len(fell) < len(set(captions)):
        why = f"caption(s) {fell} cannot be scored structurally, so every caption is scored with LSE"
        scored = [s if s.method == "lse" else _fallback(t, c, why, lse_kw, config)
                  for t, c, s in zip(traces, captions, scored)]
    return {s.caption: s for s in scored}


def lse_kwargs(options) -> dict:
    """The LSE settings (source, layers, pooling, lam, tokens) of a `MatchOptions`-like object."""
    return {k: getattr(options, k) for k in LSE_DEFAULTS if hasattr(options, k)}


def relation_displacement(trace: AttentionTrace, caption: str, config: StructureConfig = StructureConfig()
                          ) -> tuple[str, tuple[float, float]] | None:
    """(relation word, subject-minus-object centroid displacement) of a two-phrase relation caption, else None."""
    b = bind_caption(caption)
    if not b.scoreable or b.relation is None or len(b.phrases) != 2:
        return None
    P = word_distributions(trace, b.words, config)
    c = [_centroid(P[list(ph)].mean(0)) for ph in b.phrases]
    return b.relation, (c[0][0] - c[1][0], c[0][1] - c[1][1])


def learn_relation_directions(displacements: Sequence[tuple[str, tuple[float, float]]]
                              ) -> tuple[tuple[str, tuple[float, float]], ...]:
    """Each relation word's unit direction: the normalised mean of its observed displacements (true captions of
    training items), so the structure score reads what the model's maps do instead of what the words mean.

    Example:
        >>> learn_relation_directions([("left of", (-0.2, 0.01)), ("left of", (-0.3, -0.01))])
        (('left of', (-1.0, 0.0)),)
    """
    acc: dict[str, list[tuple[float, float]]] = {}
    for rel, d in displacements:
        acc.setdefault(rel, []).append(d)
    out = []
    for rel, ds in sorted(acc.items()):
        m = np.mean(np.asarray(ds, dtype=np.float64), axis=0)
        norm = float(np.hypot(*m))
        if norm == 0:
            raise ValueError(f"relation {rel!r}: the mean displacement is zero; no direction can be learned")
        out.append((rel, (float(m[0] / norm), float(m[1] / norm))))
    return tuple(out)
