"""Tests of models.reference_configs: real SD-1.5 / SD-2.1-base / SDXL configs, random-init pipelines.

Full-size architectures are checked on the meta device (no memory, no init cost); the one test that
materialises a full UNet is marked `slow` (deselect with ``-m "not slow"``).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from models.attention_capture import cross_attention_layers
from models.reference_configs import (
    build_reference_pipeline,
    load_reference_config,
    save_reference_pipeline,
    scaled_config,
)
from models.shapes.vocab import MODEL_MAX_LENGTH, build_clip_tokenizer_files

PIPELINE_ARCHS = ("sd15", "sd21base")


@pytest.fixture(autouse=True)
def _one_thread():
    # tiny models: thread hand-offs cost more than they save, and the machine may be shared
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return build_clip_tokenizer_files(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="module")
def saved_pipelines(tmp_path_factory, tokenizer_dir):
    """arch -> (folder of the saved tiny pipeline, the pipeline object that was saved)."""
    out = {}
    for arch in PIPELINE_ARCHS:
        folder = tmp_path_factory.mktemp(f"{arch}-tiny")
        pipe = build_reference_pipeline(arch, scale="tiny", tokenizer_dir=tokenizer_dir)
        pipe.save_pretrained(folder, safe_serialization=True)
        out[arch] = (folder, pipe)
    return out


def _meta_unet(config: dict) -> UNet2DConditionModel:
    with torch.device("meta"):
        return UNet2DConditionModel.from_config(config)


def _n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _generate(pipe, seed: int = 0) -> np.ndarray:
    return pipe("a red circle", num_inference_steps=2, height=64, width=64, output_type="np",
                generator=torch.Generator().manual_seed(seed)).images


# ------------------------------------------------------------------------------------------------
# The configs carry the real hub values
# ------------------------------------------------------------------------------------------------
def test_sd15_unet_config_has_hub_values():
    cfg = load_reference_config("sd15", "unet")
    assert cfg["cross_attention_dim"] == 768
    assert cfg["attention_head_dim"] == 8
    assert cfg["block_out_channels"] == [320, 640, 1280, 1280]
    assert cfg["down_block_types"] == ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]
    assert cfg["layers_per_block"] == 2
    assert cfg["use_linear_projection"] is False


def test_sd15_text_encoder_config_is_clip_vit_l14():
    cfg = load_reference_config("sd15", "text_encoder")
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["num_attention_heads"]) == (12, 768, 12)
    assert cfg["hidden_act"] == "quick_gelu"
    assert cfg["max_position_embeddings"] == 77


def test_sd21base_unet_config_has_hub_values():
    cfg = load_reference_config("sd21base", "unet")
    assert cfg["attention_head_dim"] == [5, 10, 20, 20]
    assert cfg["use_linear_projection"] is True
    assert cfg["cross_attention_dim"] == 1024
    assert cfg["block_out_channels"] == [320, 640, 1280, 1280]
    assert not cfg.get("upcast_attention", False)  # 2-1-base: no upcast (the 768-v SD-2.1 has it)


def test_sd21base_text_encoder_config_is_openclip_vit_h():
    cfg = load_reference_config("sd21base", "text_encoder")
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["num_attention_heads"]) == (23, 1024, 16)
    assert cfg["hidden_act"] == "gelu"


@pytest.mark.parametrize("arch", PIPELINE_ARCHS)
def test_scheduler_config_is_pndm_scaled_linear_epsilon(arch):
    cfg = load_reference_config(arch, "scheduler")
    assert cfg["_class_name"] == "PNDMScheduler"
    assert (cfg["beta_schedule"], cfg["beta_start"], cfg["beta_end"]) == ("scaled_linear", 0.00085, 0.012)
    assert cfg.get("prediction_type", "epsilon") == "epsilon"


@pytest.mark.parametrize("arch", PIPELINE_ARCHS)
def test_vae_config_is_the_sd_kl_f8_autoencoder(arch):
    cfg = load_reference_config(arch, "vae")
    assert cfg["block_out_channels"] == [128, 256, 512, 512]
    assert cfg["latent_channels"] == 4


def test_sdxl_unet_config_has_hub_values():
    cfg = load_reference_config("sdxl", "unet")
    assert cfg["cross_attention_dim"] == 2048
    assert cfg["transformer_layers_per_block"] == [1, 2, 10]
    assert cfg["attention_head_dim"] == [5, 10, 20]
    assert cfg["addition_embed_type"] == "text_time"
    assert cfg["projection_class_embeddings_input_dim"] == 2816


@pytest.mark.parametrize("arch, n_params", [("sd15", 859_520_964), ("sd21base", 865_910_724),
                                            ("sdxl", 2_567_463_684)])
def test_full_unet_config_builds_the_published_parameter_count(arch, n_params):
    assert _n_params(_meta_unet(load_reference_config(arch, "unet"))) == n_params


def test_load_reference_config_rejects_unknown_arch():
    with pytest.raises(ValueError, match="unknown arch"):
        load_reference_config("sd3", "unet")


def test_load_reference_config_returns_independent_copies():
    load_reference_config("sd15", "unet")["cross_attention_dim"] = 1
    assert load_reference_config("sd15", "unet")["cross_attention_dim"] == 768


# ------------------------------------------------------------------------------------------------
# scaled_config keeps the structure
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch, n_attn2", [("sd15", 16), ("sd21base", 16), ("sdxl", 70)])
def test_tiny_unet_keeps_cross_attention_layers_and_head_counts(arch, n_attn2):
    full = load_reference_config(arch, "unet")
    full_layers = cross_attention_layers(_meta_unet(full))
    tiny_layers = cross_attention_layers(UNet2DConditionModel.from_config(scaled_config(full, 8)))
    assert len(tiny_layers) == n_attn2
    assert [(l.name, l.heads) for l in tiny_layers] == [(l.name, l.heads) for l in full_layers]


def test_scaled_unet_divides_widths_and_keeps_flags():
    full = load_reference_config("sd21base", "unet")
    tiny = scaled_config(full, 8)
    assert tiny["block_out_channels"] == [40, 80, 160, 160]
    assert tiny["cross_attention_dim"] == 128
    for key in ("attention_head_dim", "use_linear_projection", "layers_per_block", "down_block_types",
                "up_block_types"):
        assert tiny[key] == full[key], key


def test_scaled_config_picks_group_count_dividing_every_width():
    tiny = scaled_config(load_reference_config("sd15", "unet"), 8)
    assert tiny["norm_num_groups"] == 8  # gcd(32, 40)
    assert all(c % tiny["norm_num_groups"] == 0 for c in tiny["block_out_channels"])


def test_scaled_config_does_not_modify_its_input():
    cfg = load_reference_config("sd15", "unet")
    scaled_config(cfg, 8)
    assert cfg["block_out_channels"] == [320, 640, 1280, 1280]


def test_scaled_config_rejects_divisor_breaking_head_counts():
    # 320 / 10 = 32 channels cannot hold SD-2.1's 5 heads
    with pytest.raises(ValueError, match="heads"):
        scaled_config(load_reference_config("sd21base", "unet"), 10)


def test_scaled_text_encoder_width_matches_scaled_cross_attention_dim():
    for arch in PIPELINE_ARCHS:
        unet = scaled_config(load_reference_config(arch, "unet"), 8)
        text = scaled_config(load_reference_config(arch, "text_encoder"), 8)
        assert text["hidden_size"] == unet["cross_attention_dim"], arch


def test_tiny_sdxl_unet_forward_with_text_time_conditioning():
    cfg = scaled_config(load_reference_config("sdxl", "unet"), 8)
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(cfg).eval()
    pooled = cfg["projection_class_embeddings_input_dim"] - 6 * cfg["addition_time_embed_dim"]
    cond = {"text_embeds": torch.randn(1, pooled), "time_ids": torch.tensor([[64., 64., 0., 0., 64., 64.]])}
    with torch.no_grad():
        out = unet(torch.randn(1, 4, 8, 8), torch.tensor([500]), encoder_hidden_states=torch.randn(1, 16, 256),
                   added_cond_kwargs=cond).sample
    assert out.shape == (1, 4, 8, 8)
    assert torch.isfinite(out).all()


# ------------------------------------------------------------------------------------------------
# Pipelines
# ------------------------------------------------------------------------------------------------
def test_tiny_sd21base_uses_linear_projections_and_sd15_convolutions(tokenizer_dir):
    sd21 = build_reference_pipeline("sd21base", tokenizer_dir=tokenizer_dir).unet
    sd15 = build_reference_pipeline("sd15", tokenizer_dir=tokenizer_dir).unet
    assert isinstance(sd21.down_blocks[0].attentions[0].proj_in, torch.nn.Linear)
    assert isinstance(sd15.down_blocks[0].attentions[0].proj_in, torch.nn.Conv2d)


def test_text_encoder_is_fitted_to_the_tokenizer(tokenizer_dir):
    pipe = build_reference_pipeline("sd21base", tokenizer_dir=tokenizer_dir)
    cfg, tok = pipe.text_encoder.config, pipe.tokenizer
    assert cfg.vocab_size == len(tok)
    assert cfg.max_position_embeddings == tok.model_max_length == MODEL_MAX_LENGTH
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (tok.bos_token_id, tok.eos_token_id,
                                                                      tok.pad_token_id)
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.hidden_act) == (3, 128, "gelu")  # ceil(23 / 8), 1024 / 8


@pytest.mark.parametrize("arch, width", [("sd15", 96), ("sd21base", 128)])
def test_prompt_embeddings_have_the_unet_cross_attention_width(arch, width, tokenizer_dir):
    pipe = build_reference_pipeline(arch, tokenizer_dir=tokenizer_dir)
    emb, _ = pipe.encode_prompt("a red circle", "cpu", 1, False)
    assert emb.shape == (1, MODEL_MAX_LENGTH, width)
    assert pipe.unet.config.cross_attention_dim == width


def test_build_is_seeded(tokenizer_dir):
    a = build_reference_pipeline("sd15", tokenizer_dir=tokenizer_dir, seed=3).unet.state_dict()
    b = build_reference_pipeline("sd15", tokenizer_dir=tokenizer_dir, seed=3).unet.state_dict()
    c = build_reference_pipeline("sd15", tokenizer_dir=tokenizer_dir, seed=4).unet.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_build_leaves_the_global_rng_untouched(tokenizer_dir):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_reference_pipeline("sd15", tokenizer_dir=tokenizer_dir)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("arch", PIPELINE_ARCHS)
def test_saved_tiny_pipeline_loads_with_from_pretrained_and_generates_finite_64px(arch, saved_pipelines):
    folder, _ = saved_pipelines[arch]
    pipe = StableDiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    image = _generate(pipe)
    assert image.shape == (1, 64, 64, 3)
    assert np.isfinite(image).all()


@pytest.mark.parametrize("arch", PIPELINE_ARCHS)
def test_reloaded_tiny_pipeline_has_the_built_weights(arch, saved_pipelines):
    folder, built = saved_pipelines[arch]
    loaded = StableDiffusionPipeline.from_pretrained(folder)
    for component in ("unet", "vae", "text_encoder"):
        want, got = getattr(built, component).state_dict(), getattr(loaded, component).state_dict()
        assert want.keys() == got.keys(), component
        assert all(torch.equal(want[k], got[k]) for k in want), component


@pytest.mark.parametrize("arch", PIPELINE_ARCHS)
def test_reloaded_tiny_pipeline_reproduces_the_built_one(arch, saved_pipelines):
    folder, built = saved_pipelines[arch]
    loaded = StableDiffusionPipeline.from_pretrained(folder)
    loaded.set_progress_bar_config(disable=True)
    # equal weights, yet not bit-equal outputs: CPU kernels differ with the tensors' memory alignment
    # (fresh allocations vs safetensors-loaded storage), ~1e-7 per UNet call, ~1e-3 after 2 steps + VAE
    np.testing.assert_allclose(_generate(loaded), _generate(built), atol=5e-3, rtol=0)


def test_tiny_pipeline_defaults_to_64px_images(tokenizer_dir):
    pipe = build_reference_pipeline("sd15", tokenizer_dir=tokenizer_dir)
    image = pipe("a red circle", num_inference_steps=2, output_type="np").images
    assert image.shape == (1, 64, 64, 3)


def test_save_reference_pipeline_writes_safetensors(tmp_path, tokenizer_dir):
    folder = save_reference_pipeline("sd15", tmp_path / "sd15", tokenizer_dir=tokenizer_dir)
    for component in ("unet", "vae", "text_encoder"):
        assert list((folder / component).glob("*.safetensors")), component
    assert not list(folder.rglob("*.bin"))


def test_build_reference_pipeline_rejects_unet_only_arch(tokenizer_dir):
    with pytest.raises(ValueError, match="no pipeline"):
        build_reference_pipeline("sdxl", tokenizer_dir=tokenizer_dir)


@pytest.mark.slow
def test_full_sd15_unet_forward_at_32px_latents():
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(load_reference_config("sd15", "unet")).eval()
    assert _n_params(unet) == 859_520_964
    with torch.no_grad():
        out = unet(torch.randn(1, 4, 32, 32), torch.tensor([500]),
                   encoder_hidden_states=torch.randn(1, 77, 768)).sample
    assert out.shape == (1, 4, 32, 32)
    assert torch.isfinite(out).all()
