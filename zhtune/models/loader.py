"""Find a model (embedded, local folder or hub) and load it with the right dtype and attention.

Name resolution (`resolve_model`) never touches the network or the weights, so `--dry_run` can use
it; `load_model_and_tokenizer` does the download and the loading.
"""

import json
import os
from dataclasses import dataclass
from pathlib import Path

from zhtune.errors import UserError
from zhtune.models.registry import (DEFAULT_MODEL_TYPE, ModelInfo, find_by_hub_id, get_model_info,
                                    model_type_for_architecture)


@dataclass
class ResolvedModel:
    info: ModelInfo
    source: str  # "embedded" | "local" | "hub"
    location: str | None  # local path or hub id
    template: str

    @property
    def model_type(self) -> str:
        return self.info.model_type

    def describe(self) -> dict:
        return {"model_type": self.model_type, "template": self.template, "model_source": self.source,
                "model_location": self.location}


def resolve_model(model_type: str | None, model_id_or_path: str | None, template_type: str = "AUTO") -> ResolvedModel:
    from zhtune.templates import get_template  # validates the template name

    if model_id_or_path and _looks_local(model_id_or_path):
        path = Path(model_id_or_path).expanduser()
        config = path / "config.json"
        if not config.is_file():
            raise UserError(f"--model_id_or_path {model_id_or_path}: no config.json there. Give a Hugging Face "
                            "model folder (config.json + safetensors + tokenizer) or a hub id.")
        if model_type is None:
            arch = json.loads(config.read_text()).get("model_type", "")
            model_type = model_type_for_architecture(arch)
            if model_type is None:
                raise UserError(f"cannot tell the model type of {model_id_or_path} (architecture '{arch}'): "
                                "add --model_type, e.g. --model_type qwen2.5-7b-instruct.")
        info, source, location = get_model_info(model_type), "local", str(path)
    elif model_id_or_path:
        info = find_by_hub_id(model_id_or_path)
        if info is None and model_type is None:
            raise UserError(f"unknown hub id '{model_id_or_path}' and no such local folder: add --model_type "
                            "to say which kind of model it is, or check the path.")
        info = get_model_info(model_type) if model_type else info
        source, location = "hub", model_id_or_path
    else:
        info = get_model_info(model_type or DEFAULT_MODEL_TYPE)
        if info.embedded:
            source, location = "embedded", None
        else:
            use_hf = os.environ.get("USE_HF", "0") in ("1", "true", "True")
            source, location = "hub", (info.hf_id if use_hf else info.ms_id)
    template = info.template if template_type in (None, "AUTO") else template_type
    get_template(template)
    return ResolvedModel(info, source, location, template)


def _looks_local(s: str) -> bool:
    return s.startswith((".", "/", "~")) or os.path.exists(os.path.expanduser(s))


def model_dir(resolved: ResolvedModel, revision: str | None = None) -> Path:
    """A local folder holding the model: the embedded cache, the given folder, or a hub download."""
    if resolved.source == "embedded":
        from zhtune.models.embedded import embedded_model_dir
        return embedded_model_dir()
    if resolved.source == "local":
        return Path(resolved.location)
    return download_from_hub(resolved.location, revision)


def download_from_hub(hub_id: str, revision: str | None = None) -> Path:
    use_hf = os.environ.get("USE_HF", "0") in ("1", "true", "True")
    hub = "Hugging Face" if use_hf else "ModelScope"
    try:
        if use_hf:
            from huggingface_hub import snapshot_download
        else:
            from modelscope import snapshot_download
    except ImportError:
        pkg = "huggingface_hub" if use_hf else "modelscope"
        raise UserError(f"downloading '{hub_id}' needs the package {pkg}: `pip install {pkg}`; or download the "
                        "model elsewhere and pass its folder with --model_id_or_path.") from None
    try:
        return Path(snapshot_download(hub_id, revision=revision))
    except Exception as e:  # noqa: BLE001 - network, auth and missing-repo errors all end here
        raise UserError(f"cannot download '{hub_id}' from {hub} ({type(e).__name__}). Without network, copy the "
                        f"model folder here and pass it: --model_id_or_path /path/to/folder --model_type T.") from None


def pick_dtype(dtype: str, device: str):
    import torch
    names = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    if dtype != "AUTO":
        return names[dtype]
    if device.startswith("cuda") and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def pick_attention(info: ModelInfo, use_flash_attn: bool | None, device: str) -> str:
    """The fastest attention that is exact for this model.

    Gemma 2 caps its attention logits (tanh softcap 50). sdpa and flash-attn kernels without a softcap
    drop that silently, so for Gemma 2 zhtune uses flex_attention (which applies it) on a GPU and eager
    elsewhere. Other models are exact under sdpa.
    """
    on_gpu = device.startswith("cuda")
    if info.needs_exact_attention:
        return "flex_attention" if (use_flash_attn and on_gpu) else "eager"
    if use_flash_attn and on_gpu:
        try:
            import flash_attn  # noqa: F401
            return "flash_attention_2"
        except ImportError:
            return "sdpa"
    return "sdpa"


def default_device() -> str:
    import torch
    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    return "cpu"


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model_and_tokenizer(resolved: ResolvedModel, dtype: str = "AUTO", use_flash_attn: bool | None = None,
                             device: str | None = None, revision: str | None = None, log=print,
                             attn_implementation: str | None = None):
    """(model, tokenizer) on `device`, in eval mode. `attn_implementation` overrides the choice of
    `pick_attention` (the training fast path asks for flex_attention)."""
    from transformers import AutoModelForCausalLM

    device = device or default_device()
    path = model_dir(resolved, revision)
    torch_dtype = pick_dtype(dtype, device)
    attn = attn_implementation or pick_attention(resolved.info, use_flash_attn, device)
    log(f"[zhtune] loading {resolved.model_type} from {path} ({str(torch_dtype).replace('torch.', '')}, "
        f"attention={attn}, device={device})")
    tokenizer = load_tokenizer(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, attn_implementation=attn)
    model.to(device)
    model.eval()
    return model, tokenizer
