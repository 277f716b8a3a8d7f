"""The run's output folder and its JSON-lines log (``log.jsonl``, written by rank 0)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from qdetr_deploy.io import atomic_path, write_json
from qdetr_deploy.train import distributed as D
from qdetr_deploy.train.config import LOG_NAME, TrainConfig


def prepare_output(config: TrainConfig, extra: dict[str, Any], resumed: bool, env: D.DistEnv) -> Path:
    out = Path(config.output_dir)
    if env.is_main:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "config.json", {"train": config.to_dict(), **extra})
        if not resumed and (out / LOG_NAME).exists():
            (out / LOG_NAME).unlink()
    D.barrier()
    return out


class JsonlLog:
    """Append-only JSON-lines log (rank 0); ``truncate(step)`` drops lines written after ``step``."""

    def __init__(self, path: Path, enabled: bool) -> None:
        self.path, self.enabled = path, enabled

    def truncate(self, step: int) -> None:
        if not self.enabled or not self.path.is_file():
            return
        lines = [ln for ln in self.path.read_text().splitlines() if ln.strip()]
        keep = [ln for ln in lines if json.loads(ln).get("step", 0) <= step]
        with atomic_path(self.path) as tmp:
            tmp.write_text("".join(ln + "\n" for ln in keep))

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


_AUX = re.compile(r"_\d+$")


def log_terms(loss: Tensor, terms: dict[str, Any]) -> dict[str, float]:
    """Final-layer terms (aux copies dropped) and the total, averaged over ranks."""
    keys = [k for k in terms if not _AUX.search(k)]

    def scalar(v: Any) -> Tensor:
        return torch.as_tensor(v, dtype=torch.float32, device=loss.device).detach().reshape(())

    values = torch.stack([scalar(loss)] + [scalar(terms[k]) for k in keys])
    values = D.all_reduce_mean(values).tolist()
    return dict(zip(["loss"] + keys, values))
