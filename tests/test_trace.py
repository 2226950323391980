"""Cross-attention tracing: processors restored, exactness, shapes, token alignment, selection, persistence."""
from __future__ import annotations

import pytest
import torch

from models.attention_capture import CaptureProcessor, capture_cross_attention, cross_attention_layers
from models.trace import AttentionTrace, real_token_count, trace

PROMPT = "a red circle left of a blue square"


def _gen(pipe, prompt=PROMPT, steps=3, guidance=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return pipe(prompt, num_inference_steps=steps, guidance_scale=guidance, generator=g, output_type="pt").images


def _procs(unet):
    return {k: type(v) for k, v in unet.attn_processors.items()}


class TestProcessors:
    def test_only_cross_attention_is_replaced(self, tiny_pipe):
        """Inside the context attn2 layers run the capture processor, attn1 keeps its own."""
        with capture_cross_attention(tiny_pipe.unet, lambda *a: None):
            procs = tiny_pipe.unet.attn_processors
            assert all(isinstance(v, CaptureProcessor) for k, v in procs.items() if ".attn2." in k)
            assert not any(isinstance(v, CaptureProcessor) for k, v in procs.items() if ".attn1." in k)

    def test_restored_on_exit(self, tiny_pipe):
        """The original processors come back after the context."""
        before = _procs(tiny_pipe.unet)
        with trace(tiny_pipe):
            _gen(tiny_pipe, steps=1)
        assert _procs(tiny_pipe.unet) == before

    def test_restored_after_exception(self, tiny_pipe):
        """An exception inside the context still restores processors and removes hooks."""
        before = _procs(tiny_pipe.unet)
        with pytest.raises(RuntimeError, match="boom"):
            with trace(tiny_pipe):
                raise RuntimeError("boom")
        assert _procs(tiny_pipe.unet) == before
        assert not tiny_pipe.unet._forward_pre_hooks and not tiny_pipe.text_encoder._forward_pre_hooks

    def test_layers_in_unet_order(self, tiny_pipe):
        """Layers are listed down, mid, up with readable aliases."""
        aliases = [l.alias for l in cross_attention_layers(tiny_pipe.unet)]
        assert aliases == ["down.0.attn.0", "down.1.attn.0", "mid.attn.0", "up.1.attn.0", "up.1.attn.1",
                           "up.2.attn.0", "up.2.attn.1"]

    def test_unknown_layer_selection_errors(self, tiny_pipe):
        """Selecting a layer that does not exist is an error naming it."""
        with pytest.raises(ValueError, match="nope"):
            with capture_cross_attention(tiny_pipe.unet, lambda *a: None, layers=["nope"]):
                pass


class TestExactness:
    def test_traced_generation_equals_untraced(self, tiny_pipe):
        """Same seed, tracing on vs off: max abs difference <= 1e-5 (fp32, CPU)."""
        a = _gen(tiny_pipe)
        with trace(tiny_pipe, logits=True, uncond=True):
            b = _gen(tiny_pipe)
        assert (a - b).abs().max().item() <= 1e-5

    def test_probabilities_sum_to_one_over_all_keys(self, tiny_pipe):
        """Before the token restriction, each query's probabilities sum to 1."""
        got = []
        with capture_cross_attention(tiny_pipe.unet, lambda n, p, l: got.append(p)):
            _gen(tiny_pipe, steps=1)
        assert got
        for p in got:
            torch.testing.assert_close(p.sum(-1), torch.ones_like(p.sum(-1)), atol=1e-5, rtol=0)


class TestTraceLayout:
    @pytest.fixture(scope="class")
    def tr(self, tiny_pipe):
        with trace(tiny_pipe, logits=True, uncond=True) as t:
            _gen(tiny_pipe, steps=3)
        return t.trace

    def test_shapes(self, tr, tiny_pipe):
        """Each layer holds [steps, heads, h, w, tokens] at its own resolution."""
        n_tok = len(PROMPT.split()) + 2
        res = {"down.0.attn.0": 16, "down.1.attn.0": 8, "mid.attn.0": 4, "up.2.attn.1": 16}
        for alias, side in res.items():
            assert tr.probs[alias].shape == (3, 4, side, side, n_tok)
            assert tr.probs[alias].dtype == torch.float16
        assert len(tr.timesteps) == 3 and tr.timesteps[0] > tr.timesteps[-1]

    def test_tokens_are_the_real_ones(self, tr):
        """Tokens run BOS ... EOS with no padding."""
        assert tr.tokens == ["<|startoftext|>", *PROMPT.split(), "<|endoftext|>"]
        assert tr.prompt == PROMPT

    def test_token_alignment(self, tiny_pipe, tr):
        """The map of 'red' is the column at that token's position in the padded sequence."""
        got = []
        with capture_cross_attention(tiny_pipe.unet, lambda n, p, l: got.append((n, p))):
            _gen(tiny_pipe, steps=3)
        name, probs = got[0]  # first layer, first UNet call: [2 (uncond, cond), heads, hw, keys]
        ids = tiny_pipe.tokenizer(PROMPT).input_ids
        red_pos = ids.index(tiny_pipe.tokenizer.convert_tokens_to_ids("red</w>"))
        j = tr.tokens.index("red")
        col = probs[1, :, :, red_pos].reshape(4, 16, 16)
        torch.testing.assert_close(tr.probs["down.0.attn.0"][0, :, :, :, j].float(), col, atol=1e-3, rtol=1e-3)

    def test_logits_softmax_matches_probs_on_full_axis(self, tiny_pipe):
        """Softmax of the captured logits over all keys gives the captured probabilities."""
        got = []
        with capture_cross_attention(tiny_pipe.unet, lambda n, p, l: got.append((p, l)), want_logits=True):
            _gen(tiny_pipe, steps=1)
        p, l = got[0]
        torch.testing.assert_close(l.softmax(-1), p, atol=1e-6, rtol=1e-5)

    def test_uncond_branch_kept_separately(self, tr):
        """The unconditional branch has its own tokens (BOS, EOS) when asked for."""
        assert tr.uncond_tokens == ["<|startoftext|>", "<|endoftext|>"]
        assert tr.uncond_probs["mid.attn.0"].shape[-1] == 2

    def test_uncond_off_by_default(self, tiny_pipe):
        """Without uncond=True only the conditional branch is kept."""
        with trace(tiny_pipe) as t:
            _gen(tiny_pipe, steps=1)
        assert t.trace.uncond_probs == {} and t.trace.logits == {}


class TestSelection:
    def test_selection_bounds_memory(self, tiny_pipe):
        """Selecting layers, steps, heads and tokens keeps exactly those and shrinks the bytes."""
        with trace(tiny_pipe) as full:
            _gen(tiny_pipe, steps=4)
        with trace(tiny_pipe, layers=["mid.attn.0", "up.2.attn.1"], steps=[1, 3], heads=[0, 2], tokens=[2, 3]) as sel:
            _gen(tiny_pipe, steps=4)
        t = sel.trace
        assert t.layer_names == ["mid.attn.0", "up.2.attn.1"]
        assert t.probs["up.2.attn.1"].shape == (2, 2, 16, 16, 2)
        assert t.tokens == ["red", "circle"]
        assert t.timesteps == [full.trace.timesteps[1], full.trace.timesteps[3]]
        expect = 2 * 2 * (16 * 16 + 4 * 4) * 2 * 2  # steps*heads*hw*tokens*2 bytes
        assert t.nbytes() == expect < full.trace.nbytes()
        torch.testing.assert_close(t.probs["up.2.attn.1"][1, 1], full.trace.probs["up.2.attn.1"][3, 2][..., [2, 3]])

    def test_nbytes_is_the_floor_in_fp16(self, tiny_pipe):
        """A full trace holds exactly sum(heads*h*w*real tokens*2 bytes) per step."""
        with trace(tiny_pipe) as t:
            _gen(tiny_pipe, steps=2)
        tr = t.trace
        floor = sum(l.heads * l.h * l.w * len(tr.tokens) * 2 for l in tr.layers)
        assert tr.nbytes() == 2 * floor


class TestBatchAndDirectCalls:
    def test_direct_unet_call_with_prompts(self, tiny_pipe):
        """A single UNet forward (scoring) is traced per prompt of the batch, each with its own tokens."""
        prompts = ["a red circle", "two blue squares", "a big green triangle"]
        tok = tiny_pipe.tokenizer(prompts, padding="max_length", max_length=tiny_pipe.tokenizer.model_max_length,
                                  return_tensors="pt")
        with torch.no_grad():
            emb = tiny_pipe.text_encoder(tok.input_ids)[0]
            with trace(tiny_pipe, prompts=prompts) as t:
                tiny_pipe.unet(torch.randn(3, 4, 16, 16), torch.tensor(500), encoder_hidden_states=emb)
        assert [tr.prompt for tr in t.traces] == prompts
        assert [tr.probs["mid.attn.0"].shape[-1] for tr in t.traces] == [5, 5, 6]
        assert t.traces[0].timesteps == [500.0]

    def test_batch_mismatch_is_a_clear_error(self, tiny_pipe):
        """A UNet batch that fits neither the prompts nor their CFG pair raises."""
        emb = tiny_pipe.text_encoder(tiny_pipe.tokenizer(["a red circle"] * 3, padding="max_length",
                                                         return_tensors="pt").input_ids)[0]
        with pytest.raises(RuntimeError, match="does not match"):
            with torch.no_grad(), trace(tiny_pipe, prompts=["a red circle", "a blue square"]):
                tiny_pipe.unet(torch.randn(3, 4, 16, 16), torch.tensor(10), encoder_hidden_states=emb)

    def test_real_token_count(self):
        """BOS ... first EOS inclusive."""
        assert real_token_count([9, 1, 2, 8, 8, 8], eos_id=8) == 4
        assert real_token_count([9, 1, 2], eos_id=8) == 3


class TestPersistence:
    def test_save_load_round_trip(self, tiny_pipe, tmp_path):
        """Saved and loaded traces hold the same tensors and metadata."""
        with trace(tiny_pipe, logits=True, uncond=True) as t:
            _gen(tiny_pipe, steps=2)
        a = t.trace
        b = AttentionTrace.load(a.save(tmp_path / "t.safetensors"))
        assert (b.tokens, b.timesteps, b.layers, b.uncond_tokens, b.prompt) == (
            a.tokens, a.timesteps, a.layers, a.uncond_tokens, a.prompt)
        for d1, d2 in ((a.probs, b.probs), (a.logits, b.logits), (a.uncond_probs, b.uncond_probs)):
            assert d1.keys() == d2.keys()
            assert all(torch.equal(d1[k], d2[k]) for k in d1)

    def test_load_rejects_other_files(self, tmp_path):
        """A safetensors file without trace metadata is refused."""
        from safetensors.torch import save_file

        save_file({"x": torch.zeros(2)}, str(tmp_path / "x.safetensors"))
        with pytest.raises(ValueError, match="not a DiscoLens trace"):
            AttentionTrace.load(tmp_path / "x.safetensors")


class TestRealArchitectures:
    """Tracing on pipelines built from the real SD-1.5 / SD-2.1-base configs (scaled down, random init)."""

    @pytest.fixture(scope="class", params=["sd15", "sd21base"])
    def ref_pipe(self, request, tmp_path_factory):
        from diffusers import StableDiffusionPipeline

        from models.reference_configs import save_reference_pipeline

        folder = tmp_path_factory.mktemp(request.param) / "pipe"
        save_reference_pipeline(request.param, folder, scale="tiny")
        pipe = StableDiffusionPipeline.from_pretrained(folder)  # the hub-id code path, offline
        pipe.set_progress_bar_config(disable=True)
        return request.param, pipe

    def test_all_sixteen_layers_with_real_head_counts(self, ref_pipe):
        """16 cross-attention layers; SD-1.5 has 8 heads everywhere, SD-2.1 5/10/20 by level."""
        arch, pipe = ref_pipe
        with trace(pipe) as t:
            _gen(pipe, "a red circle", steps=2)
        tr = t.trace
        assert len(tr.layers) == 16
        heads = {l.alias: l.heads for l in tr.layers}
        if arch == "sd15":
            assert set(heads.values()) == {8}
        else:
            assert heads["down.0.attn.0"] == 5 and heads["down.1.attn.0"] == 10 and heads["mid.attn.0"] == 20
            assert heads["up.3.attn.2"] == 5
        for l in tr.layers:
            assert tr.probs[l.alias].shape == (len(tr.timesteps), l.heads, l.h, l.w, 5)  # PNDM: 3 calls for 2 steps

    def test_exact_on_real_architecture(self, ref_pipe):
        """Tracing does not change the generation (linear projections, head-dim lists included)."""
        _, pipe = ref_pipe
        a = _gen(pipe, "a red circle", steps=2)
        with trace(pipe, logits=True):
            b = _gen(pipe, "a red circle", steps=2)
        assert (a - b).abs().max().item() <= 1e-5


@pytest.mark.slow
def test_full_size_sd15_unet_forward_traced():
    """One full-size SD-1.5 UNet forward (random init) traced: 16 layers, 8 heads, 32x32 at the top."""
    from diffusers import UNet2DConditionModel

    from models.reference_configs import load_reference_config
    from models.trace import Tracer

    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(load_reference_config("sd15", "unet")).eval()

    class _Tok:  # the real CLIP vocabulary is not available offline: a stand-in with its ids
        model_max_length, eos_token_id, bos_token, eos_token = 77, 49407, "<|startoftext|>", "<|endoftext|>"

        def __call__(self, prompts, **kw):
            ids = torch.full((len(prompts), 77), 49407)
            ids[:, 0], ids[:, 1:4] = 49406, torch.tensor([320, 736, 2866])
            return type("T", (), {"input_ids": ids})()

        def convert_ids_to_tokens(self, ids):
            return [str(i) for i in ids]

    tr = Tracer(unet, _Tok(), prompts=["a red circle"])
    with torch.no_grad(), tr._active():
        unet(torch.randn(1, 4, 32, 32), torch.tensor(500), encoder_hidden_states=torch.randn(1, 77, 768))
    t = tr.trace
    assert len(t.layers) == 16 and t.layers[0].heads == 8
    assert t.probs["down.0.attn.0"].shape == (1, 8, 32, 32, 5)
    assert t.probs["mid.attn.0"].shape == (1, 8, 4, 4, 5)


def test_sdxl_unet_traced_with_transformer_depth():
    """SDXL's UNet (real config, scaled down): stacked transformer blocks get '.t{k}' aliases, all traced."""
    from diffusers import UNet2DConditionModel

    from models.reference_configs import load_reference_config, scaled_config
    from models.trace import Tracer

    torch.manual_seed(0)
    cfg = scaled_config(load_reference_config("sdxl", "unet"), 8)
    unet = UNet2DConditionModel.from_config(cfg).eval()

    class _Tok:
        model_max_length, eos_token_id, bos_token, eos_token = 8, 2, "<s>", "</s>"

        def __call__(self, prompts, **kw):
            return type("T", (), {"input_ids": torch.tensor([[1, 5, 6, 2, 2, 2, 2, 2]] * len(prompts))})()

        def convert_ids_to_tokens(self, ids):
            return [str(i) for i in ids]

    tr = Tracer(unet, _Tok(), prompts=["p"])
    added = {"text_embeds": torch.randn(1, cfg["projection_class_embeddings_input_dim"] - 6 * cfg["addition_time_embed_dim"]),
             "time_ids": torch.zeros(1, 6)}
    with torch.no_grad(), tr._active():
        unet(torch.randn(1, 4, 16, 16), torch.tensor(500), encoder_hidden_states=torch.randn(1, 8, cfg["cross_attention_dim"]),
             added_cond_kwargs=added)
    t = tr.trace
    n_attn2 = sum(1 for n, _ in unet.named_modules() if n.endswith("attn2"))
    assert len(t.layers) == n_attn2 == 70
    assert "mid.attn.0.t9" in t.layer_names and "down.2.attn.1.t9" in t.layer_names
    assert t.probs["down.1.attn.0.t1"].shape == (1, 10, 8, 8, 4)
