"""ms-swift's LoRA target keywords, resolved to module names.

`--lora_target_modules`: ALL (every Linear except the output head), EMBEDDING (every Embedding),
DEFAULT (the model type's registered default) and literal module names such as `lm_head`.
`--lora_modules_to_save`: LN (every norm layer, trained fully), EMBEDDING, or names.

Names are module-name suffixes (`q_proj`, `embed_tokens`, `lm_head`), the form PEFT matches. With a
model at hand they come from its modules; for `--dry_run` (no weights, maybe no config) from the
architecture's record (`Architecture.module_names()`), which the tests keep equal to the real modules.
"""

from zhtune.errors import UserError
from zhtune.models.registry import ModelInfo

KEYWORDS = ("ALL", "EMBEDDING", "DEFAULT", "LN")

def modules_of(model) -> dict:
    """{'linear': [...], 'embedding': [...], 'norm': [...], 'head': name, 'all': {...}} from a real model."""
    import torch.nn as nn
    head = model.get_output_embeddings()
    linear, embedding, norm, all_names = set(), set(), set(), set()
    head_name = "lm_head"
    for name, module in model.named_modules():
        if not name:
            continue
        suffix = name.rsplit(".", 1)[-1]
        all_names.add(suffix)
        if module is head:
            head_name = suffix
        elif isinstance(module, nn.Linear):
            linear.add(suffix)
        elif isinstance(module, nn.Embedding):
            embedding.add(suffix)
        elif "norm" in type(module).__name__.lower():
            norm.add(suffix)
    return {"linear": sorted(linear), "embedding": sorted(embedding), "norm": sorted(norm), "head": head_name,
            "all": all_names}


def resolve_targets(keywords: list[str], modules: dict, info: ModelInfo) -> list[str]:
    """--lora_target_modules: ALL, EMBEDDING, DEFAULT or module names -> module names."""
    return _expand("--lora_target_modules", keywords, modules, info, {
        "ALL": modules["linear"], "EMBEDDING": modules["embedding"], "DEFAULT": list(info.arch.default_lora_targets)})


def resolve_modules_to_save(keywords: list[str], modules: dict, info: ModelInfo) -> list[str]:
    """--lora_modules_to_save: LN, EMBEDDING or module names -> module names."""
    return _expand("--lora_modules_to_save", keywords, modules, info,
                   {"LN": modules["norm"], "EMBEDDING": modules["embedding"]})


def _expand(flag: str, keywords: list[str], modules: dict, info: ModelInfo, expansions: dict) -> list[str]:
    out: list[str] = []
    for word in keywords:
        if word in expansions:
            out += expansions[word]
        elif word in modules["all"]:
            out.append(word)
        else:
            raise UserError(f"{flag}: '{word}' is neither a keyword ({', '.join(expansions)}) nor a module "
                            f"of {info.model_type}.{_hint(word, modules)}")
    return sorted(set(out), key=out.index)


def _hint(word, modules) -> str:
    from zhtune.errors import closest
    return closest(word, list(KEYWORDS) + sorted(modules["all"]))


def lora_config(args, targets: list[str], to_save: list[str]):
    from peft import LoraConfig, TaskType
    overlap = set(targets) & set(to_save)
    if overlap:
        raise UserError(f"{', '.join(sorted(overlap))} is both a LoRA target and fully trained "
                        "(--lora_modules_to_save): choose one.")
    return LoraConfig(task_type=TaskType.CAUSAL_LM, r=args.lora_rank, lora_alpha=args.lora_alpha,
                      lora_dropout=args.lora_dropout_p, target_modules=targets, modules_to_save=to_save or None)


def train_saved_modules_in_fp32(model) -> int:
    """Keep the fully trained modules (--lora_modules_to_save) in fp32; returns how many were changed.

    PEFT upcasts the LoRA weights to fp32 but leaves its trained copies of the modules to save in the
    model's dtype. In bf16 (8 significant bits) an AdamW step of 1e-4 on a norm weight near 1 rounds back
    to the same number, so on a bf16 model those modules would not train at all. Their parameters become
    fp32 here, as LLaMA-Factory does for every trainable parameter, and each one's floating outputs are cast
    back to the model's dtype, so the layers after it see the dtypes they saw before."""
    import functools

    import torch
    from peft.utils import ModulesToSaveWrapper
    n = 0
    for wrapper in model.modules():
        if not isinstance(wrapper, ModulesToSaveWrapper):
            continue
        for trained in wrapper.modules_to_save.values():
            low = {p.dtype for p in trained.parameters() if p.dtype in (torch.bfloat16, torch.float16)}
            if len(low) != 1:
                continue
            trained.float()
            trained.register_forward_hook(functools.partial(_cast_output, low.pop()))
            n += 1
    return n


def _cast_output(dtype, module, args, output):
    return output.to(dtype) if hasattr(output, "is_floating_point") and output.is_floating_point() else output
