"""What scripts/bench_trainer.py and scripts/bench_boundary_overhead.py share: building the stages on
the device from a cached initialisation, running one setting for W warm-up and N timed steps with
each phase timed by CUDA events, and printing a table."""
from __future__ import annotations

import contextlib
import gc
import statistics
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from resbm import data  # noqa: E402
from resbm.config import ModelConfig  # noqa: E402
from resbm.model import MLP, Attention, initial_value  # noqa: E402
from resbm.optim import OptimConfig  # noqa: E402
from resbm.stages import Stage, run_pipeline  # noqa: E402
from resbm.timing import PhaseTimer, mfu, peak_flops, synchronize  # noqa: E402
from resbm.trainer import LoopSettings, Trainer  # noqa: E402

__all__ = ["PHASES", "Run", "build_stages_on", "device_banner", "format_table", "free_device", "run_setting"]

PHASES = ("data", "fwd_bwd", "grad_mean", "muon", "adamw", "outer")
GIB = 2 ** 30


@dataclass(frozen=True)
class Run:
    """One measured setting: the loop, optimizer implementations and shapes (see bench_trainer's grid)."""

    name: str
    batch: int
    accum: int
    loop: str = "fast"
    """'fast' (resbm.trainer.Trainer) or 'legacy' (the loop before issue 22: a sync per micro-batch)."""
    muon: str = "batched"
    fused_adamw: bool | None = None
    fused_proj: bool = True
    compile: bool = False
    sdpa: str | None = None
    """None: torch's choice of attention kernel; 'cudnn', 'flash' or 'efficient' forces one."""
    outer_every: int = 0
    cuda_only: bool = False
    note: str = ""


def device_banner(dev: torch.device, cfg: ModelConfig) -> str:
    """One paragraph: the device, torch, the FLOP formula and the peak used for MFU."""
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU"
    peak = peak_flops(dev)
    return (f"device {name} | torch {torch.__version__} | model d {cfg.d_model}, {cfg.n_layers} blocks, "
            f"{cfg.n_stages} stages, seq {cfg.seq_len}, {cfg.boundary}/{cfg.boundary_variant}, "
            f"{cfg.matmul_params() / 1e9:.3f}B matmul params\n"
            f"MFU = tokens/s x (6 N + 12 L d T) / peak = tokens/s x {cfg.flops_per_token() / 1e9:.3f} GFLOP / "
            + (f"{peak / 1e12:.0f} TFLOP/s (dense bf16 datasheet peak)" if peak else "n/a (no GPU peak known)"))


def build_stages_on(cfg: ModelConfig, seed: int, dev: torch.device,
                    cache: dict[tuple[str, str, tuple[int, ...]], torch.Tensor]) -> list[Stage]:
    """All stages on `dev` with the weights build_stages(cfg, seed) gives, each value drawn once per
    process on the CPU (cache, pinned on CUDA) and copied to the device for every new build."""
    with torch.device(dev):
        stages = [Stage(cfg, s) for s in range(cfg.n_stages)]
    with torch.no_grad():
        for stage in stages:
            for name, p in stage.named_parameters():
                # a boundary parameter's init depends on the boundary kind (resbm/boundary.py, init_rule)
                key = (cfg.boundary if name.startswith("boundaries.") else "", name, tuple(p.shape))
                if key not in cache:
                    value = initial_value(name, key[2], cfg, seed)
                    cache[key] = value.pin_memory() if dev.type == "cuda" else value
                p.copy_(cache[key], non_blocking=True)
    return stages


def free_device(dev: torch.device) -> None:
    """Release what the last setting left (graphs, caches) and reset the peak-memory counter."""
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)


def _legacy_step(trainer: Trainer, step: int) -> torch.Tensor:
    """The reference loop as it was before issue 22: per micro-batch a pageable copy of the batch and a
    loss read back (two host syncs), backward under autocast, one division per gradient."""
    t, s, dev = trainer.timer, trainer.settings, trainer.device
    assert trainer.opt is not None
    trainer.opt.zero_grad()
    total = 0.0
    for m in range(s.accum):
        with t.phase("data"):
            tokens, targets = data.batch(s.seed, step * s.accum + m, s.batch_size, trainer.cfg.seq_len)
            tokens, targets = tokens.to(dev), targets.to(dev)
        with t.phase("fwd_bwd"), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=s.amp):
            total += run_pipeline(trainer.stages, tokens, targets).loss
    with t.phase("grad_mean"):
        for p in trainer.params:
            if p.grad is not None:
                p.grad.div_(s.accum)
    trainer.opt.set_lr(step)
    with t.phase("muon"):
        trainer.opt.step_part("muon")
    with t.phase("adamw"):
        trainer.opt.step_part("adamw")
    return torch.tensor([total / s.accum])


def _sdpa(kind: str | None) -> contextlib.AbstractContextManager:
    if kind is None:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel
    backend = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
               "efficient": SDPBackend.EFFICIENT_ATTENTION}[kind]
    return sdpa_kernel(backend)


def _step_events(dev: torch.device) -> Callable[[], Any]:
    if dev.type == "cuda":
        def mark() -> Any:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return mark
    return time.perf_counter


def _elapsed(a: Any, b: Any) -> float:
    return a.elapsed_time(b) / 1e3 if hasattr(a, "elapsed_time") else b - a


def run_setting(cfg: ModelConfig, run: Run, dev: torch.device, *, warmup: int, steps: int, seed: int,
                cache: dict, amp: bool, ocfg: OptimConfig | None = None) -> dict[str, Any]:
    """Build the stages, run `warmup` untimed and `steps` timed optimizer steps of `run`; returns the
    measurement, or the error in the record (a failed setting, e.g. OOM or a compile error, frees
    what it held and the caller goes on)."""
    rec: dict[str, Any] = {"run": asdict(run), "config": cfg.to_dict(), "warmup_steps": warmup,
                           "timed_steps": steps, "tokens_per_step": run.batch * run.accum * cfg.seq_len}
    free_device(dev)
    Attention.fused_projections = MLP.fused_projections = run.fused_proj
    try:
        ocfg = ocfg or OptimConfig(total_steps=max(1, warmup + steps), warmup_steps=1)
        rec.update(_measure(cfg, run, dev, warmup, steps, seed, cache, amp, ocfg, rec["tokens_per_step"]))
    except Exception as exc:
        rec["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:160]
        rec["traceback"] = traceback.format_exc(limit=6)
    finally:
        Attention.fused_projections = MLP.fused_projections = True
        if run.compile:
            torch._dynamo.reset()
        rec["peak_gib"] = torch.cuda.max_memory_allocated(dev) / GIB if dev.type == "cuda" else None
        free_device(dev)
    return rec


def _measure(cfg: ModelConfig, run: Run, dev: torch.device, warmup: int, steps: int, seed: int, cache: dict,
             amp: bool, ocfg: OptimConfig, tokens_per_step: int) -> dict[str, Any]:
    t_build = time.perf_counter()
    timer = PhaseTimer(dev)
    settings = LoopSettings(batch_size=run.batch, accum=run.accum, amp=amp, compile=run.compile,
                            outer_every=run.outer_every, outer_lr=0.7, outer_momentum=0.9, muon_impl=run.muon,
                            fused_adamw=run.fused_adamw)
    trainer = Trainer(build_stages_on(cfg, seed, dev, cache), cfg, ocfg, dev, settings, timer=timer)
    out: dict[str, Any] = {"build_s": time.perf_counter() - t_build}
    try:
        step_fn = trainer.step if run.loop == "fast" else (lambda s: _legacy_step(trainer, s))
        mark, losses = _step_events(dev), []
        with _sdpa(run.sdpa):
            t0 = time.perf_counter()
            for s in range(warmup):
                losses.append(step_fn(s))
            synchronize(dev)
            out["warmup_s"] = time.perf_counter() - t0
            timer.reset()
            marks = []
            t0 = time.perf_counter()
            for s in range(warmup, warmup + steps):
                marks.append(mark())
                losses.append(step_fn(s))
            marks.append(mark())
            synchronize(dev)
            wall = time.perf_counter() - t0
        per_step = [_elapsed(a, b) for a, b in zip(marks, marks[1:])]
        out.update(_summary(cfg, dev, tokens_per_step, steps, wall, per_step, timer.totals()))
        out["host_s_per_step"] = {k: v / steps for k, v in timer.host.items()}
        loss_values = torch.stack([x.float().mean() for x in losses]).cpu().tolist()
        out["loss_first"], out["loss_last"] = loss_values[0], loss_values[-1]
        return out
    finally:
        trainer.close()


def _summary(cfg: ModelConfig, dev: torch.device, tokens_per_step: int, steps: int, wall: float,
             per_step: list[float], phases: dict[str, float]) -> dict[str, Any]:
    tps = tokens_per_step * steps / wall
    step_s = wall / steps
    return {
        "wall_s": wall, "step_s": step_s, "step_s_median": statistics.median(per_step),
        "step_s_min": min(per_step), "step_s_max": max(per_step), "tokens_per_s": tps,
        "mfu": mfu(cfg.flops_per_token(), tps, dev),
        "phase_s_per_step": {k: phases.get(k, 0.0) / steps for k in PHASES},
        "other_s_per_step": max(0.0, step_s - sum(phases.values()) / steps),
    }


def format_table(header: list[str], rows: list[list[str]]) -> str:
    """A plain aligned text table."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).rjust(w) if i else str(c).ljust(w)  # noqa: E731
                               for i, (c, w) in enumerate(zip(r, widths)))
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])
