"""`--fp8 true`: LoRA's frozen base weights multiply in float8 (torchao's float8 training), the rest in bf16.

Not exact: every base linear of the decoder layers (q/k/v/o, gate/up/down) runs its forward and its input
gradient as float8 matmuls with dynamic scales (torchao's `Float8Linear`, e4m3; one scale per tensor, or per
row with `--fp8_recipe rowwise`), so the loss moves from the bf16 run's by the float8 rounding;
benchmarks/sft_speed.py reports by how much (`--fp8_curve`): on the H200 (Gemma-2-9B config, seed LoRA) 1.16x
the exact path's tokens/s with a largest loss gap of 0.22% over 50 steps (rowwise: 1.10x, 0.16%). The LoRA
matrices, the embedding, the tied lm_head (the softcapped logits) and the norms stay in bf16/fp32, and the
weights themselves stay bf16 in memory (float8 copies are made per step), so a checkpoint is the same as
without the option. Needs torchao (`pip install 'zhtune[fp8]'`) and float8 matmuls: an NVIDIA GPU of compute
capability 8.9 or newer (L4, RTX 4090, H100, H200, B200); on a CPU, torch's own float8 kernels (slow; for
checking the wiring).

The weight gradient torchao's matmul also computes is dropped where the decoder layers compile (the weights
are frozen, so the compiled backward never returns it: one float8 matmul forward, one backward, checked on the
CPU); where they run eagerly (the fast path forced on a CPU) it is computed and discarded.
"""

from types import SimpleNamespace

import torch

from zhtune.errors import UserError
from zhtune.log import logger
from zhtune.models.parts import decoder_layers

RECIPES = ("rowwise", "tensorwise")  # torchao's recipe names: per-row scales (more accurate) or one per tensor
DEFAULT_RECIPE = "tensorwise"  # the faster on the H200, both within 0.25% of bf16 (benchmarks/RESULTS.md)
INSTALL_HINT = "`pip install 'zhtune[fp8]'` (torchao)"


def check_fp8_support(device: str) -> None:
    """One clear error before anything loads: torchao missing, or a GPU without float8 matmuls."""
    try:
        _import_torchao()
    except ImportError:
        raise UserError(f"--fp8 true needs torchao: {INSTALL_HINT}, or drop --fp8.") from None
    if str(device).startswith("cuda"):
        major, minor = torch.cuda.get_device_capability(torch.device(device))
        if (major, minor) < (8, 9):
            name = torch.cuda.get_device_name(torch.device(device))
            raise UserError(f"--fp8 true needs float8 matmuls: an NVIDIA GPU of compute capability 8.9 or newer "
                            f"(L4, RTX 4090, H100, H200); {name} has {major}.{minor}. Drop --fp8 to train in bf16.")


def apply_fp8(model, recipe: str = DEFAULT_RECIPE, cast_once: bool = True, fast_grad_input: bool = False) -> int:
    """Swap the frozen base linears of the decoder layers (PEFT's `base_layer`, or the plain linears where no
    LoRA wraps them) for float8 ones sharing their weights; returns how many. Tensorwise with `cast_once`:
    zhtune's `Float8FrozenLinear` (the weight cast once, torchao's numerics); otherwise torchao's
    `Float8Linear` (the weight cast at every call). `fast_grad_input`: the input-gradient matmul accumulates
    with the tensor cores' fast float8 accumulation too (torchao: only the forward's). Trainable linears and
    every module outside the decoder layers are left alone."""
    if recipe not in RECIPES:
        raise ValueError(f"fp8 recipe {recipe!r}; known: {', '.join(RECIPES)}")
    layers = decoder_layers(model) or []
    if recipe == "tensorwise" and cast_once:
        swapped = sum(_swap_linears(layer, lambda m: Float8FrozenLinear(m, fast_grad_input)) for layer in layers)
        how = "tensorwise scales, weights cast once" + (", fast accumulation" if fast_grad_input else "")
    else:
        float8 = _import_torchao()
        config = float8.Float8LinearConfig.from_recipe_name(recipe)
        swapped = sum(_swap_linears(layer, lambda m: float8.Float8Linear.from_float(m, config=config))
                      for layer in layers)
        how = f"torchao, {recipe} scales"
    if swapped:
        logger.info(f"fp8: {swapped} frozen linear layers of {len(layers)} decoder layers multiply in float8 "
                    f"({how}); LoRA, embedding, lm_head and norms stay bf16")
    return swapped


def _swap_linears(module, make) -> int:
    """Replace every frozen float8-shaped `nn.Linear` under `module` by `make(linear)`; returns how many."""
    swapped = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if _frozen_linear(child, name):
                setattr(parent, name, make(child))
                swapped += 1
    return swapped


def remove_fp8(model) -> int:
    """Undo `apply_fp8` (before generating: the identity probe after training runs the bf16 weights)."""
    try:
        float8_linear = (Float8FrozenLinear, _import_torchao().Float8Linear)
    except ImportError:
        float8_linear = (Float8FrozenLinear,)
    restored = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, float8_linear):
                with torch.device("meta"):
                    linear = torch.nn.Linear(child.in_features, child.out_features, bias=child.bias is not None)
                linear.weight, linear.bias = child.weight, child.bias
                linear.train(child.training)
                setattr(parent, name, linear)
                restored += 1
    return restored


def _frozen_linear(module, fqn: str) -> bool:
    """Plain `nn.Linear`s whose weight is frozen and whose shape float8 matmuls take (multiples of 16)."""
    if type(module) is not torch.nn.Linear or module.weight.requires_grad:
        return False
    return module.in_features % 16 == 0 and module.out_features % 16 == 0


def _import_torchao():
    """torchao's float8 training parts (Float8Linear, Float8LinearConfig, convert_to_float8_training); its
    import notices are quieted in zhtune/log.py."""
    import torchao.float8 as float8
    from torchao.float8.float8_linear import Float8Linear
    return SimpleNamespace(Float8Linear=Float8Linear, Float8LinearConfig=float8.Float8LinearConfig,
                           convert_to_float8_training=float8.convert_to_float8_training)


E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
EPS = 1e-12  # torchao's floor under amax


def to_float8(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """`x` in float8 with one dynamic scale, as torchao's tensorwise cast (amax in float64, scaling in float32,
    saturated); returns the float8 tensor and the inverse scale `torch._scaled_mm` takes."""
    amax = x.abs().max().to(torch.float64)
    scale = (torch.finfo(dtype).max / torch.clamp(amax, min=EPS)).to(torch.float32)
    limit = torch.finfo(dtype).max
    return (x.to(torch.float32) * scale).clamp(-limit, limit).to(dtype), scale.reciprocal()


class _FrozenFloat8Matmul(torch.autograd.Function):
    """x @ Wᵀ for a frozen W held in float8 twice: W ([out, in]) for the output, Wᵀ ([in, out]) for the input's
    gradient, each the row-major operand `torch._scaled_mm` reads as column-major. x is cast to e4m3 and the
    output's gradient to e5m2 at each call (dynamic scales); no weight gradient."""

    @staticmethod
    def forward(ctx, x, weight8, weight8_t, weight_inv_scale, fast_grad_input):
        rows = x.reshape(-1, x.shape[-1])
        x8, x_inv_scale = to_float8(rows, E4M3)
        out = torch._scaled_mm(x8, weight8.t(), scale_a=x_inv_scale, scale_b=weight_inv_scale, out_dtype=x.dtype,
                               use_fast_accum=True)
        ctx.save_for_backward(weight8_t, weight_inv_scale)
        ctx.fast_grad_input, ctx.dtype = fast_grad_input, x.dtype
        return out.reshape(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        weight8_t, weight_inv_scale = ctx.saved_tensors
        rows = grad.reshape(-1, grad.shape[-1])
        grad8, grad_inv_scale = to_float8(rows, E5M2)
        grad_input = torch._scaled_mm(grad8, weight8_t.t(), scale_a=grad_inv_scale, scale_b=weight_inv_scale,
                                      out_dtype=ctx.dtype, use_fast_accum=ctx.fast_grad_input)
        return grad_input.reshape(*grad.shape[:-1], grad_input.shape[-1]), None, None, None, None


class Float8FrozenLinear(torch.nn.Module):
    """A frozen `nn.Linear` multiplying in float8 with its weight cast once (torchao's tensorwise numerics,
    without torchao's per-call amax and cast of a weight that never changes). The bf16 weight stays the
    module's parameter (checkpoints, `remove_fp8`); the two float8 copies (W and Wᵀ, each half its bytes) are
    plain attributes, invisible to state dicts and to DDP's buffer broadcasts."""

    def __init__(self, linear: torch.nn.Linear, fast_grad_input: bool = False):
        super().__init__()
        if linear.bias is not None or linear.weight.requires_grad:
            raise ValueError("Float8FrozenLinear takes a frozen linear without bias")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, None
        self.fast_grad_input = fast_grad_input
        self.train(linear.training)
        with torch.no_grad():
            weight8, inv_scale = to_float8(linear.weight, E4M3)
            self.weight8, self.weight8_t, self.weight_inv_scale = weight8, weight8.t().contiguous(), inv_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_autocast_enabled(x.device.type):
            x = x.to(torch.get_autocast_dtype(x.device.type))
        return _FrozenFloat8Matmul.apply(x, self.weight8, self.weight8_t, self.weight_inv_scale,
                                         self.fast_grad_input)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, float8 weight cast once"
                + (", fast accumulation" if self.fast_grad_input else ""))
