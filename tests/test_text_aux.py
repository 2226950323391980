"""The text encoder's scene-parsing auxiliary loss: labels, loss, and its switch-on during training."""
from __future__ import annotations

import csv

import pytest
import torch
from transformers import CLIPTokenizer

from conftest import tiny_train_config
from models.shapes import world
from models.training.bundled import train_bundled
from models.training.text_aux import GROUPS, IGNORE, TextAuxHead, aux_accuracy, caption_labels, text_aux_loss
from models.shapes.vocab import build_clip_tokenizer_files


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return CLIPTokenizer.from_pretrained(build_clip_tokenizer_files(tmp_path_factory.mktemp("tok")))


REL = list(GROUPS).index("relation")


class TestLabels:
    def test_relation_caption(self, tok):
        """The relation label starts at the relation word and covers EOS and padding; roles at EOS."""
        [lab] = caption_labels(["a red circle below a blue square"], tok)
        below = 1 + world.RELATIONS.index("below")
        assert (lab[:4, REL] == IGNORE).all() and (lab[4:, REL] == below).all()
        eos = 8  # BOS + 7 words
        colors = list(world.COLORS)
        assert lab[eos, 1:].tolist() == [colors.index("red"), world.SHAPES.index("circle"),
                                         1 + colors.index("blue"), 1 + world.SHAPES.index("square"), 0]
        assert (lab[:eos, 1:] == IGNORE).all() and (lab[eos + 1:, 1:] == IGNORE).all()

    def test_single_and_count(self, tok):
        """A single object is decided at EOS (its prefix is a relation caption's); a count at the number."""
        single, count = caption_labels(["a big green triangle", "three orange squares"], tok)
        assert (single[:5, REL] == IGNORE).all() and (single[5:, REL] == 0).all()
        assert (count[1:, REL] == 0).all() and count[4, -1] == 2  # three objects -> class 2
        assert count[4, list(GROUPS).index("object_color")] == 0  # no second object

    def test_opposite_relations_differ(self, tok):
        a, b = caption_labels(["a red circle left of a blue square", "a red circle right of a blue square"], tok)
        assert (a[4:, REL] != b[4:, REL]).all() and (a[:, 1:] == b[:, 1:]).all()

    def test_caption_outside_grammar_refused(self, tok):
        with pytest.raises(world.CaptionError):
            caption_labels(["a red dog"], tok)


class TestLoss:
    def test_probes_can_learn_the_labels(self, tok):
        """Fitting the probes on separable states drives the loss down and accuracy to 1."""
        caps = ["a red circle left of a blue square", "a red circle right of a blue square",
                "two red circles", "a small red circle"]
        labels = torch.from_numpy(caption_labels(caps, tok))
        torch.manual_seed(0)
        states = torch.randn(len(caps), labels.shape[1], 64)  # more dims than labelled positions: separable
        head = TextAuxHead(64)
        opt = torch.optim.Adam(head.parameters(), lr=0.05)
        first = float(text_aux_loss(head, states, labels).detach())
        for _ in range(200):
            opt.zero_grad()
            text_aux_loss(head, states, labels).backward()
            opt.step()
        assert float(text_aux_loss(head, states, labels).detach()) < 0.05 * first
        assert all(v == 1.0 for v in aux_accuracy(head, states, labels).values())

    def test_all_ignored_is_zero_with_a_graph(self):
        states = torch.randn(2, 16, 8, requires_grad=True)
        labels = torch.full((2, 16, len(GROUPS)), IGNORE)
        loss = text_aux_loss(TextAuxHead(8), states, labels)
        loss.backward()
        assert float(loss.detach()) == 0.0 and states.grad is not None


@pytest.mark.slow
def test_switching_the_loss_on_resumes_and_logs_it(tmp_path):
    """A run resumed with the auxiliary loss on keeps its step count and logs a finite aux loss."""
    cfg = tiny_train_config(tmp_path, vae_steps=2, unet_steps=2, text_aux_weight=0.0)
    train_bundled(cfg)
    cfg.unet_steps, cfg.text_aux_weight = 4, 0.5
    train_bundled(cfg)
    rows = list(csv.DictReader(open(tmp_path / "work" / "loss_log.csv")))
    aux = [(int(r["step"]), float(r["value"])) for r in rows if r["key"] == "text_aux_loss"]
    assert [s for s, _ in aux] == [3, 4] and all(0 < v < 20 for _, v in aux)
    ck = torch.load(tmp_path / "work" / "unet_ckpt.pt", weights_only=False)
    assert "aux_head" in ck and ck["step"] == 4
