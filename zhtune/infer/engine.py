"""`load_engine`: from a ResolvedModel and the engine flags to a ready Engine, the one place where a
backend is chosen and a model is loaded for generation (infer, eval, deploy, quickstart)."""

import os

from zhtune.checkpoint import ADAPTER_FIX
from zhtune.errors import UserError
from zhtune.files import reading
from zhtune.infer.base import Engine
from zhtune.log import logger
from zhtune.models.resolve import ResolvedModel, resolve_model


def vllm_available() -> bool:
    # vllm logs to stdout by default; zhtune's stdout carries only replies, tables and JSON
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    try:
        import torch
        import vllm  # noqa: F401
        return torch.cuda.is_available()
    except ImportError:
        return False


def pick_backend(requested: str) -> str:
    """AUTO: vllm where it imports and a GPU exists, else pt. vllm without either is one clear error."""
    if requested == "AUTO":
        return "vllm" if vllm_available() else "pt"
    if requested == "vllm" and not vllm_available():
        raise UserError("--infer_backend vllm needs vllm and a CUDA GPU: `pip install 'zhtune[vllm]'` on a GPU "
                        "machine, or use --infer_backend pt.")
    return requested


def load_engine(resolved: ResolvedModel, args) -> Engine:
    """`args`: any command's arguments with the engine flags (infer_backend, merge_lora, dtype, ...).
    A LoRA checkpoint runs as base + adapter on pt, merged once into <ckpt>-merged with --merge_lora
    true, and always merged on vllm."""
    backend = pick_backend(args.infer_backend)
    if resolved.adapter_dir and (args.merge_lora or backend == "vllm"):
        from zhtune.tuners.merge import merge_checkpoint
        merged = merge_checkpoint(resolved)
        resolved = resolve_model(resolved.model_type, str(merged), template_type=resolved.template,
                                 system=resolved.system)
        resolved.ckpt_dir = str(merged)
    common = dict(name=resolved.label, model_type=resolved.model_type, system=resolved.system)
    if backend == "vllm":
        return _load_vllm(resolved, args, common)
    return _load_pt(resolved, args, common)


def _load_pt(resolved: ResolvedModel, args, common: dict):
    from zhtune.infer.pt_engine import PtEngine
    from zhtune.models.loader import load_model_and_tokenizer
    from zhtune.templates import get_template

    model, tokenizer = load_model_and_tokenizer(resolved, args.dtype, args.use_flash_attn)
    if resolved.adapter_dir:
        from peft import PeftModel
        logger.info(f"applying the LoRA adapter from {resolved.adapter_dir}")
        with reading(f"--ckpt_dir {resolved.adapter_dir}", "the LoRA adapter", ADAPTER_FIX):
            model = PeftModel.from_pretrained(model, resolved.adapter_dir)
        model.eval()
    # the engine owns this model: on a GPU its decode step reads gate/up and q/k/v as one weight each
    return PtEngine(model, tokenizer, get_template(resolved.template, tokenizer), fuse_weights=True, **common)


def _load_vllm(resolved: ResolvedModel, args, common: dict):
    from vllm import LLM

    from zhtune.infer.vllm_engine import VllmEngine
    from zhtune.infer.vllm_models import register
    from zhtune.models.loader import load_tokenizer, model_dir
    from zhtune.templates import get_template

    register()  # Gemma 2 with an untied lm_head (a merged seed checkpoint)
    path = model_dir(resolved)
    logger.info(f"loading {resolved.model_type} from {path} with vllm (gpu_memory_utilization "
                f"{args.gpu_memory_utilization}, tensor_parallel_size {args.tensor_parallel_size})")
    dtype = {"AUTO": "auto", "bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[args.dtype]
    llm = LLM(model=str(path), tokenizer=str(path), dtype=dtype, seed=args.seed,
              gpu_memory_utilization=args.gpu_memory_utilization, max_model_len=args.max_model_len,
              tensor_parallel_size=args.tensor_parallel_size, enforce_eager=args.enforce_eager)
    tokenizer = load_tokenizer(path)
    return VllmEngine(llm, tokenizer, get_template(resolved.template, tokenizer), **common)
