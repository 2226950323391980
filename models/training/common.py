"""What every training loop here shares: config dataclass fields that carry their CLI flag's help and bounds
(`config_field`), the flags built from such a dataclass and read back with the checks (`add_config_flags`,
`config_from_flags`), the learning-rate schedule, atomic checkpoint saves, a stop-on-signal flag and the CSV loss
log.

    >>> add_config_flags(parser, TrainConfig); cfg = config_from_flags(parser.parse_args(argv), TrainConfig)
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import math
import os
import signal
import time
from pathlib import Path

import torch

__all__ = ["LR_SCHEDULES", "config_field", "check_choice", "add_config_flags", "config_from_flags", "scheduled_lr",
           "atomic_save", "StopOnSignal", "LossLog"]

LR_SCHEDULES = ("constant", "cosine")


def config_field(default, help: str, factory=None, **metadata):
    """A config dataclass field with its CLI flag's help and its bounds (ge / gt / le / lt) or `check`
    (a function raising ValueError) in the field's metadata (`add_config_flags`, `config_from_flags`)."""
    meta = {"help": help, **metadata}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def check_choice(v, choices):
    """ValueError (one line) unless `v` is one of `choices`; else `v` (a `config_field` check)."""
    if v not in choices:
        raise ValueError(f"expected one of {', '.join(choices)}, got {v!r}")
    return v


def scheduled_lr(lr: float, step: int, warmup: int, steps: int, schedule: str = "constant") -> float:
    """The learning rate of optimiser step `step` (0-based): a linear warm-up to `lr` over `warmup` steps (step
    k gets lr * (k + 1) / warmup), then constant, or a cosine that reaches 0 at `steps` ("cosine")."""
    out = lr * min(1.0, (step + 1) / max(warmup, 1))
    if schedule == "cosine" and step >= warmup:
        span = max(1, steps - warmup)
        out *= 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / span)))
    return out


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_config_flags(parser, cls) -> None:
    """One argparse flag per field of a config dataclass (`--unet-steps` for unet_steps), with the help from the
    field's metadata; every flag defaults to None (= keep the dataclass default, shown in the help)."""
    defaults = cls()
    for f in dataclasses.fields(cls):
        base = str(f.type).replace(" | None", "").strip()
        default = getattr(defaults, f.name)
        kw: dict = {"dest": f.name, "default": None,
                    "help": f"{f.metadata.get('help', '')} (default: {default})".strip()}
        if base == "bool":
            kw["action"] = argparse.BooleanOptionalAction  # --flag / --no-flag
        elif base in ("dict", "dict[str, float]"):
            kw.update(nargs="+", metavar="KEY=VALUE")
        elif base.startswith("tuple"):
            kw.update(nargs="+", type=type(default[0]) if default else str)
        else:
            kw["type"] = {"int": int, "float": float}.get(base, str)
        parser.add_argument(_flag(f.name), **kw)


def _key_values(flag: str, items: list[str]) -> dict[str, float]:
    out = {}
    for it in items:
        key, sep, val = it.partition("=")
        try:
            out[key] = float(val)
        except ValueError:
            sep = ""
        if not sep or not key:
            raise ValueError(f"{flag} takes KEY=VALUE items (e.g. count=3); got {it!r}")
    return out


def config_from_flags(namespace, cls):
    """The config of the flags `add_config_flags` added (flags left out keep their defaults), checked against
    the fields' bounds; ValueError naming the flag."""
    cfg = cls()
    for f in dataclasses.fields(cls):
        v = getattr(namespace, f.name, None)
        if v is None:
            continue
        if isinstance(getattr(cfg, f.name), dict) or str(f.type).startswith("dict"):
            v = _key_values(_flag(f.name), v)
        elif isinstance(v, list):
            v = tuple(v)
        setattr(cfg, f.name, v)
    for f in dataclasses.fields(cls):
        v, m, flag = getattr(cfg, f.name), f.metadata, _flag(f.name)
        if v is not None and isinstance(v, (int, float)):
            bounds = [(op, m[op]) for op in ("ge", "gt", "le", "lt") if op in m]
            sym = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}
            ok = {"ge": lambda b: v >= b, "gt": lambda b: v > b, "le": lambda b: v <= b, "lt": lambda b: v < b}
            if not all(ok[op](b) for op, b in bounds) or v != v:
                raise ValueError(f"{flag} must be " + " and ".join(f"{sym[op]} {b}" for op, b in bounds) + f", got {v}")
        if "check" in m:
            try:
                m["check"](v)
            except ValueError as e:
                raise ValueError(f"{flag}: {e}") from None
    return cfg


def atomic_save(obj, path: Path) -> None:
    """torch.save to a temporary file, then rename: an interrupted save never leaves a half-written state."""
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


class StopOnSignal:
    """`with StopOnSignal() as flag:` sets `flag.stop` on SIGTERM / SIGINT (the loop checkpoints and exits);
    the previous handlers are restored on exit."""

    def __init__(self) -> None:
        self.stop = False
        self._old = {}

    def __enter__(self):
        for s in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[s] = signal.signal(s, self._handler)
            except ValueError:  # not in the main thread
                pass
        return self

    def _handler(self, *_):
        self.stop = True

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


class LossLog:
    """Appends (stage, step, time, key, value) rows to a CSV loss log; a resumed run keeps writing the same file
    (the "vae" stage is logged every 10th step)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.new = not path.exists()
        self.f = open(path, "a", newline="")
        self.w = csv.writer(self.f)
        if self.new:
            self.w.writerow(["stage", "step", "time", "key", "value"])

    def __call__(self, stage: str, step: int, values: dict) -> None:
        if step % 10 and stage == "vae":
            return
        t = f"{time.time():.0f}"
        for k, v in values.items():
            self.w.writerow([stage, step, t, k, f"{v:.6g}"])
        self.f.flush()
