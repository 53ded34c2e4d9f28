"""`--fp8 true`: LoRA's frozen base weights multiply in float8, the rest in bf16.

Not exact: every base linear of the decoder layers (q/k/v/o, gate/up/down) runs its forward and its input
gradient as float8 matmuls, so the loss moves from the bf16 run's by the float8 rounding: benchmarks/sft_speed.py
reports by how much on random weights (`--fp8_curve`: within 0.2% over 50 steps on the Gemma-2-9B config),
benchmarks/fp8_loss_probe.py on the real embedded Gemma 3 270M, whose activation outliers move it more (on an
H200, 20 steps of new rows each: +1.6% on average with delayed scales, +1.5% tensorwise, +1.3% rowwise; benchmarks/
RESULTS.md, sixteenth session). Three recipes:

- delayed (the default, `--fp8_recipe delayed`): zhtune's `Float8FrozenLinear`. The weights never change, so
  each is cast to float8 once (e4m3, one scale: torchao's tensorwise numerics, checked equal on the CPU), twice
  laid out: W for the output, Wᵀ for the input's gradient. Inputs (e4m3) and output gradients (e5m2) are cast
  at each call with one scale per tensor from the largest amax that linear saw over the previous 16
  micro-batches (TransformerEngine's delayed scaling; the first micro-batch scales dynamically; a value above
  the recent maxima saturates at float8's largest). The cast no longer waits for its own tensor's amax, so
  inductor computes that amax (for later scales, per row then over the rows) in the cast's own kernel: one
  pass over the tensor instead of two (the MLP's activation, [8192, 14336]: 0.245 ms instead of 0.414 on an
  H200, benchmarks/fp8_cast_fusion.py). The records are committed at each training forward of the decoder (a
  pre-hook, `DelayedScaling`), so a checkpointed layer's recomputation uses its forward's scales. The bf16
  weights wait in host memory while training, so the device holds the same bytes as without the option. The
  input-gradient matmul uses the tensor cores' fast float8 accumulation as the forward's does (torchao keeps
  it off there). On the H200 (Gemma-2-9B config, seed LoRA, 2026-11-30): 1.07x tensorwise's tokens/s in the
  benchmark and through `zhtune sft`, the same 50-step loss curve (largest gap to bf16 0.18%, tensorwise 0.19%).
- tensorwise (`--fp8_recipe tensorwise`): the same with dynamic scales (each tensor's own amax, a pass over it
  before the cast). Against torchao's per-call weight casting 1.05x, fast accumulation another 1.02-1.03x.
- rowwise (`--fp8_recipe rowwise`): torchao's `Float8Linear` (one scale per row; the weight cast at each call).

The LoRA matrices, the embedding, the lm_head and the norms stay in bf16/fp32, and a checkpoint is the same
as without the option. Opt-in, `ZHTUNE_FP8_LM_HEAD=1` in the environment (not with rowwise): the frozen lm_head
multiplies in float8 too (dynamic scales; the logits before the softcap and their input gradient; PEFT's LoRA on it stays
bf16; its bf16 weight stays on the device where the tied embedding shares it; its input-gradient matmul, 256k
products per sum, accumulates precisely; its output gradient cast by a compiled kernel pair, the loss running
outside the compiled layers). Off by default: on the H200 it gave 1.015x (benchmark) at 1.7 GiB more, while on
the real Gemma 3 270M it moved the loss a further 0.7-1.8 points of a percent from bf16's (benchmarks/
fp8_loss_probe.py; benchmarks/RESULTS.md, fifteenth session).

Needs float8 matmuls: an NVIDIA GPU of compute capability 8.9 or newer (L4, RTX 4090, H100, H200, B200); on a
CPU, torch's own float8 kernels (slow; for checking the wiring); torchao (`pip install 'zhtune[fp8]'`) for
rowwise.

No weight gradient is computed for the frozen weights: `Float8FrozenLinear` has none; torchao's matmul's is
dropped where the decoder layers compile (the compiled backward never returns it: one float8 matmul forward,
one backward, checked on the CPU) and computed and discarded where they run eagerly.
"""

from types import SimpleNamespace

import torch

from zhtune.errors import UserError
from zhtune.log import logger
from zhtune.models.parts import base_model, decoder_layers
from zhtune.train.fused_lora import FOLDED_ATTR

RECIPES = ("rowwise", "tensorwise", "delayed")  # per-row scales (torchao), one per tensor, one per tensor delayed
DEFAULT_RECIPE = "delayed"  # the fastest on the H200 (1.07x tensorwise), all three within 0.25% of bf16 over 50 steps
INSTALL_HINT = "`pip install 'zhtune[fp8]'` (torchao)"


def check_fp8_support(device: str, recipe: str = DEFAULT_RECIPE) -> None:
    """One clear error before anything loads: torchao missing for its rowwise recipe, or a GPU without float8
    matmuls."""
    if recipe == "rowwise":
        try:
            _import_torchao()
        except ImportError:
            raise UserError(f"--fp8_recipe rowwise needs torchao: {INSTALL_HINT}, or drop --fp8_recipe (zhtune's "
                            "own delayed scales, the default; or --fp8_recipe tensorwise).") from None
    if str(device).startswith("cuda"):
        major, minor = torch.cuda.get_device_capability(torch.device(device))
        if (major, minor) < (8, 9):
            name = torch.cuda.get_device_name(torch.device(device))
            raise UserError(f"--fp8 true needs float8 matmuls: an NVIDIA GPU of compute capability 8.9 or newer "
                            f"(L4, RTX 4090, H100, H200); {name} has {major}.{minor}. Drop --fp8 to train in bf16.")


def casts_once(recipe: str, cast_once: bool = True) -> bool:
    """Whether `apply_fp8(recipe, cast_once)` uses zhtune's `Float8FrozenLinear` (the weights cast once) rather
    than torchao's per-call `Float8Linear`."""
    return recipe == "delayed" or recipe == "tensorwise" and cast_once


def apply_fp8(model, recipe: str = DEFAULT_RECIPE, cast_once: bool = True, fast_grad_input: bool = True,
              lm_head: bool = False) -> int:
    """Swap the frozen base linears of the decoder layers (PEFT's `base_layer`, or the plain linears where no
    LoRA wraps them) for float8 ones sharing their weights; returns how many. Delayed, or tensorwise with
    `cast_once`: zhtune's `Float8FrozenLinear` (the weight cast once, torchao's numerics; delayed: the scales
    from earlier micro-batches, `DelayedScaling` hooked on the decoder), and with `lm_head` the frozen lm_head's
    too (dynamic scales); otherwise torchao's `Float8Linear` (the weight cast at every call). `fast_grad_input`: the
    decoder's input-gradient matmuls accumulate with the tensor cores' fast float8 accumulation too (torchao:
    only the forward's). Trainable linears and every other module are left alone."""
    if recipe not in RECIPES:
        raise ValueError(f"fp8 recipe {recipe!r}; known: {', '.join(RECIPES)}")
    layers = decoder_layers(model) or []
    head = 0
    if casts_once(recipe, cast_once):
        delayed = recipe == "delayed"
        swapped = sum(_swap_linears(layer, lambda m: Float8FrozenLinear(m, fast_grad_input, delayed=delayed))
                      for layer in layers)
        how = ("tensorwise scales" + (" delayed (the last 16 micro-batches' amax)" if delayed else "")
               + ", weights cast once, their bf16 in host memory" + (", fast accumulation" if fast_grad_input else ""))
        head = _swap_lm_head(model) if lm_head else 0
        if delayed and swapped:
            DelayedScaling.attach(model)
    else:
        float8 = _import_torchao()
        config = float8.Float8LinearConfig.from_recipe_name(recipe)
        swapped = sum(_swap_linears(layer, lambda m: float8.Float8Linear.from_float(m, config=config))
                      for layer in layers)
        how = f"torchao, {recipe} scales"
    if swapped or head:
        logger.info(f"fp8: {swapped} frozen linear layers of {len(layers)} decoder layers "
                    + ("and the lm_head " if head else "") + f"multiply in float8 ({how}); LoRA, embedding"
                    + ("" if head else ", lm_head") + " and norms stay bf16")
    return swapped + head


def _swap_lm_head(model) -> int:
    """The frozen lm_head (or the frozen base of PEFT's LoRA around it) as a `Float8FrozenLinear`; 1 if swapped.
    Its bf16 weight stays on the device where another module shares it (the tied embedding), and its input
    gradient accumulates precisely: each element sums over the whole vocabulary."""
    base = base_model(model)
    head = base.get_output_embeddings()
    if head is None:
        return 0
    shared = [p for _, p in base.named_parameters(remove_duplicate=False)]

    def make(linear):
        tied = sum(p is linear.weight for p in shared) > 1
        return Float8FrozenLinear(linear, fast_grad_input=False, weight_on_host=not tied)

    if _frozen_linear(head):
        base.set_output_embeddings(make(head))
        return 1
    return _swap_linears(head, make)  # a LoRA around it: its frozen base_layer


def _swap_linears(module, make) -> int:
    """Replace every frozen float8-shaped `nn.Linear` under `module` by `make(linear)`; returns how many. The base
    of a projection whose LoRA-B is folded into its matmul (train/fold_lora.py) stays: that matmul is bf16."""
    swapped = 0
    for parent in list(module.modules()):
        if hasattr(parent, FOLDED_ATTR):
            continue
        for name, child in list(parent.named_children()):
            if _frozen_linear(child):
                setattr(parent, name, make(child))
                swapped += 1
    return swapped


def remove_fp8(model) -> int:
    """Undo `apply_fp8` (before generating: the identity probe after training runs the bf16 weights)."""
    try:
        float8_linear = (Float8FrozenLinear, _import_torchao().Float8Linear)
    except ImportError:
        float8_linear = (Float8FrozenLinear,)
    # (parent, name) pairs, not the modules: each float8 module is freed as soon as it is replaced, so the device
    # never holds the float8 copies of every layer and the bf16 weights at once
    places = [(parent, name) for parent in model.modules() for name, child in parent.named_children()
              if isinstance(child, float8_linear)]
    for parent, name in places:
        child = getattr(parent, name)
        setattr(parent, name, child.restored() if isinstance(child, Float8FrozenLinear) else _linear_of(child))
        del child
    DelayedScaling.detach(model)
    return len(places)


def _linear_of(module) -> torch.nn.Linear:
    """A plain `nn.Linear` holding `module`'s weight and bias parameters (the same objects)."""
    with torch.device("meta"):
        linear = torch.nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
    linear.weight, linear.bias = module.weight, module.bias
    linear.train(module.training)
    return linear


def _frozen_linear(module) -> bool:
    """Plain `nn.Linear`s whose weight is frozen and whose shape float8 matmuls take (multiples of 16)."""
    if type(module) is not torch.nn.Linear or module.weight.requires_grad:
        return False
    return module.in_features % 16 == 0 and module.out_features % 16 == 0


def _import_torchao():
    """torchao's float8 training parts (Float8Linear, Float8LinearConfig); its import notices are quieted in
    zhtune/log.py."""
    import torchao.float8 as float8
    from torchao.float8.float8_linear import Float8Linear
    return SimpleNamespace(Float8Linear=Float8Linear, Float8LinearConfig=float8.Float8LinearConfig)


E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
EPS = 1e-12  # torchao's floor under amax
HISTORY = 16  # delayed scaling: a scale comes from the largest amax of this many earlier micro-batches (torchao's
_DELAYED = "_zhtune_fp8_delayed"  # default length); on the decoder: its DelayedScaling


def to_float8(x: torch.Tensor, dtype: torch.dtype, seen: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """`x` in float8 with one dynamic scale, as torchao's tensorwise cast (amax in float64, scaling in float32,
    saturated); returns the float8 tensor and the inverse scale `torch._scaled_mm` takes. `seen` (a float32
    scalar), if given, keeps the largest amax so far (delayed scaling's record)."""
    amax = x.abs().max().to(torch.float64)
    if seen is not None:
        seen.copy_(torch.maximum(seen, amax.to(torch.float32)))
    return _saturated(x, dtype, (torch.finfo(dtype).max / torch.clamp(amax, min=EPS)).to(torch.float32))


def to_float8_delayed(x: torch.Tensor, dtype: torch.dtype, seen: torch.Tensor, recent: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """`x` ([rows, columns]) in float8 with the scale of `recent` (the largest amax of earlier micro-batches; a
    value above it saturates), and x's own amax into `seen` for later scales. The amax is taken per row, then
    over the rows: a row reduction inductor fuses into the cast's kernel (a whole-tensor one it keeps apart)."""
    seen.copy_(torch.maximum(seen, x.abs().amax(dim=-1).max().to(torch.float32)))
    scale = (torch.finfo(dtype).max / torch.clamp(recent.to(torch.float64), min=EPS)).to(torch.float32)  # as above
    return _saturated(x, dtype, torch.where(recent > 0, scale, torch.ones_like(scale)))


def _saturated(x: torch.Tensor, dtype: torch.dtype, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x · scale in float8, clamped to its range, and the inverse scale `torch._scaled_mm` takes."""
    limit = torch.finfo(dtype).max
    return (x.to(torch.float32) * scale).clamp(-limit, limit).to(dtype), scale.reciprocal()


_COMPILED_CAST = {}


def _cast_scaled(x: torch.Tensor, dtype: torch.dtype, seen: torch.Tensor | None, recent: torch.Tensor | None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """A decoder linear's cast: dynamic (no `seen`), dynamic keeping the amax in `seen` (delayed scaling's first
    micro-batch), or delayed (scaled by `recent`)."""
    if seen is None:
        return _cast(x, dtype)
    return to_float8(x, dtype, seen) if recent is None else to_float8_delayed(x, dtype, seen, recent)


def _cast(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """`to_float8`, compiled where it runs eagerly on a GPU (the lm_head, called by the chunked loss outside
    the compiled layers): eager, its amax, scaling, clamp and cast each pass over the tensor (a 1,024-token
    chunk's logit gradient is 0.5 GB in bf16); compiled, one reduction and one cast kernel."""
    if not x.is_cuda or torch.compiler.is_compiling():
        return to_float8(x, dtype)
    if "fn" not in _COMPILED_CAST:
        _COMPILED_CAST["fn"] = torch.compile(to_float8, dynamic=None)
    return _COMPILED_CAST["fn"](x, dtype)


class _FrozenFloat8Matmul(torch.autograd.Function):
    """x @ Wᵀ for a frozen W held in float8 twice: W ([out, in]) for the output, Wᵀ ([in, out]) for the input's
    gradient, each the row-major operand `torch._scaled_mm` reads as column-major. x is cast to e4m3 and the
    output's gradient to e5m2 at each call: dynamic scales, or delayed ones where a `seen` record is given (its
    `recent` the scale's source; None: dynamic, keeping the amax). No weight gradient."""

    @staticmethod
    def forward(ctx, x, weight8, weight8_t, weight_inv_scale, fast_grad_input, x_seen=None, x_recent=None,
                grad_seen=None, grad_recent=None):
        rows = x.reshape(-1, x.shape[-1]).contiguous()  # _scaled_mm's first operand is row-major
        x8, x_inv_scale = _cast_scaled(rows, E4M3, x_seen, x_recent)
        out = torch._scaled_mm(x8, weight8.t(), scale_a=x_inv_scale, scale_b=weight_inv_scale, out_dtype=x.dtype,
                               use_fast_accum=True)
        ctx.save_for_backward(weight8_t, weight_inv_scale, grad_seen, grad_recent)
        ctx.fast_grad_input, ctx.dtype = fast_grad_input, x.dtype
        return out.reshape(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        weight8_t, weight_inv_scale, grad_seen, grad_recent = ctx.saved_tensors
        rows = grad.reshape(-1, grad.shape[-1]).contiguous()
        grad8, grad_inv_scale = _cast_scaled(rows, E5M2, grad_seen, grad_recent)
        grad_input = torch._scaled_mm(grad8, weight8_t.t(), scale_a=grad_inv_scale, scale_b=weight_inv_scale,
                                      out_dtype=ctx.dtype, use_fast_accum=ctx.fast_grad_input)
        return (grad_input.reshape(*grad.shape[:-1], grad_input.shape[-1]), *(None,) * 8)


class Float8FrozenLinear(torch.nn.Module):
    """A frozen `nn.Linear` multiplying in float8 with its weight cast once (torchao's tensorwise numerics,
    without torchao's per-call amax and cast of a weight that never changes). The device holds the two float8
    copies (W for the output, Wᵀ for the input's gradient: together the bf16 weight's bytes) as plain
    attributes, invisible to state dicts and to DDP's broadcasts; the bf16 parameter itself waits in host
    memory (`weight`, unregistered) until `remove_fp8` puts it back on the device, or stays on the device
    with `weight_on_host=False` (a weight another module uses: the lm_head's tied embedding). `delayed`: scales
    from the amax records of earlier micro-batches (`DelayedScaling`; plain float32 scalars, like the float8
    copies unregistered): `x_seen` / `grad_seen` the largest amax since the last commit, `x_history` /
    `grad_history` the last 16 committed, `x_recent` / `grad_recent` their maximum, the scales' source once
    `delayed_ready` (the first micro-batch scales dynamically)."""

    def __init__(self, linear: torch.nn.Linear, fast_grad_input: bool = True, weight_on_host: bool = True,
                 delayed: bool = False):
        super().__init__()
        if linear.bias is not None or linear.weight.requires_grad:
            raise ValueError("Float8FrozenLinear takes a frozen linear without bias")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.bias, self.fast_grad_input, self.weight_on_host = None, fast_grad_input, weight_on_host
        self.train(linear.training)
        weight = linear.weight
        with torch.no_grad():
            weight8, inv_scale = to_float8(weight, E4M3)
            self.weight8, self.weight8_t, self.weight_inv_scale = weight8, weight8.t().contiguous(), inv_scale
        if weight_on_host:
            weight.data = weight.data.to("cpu")
        self.__dict__["_host_weight"] = weight  # not registered: no parameter of the module while it is float8
        self.delayed, self.delayed_ready = delayed, False
        if delayed:
            device = self.weight8.device
            for kind in ("x", "grad"):
                setattr(self, f"{kind}_seen", torch.zeros((), device=device))
                setattr(self, f"{kind}_history", torch.zeros(HISTORY, device=device))
                setattr(self, f"{kind}_recent", torch.zeros((), device=device))

    @property
    def weight(self) -> torch.nn.Parameter:
        """The bf16 weight, in host memory while the module lives (unless another module shares it)."""
        return self.__dict__["_host_weight"]

    def restored(self) -> torch.nn.Linear:
        """The `nn.Linear` this module replaced: the same parameter object, back on the float8 copies' device."""
        self.weight.data = self.weight.data.to(self.weight8.device)
        return _linear_of(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_autocast_enabled(x.device.type):
            x = x.to(torch.get_autocast_dtype(x.device.type))
        if x.numel() == 0:  # the lm_head under the fast path's forward: logits of no token (no scale to take)
            return x.new_zeros(*x.shape[:-1], self.out_features)
        records = ()
        if self.delayed:
            ready = self.delayed_ready
            records = (self.x_seen, self.x_recent if ready else None, self.grad_seen,
                       self.grad_recent if ready else None)
        return _FrozenFloat8Matmul.apply(x, self.weight8, self.weight8_t, self.weight_inv_scale,
                                         self.fast_grad_input, *records)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, float8 weight cast once"
                + (", fast accumulation" if self.fast_grad_input else "") + (", delayed scales" if self.delayed else ""))




class DelayedScaling:
    """The decoder's forward pre-hook for `--fp8_recipe delayed`: at each training forward (grad enabled, training
    mode) every delayed `Float8FrozenLinear`'s amax seen since the last one goes into its history (a ring of
    HISTORY), and its recent maximum (the next scales) is refreshed; from the second micro-batch on, the linears
    scale with it. A handful of multi-tensor kernels for all linears at once, outside the compiled layers."""

    def __init__(self, linears: list):
        self.linears = linears
        self.seen = [getattr(m, f"{k}_seen") for m in linears for k in ("x", "grad")]
        self.history = [getattr(m, f"{k}_history") for m in linears for k in ("x", "grad")]
        self.recent = [getattr(m, f"{k}_recent") for m in linears for k in ("x", "grad")]
        self.slots = [[h[i] for h in self.history] for i in range(HISTORY)]  # views: slot i of every history
        self.forwards = 0

    def __call__(self, decoder, _args) -> None:
        if not (torch.is_grad_enabled() and decoder.training):
            return
        if self.forwards:
            self.commit()
        self.forwards += 1

    @torch.no_grad()
    def commit(self) -> None:
        torch._foreach_copy_(self.slots[(self.forwards - 1) % HISTORY], self.seen)
        torch._foreach_zero_(self.seen)
        maxima = torch._foreach_max(self.history) if hasattr(torch, "_foreach_max") else [  # torch < 2.5
            h.max() for h in self.history]
        torch._foreach_copy_(self.recent, maxima)
        if self.forwards == 1:  # the first commit: from now on the linears scale with the records
            for m in self.linears:
                m.delayed_ready = True

    @classmethod
    def attach(cls, model) -> None:
        decoder = base_model(model).get_decoder()
        linears = [m for m in model.modules() if isinstance(m, Float8FrozenLinear) and m.delayed]
        cls.detach(model)
        scaling = cls(linears)
        setattr(decoder, _DELAYED, (scaling, decoder.register_forward_pre_hook(scaling)))

    @staticmethod
    def detach(model) -> None:
        for module in model.modules():
            if _DELAYED in module.__dict__:
                module.__dict__[_DELAYED][1].remove()
                delattr(module, _DELAYED)
