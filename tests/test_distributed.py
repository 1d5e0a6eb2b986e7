"""DistributedDataParallel on CPU: two gloo processes train a tiny U-Net; their weights must stay identical."""
from __future__ import annotations

import csv
import json
import os
import socket

import torch
import torch.multiprocessing as mp

from ctseg.train.data import TrainStream
from ctseg.train.trainer import Trainer
from test_trainer import make_cache, tiny_config

WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, cache_root: str, out: str, dump: str) -> None:
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "LOCAL_RANK": str(rank), "WORLD_SIZE": str(WORLD)})
    torch.set_num_threads(1)
    from ctseg.preprocess.cache import CaseCache

    trainer = Trainer(tiny_config(epochs=2, steps_per_epoch=3), CaseCache(cache_root), ["case00", "case01"],
                      ["case02", "case03"], out, progress=False)
    trainer.fit()
    torch.save(trainer.model.state_dict(), f"{dump}/rank{rank}.pt")


def test_two_gloo_ranks_keep_identical_weights(tmp_path):
    cache = make_cache(tmp_path / "cache", [24, 20, 30, 12])
    out = tmp_path / "run"
    mp.spawn(_worker, args=(_free_port(), str(cache.root), str(out), str(tmp_path)), nprocs=WORLD, join=True)

    w0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    w1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert w0.keys() == w1.keys() and all(torch.equal(w0[k], w1[k]) for k in w0)
    saved = torch.load(out / "model_last.pt", weights_only=True)
    assert all(torch.equal(saved[k], w0[k]) for k in w0)
    info = json.loads((out / "run.json").read_text())
    assert info["status"] == "completed" and info["world_size"] == WORLD and info["val_ids"] == ["case02", "case03"]
    rows = list(csv.DictReader((out / "log.csv").open()))
    assert [r["epoch"] for r in rows] == ["1", "2"]  # one writer: no duplicated rows
    assert all(r["val_dice_kidney"] != "" for r in rows)  # validation split over ranks and gathered

    # each rank draws its own data stream
    cfg = tiny_config()
    streams = [list(TrainStream(cache, ["case02"], cfg, rank=r, start=0, stop=3, augment_here=False))
               for r in range(WORLD)]
    assert not any(torch.equal(a["image"], b["image"]) for a, b in zip(*streams))
