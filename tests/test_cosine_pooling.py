"""Cosine of projected features (Discffusion Table 3): capture, trace, pooling and the matching scorers."""
from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
from PIL import Image

from interp.lse import POOLINGS, lse_score, pool
from interp.tasks.matching import MatchOptions, score_image_captions
from interp.tasks.matching_eval import compare_scorers, evaluate_matching
from models.shapes import benchmarks as bm
from models.attention_capture import ProbeProcessor, capture_cross_attention, cross_attention_layers
from models.unet_pass import encode_image, noised_unet_pass
from models.trace import AttentionTrace, LayerInfo, trace

PROMPTS = ["a red circle left of a blue square", "a green triangle"]
TS = (200, 600)  # two timesteps keep the tiny-pipe runs short


def _unet_inputs(pipe, prompts=PROMPTS, seed=0):
    """Random latent `[B, 4, h, w]`, a timestep and the encoded prompts for one direct UNet call."""
    tok, unet = pipe.tokenizer, pipe.unet
    ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
              return_tensors="pt").input_ids
    with torch.no_grad():
        emb = pipe.text_encoder(ids)[0]
    s = unet.config.sample_size
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(len(prompts), unet.config.in_channels, s, s, generator=g)
    return x, torch.tensor(500), emb, ids


@contextlib.contextmanager
def _attn2_inputs(unet):
    """Forward pre-hooks on every attn2 module recording (hidden_states, encoder_hidden_states) per call."""
    modules = dict(unet.named_modules())
    mods = {l.name: modules[l.name] for l in cross_attention_layers(unet)}
    seen: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {n: [] for n in mods}
    handles = []

    def make(name):
        def hook(module, args, kwargs):
            hs = args[0] if args else kwargs["hidden_states"]
            ehs = args[1] if len(args) > 1 else kwargs["encoder_hidden_states"]
            seen[name].append((hs.detach().clone(), ehs.detach().clone()))
        return hook

    try:
        for n, m in mods.items():
            handles.append(m.register_forward_pre_hook(make(n), with_kwargs=True))
        yield mods, seen
    finally:
        for h in handles:
            h.remove()


def _hand_cosine(attn, hs: torch.Tensor, ehs: torch.Tensor) -> torch.Tensor:
    """cos(to_q(image token), to_k(text token)) per head, by hand: `[batch, heads, queries, keys]`, float64."""
    assert attn.group_norm is None and attn.spatial_norm is None and not attn.norm_cross  # SD cross-attention
    q, k = attn.to_q(hs).double(), attn.to_k(ehs).double()
    b, n, _ = q.shape
    q = q.view(b, n, attn.heads, -1).transpose(1, 2)  # [b, heads, n, d]
    k = k.view(b, k.shape[1], attn.heads, -1).transpose(1, 2)  # [b, heads, m, d]
    return torch.nn.functional.cosine_similarity(q[:, :, :, None, :], k[:, :, None, :, :], dim=-1)


# ----------------------------------------------------------------------------------------------
# Capture
# ----------------------------------------------------------------------------------------------
class TestCapture:
    @pytest.fixture(scope="class")
    def captured(self, tiny_pipe):
        """One UNet call with cosine capture and the attn2 inputs hooked: (modules, inputs, captured maps)."""
        x, t, emb, _ = _unet_inputs(tiny_pipe)
        got: dict[str, torch.Tensor] = {}

        def sink(name, probs, logits, cosine=None):
            got[name] = cosine

        with _attn2_inputs(tiny_pipe.unet) as (mods, seen), torch.no_grad():
            with capture_cross_attention(tiny_pipe.unet, sink, want_cosine=True):
                tiny_pipe.unet(x, t, encoder_hidden_states=emb)
        return mods, seen, got

    def test_cosine_equals_hand_computation(self, captured):
        """Every layer's captured map is cos(to_q(h), to_k(text)) per head, to 1e-3 in fp16."""
        mods, seen, got = captured
        assert set(got) == set(mods)
        for name, attn in mods.items():
            [(hs, ehs)] = seen[name]
            with torch.no_grad():
                want = _hand_cosine(attn, hs, ehs)
            assert got[name].shape == want.shape == (len(PROMPTS), attn.heads, hs.shape[1], ehs.shape[1])
            diff = (got[name].half().double() - want.half().double()).abs().max().item()
            assert diff <= 1e-3, f"{name}: max |captured - hand| = {diff}"

    def test_values_in_range(self, captured):
        """Cosines lie in [-1, 1] and are not constant."""
        for c in captured[2].values():
            assert c.min().item() >= -1.0 and c.max().item() <= 1.0
            assert c.std().item() > 1e-3

    def test_output_unchanged_by_cosine_capture(self, tiny_pipe):
        """The UNet output with cosine capture equals the uncaptured one (<= 1e-5, fp32 CPU)."""
        x, t, emb, _ = _unet_inputs(tiny_pipe)
        with torch.no_grad():
            a = tiny_pipe.unet(x, t, encoder_hidden_states=emb).sample
            with capture_cross_attention(tiny_pipe.unet, lambda n, p, l, cosine=None: None, want_cosine=True):
                b = tiny_pipe.unet(x, t, encoder_hidden_states=emb).sample
        assert (a - b).abs().max().item() <= 1e-5

    def test_three_argument_sinks_still_work(self, tiny_pipe):
        """Without want_cosine, a sink taking (name, probs, logits) only is called as before."""
        x, t, emb, _ = _unet_inputs(tiny_pipe)
        got = []
        with torch.no_grad(), capture_cross_attention(tiny_pipe.unet, lambda n, p, l: got.append(l)):
            tiny_pipe.unet(x, t, encoder_hidden_states=emb)
        assert len(got) == len(cross_attention_layers(tiny_pipe.unet)) and all(l is None for l in got)

    def test_probe_processor_reports_the_same_cosine(self, tiny_pipe, captured):
        """A CaptureProcessor subclass (ProbeProcessor) installed through processor_factory gives the same maps."""
        x, t, emb, _ = _unet_inputs(tiny_pipe)
        got = {}
        with torch.no_grad(), capture_cross_attention(
                tiny_pipe.unet, lambda n, p, l, cosine=None: got.__setitem__(n, cosine),
                processor_factory=ProbeProcessor, want_cosine=True):
            tiny_pipe.unet(x, t, encoder_hidden_states=emb)
        for name, c in captured[2].items():
            torch.testing.assert_close(got[name], c, atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------------------------
# Trace
# ----------------------------------------------------------------------------------------------
class TestTrace:
    @pytest.fixture(scope="class")
    def traced(self, tiny_pipe):
        """Two direct UNet calls traced with cosine=True, attn2 inputs hooked."""
        x, t, emb, ids = _unet_inputs(tiny_pipe)
        with _attn2_inputs(tiny_pipe.unet) as (mods, seen), torch.no_grad():
            with trace(tiny_pipe, prompts=PROMPTS, cosine=True) as tr:
                tiny_pipe.unet(x, t, encoder_hidden_states=emb)
                tiny_pipe.unet(x, torch.tensor(100), encoder_hidden_states=emb)
        return tr.traces, mods, seen

    def test_shape_dtype_and_values(self, tiny_pipe, traced):
        """trace.cosine[alias] is fp16 [steps, heads, h, w, tokens] and equals the hand cosine (real tokens)."""
        traces, mods, seen = traced
        for i, tr in enumerate(traces):
            assert set(tr.cosine) == set(tr.probs)
            for info in tr.layers:
                c = tr.cosine[info.alias]
                assert c.dtype == torch.float16
                assert c.shape == tr.probs[info.alias].shape == (2, info.heads, info.h, info.w, len(tr.tokens))
                for s in range(2):
                    hs, ehs = seen[info.name][s]
                    with torch.no_grad():
                        want = _hand_cosine(mods[info.name], hs, ehs)[i][..., tr.token_index]  # [heads, hw, tokens]
                    got = c[s].reshape(info.heads, info.h * info.w, -1).double()
                    assert (got - want.half().double()).abs().max().item() <= 1e-3

    def test_nbytes_counts_cosine(self, traced):
        """nbytes covers probs and cosine maps."""
        tr = traced[0][0]
        by_dict = sum(t.numel() * t.element_size() for d in (tr.probs, tr.cosine) for t in d.values())
        assert tr.cosine and tr.nbytes() == by_dict

    def test_off_by_default(self, tiny_pipe):
        """Without cosine=True the trace holds no cosine maps."""
        x, t, emb, _ = _unet_inputs(tiny_pipe)
        with torch.no_grad(), trace(tiny_pipe, prompts=PROMPTS) as tr:
            tiny_pipe.unet(x, t, encoder_hidden_states=emb)
        assert tr.trace.cosine == {}

    def test_save_load_round_trip(self, traced, tmp_path):
        """Saved cosine maps load back bit-exact."""
        tr = traced[0][1]
        back = AttentionTrace.load(tr.save(tmp_path / "t.safetensors"))
        assert set(back.cosine) == set(tr.cosine)
        for k, v in tr.cosine.items():
            assert torch.equal(back.cosine[k], v)

    def test_file_without_cosine_loads(self, traced, tmp_path):
        """A file in the older layout (no cosine tensors) still loads, with cosine == {}."""
        from safetensors import safe_open

        tr = traced[0][0]
        old = AttentionTrace(tr.prompt, tr.tokens, tr.token_index, tr.timesteps, tr.layers, tr.heads, tr.probs)
        path = old.save(tmp_path / "old.safetensors")
        with safe_open(str(path), framework="pt") as f:
            assert not any(k.startswith("cosine/") for k in f.keys())
        back = AttentionTrace.load(path)
        assert back.cosine == {} and set(back.probs) == set(tr.probs)


# ----------------------------------------------------------------------------------------------
# Pooling
# ----------------------------------------------------------------------------------------------
def _hand_trace(seed=0, with_cosine=True):
    """4 tokens (BOS, 'red', 'circle', EOS), 3 steps, 2 heads, two layers of different sizes, random maps."""
    g = torch.Generator().manual_seed(seed)
    tokens = ["<|startoftext|>", "red", "circle", "<|endoftext|>"]
    layers = [LayerInfo("down_blocks.0.attentions.0.transformer_blocks.0.attn2", "down.0.attn.0", 2, 4, 4),
              LayerInfo("mid_block.attentions.0.transformer_blocks.0.attn2", "mid.attn.0", 2, 2, 2)]
    probs = {l.alias: torch.rand(3, 2, l.h, l.w, 4, generator=g) for l in layers}
    cosine = {l.alias: torch.rand(3, 2, l.h, l.w, 4, generator=g) * 2 - 1 for l in layers} if with_cosine else {}
    return AttentionTrace("red circle", tokens, [0, 1, 2, 3], [800.0, 500.0, 200.0], layers, None, probs,
                          cosine=cosine)


def _hand_cosine_score(tr: AttentionTrace, cols: list[int]) -> float:
    """Mean over positions and the columns, then over heads, then over (layer, step) cells, by loops."""
    cells = []
    for alias, c in tr.cosine.items():
        a = c.double().numpy()
        for s in range(a.shape[0]):
            per_head = [np.mean([a[s, h, y, x, j] for y in range(a.shape[2]) for x in range(a.shape[3]) for j in cols])
                        for h in range(a.shape[1])]
            cells.append(sum(per_head) / len(per_head))
    return sum(cells) / len(cells)


class TestPooling:
    def test_cosine_is_a_pooling(self):
        """"cosine" is one of POOLINGS (the CLI's choices)."""
        assert "cosine" in POOLINGS

    @pytest.mark.parametrize("tokens, cols", [("words", [1, 2]), ("all", [0, 1, 2, 3])])
    def test_hand_computed_mean(self, tokens, cols):
        """pooling="cosine" is the mean of the cosine maps over positions and selected tokens, heads, layers, steps."""
        tr = _hand_trace()
        b = lse_score(tr, pooling="cosine", tokens=tokens)
        assert b.score == pytest.approx(_hand_cosine_score(tr, cols), abs=1e-12)
        assert b.table.shape == (2, 3) and b.pooling == "cosine" and b.source == "cosine"
        assert b.tokens == [tr.tokens[j] for j in cols]

    def test_reads_cosine_whatever_the_source(self):
        """source="probs" and "logits" give the same cosine score, which is not the mean of the probs."""
        tr = _hand_trace()
        a = lse_score(tr, source="probs", pooling="cosine").score
        assert lse_score(tr, source="logits", pooling="cosine").score == a  # no logits traced: still fine
        assert a != pytest.approx(lse_score(tr, source="probs", pooling="mean").score, abs=1e-6)

    def test_selection_applies(self):
        """layers / steps / heads select the cosine cells as for the other poolings."""
        tr = _hand_trace()
        b = lse_score(tr, pooling="cosine", layers=["mid.attn.0"], steps=[1], heads=[0], tokens="all")
        want = tr.cosine["mid.attn.0"][1, 0].double().mean().item()
        assert b.score == pytest.approx(want, abs=1e-12)

    def test_no_cosine_maps_raise(self):
        """A trace without cosine maps gives a ValueError naming them."""
        with pytest.raises(ValueError, match="cosine"):
            lse_score(_hand_trace(with_cosine=False), pooling="cosine")

    def test_pool_refuses_cosine_on_a_bare_map(self):
        """pool(A, "cosine") is an error: an attention map is never taken for a cosine map."""
        with pytest.raises(ValueError, match="cosine"):
            pool(torch.zeros(2, 3), "cosine")


# ----------------------------------------------------------------------------------------------
# Matching
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def winoground():
    return bm.load_benchmark("winoground")


class TestMatching:
    def test_score_image_captions_equals_lse_score_on_the_pass(self, tiny_pipe, winoground):
        """score_image_captions(pooling="cosine") = lse_score(pooling="cosine") on noised_unet_pass(cosine=True)."""
        it = winoground.items[0]
        image: Image.Image = it.image(0)
        caps = list(it.captions)
        opts = MatchOptions(pooling="cosine", timesteps=TS)
        got = score_image_captions(tiny_pipe, image, caps, opts)
        assert got.pass_result.traces[0].logits == {}  # logits only when an option reads them
        res = noised_unet_pass(tiny_pipe, encode_image(tiny_pipe, image), caps, list(TS), noise_seed=opts.noise_seed,
                               logits=False, cosine=True)
        for c, tr in zip(caps, res.traces):
            want = lse_score(tr, pooling="cosine", layers=opts.layers, tokens=opts.tokens).score
            assert got.by_caption[c] == pytest.approx(want, abs=1e-9)
            assert -1.0 <= want <= 1.0
        assert got.scores[0] != got.scores[1]

    def test_compare_scorers_one_shared_pass(self, tiny_pipe, winoground):
        """lse + cosine in compare_scorers: one UNet call per timestep per image, scores as when run alone."""
        opts = [MatchOptions(pooling="lse", timesteps=TS), MatchOptions(pooling="cosine", timesteps=TS)]
        calls = []
        h = tiny_pipe.unet.register_forward_pre_hook(lambda m, a: calls.append(1))
        try:
            rep = compare_scorers(tiny_pipe, winoground, opts, limit=1, per_item=True)
        finally:
            h.remove()
        n_images = len(winoground.split("test")[0].images)
        assert len(calls) == n_images * len(TS) == rep["shared_pass"]["unet_calls"]
        cos_label = rep["labels"][1]
        assert "cosine" in cos_label
        alone = evaluate_matching(tiny_pipe, winoground, opts[1], limit=1)
        assert np.allclose(rep["results"][cos_label]["items"][0]["scores"], alone["items"][0]["scores"],
                           rtol=1e-6, atol=1e-9)
