"""Grounding (REC) head of a trained DPT adapter, trained on cached UNet features ("train-dpt --stage rec").

Stage 1 trains matching and grounding together, six UNet rows a sample. Here the adapter's matching path
(projection, encoder, decoder, matching queries) is loaded from a trained adapter and frozen, so s(z, y) stays
bit-identical, and only the grounding parameters (`DPTAdapter.grounding_parameters`, by default the regression
head: [REG] + a joint encoder over the expression's tokens and the image memory) are trained. The UNet is frozen
too, so its features of every (referring image, expression) row are computed once, at the adapter's t, through
the project's one pass (`models.training.dpt.dpt_features`), and cached (fp16) under the work folder.

    pipe = load_pipeline()
    train_rec_head(pipe, RecTrainConfig(steps=3000), work_dir="~/.cache/discolens/dpt/rec")   # resumable
    # snapshots work_dir/snap-<step>/ (a full adapter), validation IoU >= 0.5 in work_dir/log.jsonl

Cache rows (one per expression, `referring_dataset(seed, n_per_kind)`):
    feats  [K, C, h, w] fp16 (one tensor per probed block), tokens [K, Lc, D] fp16 (the first Lc text-encoder
    states), valid [K, Lc] bool, positive [K, Lc] bool, boxes [K, 4] (cx, cy, w, h) in [0, 1], kinds [K].
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from models.adapters.dpt import (
    DPTAdapter,
    DPTConfig,
    DPTOutput,
    box_cxcywh_to_xyxy,
    box_iou,
    load_adapter,
    rec_loss,
    rec_regression_loss,
    save_adapter,
)
from models.loading import frozen
from models.shapes import referring
from models.training.common import atomic_save
from models.training.dpt import (
    ADAPTERS_DIR,
    DPT_SEEDS,
    dpt_features,
    encode_images,
    positive_tokens,
    rec_accuracy,
    text_embeddings,
)

__all__ = ["RecTrainConfig", "build_rec_cache", "rec_adapter_from", "rec_metrics", "train_rec_head"]

CACHE_TOKENS = 16  # text-encoder positions kept: BOS + at most 8 words + EOS fit with room to spare


@dataclasses.dataclass
class RecTrainConfig:
    """Options of `train_rec_head`.

    Attributes:
        init_adapter: the trained adapter whose matching path is kept (frozen).
        rec_head / vl_layers / vl_pool: the grounding head to train ("regression" default; "queries" retrains the
            paper's grounding-query heads on the cache, the shared decoder frozen).
        n_train / n_val: expressions per kind in the training / validation caches (3 kinds).
        steps / batch / lr / warmup / weight_decay / clip: AdamW on the grounding parameters.
        rec_weights: (lambda0, lambda1, lambda2, lambda3), as stage 1.
        snapshot_every: steps between snapshots, each with its validation reading (the choice is made there).
        seed: data / noise / init seed (the DPT training seed); validation expressions use DPT_SEEDS["validation"].
    """

    init_adapter: str = str(ADAPTERS_DIR / "shapes-v1-dpt")
    rec_head: str = "regression"
    vl_layers: int = 2
    vl_pool: int = 2
    n_train: int = 4000
    n_val: int = 100
    steps: int = 3000
    batch: int = 64
    lr: float = 3e-4
    warmup: int = 100
    weight_decay: float = 1e-2
    clip: float = 1.0
    rec_weights: tuple[float, float, float, float] = (1.0, 5.0, 2.0, 1.0)
    snapshot_every: int = 250
    seed: int = DPT_SEEDS["train"]


@torch.no_grad()
def build_rec_cache(pipe, config: DPTConfig, seed: int, n_per_kind: int, path: str | Path, chunk: int = 64,
                    progress: bool = True) -> dict:
    """UNet features (at `config.t`, blocks `config.blocks`) and text states of `referring_dataset(seed,
    n_per_kind)`, one row per expression, saved to `path` (reused when present). Each chunk draws its noise from
    `seed * 1000 + chunk index`. Returns the cache dict (see the module docstring)."""
    path = Path(path)
    if path.exists():
        return torch.load(path, map_location="cpu", weights_only=False)
    exprs = referring.referring_dataset(seed, n_per_kind)
    feats: list[list[torch.Tensor]] = [[] for _ in config.blocks]
    toks, valid = [], []
    for i in tqdm(range(0, len(exprs), chunk), desc=f"rec features {path.stem}", disable=not progress,
                  mininterval=10):
        part = exprs[i: i + chunk]
        texts = [e.model_text for e in part]
        lat = encode_images(pipe, [referring.render_objects(e.objects) for e in part])
        fs = dpt_features(pipe, lat, texts, config.t, config.blocks, noise_seed=seed * 1000 + i // chunk)
        for acc, f in zip(feats, fs):
            acc.append(f.half().cpu())
        _, tk, vd = text_embeddings(pipe, texts)
        toks.append(tk[:, :CACHE_TOKENS].half().cpu())
        valid.append(vd[:, :CACHE_TOKENS].cpu())
    cache = {"feats": [torch.cat(f) for f in feats], "tokens": torch.cat(toks), "valid": torch.cat(valid),
             "positive": positive_tokens(exprs, CACHE_TOKENS, "cpu"),
             "boxes": torch.tensor([e.box_cxcywh() for e in exprs], dtype=torch.float32),
             "kinds": [e.kind for e in exprs], "t": config.t, "blocks": list(config.blocks), "seed": seed}
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_save(cache, path)
    return cache


def rec_adapter_from(trained: DPTAdapter, rec_head: str = "regression", vl_layers: int = 2, vl_pool: int = 2
                     ) -> DPTAdapter:
    """A copy of `trained` with the grounding head `rec_head`: every shared weight copied (the matching path
    exactly), the new head freshly initialised."""
    cfg = DPTConfig.from_dict({**trained.config.to_dict(), "rec_head": rec_head, "vl_layers": vl_layers,
                               "vl_pool": vl_pool})
    new = DPTAdapter(cfg).to(next(trained.parameters()).device)
    missing, unexpected = new.load_state_dict(trained.state_dict(), strict=False)
    if unexpected or any(not n.startswith(("reg_token", "vl.", "vl_pos", "text_in.", "text_type")) for n in missing):
        raise ValueError(f"adapter weights do not fit: missing {missing}, unexpected {unexpected}")
    return new


@torch.no_grad()
def _memory(adapter: DPTAdapter, cache: dict, batch: int = 256) -> torch.Tensor:
    """The frozen encoder's memory of every cached row, fp16 `[K, h*w, width]` (the regression head's input)."""
    dev = next(adapter.parameters()).device
    n = len(cache["kinds"])
    out = []
    for i in range(0, n, batch):
        feats = [f[i: i + batch].float().to(dev) for f in cache["feats"]]
        out.append(adapter.encode(feats, torch.full((feats[0].shape[0],), cache["t"], device=dev)).half().cpu())
    return torch.cat(out)


def _rows(cache: dict, idx: torch.Tensor, device, with_feats: bool = True) -> tuple:
    feats = [f[idx].float().to(device) for f in cache["feats"]] if with_feats else []
    return (feats, cache["tokens"][idx].float().to(device), cache["valid"][idx].to(device),
            cache["positive"][idx].to(device), cache["boxes"][idx].to(device))


@torch.no_grad()
def rec_metrics(adapter: DPTAdapter, cache: dict, batch: int = 128) -> dict:
    """IoU >= 0.5 accuracy of the most probable grounding box on cached rows, overall and per kind.
    Returns {"overall": {"k", "n"}, "by_kind": {kind: {"k", "n"}}, "mean_iou"}."""
    was = adapter.training
    adapter.eval()
    dev = next(adapter.parameters()).device
    n = len(cache["kinds"])
    ious: list[float] = []
    for i in range(0, n, batch):
        idx = torch.arange(i, min(n, i + batch))
        feats, tokens, valid, _, boxes = _rows(cache, idx, dev)
        pb, _ = adapter(feats, torch.full((len(idx),), cache["t"], device=dev), tokens, valid).best()
        ious += torch.diagonal(box_iou(box_cxcywh_to_xyxy(pb), box_cxcywh_to_xyxy(boxes))[0]).tolist()
    adapter.train(was)
    return {**rec_accuracy(cache["kinds"], ious), "mean_iou": float(np.mean(ious)) if ious else 0.0}


def _grounding_train_mode(adapter: DPTAdapter) -> None:
    if adapter.config.rec_head == "regression":  # the queries head's decoder is shared with matching: kept in eval
        adapter.vl.train()


def train_rec_head(pipe, cfg: RecTrainConfig, work_dir: str | Path, progress: bool = True,
                   stop_after_s: float | None = None) -> DPTAdapter:
    """Train (or resume) the grounding head of `cfg.init_adapter` on cached features; the pipeline's models and
    the adapter's matching path stay frozen (tested: matching scores unchanged).

    Files in `work_dir`: `train_s<seed>_n<n>.pt` / `val_s<seed>_n<n>.pt` (caches), `state.pt` (resumable),
    `log.jsonl` (losses, and the validation reading at each snapshot), `snap-<step>/` (a full adapter).
    """
    work = Path(work_dir).expanduser()
    work.mkdir(parents=True, exist_ok=True)
    dev = pipe.unet.device
    base = load_adapter(cfg.init_adapter, dev)
    torch.manual_seed(cfg.seed)
    adapter = rec_adapter_from(base, cfg.rec_head, cfg.vl_layers, cfg.vl_pool)
    with frozen(pipe):
        train = build_rec_cache(pipe, adapter.config, cfg.seed, cfg.n_train,
                                work / f"train_s{cfg.seed}_n{cfg.n_train}.pt", progress=progress)
        val_seed = DPT_SEEDS["validation"]
        val = build_rec_cache(pipe, adapter.config, val_seed, cfg.n_val, work / f"val_s{val_seed}_n{cfg.n_val}.pt",
                              progress=progress)
    adapter.requires_grad_(False)
    params = adapter.grounding_parameters()
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    step = 0
    state_path = work / "state.pt"
    if state_path.exists():
        st = torch.load(state_path, map_location="cpu", weights_only=False)
        adapter.load_state_dict(st["adapter"])
        opt.load_state_dict(st["opt"])
        step = int(st["step"])
    (work / "train_config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
    loss_fn = rec_regression_loss if cfg.rec_head == "regression" else rec_loss
    n = len(train["kinds"])
    t0 = time.time()
    adapter.eval()  # the frozen matching path without dropout (its output is the head's input) ...
    memory = _memory(adapter, train) if cfg.rec_head == "regression" else None  # frozen: computed once
    _grounding_train_mode(adapter)  # ... the trained head with it
    with tqdm(total=cfg.steps, initial=step, desc="dpt rec head", disable=not progress, mininterval=10) as bar, \
            open(work / "log.jsonl", "a") as log:
        while step < cfg.steps:
            g = torch.Generator().manual_seed(cfg.seed * 100_003 + step)
            idx = torch.randint(0, n, (cfg.batch,), generator=g)
            feats, tokens, valid, positive, boxes = _rows(train, idx, dev, with_feats=memory is None)
            for grp in opt.param_groups:
                grp["lr"] = cfg.lr * min(1.0, (step + 1) / max(cfg.warmup, 1))
            if memory is not None:
                head = adapter.regression_head(memory[idx].float().to(dev), tokens, valid)
                out = DPTOutput(match=tokens.new_zeros(cfg.batch, 0, 1), logit_scale=adapter.logit_scale.exp(),
                                hidden=tokens.new_zeros(cfg.batch, 0, 1), **head)
            else:
                out = adapter(feats, torch.full((cfg.batch,), train["t"], device=dev), tokens, valid)
            res = loss_fn(out, boxes, adapter.project_tokens(tokens), positive, valid, weights=cfg.rec_weights)
            opt.zero_grad(set_to_none=True)
            res["loss"].backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.clip)
            opt.step()
            step += 1
            row = {k: round(float(v.detach().float().mean()), 5) for k, v in res.items() if k != "idx"}
            row.update(step=step, s=round(time.time() - t0, 1))
            if step % cfg.snapshot_every == 0 or step == cfg.steps:
                m = rec_metrics(adapter, val)
                row["val_acc"] = round(m["overall"]["k"] / max(m["overall"]["n"], 1), 4)
                row["val_by_kind"] = {k: d["k"] / d["n"] for k, d in m["by_kind"].items()}
                adapter.config.trained_steps = step
                _grounding_train_mode(adapter)
                save_adapter(adapter, work / f"snap-{step:05d}",
                             extra={"rec_train": dataclasses.asdict(cfg), "validation": m})
                atomic_save({"adapter": adapter.state_dict(), "opt": opt.state_dict(), "step": step}, state_path)
            log.write(json.dumps(row) + "\n")
            log.flush()
            bar.update(1)
            bar.set_postfix(loss=f"{row['loss']:.3f}", iou=f"{row.get('iou', 0):.2f}")
            if stop_after_s is not None and time.time() - t0 > stop_after_s:
                atomic_save({"adapter": adapter.state_dict(), "opt": opt.state_dict(), "step": step}, state_path)
                break
    adapter.eval()
    adapter.config.trained_steps = step
    return adapter
