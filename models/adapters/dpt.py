"""DPT's discriminative adapter (Qu et al., "Discriminative Probing and Tuning for Text-to-Image Generation",
CVPR 2024): a DETR-like encoder-decoder over one (or several fused) UNet block feature maps, with N learnable
queries: M for global image-text matching (ITM), N - M for referring-expression comprehension (REC).

Pure torch (no pipeline, no `interp`): the features come in as tensors (`models.training.dpt.dpt_features`
runs the UNet through the project's one pass).

    adapter = DPTAdapter(DPTConfig())                       # blocks=("up_blocks.1",), N=16, M=4, width 128
    out = adapter([feat], t)                                 # feat [B, 128, 16, 16], t [B] long
    s = itm_score(out.match, text_pooled)                    # [B]: max_i cos(text_emb(y), h_i)

Dimension names: B batch rows, M matching queries, R = N - M grounding queries, D text-embedding width,
L text tokens, E semantic (text-to-object) width. Boxes are (cx, cy, w, h) in [0, 1] of the image unless a
name says xyxy.
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

__all__ = ["DPTConfig", "DPTAdapter", "DPTOutput", "ADAPTER_FILE", "CONFIG_FILE", "LORA_FILE",
           "box_cxcywh_to_xyxy", "box_xyxy_to_cxcywh", "box_iou", "generalized_box_iou", "timestep_embedding",
           "itm_score", "itm_contrastive_loss", "match_queries", "rec_loss", "rec_regression_loss", "REC_HEADS",
           "save_adapter", "load_adapter", "LORA_TARGETS", "add_lora", "lora_state_dict", "load_lora", "remove_lora",
           "has_lora"]

ADAPTER_FILE = "adapter.safetensors"
CONFIG_FILE = "config.json"
LORA_FILE = "lora.safetensors"
# LoRA on the cross-attention projections (`attn2` is cross-attention in diffusers)
LORA_TARGETS = ("attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0")
# the grounding (REC) heads: "queries" = the paper's R grounding queries with a matcher; "regression" = one [REG]
# token fused with the expression's tokens and the image memory in a small joint encoder (TransVG-style)
REC_HEADS = ("queries", "regression")


@dataclasses.dataclass
class DPTConfig:
    """The adapter's shape and the probing it was trained for (stored as config.json beside the weights).

    Attributes:
        blocks: UNet block names whose outputs are probed (several: resized to the first's size and summed after
            a 1x1 projection each). Default "up_blocks.1", the authors' `--unet_feature up1`.
        block_channels: channels of each block's output.
        feature_size: (h, w) the fused map is resized to (the first block's size at the model's native size).
        text_dim: width D of the pipeline's pooled text embedding (the matching space).
        width / heads / ff / enc_layers / dec_layers / dropout: the transformer.
        n_queries / n_match: N queries, the first M for matching (the rest R = N - M for grounding).
        sem_dim: width E of the text-to-object contrastive space.
        t: the timestep the scorer and grounding read the UNet at.
        model: the model folder / id the adapter was trained on (informational).
        lora_rank: rank of the stage-2 LoRA shipped beside it (0: none).
        text_memory: the grounding queries also attend to the expression's token states (MDETR-style, appended
            to the decoder's memory; the matching queries are masked from them, so s(z, y) reads the UNet only).
        rec_head: "queries" (the paper's grounding queries) or "regression" (one [REG] token: a `vl_layers`-layer
            encoder over [REG ; expression tokens ; image memory] predicts one box, its confidence and semantic
            vector; the decoder's grounding queries are then unused). See docs/dpt.md, deviation 11.
        vl_layers: layers of the regression head's joint encoder.
        vl_pool: the image memory is average-pooled by this factor before the regression head's encoder (2: a
            16x16 map becomes 64 tokens, ~4x cheaper on the CPU).
        trained_steps / stage: provenance.
        fused_denoise_weight: the weight of the same UNet call's relative denoising error in the `dpt_fused`
            scorer, chosen on validation (`bench/dpt_eval.py fuse-val --write`); None: not chosen.
    """

    blocks: tuple[str, ...] = ("up_blocks.1",)
    block_channels: tuple[int, ...] = (128,)
    feature_size: tuple[int, int] = (16, 16)
    text_dim: int = 64
    width: int = 128
    heads: int = 4
    ff: int = 256
    enc_layers: int = 1
    dec_layers: int = 1
    dropout: float = 0.1
    n_queries: int = 16
    n_match: int = 4
    sem_dim: int = 32
    t: int = 250
    model: str = ""
    lora_rank: int = 0
    trained_steps: int = 0
    stage: int = 1
    text_memory: bool = True
    rec_head: str = "queries"
    vl_layers: int = 2
    vl_pool: int = 2
    fused_denoise_weight: float | None = None

    def __post_init__(self) -> None:
        self.blocks = tuple(self.blocks)
        self.block_channels = tuple(int(c) for c in self.block_channels)
        self.feature_size = tuple(int(v) for v in self.feature_size)
        if len(self.blocks) != len(self.block_channels) or not self.blocks:
            raise ValueError("DPTConfig: one channel count per block, at least one block")
        if not 0 < self.n_match < self.n_queries:
            raise ValueError("DPTConfig: need 0 < n_match < n_queries")
        if self.vl_pool < 1:
            raise ValueError("DPTConfig: vl_pool must be >= 1")
        if self.rec_head not in REC_HEADS:
            raise ValueError(f"DPTConfig: rec_head must be one of {', '.join(REC_HEADS)}, got {self.rec_head!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @staticmethod
    def from_dict(d: dict) -> "DPTConfig":
        names = {f.name for f in dataclasses.fields(DPTConfig)}
        d = {"text_memory": False, **d}  # adapters saved before the option existed had no text memory
        return DPTConfig(**{k: v for k, v in d.items() if k in names})


@dataclasses.dataclass
class DPTOutput:
    """The adapter's outputs for B rows.

    Attributes:
        match: matching queries projected to the text space (not normalised)       [B, M, D]
        logit_scale: exp of the learnable log inverse temperature (scalar tensor)
        logits: grounding queries' "this is the referred object" logit              [B, R]
        boxes: grounding queries' boxes (cx, cy, w, h) in [0, 1]                    [B, R, 4]
        sem: grounding queries' semantic vectors, L2-normalised                     [B, R, E]
            (rec_head "regression": R = 1, the [REG] token, whose logit is the confidence that its box is right,
            IoU >= 0.5; R = 0 when no expression tokens were given)
        hidden: decoder output of every query                                       [B, N, width]
    """

    match: torch.Tensor
    logit_scale: torch.Tensor
    logits: torch.Tensor
    boxes: torch.Tensor
    sem: torch.Tensor
    hidden: torch.Tensor

    @property
    def probs(self) -> torch.Tensor:
        """Sigmoid of `logits`                                                      [B, R]"""
        return self.logits.sigmoid()

    def best(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's most probable grounding box (cx, cy, w, h) `[B, 4]` and its probability `[B]`."""
        p = self.probs
        best = p.argmax(-1)
        rows = torch.arange(p.shape[0], device=p.device)
        return self.boxes[rows, best], p[rows, best]


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10_000.0) -> torch.Tensor:
    """Sinusoidal timestep embedding (DDPM / the UNet's own `Timesteps`), `[B]` -> `[B, dim]` float32."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, dim % 2))


class _MLP(nn.Sequential):
    def __init__(self, d_in: int, d_hidden: int, d_out: int, layers: int):
        mods: list[nn.Module] = []
        dims = [d_in] + [d_hidden] * (layers - 1) + [d_out]
        for i in range(layers):
            mods.append(nn.Linear(dims[i], dims[i + 1]))
            if i < layers - 1:
                mods.append(nn.ReLU())
        super().__init__(*mods)


class DPTAdapter(nn.Module):
    """DETR-like probe: features -> 1x1 projection (+ fusion) -> + learnable position and timestep embeddings
    -> TransformerEncoder -> TransformerDecoder with N learnable queries -> ITM and REC heads.

    Example:
        >>> a = DPTAdapter(DPTConfig(blocks=("up_blocks.1",), block_channels=(128,)))
        >>> out = a([torch.randn(2, 128, 16, 16)], torch.tensor([250, 250]))
        >>> out.match.shape, out.boxes.shape          # [2, 4, 64], [2, 12, 4]
    """

    def __init__(self, config: DPTConfig):
        super().__init__()
        c = self.config = config
        self.input_proj = nn.ModuleList(nn.Conv2d(ch, c.width, kernel_size=1) for ch in c.block_channels)
        self.pos = nn.Parameter(torch.randn(c.width, *c.feature_size) * 0.02)  # [width, h, w], learnable
        self.time_mlp = nn.Sequential(nn.Linear(c.width, c.width), nn.SiLU(), nn.Linear(c.width, c.width))
        self.encoder = nn.TransformerEncoder(
            nn.TransformerEncoderLayer(c.width, c.heads, c.ff, c.dropout, batch_first=True), c.enc_layers,
            enable_nested_tensor=False)
        self.decoder = nn.TransformerDecoder(
            nn.TransformerDecoderLayer(c.width, c.heads, c.ff, c.dropout, batch_first=True), c.dec_layers)
        self.queries = nn.Embedding(c.n_queries, c.width)
        self.match_proj = _MLP(c.width, c.width, c.text_dim, 2)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.prob_head = nn.Linear(c.width, 1)
        self.box_head = _MLP(c.width, c.width, 4, 3)
        self.sem_head = nn.Linear(c.width, c.sem_dim)
        self.token_proj = nn.Linear(c.text_dim, c.sem_dim)
        if c.text_memory or c.rec_head == "regression":
            self.text_in = nn.Linear(c.text_dim, c.width)
            self.text_type = nn.Parameter(torch.zeros(c.width))
        if c.rec_head == "regression":
            self.reg_token = nn.Parameter(torch.randn(c.width) * 0.02)
            gh, gw = (-(-v // max(c.vl_pool, 1)) for v in c.feature_size)
            self.vl_pos = nn.Parameter(torch.randn(gh * gw, c.width) * 0.02)  # [h' * w', width], the pooled grid
            self.vl = nn.TransformerEncoder(
                nn.TransformerEncoderLayer(c.width, c.heads, c.ff, c.dropout, batch_first=True), c.vl_layers,
                enable_nested_tensor=False)

    def fuse(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        """Project each block's map to `width`, resize to `feature_size`, sum: `[B, width, h, w]`."""
        if len(features) != len(self.input_proj):
            raise ValueError(f"DPTAdapter expects {len(self.input_proj)} feature maps "
                             f"({', '.join(self.config.blocks)}), got {len(features)}")
        size = tuple(self.config.feature_size)
        out = 0
        for proj, f in zip(self.input_proj, features):
            f = f.float()
            if tuple(f.shape[-2:]) != size:
                f = F.interpolate(f, size=size, mode="bilinear", align_corners=False)
            out = out + proj(f)
        return out

    def encode(self, features: Sequence[torch.Tensor], t: torch.Tensor) -> torch.Tensor:
        """The image memory: fused features + position + timestep embeddings through the encoder
        `[B, h*w, width]` (row-major over the `feature_size` grid)."""
        c = self.config
        x = self.fuse(features)  # [B, width, h, w]
        B = x.shape[0]
        t = torch.as_tensor(t, device=x.device).reshape(-1).expand(B)
        temb = self.time_mlp(timestep_embedding(t, c.width))  # [B, width]
        src = x + self.pos[None] + temb[:, :, None, None]
        return self.encoder(src.flatten(2).transpose(1, 2))

    def forward(self, features: Sequence[torch.Tensor], t: torch.Tensor, tokens: torch.Tensor | None = None,
                token_mask: torch.Tensor | None = None) -> DPTOutput:
        """Args: features: one map per block `[B, C_b, h_b, w_b]`; t: timesteps `[B]`; tokens: the text
        encoder's token states `[B, L, D]` (grounding, with `text_memory`), token_mask: real tokens `[B, L]` bool.
        The matching outputs never depend on `tokens`. Returns DPTOutput."""
        c = self.config
        mem = self.encode(features, t)  # [B, h*w, width]
        B = mem.shape[0]
        q = self.queries.weight[None].expand(B, -1, -1)
        if c.rec_head == "regression":
            hs = self.decoder(q, mem)  # [B, N, width]: the grounding queries' outputs are not read
            return DPTOutput(match=self.match_proj(hs[:, : c.n_match]), logit_scale=self.logit_scale.exp(),
                             **self.regression_head(mem, tokens, token_mask), hidden=hs)
        if tokens is not None and c.text_memory:
            L, S = tokens.shape[1], mem.shape[1]
            txt = self.text_in(tokens.float()) + self.text_type
            mem = torch.cat([mem, txt], dim=1)  # [B, h*w + L, width]
            mm = torch.zeros(c.n_queries, S + L, dtype=torch.bool, device=mem.device)
            mm[: c.n_match, S:] = True  # the matching queries do not see the text
            kp = torch.zeros(B, S + L, dtype=torch.bool, device=mem.device)
            if token_mask is not None:
                kp[:, S:] = ~token_mask.bool()
            hs = self.decoder(q, mem, memory_mask=mm, memory_key_padding_mask=kp)
        else:
            hs = self.decoder(q, mem)  # [B, N, width]
        hm, hr = hs[:, : c.n_match], hs[:, c.n_match:]
        return DPTOutput(match=self.match_proj(hm), logit_scale=self.logit_scale.exp(),
                         logits=self.prob_head(hr).squeeze(-1), boxes=self.box_head(hr).sigmoid(),
                         sem=F.normalize(self.sem_head(hr), dim=-1), hidden=hs)

    def regression_head(self, mem: torch.Tensor, tokens: torch.Tensor | None, token_mask: torch.Tensor | None
                        ) -> dict[str, torch.Tensor]:
        """The [REG] head on the image memory `[B, h*w, width]` (`encode`): `[REG ; text ; memory pooled by
        vl_pool]` through `vl` -> logits `[B, 1]`, boxes `[B, 1, 4]`, sem `[B, 1, E]` (R = 0 rows of each when
        `tokens` is None: matching only)."""
        c = self.config
        B, _, W = mem.shape
        if tokens is None:
            return {"logits": mem.new_zeros(B, 0), "boxes": mem.new_zeros(B, 0, 4),
                    "sem": mem.new_zeros(B, 0, c.sem_dim)}
        if c.vl_pool > 1:
            grid = mem.float().transpose(1, 2).reshape(B, W, *c.feature_size)
            mem = F.avg_pool2d(grid, c.vl_pool, ceil_mode=True).flatten(2).transpose(1, 2)  # [B, S', width]
        mem = mem + self.vl_pos
        S = mem.shape[1]
        L = tokens.shape[1]
        txt = self.text_in(tokens.float()) + self.text_type
        x = torch.cat([self.reg_token.expand(B, 1, W), txt, mem], dim=1)  # [B, 1 + L + S, width]
        kp = torch.zeros(B, 1 + L + S, dtype=torch.bool, device=mem.device)
        if token_mask is not None:
            kp[:, 1: 1 + L] = ~token_mask.bool()
        h = self.vl(x, src_key_padding_mask=kp)[:, :1]  # [B, 1, width]
        return {"logits": self.prob_head(h).squeeze(-1), "boxes": self.box_head(h).sigmoid(),
                "sem": F.normalize(self.sem_head(h), dim=-1)}

    def grounding_parameters(self) -> list[nn.Parameter]:
        """The parameters only grounding reads (matching never depends on them): REC heads, text projection and,
        for the regression head, [REG] and its encoder. Training these alone keeps s(z, y) bit-identical."""
        names = ("reg_token", "vl.", "vl_pos", "text_in.", "text_type", "prob_head.", "box_head.", "sem_head.",
                 "token_proj.")
        return [p for n, p in self.named_parameters() if n.startswith(names)]

    def project_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Text-encoder token states `[B, L, D]` -> normalised semantic vectors `[B, L, E]`."""
        return F.normalize(self.token_proj(tokens.float()), dim=-1)


# --- boxes ---------------------------------------------------------------------------------------------
def box_cxcywh_to_xyxy(b: torch.Tensor) -> torch.Tensor:
    """(cx, cy, w, h) -> (x0, y0, x1, y1), last dim."""
    cx, cy, w, h = b.unbind(-1)
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1)


def box_xyxy_to_cxcywh(b: torch.Tensor) -> torch.Tensor:
    """(x0, y0, x1, y1) -> (cx, cy, w, h), last dim."""
    x0, y0, x1, y1 = b.unbind(-1)
    return torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], dim=-1)


def box_iou(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pairwise IoU and union of xyxy boxes `[P, 4]` x `[Q, 4]` -> `[P, Q]` each."""
    area_a = (a[:, 2] - a[:, 0]).clamp(min=0) * (a[:, 3] - a[:, 1]).clamp(min=0)
    area_b = (b[:, 2] - b[:, 0]).clamp(min=0) * (b[:, 3] - b[:, 1]).clamp(min=0)
    lt = torch.max(a[:, None, :2], b[None, :, :2])
    rb = torch.min(a[:, None, 2:], b[None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = area_a[:, None] + area_b[None] - inter
    return inter / union.clamp(min=1e-9), union


def generalized_box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise generalised IoU (Rezatofighi et al. 2019) of xyxy boxes `[P, 4]` x `[Q, 4]` -> `[P, Q]`."""
    iou, union = box_iou(a, b)
    lt = torch.min(a[:, None, :2], b[None, :, :2])
    rb = torch.max(a[:, None, 2:], b[None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    hull = wh[..., 0] * wh[..., 1]
    return iou - (hull - union) / hull.clamp(min=1e-9)


# --- ITM -----------------------------------------------------------------------------------------------
def itm_score(match: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """s(z, y) = max_i cos(text_emb(y), h_i): match `[B, M, D]`, text `[B, D]` -> `[B]`."""
    return (F.normalize(match.float(), dim=-1) * F.normalize(text.float(), dim=-1)[:, None]).sum(-1).max(-1).values


def itm_contrastive_loss(s_i2t: torch.Tensor, s_t2i: torch.Tensor, logit_scale: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Image-to-text and text-to-image contrastive losses over hard candidates (the authors'
    `ContrastiveLoss_V1_MaxQueryMatching`): column 0 is the positive.

    Args:
        s_i2t: one image against K texts (true caption, hard negative, random caption)      [B, K]
        s_t2i: one text against K images (true image, hard-negative image, random image)    [B, K]
        logit_scale: exp(learnable log(1 / temperature)), initialised to 1 / 0.07.
    Returns:
        (loss_t2i, loss_i2t), cross-entropy means.
    """
    target = torch.zeros(s_i2t.shape[0], dtype=torch.long, device=s_i2t.device)
    return F.cross_entropy(s_t2i * logit_scale, target), F.cross_entropy(s_i2t * logit_scale, target)


# --- REC -----------------------------------------------------------------------------------------------
@torch.no_grad()
def match_queries(out: DPTOutput, boxes: torch.Tensor, cost_weights: Sequence[float] = (1.0, 5.0, 2.0)
                  ) -> torch.Tensor:
    """The grounding query of each row that best fits its one true box (DETR's matcher with one target):
    argmin over queries of  -w0 p + w1 L1(box, true) + w2 (1 - GIoU(box, true)).

    Args: out: the adapter's outputs; boxes: the true boxes (cx, cy, w, h) in [0, 1] `[B, 4]`.
    Returns: query indices into the R grounding queries `[B]` long.
    """
    w0, w1, w2 = cost_weights
    p = out.logits.sigmoid()  # [B, R]
    l1 = (out.boxes - boxes[:, None]).abs().sum(-1)  # [B, R]
    giou = torch.stack([generalized_box_iou(box_cxcywh_to_xyxy(pb), box_cxcywh_to_xyxy(tb[None]))[:, 0]
                        for pb, tb in zip(out.boxes, boxes)])  # [B, R]
    return (-w0 * p + w1 * l1 + w2 * (1 - giou)).argmin(-1)


def rec_loss(out: DPTOutput, boxes: torch.Tensor, tokens: torch.Tensor | None = None,
             positive: torch.Tensor | None = None, valid: torch.Tensor | None = None,
             weights: Sequence[float] = (1.0, 5.0, 2.0, 1.0), eos_coef: float = 0.1, temperature: float = 0.07,
             idx: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Referring-expression loss: lambda0 prob + lambda1 L1 + lambda2 GIoU + lambda3 text-to-object contrastive.

    prob: binary cross-entropy of the matched query's "referred" probability against 1 and of every other
    grounding query against 0, the latter weighted by `eos_coef` (the authors' no-object weight), summed over
    queries, mean over rows. L1 / GIoU: the matched query's box against the true box (mean over rows). Contrastive
    (MDETR's `contrastive_align`): the matched query's semantic vector against the expression's token vectors,
    query-to-tokens and tokens-to-query, temperature 0.07, positive tokens = the referred object's words.

    Args:
        out: adapter outputs                                                          (B rows)
        boxes: true boxes (cx, cy, w, h) in [0, 1]                                    [B, 4]
        tokens: the adapter's projected token vectors (`DPTAdapter.project_tokens`)    [B, L, E]
        positive: which tokens name the referred object                               [B, L] bool
        valid: which tokens are real (BOS, words, EOS), not padding                   [B, L] bool
        weights: (lambda0, lambda1, lambda2, lambda3), default (1, 5, 2, 1).
        idx: the matched queries (default `match_queries(out, boxes)`)                [B]
    Returns:
        {"prob", "l1", "giou", "align", "loss"} (scalar tensors), plus "idx".
    """
    B, R = out.logits.shape
    idx = match_queries(out, boxes) if idx is None else idx
    rows = torch.arange(B, device=out.logits.device)
    target = torch.zeros_like(out.logits)
    target[rows, idx] = 1.0
    w = torch.full_like(out.logits, eos_coef)
    w[rows, idx] = 1.0
    prob = (F.binary_cross_entropy_with_logits(out.logits, target, reduction="none") * w).sum(-1).mean()
    pb = out.boxes[rows, idx]  # [B, 4]
    l1 = (pb - boxes).abs().sum(-1).mean()
    giou = (1 - torch.diagonal(generalized_box_iou(box_cxcywh_to_xyxy(pb), box_cxcywh_to_xyxy(boxes)))).mean()
    align = torch.zeros((), device=out.logits.device)
    if tokens is not None and positive is not None:
        valid = torch.ones_like(positive) if valid is None else valid
        logits = out.sem @ tokens.transpose(1, 2) / temperature  # [B, R, L]
        logits = logits.masked_fill(~valid[:, None, :], -1e4)
        q = logits[rows, idx]  # [B, L]
        pos = positive & valid
        npos = pos.sum(-1).clamp(min=1)
        q2t = (-(q * pos).sum(-1) / npos + q.logsumexp(-1))  # [B]
        t2q = -logits[rows, idx] + logits.logsumexp(1)  # [B, L]: each positive token against all queries
        t2q = (t2q * pos).sum(-1) / npos
        align = ((q2t + t2q) / 2).mean()
    l0, l1w, l2w, l3w = weights
    total = l0 * prob + l1w * l1 + l2w * giou + l3w * align
    return {"prob": prob, "l1": l1, "giou": giou, "align": align, "loss": total, "idx": idx}


def rec_regression_loss(out: DPTOutput, boxes: torch.Tensor, tokens: torch.Tensor | None = None,
                        positive: torch.Tensor | None = None, valid: torch.Tensor | None = None,
                        weights: Sequence[float] = (1.0, 5.0, 2.0, 1.0), temperature: float = 0.07
                        ) -> dict[str, torch.Tensor]:
    """REC loss of the regression head (one box a row, no matching): lambda0 conf + lambda1 L1 + lambda2 GIoU +
    lambda3 align, where conf is the binary cross-entropy of the [REG] logit against "this box has IoU >= 0.5
    with the true box" (its own box, detached: the score `ground` returns is that probability), and align is the
    query-to-tokens half of `rec_loss`'s contrastive term (one query: the tokens-to-query half is constant).

    Args: as `rec_loss`, with `out.logits` `[B, 1]`. Returns {"prob", "l1", "giou", "align", "loss", "iou"}.
    """
    if out.boxes.shape[1] != 1:
        raise ValueError("rec_regression_loss needs the regression head's outputs (one box a row)")
    pb = out.boxes[:, 0]  # [B, 4]
    pxy, txy = box_cxcywh_to_xyxy(pb), box_cxcywh_to_xyxy(boxes)
    l1 = (pb - boxes).abs().sum(-1).mean()
    giou = (1 - torch.diagonal(generalized_box_iou(pxy, txy))).mean()
    iou = torch.diagonal(box_iou(pxy.detach(), txy)[0])  # [B]
    prob = F.binary_cross_entropy_with_logits(out.logits[:, 0], (iou >= 0.5).float())
    align = torch.zeros((), device=pb.device)
    if tokens is not None and positive is not None:
        valid = torch.ones_like(positive) if valid is None else valid
        q = (out.sem[:, 0, None] * tokens).sum(-1) / temperature  # [B, L]
        q = q.masked_fill(~valid, -1e4)
        pos = positive & valid
        align = (-(q * pos).sum(-1) / pos.sum(-1).clamp(min=1) + q.logsumexp(-1)).mean()
    l0, l1w, l2w, l3w = weights
    return {"prob": prob, "l1": l1, "giou": giou, "align": align, "iou": iou.mean(),
            "loss": l0 * prob + l1w * l1 + l2w * giou + l3w * align}


# --- saving --------------------------------------------------------------------------------------------
def save_adapter(adapter: DPTAdapter, folder: str | Path, extra: dict | None = None) -> Path:
    """Write `adapter.safetensors` and `config.json` (the DPTConfig, plus `extra` under "extra") to `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in adapter.state_dict().items()}, folder / ADAPTER_FILE)
    d = adapter.config.to_dict()
    if extra:
        d["extra"] = extra
    (folder / CONFIG_FILE).write_text(json.dumps(d, indent=2) + "\n")
    return folder


def load_adapter(folder: str | Path, device: str | torch.device = "cpu") -> DPTAdapter:
    """The adapter saved in `folder` (eval mode). FileNotFoundError when there is none."""
    folder = Path(folder)
    if not (folder / ADAPTER_FILE).exists():
        raise FileNotFoundError(f"no DPT adapter in {folder} (expected {ADAPTER_FILE} and {CONFIG_FILE})")
    cfg = DPTConfig.from_dict(json.loads((folder / CONFIG_FILE).read_text()))
    a = DPTAdapter(cfg)
    a.load_state_dict(load_file(folder / ADAPTER_FILE))
    return a.to(device).eval()


# --- LoRA (stage 2) ------------------------------------------------------------------------------------
def add_lora(unet: nn.Module, rank: int = 4, alpha: float | None = None, name: str = "dpt") -> list[nn.Parameter]:
    """Add a peft LoRA (rank `rank`) on the UNet's cross-attention projections (`LORA_TARGETS`); the base weights
    are frozen and left untouched. Returns the LoRA parameters (trainable)."""
    # lazy: peft (~1.4 s to import) is only needed for the LoRA variant, not on every start of the app or CLI
    from peft import LoraConfig

    cfg = LoraConfig(r=rank, lora_alpha=alpha or rank, init_lora_weights="gaussian", target_modules=list(LORA_TARGETS))
    unet.requires_grad_(False)
    unet.add_adapter(cfg, adapter_name=name)
    params = [p for n, p in unet.named_parameters() if "lora_" in n]
    for p in params:
        p.requires_grad_(True)
    return params


def has_lora(unet: nn.Module) -> bool:
    """Whether a LoRA layer is present in the UNet."""
    return any("lora_" in n for n, _ in unet.named_parameters())


def lora_state_dict(unet: nn.Module, name: str = "dpt") -> dict[str, torch.Tensor]:
    """The LoRA weights of adapter `name` only (`peft.get_peft_model_state_dict`), on the CPU."""
    # lazy: peft (~1.4 s to import) is only needed for the LoRA variant, not on every start of the app or CLI
    from peft.utils import get_peft_model_state_dict

    return {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(unet, adapter_name=name).items()}


def load_lora(unet: nn.Module, folder: str | Path, rank: int, name: str = "dpt") -> None:
    """Add a LoRA (as `add_lora`) and load its weights from `folder/lora.safetensors`; inference only."""
    # lazy: peft (~1.4 s to import) is only needed for the LoRA variant, not on every start of the app or CLI
    from peft.utils import set_peft_model_state_dict

    add_lora(unet, rank, name=name)
    set_peft_model_state_dict(unet, load_file(Path(folder) / LORA_FILE), adapter_name=name)
    unet.requires_grad_(False)


def remove_lora(unet: nn.Module) -> None:
    """Remove every LoRA layer, restoring the original modules (and so the base model's outputs)."""
    # lazy: peft (~1.4 s to import) is only needed for the LoRA variant, not on every start of the app or CLI
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, module in list(unet.named_modules()):
        if isinstance(module, BaseTunerLayer):
            parent_name, _, child = name.rpartition(".")
            parent = unet.get_submodule(parent_name) if parent_name else unet
            setattr(parent, child, module.get_base_layer())
    if hasattr(unet, "peft_config"):
        del unet.peft_config
    unet._hf_peft_config_loaded = False
