"""Text generation behind one interface: `pt` (transformers) and `vllm`.

`load_engine(spec)` resolves a model spec (model type, hub id or folder, or a checkpoint written by
`zhtune sft`, optionally merged) and returns an Engine whose `generate` runs batches with left padding
and stops at the template's end-of-turn, and whose `stream` yields a reply piece by piece.
"""

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from zhtune.checkpoint import is_lora_checkpoint, read_sft_args
from zhtune.errors import UserError
from zhtune.models.loader import ResolvedModel, load_model_and_tokenizer, model_dir, resolve_model
from zhtune.templates import get_template


@dataclass
class GenerationSettings:
    max_new_tokens: int = 2048
    do_sample: bool = True
    temperature: float = 0.3
    top_k: int = 20
    top_p: float = 0.7
    repetition_penalty: float = 1.0
    seed: int | None = None

    @classmethod
    def from_args(cls, args, **override):
        names = cls.__dataclass_fields__
        values = {n: getattr(args, n) for n in names if hasattr(args, n) and getattr(args, n) is not None}
        values.update(override)
        return cls(**values)

    @property
    def greedy(self) -> bool:
        return not self.do_sample or self.temperature <= 0


@dataclass
class ModelSpec:
    model_type: str | None = None
    model_id_or_path: str | None = None
    ckpt_dir: str | None = None
    merge_lora: bool = False
    infer_backend: str = "AUTO"
    dtype: str = "AUTO"
    use_flash_attn: bool | None = None
    template_type: str = "AUTO"
    system: str | None = None
    model_revision: str | None = None

    @classmethod
    def from_args(cls, args, ckpt_dir: str | None = "__from_args__"):
        values = {n: getattr(args, n) for n in cls.__dataclass_fields__ if hasattr(args, n)}
        if ckpt_dir != "__from_args__":
            values["ckpt_dir"] = ckpt_dir
        if isinstance(values.get("ckpt_dir"), list):
            values["ckpt_dir"] = values["ckpt_dir"][0] if values["ckpt_dir"] else None
        return cls(**values)

    def resolve(self) -> tuple[ResolvedModel, dict]:
        """The base model and, for a checkpoint, its saved training arguments (no loading)."""
        sft = read_sft_args(self.ckpt_dir) if self.ckpt_dir else {}
        resolved = resolve_model(self.model_type or sft.get("model_type"),
                                 self.model_id_or_path or sft.get("model_id_or_path"),
                                 self.template_type if self.template_type != "AUTO" else sft.get("template_type", "AUTO"))
        return resolved, sft

    @property
    def display_name(self) -> str:
        if self.ckpt_dir:
            p = Path(self.ckpt_dir)
            return f"{p.parent.name}/{p.name}"
        return self.model_type or self.model_id_or_path or "gemma3-270m"


class Engine:
    """What every backend offers."""

    name: str
    model_type: str
    template = None
    tokenizer = None
    model_dir: Path | None = None
    system: str | None = None

    def generate(self, conversations: list[list[dict]], settings: GenerationSettings, batch_size: int = 8,
                 progress: bool = False) -> list[str]:
        raise NotImplementedError

    def stream(self, messages: list[dict], settings: GenerationSettings) -> Iterator[str]:
        yield self.generate([messages], settings, batch_size=1)[0]

    def with_system(self, messages: list[dict]) -> list[dict]:
        if self.system and (not messages or messages[0]["role"] != "system"):
            return [{"role": "system", "content": self.system}] + messages
        return messages


def _vllm_available() -> bool:
    try:
        import vllm  # noqa: F401
        import torch
        return torch.cuda.is_available()
    except ImportError:
        return False


def load_engine(spec: ModelSpec, log=print) -> Engine:
    resolved, sft = spec.resolve()
    backend = spec.infer_backend
    if backend == "AUTO":
        backend = "vllm" if _vllm_available() else "pt"
    if backend == "vllm" and not _vllm_available():
        raise UserError("--infer_backend vllm needs vllm and a CUDA GPU: `pip install 'zhtune[vllm]'` on a GPU "
                        "machine, or use --infer_backend pt.")
    system = spec.system if spec.system is not None else sft.get("system")
    lora = spec.ckpt_dir is not None and is_lora_checkpoint(spec.ckpt_dir)
    if spec.ckpt_dir and (spec.merge_lora or backend == "vllm") and lora:
        from zhtune.tuners.export import merge_checkpoint
        merged = merge_checkpoint(spec.ckpt_dir, log=log)
        resolved = resolve_model(resolved.model_type, str(merged), resolved.template)
        lora = False
    elif spec.ckpt_dir and not lora:  # a full fine-tuning checkpoint holds the whole model
        resolved = resolve_model(resolved.model_type, str(spec.ckpt_dir), resolved.template)
    if backend == "vllm":
        from zhtune.infer.vllm_engine import VllmEngine
        engine = VllmEngine(resolved, spec, log=log)
    else:
        engine = PtEngine(resolved, spec, adapter_dir=spec.ckpt_dir if lora else None, log=log)
    engine.name = spec.display_name if spec.ckpt_dir else resolved.model_type
    engine.system = system
    return engine


class PtEngine(Engine):
    """transformers' generate, batched with left padding."""

    def __init__(self, resolved: ResolvedModel, spec: ModelSpec, adapter_dir: str | None = None, log=print):
        self.model_dir = model_dir(resolved, spec.model_revision)
        self.model, self.tokenizer = load_model_and_tokenizer(resolved, spec.dtype, spec.use_flash_attn,
                                                              revision=spec.model_revision, log=log)
        if adapter_dir:
            from peft import PeftModel
            log(f"[zhtune] applying the LoRA adapter from {adapter_dir}")
            self.model = PeftModel.from_pretrained(self.model, adapter_dir)
            self.model.eval()
        self.model_type = resolved.model_type
        self.template = get_template(resolved.template, self.tokenizer)
        self.stop_ids = self.template.stop_token_ids()

    @classmethod
    def from_model(cls, model, tokenizer, resolved: ResolvedModel, name: str, system: str | None = None):
        """An engine around a model already in memory (e.g. right after training)."""
        engine = cls.__new__(cls)
        engine.model, engine.tokenizer, engine.model_dir = model, tokenizer, None
        engine.model_type, engine.name, engine.system = resolved.model_type, name, system
        engine.template = get_template(resolved.template, tokenizer)
        engine.stop_ids = engine.template.stop_token_ids()
        return engine

    @property
    def device(self):
        return next(self.model.parameters()).device

    def _generate_kwargs(self, settings: GenerationSettings) -> dict:
        kwargs = {"max_new_tokens": settings.max_new_tokens, "eos_token_id": self.stop_ids,
                  "pad_token_id": self.tokenizer.pad_token_id, "repetition_penalty": settings.repetition_penalty}
        if settings.greedy:
            kwargs.update(do_sample=False, temperature=None, top_k=None, top_p=None)
        else:
            kwargs.update(do_sample=True, temperature=settings.temperature, top_k=settings.top_k, top_p=settings.top_p)
        return kwargs

    def encode_prompt(self, messages: list[dict]) -> list[int]:
        return self.template.encode(self.with_system(messages), add_generation_prompt=True).input_ids

    def generate(self, conversations, settings, batch_size=8, progress=False):
        import torch
        from tqdm import tqdm

        if settings.seed is not None:
            torch.manual_seed(settings.seed)
        prompts = [self.encode_prompt(m) for m in conversations]
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))  # similar lengths share a batch
        replies: list[str | None] = [None] * len(prompts)
        batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
        for batch in tqdm(batches, desc="generate", disable=not progress):
            width = max(len(prompts[i]) for i in batch)
            pad = self.tokenizer.pad_token_id
            ids = torch.tensor([[pad] * (width - len(prompts[i])) + prompts[i] for i in batch], device=self.device)
            mask = torch.tensor([[0] * (width - len(prompts[i])) + [1] * len(prompts[i]) for i in batch], device=self.device)
            with torch.no_grad():
                out = self.model.generate(input_ids=ids, attention_mask=mask, **self._generate_kwargs(settings))
            for row, i in zip(out[:, width:].tolist(), batch):
                replies[i] = self._decode(row)
        return replies

    def _decode(self, ids: list[int]) -> str:
        cut = next((k for k, t in enumerate(ids) if t in self.stop_ids), len(ids))
        return self.tokenizer.decode(ids[:cut], skip_special_tokens=True).strip()

    def stream(self, messages, settings):
        import torch
        from transformers import TextIteratorStreamer

        if settings.seed is not None:
            torch.manual_seed(settings.seed)
        ids = torch.tensor([self.encode_prompt(messages)], device=self.device)
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), streamer=streamer,
                      **self._generate_kwargs(settings))
        thread = threading.Thread(target=self._generate_quietly, kwargs=kwargs, daemon=True)
        thread.start()
        yield from streamer
        thread.join()

    def _generate_quietly(self, **kwargs):
        import torch
        with torch.no_grad():
            self.model.generate(**kwargs)
