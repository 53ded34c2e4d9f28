"""Activation checkpointing only where memory needs it (a fast-path lever, GPU only).

Checkpointing every decoder layer takes the least memory but runs each layer's forward twice. With
memory to spare, every layer left un-checkpointed is recomputation saved (benchmarks/RESULTS.md has
the measured trade-off). The plan is measured, not guessed: the first optimizer step runs
with every layer checkpointed, the second with one fewer (when the first left room), and from their peaks
(torch.cuda.max_memory_allocated) as many layers are left out as fit in `fraction` of the GPU's
memory, or in --memory_budget_gib. Under DDP every rank checkpoints as many layers as the rank with the
least room needs. The probe step itself may pass the budget by less than one layer's worth (+1.2-1.4 GiB for
Gemma-2-9B at 8192 tokens) when the first step left less room than that; none is run when it left none.

Checkpointed layers may also keep their MLP's output (train/recompute.py), which pays far more per byte
than leaving a layer out: on an H200 (Gemma-2-9B, 8192 tokens; benchmarks/RESULTS.md, eleventh session)
all 42 layers checkpointed ran 7,398 tokens/s at 22.27 GiB, and 8,313 at 25.70 GiB with every one keeping
its MLP output (1.12x, same run; 1.04x on the twelfth session's machine, 8,213 against 8,540), where leaving
one layer out costs 1.2 GiB for ~1/42 of the recomputation.
So the room goes first to keeping, then to leaving layers out. The keeping layers are the first ones. What
they cost was measured (twelfth session, the first k of 42 keeping: k = 9, 24, 25, 28, 42 peaked 0.49,
1.50, 1.61, 1.93, 3.43 GiB above all-checkpointed): each kept output (the size of the layer's input, which
the checkpoint saves too), plus, during a keeping layer's backward (it recomputes inside its compiled graph),
about one un-checkpointed layer's worth more, less the saved inputs of the later layers, whose backward has
run by then (`keeping_peak`: within 0.08 GiB of those five peaks, never under).
"""

from transformers import TrainerCallback

from zhtune.log import logger

from zhtune.models.parts import decoder_layers
from zhtune.train.fast_path import set_checkpointed_layers


PROBE_LAYERS = 1  # left out in the probe step: it too should fit a tight budget (the peaks' difference is exact
# allocations, not a noisy reading, so one layer measures the per-layer cost as well as four)


def plan_checkpointed_layers(n_layers: int, peak_all: float, peak_probe: float, probe: int, budget: float,
                             keep_cost: float = 0.0) -> tuple[int, int]:
    """(how many of n_layers to checkpoint, how many of those keep their MLP output): peak_all was measured
    with all of them checkpointed, peak_probe with `probe` fewer; keep_cost is what one kept MLP output
    takes (0: keep none); all in the unit of `budget`."""
    per_layer = max((peak_probe - peak_all) / max(probe, 1), 1e-9)
    room = budget - peak_all
    keeping = 0
    if keep_cost > 0:
        keeping = max((k for k in range(n_layers + 1) if keeping_peak(k, n_layers, per_layer, keep_cost) <= room),
                      default=0)
    if 0 < keeping < n_layers:
        return n_layers, keeping
    if keeping == 0:
        free = int(room // per_layer) if room > 0 else 0
        return max(0, min(n_layers, n_layers - free)), 0
    room -= keeping_peak(n_layers, n_layers, per_layer, keep_cost)  # every layer keeps; the rest leaves layers out
    free = int(room // max(per_layer - keep_cost, 1e-9))
    checkpointed = max(0, n_layers - free)
    return checkpointed, checkpointed


def keeping_peak(k: int, n_layers: int, per_layer: float, keep_cost: float) -> float:
    """The peak above all-checkpointed when the first k of n_layers checkpointed layers keep their MLP output:
    the k kept outputs, and the backward of the last keeping layer (about one un-checkpointed layer more) less
    the saved inputs (one kept output's size each) of the n_layers - k later layers, freed by then."""
    return k * keep_cost + (max(0.0, per_layer - (n_layers - k) * keep_cost) if k else 0.0)


class CheckpointPlanner(TrainerCallback):
    def __init__(self, model, fraction: float = 0.8, probe: int = PROBE_LAYERS, memory=None,
                 budget_gib: float | None = None, keep_cost: float = 0.0):
        """budget_gib: the peak to stay within (--memory_budget_gib); default `fraction` of the GPU.
        keep_cost: bytes one checkpointed layer's kept MLP output takes (`mlp_output_bytes`; 0: keep none).
        probe: layers left out in the probe step."""
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
        gib = 2**30
        budget = self.budget_gib * gib if self.budget_gib else self.fraction * self.memory.total()
        if self.steps_seen == 1:
            self.peak_all = self.memory.peak()
            if _over_ranks(int(self.peak_all >= budget), max):  # no room on some rank: no probe step over budget
                self.chosen = self.n_layers
                logger.info(f"fast path: all {self.n_layers} decoder layers checkpointed (peak "
                            f"{self.peak_all / gib:.1f} GiB, budget {budget / gib:.3g} GiB: no room to leave one out)")
                return
            set_checkpointed_layers(self.model, self.n_layers - self.probe)
            return
        peak_probe = self.memory.peak()
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
                 f"budget {budget / gib:.3g} GiB = {of})")


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
