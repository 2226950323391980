"""Per-kind rates and exact McNemar tests (against the file's plain row, same prompts and seeds) of
`bench.dpt_eval selfcorr` JSON files.

    python -m bench.selfcorr_summary docs/measurements/dpt/selfcorr_test_x0_base.json [...] [--base FILE]

`--base FILE`: the plain row of FILE (the same split, prompts and seeds) for files run with --skip-base.
`--versus FILE`: compare every row with FILE's plain row instead of the file's own (e.g. the DPT-tuned model's rows
against the base model's plain sampler). `--versus FILE:ROW`: against another row of FILE (e.g. best of 2).
"""
from __future__ import annotations

import json
import sys

from scipy.stats import binomtest

from interp.tasks.generation_eval import eval_prompts


def wilson(k: int, n: int) -> str:
    ci = binomtest(k, n).proportion_ci(method="wilson")
    return f"[{ci.low:.2f}, {ci.high:.2f}]"


def _kinds(d: dict) -> tuple[tuple[str, ...], list[str]]:
    """The kinds of the run and each prompt's kind, in order: eval_prompts(split, n_per_kind) filtered by kind (the
    file stores n, not n_per_kind or the kinds of early runs: the one combination whose size is n)."""
    for per_kind in (100, 60, 40):
        ks = [k for k, _ in eval_prompts(d["split"], per_kind)]
        for want in ((tuple(d["kinds"].split(",")),) if "kinds" in d else
                     (("count",), ("single", "relation"), ("single", "relation", "count"))):
            sel = [k for k in ks if k in want]
            if len(sel) == d["n"] and per_kind * len(want) == d["n"]:
                return tuple(w for w in ("single", "relation", "count") if w in want), sel
    raise ValueError("cannot tell the prompts' kinds")


def summarise(path: str, base_file: str | None = None, versus: str | None = None) -> list[str]:
    d = json.load(open(path))
    settings = d["settings"]
    kinds_wanted, kinds = _kinds(d)
    out = [f"{path} ({d['model']}, split {d['split']}, n {d['n']})"]
    base = settings.get("base") or (json.load(open(base_file))["settings"]["base"] if base_file else None)
    if versus:
        vfile, _, vrow = versus.partition(":")
        other = json.load(open(vfile))
        if (other["split"], other["n"]) != (d["split"], d["n"]):
            raise ValueError(f"{vfile} holds other prompts than {path}")
        base = other["settings"][vrow or "base"]
        out[0] += f"; 'vs plain' is the {vrow or 'plain'} row of {vfile} ({other['model']})"
    for name, v in settings.items():
        for kind in kinds_wanted:
            idx = [i for i, k in enumerate(kinds) if k == kind]
            c = [v["correct"][i] for i in idx]
            line = f"  {name:55s} {kind:8s} {sum(c):3d}/{len(c)} = {sum(c) / len(c):.2f} {wilson(sum(c), len(c))}"
            if base is not None and (name != "base" or versus):
                b = [base["correct"][i] for i in idx]
                fixed = sum(1 for x, y in zip(b, c) if not x and y)
                broke = sum(1 for x, y in zip(b, c) if x and not y)
                p = binomtest(fixed, fixed + broke).pvalue if fixed + broke else 1.0
                line += f"  vs plain: fixed {fixed}, broke {broke}, exact McNemar p = {p:.3f}"
            out.append(line + f"  ({v['unet_calls_per_image']} UNet calls, {v['unet_backwards_per_image']} backwards)")
    return out


if __name__ == "__main__":
    args = sys.argv[1:]
    opts = {}
    for flag in ("--base", "--versus"):
        if flag in args:
            i = args.index(flag)
            opts[flag[2:]] = args[i + 1]
            del args[i:i + 2]
    for p in args:
        print("\n".join(summarise(p, opts.get("base"), opts.get("versus"))))
