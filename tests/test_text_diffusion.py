"""Image -> text by masked text diffusion: the loss, the sampler, judging, training and the entry points (tiny
components, CPU)."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from interp.figures_text import candidates_plotly, timeline_plotly, token_attention_map
from interp.tasks import text_diffusion as td
from models.adapters.text_denoiser import (MASK, WORD_MAPS, ExtraTimestep, TextDenoiser, TextDenoiserConfig, TextVocab,
                                           load_text_denoiser, masked_diffusion_loss, override_time_embedding,
                                           save_text_denoiser)
from models.shapes import world
from models.training import text_diffusion as tr


@pytest.fixture(scope="module")
def vocab(tiny_pipe):
    return TextVocab.from_tokenizer(tiny_pipe.tokenizer)


@pytest.fixture(scope="module")
def model(vocab):
    torch.manual_seed(0)
    cfg = TextDenoiserConfig(vocab_size=vocab.size, max_len=12, block_channels=(32, 32), hidden=32, layers=1, heads=2)
    return TextDenoiser(cfg).eval()


@pytest.fixture(scope="module")
def feats():
    g = torch.Generator().manual_seed(0)
    return {"mid_block": torch.randn(1, 32, 4, 4, generator=g), "up_blocks.1": torch.randn(1, 32, 16, 16, generator=g)}


@pytest.fixture(scope="module")
def trained(tiny_pipe, tmp_path_factory):
    """A tiny adapter trained a few steps on the tiny pipeline (frozen mode, cached features)."""
    d = tmp_path_factory.mktemp("td")
    cfg = tr.TextDiffusionConfig(out_dir=str(d / "out"), work_dir=str(d / "work"), n_scenes=48, n_val=8, steps=4,
                                 batch=16, hidden=32, layers=1, heads=2, val_every=2, checkpoint_every=2,
                                 export_every=2, feature_batch=16)
    tr.train_text_diffusion(cfg, tiny_pipe)
    return cfg


class TestVocab:
    def test_every_world_word_and_question_word_is_one_id(self, vocab):
        """Each caption word and question word maps to one id and back."""
        words = list(world.WORDS) + ["how", "many", "what", "where", "?", "one", "object"]
        assert vocab.decode(vocab.encode(words)) == words

    def test_unknown_word_raises(self, vocab):
        """A word outside the vocabulary is a ValueError naming it."""
        with pytest.raises(ValueError, match="'banana'"):
            vocab.encode("how many banana ?")

    def test_caption_ids_are_the_tokenizer_ids(self, vocab, tiny_pipe):
        """Caption words keep the bundled tokenizer's ids."""
        ids = tiny_pipe.tokenizer("a red circle").input_ids[1:-1]
        assert vocab.encode("a red circle") == ids


class TestLoss:
    def test_unmasked_positions_do_not_count(self):
        """Changing the logits of unmasked positions leaves the loss unchanged; no mask gives 0."""
        g = torch.Generator().manual_seed(0)
        logits = torch.randn(2, 5, 7, generator=g)
        targets = torch.randint(0, 7, (2, 5), generator=g)
        masked = torch.tensor([[1, 0, 1, 0, 0], [0, 0, 0, 1, 1]], dtype=torch.bool)
        t = torch.tensor([0.5, 0.3])
        base = masked_diffusion_loss(logits, targets, masked, t)
        other = logits.clone()
        other[~masked] = torch.randn(int((~masked).sum()), 7, generator=g) * 10
        assert torch.allclose(base, masked_diffusion_loss(other, targets, masked, t))
        assert float(masked_diffusion_loss(logits, targets, torch.zeros_like(masked), t)) == 0.0

    def test_finite_near_zero(self):
        """t close to 0 keeps the loss finite."""
        logits = torch.randn(1, 4, 6)
        loss = masked_diffusion_loss(logits, torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 4, dtype=torch.bool),
                                     torch.tensor([1e-9]))
        assert torch.isfinite(loss)

    def test_weight_leaves_out_the_prefix(self):
        """Positions with weight 0 (a question) do not count even when masked."""
        logits = torch.randn(1, 4, 6)
        tgt = torch.zeros(1, 4, dtype=torch.long)
        m = torch.ones(1, 4, dtype=torch.bool)
        w = torch.tensor([[0, 0, 1, 1]])
        other = logits.clone()
        other[0, :2] += 5
        t = torch.tensor([0.5])
        assert torch.allclose(masked_diffusion_loss(logits, tgt, m, t, w), masked_diffusion_loss(other, tgt, m, t, w))


class TestSampler:
    def test_deterministic_with_a_seed(self, model, vocab, feats):
        """Same seed, same steps: the same sample (random order, temperature 1)."""
        a = td.sample_text(model, vocab, feats, (), 10, 5, "random", seed=3, temperature=1.0)
        b = td.sample_text(model, vocab, feats, (), 10, 5, "random", seed=3, temperature=1.0)
        assert a.steps_tokens() == b.steps_tokens()

    def test_prefix_is_kept(self, model, vocab, feats):
        """The question prefix is never changed at any step."""
        q = vocab.encode("how many circles ?")
        s = td.sample_text(model, vocab, feats, q, 8, 3, "confidence", seed=0, temperature=1.0)
        assert all(st.ids[: len(q)] == q for st in s.steps)

    @pytest.mark.parametrize("order,steps", [("confidence", 4), ("random", 4), ("confidence", 15), ("random", 1),
                                             ("left-to-right", 4)])
    def test_masks_fall_monotonically_to_zero(self, model, vocab, feats, order, steps):
        """The number of [MASK]s never rises and is 0 after the last step; committed tokens never change."""
        s = td.sample_text(model, vocab, feats, (), 12, steps, order, seed=1)
        counts = [st.tokens.count(MASK) for st in s.steps]
        assert counts == sorted(counts, reverse=True) and counts[-1] == 0 and len(counts) == steps
        for k in range(1, steps):
            prev, cur = s.steps[k - 1].tokens, s.steps[k].tokens
            assert all(p == c for p, c in zip(prev, cur) if p != MASK)

    def test_bad_options_raise(self, model, vocab, feats):
        """A length leaving no generated position, 0 steps or an unknown order are ValueErrors."""
        with pytest.raises(ValueError):
            td.sample_text(model, vocab, feats, vocab.encode("how many circles ?"), 4, 2)
        with pytest.raises(ValueError):
            td.sample_text(model, vocab, feats, (), 8, 0)
        with pytest.raises(ValueError, match="left-to-right"):
            td.sample_text(model, vocab, feats, (), 8, 2, order="right-to-left")

    def test_left_to_right_commits_the_leftmost_masks(self, model, vocab, feats):
        """order="left-to-right": each step commits the leftmost masked positions after the prefix, in text order
        (3 steps over 7 generated positions: 3, 2, 2 of them, masks floor(7 (1 - k/3))), whatever the confidences."""
        q = vocab.encode("how many circles ?")
        s = td.sample_text(model, vocab, feats, q, 11, 3, "left-to-right", seed=0)
        assert [st.unmasked for st in s.steps] == [[4, 5, 6], [7, 8], [9, 10]]
        assert s.committed_at[4:] == [0, 0, 0, 1, 1, 2, 2]

    def test_attention_recorded_and_figures(self, model, vocab, feats):
        """With record_attention each step holds [L][N] attention; the figures build."""
        s = td.sample_text(model, vocab, feats, (), 6, 3, record_attention=True)
        assert len(s.steps[0].attention) == 6 and len(s.steps[0].attention[0]) == model.config.n_image_tokens
        assert token_attention_map(s, 1, 2).shape == (64, 64)
        assert len(timeline_plotly(s).data) == 1
        assert candidates_plotly(s, 0).data


class TestJudging:
    def _rel(self):
        return next(s for s in world.sample_dataset(5, 50) if s.kind == "relation")

    def test_relation_either_role_order(self):
        """'a A left of a B' and 'a B right of a A' are both right."""
        s = self._rel()
        a, b = s.objects
        assert td.judge_caption(s.caption, s)["ok"]
        swapped = world.caption_of("relation", [b, a], world.OPPOSITE[s.relation])
        assert td.judge_caption(swapped, s)["ok"]
        assert not td.judge_caption(world.caption_of("relation", [a, b], world.OPPOSITE[s.relation]), s)["ok"]

    def test_count_and_unparsable(self):
        """A wrong number is wrong; text outside the grammar is not parsed."""
        s = next(s for s in world.sample_dataset(5, 50) if s.kind == "count")
        n = len(s.objects)
        wrong = s.caption.replace({2: "two", 3: "three"}[n], {2: "three", 3: "two"}[n])
        assert td.judge_caption(s.caption, s)["ok"] and not td.judge_caption(wrong, s)["count_ok"]
        j = td.judge_caption("red red circle", s)
        assert not j["ok"] and not j["parsed"]

    def test_questions_and_caption_answers(self):
        """Scene questions have the scene's answers; a caption implies the same answers."""
        s = self._rel()
        for task, q, a in tr.scene_questions(s):
            assert td.answer_from_caption(s.caption, q) == a, (task, q)
        assert td.answer_from_caption("not a caption", "how many circles ?") is None

    def test_check_question(self, vocab):
        """Empty, too long or out-of-vocabulary questions are one-line ValueErrors; '?' is added."""
        assert td.check_question("how many circles", vocab, 12) == vocab.encode("how many circles ?")
        for bad in ("", "   ", "how many circles " * 4, "how many dogs ?"):
            with pytest.raises(ValueError):
                td.check_question(bad, vocab, 12)


class TestTraining:
    def test_few_steps_lower_the_loss(self, vocab):
        """Thirty steps on one fixed batch lower its loss."""
        torch.manual_seed(0)
        cfg = TextDenoiserConfig(vocab_size=vocab.size, block_channels=(8, 8), block_sizes=((4, 4), (8, 8)),
                                 pool=(1, 1), hidden=32, layers=1, heads=2)
        m = TextDenoiser(cfg)
        g = torch.Generator().manual_seed(0)
        f = {"mid_block": torch.randn(8, 8, 4, 4, generator=g), "up_blocks.1": torch.randn(8, 8, 8, 8, generator=g)}
        scenes = world.sample_dataset(1, 8)
        ids = torch.tensor([tr.encode_examples(vocab, "", s.caption, 12)[0] for s in scenes])
        opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
        t = torch.full((8,), 0.7)

        def loss():
            return tr.text_loss_step(m, f, ids, torch.ones_like(ids), vocab.mask_id, torch.Generator().manual_seed(1), t)

        before = loss().item()
        for _ in range(30):
            opt.zero_grad()
            loss().backward()
            opt.step()
        assert loss().item() < 0.7 * before

    def test_trains_exports_and_resumes(self, trained, tiny_pipe):
        """The run exports safetensors + config; a longer run resumes from the checkpoint's step."""
        m, v, extra, info = load_text_denoiser(trained.out_dir)
        assert m.config.trained_steps == 4 and extra is None and info["train_seed"] == trained.seed
        import dataclasses
        cfg = dataclasses.replace(trained, steps=6)
        tr.train_text_diffusion(cfg, tiny_pipe)
        assert load_text_denoiser(trained.out_dir)[0].config.trained_steps == 6

    def test_cli_flags_are_checked(self):
        """Every config field is a flag; a bad mode or timestep is a ValueError naming the flag."""
        import argparse

        from models.training.common import add_config_flags, config_from_flags

        p = argparse.ArgumentParser()
        add_config_flags(p, tr.TextDiffusionConfig)
        cfg = config_from_flags(p.parse_args(["--steps", "20", "--timestep", "1000"]), tr.TextDiffusionConfig)
        assert (cfg.steps, cfg.timestep, cfg.mode) == (20, 1000, "frozen")
        for bad, flag in ((["--mode", "x"], "--mode"), (["--timestep", "1001"], "--timestep"),
                          (["--img-pos", "rope"], "--img-pos"), (["--question-tasks", "why"], "--question-tasks"),
                          (["--word-maps", "red", " "], "--word-maps"), (["--lr-schedule", "linear"], "--lr-schedule")):
            with pytest.raises(ValueError, match=flag):
                config_from_flags(p.parse_args(bad), tr.TextDiffusionConfig)

    def test_save_load_roundtrip(self, model, vocab, tmp_path, feats):
        """Saved weights load back to the same logits (with an extra timestep)."""
        extra = ExtraTimestep(torch.randn(16))
        save_text_denoiser(tmp_path, model, vocab, extra)
        m2, v2, e2, _ = load_text_denoiser(tmp_path)
        ids = torch.tensor([vocab.encode("a red circle")])
        assert torch.allclose(model(feats, ids).logits, m2(feats, ids).logits)
        assert torch.equal(e2.embedding, extra.embedding) and v2.encode("how ?") == vocab.encode("how ?")

    def test_question_tasks_filter_the_rows(self, vocab):
        """question_tasks keeps only those templates' rows (captions unchanged): "where" alone on relation scenes."""
        scenes = world.sample_dataset(3, 40)
        full = tr._scene_tables(scenes, vocab, 12)
        where = tr._scene_tables(scenes, vocab, 12, ("where",))
        n_where = sum(t == "where" for s in scenes for t, _, _ in tr.scene_questions(s))
        assert torch.equal(full["cap_ids"], where["cap_ids"]) and 0 < n_where == len(where["q_ids"]) < len(full["q_ids"])
        assert all(vocab.decode(r.tolist())[0] == "where" for r in where["q_ids"])

    def test_relation_boost_draws_relation_captions(self, vocab):
        """relation_boost b: a share b of a batch's caption rows comes from relation scenes only, the rest from all
        scenes; b = 0 draws exactly as before (same rows for the same generator); question rows are unchanged."""
        scenes = world.sample_dataset(3, 60)
        tables = tr._scene_tables(scenes, vocab, 12)
        is_rel = torch.tensor([s.kind == "relation" for s in scenes])
        assert 0 < int(is_rel.sum()) < len(scenes) and torch.equal(tables["relation_scenes"], is_rel.nonzero()[:, 0])
        all_rel, _, _ = tr._batch_rows(tables, 40, 0.5, torch.Generator().manual_seed(0), 1.0)
        assert bool(is_rel[all_rel[:20]].all())
        half, ids, gen = tr._batch_rows(tables, 40, 0.5, torch.Generator().manual_seed(0), 0.5)
        assert bool(is_rel[half[:10]].all()) and ids.shape == (40, 12) and bool(gen[:20].all())
        plain = tr._batch_rows(tables, 40, 0.5, torch.Generator().manual_seed(1))
        zero = tr._batch_rows(tables, 40, 0.5, torch.Generator().manual_seed(1), 0.0)
        assert all(torch.equal(a, b) for a, b in zip(plain, zero))
        many = tr._batch_rows(tables, 4000, 1.0, torch.Generator().manual_seed(2), 0.5)[0]
        assert float(is_rel[many].float().mean()) > 0.5 + 0.5 * float(is_rel.float().mean()) - 0.05

    def test_sincos_position_code(self, vocab, tmp_path, feats):
        """img_pos "sincos": a fixed 2-D code (not saved) in one frame for both blocks: the mid block's cell (i, j)
        carries the code of the up grid's cell (2i, 2j); the model saves and loads to the same logits; a config
        without the field (older adapters) reads as "learned"; an unknown code is a ValueError."""
        torch.manual_seed(0)
        cfg = TextDenoiserConfig(vocab_size=vocab.size, max_len=12, block_channels=(32, 32), hidden=32, layers=1,
                                 heads=2, img_pos="sincos")
        m = TextDenoiser(cfg).eval()
        mid, up = m.img_sincos_0, m.img_sincos_1  # [16, 32], [64, 32]
        assert mid.shape == (16, 32) and up.shape == (64, 32)
        assert torch.allclose(mid.reshape(4, 4, 32), up.reshape(8, 8, 32)[::2, ::2])
        assert len({tuple(r.tolist()) for r in up}) == 64  # every cell its own code
        assert not any("sincos" in k for k in m.state_dict())
        lm = TextDenoiser(dataclasses.replace(cfg, img_pos="learned")).eval()
        lm.load_state_dict(m.state_dict())
        ids = torch.tensor([vocab.encode("a red circle")])
        assert not torch.allclose(m(feats, ids).logits, lm(feats, ids).logits)  # the code reaches the logits
        save_text_denoiser(tmp_path, m, vocab)
        m2, _, _, _ = load_text_denoiser(tmp_path)
        assert m2.config.img_pos == "sincos" and torch.allclose(m(feats, ids).logits, m2(feats, ids).logits)
        d = json.loads((tmp_path / "config.json").read_text())
        d.pop("img_pos")
        (tmp_path / "config.json").write_text(json.dumps(d))
        assert load_text_denoiser(tmp_path)[0].config.img_pos == "learned"
        with pytest.raises(ValueError, match="img_pos"):
            TextDenoiserConfig(img_pos="rope")

    def test_feature_norm_makes_the_reading_scale_free(self, vocab, feats):
        """feature_norm: each block's channels are layer-normed before projection, so scaling the UNet's features
        leaves the logits unchanged (without it they change); its parameters are saved with the model."""
        torch.manual_seed(0)
        base = dict(vocab_size=vocab.size, max_len=12, block_channels=(32, 32), hidden=32, layers=1, heads=2)
        ids = torch.tensor([vocab.encode("a red circle")])
        big = {k: 30 * v for k, v in feats.items()}
        m = TextDenoiser(TextDenoiserConfig(**base, feature_norm=True)).eval()
        assert torch.allclose(m(feats, ids).logits, m(big, ids).logits, atol=1e-4)
        assert any(k.startswith("feature_norm.") for k in m.state_dict())
        plain = TextDenoiser(TextDenoiserConfig(**base)).eval()
        assert not torch.allclose(plain(feats, ids).logits, plain(big, ids).logits, atol=1e-4)

    def test_word_maps_are_added_to_the_last_block(self, vocab, tmp_path, feats):
        """word_maps: one channel per prompt word, projected onto the last block's tokens (no new tokens); the maps
        reach the logits; missing or mis-shaped maps are ValueErrors; saved and loaded to the same logits; a config
        without the field (older adapters) has none."""
        torch.manual_seed(0)
        cfg = TextDenoiserConfig(vocab_size=vocab.size, max_len=12, block_channels=(32, 32), hidden=32, layers=1,
                                 heads=2, word_maps=("red green", "circle"))
        m = TextDenoiser(cfg).eval()
        assert cfg.map_words == ["red", "green", "circle"] and m.map_proj.in_features == 3
        maps = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(1))
        f = dict(feats, **{WORD_MAPS: maps})
        plain = TextDenoiser(dataclasses.replace(cfg, word_maps=())).eval()
        assert m.image_tokens(f).shape == plain.image_tokens(feats).shape == (1, 16 + 64, 32)
        ids = torch.tensor([vocab.encode("a red circle")])
        other = dict(f, **{WORD_MAPS: maps.flip(-1)})
        assert not torch.allclose(m(f, ids).logits, m(other, ids).logits)
        tok, tok2 = m.image_tokens(f), m.image_tokens(other)
        assert torch.equal(tok[:, :16], tok2[:, :16])  # the mid block's tokens do not see them
        with pytest.raises(ValueError, match="missing"):
            m(feats, ids)
        with pytest.raises(ValueError, match="word maps must be"):
            m(dict(feats, **{WORD_MAPS: maps[:, :2]}), ids)
        save_text_denoiser(tmp_path, m, vocab)
        m2 = load_text_denoiser(tmp_path)[0]
        assert m2.config.word_maps == ("red green", "circle") and torch.allclose(m(f, ids).logits, m2(f, ids).logits)
        d = json.loads((tmp_path / "config.json").read_text())
        d.pop("word_maps")
        (tmp_path / "config.json").write_text(json.dumps(d))
        with pytest.raises(RuntimeError):  # older config, newer weights: map_proj has nowhere to go
            load_text_denoiser(tmp_path)
        assert TextDenoiserConfig(**{k: v for k, v in d.items() if k != "info"}).word_maps == ()
        with pytest.raises(ValueError, match="non-empty"):
            TextDenoiserConfig(word_maps=("red", ""))

    def test_word_marks_follow_the_unmasked_words(self, vocab, feats):
        """word_marks: the mark is the mean map of the map words present in the text (masked positions do not
        count; none named: zeros); it reaches the logits through the last block's tokens only, so the same image
        read under two questions differs; a denoiser with marks asks for the maps."""
        torch.manual_seed(0)
        words = ("red green", "circle")
        ids_of = tuple(vocab.word_to_id[w] for w in ("red", "green", "circle"))
        cfg = TextDenoiserConfig(vocab_size=vocab.size, max_len=12, block_channels=(32, 32), hidden=32, layers=1,
                                 heads=2, word_maps=words, word_marks=True, map_word_ids=ids_of)
        m = TextDenoiser(cfg).eval()
        maps = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(2))
        q_red = torch.tensor([vocab.encode("where is the red circle ?")])
        q_green = torch.tensor([vocab.encode("where is the green circle ?")])
        mark = m.word_mark(maps, q_red)
        assert mark.shape == (1, 1, 64)
        assert torch.allclose(mark[:, 0], ((maps[:, 0] + maps[:, 2]) / 2).flatten(1))
        masked = q_red.clone()
        masked[0, 3] = vocab.mask_id  # "red" masked: only "circle" counts
        assert torch.allclose(m.word_mark(maps, masked)[:, 0], maps[:, 2].flatten(1))
        assert torch.equal(m.word_mark(maps, torch.tensor([vocab.encode("how many ?")])), torch.zeros(1, 1, 64))
        f = dict(feats, **{WORD_MAPS: maps})
        a, b = m(f, q_red).logits, m(f, q_green).logits
        assert not torch.allclose(a[0, -1], b[0, -1])
        img = m.image_tokens(f)
        assert torch.allclose(m(None, q_red, image_tokens=img, word_maps=maps).logits, a)
        with pytest.raises(ValueError, match="give the word maps"):
            m(None, q_red, image_tokens=img)
        with pytest.raises(ValueError, match="word_marks needs"):
            TextDenoiserConfig(word_marks=True)

    def test_phrase_marks_keep_the_objects_apart(self, vocab, feats):
        """mark_phrases=2: one mark per run of map words and masks in text order — a relation caption's subject and
        object land in channels 0 and 1, a still-masked subject keeps channel 0 empty (the object is not read as
        the subject), a third phrase is dropped; the relation word reaches the logits through the two channels."""
        words = ("red green blue", "circle square")
        ids_of = tuple(vocab.word_to_id[w] for w in ("red", "green", "blue", "circle", "square"))
        cfg = TextDenoiserConfig(vocab_size=vocab.size, max_len=12, block_channels=(32, 32), hidden=32, layers=1,
                                 heads=2, word_maps=words, word_marks=True, map_word_ids=ids_of, mark_phrases=2)
        torch.manual_seed(0)
        m = TextDenoiser(cfg).eval()
        assert m.mark_proj.in_features == 2
        maps = torch.rand(1, 5, 8, 8, generator=torch.Generator().manual_seed(3))
        red, blue, circle, square = (maps[:, i].flatten(1) for i in (0, 2, 3, 4))
        cap = torch.tensor([vocab.encode("a red circle left of a blue square")])
        mark = m.word_mark(maps, cap)
        assert mark.shape == (1, 2, 64)
        assert torch.allclose(mark[:, 0], (red + circle) / 2) and torch.allclose(mark[:, 1], (blue + square) / 2)
        hidden_subject = cap.clone()
        hidden_subject[0, 1:3] = vocab.mask_id  # "a [MASK] [MASK] left of a blue square"
        mark = m.word_mark(maps, hidden_subject)
        assert torch.equal(mark[:, 0], torch.zeros(1, 64)) and torch.allclose(mark[:, 1], (blue + square) / 2)
        leading = cap.clone()
        leading[0, 0] = vocab.mask_id  # a mask beside a phrase joins it
        assert torch.allclose(m.word_mark(maps, leading), m.word_mark(maps, cap))
        three = torch.tensor([vocab.encode("red a blue a green")])
        assert torch.allclose(m.word_mark(maps, three), torch.stack([red, blue], 1))
        f = dict(feats, **{WORD_MAPS: maps})
        swapped = torch.tensor([vocab.encode("a blue square left of a red circle")])
        assert not torch.allclose(m(f, cap).logits, m(f, swapped).logits)
        with pytest.raises(ValueError, match="mark_phrases"):
            TextDenoiserConfig(mark_phrases=0)

    def test_position_marks_tag_each_map_word_with_its_position(self, vocab, feats):
        """mark_positions: channel i holds the map of the map word at text position i (zeros for masks, other
        words and positions past L), max_len channels; no rule joins a masked relation's two phrases (the phrase
        rule does); word order reaches the logits."""
        words = ("red green blue", "circle square")
        ids_of = tuple(vocab.word_to_id[w] for w in ("red", "green", "blue", "circle", "square"))
        base = dict(vocab_size=vocab.size, max_len=12, block_channels=(32, 32), hidden=32, layers=1, heads=2,
                    word_maps=words, word_marks=True, map_word_ids=ids_of)
        torch.manual_seed(0)
        m = TextDenoiser(TextDenoiserConfig(**base, mark_positions=True)).eval()
        phr = TextDenoiser(TextDenoiserConfig(**base, mark_phrases=2)).eval()
        assert m.config.n_marks == 12 and m.mark_proj.in_features == 12
        maps = torch.rand(1, 5, 8, 8, generator=torch.Generator().manual_seed(3))
        red, blue, circle, square = (maps[:, i].flatten(1) for i in (0, 2, 3, 4))
        cap = torch.tensor([vocab.encode("a red circle left of a blue square")])  # 8 of 12 positions
        cap[0, 3:6] = vocab.mask_id  # "a red circle [MASK] [MASK] [MASK] blue square"
        mark = m.word_mark(maps, cap)
        assert mark.shape == (1, 12, 64)
        want = torch.zeros(1, 12, 64)
        want[:, 1], want[:, 2], want[:, 6], want[:, 7] = red, circle, blue, square
        assert torch.allclose(mark, want)
        joined = phr.word_mark(maps, cap)  # the phrase rule reads one run: both objects in channel 0
        assert torch.allclose(joined[:, 0], (red + circle + blue + square) / 4)
        f = dict(feats, **{WORD_MAPS: maps})
        swapped = torch.tensor([vocab.encode("a blue circle left of a red square")])
        plain = torch.tensor([vocab.encode("a red circle left of a blue square")])
        assert not torch.allclose(m(f, plain).logits, m(f, swapped).logits)
        with pytest.raises(ValueError, match="mark_positions"):
            TextDenoiserConfig(mark_positions=True)
        with pytest.raises(ValueError, match="mark_positions"):
            TextDenoiserConfig(**base, mark_positions=True, mark_phrases=2)

    def test_cosine_learning_rate(self):
        """--lr-schedule cosine: linear warm-up to lr, then half a cosine down to 0 at --steps; constant stays."""
        c = tr.TextDiffusionConfig(steps=1100, lr=2e-3, warmup=100, lr_schedule="cosine")
        assert tr.learning_rate(c, 0) == pytest.approx(2e-5)
        assert tr.learning_rate(c, 100) == pytest.approx(2e-3)
        assert tr.learning_rate(c, 600) == pytest.approx(1e-3)
        assert tr.learning_rate(c, 1100) == pytest.approx(0, abs=1e-12)
        lrs = [tr.learning_rate(c, s) for s in range(100, 1101, 50)]
        assert lrs == sorted(lrs, reverse=True)
        flat = dataclasses.replace(c, lr_schedule="constant")
        assert tr.learning_rate(flat, 1000) == tr.learning_rate(flat, 100) == pytest.approx(2e-3)

    def test_no_adapter_is_a_value_error(self, tmp_path):
        """Loading from a folder without an adapter is a one-line ValueError."""
        with pytest.raises(ValueError, match="no text denoiser"):
            load_text_denoiser(tmp_path)


class TestUNetReading:
    def test_extra_timestep_features_and_hook_removed(self, tiny_pipe):
        """t = 1000 reads the clean latent with a replaced time embedding; the hook is gone afterwards, also after
        an error."""
        z = torch.randn(2, 4, 16, 16)
        f = tr.unet_text_features(tiny_pipe, z, 1000, ["mid_block"])
        f0 = tr.unet_text_features(tiny_pipe, z, 0, ["mid_block"])
        assert f["mid_block"].shape == f0["mid_block"].shape and not torch.allclose(f["mid_block"], f0["mid_block"])
        unet = tiny_pipe.unet
        with pytest.raises(RuntimeError):
            with override_time_embedding(unet, ExtraTimestep.from_unet(unet)):
                raise RuntimeError("boom")
        assert not unet.time_embedding._forward_hooks


    def test_word_maps_reading(self, tiny_pipe):
        """unet_word_maps: [B, K, gh, gw], each map averaging 1; a prompt's maps do not depend on the other prompts
        read beside it; a word split into several tokens is a ValueError; image_reading adds them under WORD_MAPS
        with the blocks read as unet_text_features reads them."""
        z = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
        both = tr.unet_word_maps(tiny_pipe, z, 250, ["red green", "a circle"], (8, 8), noise_seed=3)
        assert both.shape == (2, 4, 8, 8)
        assert torch.allclose(both.mean((-2, -1)), torch.ones(2, 4), atol=1e-5)
        alone = tr.unet_word_maps(tiny_pipe, z, 250, ["a circle"], (8, 8), noise_seed=3)
        assert torch.allclose(both[:, 2:], alone, atol=1e-5)
        assert not torch.allclose(both[0], both[1])  # each image its own maps
        with pytest.raises(ValueError, match="one token per word"):
            tr.unet_word_maps(tiny_pipe, z, 250, ["a dog"], (8, 8))
        cfg = TextDenoiserConfig(block_channels=(32, 32), word_maps=("red green",))
        cfg = dataclasses.replace(cfg, block_channels=tuple(tiny_pipe.unet.config.block_out_channels[-1:] * 2))
        read = tr.image_reading(tiny_pipe, z, cfg, noise_seed=3)
        blocks = tr.unet_text_features(tiny_pipe, z, 0, cfg.blocks, noise_seed=3)
        assert torch.allclose(read["mid_block"], blocks["mid_block"]) and read[WORD_MAPS].shape == (2, 2, 8, 8)


class TestEntryPoints:
    def test_caption_and_vqa_json(self, trained, tiny_pipe):
        """caption_image / answer_question give the CLI's JSON: text and one token list per step."""
        img = world.render(world.sample_dataset(3, 1)[0])
        c = td.caption_image(img, pipe=tiny_pipe, adapter=trained.out_dir, steps=4).to_json()
        assert set(c) == {"caption", "steps"} and len(c["steps"]) == 4 and MASK not in c["steps"][-1]
        a = td.answer_question(img, "how many circles ?", pipe=tiny_pipe, adapter=trained.out_dir).to_json()
        assert a["steps"][0][:4] == ["how", "many", "circles", "?"] and isinstance(a["answer"], str)

    def test_bad_inputs(self, trained, tiny_pipe, tmp_path):
        """Unreadable image, bad question: one-line ValueErrors."""
        bad = tmp_path / "x.png"
        bad.write_bytes(b"not an image")
        with pytest.raises(ValueError, match="cannot read image"):
            td.caption_image(bad, pipe=tiny_pipe, adapter=trained.out_dir)
        img = world.render(world.sample_dataset(3, 1)[0])
        with pytest.raises(ValueError, match="vocabulary"):
            td.answer_question(img, "how many dogs ?", pipe=tiny_pipe, adapter=trained.out_dir)

    def test_eval_reports_rates(self, trained, tiny_pipe):
        """The evaluation reports per-task rates with n and intervals, and the ranking baseline's cost."""
        out = td.evaluate_text_diffusion(tiny_pipe, n_scenes=3, adapter=trained.out_dir, caption_steps=2,
                                         n_ranking=1, progress=False)
        assert out["caption"]["overall"]["n"] == 3 and "count" in out["vqa"]["by_task"]
        assert out["ranking"]["n_scenes"] == 1 and out["cost"]["unet_evals_per_image"]["ranking"] > 0
        assert out["cost"]["unet_evals_per_image"]["text_diffusion"] == 1  # no word maps: the blocks' row only


class TestWordMapsRun:
    def test_trains_with_word_maps_reusing_the_blocks_cache(self, trained, tiny_pipe, tmp_path):
        """A run with word maps reuses the blocks' cache of a run without (same file, untouched), adds its own maps
        cache, trains, exports an adapter whose config keeps the prompts, and captions / answers through it."""
        import shutil

        work = tmp_path / "work"
        shutil.copytree(trained.work_dir, work)
        blocks_cache = next(work.glob("train_s*_mid_block-up_blocks.1.pt"))
        stamp = blocks_cache.stat().st_mtime_ns
        cfg = dataclasses.replace(trained, out_dir=str(tmp_path / "out"), work_dir=str(work), steps=2,
                                  word_maps=("red green blue", "circle square"))
        with pytest.raises(ValueError, match="another denoiser"):  # the copied run's checkpoint has no map layer
            tr.train_text_diffusion(cfg, tiny_pipe)
        shutil.rmtree(work / "frozen_t0")
        tr.train_text_diffusion(cfg, tiny_pipe)
        assert blocks_cache.stat().st_mtime_ns == stamp
        maps = torch.load(next(work.glob("train_s*_maps-*.pt")), weights_only=False)["features"][WORD_MAPS]
        assert maps.shape == (trained.n_scenes, 5, 8, 8)
        m = load_text_denoiser(cfg.out_dir)[0]
        assert m.config.word_maps == ("red green blue", "circle square") and m.config.trained_steps == 2
        with pytest.raises(ValueError, match="--word-marks needs --word-maps"):
            tr.train_text_diffusion(dataclasses.replace(cfg, word_maps=(), word_marks=True,
                                                        out_dir=str(tmp_path / "o2")), tiny_pipe)
        marked = dataclasses.replace(cfg, word_marks=True, out_dir=str(tmp_path / "out_marks"),
                                     work_dir=str(tmp_path / "work_marks"))
        shutil.copytree(work, marked.work_dir, ignore=shutil.ignore_patterns("frozen_*"))
        tr.train_text_diffusion(marked, tiny_pipe)
        mm, vocab_of = load_text_denoiser(marked.out_dir)[:2]
        assert mm.config.word_marks and mm.config.map_word_ids == tuple(
            vocab_of.word_to_id[w] for w in ("red", "green", "blue", "circle", "square"))
        assert mm.config.mask_id == vocab_of.mask_id
        img = world.render(world.sample_dataset(3, 1)[0])
        a = td.answer_question(img, "how many circles ?", pipe=tiny_pipe, adapter=cfg.out_dir).to_json()
        assert a["steps"][0][:4] == ["how", "many", "circles", "?"]
        # warm start of a run with phrase marks from the one-mark adapter: every tensor carried, the one-mark
        # layer's column seeding both phrase columns (a one-phrase question is read as before)
        phrases = dataclasses.replace(marked, mark_phrases=2, init_from=marked.out_dir, steps=1,
                                      out_dir=str(tmp_path / "out_phrases"), work_dir=str(tmp_path / "work_phr"))
        shutil.copytree(work, phrases.work_dir, ignore=shutil.ignore_patterns("frozen_*"))
        assert tr.warm_start(TextDenoiser(mm.config), marked.out_dir) == []
        m2 = TextDenoiser(dataclasses.replace(mm.config, mark_phrases=2))
        assert tr.warm_start(m2, marked.out_dir) == []
        assert torch.equal(m2.map_proj.weight, mm.map_proj.weight)
        assert torch.equal(m2.mark_proj.weight, mm.mark_proj.weight.repeat(1, 2))
        assert torch.equal(m2.mark_proj.bias, mm.mark_proj.bias)
        q = torch.tensor([vocab_of.encode("where is the red circle ?")])
        fm = {b: torch.randn(1, c, *hw) for b, c, hw in zip(mm.config.blocks, mm.config.block_channels,
                                                            mm.config.block_sizes)}
        fm[WORD_MAPS] = torch.rand(1, 5, 8, 8)
        assert torch.allclose(m2.eval()(fm, q).logits, mm(fm, q).logits, atol=1e-5)
        m4 = TextDenoiser(dataclasses.replace(m2.config, mark_phrases=1, mark_positions=True))
        assert tr.warm_start(m4, marked.out_dir) == []  # every position column starts as the one-mark column
        assert torch.equal(m4.mark_proj.weight, mm.mark_proj.weight.repeat(1, 12))
        m3 = TextDenoiser(dataclasses.replace(mm.config, hidden=16, heads=2))
        assert {"tok.weight", "head.3.weight", "mark_proj.weight"} <= set(tr.warm_start(m3, marked.out_dir))
        tr.train_text_diffusion(phrases, tiny_pipe)
        mp, _, _, info = load_text_denoiser(phrases.out_dir)
        assert mp.config.mark_phrases == 2 and mp.config.trained_steps == 1 and info["init_from"] == marked.out_dir
        with pytest.raises(ValueError, match="no trained text denoiser"):
            tr.warm_start(m2, tmp_path / "nothing")
        c = td.caption_image(img, pipe=tiny_pipe, adapter=phrases.out_dir).to_json()
        assert len(c["steps"]) >= 1 and c["steps"][-1].count("[MASK]") == 0
        cost = td.evaluate_text_diffusion(pipe=tiny_pipe, n_scenes=2, adapter=phrases.out_dir, ranking=False,
                                          progress=False)["cost"]
        assert cost["unet_evals_per_image"]["text_diffusion"] == 3  # the blocks' row + one row per map prompt


class TestDualMode:
    def test_dual_step_trains_unet_and_exports_it_beside(self, tmp_path):
        """Dual mode: a step changes the UNet, which is exported to out_dir/unet (never over the pipeline)."""
        import dataclasses

        from conftest import build_tiny_pipeline

        pipe = build_tiny_pipeline(tmp_path / "p", seed=1)
        before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
        cfg = tr.TextDiffusionConfig(out_dir=str(tmp_path / "out"), work_dir=str(tmp_path / "work"), mode="dual",
                                     n_scenes=16, n_val=4, steps=1, dual_batch=4, hidden=32, layers=1, heads=2)
        tr.train_text_diffusion(cfg, pipe)
        after = pipe.unet.state_dict()
        assert any(not torch.equal(before[k], after[k]) for k in before)
        assert (tmp_path / "out" / "unet" / "config.json").exists()
        assert load_text_denoiser(cfg.out_dir)[0].config.mode == "dual"
        assert dataclasses.asdict(cfg)["text_weight"] == 0.2
        # captioning with the dual adapter reads its own UNet, not the pipeline's (which stays as it was)
        base = build_tiny_pipeline(tmp_path / "p2", seed=1)
        reading = td.reading_pipe(base, cfg.out_dir)
        assert reading is not base and reading.unet is not base.unet and reading.vae is base.vae
        assert all(torch.equal(v, after[k]) for k, v in reading.unet.state_dict().items())
        assert all(torch.equal(v, before[k]) for k, v in base.unet.state_dict().items())
        assert td.reading_pipe(base, cfg.out_dir) is reading  # cached
        assert td.reading_pipe(base, tmp_path / "frozen-has-no-unet") is base
