"""The Discffusion report: experiment lists, shared passes that agree with single runs, markdown, CLI errors."""
from __future__ import annotations

import json

import pytest

import cli
from interp.tasks import matching_report as mr
from interp.tasks.matching import MatchOptions
from interp.tasks.matching_eval import evaluate_matching
from models.shapes import benchmarks as bm


@pytest.fixture(scope="module")
def wino(tmp_path_factory):
    return bm.build_benchmark("winoground", tmp_path_factory.mktemp("bench") / "winoground", n=20)


class TestExperiments:
    def test_noise_levels_map_to_timesteps(self):
        """Noise level l -> round(l * T), clipped to T - 1; levels outside (0, 1) are refused."""
        assert mr.noise_level_timesteps([0.2, 0.5, 0.9995], 1000) == (200, 500, 999)
        assert mr.noise_level_timesteps([0.25], 100) == (25,)
        for bad in (0.0, 1.0, -0.1):
            with pytest.raises(ValueError, match="noise levels"):
                mr.noise_level_timesteps([bad])

    def test_schedule_is_noisiest_first_and_leaves_scheduler_alone(self, tiny_pipe):
        """An n-step schedule of the pipeline's scheduler, in sampling order; the pipe's scheduler is untouched."""
        before = None if tiny_pipe.scheduler.timesteps is None else list(tiny_pipe.scheduler.timesteps)
        ts = mr.schedule_timesteps(tiny_pipe.scheduler, 5)
        assert len(ts) == 5 and list(ts) == sorted(ts, reverse=True)
        after = None if tiny_pipe.scheduler.timesteps is None else list(tiny_pipe.scheduler.timesteps)
        assert before == after
        with pytest.raises(ValueError):
            mr.schedule_timesteps(tiny_pipe.scheduler, 0)

    def test_groups_build_their_variations(self):
        """Each group varies what it names around the base options."""
        base = MatchOptions(timesteps=(300, 600))
        ex = mr.experiments(["pooling", "layers", "schedule", "prompt"], base, schedule=(900, 500, 100))
        pools = [e.options.pooling for e in ex if e.group == "pooling" and e.options.source == base.source]
        assert pools == list(mr.POOLINGS)
        assert [e.options.layers for e in ex if e.group == "layers"] == [None, "last_per_stage"]
        sched = [e for e in ex if e.group == "schedule"]
        assert [e.options.timesteps for e in sched] == [(900, 500, 100), (900,), (100,), (900, 500, 100)]
        assert sched[-1].options.scorer == "denoise"
        assert [(e.prompt, e.margin) for e in ex if e.group == "prompt"] == [(None, 0.2), ("additive", 0.2), ("lora", 0.1)]
        with pytest.raises(ValueError, match="unknown report group"):
            mr.experiments(["tables"], base, schedule=(1,))


class TestRun:
    def test_shared_pass_rows_equal_single_runs(self, tiny_pipe, wino):
        """Rows from the shared pass equal evaluate_matching with the same options, one UNet eval per timestep."""
        base = MatchOptions(timesteps=(300, 700))
        rows = mr.run_report(tiny_pipe, [str(wino)], ["layers", "noise"], base, limit=3)
        assert [r["group"] for r in rows] == ["layers"] * 2 + ["noise"] * 5
        last = next(r for r in rows if r["label"] == "last layer of each stage")
        single = evaluate_matching(tiny_pipe, wino, MatchOptions(timesteps=(300, 700), layers="last_per_stage"),
                                   limit=3, per_item=False)
        assert last["metrics"] == single["metrics"] and last["unet_evals_per_pair"] == 2
        alone = [r for r in rows if r["label"].startswith("level")]
        assert [r["unet_evals_per_pair"] for r in alone] == [1, 1, 1, 1]
        assert all(r["benchmark"] == "winoground" and r["primary"] == "group_score" for r in rows)

    def test_scorer_hooks_and_prompts_run(self, tiny_pipe, wino):
        """Structure, routed, head-weighted and few-shot rows run and report their own costs and prompt losses."""
        rows = mr.run_report(tiny_pipe, [str(wino)], ["scorers", "heads", "prompt"], MatchOptions(timesteps=(400,)),
                             limit=1, prompt_steps=2)
        labels = [r["label"] for r in rows]
        assert len(labels) == 6 + 2 + 3
        norm = next(r for r in rows if "normalised" in r["label"])
        assert norm["unet_evals_per_pair"] == pytest.approx(1.5)  # 2 captions + the "" row per call
        few = [r for r in rows if r["label"].startswith("few-shot")]
        assert all(len(r["prompt_loss"]) == 2 for r in few)
        # prompts are removed again: zero-shot after the prompts scores as before
        again = evaluate_matching(tiny_pipe, wino, MatchOptions(timesteps=(400,)), limit=1, per_item=False)
        zero = next(r for r in rows if r["label"] == "zero-shot")
        assert zero["metrics"] == again["metrics"]

    def test_scorer_rows_share_the_pass_and_equal_their_own_runs(self, tiny_pipe, wino):
        """Structure and routed rows, scored from the group's one shared pass, equal each scorer's own run."""
        base = MatchOptions(timesteps=(300, 700))
        rows = mr.run_report(tiny_pipe, [str(wino)], ["scorers"], base, limit=3)
        for scorer, label in (("structure", "structure-aware (binding + relation)"),
                              ("auto", "routed: structure if same content words, else DC")):
            row = next(r for r in rows if r["label"] == label)
            own = evaluate_matching(tiny_pipe, wino, base, limit=3, per_item=True, scorer=scorer)
            assert row["metrics"] == own["metrics"], scorer
            assert row["outcomes"] == [bool(it["group"]) for it in own["items"]]

    def test_authors_group_varies_the_authors_score(self):
        """Group "authors": the exact score at the authors' 30 timesteps first, then one change per row."""
        from interp.scorers.discffusion import authors_timesteps
        ex = mr.experiments(["authors"], MatchOptions(), schedule=(1,))
        ats = authors_timesteps()
        first = ex[0]
        assert first.options.scorer == "discffusion" and first.options.timesteps == ats and first.scorer_args == ()
        assert first.options.layers is None and first.options.pooling == "lse" and first.options.source == "logits"
        alone = [e for e in ex if e.scorer_args == (("bias", False),)]
        assert len(alone) >= 2 and "attention term alone" in alone[0].label
        assert {e.options.layers for e in ex} == {None, "all"}
        singles = sorted(e.options.timesteps for e in ex if len(e.options.timesteps) == 1)
        assert singles == sorted([(ats[0],), (ats[-1],), (200,), (400,), (600,), (800,)])
        assert all(e.options.scorer == "discffusion" for e in ex)

    def test_authors_rows_equal_the_scorer_run_alone(self, tiny_pipe, wino):
        """The authors' rows (one shared padded pass) equal DiscffusionScorer run alone, with and without the
        denoising term; "all" layers reads every cross-attention layer."""
        from interp.scorers.discffusion import DiscffusionScorer
        rows = mr.run_report(tiny_pipe, [str(wino)], ["authors"], limit=2)
        ex = mr.experiments(["authors"], MatchOptions(), schedule=(1,),
                            num_train_timesteps=tiny_pipe.scheduler.config.num_train_timesteps)
        assert [r["label"] for r in rows] == [e.label for e in ex]
        for i in (0, 1):
            own = evaluate_matching(tiny_pipe, wino, ex[i].options, limit=2, per_item=True,
                                    scorer=DiscffusionScorer(bias=not ex[i].scorer_args))
            assert rows[i]["metrics"] == own["metrics"], rows[i]["label"]
        assert rows[0]["unet_evals_per_pair"] == pytest.approx(len(ex[0].options.timesteps) * 1.5)

    def test_base_must_be_lse(self, tiny_pipe, wino):
        with pytest.raises(ValueError, match="scorer='lse'"):
            mr.run_report(tiny_pipe, [str(wino)], ["layers"], MatchOptions(scorer="denoise"))


class TestMarkdown:
    def test_tables_hold_every_row(self):
        """One table per group, one line per experiment, a chance line; per-split table for the scorers group."""
        def row(group, label, bench, value, by_type=None):
            key = mr.PRIMARY[bench]
            return {"group": group, "label": label, "benchmark": bench, "primary": key, "value": value,
                    "metrics": {key: value}, "chance": {key: 0.5}, "by_type": by_type or {},
                    "unet_evals_per_pair": 4.0}

        rows = [row("scorers", "LSE", "comvg", 0.61, {"subject": {"accuracy": 0.7, "n": 10}}),
                row("scorers", "DC", "comvg", 0.55, {"subject": {"accuracy": 0.4, "n": 10}}),
                row("layers", "all layers", "comvg", 0.66), row("layers", "all layers", "counting", 0.52)]
        md = mr.report_markdown(rows, command="python cli.py report-matching")
        assert "## scorers" in md and "## layers" in md and "`python cli.py report-matching`" in md
        assert "| LSE | 0.61 (4.0) |" in md and "| all layers | 0.66 (4.0) | 0.52 (4.0) |" in md
        assert "| LSE | 0.70 |" in md and "| DC | 0.40 |" in md and "subject (n=10)" in md
        assert md.count("| chance |") == 2


class TestCli:
    def _run(self, capsys, *argv):
        code = cli.main([str(a) for a in argv])
        out, err = capsys.readouterr()
        return code, out, err

    @pytest.mark.parametrize("args,match", [
        (["--groups", "tables"], "unknown --groups"),
        (["--benchmarks", "nope"], "nope"),
        (["--limit", "0"], "--limit"),
        (["--scorer", "denoise"], "leave --scorer"),
    ])
    def test_bad_inputs(self, capsys, args, match):
        code, _, err = self._run(capsys, "report-matching", *args)
        assert code == 2 and match in err and err.count("\n") == 1

    def test_noise_level_flags(self, capsys, tiny_pipe_dir):
        """--noise-levels out of range, or together with --timesteps: exit 2 with one line."""
        for extra, match in ((["--noise-levels", 1.5], "between 0 and 1"),
                             (["--noise-levels", 0.2, "--timesteps", 200], "not both")):
            code, _, err = self._run(capsys, "eval-matching", "--benchmark", "counting", "--model", tiny_pipe_dir, *extra)
            assert code == 2 and match in err and err.count("\n") == 1

    def test_report_writes_json_and_markdown(self, capsys, tiny_pipe_dir, wino, tmp_path):
        code, out, _ = self._run(capsys, "report-matching", "--benchmarks", wino, "--groups", "layers", "--limit", 1,
                                 "--timesteps", 500, "--model", tiny_pipe_dir, "--out", tmp_path / "rep", "--json")
        assert code == 0
        rows = json.loads(out)["rows"]
        assert [r["label"] for r in rows] == ["all layers", "last layer of each stage"]
        saved = json.loads((tmp_path / "rep" / "report.json").read_text())
        assert saved["rows"] == rows
        assert "| all layers |" in (tmp_path / "rep" / "report.md").read_text()


class TestRigor:
    def test_rows_hold_n_intervals_and_outcomes(self, tiny_pipe, wino):
        """Every row holds n, per-item outcomes that give its value, and a Wilson interval around it."""
        rows = mr.run_report(tiny_pipe, [str(wino)], ["layers"], MatchOptions(timesteps=(400,)), limit=6)
        for r in rows:
            assert r["n"] == 6 == len(r["outcomes"])
            assert r["value"] == pytest.approx(sum(r["outcomes"]) / 6)
            lo, hi = r["ci95"]
            assert 0 <= lo <= r["value"] <= hi <= 1
        assert "paired" not in rows[0] and rows[1]["paired"]["vs"] == rows[0]["label"]
        assert 0 <= rows[1]["paired"]["p"] <= 1

    def test_paired_test_counts_discordant_items(self):
        """McNemar against the group's first row: better / worse are the items only one of them gets right."""
        def row(label, outcomes, seed=0):
            return {"group": "g", "benchmark": "b", "label": label, "outcomes": outcomes, "noise_seed": seed}

        rows = mr.add_paired_tests([row("ref", [True, False, False, True]), row("x", [True, True, True, False]),
                                    row("ref", [True] * 4, seed=1), row("x", [True] * 4, seed=1)])
        assert rows[1]["paired"]["better"] == 2 and rows[1]["paired"]["worse"] == 1
        assert rows[3]["paired"]["p"] == 1.0 and "paired" not in rows[2]

    def test_noise_seeds_repeat_every_experiment(self, tiny_pipe, wino):
        """Each noise seed gives its own rows; the markdown shows the mean and the per-seed range."""
        rows = mr.run_report(tiny_pipe, [str(wino)], ["layers"], MatchOptions(timesteps=(400,)), limit=3,
                             noise_seeds=(0, 1))
        assert [r["noise_seed"] for r in rows] == [0, 0, 1, 1]
        md = mr.report_markdown(rows)
        assert "2 noise seeds [0, 1]" in md and "–" in md


class TestClaims:
    @staticmethod
    def _pair(ref, this, expect, seed=0, label="x"):
        rows = [{"group": "g", "benchmark": "comvg", "label": "ref", "outcomes": ref, "noise_seed": seed,
                 "value": sum(ref) / len(ref), "expect": None},
                {"group": "g", "benchmark": "comvg", "label": label, "outcomes": this, "noise_seed": seed,
                 "value": sum(this) / len(this), "expect": expect}]
        return mr.add_paired_tests(rows)

    def test_verdict_follows_the_paired_test_and_the_expected_side(self):
        """12 items only the reference gets right: p < 0.05 -> "holds" when the paper expects the reference to
        win, "reversed" when it expects this row to; 1 discordant item -> "n.s."; no claim -> None."""
        ref, worse = [True] * 12 + [False] * 8, [False] * 12 + [False] * 8
        assert mr.verdict(self._pair(ref, worse, "first")[1]) == "holds"
        assert mr.verdict(self._pair(ref, worse, "this")[1]) == "reversed"
        assert mr.verdict(self._pair(worse, ref, "this")[1]) == "holds"
        one = [True] + [False] * 19
        assert mr.verdict(self._pair(one, [False] * 20, "first")[1]) == "n.s."
        assert mr.verdict(self._pair(ref, worse, None)[1]) is None
        assert mr.verdict(self._pair(ref, worse, "first")[0]) is None  # the reference row has no test

    def test_claims_table_names_each_seed_verdict_and_the_model(self):
        ref, worse = [True] * 12 + [False] * 8, [False] * 20
        rows = self._pair(ref, worse, "first") + self._pair(ref, ref, "first", seed=1)
        for r in rows:
            r.update(primary="accuracy", metrics={"accuracy": r["value"]}, chance={"accuracy": 0.5},
                     unet_evals_per_pair=4.0)
        md = mr.report_markdown(rows, model="bundled", unet_step=6250)
        assert "UNet step 6250" in md and "## The paper's claims, verdicts" in md
        line = next(l for l in md.splitlines() if l.startswith("| g | ref vs x"))
        assert "0.60 vs 0.30" in line and "holds 1/2" in line and "n.s. 1/2" in line and "(first wins)" in line
        assert mr.claims_markdown([dict(r, expect=None) for r in rows]) == []


class TestFromJson:
    def _run(self, capsys, *argv):
        code = cli.main([str(a) for a in argv])
        out, err = capsys.readouterr()
        return code, out, err

    def _write(self, path, rows, model="bundled", step=6250, command="python cli.py report-matching --groups g"):
        path.write_text(json.dumps({"command": command, "model": model, "unet_step": step, "rows": rows}))
        return path

    def test_renders_several_runs_as_one_report(self, capsys, tmp_path):
        rows = TestClaims._pair([True] * 12 + [False] * 8, [False] * 20, "first")
        for r in rows:
            r.update(primary="accuracy", metrics={"accuracy": r["value"]}, chance={"accuracy": 0.5},
                     unet_evals_per_pair=4.0)
        a = self._write(tmp_path / "a.json", rows[:1])
        b = self._write(tmp_path / "b.json", rows[1:], command="python cli.py report-matching --groups h")
        code, out, _ = self._run(capsys, "report-matching", "--from-json", a, b, "--out", tmp_path / "all")
        assert code == 0
        saved = json.loads((tmp_path / "all" / "report.json").read_text())
        assert saved["unet_step"] == 6250 and len(saved["rows"]) == 2
        assert saved["commands"][:2] == ["python cli.py report-matching --groups g", "python cli.py report-matching --groups h"]
        md = (tmp_path / "all" / "report.md").read_text()
        assert "--groups g" in md and "--groups h" in md and "holds" in md

    def test_refuses_bad_files(self, capsys, tmp_path):
        row = {"group": "g", "label": "x", "benchmark": "comvg", "noise_seed": 0}
        a = self._write(tmp_path / "a.json", [row])
        other = self._write(tmp_path / "o.json", [dict(row, label="y")], step=1807)
        bad = tmp_path / "bad.json"
        bad.write_text("{not json")
        for files, match in (([tmp_path / "missing.json"], "no such file"), ([bad], "not a readable JSON"),
                             ([a, a], "in two files"), ([a, other], "different models")):
            code, _, err = self._run(capsys, "report-matching", "--from-json", *files)
            assert code == 2 and match in err and err.count("\n") == 1, (match, err)


class TestPairs:
    def test_pairs_across_groups_and_refusals(self, capsys, tmp_path):
        """--pair tests two rows of different groups on the same items; an unknown label or --pair without
        --from-json is one line and exit 2."""
        a = {"group": "g1", "label": "A", "benchmark": "comvg", "noise_seed": 0, "value": 0.6,
             "outcomes": [True] * 12 + [False] * 8}
        b = {"group": "g2", "label": "B", "benchmark": "comvg", "noise_seed": 0, "value": 0.0, "outcomes": [False] * 20}
        lines = mr.pairs_markdown([a, b], [("A", "B")])
        row = next(l for l in lines if l.startswith("| A vs B"))
        assert "0.60 vs 0.00, +0/-12, p=0.00049" in row
        with pytest.raises(ValueError, match="no report row is labelled 'C'"):
            mr.pairs_markdown([a, b], [("A", "C")])
        for r in (a, b):
            r.update(primary="accuracy", metrics={"accuracy": r["value"]}, chance={"accuracy": 0.5},
                     unet_evals_per_pair=4.0)
        f = tmp_path / "r.json"
        f.write_text(json.dumps({"command": "c", "model": "m", "unet_step": 1, "rows": [a, b]}))
        assert cli.main(["report-matching", "--from-json", str(f), "--pair", "A", "B"]) == 0
        assert "+0/-12" in capsys.readouterr().out
        for argv, match in ((["--from-json", str(f), "--pair", "A", "Z"], "labelled 'Z'"),
                            (["--pair", "A", "B"], "--pair works on saved rows")):
            assert cli.main(["report-matching", *argv]) == 2
            err = capsys.readouterr().err
            assert match in err and err.count("\n") == 1
