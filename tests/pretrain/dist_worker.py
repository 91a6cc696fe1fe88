"""``python tests/pretrain/dist_worker.py OUT_DIR KEY=VALUE ...``: ``medfm pretrain`` with probes, for the
multi-process tests (launched by ``accelerate launch`` or directly).

It runs the real entry point (``medfm.pretrain.main.pretrain``) with ``train`` wrapped so that each rank records:
- ``grads0``: the flattened gradients of the first optimizer step after DDP's reduction (DDP only; DeepSpeed keeps
  gradients in its own partitioned buffers);
- ``ema_errors``: per step, max |teacher_after - (m * teacher_before + (1 - m) * student)| over all EMA pairs,
  with the student's parameters read inside the backend's ``gathered`` context, and
  ``ema_sizes``: (student elements seen, teacher elements): under ZeRO-3 a student that was not gathered is empty;
- ``params``: every parameter of the method (the student gathered under ZeRO-3, the EMA modules) after training;
- ``world_size``, ``rank``, ``exit_code``.
Writes ``OUT_DIR/rank{r}.pt``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

import medfm.pretrain.main as entry
from medfm.pretrain.methods.base import at_step

# EMA module -> the module it follows (DINO, MoCo).
EMA_SOURCES = {
    "teacher_backbone": "student_backbone",
    "teacher_head": "student_head",
    "backbone_momentum": "backbone",
    "projection_head_momentum": "projection_head",
}


def flat(module: torch.nn.Module) -> torch.Tensor:
    params = [p.detach().float().reshape(-1) for p in module.parameters()]
    return torch.cat(params) if params else torch.zeros(0)


def main(out: Path, overrides: list[str]) -> int:
    record: dict = {"grads0": None, "ema_errors": [], "ema_sizes": []}
    real_train = entry.train

    def traced_train(**kw):
        accelerator, backend, model = kw["accelerator"], kw["backend"], kw["model"]
        method = accelerator.unwrap_model(model)
        before_step, update = method.before_optimizer_step, method.update_momentum

        def probe_before(step: int) -> None:
            if record["grads0"] is None and backend.name != "deepspeed":
                grads = [p.grad.reshape(-1) for p in model.parameters() if p.grad is not None]
                record["grads0"] = torch.cat(grads).clone()
            before_step(step)

        def probe_update(step: int) -> None:
            m = at_step(method.momentum_schedule, step)
            pairs = [(getattr(method, EMA_SOURCES[name]), getattr(method, name)) for name in method.momentum_modules]
            old = [(flat(student), flat(teacher)) for student, teacher in pairs]
            update(step)
            error, seen, full = 0.0, 0, 0
            for (student, teacher_before), (_, teacher) in zip(old, pairs, strict=True):
                seen, full = seen + student.numel(), full + teacher_before.numel()
                if student.numel() == teacher_before.numel():
                    expected = teacher_before * m + student * (1 - m)
                    error = max(error, float((flat(teacher) - expected).abs().max()))
            record["ema_errors"].append(error)
            record["ema_sizes"].append((seen, full))

        method.before_optimizer_step = probe_before
        if method.momentum_modules:  # SimCLR has none
            method.update_momentum = probe_update
        step = real_train(**kw)
        with backend.gathered(model):
            record["params"] = {k: v.detach().float().clone() for k, v in method.named_parameters()}
        for name in method.momentum_modules:
            for key, value in getattr(method, name).named_parameters():
                record["params"][f"{name}.{key}"] = value.detach().float().clone()
        record["world_size"], record["rank"] = accelerator.num_processes, accelerator.process_index
        return step

    entry.train = traced_train
    code = entry.pretrain(None, overrides)
    record["exit_code"] = code
    rank = record.get("rank", 0)
    out.mkdir(parents=True, exist_ok=True)
    torch.save(record, out / f"rank{rank}.pt")
    return code


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), sys.argv[2:]))
