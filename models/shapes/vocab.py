"""The bundled model's tokenizer: a CLIP-format BPE vocabulary learned on the shapes-world words.

The merges are learned with the `tokenizers` BPE trainer (CLIPTokenizer applies merges by global
rank, so hand-written per-word merge chains conflict); every word of the grammar is one token.

Example:
    >>> build_clip_tokenizer_files("out/tokenizer")
    >>> tok = CLIPTokenizer.from_pretrained("out/tokenizer")
    >>> tok.tokenize("a red circle")   # ['a</w>', 'red</w>', 'circle</w>']
"""
from __future__ import annotations

import json
import string
from pathlib import Path

from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from models.shapes.world import WORDS

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MODEL_MAX_LENGTH = 16  # longest caption is 9 words + BOS + EOS


def build_clip_tokenizer_files(folder: str | Path, words: tuple[str, ...] = WORDS,
                               model_max_length: int = MODEL_MAX_LENGTH) -> Path:
    """Write vocab.json, merges.txt, special_tokens_map.json and tokenizer_config.json for CLIPTokenizer."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    alphabet = list(string.ascii_lowercase)
    trainer = trainers.BpeTrainer(
        vocab_size=10_000, min_frequency=1, special_tokens=[], initial_alphabet=alphabet,
        end_of_word_suffix="</w>", show_progress=False,
    )
    tok.train_from_iterator([" ".join(words)] * 4, trainer=trainer)
    model = json.loads(tok.to_str())["model"]
    merges = [" ".join(m) if isinstance(m, list) else m for m in model["merges"]]
    # The trainer breaks ties between equally frequent pairs in a different order from run to run, so
    # ranks and ids would differ between builds; a canonical order (shorter merged tokens first, then
    # alphabetical) makes the files identical on every build. Every word stays one token (tested).
    merges.sort(key=lambda m: (len(m.replace(" ", "")), m))
    # CLIP's vocabulary: every character with and without the end-of-word suffix, then the merges.
    vocab_list: list[str] = []
    for c in alphabet:
        vocab_list.append(c)
    for c in alphabet:
        vocab_list.append(c + "</w>")
    for m in merges:
        merged = m.replace(" ", "")
        if merged not in vocab_list:
            vocab_list.append(merged)
    vocab_list += [BOS, EOS]
    vocab = {t: i for i, t in enumerate(vocab_list)}
    (folder / "vocab.json").write_text(json.dumps(vocab, indent=0))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    (folder / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": BOS, "eos_token": EOS, "pad_token": EOS, "unk_token": EOS}, indent=2))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": model_max_length,
        "bos_token": BOS, "eos_token": EOS, "pad_token": EOS, "unk_token": EOS,
        "do_lower_case": True, "errors": "replace", "clean_up_tokenization_spaces": True,
    }, indent=2))
    return folder
