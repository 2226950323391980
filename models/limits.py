"""Input limits and checks shared by every face (app, CLI, tasks): one source for what a user may ask for.

Each check returns the cleaned value or raises ValueError with a one-line message meant for the user; the
app shows it as `gr.Error`, the CLI prints it on stderr and exits 2, so both say the same thing. Numbers may
come as numbers (the app's widgets) or as text (the CLI's flags): "1e20", "nan" and "" get the same message
as 1e20, float("nan") and None.

    >>> check_steps("25"), check_guidance(7.5), check_seed(1e20)      # 25, 7.5, ValueError
    >>> check_timesteps([200, 1000], num_train_timesteps=1000)          # ValueError: timestep ... 0..999 ...
    >>> check_vocabulary(pipe.tokenizer, ["a red zebra"])               # ValueError listing the words it knows
"""
from __future__ import annotations

import math
import numbers
import os
from typing import Iterable, Sequence

from PIL import Image, UnidentifiedImageError

from models.shapes import world

__all__ = ["MAX_STEPS", "MIN_GUIDANCE", "MAX_GUIDANCE", "MAX_SEED", "MIN_RANK_CANDIDATES", "MAX_CANDIDATES",
           "MAX_PROMPT_CHARS", "MAX_IMAGE_SIDE", "MAX_UPLOAD_BYTES", "MAX_ETA", "MAX_SCENES", "MAX_PER_KIND", "MAX_ATLAS_SCENES",
           "CLOSED_VOCABULARY_MAX", "check_int", "check_float", "check_steps", "check_guidance", "check_seed",
           "check_eta", "check_timestep", "check_timesteps", "parse_numbers", "check_choice", "check_prompt",
           "check_fits", "validate_captions", "out_of_vocabulary", "known_words", "check_vocabulary", "read_image",
           "check_image", "user_message", "check_step_range", "MAX_BEST_OF", "check_best_of"]

# --- limits (the app's widgets and the CLI's help read these) -------------------------------------
MAX_STEPS = 100  # denoising steps of one generation
MIN_GUIDANCE, MAX_GUIDANCE = 0.0, 30.0  # classifier-free guidance scale
MAX_SEED = 2**32 - 1  # seeds of torch / numpy generators
MIN_RANK_CANDIDATES = 2  # ranking needs something to compare
MAX_CANDIDATES = 32  # captions scored against one image (one batch row each)
MAX_PROMPT_CHARS = 1000  # before tokenizing; the model's own token limit is checked by `check_fits`
MAX_IMAGE_SIDE = 4096  # pixels
MAX_UPLOAD_BYTES = 20 * 2**20  # an image file
MAX_ETA = 1.0  # DDIM eta in 0..1
DEFAULT_CORRECTION_ETA = 0.5  # DPT self-correction step size (the paper's); docs/dpt.md: ~100 works on shapes-v1
MAX_CORRECTION_ETA = 1000.0
MAX_BEST_OF = 8  # samples of one best-of-N draw (N plain generations + N adapter readings)
MAX_SCENES = 1000  # held-out scenes / prompts per evaluation run
MAX_PER_KIND = 1000
MAX_ATLAS_SCENES = 60  # held-out scenes of one head atlas in the app (one traced UNet call each)
CLOSED_VOCABULARY_MAX = 5000  # tokenizers this small (the shapes world's) refuse words they only spell


# --- numbers ---------------------------------------------------------------------------------------
def _parse(value) -> float | int | None:
    """A number from a widget value or a flag's text, or None when there is none (NaN passes through)."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    text = str(value).strip()
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        return None


def _show(value, parsed) -> str:
    if parsed is None:
        return "nothing" if value is None or not str(value).strip() else repr(str(value).strip())
    if isinstance(parsed, float) and math.isfinite(parsed) and parsed == int(parsed):
        return str(int(parsed))
    return f"{parsed:g}" if isinstance(parsed, float) else str(parsed)


def _range(lo, hi) -> str:
    if hi is None:
        return f">= {lo:g}" if isinstance(lo, float) else f">= {lo}"
    fmt = (lambda v: f"{v:g}") if isinstance(lo, float) or isinstance(hi, float) else str
    return f"in {fmt(lo)}..{fmt(hi)}"


def check_int(value, what: str, lo: int = 0, hi: int | None = None) -> int:
    """A whole number in lo..hi (inclusive; hi None = no upper limit), or ValueError naming `what`."""
    v = _parse(value)
    ok = v is not None and math.isfinite(v) and v == int(v) and lo <= v and (hi is None or v <= hi)
    if not ok:
        raise ValueError(f"{what} must be a whole number {_range(lo, hi)}, got {_show(value, v)}")
    return int(v)


def check_float(value, what: str, lo: float, hi: float | None = None) -> float:
    """A finite number in lo..hi (inclusive), or ValueError naming `what`."""
    v = _parse(value)
    ok = v is not None and math.isfinite(v) and lo <= v and (hi is None or v <= hi)
    if not ok:
        raise ValueError(f"{what} must be a number {_range(float(lo), hi if hi is None else float(hi))}, "
                         f"got {_show(value, v)}")
    return float(v)


def check_steps(value) -> int:
    """Denoising steps in 1..MAX_STEPS."""
    return check_int(value, "steps", 1, MAX_STEPS)


def check_guidance(value) -> float | None:
    """Guidance in MIN_GUIDANCE..MAX_GUIDANCE; None = the model's default."""
    return None if value is None else check_float(value, "guidance", MIN_GUIDANCE, MAX_GUIDANCE)


def check_seed(value, what: str = "seed") -> int:
    """A seed in 0..MAX_SEED."""
    return check_int(value, what, 0, MAX_SEED)


def check_eta(value) -> float:
    """DDIM eta in 0..MAX_ETA."""
    return check_float(value, "eta", 0.0, MAX_ETA)


def check_correction_eta(value) -> float:
    """The self-correction step size eta in 0..MAX_CORRECTION_ETA (0: the plain sampler)."""
    return check_float(value, "eta", 0.0, MAX_CORRECTION_ETA)


def check_best_of(value) -> int:
    """N of a best-of-N draw, 2..MAX_BEST_OF."""
    return check_int(value, "best of N", 2, MAX_BEST_OF)


def check_step_range(value, steps: int) -> tuple[int, int]:
    """Which sampling steps to correct, as "START:STOP" (0-based, STOP excluded; either end may be left out:
    "0:8", ":8", "5:"), a (start, stop) pair (None: an open end) or empty / None (every step), checked against the
    `steps` of the run: 0 <= START < STOP <= steps. Returns (start, stop)."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return 0, int(steps)
    if isinstance(value, str):
        parts = value.strip().split(":")
        if len(parts) != 2:
            raise ValueError(f"the corrected steps must be START:STOP (e.g. 0:8), got {value!r}")
        lo, hi = (p.strip() or None for p in parts)
    else:
        lo, hi = value
    start = 0 if lo is None else check_int(lo, "the first corrected step", 0, int(steps) - 1)
    stop = int(steps) if hi is None else check_int(hi, "the corrected steps' STOP", 1, int(steps))
    if start >= stop:
        raise ValueError(f"the corrected steps {start}:{stop} are empty (START must be below STOP)")
    return start, stop


def check_timestep(value, num_train_timesteps: int) -> int:
    """A training timestep of the model's scheduler: 0..num_train_timesteps - 1."""
    return check_int(value, "timestep", 0, int(num_train_timesteps) - 1)


def check_timesteps(values: Iterable | None, num_train_timesteps: int) -> tuple[int, ...]:
    """At least one training timestep, each in 0..num_train_timesteps - 1."""
    ts = tuple(check_timestep(v, num_train_timesteps) for v in (values or ()))
    if not ts:
        raise ValueError("give at least one timestep, e.g. 200 400 600 800")
    return ts


def parse_numbers(text: str | None) -> list[str]:
    """The items of a text field of numbers ("200 400, 600" -> ["200", "400", "600"]), unchecked."""
    return (text or "").replace(",", " ").split()


def check_choice(value, choices: Sequence[str], what: str) -> str:
    """One of `choices`, or ValueError listing them."""
    if value not in choices:
        raise ValueError(f"unknown {what} {value!r}; choose one of {', '.join(choices)}")
    return value


# --- text ------------------------------------------------------------------------------------------
def check_prompt(prompt: str | None, what: str = "the prompt") -> str:
    """A prompt with whitespace collapsed; ValueError when empty or longer than MAX_PROMPT_CHARS characters."""
    if prompt is None or not str(prompt).strip():
        raise ValueError(f"{what} is empty")
    p = " ".join(str(prompt).split())
    if len(p) > MAX_PROMPT_CHARS:
        raise ValueError(f"{what} is too long ({len(p)} characters > {MAX_PROMPT_CHARS})")
    return p


def check_fits(tokenizer, text: str, what: str = "the prompt") -> str:
    """`text` if it fits the model's text encoder (BOS + tokens + EOS <= model_max_length)."""
    n = len(tokenizer(text).input_ids)
    if n > tokenizer.model_max_length:
        raise ValueError(f"{what} is too long for this model ({n} tokens > {tokenizer.model_max_length})")
    return text


def validate_captions(captions: Sequence[str] | None, min_count: int = MIN_RANK_CANDIDATES,
                      max_count: int = MAX_CANDIDATES) -> list[str]:
    """Captions with whitespace collapsed, or ValueError ("no captions given", "caption 2 is empty", ...)."""
    if not captions:
        raise ValueError("no captions given")
    out = [check_prompt(c, f"caption {i + 1}") for i, c in enumerate(captions)]
    if len(out) < min_count:
        raise ValueError(f"ranking needs at least {min_count} captions, got {len(out)}")
    if len(out) > max_count:
        raise ValueError(f"at most {max_count} captions per image, got {len(out)}")
    return out


def out_of_vocabulary(tokenizer, prompt: str) -> list[str]:
    """Words of `prompt` the tokenizer only spells letter by letter (unknown to its vocabulary)."""
    bad = []
    for w in prompt.split():
        toks = tokenizer.tokenize(w)
        if len(toks) > 1 and all(len(t.replace("</w>", "")) <= 1 for t in toks):
            bad.append(w)
    return bad


def known_words(tokenizer) -> list[str]:
    """The shapes world's words (`world.WORDS`) this tokenizer knows as words."""
    return [w for w in world.WORDS if not out_of_vocabulary(tokenizer, w)]


def check_vocabulary(tokenizer, texts: Iterable[str]) -> None:
    """ValueError listing the words of `texts` a closed-vocabulary model (the shapes world's tokenizer) does not
    know, and the words it knows. Open-vocabulary tokenizers (CLIP's BPE) spell any word: nothing is refused."""
    if len(tokenizer) > CLOSED_VOCABULARY_MAX:
        return
    bad = list(dict.fromkeys(w for t in texts for w in out_of_vocabulary(tokenizer, t)))
    if bad:
        known = known_words(tokenizer)
        raise ValueError(f"words outside the model's vocabulary: {', '.join(bad)}"
                         + (f"; it knows: {', '.join(known)}" if known else ""))


# --- images ----------------------------------------------------------------------------------------
def check_image(image: Image.Image) -> Image.Image:
    """An RGB copy of a PIL image no larger than MAX_IMAGE_SIDE on either side."""
    if max(image.size) > MAX_IMAGE_SIDE or min(image.size) < 1:
        raise ValueError(f"the image is {image.width}x{image.height}; each side must lie in 1..{MAX_IMAGE_SIDE}")
    return image.convert("RGB")


def read_image(source) -> Image.Image:
    """An RGB image from a PIL image or a file path (MAX_UPLOAD_BYTES at most), or ValueError."""
    if source is None:
        raise ValueError("no image given: upload or generate one first")
    if isinstance(source, Image.Image):
        return check_image(source)
    path = os.fspath(source if isinstance(source, (str, os.PathLike)) else getattr(source, "name", source))
    if not os.path.isfile(path):
        raise ValueError(f"image not found: {path}")
    size = os.path.getsize(path)
    if size > MAX_UPLOAD_BYTES:
        raise ValueError(f"image file too large: {size / 2**20:.1f} MB > {MAX_UPLOAD_BYTES // 2**20} MB")
    try:
        with Image.open(path) as im:
            return check_image(im)  # the size is in the header: checked before decoding
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as e:
        raise ValueError(f"cannot read image {path}: {type(e).__name__}") from None


def user_message(error: BaseException) -> str:
    """The one line a face shows for an error: its message's first line (the class name when it has none)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
