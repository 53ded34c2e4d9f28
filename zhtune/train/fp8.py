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


def apply_fp8(model, recipe: str = DEFAULT_RECIPE) -> int:
    """Swap the frozen base linears of the decoder layers (PEFT's `base_layer`, or the plain linears where no
    LoRA wraps them) for torchao `Float8Linear`s sharing their weights; returns how many. Trainable linears
    and every module outside the decoder layers are left alone."""
    if recipe not in RECIPES:
        raise ValueError(f"fp8 recipe {recipe!r}; known: {', '.join(RECIPES)}")
    float8 = _import_torchao()
    config = float8.Float8LinearConfig.from_recipe_name(recipe)
    layers = decoder_layers(model) or []
    swapped = 0
    for layer in layers:
        before = _count_float8(layer, float8.Float8Linear)
        float8.convert_to_float8_training(layer, config=config, module_filter_fn=_frozen_linear)
        swapped += _count_float8(layer, float8.Float8Linear) - before
    if swapped:
        logger.info(f"fp8: {swapped} frozen linear layers of {len(layers)} decoder layers multiply in float8 "
                    f"(torchao, {recipe} scales); LoRA, embedding, lm_head and norms stay bf16")
    return swapped


def remove_fp8(model) -> int:
    """Undo `apply_fp8` (before generating: the identity probe after training runs the bf16 weights)."""
    try:
        float8 = _import_torchao()
    except ImportError:
        return 0
    restored = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, float8.Float8Linear):
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


def _count_float8(module, float8_linear) -> int:
    return sum(isinstance(m, float8_linear) for m in module.modules())


def _import_torchao():
    """torchao's float8 training parts (Float8Linear, Float8LinearConfig, convert_to_float8_training); its
    import notices are quieted in zhtune/log.py."""
    import torchao.float8 as float8
    from torchao.float8.float8_linear import Float8Linear
    return SimpleNamespace(Float8Linear=Float8Linear, Float8LinearConfig=float8.Float8LinearConfig,
                           convert_to_float8_training=float8.convert_to_float8_training)
