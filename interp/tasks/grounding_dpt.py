"""Referring-expression grounding with the DPT adapter: the box of the object an expression names.

    >>> ground(pipe, image, "the square left of the blue circle")   # {"box": [x0, y0, x1, y1], "score": 0.93, ...}
"""
from __future__ import annotations

from pathlib import Path

from models.limits import CLOSED_VOCABULARY_MAX, check_prompt, check_vocabulary
from models.shapes.referring import check_expression, model_text
from models.training.dpt import find_adapter, ground_boxes
from models.unet_pass import encode_image

__all__ = ["ground"]


def ground(pipe, image, expression: str, adapter_dir: str | Path | None = None, t: int | None = None,
           noise_seed: int = 0) -> dict:
    """Ground a referring expression in an image with the model's DPT adapter (one UNet call).

    Args:
        pipe: the pipeline (its model needs a shipped adapter, or give `adapter_dir`).
        image: a PIL image (any size: resized to the model's native size to read, box scaled back).
        expression: e.g. "the red circle", "the square left of the blue circle", "the biggest circle".
        t: the timestep (default: the adapter's).
    Returns:
        {"box": [x0, y0, x1, y1] in pixels of `image`, "score": the chosen query's probability,
         "expression": the cleaned expression, "model_text": what the text encoder read, "unet_calls": 1}.
    Raises:
        ValueError: an empty expression or words the model does not know (the message lists the known ones);
            no adapter for the model.
    """
    expression = check_prompt(expression, "expression")
    closed = len(pipe.tokenizer) <= CLOSED_VOCABULARY_MAX
    if closed:
        expression = check_expression(expression)
        text = model_text(expression)
        check_vocabulary(pipe.tokenizer, [text])
    else:
        text = expression
    adapter = find_adapter(pipe, adapter_dir)
    boxes, p = ground_boxes(pipe, adapter, encode_image(pipe, image), [text], t, noise_seed=noise_seed)
    W, H = image.size
    x0, y0, x1, y1 = boxes[0].tolist()
    return {"box": [x0 * W, y0 * H, x1 * W, y1 * H], "score": float(p[0]), "expression": expression,
            "model_text": text, "unet_calls": 1}
