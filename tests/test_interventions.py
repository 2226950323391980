"""models.interventions: causal edits of cross-attention on the tiny pipeline."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from models.attention_capture import capture_cross_attention, cross_attention_layers
from models.interventions import AttentionEdit, intervene, region_mask, word_columns
from models.trace import trace

STEPS = 3
FIRST = "down.0.attn.0"  # first cross-attention layer: at step 0 its input does not depend on any edit


def _gen(pipe, prompts, seed: int = 0, guidance: float = 3.0) -> np.ndarray:
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    gens = [torch.Generator().manual_seed(seed) for _ in prompts]
    return pipe(prompts, num_inference_steps=STEPS, guidance_scale=guidance, generator=gens,
                output_type="np").images


def _probs(pipe, prompt: str, edits=(), renormalize: bool = False, **sel) -> torch.Tensor:
    """Cond probs of FIRST, `[steps, heads, h, w, tokens]`, float32, with the edits applied."""
    with trace(pipe, dtype=torch.float32, layers=[FIRST], **sel) as tc:
        with intervene(pipe, list(edits), renormalize=renormalize):
            _gen(pipe, prompt)
    return tc.trace.probs[FIRST]


def _processors(pipe) -> dict:
    return dict(pipe.unet.attn_processors)


class TestEditValidation:
    def test_word_columns_skip_bos(self, tiny_pipe):
        """The i-th word of a one-token-a-word prompt sits at position i + 1."""
        assert word_columns(tiny_pipe.tokenizer, "a red circle", 2) == [3]

    def test_bad_box_rejected(self):
        """A box outside the unit square is refused."""
        with pytest.raises(ValueError):
            AttentionEdit(tokens=(1,), box=(0.5, 0.0, 0.2, 1.0))

    def test_steps_and_timesteps_exclusive(self):
        """Steps and timesteps cannot both be given."""
        with pytest.raises(ValueError):
            AttentionEdit(tokens=(1,), steps=(0,), timesteps=(999,))

    def test_region_mask_cell_centres(self):
        """The left half of a 4x4 grid is its first two columns."""
        m = region_mask((0.0, 0.0, 0.5, 1.0), 4, 4).view(4, 4)
        assert m[:, :2].all() and not m[:, 2:].any()


class TestRestore:
    def test_restored_after_exit(self, tiny_pipe):
        """Every processor object is back after the block."""
        before = _processors(tiny_pipe)
        with intervene(tiny_pipe, [AttentionEdit(tokens=(2,))]):
            assert _processors(tiny_pipe) != before
        after = _processors(tiny_pipe)
        assert all(after[k] is v for k, v in before.items())

    def test_restored_after_exception(self, tiny_pipe):
        """An exception inside the block still restores the processors and removes the UNet hook."""
        before = _processors(tiny_pipe)
        hooks = len(tiny_pipe.unet._forward_pre_hooks)
        with pytest.raises(RuntimeError, match="boom"):
            with intervene(tiny_pipe, [AttentionEdit(tokens=(2,))]):
                _gen(tiny_pipe, "a red circle")
                raise RuntimeError("boom")
        after = _processors(tiny_pipe)
        assert all(after[k] is v for k, v in before.items())
        assert len(tiny_pipe.unet._forward_pre_hooks) == hooks

    def test_unknown_layer_installs_nothing(self, tiny_pipe):
        """An unknown layer alias raises before any processor changes."""
        before = _processors(tiny_pipe)
        with pytest.raises(ValueError):
            with intervene(tiny_pipe, [AttentionEdit(tokens=(2,), layers=("nope",))]):
                pass
        assert all(_processors(tiny_pipe)[k] is v for k, v in before.items())


class TestIdentity:
    def test_scale_one_is_bit_identical(self, tiny_pipe):
        """Scale 1 on a word, everywhere, gives exactly the unedited image."""
        base = _gen(tiny_pipe, "a red circle")
        with intervene(tiny_pipe, [AttentionEdit(tokens=(2, 3), scale=1.0)]):
            edited = _gen(tiny_pipe, "a red circle")
        assert np.array_equal(base, edited)

    def test_scale_zero_changes_the_image(self, tiny_pipe):
        """Suppressing a word everywhere changes the image."""
        base = _gen(tiny_pipe, "a red circle")
        with intervene(tiny_pipe, [AttentionEdit(tokens=(2, 3), scale=0.0)]):
            edited = _gen(tiny_pipe, "a red circle")
        assert not np.array_equal(base, edited)

    def test_other_prompt_of_batch_untouched(self, tiny_pipe):
        """An edit restricted to prompt 0 leaves prompt 1 of the same batch bit-identical (same maths)."""
        unet = tiny_pipe.unet
        with capture_cross_attention(unet, lambda *a, **k: None):  # same explicit maths for both runs
            base = _gen(tiny_pipe, ["a red circle", "a blue square"])
            with intervene(tiny_pipe, [AttentionEdit(tokens=(2,), scale=0.0, prompts=(0,))]):
                edited = _gen(tiny_pipe, ["a red circle", "a blue square"])
        assert not np.array_equal(base[0], edited[0])
        assert np.array_equal(base[1], edited[1])


class TestSuppressEverything:
    """What "scale 0 on every word's columns equals the unconditional branch" can exactly mean.

    The literal statement is false for a CLIP-style (causal) text encoder: the EOS and padding states of a
    prompt have attended to its words, so after zeroing the word columns the row still holds the prompt's
    EOS/padding columns (and, without renormalisation, sums to less than one), while the unconditional
    branch ("") has its own EOS/padding states. What holds exactly: BOS's state is the same for every
    prompt (position 0 sees only itself), so zeroing every column but BOS and renormalising makes every
    row one-hot on BOS, i.e. makes the conditional branch independent of the prompt: it becomes what the
    "" prompt (the unconditional prompt) gives under the same edit, bit for bit.
    """

    KEEP_BOS = AttentionEdit(tokens=tuple(range(1, 16)), scale=0.0)

    def test_conditional_branch_becomes_prompt_free(self, tiny_pipe):
        """Keep-only-BOS (renormalised) gives the same image for any prompt as for the "" prompt."""
        with intervene(tiny_pipe, [self.KEEP_BOS], renormalize=True):
            a = _gen(tiny_pipe, "a red circle")
            b = _gen(tiny_pipe, "two blue squares")
            empty = _gen(tiny_pipe, "")
        assert np.array_equal(a, empty) and np.array_equal(b, empty)

    def test_edited_map_equals_empty_prompt_map(self, tiny_pipe):
        """Under keep-only-BOS every layer's cond map is one-hot on BOS, as for the "" prompt."""
        p = _probs(tiny_pipe, "a red circle", [self.KEEP_BOS], renormalize=True)
        e = _probs(tiny_pipe, "", [self.KEEP_BOS], renormalize=True)
        assert torch.equal(p[..., 0], e[..., 0]) and torch.all(p[..., 0] == 1) and torch.all(p[..., 1:] == 0)

    def test_word_columns_alone_are_not_the_unconditional_map(self, tiny_pipe):
        """Zeroing only the word columns leaves the prompt's EOS column, unlike the "" branch's map."""
        with trace(tiny_pipe, dtype=torch.float32, layers=[FIRST], steps=[0], uncond=True) as tc:
            with intervene(tiny_pipe, [AttentionEdit(tokens=(1, 2, 3), scale=0.0)]):
                _gen(tiny_pipe, "a red circle")
        t = tc.trace
        cond = t.probs[FIRST][..., [0, 4]]  # BOS, EOS of "a red circle"
        unc = t.uncond_probs[FIRST][..., [0, 1]]  # BOS, EOS of ""
        assert not torch.allclose(cond, unc, atol=1e-4)


class TestSelection:
    def test_region_edit_changes_only_region_rows(self, tiny_pipe):
        """A box edit zeroes the word inside the box; every row outside it is bit-identical."""
        base = _probs(tiny_pipe, "a red circle", steps=[0])[0]  # [heads, h, w, tokens]
        box = (0.0, 0.0, 0.5, 1.0)
        edited = _probs(tiny_pipe, "a red circle", [AttentionEdit(tokens=(3,), box=box, layers=(FIRST,))],
                        steps=[0])[0]
        h, w = base.shape[1:3]
        inside = region_mask(box, h, w).view(h, w)
        assert torch.equal(edited[:, ~inside], base[:, ~inside])
        assert torch.all(edited[:, inside][..., 3] == 0)
        others = [i for i in range(base.shape[-1]) if i != 3]
        assert torch.equal(edited[:, inside][..., others], base[:, inside][..., others])

    def test_renormalized_rows_sum_to_one(self, tiny_pipe):
        """With renormalize=True the edited rows (all keys, padding included) sum to one again."""
        got = []
        with capture_cross_attention(tiny_pipe.unet, lambda name, probs, logits: got.append(probs), layers=[FIRST]):
            with intervene(tiny_pipe, [AttentionEdit(tokens=(3,), scale=0.0)], renormalize=True):
                _gen(tiny_pipe, "a red circle")
        cond = got[0][1]  # step 0, conditional half: [heads, queries, keys]
        assert torch.all(cond[..., 3] == 0)
        assert torch.allclose(cond.sum(-1), torch.ones(()), atol=1e-5)

    def test_step_selection(self, tiny_pipe):
        """An edit on step 1 leaves step 0 untouched and zeroes the word at step 1."""
        base = _probs(tiny_pipe, "a red circle")
        edited = _probs(tiny_pipe, "a red circle", [AttentionEdit(tokens=(3,), steps=(1,))])
        assert torch.equal(edited[0], base[0])
        assert torch.all(edited[1][..., 3] == 0)

    def test_timestep_selection(self, tiny_pipe):
        """An edit by timestep value hits the step with that timestep."""
        tiny_pipe.scheduler.set_timesteps(STEPS)
        t1 = float(tiny_pipe.scheduler.timesteps[1])
        edited = _probs(tiny_pipe, "a red circle", [AttentionEdit(tokens=(3,), timesteps=(t1,))])
        assert torch.all(edited[1][..., 3] == 0) and not torch.all(edited[0][..., 3] == 0)

    def test_unconditional_half_untouched(self, tiny_pipe):
        """With CFG only the conditional half is edited."""
        def unc(edits):
            with trace(tiny_pipe, dtype=torch.float32, layers=[FIRST], steps=[0], uncond=True) as tc:
                with intervene(tiny_pipe, edits):
                    _gen(tiny_pipe, "a red circle")
            return tc.trace.uncond_probs[FIRST]
        assert torch.equal(unc([]), unc([AttentionEdit(tokens=(0, 1), scale=0.0)]))

    def test_layer_selection(self, tiny_pipe):
        """Only the chosen layers get an edit processor."""
        names = [l.name for l in cross_attention_layers(tiny_pipe.unet)]
        with intervene(tiny_pipe, [AttentionEdit(tokens=(2,), layers=("mid.attn.0",))]) as layers:
            assert [l.alias for l in layers] == ["mid.attn.0"]
            procs = tiny_pipe.unet.attn_processors
            assert sum(type(procs[n + ".processor"]).__name__ == "EditProcessor" for n in names) == 1
