"""Train the DPT adapter on the bundled model (stage 1; `--lora-rank 4` for stage 2), resumable.

    nohup nice -n 10 env OMP_NUM_THREADS=1 python -m bench.dpt_train --work ~/.cache/discolens/dpt/s1 \
        --steps 3000 > /tmp/dpt_train.log 2>&1 &
"""
from __future__ import annotations

import argparse

import torch

from models import load_pipeline
from models.training.dpt import DPTTrainConfig, train_dpt


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", required=True)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--blocks", default="up_blocks.1")
    ap.add_argument("--t", type=int, default=250)
    ap.add_argument("--lora-rank", type=int, default=0)
    ap.add_argument("--snapshot-every", type=int, default=250)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--init-from", default=None)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    pipe = load_pipeline(device="cpu")
    cfg = DPTTrainConfig(steps=a.steps, batch=a.batch, blocks=tuple(a.blocks.split(",")), t=a.t,
                         lora_rank=a.lora_rank, snapshot_every=a.snapshot_every)
    train_dpt(pipe, cfg, a.work, init_from=a.init_from)


if __name__ == "__main__":
    main()
