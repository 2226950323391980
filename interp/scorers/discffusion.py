"""The Discffusion authors' default score, exactly as their code computes it (eric-ai-lab/Discffusion).

The project's "lse" scorer is Eq. 4 of the paper with the project's choices. The authors' released code
(`dsd_infer.py` -> `DSDPipeline.__call__` -> their patched `UNet2DConditionModel.forward` and
`Attention.get_attention_scores`) scores a caption y against an image x as

    score(x, y) = mean over t in T of [ A_t(y) + D_t(y) ]

    A_t(y) = 1/2 (a_t(y) + a_t(""))                       the caption row and the unconditional row, averaged
    a_t(p) = mean over L of  mean over heads, positions i of  logsumexp_j logits_ij(p)
    D_t(y) = ||eps - eps_hat(x_t, "")||_2 - ||eps - eps_hat(x_t, y)||_2          (their default `--bias`)

where j runs over ALL key columns of the padded text (BOS, words, EOS and padding: a fixed count, so no
length bias), L is every attention module of the last cross-attention block of each stage (down, mid, up)
(`discffusion_layers`), the logits are the pre-softmax scores (scale * q.k), the norms are plain L2 norms
over the whole latent (not squared, not averaged), and T is their 30 timesteps t = 32, 65, ..., 989
(`authors_timesteps`), with one cached noise per timestep shared by every candidate. docs/discffusion_score.md
says where each piece is in their code and what had to be guessed.

    >>> sc = DiscffusionScorer()
    >>> res = sc.score(pipe, image, ["a red circle", "a blue square"], MatchOptions())   # 30 UNet calls
    >>> res.ranking()[0], res.extra["attention"], res.extra["denoise"]

Pure parts (`authors_timesteps`, `discffusion_layers`, `denoise_term`, `DiscffusionScorer.score_pass`) run no
model; `DiscffusionScorer.score` runs one padded noised pass (`models.unet_pass.noised_unet_pass`, padded=True,
uncond=True, logits=True).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np
import torch

from models.attention_capture import STAGES, stage_order
from models.unet_pass import PassResult

from interp.lse import lse_score
from interp.scorers.base import DEFAULT_TIMESTEPS, MatchOptions, PassSpec, ScoreResult, Scorer

__all__ = ["AUTHORS_SAMPLING_STEPS", "DiscffusionScorer", "authors_timesteps", "denoise_term",
           "discffusion_layers"]

AUTHORS_SAMPLING_STEPS = 30  # dsd_infer.py: --sampling_time_steps default


def authors_timesteps(sampling_steps: int = AUTHORS_SAMPLING_STEPS, num_train_timesteps: int = 1000,
                      num_inference_steps: int = 50, strength: float = 0.8) -> tuple[int, ...]:
    """The timesteps the authors' pipeline scores at, ascending (their `DSDPipeline.sampled_timesteps`).

    Their pipeline never calls `scheduler.set_timesteps`, so `scheduler.timesteps` is the training schedule
    reversed, `[T-1, ..., 0]` (T = num_train_timesteps; order 1 for their Euler / PNDM schedulers), and

        rate = int(1000 / sampling_steps); t_start = num_inference_steps - int(num_inference_steps * strength)
        indices = arange(t_start, T - t_start, rate); timesteps = reversed(scheduler.timesteps[indices])

    with their call's defaults num_inference_steps=50, strength=0.8 (t_start = 10) and dsd_infer's
    sampling_steps=30 (rate 33): t = 32, 65, ..., 989 (30 timesteps). The demo (`model.py`) uses
    sampling_steps=50 (rate 20, 49 timesteps). Note the `1000` of `rate` is a literal in their code.

    Args:
        sampling_steps: their `sampling_steps` (dsd_infer's `--sampling_time_steps`), 1..1000.
        num_train_timesteps: the scheduler's training timesteps T.
        num_inference_steps, strength: their `__call__` defaults (50, 0.8).
    Returns:
        the timesteps, ascending (their scoring order).
    Example:
        >>> ts = authors_timesteps()
        >>> len(ts), ts[0], ts[-1]           # (30, 32, 989)
    """
    if isinstance(sampling_steps, bool) or int(sampling_steps) != sampling_steps or not 1 <= sampling_steps <= 1000:
        raise ValueError(f"sampling_steps must be an integer in 1..1000, got {sampling_steps!r}")
    rate = int(1000 / int(sampling_steps))
    init = min(int(num_inference_steps * strength), num_inference_steps)
    t_start = max(num_inference_steps - init, 0)
    n = int(num_train_timesteps)
    sched = list(range(n - 1, -1, -1))  # scheduler.timesteps before set_timesteps: [T-1, ..., 0]
    idx = range(t_start, n - t_start, rate)
    ts = tuple(sched[i] for i in idx)[::-1]
    if not ts:
        raise ValueError(f"no timesteps for sampling_steps={sampling_steps}, num_train_timesteps={n}")
    return ts


def discffusion_layers(layers: Sequence) -> list[str]:
    """The authors' layers: every attention module of the last cross-attention block of each stage.

    Their `UNet2DConditionModel.forward` keeps, per stage (down, mid, up), the scores of the blocks that
    have cross-attention, takes the LAST such block (`list(blocks.values())[-1]`), and from it every
    attention module (`Transformer2DModel`, `attentions.{k}`), each by the cross-attention of its last
    transformer block (`list(attn.values())[-1]`). Bundled model: down.1.attn.0, mid.attn.0, up.2.attn.0,
    up.2.attn.1; SD 1.5 / 2.1: down.2.attn.{0,1}, mid.attn.0, up.3.attn.{0,1,2}.

    Args:
        layers: cross-attention layers in UNet order, objects with `.name` (diffusers module path), e.g.
            `models.attention_capture.cross_attention_layers(unet)` or a trace's `layers`.
    Returns:
        their module paths, in UNet order.
    Raises:
        ValueError: a stage has no cross-attention layer, or a name is not a UNet cross-attention path.
    Example:
        >>> from models.attention_capture import cross_attention_layers
        >>> [l.alias for l in cross_attention_layers(pipe.unet) if l.name in discffusion_layers(cross_attention_layers(pipe.unet))]
    """
    pos: dict[str, tuple[int, int, int, int]] = {}
    for l in layers:
        o = stage_order(l.name)
        if o[0] > 2:
            raise ValueError(f"{l.name!r} is not a UNet cross-attention module path")
        pos[l.name] = o
    out = []
    for s, stage in enumerate(STAGES):
        mine = {n: o for n, o in pos.items() if o[0] == s}
        if not mine:
            raise ValueError(f"no cross-attention layer in the {stage} stage (layers: {list(pos)})")
        last_block = max(o[1] for o in mine.values())
        in_block = {n: o for n, o in mine.items() if o[1] == last_block}
        for att in sorted({o[2] for o in in_block.values()}):
            last_tb = max(o[3] for o in in_block.values() if o[2] == att)
            out += [n for n, o in in_block.items() if o[2] == att and o[3] == last_tb]
    return out


def denoise_term(errors_eps, uncond_errors_eps, numel: int) -> np.ndarray:
    """The authors' denoising term per caption and step, from epsilon-space MSEs.

    D[k, s] = ||eps_s - eps_hat_s("")||_2 - ||eps_s - eps_hat_s(caption k)||_2, the L2 norm over the whole
    latent (C*h*w numbers); ||e||_2 = sqrt(numel * mean(e^2)), so it is computed exactly from the MSEs that
    `PassResult.errors_eps` / `uncond_errors_eps` hold.

    Args:
        errors_eps: `[K, S]` MSE in epsilon space of each caption row.
        uncond_errors_eps: `[S]` the same for the "" row.
        numel: numbers per latent, C*h*w.
    Returns:
        float64 `[K, S]`.
    Example:
        >>> denoise_term([[1.0]], [2.25], numel=4)        # sqrt(4*2.25) - sqrt(4*1) = 3 - 2
        array([[1.]])
    """
    e = np.asarray(errors_eps.cpu() if torch.is_tensor(errors_eps) else errors_eps, dtype=np.float64)
    u = np.asarray(uncond_errors_eps.cpu() if torch.is_tensor(uncond_errors_eps) else uncond_errors_eps,
                   dtype=np.float64)
    if e.ndim != 2 or u.shape != (e.shape[1],):
        raise ValueError(f"errors_eps must be [K, S] and uncond_errors_eps [S]; got {e.shape} and {u.shape}")
    if int(numel) < 1 or (e < 0).any() or (u < 0).any():
        raise ValueError("numel must be positive and the errors non-negative")
    return np.sqrt(numel * u)[None, :] - np.sqrt(numel * e)


def _check_padded(res: PassResult) -> None:
    trs = list(res.traces) + [res.uncond_trace]
    if res.uncond_trace is None or res.uncond_errors_eps is None:
        raise ValueError("discffusion needs the unconditional row: a pass with uncond=True")
    n = len(trs[0].tokens)
    if any(len(t.tokens) != n or list(t.token_index) != list(range(n)) for t in trs):
        raise ValueError("discffusion needs a padded pass (every key column of the padded text traced: "
                         "noised_unet_pass(..., padded=True), PassSpec.padded); got traces with "
                         f"{sorted({len(t.tokens) for t in trs})} token columns")


class DiscffusionScorer(Scorer):
    """The Discffusion authors' default score (see the module docstring): LSE of the pre-softmax logits over all
    padded key columns, in every attention of the last cross-attention block per stage, the caption and ""
    rows averaged, plus the denoising-error difference ||eps - eps_hat("")|| - ||eps - eps_hat(caption)||,
    averaged over their 30 timesteps.

    Options (MatchOptions): `source` (their choice "logits"; "probs" pools the probabilities instead), `lam`
    (theirs 1), `pooling` ("lse", theirs; "mean", "max_rows", "max_cols" also work; not "cosine"), `layers`
    (None = the authors' layers, `discffusion_layers`; a list or "last_per_stage" as for lse), `noise_seed`.
    `tokens` does not apply (always every padded column). `timesteps`: see `timesteps_for`.

    Args:
        bias: add the denoising term (their `--bias` flag, on by default: `store_false`).
        timesteps: the scorer's own default timesteps; None = `authors_timesteps()` for the model's T.
    Example:
        >>> res = DiscffusionScorer().score(pipe, image, ["a red circle", "a blue square"])
        >>> res.pass_result.timesteps[:3], res.unet_evals      # [32, 65, 98], 30 * 3
    """

    name = "discffusion"
    label = "discffusion — the Discffusion authors' score (padded LSE + denoising term)"
    description = ("The authors' own default: LogSumExp of the attention logits over the whole padded text, on the "
                   "last cross-attention block of each stage, averaged with the empty prompt's, plus how much "
                   "better the caption predicts the noise than the empty prompt. Tells apart captions that name "
                   "different colours, shapes or counts as far as the model draws them; cannot read word "
                   "order, roles or relations beyond that. The empty prompt's half is the same for every "
                   "caption of an image (it moves image comparisons, not caption rankings). One extra \"\" "
                   "row per UNet call, 30 timesteps by default.")

    def __init__(self, bias: bool = True, timesteps: Sequence[int] | None = None) -> None:
        self.bias = bool(bias)
        self.timesteps = None if timesteps is None else tuple(int(t) for t in timesteps)

    def needs(self, options: MatchOptions, captions: Sequence[str] = ()) -> PassSpec:
        return PassSpec(logits=options.source == "logits", uncond=True, padded=True)

    def timesteps_for(self, options: MatchOptions, num_train_timesteps: int = 1000) -> tuple[int, ...]:
        """The timesteps `score` runs: `options.timesteps` when the caller chose them, else the scorer's own.

        The rule: `MatchOptions.timesteps` equal to the project default (`DEFAULT_TIMESTEPS`, i.e. left
        unset) means "not chosen" and gives the scorer's own timesteps (the constructor's, or the authors'
        30); any other tuple is used as given. To run at exactly the project default, construct
        `DiscffusionScorer(timesteps=DEFAULT_TIMESTEPS)`. A shared pass (`compare_scorers`, the matching
        report) is run by its caller at the option sets' common timesteps, and `score_pass` scores whatever
        timesteps that pass has.
        """
        if tuple(options.timesteps) != tuple(DEFAULT_TIMESTEPS):
            return tuple(int(t) for t in options.timesteps)
        if self.timesteps is not None:
            return self.timesteps
        return authors_timesteps(num_train_timesteps=num_train_timesteps)

    def score(self, pipe, image, captions: Sequence[str], options: MatchOptions = MatchOptions()) -> ScoreResult:
        """One padded noised pass at `timesteps_for(options)` (30 UNet calls by default), scored by `score_pass`."""
        n_train = int(pipe.scheduler.config.num_train_timesteps)
        opts = dataclasses.replace(options, timesteps=self.timesteps_for(options, n_train))
        return super().score(pipe, image, captions, opts)

    def score_pass(self, res: PassResult, options: MatchOptions) -> ScoreResult:
        """Scores from a padded pass with the "" row (pure). `extra` holds the parts, per caption in input order:
        "attention" (the averaged attention term), "attention_caption" (the caption row's alone),
        "attention_uncond" (the "" row's, one number), "denoise" (the denoising term, mean over steps; 0-weighted
        when bias=False but still reported), "denoise_by_step" ([K][S]), "layers", "timesteps", "bias"."""
        if options.pooling == "cosine":
            raise ValueError("discffusion pools attention maps; pooling='cosine' reads cosine maps (scorer 'lse')")
        _check_padded(res)
        tr0 = res.traces[0]
        layers = options.layers
        if layers is None:
            names = discffusion_layers(tr0.layers)
            layers = [tr0.layer(n).alias for n in names]
        kw = dict(source=options.source, layers=layers, pooling=options.pooling, lam=options.lam, tokens="padded")
        br = [lse_score(t, **kw) for t in res.traces]
        unc = lse_score(res.uncond_trace, **kw)
        a_cap = np.array([b.score for b in br], dtype=np.float64)
        attention = 0.5 * (a_cap + unc.score)
        numel = int(math.prod(res.noise.shape[1:]))
        d = denoise_term(res.errors_eps, res.uncond_errors_eps, numel)  # [K, S]
        denoise = d.mean(axis=1)
        scores = attention + (denoise if self.bias else 0.0)
        K = len(res.captions)
        breakdown: dict = {}
        for c, b in zip(res.captions, br):
            breakdown.setdefault(c, b)  # a repeated caption: its first occurrence, as ScoreResult.by_caption
        extra = {"attention": attention.tolist(), "attention_caption": a_cap.tolist(),
                 "attention_uncond": float(unc.score), "denoise": denoise.tolist(), "denoise_by_step": d.tolist(),
                 "layers": list(br[0].layers), "timesteps": list(res.timesteps), "bias": self.bias}
        return ScoreResult(self.name, list(res.captions), [float(s) for s in scores], unet_calls=res.unet_calls,
                           unet_evals=res.unet_calls * (K + 1),
                           breakdown=breakdown, extra=extra, pass_result=res)
