"""The app served for real: start `python app.py`, call every endpoint with gradio_client, check real outputs."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

PROMPT = "a red circle left of a blue square"


@pytest.fixture(scope="module")
def client(server):
    from gradio_client import Client

    return Client(server, verbose=False)


@pytest.fixture(scope="module")
def png(tmp_path_factory):
    from models.shapes import world

    d = tmp_path_factory.mktemp("served")
    paths = []
    for i, c in enumerate([PROMPT, "a blue square left of a red circle", "a green triangle"]):
        p = d / f"{i}.png"
        world.render(world.scene_from_caption(c, np.random.default_rng(i))).save(p)
        paths.append(str(p))
    return paths


@pytest.mark.slow
class TestServedApp:
    def test_generate_over_http(self, client, tiny_pipe_dir):
        """/generate with keyword parameters returns an image file and one gallery entry per word."""
        img, gallery, *_ = client.predict(prompt="a red circle", model=str(tiny_pipe_dir), seed=0, steps=2,
                                          api_name="/generate")
        assert Path(img).exists() and Image.open(img).size == (256, 256) and len(gallery) == 3

    def test_generate_then_reslice_in_one_session(self, client, tiny_pipe_dir):
        """The session keeps its trace: player, model view, explorer, any word, edit and export answer after it."""
        from models.trace import AttentionTrace

        client.predict(prompt=PROMPT, model=str(tiny_pipe_dir), seed=0, steps=3, api_name="/generate")
        prev, heat, caption = client.predict(word=2, step=1, api_name="/player_frame")
        assert Path(prev).exists() and "step 2 of 3" in caption
        grid = client.predict(word=2, step=0, all_steps=True, api_name="/model_view")
        cells = grid.get("value", grid) if isinstance(grid, dict) else grid  # a Gallery update: value + layout
        assert len(cells) > 1 and cells[0]["caption"].endswith(" h0"), grid
        assert len(client.predict(layer="all", head="all", step="all", api_name="/explore")) == 8
        m, note = client.predict(model=str(tiny_pipe_dir), word="green", api_name="/any_word")
        assert Path(m).exists() and "no new UNet call" in note
        before, after, maps, note = client.predict(model=str(tiny_pipe_dir), word=2, scale=0, box="",
                                                   api_name="/intervene")
        assert Image.open(before).tobytes() != Image.open(after).tobytes() and len(maps) == 8
        files = client.predict(api_name="/export_generation")
        by_name = {Path(f).name: f for f in files}  # downloads land in separate folders: load each by name
        manifest = json.loads(Path(by_name["manifest.json"]).read_text())
        tr = AttentionTrace.load(by_name[manifest["trace"]])
        assert manifest["words"] == PROMPT.split() and tr.n_steps == 3 and set(tr.queries) == set(tr.probs)

    def test_match_rank_images_classify(self, client, tiny_pipe_dir, png):
        """Rankings come back ordered by score, with the plot for LSE; text -> image and zero-shot answer too."""
        from gradio_client import handle_file

        table, plot, cost, about, notes, win, run = client.predict(
            image=handle_file(png[0]), captions_text=f"{PROMPT}\na blue square left of a red circle",
            model=str(tiny_pipe_dir), scorer="lse", timesteps_text="300", api_name="/match")
        scores = [r[2] for r in table["data"]]
        assert [r[0] for r in table["data"]] == [1, 2] and scores == sorted(scores, reverse=True)
        assert plot is not None and plot["type"] == "plotly" and len(win) == len(run) == 8
        gallery, t = client.predict(files=[handle_file(p) for p in png], caption=PROMPT, model=str(tiny_pipe_dir),
                                    scorer="denoise_norm", timesteps_text="300", api_name="/rank_images")
        s = [r[2] for r in t["data"]]
        assert len(gallery) == 3 and s == sorted(s, reverse=True)
        zt, answer = client.predict(image=handle_file(png[0]), template="a {} circle", labels="red, blue",
                                    model=str(tiny_pipe_dir), scorer="lse", timesteps_text="300", api_name="/classify")
        assert len(zt["data"]) == 2 and zt["data"][0][1] in answer
        files = client.predict(api_name="/export_match")
        assert [r["rank"] for r in json.loads(Path(files[0]).read_text())] == [1, 2]

    def test_failures_and_faithfulness(self, client, tiny_pipe_dir):
        """Failures list wrong items (opening one shows both captions' maps); faithfulness shows two galleries."""
        rows, summary = client.predict(model=str(tiny_pipe_dir), bench="comvg", split="test", scorer="lse", n_items=4,
                                       timesteps_text="300", api_name="/failures")
        assert "failures" in summary
        if rows["data"]:
            img, true, wrong, text = client.predict(row=0, model=str(tiny_pipe_dir), api_name="/open_failure")
            assert Path(img).exists() and true and wrong
        image, a, b, table, summary = client.predict(seed=1, kind="single", model_a=str(tiny_pipe_dir),
                                                     model_b=str(tiny_pipe_dir), timestep=300, api_name="/faithfulness")
        assert Path(image).exists() and len(a) == len(b) == len(table["data"]) - 1


# (endpoint, keyword arguments, message): bad input in every field gets one clear line
BAD = [
    ("/generate", {"prompt": ""}, "the prompt is empty"),
    ("/generate", {"prompt": "a red circle " * 100}, "too long"),
    ("/generate", {"prompt": "a photo of a dog"}, "words outside the model's vocabulary: photo, dog"),
    ("/generate", {"seed": 1e20}, "seed must be a whole number"),
    ("/generate", {"seed": -3}, "seed must be a whole number"),
    ("/generate", {"steps": 1000}, "steps must be a whole number in 1..100"),
    ("/generate", {"guidance": -5}, "guidance must be a number in 0..30"),
    ("/generate", {"model": "someone/no-such-model"}, "offline"),
    ("/generate", {"negative_prompt": "a zebra"}, "vocabulary: zebra"),
    ("/match", {"captions_text": "a red circle"}, "ranking needs at least 2 captions"),
    ("/match", {"captions_text": "\n".join(["a red circle"] * 40)}, "at most 32 captions"),
    ("/match", {"timesteps_text": "nan"}, "timestep must be a whole number"),
    ("/classify", {"labels": "red"}, "at least 2 labels"),
    ("/failures", {"n_items": 0}, "number of items"),
]


@pytest.mark.slow
class TestBadInput:
    @pytest.mark.parametrize("endpoint,kw,message", BAD, ids=[f"{e} {list(k)[0]}" for e, k, _ in BAD])
    def test_one_clear_message(self, client, png, endpoint, kw, message):
        """The app answers with the message (as the CLI would) and keeps serving."""
        from gradio_client import handle_file

        if endpoint in ("/match", "/classify"):
            kw = {"image": handle_file(png[0]), **kw}
        with pytest.raises(Exception, match=message.replace("(", r"\(").replace(".", r"\.")):
            client.predict(**kw, api_name=endpoint)

    def test_text_file_named_png(self, client, tmp_path):
        """A text file named .png in Match says it cannot read the image (not a bare 'Error')."""
        from gradio_client import handle_file

        bad = tmp_path / "bad.png"
        bad.write_text("not an image")
        with pytest.raises(Exception, match="cannot read image .*UnidentifiedImageError"):
            client.predict(image=handle_file(str(bad)), api_name="/match")

    def test_huge_upload_is_refused(self, client, tmp_path):
        """A file over the upload limit is refused before it reaches the model."""
        from gradio_client import handle_file

        big = tmp_path / "big.png"
        big.write_bytes(b"\0" * (21 * 2**20))
        with pytest.raises(Exception):
            client.predict(image=handle_file(str(big)), api_name="/match")

    def test_still_serving(self, client, tiny_pipe_dir):
        """After all of that the app still generates."""
        img, gallery, *_ = client.predict(prompt="a red circle", model=str(tiny_pipe_dir), seed=0, steps=2,
                                          api_name="/generate")
        assert Path(img).exists() and len(gallery) == 3
