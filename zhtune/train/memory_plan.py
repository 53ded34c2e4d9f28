"""Activation checkpointing only where memory needs it (a fast-path lever, GPU only).

Checkpointing every decoder layer takes the least memory but runs each layer's forward twice. With
memory to spare, every layer left un-checkpointed is recomputation saved (benchmarks/RESULTS.md has
the measured trade-off). The plan is measured, not guessed: the first optimizer step runs
with every layer checkpointed, the second with `probe` fewer, and from their peaks
(torch.cuda.max_memory_allocated) as many layers are left out as fit in `fraction` of the GPU's
memory, or in --memory_budget_gib. Under DDP every rank checkpoints as many layers as the rank with the
least room needs.

Checkpointed layers may also keep their MLP's output (train/recompute.py), which pays far more per byte
than leaving a layer out: on an H200 (Gemma-2-9B, 8192 tokens; benchmarks/RESULTS.md, eleventh session)
all 42 layers checkpointed ran 7,398 tokens/s at 22.27 GiB, and 8,313 at 25.70 GiB with every one keeping
its MLP output (1.12x, same run): 54 MiB a layer plus ~1.2 GiB once, where leaving one layer out costs
1.2 GiB for ~1/42 of the recomputation. So the room goes first to keeping (plus one un-checkpointed
layer's worth for the backward of a keeping layer, which recomputes inside its compiled graph and held about
that much more), then to leaving layers out. The keeping layers are the first ones: their backward runs
last, when the later layers' saved activations are gone.
"""

from transformers import TrainerCallback

from zhtune.log import logger

from zhtune.models.parts import decoder_layers
from zhtune.train.fast_path import set_checkpointed_layers


def plan_checkpointed_layers(n_layers: int, peak_all: float, peak_probe: float, probe: int, budget: float,
                             keep_cost: float = 0.0) -> tuple[int, int]:
    """(how many of n_layers to checkpoint, how many of those keep their MLP output): peak_all was measured
    with all of them checkpointed, peak_probe with `probe` fewer; keep_cost is what one kept MLP output
    takes (0: keep none); all in the unit of `budget`."""
    per_layer = max((peak_probe - peak_all) / max(probe, 1), 1e-9)
    room = budget - peak_all
    if keep_cost <= 0 or room < per_layer + keep_cost:
        free = int(room // per_layer) if room > 0 else 0
        return max(0, min(n_layers, n_layers - free)), 0
    room -= per_layer  # the backward of a keeping layer
    if room < n_layers * keep_cost:
        return n_layers, int(room // keep_cost)
    free = int((room - n_layers * keep_cost) // max(per_layer - keep_cost, 1e-9))
    checkpointed = max(0, n_layers - free)
    return checkpointed, checkpointed


class CheckpointPlanner(TrainerCallback):
    def __init__(self, model, fraction: float = 0.8, probe: int = 4, memory=None, budget_gib: float | None = None,
                 keep_cost: float = 0.0):
        """budget_gib: the peak to stay within (--memory_budget_gib); default `fraction` of the GPU.
        keep_cost: bytes one checkpointed layer's kept MLP output takes (`mlp_output_bytes`; 0: keep none)."""
        self.model, self.fraction, self.budget_gib, self.keep_cost = model, fraction, budget_gib, keep_cost
        self.n_layers = len(decoder_layers(model))
        self.probe = min(probe, self.n_layers)
        self.memory = memory or _CudaMemory()
        self.steps_seen = 0
        self.peak_all = None
        self.chosen = None
        self.keeping = 0

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
        checkpointed, keeping = plan_checkpointed_layers(self.n_layers, self.peak_all, peak_probe, self.probe,
                                                         budget, self.keep_cost)
        self.chosen = _over_ranks(checkpointed, max)
        self.keeping = min(self.chosen, _over_ranks(keeping, min))
        set_checkpointed_layers(self.model, self.chosen, keep_mlp_output=self.keeping)
        of = "--memory_budget_gib" if self.budget_gib else f"{self.fraction:.0%} of the GPU"
        kept = f", the first {self.keeping} keeping their MLP output" if self.keeping else ""
        logger.info(f"fast path: {self.chosen} of {self.n_layers} decoder layers checkpointed{kept} from step "
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


def mlp_output_bytes(model, tokens: int) -> float:
    """What one checkpointed layer's kept MLP output takes for a micro-batch of `tokens` tokens."""
    from zhtune.models.parts import base_model
    base = base_model(model)
    config = getattr(base.config, "text_config", None) or base.config
    return float(tokens * config.hidden_size * base.dtype.itemsize)  # the model's dtype: the layers' outputs


def _over_ranks(count: int, pick) -> int:
    """`pick` (max or min) of count over the ranks: the most checkpointed layers any rank needs, the fewest
    kept MLP outputs any rank has room for (every rank then fits)."""
    import torch
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()):
        return count
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    value = torch.tensor([count], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX if pick is max else dist.ReduceOp.MIN)
    return int(value.item())
