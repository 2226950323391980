"""D-DiT-style text denoiser: a small bidirectional transformer over `[image tokens ; text tokens]` with joint
attention, trained by absorbing-state (masked) discrete diffusion to write a caption or an answer for an image.

Pure torch + transformers (no pipeline, no `interp`): the image tokens come in as the UNet's block outputs
(`models.training.text_diffusion.unet_text_features` reads them through `models.unet_pass`, the one way into the
UNet), each block projected to the transformer's width with a learned 2-D position embedding; the text tokens are
word ids of `TextVocab` (the bundled tokenizer's ids for every shapes-world word, then the question words, then
`[MASK]`). The encoder is transformers' `BertModel` fed with `inputs_embeds` (token type 0 = image, 1 = text):
every token attends to every other one, as in D-DiT's MM-DiT blocks (one stream here, not two).

    vocab = TextVocab.from_tokenizer(pipe.tokenizer)
    model = TextDenoiser(TextDenoiserConfig(vocab_size=vocab.size, block_channels=(128, 128)))
    out = model({"mid_block": f_mid, "up_blocks.1": f_up}, ids)     # f_* [B, C, h, w]; ids [B, L]
    out.logits                                                     # [B, L, vocab]

DiffDis's extra discriminative timestep "1000" (`timestep=1000` in the config): the clean latent goes through the
UNet with the UNet's time embedding replaced by a learned vector (`ExtraTimestep`, initialised from the
sinusoidal embedding of t = 1000, just outside the training range 0-999), installed by `override_time_embedding`.

Dimension names: B batch rows, L text positions, N image tokens (all blocks), D width, V vocabulary.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
from pathlib import Path
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from diffusers.models.embeddings import get_2d_sincos_pos_embed
from transformers import BertConfig, BertModel

__all__ = ["CONFIG_FILE", "WEIGHTS_FILE", "VOCAB_FILE", "MASK", "PAD", "QUESTION_WORDS", "EXTRA_TIMESTEP", "IMG_POS",
           "WORD_MAPS",
           "TextVocab", "TextDenoiserConfig", "TextDenoiser", "DenoiserOutput", "ExtraTimestep",
           "override_time_embedding", "masked_diffusion_loss", "save_text_denoiser", "load_text_denoiser"]

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "text_denoiser.safetensors"
VOCAB_FILE = "vocab.json"
MASK = "[MASK]"
PAD = "<|endoftext|>"  # the bundled tokenizer's EOS = pad token: the end of a caption / answer and its padding
# words the question templates need beyond the captions' (the bundled tokenizer splits them into characters)
QUESTION_WORDS: tuple[str, ...] = ("how", "many", "what", "color", "shape", "is", "the", "object", "where", "?",
                                   "one")
IMG_POS = ("learned", "sincos")  # the image tokens' position code (TextDenoiserConfig.img_pos)
EXTRA_TIMESTEP = 1000  # DiffDis: discrimination's own timestep, outside the generation range 0-999
WORD_MAPS = "word_maps"  # the features' key of the word maps (TextDenoiserConfig.word_maps), beside the block names


class TextVocab:
    """Word-level vocabulary of the text denoiser.

    Ids 0..T-1 are the bundled tokenizer's (a shapes-world word `w` has the id of its token `w</w>`; the pad /
    EOS token is `PAD`), then one id per extra word (`QUESTION_WORDS` not already a token), then `[MASK]`.

    Example:
        >>> vocab = TextVocab.from_tokenizer(pipe.tokenizer)
        >>> vocab.encode("how many circles ?")      # [id, id, id, id]
        >>> vocab.decode(vocab.encode("a red circle"))  # ["a", "red", "circle"]
    """

    def __init__(self, words: dict[str, int], pad_id: int, base_size: int, extra: Sequence[str] = QUESTION_WORDS):
        self.word_to_id = dict(words)
        self.pad_id = int(pad_id)
        self.base_size = int(base_size)
        nxt = self.base_size
        self.extra = []
        for w in extra:
            if w not in self.word_to_id:
                self.word_to_id[w] = nxt
                self.extra.append(w)
                nxt += 1
        self.mask_id = nxt
        self.size = nxt + 1
        self.id_to_word = {i: w for w, i in self.word_to_id.items()}
        self.id_to_word[self.pad_id] = PAD
        self.id_to_word[self.mask_id] = MASK

    @classmethod
    def from_tokenizer(cls, tokenizer, extra: Sequence[str] = QUESTION_WORDS) -> "TextVocab":
        """Every whole-word token `w</w>` of a CLIP-format tokenizer is the word `w`."""
        vocab = tokenizer.get_vocab()
        words = {t[: -len("</w>")]: i for t, i in vocab.items() if t.endswith("</w>") and len(t) > len("</w>")}
        words = {w: i for w, i in words.items() if w.isalpha()}
        return cls(words, tokenizer.pad_token_id, len(tokenizer), extra)

    def to_dict(self) -> dict:
        words = sorted((i, w) for w, i in self.word_to_id.items() if w not in self.extra)  # by id: same file each run
        return {"words": {w: i for i, w in words}, "pad_id": self.pad_id,
                "base_size": self.base_size, "extra": list(self.extra)}

    @classmethod
    def from_dict(cls, d: dict) -> "TextVocab":
        return cls(d["words"], d["pad_id"], d["base_size"], d["extra"])

    def encode(self, text: str | Sequence[str]) -> list[int]:
        """Word ids of a whitespace-separated text; ValueError naming the first word outside the vocabulary."""
        words = text.lower().split() if isinstance(text, str) else list(text)
        unknown = [w for w in words if w not in self.word_to_id]
        if unknown:
            raise ValueError(f"word {unknown[0]!r} is outside the model's vocabulary (shapes-world words and "
                             f"{', '.join(QUESTION_WORDS)})")
        return [self.word_to_id[w] for w in words]

    def decode(self, ids: Sequence[int], stop_at_pad: bool = False) -> list[str]:
        """Words of ids (`PAD` and `MASK` as such); with `stop_at_pad`, up to the first pad."""
        out = []
        for i in ids:
            i = int(i)
            if stop_at_pad and i == self.pad_id:
                break
            out.append(self.id_to_word.get(i, f"<{i}>"))
        return out


@dataclasses.dataclass
class TextDenoiserConfig:
    """The denoiser's shape and the image reading it was trained on (saved as config.json beside the weights).

    Attributes:
        vocab_size: V (`TextVocab.size`).
        max_len: L, text positions (question + answer, or caption, padded with `PAD`).
        blocks / block_channels / block_sizes: UNet blocks read, their channels and their (h, w) at the model's
            native size; pool: average-pooling factor per block before projection (N = sum of pooled h*w).
        timestep: the discriminative timestep the UNet is read at: 0..999, or 1000 (`EXTRA_TIMESTEP`, DiffDis).
        image_prompt: the text the UNet's cross-attention sees while its features are read.
        hidden / layers / heads / dropout: the BERT encoder.
        img_pos: position code of the image tokens: "learned" (a learned embedding per token of each block) or
            "sincos" (the fixed 2-D sine-cosine code of MAE / DiT, `diffusers.models.embeddings.
            get_2d_sincos_pos_embed`, in one coordinate frame for all blocks, plus the learned one).
        feature_norm: LayerNorm over each block's channels before its projection. The UNet's block outputs are
            large (projected, ~30 per token against ~0.6-0.9 for the learned position code of a trained model), so
            without it the image tokens' positions are a few per cent of what the encoder sees.
        word_maps: prompts whose words' cross-attention maps (one traced UNet row per prompt, read with the
            blocks) are added to the image tokens of the last block: every word of every prompt is one map channel
            (`map_words`), each map averaged over layers and heads, resized to that block's token grid and divided by
            its spatial mean; projected by a linear layer onto those tokens (no new tokens). Empty: none.
        word_marks: with word maps, one more channel on the last block's tokens: the mean of the maps of the words
            present (unmasked) in the row's text — the question's words, or a caption's words committed so far —
            so the text marks the regions it names (a reading "under the question's phrase" without another UNet
            row); 0 where the text names none. `map_word_ids`: the vocabulary id of each map word (-1: none).
        trained_steps / mode: provenance ("frozen" or "dual").
    """

    vocab_size: int = 131
    max_len: int = 12
    blocks: tuple[str, ...] = ("mid_block", "up_blocks.1")
    block_channels: tuple[int, ...] = (128, 128)
    block_sizes: tuple[tuple[int, int], ...] = ((4, 4), (16, 16))
    pool: tuple[int, ...] = (1, 2)
    timestep: int = 0
    image_prompt: str = "a"
    hidden: int = 128
    layers: int = 4
    heads: int = 4
    dropout: float = 0.0
    trained_steps: int = 0
    mode: str = "frozen"
    img_pos: str = "learned"
    feature_norm: bool = False
    word_maps: tuple[str, ...] = ()
    word_marks: bool = False
    map_word_ids: tuple[int, ...] = ()
    mark_phrases: int = 1
    mark_positions: bool = False

    def __post_init__(self) -> None:
        self.word_maps = tuple(str(p) for p in self.word_maps)
        self.map_word_ids = tuple(int(i) for i in self.map_word_ids)
        if self.word_marks and (not self.word_maps or len(self.map_word_ids) != len(self.map_words)):
            raise ValueError("word_marks needs word_maps and one vocabulary id per map word (map_word_ids)")
        if int(self.mark_phrases) < 1:
            raise ValueError(f"mark_phrases must be >= 1, got {self.mark_phrases}")
        self.mark_phrases = int(self.mark_phrases)
        if self.mark_positions and (not self.word_marks or self.mark_phrases != 1):
            raise ValueError("mark_positions needs word_marks and replaces mark_phrases (leave it 1)")
        if any(not p.split() for p in self.word_maps):
            raise ValueError("word_maps prompts must be non-empty")
        self.blocks = tuple(self.blocks)
        self.block_channels = tuple(int(c) for c in self.block_channels)
        self.block_sizes = tuple(tuple(int(v) for v in s) for s in self.block_sizes)
        self.pool = tuple(int(p) for p in self.pool)
        if not (len(self.blocks) == len(self.block_channels) == len(self.block_sizes) == len(self.pool)):
            raise ValueError("blocks, block_channels, block_sizes and pool must have one entry per block")
        if not 0 <= int(self.timestep) <= EXTRA_TIMESTEP:
            raise ValueError(f"timestep must be in 0..{EXTRA_TIMESTEP}, got {self.timestep}")
        if self.img_pos not in IMG_POS:
            raise ValueError(f"img_pos must be one of {', '.join(IMG_POS)}, got {self.img_pos!r}")

    @property
    def map_words(self) -> list[str]:
        """The word-map channels, in order: every word of every `word_maps` prompt."""
        return [w for p in self.word_maps for w in p.split()]

    @property
    def n_marks(self) -> int:
        """Mark channels: one per text position (`mark_positions`), else one per phrase (`mark_phrases`)."""
        return self.max_len if self.mark_positions else self.mark_phrases

    @property
    def mask_id(self) -> int:
        """The `[MASK]` id: the last of the vocabulary (`TextVocab.mask_id`)."""
        return self.vocab_size - 1

    @property
    def token_grids(self) -> list[tuple[int, int]]:
        """Per block, its pooled (h, w) token grid."""
        return [(h // p, w // p) for (h, w), p in zip(self.block_sizes, self.pool)]

    @property
    def n_image_tokens(self) -> int:
        return sum(gh * gw for gh, gw in self.token_grids)


@dataclasses.dataclass
class DenoiserOutput:
    """What `TextDenoiser.forward` returns.

    Attributes:
        logits: per text position, the vocabulary logits (`[MASK]` included; callers exclude it)   [B, L, V]
        attentions: with `output_attentions`, per layer the joint attention probabilities
            (queries and keys over `[image ; text]`)                                        [layers][B, heads, N+L, N+L]
        n_image: N, the number of image tokens (the first N rows / columns of the attention)
        grid: per block, its pooled (h, w) in token order (image token i of block b is row-major in its grid)
    """

    logits: torch.Tensor
    attentions: tuple[torch.Tensor, ...] | None
    n_image: int
    grid: list[tuple[int, int]]


class TextDenoiser(nn.Module):
    """Bidirectional transformer over `[image tokens ; text tokens]` (BertModel with `inputs_embeds`)."""

    def __init__(self, config: TextDenoiserConfig):
        super().__init__()

        self.config = config
        D = config.hidden
        self.proj = nn.ModuleList(nn.Linear(c, D) for c in config.block_channels)
        self.feature_norm = nn.ModuleList(nn.LayerNorm(c) for c in config.block_channels) \
            if config.feature_norm else None
        self.grid = config.token_grids
        self.img_pos = nn.ParameterList(nn.Parameter(torch.randn(gh * gw, D) * 0.02) for gh, gw in self.grid)
        if config.img_pos == "sincos":  # fixed, so not saved: one frame, the finest grid's cells as units
            base = max(max(g) for g in self.grid)
            for i, (gh, gw) in enumerate(self.grid):
                code = get_2d_sincos_pos_embed(D, (gh, gw), base_size=base, output_type="pt").float()
                self.register_buffer(f"img_sincos_{i}", code, persistent=False)  # [gh*gw, D]
        self.map_proj = nn.Linear(len(config.map_words), D) if config.word_maps else None
        self.mark_proj = nn.Linear(config.n_marks, D) if config.word_marks else None
        self.register_buffer("map_word_ids", torch.tensor(config.map_word_ids, dtype=torch.long), persistent=False)
        self.tok = nn.Embedding(config.vocab_size, D)
        bert = BertConfig(vocab_size=8, hidden_size=D, num_hidden_layers=config.layers,
                          num_attention_heads=config.heads, intermediate_size=4 * D,
                          max_position_embeddings=config.n_image_tokens + config.max_len, type_vocab_size=2,
                          hidden_dropout_prob=config.dropout, attention_probs_dropout_prob=config.dropout)
        bert._attn_implementation = "eager"  # attention probabilities are read (output_attentions)
        self.encoder = BertModel(bert, add_pooling_layer=False)
        self.head = nn.Sequential(nn.Linear(D, D), nn.GELU(), nn.LayerNorm(D), nn.Linear(D, config.vocab_size))

    def image_tokens(self, feats: dict[str, torch.Tensor] | Sequence[torch.Tensor]) -> torch.Tensor:
        """Project each block's output `[B, C, h, w]` (pooled) to `[B, h*w, D]` and concatenate: `[B, N, D]`.

        With `config.word_maps`, `feats[WORD_MAPS]` (`[B, K, gh, gw]` on the last block's grid; in a list, the entry
        after the blocks) is projected and added to the last block's tokens."""
        keys = list(self.config.blocks) + ([WORD_MAPS] if self.map_proj is not None else [])
        if isinstance(feats, dict):
            missing = [b for b in keys if b not in feats]
            if missing:
                raise ValueError(f"missing UNet block features {missing}")
            feats = [feats[b] for b in keys]
        feats = list(feats)
        maps = feats.pop(len(self.config.blocks)) if self.map_proj is not None else None
        out = []
        for i, (f, proj, pos, (gh, gw)) in enumerate(zip(feats, self.proj, self.img_pos, self.grid)):
            f = f.float()
            if tuple(f.shape[-2:]) != (gh, gw):  # raw block output: pool to the grid (cached features are pooled)
                f = F.adaptive_avg_pool2d(f, (gh, gw))
            if self.config.img_pos == "sincos":
                pos = pos + getattr(self, f"img_sincos_{i}")
            f = f.flatten(2).transpose(1, 2)  # [B, gh*gw, C]
            if self.feature_norm is not None:
                f = self.feature_norm[i](f)
            out.append(proj(f) + pos)  # [B, gh*gw, D]
        if maps is not None:
            gh, gw = self.grid[-1]
            if tuple(maps.shape[1:]) != (len(self.config.map_words), gh, gw):
                raise ValueError(f"word maps must be [B, {len(self.config.map_words)}, {gh}, {gw}], "
                                 f"got {tuple(maps.shape)}")
            out[-1] = out[-1] + self.map_proj(maps.float().flatten(2).transpose(1, 2))  # [B, gh*gw, D]
        return torch.cat(out, 1)

    def word_mark(self, maps: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """The mark channels (`config.word_marks`): per row and phrase, the mean of the maps `[B, K, gh, gw]` of the
        map words whose ids occur in `ids` `[B, L]` (masked positions hold `[MASK]`, so only the unmasked words
        count); zeros for a phrase that names none. One phrase: every named word; P > 1: the runs of map words and
        masks in text order (`TextDenoiserConfig.mark_phrases`). With `mark_positions`, channel i is the map of the
        map word at text position i (zeros for a mask or another word, and past L), P = max_len: which words form a
        phrase is left to the transformer, no rule merges two phrases. Returns `[B, P, gh*gw]`."""
        is_map = ids[:, :, None] == self.map_word_ids[None, None, :]  # [B, L, K]
        P = self.config.mark_phrases
        if self.config.mark_positions:
            present = F.pad(is_map.float(), (0, 0, 0, self.config.max_len - ids.shape[1]))  # [B, max_len, K]
        elif P == 1:
            present = is_map.any(1).float()[:, None]  # [B, 1, K]
        else:
            member = is_map.any(-1) | (ids == self.config.mask_id)  # a map word or [MASK]   [B, L]
            start = member & ~F.pad(member[:, :-1], (1, 0), value=False)
            run = torch.cumsum(start.long(), 1) * member  # 1-based run of each position, 0 outside runs   [B, L]
            phrase = (run[:, :, None] == torch.arange(1, P + 1, device=ids.device)).float()  # [B, L, P]
            present = (torch.einsum("blp,blk->bpk", phrase, is_map.float()) > 0).float()  # [B, P, K]
        flat = maps.float().flatten(2)  # [B, K, gh*gw]
        return present @ flat / present.sum(-1, keepdim=True).clamp(min=1)

    def forward(self, feats, ids: torch.Tensor, output_attentions: bool = False,
                image_tokens: torch.Tensor | None = None, word_maps: torch.Tensor | None = None) -> DenoiserOutput:
        """Logits of every text position given the image features and the (partly masked) text.

        Args:
            feats: per block name, its UNet output `[B, C, h, w]` (or a list in `config.blocks` order); ignored when
                `image_tokens` (from `image_tokens(feats)`, `[B, N, D]`) is given (reused across sampling steps).
            ids: text ids `[B, L']`, L' <= max_len (`TextVocab.mask_id` where masked).
            word_maps: `[B, K, gh, gw]`, for `config.word_marks` when `image_tokens` is given (default
                `feats[WORD_MAPS]`): the mark depends on the text, so it is added here, at every call.
            output_attentions: also return the joint attention probabilities per layer.
        Returns:
            DenoiserOutput (logits `[B, L', V]`).
        """
        img = self.image_tokens(feats) if image_tokens is None else image_tokens
        B, N, _ = img.shape
        if ids.dim() != 2 or ids.shape[0] not in (1, B) or ids.shape[1] > self.config.max_len:
            raise ValueError(f"ids must be [B, L <= {self.config.max_len}], got {tuple(ids.shape)}")
        ids = ids.expand(B, -1) if ids.shape[0] != B else ids
        L = ids.shape[1]
        if self.mark_proj is not None:
            maps = word_maps if word_maps is not None else (feats.get(WORD_MAPS) if isinstance(feats, dict) else None)
            if maps is None:
                raise ValueError("this denoiser marks the text's words on the image: give the word maps")
            gh, gw = self.grid[-1]
            mark = self.mark_proj(self.word_mark(maps.expand(B, -1, -1, -1), ids).transpose(1, 2))  # [B, gh*gw, D]
            img = torch.cat([img[:, : N - gh * gw], img[:, N - gh * gw:] + mark], 1)
        x = torch.cat([img, self.tok(ids)], 1)  # [B, N+L, D]
        types = torch.cat([torch.zeros(B, N, dtype=torch.long), torch.ones(B, L, dtype=torch.long)], 1).to(x.device)
        out = self.encoder(inputs_embeds=x, token_type_ids=types, output_attentions=output_attentions)
        h = out.last_hidden_state[:, N:]
        return DenoiserOutput(self.head(h), out.attentions if output_attentions else None, N, list(self.grid))


def masked_diffusion_loss(logits: torch.Tensor, targets: torch.Tensor, masked: torch.Tensor, t: torch.Tensor,
                          weight: torch.Tensor | None = None) -> torch.Tensor:
    """Continuous-time absorbing-state diffusion loss (MDLM / D-DiT): per row, the cross-entropy on the masked
    positions weighted by 1/t, summed over positions and divided by the row's number of generated positions;
    mean over rows.

    Args:
        logits: `[B, L, V]`. targets: clean ids `[B, L]`. masked: bool `[B, L]`, which positions were masked.
        t: the masking rate of each row, `[B]` in (0, 1].
        weight: 1 on the positions the row generates (the suffix after a question), 0 elsewhere; default all 1.
    Returns:
        A scalar; 0 contribution from unmasked positions; finite for t near 0 (t is clamped at 1e-3).
    """
    weight = torch.ones_like(targets, dtype=torch.float) if weight is None else weight.float()
    ce = F.cross_entropy(logits.float().transpose(1, 2), targets, reduction="none")  # [B, L]
    per = (ce * masked.float() * weight).sum(1) / t.clamp(min=1e-3) / weight.sum(1).clamp(min=1)
    return per.mean()


class ExtraTimestep(nn.Module):
    """DiffDis's extra timestep: a learned replacement for the UNet's time embedding (`[D_t]`)."""

    def __init__(self, init: torch.Tensor):
        super().__init__()
        self.embedding = nn.Parameter(init.detach().clone().float().reshape(-1))

    @classmethod
    def from_unet(cls, unet, t: int = EXTRA_TIMESTEP) -> "ExtraTimestep":
        """Initialised from the UNet's own embedding of timestep `t` (its sinusoid extrapolates beyond 999)."""
        with torch.no_grad():
            tt = torch.tensor([t], device=unet.device)
            emb = unet.time_embedding(unet.time_proj(tt).to(unet.dtype))
        return cls(emb[0].cpu())


@contextlib.contextmanager
def override_time_embedding(unet: nn.Module, extra: ExtraTimestep) -> Iterator[None]:
    """Replace the output of `unet.time_embedding` by `extra.embedding` for every row while inside; the forward
    hook is removed on exit, also after an exception."""

    def hook(module, args, output):
        return extra.embedding.to(output.device, output.dtype).expand_as(output)

    handle = unet.time_embedding.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def save_text_denoiser(folder: str | Path, model: TextDenoiser, vocab: TextVocab,
                       extra: ExtraTimestep | None = None, info: dict | None = None) -> Path:
    """Write config.json (+ `info`), vocab.json and text_denoiser.safetensors (the extra timestep's embedding as
    `extra_timestep.embedding` when given) to `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = dataclasses.asdict(model.config) | {"info": info or {}}
    (folder / CONFIG_FILE).write_text(json.dumps(cfg, indent=2))
    (folder / VOCAB_FILE).write_text(json.dumps(vocab.to_dict(), indent=1))
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if extra is not None:
        state["extra_timestep.embedding"] = extra.embedding.detach().cpu().contiguous()
    tmp = folder / (WEIGHTS_FILE + ".tmp")
    save_file(state, tmp)
    tmp.replace(folder / WEIGHTS_FILE)
    return folder


def load_text_denoiser(folder: str | Path) -> tuple[TextDenoiser, TextVocab, ExtraTimestep | None, dict]:
    """Load what `save_text_denoiser` wrote: (model in eval mode, vocab, extra timestep or None, info).

    Raises:
        ValueError: the folder holds no text denoiser.
    """
    folder = Path(folder)
    if not (folder / CONFIG_FILE).exists() or not (folder / WEIGHTS_FILE).exists():
        raise ValueError(f"no text denoiser in {folder} (expected {CONFIG_FILE} and {WEIGHTS_FILE}); train one with "
                         "`python cli.py train-text-diffusion`")
    d = json.loads((folder / CONFIG_FILE).read_text())
    info = d.pop("info", {})
    cfg = TextDenoiserConfig(**d)
    vocab = TextVocab.from_dict(json.loads((folder / VOCAB_FILE).read_text()))
    model = TextDenoiser(cfg)
    state = load_file(folder / WEIGHTS_FILE)
    extra = None
    if "extra_timestep.embedding" in state:
        extra = ExtraTimestep(state.pop("extra_timestep.embedding"))
    model.load_state_dict(state)
    return model.eval(), vocab, extra, info
