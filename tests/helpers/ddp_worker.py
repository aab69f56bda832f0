"""A torchrun worker for tests/test_ddp.py, also run as a plain single process.

It first takes one `train_batch` on the first two training videos from a fresh run (under
three ranks one rank has no video of its own), then runs the real `prvr.train.train` with
`train_batch` wrapped to observe, never change, each step. Rank R writes PROBE/rank<R>.json
(per step: global batch size, loss, sha256 of the weights after it) and PROBE/tensors<R>.pt
(the two-video step's loss and gradients, the loop's first gradients, the weights after
every step).

Usage::

    torchrun --standalone --nproc-per-node 3 tests/helpers/ddp_worker.py DATA OUT PROBE k=v ...
"""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

import prvr.train
from prvr.config import load_config


def weight_digest(model: torch.nn.Module) -> str:
    """sha256 of every tensor's bytes, in state_dict order: equal only for identical weights."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def grads_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The gradients left by the last step (DDP's average over ranks)."""
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def two_video_step(data: str, out: Path, overrides: list[str]) -> dict:
    """One step of a fresh run on the first two training videos: its loss and gradients."""
    torch.use_deterministic_algorithms(True, warn_only=True)   # as train() runs it
    run = prvr.train.setup(load_config(None, overrides), data, out, resume=False)
    loss, _ = prvr.train.train_batch(run, run.train_videos[:2], hard=False,
                                     gen=torch.Generator().manual_seed(0))
    if run.live is not None:
        run.live.end()
    return {"loss": loss, "grads": grads_of(run.model)}


def main(data: str, out: str, probe: str, overrides: list[str]) -> None:
    tensors = {"two_videos": two_video_step(data, Path(out) / "two", overrides),
               "first_grads": {}, "weights": []}
    steps: list[dict] = []
    real_train_batch = prvr.train.train_batch

    def observed(step, batch_videos, hard, gen):
        result = real_train_batch(step, batch_videos, hard, gen)
        steps.append({"step": step.state["step"], "videos": len(batch_videos), "loss": result[0],
                      "digest": weight_digest(step.model)})
        tensors["weights"].append({n: t.detach().clone() for n, t in step.model.state_dict().items()})
        if not tensors["first_grads"]:
            tensors["first_grads"] = grads_of(step.model)
        return result

    prvr.train.train_batch = observed
    prvr.train.train(load_config(None, overrides), data, Path(out) / "run", resume=False,
                     progress=False)
    rank = dist.get_rank() if dist.is_initialized() else 0
    Path(probe).mkdir(parents=True, exist_ok=True)
    torch.save(tensors, Path(probe) / f"tensors{rank}.pt")
    (Path(probe) / f"rank{rank}.json").write_text(json.dumps(steps))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:])
