"""Activation checkpointing only where memory needs it (a fast-path lever, GPU only).

Checkpointing every decoder layer takes the least memory but runs each layer's forward twice. With
memory to spare, every layer left un-checkpointed is recomputation saved (benchmarks/RESULTS.md has
the measured trade-off). The plan is measured, not guessed: the first optimizer step runs
with every layer checkpointed, the second with `probe` fewer, and from their peaks
(torch.cuda.max_memory_allocated) as many layers are left out as fit in `fraction` of the GPU's
memory, or in --memory_budget_gib. Under DDP every rank checkpoints as many layers as the rank with the
least room needs.
"""

from transformers import TrainerCallback

from zhtune.log import logger

from zhtune.models.parts import decoder_layers
from zhtune.train.fast_path import set_checkpointed_layers


def plan_checkpointed_layers(n_layers: int, peak_all: float, peak_probe: float, probe: int, budget: float) -> int:
    """How many of n_layers to checkpoint: peak_all was measured with all of them checkpointed,
    peak_probe with `probe` fewer; leave out as many as `budget` (same unit) allows."""
    per_layer = max((peak_probe - peak_all) / max(probe, 1), 1e-9)
    free = int((budget - peak_all) // per_layer) if budget > peak_all else 0
    return max(0, min(n_layers, n_layers - free))


class CheckpointPlanner(TrainerCallback):
    def __init__(self, model, fraction: float = 0.8, probe: int = 4, memory=None, budget_gib: float | None = None):
        """budget_gib: the peak to stay within (--memory_budget_gib); default `fraction` of the GPU."""
        self.model, self.fraction, self.budget_gib = model, fraction, budget_gib
        self.n_layers = len(decoder_layers(model))
        self.probe = min(probe, self.n_layers)
        self.memory = memory or _CudaMemory()
        self.steps_seen = 0
        self.peak_all = None
        self.chosen = None

    def on_step_begin(self, args, state, control, **kwargs):
        if self.steps_seen == 1 and self.chosen is None:  # the probe step: its own peak
            self.memory.reset_peak()

    def on_step_end(self, args, state, control, **kwargs):
        self.steps_seen += 1
        if self.chosen is not None or self.probe == 0:
            return
        if self.steps_seen == 1:
            self.peak_all = self.memory.peak()
            set_checkpointed_layers(self.model, self.n_layers - self.probe)
            return
        peak_probe = self.memory.peak()
        gib = 2**30
        budget = self.budget_gib * gib if self.budget_gib else self.fraction * self.memory.total()
        keep = plan_checkpointed_layers(self.n_layers, self.peak_all, peak_probe, self.probe, budget)
        self.chosen = _max_over_ranks(keep)
        set_checkpointed_layers(self.model, self.chosen)
        of = "--memory_budget_gib" if self.budget_gib else f"{self.fraction:.0%} of the GPU"
        logger.info(f"fast path: {self.chosen} of {self.n_layers} decoder layers checkpointed from step "
                 f"{state.global_step + 1} on (peak {self.peak_all / gib:.1f} GiB with all, "
                 f"+{(peak_probe - self.peak_all) / self.probe / gib:.2f} GiB per layer left out, "
                 f"budget {budget / gib:.0f} GiB = {of})")


class _CudaMemory:
    def peak(self) -> float:
        import torch
        return float(torch.cuda.max_memory_allocated())

    def reset_peak(self) -> None:
        import torch
        torch.cuda.reset_peak_memory_stats()

    def total(self) -> float:
        import torch
        return float(torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory)


def _max_over_ranks(keep: int) -> int:
    """The most checkpointed layers any rank needs (every rank then fits)."""
    import torch
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()):
        return keep
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    value = torch.tensor([keep], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return int(value.item())
