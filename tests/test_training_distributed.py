"""DistributedDataParallel on two CPU processes (gloo), against one process."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from training import distributed
from training.train_classifier import train_one_epoch

STEPS_PER_EPOCH, EPOCHS, GLOBAL_BATCH = 4, 3, 8


class TinyNet(torch.nn.Module):
    """No batch norm, so two half batches give exactly the full batch's gradient."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv3d(1, 4, 3, stride=2, padding=1)
        self.head = torch.nn.Linear(4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.conv(x)).mean(dim=(2, 3, 4)))


def dataset() -> TensorDataset:
    rng = np.random.default_rng(0)
    n = STEPS_PER_EPOCH * GLOBAL_BATCH
    y = (np.arange(n) % 2).astype(np.float32)
    x = rng.normal(0.0, 1.0, (n, 1, 8, 8, 8)).astype(np.float32) + y[:, None, None, None, None]
    return TensorDataset(torch.from_numpy(x), torch.from_numpy(y)[:, None])


def train(info: distributed.DistInfo, on_step) -> list[float]:
    torch.manual_seed(0)
    model = distributed.wrap(TinyNet(), info)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    data = dataset()
    sampler = DistributedSampler(data, info.world_size, info.rank, shuffle=False)
    loader = DataLoader(data, batch_size=GLOBAL_BATCH // info.world_size, sampler=sampler)
    losses = []
    for _ in range(EPOCHS):
        for loss in train_one_epoch(model, loader, optimizer, info.device,
                                    on_step=lambda s, l: on_step(model), show=False):
            losses.append(distributed.mean_over_ranks(loss, info))
    return losses


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    info = distributed.init()
    mismatches = []

    def compare(model) -> None:
        flat = torch.cat([p.detach().flatten() for p in model.parameters()])
        gathered = [torch.zeros_like(flat) for _ in range(2)]
        dist.all_gather(gathered, flat)
        mismatches.append(float((gathered[0] - gathered[1]).abs().max()))

    losses = train(info, compare)
    if rank == 0:
        Path(out).write_text(json.dumps({"losses": losses, "mismatches": mismatches}))
    distributed.close(info)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_processes_stay_identical_and_learn_like_one(tmp_path):
    out = tmp_path / "rank0.json"
    mp.spawn(_worker, args=(_free_port(), str(out)), nprocs=2, join=True)
    result = json.loads(out.read_text())
    assert len(result["mismatches"]) == STEPS_PER_EPOCH * EPOCHS
    assert max(result["mismatches"]) == 0.0  # identical after every step

    single = train(distributed.init(torch.device("cpu")), lambda model: None)
    assert result["losses"][-1] < 0.7 * result["losses"][0]
    np.testing.assert_allclose(result["losses"], single, rtol=1e-4, atol=1e-5)


def test_single_process_needs_no_process_group():
    info = distributed.init(torch.device("cpu"))
    assert (info.rank, info.world_size, info.is_main) == (0, 1, True)
    model = TinyNet()
    assert distributed.wrap(model, info) is model
    assert distributed.mean_over_ranks(2.5, info) == pytest.approx(2.5)


def test_documented_torchrun_commands_reach_the_trainer_whole():
    """torchrun parses the README's and docstrings' commands as meant: its options
    stop at ``--`` and every trainer option (``--run`` above all) reaches the trainer."""
    import re
    import shlex

    from torch.distributed.run import get_args_parser

    root = Path(__file__).resolve().parents[1]
    texts = [root / "README.md", root / "training" / "distributed.py",
             root / "training" / "train_classifier.py"]
    commands = [line.strip() for path in texts for line in path.read_text().splitlines()
                if re.match(r"\s*torchrun .*training\.train_classifier", line)]
    assert len(commands) >= 3
    for command in commands:
        args = get_args_parser().parse_args(shlex.split(command)[1:])
        assert args.module and args.training_script == "training.train_classifier"
        assert args.training_script_args[:2] == ["--config", "densenet121_paper"]
        assert "--run" in args.training_script_args
