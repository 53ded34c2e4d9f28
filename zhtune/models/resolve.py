"""Which model is this: the one resolver every command and every dry run uses.

A command names a model with some of --model_type, --model_id_or_path, --ckpt_dir, --template_type
and --system. `resolve_model` turns them into one `ResolvedModel` without loading or downloading
anything. The precedence rule, the same for every command:

    a flag given on the command line  >  the checkpoint's sft_args.json  >  the registry's default

so `--template_type chatml --ckpt_dir CKPT` uses chatml whatever CKPT was trained with, and a bare
`--ckpt_dir CKPT` uses the model type, base model, template and system prompt it was trained with.
A LoRA checkpoint stays an adapter on its base model (merged only when a command asks); a full
fine-tuning checkpoint is itself the model folder.
"""

import os
from dataclasses import dataclass, field
from pathlib import Path

from zhtune.checkpoint import is_lora_checkpoint, read_sft_args
from zhtune.errors import UserError
from zhtune.files import read_json_file
from zhtune.models.registry import (DEFAULT_MODEL_TYPE, ModelInfo, find_by_hub_id, get_model_info,
                                    model_type_for_architecture)


@dataclass
class ResolvedModel:
    info: ModelInfo
    source: str  # "embedded" | "local" | "hub"
    location: str | None  # local folder or hub id (None for the embedded model)
    template: str
    system: str | None = None
    revision: str | None = None
    ckpt_dir: str | None = None  # the checkpoint this came from, if any
    adapter_dir: str | None = None  # a LoRA checkpoint: the adapter to put on the base model
    sft_args: dict = field(default_factory=dict)
    ckpt_exists: bool = True  # False only in a dry run of a checkpoint not written yet

    @property
    def model_type(self) -> str:
        return self.info.model_type

    @property
    def arch(self):
        return self.info.arch

    @property
    def label(self) -> str:
        """How tables and the server name it: the checkpoint as run/checkpoint-N, else the model type."""
        if self.ckpt_dir:
            p = Path(self.ckpt_dir)
            return f"{p.parent.name}/{p.name}"
        return self.model_type

    def describe(self) -> dict:
        d = {"model_type": self.model_type, "template": self.template, "model_source": self.source,
             "model_location": self.location}
        if self.ckpt_dir:
            d.update(ckpt_dir=self.ckpt_dir, ckpt_exists=self.ckpt_exists, lora=self.adapter_dir is not None)
        return d


def resolve_model(model_type: str | None = None, model_id_or_path: str | None = None, *,
                  ckpt_dir: str | None = None, template_type: str | None = "AUTO", system: str | None = None,
                  revision: str | None = None, dry_run: bool = False) -> ResolvedModel:
    """See the module docstring. `dry_run`: a --ckpt_dir that does not exist yet is read from its path
    (output/<model_type>/...) instead of being an error."""
    from zhtune.templates import get_template  # validates the template name

    sft = _checkpoint_args(ckpt_dir, dry_run) if ckpt_dir else {}
    model_type = model_type or sft.get("model_type")
    adapter_dir, arg = None, "--model_id_or_path"
    if ckpt_dir and sft.get("ckpt_exists", True) and not is_lora_checkpoint(ckpt_dir):
        if not (Path(ckpt_dir) / "config.json").is_file():
            raise UserError(f"--ckpt_dir {ckpt_dir} holds neither adapter_config.json (a LoRA checkpoint) nor "
                            "config.json (a full fine-tuning checkpoint): it is incomplete or damaged. Use another "
                            "checkpoint-N folder of the run.")
        if not model_id_or_path:  # full fine-tuning: the checkpoint is the model
            model_id_or_path, arg = str(ckpt_dir), "--ckpt_dir"
    else:
        model_id_or_path = model_id_or_path or sft.get("model_id_or_path")
        adapter_dir = str(ckpt_dir) if ckpt_dir and sft.get("ckpt_exists", True) else None
    info, source, location = _locate(model_type, model_id_or_path, arg)
    template = _given(template_type) or sft.get("template_type") or info.template
    get_template(template)
    return ResolvedModel(info, source, location, template, system=system if system is not None else sft.get("system"),
                         revision=revision, ckpt_dir=str(ckpt_dir) if ckpt_dir else None, adapter_dir=adapter_dir,
                         sft_args={k: v for k, v in sft.items() if k != "ckpt_exists"},
                         ckpt_exists=sft.get("ckpt_exists", True))


def resolve_from_args(args, ckpt_dir: str | None = None, dry_run: bool | None = None) -> ResolvedModel:
    """resolve_model from a command's arguments (ckpt_dir: one of them, for commands that take several)."""
    if ckpt_dir is None:
        ckpt = getattr(args, "ckpt_dir", None)
        ckpt_dir = ckpt[0] if isinstance(ckpt, list) and ckpt else (None if isinstance(ckpt, list) else ckpt)
    return resolve_model(args.model_type, args.model_id_or_path, ckpt_dir=ckpt_dir,
                         template_type=args.template_type, system=args.system, revision=args.model_revision,
                         dry_run=args.dry_run if dry_run is None else dry_run)


def _given(template_type: str | None) -> str | None:
    return None if template_type in (None, "", "AUTO") else template_type


def _locate(model_type: str | None, model_id_or_path: str | None,
            arg: str = "--model_id_or_path") -> tuple[ModelInfo, str, str | None]:
    """`arg`: the flag the folder came from, for messages."""
    if model_id_or_path and _looks_local(model_id_or_path):
        path = Path(model_id_or_path).expanduser()
        if model_type is None:
            model_type = _model_type_of_folder(path, model_id_or_path, arg)
        elif not (path / "config.json").is_file():  # --model_type names the kind; the folder must still be one
            raise _no_config(arg, model_id_or_path)
        return get_model_info(model_type), "local", str(path)
    if model_id_or_path:
        info = get_model_info(model_type) if model_type else find_by_hub_id(model_id_or_path)
        if info is None:
            raise UserError(f"unknown hub id '{model_id_or_path}' and no such local folder: add --model_type "
                            "to say which kind of model it is, or check the path.")
        return info, "hub", model_id_or_path
    from zhtune.hub import use_hf
    info = get_model_info(model_type or DEFAULT_MODEL_TYPE)
    if info.embedded:
        return info, "embedded", None
    return info, "hub", info.hf_id if use_hf() else info.ms_id


def _model_type_of_folder(path: Path, given: str, arg: str = "--model_id_or_path") -> str:
    config = path / "config.json"
    if not config.is_file():
        raise _no_config(arg, given)
    fix = ("Use another checkpoint-N folder of the run." if arg == "--ckpt_dir"
           else "Re-download or re-export the model folder.")
    arch = read_json_file(config, "the model's config", fix, arg=arg).get("model_type", "")
    model_type = model_type_for_architecture(arch)
    if model_type is None:
        raise UserError(f"{arg} {given}: cannot tell the model type (architecture '{arch}'): add --model_type, "
                        "e.g. --model_type qwen2.5-7b-instruct.")
    return model_type


def _no_config(arg: str, given: str) -> UserError:
    return UserError(f"{arg} {given}: no config.json there. Give a Hugging Face model folder "
                     "(config.json + safetensors + tokenizer) or a hub id.")


def _looks_local(s: str) -> bool:
    return s.startswith((".", "/", "~")) or os.path.exists(os.path.expanduser(s))


def _checkpoint_args(ckpt_dir: str, dry_run: bool) -> dict:
    """The training arguments saved with a checkpoint; in a dry run of a folder not written yet, what
    its path says (output/<model_type>/vN-<time>/checkpoint-N)."""
    if dry_run and not Path(ckpt_dir).is_dir():
        from zhtune.models.registry import MODELS
        guess = next((part for part in Path(ckpt_dir).parts if part in MODELS), None)
        if guess is None:
            raise UserError(f"--ckpt_dir {ckpt_dir}: no such folder, and its path names no model type. Give a "
                            "checkpoint folder written by `zhtune sft`.")
        return {"model_type": guess, "ckpt_exists": False}
    return read_sft_args(ckpt_dir)
