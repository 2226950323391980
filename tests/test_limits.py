"""models.limits: one source for what a user may ask for; numbers as numbers or as text give one message."""
from __future__ import annotations

import pytest
from PIL import Image

from models import limits


class TestNumbers:
    @pytest.mark.parametrize("value,expected", [(25, 25), ("25", 25), (25.0, 25), ("1", 1)])
    def test_steps_accept_whole_numbers_and_text(self, value, expected):
        """Widgets give floats, flags give text: both are accepted when whole."""
        assert limits.check_steps(value) == expected

    @pytest.mark.parametrize("value", [0, limits.MAX_STEPS + 1, 2.5, None, "", "x", float("inf")])
    def test_steps_refused_with_the_range(self, value):
        """Out of range, fractional or missing: refused, the message names the range."""
        with pytest.raises(ValueError, match=rf"steps must be a whole number in 1\.\.{limits.MAX_STEPS}"):
            limits.check_steps(value)

    def test_text_and_number_give_the_same_message(self):
        """"1e20" (a flag) and 1e20 (a widget) are refused with one message, no overflow error."""
        msgs = set()
        for v in ("1e20", 1e20):
            with pytest.raises(ValueError) as e:
                limits.check_seed(v)
            msgs.add(str(e.value))
        assert len(msgs) == 1 and "100000000000000000000" in msgs.pop()

    def test_guidance_none_is_the_models_default(self):
        """No guidance means the model's own default."""
        assert limits.check_guidance(None) is None and limits.check_guidance("7.5") == 7.5

    def test_timesteps_against_the_schedule(self):
        """Timesteps must lie in the model's training schedule; at least one."""
        assert limits.check_timesteps(["200", 400], 1000) == (200, 400)
        with pytest.raises(ValueError, match=r"0\.\.99, got 100"):
            limits.check_timesteps([100], 100)
        with pytest.raises(ValueError, match="at least one timestep"):
            limits.check_timesteps([], 1000)

    def test_parse_numbers_splits_commas_and_spaces(self):
        assert limits.parse_numbers("200, 400 600") == ["200", "400", "600"] and limits.parse_numbers(None) == []


    @pytest.mark.parametrize("value,expected", [("0:8", (0, 8)), (":8", (0, 8)), ("5:", (5, 25)), (" 2 : 3 ", (2, 3)),
                                                ("", (0, 25)), (None, (0, 25)), ((0, None), (0, 25)),
                                                ((3.0, "7"), (3, 7))])
    def test_step_range_forms(self, value, expected):
        """START:STOP with either end open, a pair, or nothing (every step)."""
        assert limits.check_step_range(value, 25) == expected

    @pytest.mark.parametrize("value,match", [("8", "must be START:STOP"), ("1:2:3", "must be START:STOP"),
                                             ("9:3", "9:3 are empty"), ("0:26", r"STOP must be a whole number in 1\.\.25"),
                                             ("25:", r"first corrected step must be a whole number in 0\.\.24"),
                                             ("1.5:3", "first corrected step"), ("a:4", "first corrected step")])
    def test_step_range_refused(self, value, match):
        with pytest.raises(ValueError, match=match):
            limits.check_step_range(value, 25)


class TestText:
    def test_captions_are_counted_and_cleaned(self):
        """Whitespace collapsed; too few, too many, empty: one-line messages."""
        assert limits.validate_captions(["a  red", " b "]) == ["a red", "b"]
        for caps, msg in ((["a"], "at least 2"), (["a", " "], "caption 2 is empty"),
                          (["a"] * (limits.MAX_CANDIDATES + 1), "at most"), ([], "no captions")):
            with pytest.raises(ValueError, match=msg):
                limits.validate_captions(caps)

    def test_prompt_length_in_characters(self):
        with pytest.raises(ValueError, match="too long"):
            limits.check_prompt("a" * (limits.MAX_PROMPT_CHARS + 1))

    def test_vocabulary_of_the_shapes_model(self, tiny_pipe):
        """A closed vocabulary refuses unknown words and lists the words it knows."""
        limits.check_vocabulary(tiny_pipe.tokenizer, ["a red circle"])
        with pytest.raises(ValueError, match="outside the model's vocabulary: zebra; it knows: a, small"):
            limits.check_vocabulary(tiny_pipe.tokenizer, ["a red zebra"])


class TestImages:
    def test_read_image_from_path_and_pil(self, tmp_path):
        p = tmp_path / "x.png"
        Image.new("L", (8, 8)).save(p)
        assert limits.read_image(p).mode == "RGB" and limits.read_image(Image.new("RGB", (4, 4))).size == (4, 4)

    @pytest.mark.parametrize("make,msg", [(lambda p: None, "image not found"),
                                          (lambda p: p.write_text("x"), "cannot read image")])
    def test_bad_files(self, tmp_path, make, msg):
        p = tmp_path / "bad.png"
        make(p)
        with pytest.raises(ValueError, match=msg):
            limits.read_image(p)

    def test_too_large(self):
        with pytest.raises(ValueError, match="each side"):
            limits.read_image(Image.new("RGB", (limits.MAX_IMAGE_SIDE + 1, 1)))
        with pytest.raises(ValueError, match="no image"):
            limits.read_image(None)
