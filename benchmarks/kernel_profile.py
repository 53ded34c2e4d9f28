"""torch.profiler for the benchmarks: the device kernels of a block of work, longest first.

    with device_profile(cuda) as kernels:
        ...  # the work
    kernels.busy_us, kernels.by_kind(), kernels.top(20)   # after the block
"""

import contextlib
from dataclasses import dataclass, field


KINDS = (  # (kind, substrings of the kernel name), first match wins
    ("attention", ("flex", "fmha", "flash", "attention", "sdpa")),
    ("matmul", ("gemm", "cutlass", "xmma", "nvjet", "cublas", "matmul", "_mm_")),
    ("compiled (inductor)", ("triton_",)),
    ("eager elementwise / reductions", ("elementwise", "vectorized", "reduce", "unrolled", "softmax", "index",
                                        "scatter", "gather", "copy", "fill", "dropout", "bernoulli")),
)


@dataclass
class Kernels:
    events: list = field(default_factory=list)  # torch.profiler key averages with device time, longest first

    @staticmethod
    def device_us(event) -> float:
        return getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0) or 0

    @staticmethod
    def on_device(event) -> bool:
        """A kernel (or memcpy) on the device: torch's own table sums these for its device total. The CPU
        ops that launched them carry the same time as their "self device time", and inductor's annotations
        repeat each Triton kernel's name: counting those too counted much of the time twice."""
        from torch.autograd import DeviceType
        return getattr(event, "device_type", None) in (DeviceType.CUDA, DeviceType.PrivateUse1, DeviceType.XPU) \
            and not getattr(event, "is_user_annotation", False)

    @property
    def busy_us(self) -> float:
        return sum(self.device_us(e) for e in self.events)

    def by_kind(self) -> dict[str, float]:
        """Device microseconds per kind of kernel (KINDS; "other" for the rest)."""
        kinds: dict[str, float] = {}
        for e in self.events:
            kind = next((k for k, needles in KINDS if any(n in e.key.lower() for n in needles)), "other")
            kinds[kind] = kinds.get(kind, 0.0) + self.device_us(e)
        return kinds

    def top(self, n: int) -> list[dict]:
        return [{"name": e.key[:140], "calls": e.count, "device_ms": round(self.device_us(e) / 1000, 2)}
                for e in self.events[:n]]


@contextlib.contextmanager
def device_profile(cuda: bool):
    """Profile the block (CPU, and CUDA kernels when `cuda`, CUDA graph replays included); the yielded
    Kernels is filled when the block ends."""
    from torch.profiler import ProfilerActivity, profile
    kernels = Kernels()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        yield kernels
    kernels.events = device_events(prof.key_averages())


def device_events(averages) -> list:
    """The device's kernels among the profiler's key averages, longest first."""
    return sorted((e for e in averages if Kernels.on_device(e) and Kernels.device_us(e) > 0), key=Kernels.device_us,
                  reverse=True)
