"""The bundled model: standard diffusers/transformers classes, loadable like a hub id, small, generating."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from models.shapes import world
from models.attention_capture import cross_attention_layers
from models.loading import BUNDLED_DIR, load_pipeline


@pytest.fixture(scope="module")
def bundled():
    return load_pipeline(device="cpu")


class TestBundledModel:
    def test_loads_with_plain_from_pretrained(self):
        """StableDiffusionPipeline.from_pretrained(folder) loads it with no project code."""
        from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        p = StableDiffusionPipeline.from_pretrained(BUNDLED_DIR, use_safetensors=True)
        assert isinstance(p.unet, UNet2DConditionModel) and isinstance(p.vae, AutoencoderKL)
        assert isinstance(p.text_encoder, CLIPTextModel) and isinstance(p.tokenizer, CLIPTokenizer)
        assert isinstance(p.scheduler, DDIMScheduler)

    def test_size_and_safetensors_only(self):
        """At most 50 MB in all, weights in safetensors only."""
        files = [f for f in Path(BUNDLED_DIR).rglob("*") if f.is_file()]
        assert sum(f.stat().st_size for f in files) <= 50 * 2**20
        assert any(f.suffix == ".safetensors" for f in files)
        assert not any(f.suffix in (".bin", ".pt", ".ckpt", ".pkl") for f in files)

    def test_weight_files_are_sharded_below_20mb(self):
        """The export shards weights (MAX_SHARD) so no file of any bundled model is over 20 MB."""
        models_dir = Path(BUNDLED_DIR).parent
        big = [f for f in models_dir.rglob("*") if f.is_file() and f.stat().st_size > 20 * 2**20]
        assert len(list(models_dir.glob("*/model_index.json"))) >= 2 and not big, big

    def test_architecture(self, bundled):
        """64x64 images -> 16x16x4 latents; cross-attention at >= 2 resolutions plus mid, >= 4 heads each."""
        assert bundled.vae.config.latent_channels == 4 and bundled.unet.config.sample_size == 16
        layers = cross_attention_layers(bundled.unet)
        assert {l.stage for l in layers} >= {"down", "mid", "up"}
        assert len({l.block for l in layers if l.stage == "down"}) >= 2
        assert min(l.heads for l in layers) >= 4

    def test_tokenizer_round_trip(self, bundled):
        """Every world word is one token, and captions decode back to themselves."""
        tok = bundled.tokenizer
        for w in world.WORDS:
            assert len(tok.tokenize(w)) == 1, w
        for cap in ["a small red circle", "a green square above a purple triangle", "three orange triangles"]:
            ids = tok(cap).input_ids
            assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
            assert tok.decode(ids, skip_special_tokens=True).strip() == cap

    def test_short_generation_is_finite_and_64px(self, bundled):
        """Three DDIM steps give a finite 64x64 image."""
        out = bundled("a red circle", num_inference_steps=3, guidance_scale=3.0, output_type="pt",
                      generator=torch.Generator().manual_seed(0)).images
        assert out.shape == (1, 3, 64, 64) and torch.isfinite(out).all()


class TestBundledTrace:
    def test_generation_traced_on_all_layers(self, bundled):
        """A traced generation on the bundled model holds 7 layers x 4 heads x every step."""
        from models.trace import trace

        with trace(bundled) as t:
            bundled("a red circle left of a blue square", num_inference_steps=4, guidance_scale=3.0,
                    generator=torch.Generator().manual_seed(0), output_type="latent")
        tr = t.trace
        assert len(tr.layers) == 7 and tr.probs["up.2.attn.1"].shape == (4, 4, 16, 16, 10)

    def test_word_maps_point_at_their_objects(self, bundled):
        """On held-out renders, color and shape word maps (maps default) peak inside their object."""
        from interp.grounding import pointing_game, word_mask_pairs
        from interp.tasks.grounding_eval import held_out_scenes
        from interp.tasks.matching import word_maps_for_image

        hits = []
        for s in held_out_scenes(6, seed=555):
            words, maps = word_maps_for_image(bundled, world.render(s), s.caption)
            for i, w, cls, mask in word_mask_pairs(s):
                if cls in ("color", "shape"):
                    hits.append(pointing_game(maps[i], mask))
        assert len(hits) >= 12 and sum(hits) / len(hits) >= 0.8


    def test_text_denoiser_color_maps_mark_their_object(self, bundled):
        """The word maps the text denoiser can read (`unet_word_maps`, one prompt of all colors, t = 250): on held-out
        two-object renders, a color word's map is denser on its object than on the other object (of another
        color) for most objects (0.91 on 80 validation scenes, docs/text_diffusion.md)."""
        import numpy as np

        from models.training.text_diffusion import encode_latents, unet_word_maps

        scenes = [s for s in world.sample_dataset(555, 60) if s.kind == "relation"
                  and s.objects[0].color != s.objects[1].color][:12]
        z = encode_latents(bundled, np.stack([np.asarray(world.render(s)) for s in scenes]))
        colors = list(world.COLORS)
        maps = unet_word_maps(bundled, z, 250, [" ".join(colors)], (16, 16))  # [B, 6, 16, 16]
        hits = []
        for s, m in zip(scenes, maps):
            om = torch.from_numpy(world.object_masks(s, 16))
            for k, o in enumerate(s.objects):
                dens = [(m[colors.index(o.color)] * om[j]).sum() / om[j].sum() for j in (k, 1 - k)]
                hits.append(bool(dens[0] > dens[1]))
        assert len(hits) >= 16 and sum(hits) / len(hits) >= 0.75, hits


class TestPlainTwin:
    """shapes-v1-plain: the teaching baseline trained without the token loss, loadable beside the shipped model."""

    PLAIN = BUNDLED_DIR.parent / "shapes-v1-plain"

    def test_twin_differs_only_in_the_loss(self):
        import json

        plain = json.loads((self.PLAIN / "training_state.json").read_text())["config"]
        ship = json.loads((BUNDLED_DIR / "training_state.json").read_text())["config"]
        assert plain["token_loss_weight"] == 0 and ship["token_loss_weight"] > 0
        for k in ("seed", "n_images", "mix", "batch", "lr", "unet_channels", "heads", "text_layers", "text_hidden"):
            assert plain[k] == ship[k], k
        vae = "vae/diffusion_pytorch_model.safetensors"
        assert (self.PLAIN / vae).read_bytes() == (BUNDLED_DIR / vae).read_bytes()

    def test_loads_by_name_and_generates(self):
        pipe = load_pipeline("shapes-v1-plain", device="cpu")
        img = pipe("a red circle", num_inference_steps=2, guidance_scale=3.0, output_type="np").images
        assert img.shape == (1, 64, 64, 3) and torch.isfinite(torch.from_numpy(img)).all()
        size = sum(p.stat().st_size for p in self.PLAIN.rglob("*") if p.is_file())
        assert size <= 50 * 2**20 and not list(self.PLAIN.rglob("*.bin"))


class TestShippedFusedScorer:
    """The shipped stage-2 DPT adapter carries the dpt_fused weight chosen on validation, and the scorer reads
    the bundled model's hard negatives with it (validation: 411 / 411 pairs; docs/dpt.md, session 14)."""

    def test_weight_is_the_validation_choice(self):
        import json

        from models.training.dpt import tuned_dir_for

        chosen = json.loads((Path(__file__).resolve().parent.parent / "docs/measurements/dpt/fuse_validation.json")
                            .read_text())["chosen"]["weight"]
        cfg = json.loads((tuned_dir_for(load_pipeline(device="cpu")) / "config.json").read_text())
        assert cfg["fused_denoise_weight"] == chosen

    def test_reads_validation_hard_negatives(self, bundled):
        import numpy as np

        from interp.scorers import get_scorer
        from models.training import dpt as tdpt

        fused = get_scorer("dpt_fused")
        for scene in world.sample_dataset(tdpt.DPT_SEEDS["validation"], 8, exclude_compositional=False):
            caps = [scene.caption, *world.negatives(scene, np.random.default_rng(0)).values()]
            res = fused.score(bundled, world.render(scene), caps)
            assert res.unet_calls == 1 and res.unet_evals == len(caps)
            assert res.scores[0] > max(res.scores[1:]), (scene.caption, res.scores)
