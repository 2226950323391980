"""Loading pipelines: bundled default, local folders, hub ids offline, devices and dtypes."""
from __future__ import annotations

import pytest
import torch

from models.loading import (BUNDLED_DIR, ModelDefaults, ModelLoadError, load_pipeline, model_defaults,
                            resolve_model_id)


class TestResolve:
    def test_none_is_the_bundled_model(self):
        """None (and 'bundled') resolve to the bundled model's folder."""
        assert resolve_model_id(None) == str(BUNDLED_DIR) == resolve_model_id("bundled")

    def test_hub_ids_pass_through(self):
        """A hub id is handed to from_pretrained unchanged."""
        assert resolve_model_id("stabilityai/stable-diffusion-2-1-base") == "stabilityai/stable-diffusion-2-1-base"


class TestLoad:
    def test_local_folder_loads_in_fp32_on_cpu(self, tiny_pipe_dir):
        """A saved pipeline folder loads on the CPU in fp32 with the progress bar off."""
        pipe = load_pipeline(str(tiny_pipe_dir), device="cpu")
        assert pipe.unet.dtype == torch.float32 and pipe.device.type == "cpu"
        assert isinstance(pipe.discolens_defaults, ModelDefaults)

    def test_cached(self, tiny_pipe_dir):
        """The same arguments give the same pipeline object."""
        assert load_pipeline(str(tiny_pipe_dir), device="cpu") is load_pipeline(str(tiny_pipe_dir), device="cpu")

    def test_unknown_hub_id_offline_is_one_line(self, monkeypatch):
        """An unknown id offline raises ModelLoadError with a one-line message."""
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        with pytest.raises(ModelLoadError) as e:
            load_pipeline("no-such-org/no-such-model-xyz", device="cpu")
        assert "\n" not in str(e.value) and "no-such-org/no-such-model-xyz" in str(e.value)
        # says what would load instead of diffusers' advice to go online, and does not repeat itself
        assert "shapes-v1" in str(e.value) and "local_files_only" not in str(e.value)
        assert str(e.value).count("no-such-org/no-such-model-xyz") == 1

    def test_folder_that_is_not_a_pipeline(self, tmp_path):
        """A folder without model_index.json is refused clearly."""
        with pytest.raises(ModelLoadError, match="not a diffusers pipeline folder"):
            load_pipeline(str(tmp_path), device="cpu")

    def test_bin_only_weights_are_refused(self, tiny_pipe, tmp_path):
        """Only safetensors weights load (a pickle-only folder is an error)."""
        tiny_pipe.save_pretrained(tmp_path / "p", safe_serialization=False)
        with pytest.raises(ModelLoadError):
            load_pipeline(str(tmp_path / "p"), device="cpu")


class TestDefaults:
    def test_discolens_json_sets_defaults(self, tmp_path):
        """A model folder's discolens.json gives its sampling defaults."""
        (tmp_path / "discolens.json").write_text('{"guidance": 2.5, "steps": 20, "size": 64}')
        assert model_defaults(str(tmp_path)) == ModelDefaults(2.5, 20, 64)

    def test_plain_folder_gets_diffusers_defaults(self, tmp_path):
        """Other models keep diffusers' usual guidance 7.5."""
        assert model_defaults(str(tmp_path)).guidance == 7.5
