"""The arguments of every command, one dataclass each, with ms-swift v2's names and meanings.

Shared fields are declared once (ModelArguments, DataArguments, GenerationArguments) and the command
classes combine them. `parse_args(cls, argv)` turns `--name value ...` (and `--config FILE`) into an
instance: lists take several values (`--dataset a b c`), booleans take true/false, and an unknown
name or value is one error line naming the closest valid choice.
"""

import dataclasses
import json
import math
import os
import typing
from typing import ClassVar
from dataclasses import dataclass, field
from pathlib import Path

from zhtune.errors import UserError, closest
from zhtune.files import reading


def _choices(*values):
    return {"choices": values}


def _at_least(low, help: str | None = None):
    return {"min": low, **({"help": help} if help else {})}


def _between(low, high):
    return {"min": low, "max": high}


@dataclass
class ModelArguments:
    model_type: str | None = field(default=None, metadata={"help": "a registered model type, e.g. gemma2-9b-instruct; "
                                                           "default: read from --model_id_or_path, else gemma3-270m"})
    model_id_or_path: str | None = field(default=None, metadata={"help": "hub id (ModelScope, or HF with USE_HF=1) or local folder"})
    model_revision: str | None = None
    template_type: str = field(default="AUTO", metadata={"help": "chat template; AUTO: the model type's"})
    system: str | None = field(default=None, metadata={"help": "system prompt"})
    dtype: str = field(default="AUTO", metadata=_choices("AUTO", "bf16", "fp16", "fp32"))
    use_flash_attn: bool | None = field(default=None, metadata={"help": "fastest attention that is exact for the model "
                                                                "(Gemma 2: flex_attention with softcapping, never sdpa)"})
    seed: int = 42
    log_level: str = field(default="INFO", metadata=_choices("DEBUG", "INFO", "WARNING", "ERROR"))
    dry_run: bool = field(default=False, metadata={"help": "resolve names and print the configuration; load nothing"})
    config: str | None = field(default=None, metadata={"help": "a YAML or JSON file of these arguments (command line wins)"})


@dataclass
class DataArguments:
    dataset: list[str] = field(default_factory=list, metadata={"help": "entries [HF::|MS::]name|hub_id|path[:subset/subset][#N]"})
    val_dataset: list[str] = field(default_factory=list)
    dataset_seed: int = 42
    dataset_test_ratio: float = field(default=0.01, metadata=_between(0.0, 0.99))
    max_length: int = field(default=2048, metadata=_at_least(1))
    truncation_strategy: str = field(default="delete", metadata=_choices("delete", "truncation_left"))
    model_name: list[str] = field(default_factory=list, metadata={"help": "self-cognition name: ZH [EN]"})
    model_author: list[str] = field(default_factory=list, metadata={"help": "self-cognition author: ZH [EN]"})
    preprocess_num_proc: int = field(default=2, metadata=_at_least(1))


@dataclass
class GenerationArguments:
    max_new_tokens: int = field(default=2048, metadata=_at_least(1))
    do_sample: bool = True
    temperature: float = field(default=0.3, metadata=_at_least(0.0))
    top_k: int = field(default=20, metadata=_at_least(0, "0: no top-k cut"))
    top_p: float = field(default=0.7, metadata=_between(0.0, 1.0))
    repetition_penalty: float = field(default=1.0, metadata=_at_least(0.0))
    num_beams: int = field(default=1, metadata=_at_least(1, "beam search on the pt backend"))


@dataclass
class CheckpointArguments:
    ckpt_dir: str | None = field(default=None, metadata={"help": "a checkpoint folder written by `zhtune sft`"})
    merge_lora: bool = field(default=False, metadata={"help": "merge the LoRA adapter into <ckpt_dir>-merged once, then use it"})
    infer_backend: str = field(default="AUTO", metadata=_choices("AUTO", "pt", "vllm"))
    gpu_memory_utilization: float = field(default=0.9, metadata={"min": 0.05, "max": 1.0,
                                                                 "help": "vllm: share of the GPU's memory it takes"})
    max_model_len: int | None = field(default=None, metadata=_at_least(1, "vllm: longest prompt + reply"))
    tensor_parallel_size: int = field(default=1, metadata=_at_least(1, "vllm: GPUs one model spans"))
    enforce_eager: bool = field(default=False, metadata={"help": "vllm: no CUDA graphs (faster start, slower decode)"})


@dataclass
class SftArguments(ModelArguments, DataArguments):
    sft_type: str = field(default="lora", metadata=_choices("lora", "full"))
    output_dir: str = "output"
    add_output_dir_suffix: bool = True
    lora_target_modules: list[str] = field(default_factory=lambda: ["DEFAULT"],
                                           metadata={"help": "ALL, EMBEDDING, DEFAULT or module names"})
    lora_modules_to_save: list[str] = field(default_factory=list, metadata={"help": "LN, EMBEDDING or module names"})
    lora_rank: int = field(default=8, metadata=_at_least(1))
    lora_alpha: int = field(default=32, metadata=_at_least(1))
    lora_dropout_p: float = field(default=0.05, metadata=_between(0.0, 0.99))
    learning_rate: float | None = field(default=None, metadata={"help": "default 1e-4 for lora, 1e-5 for full"})
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    weight_decay: float = 0.1
    max_grad_norm: float = 0.5
    warmup_ratio: float = field(default=0.05, metadata=_between(0.0, 1.0))
    lr_scheduler_type: str = field(default="cosine", metadata=_choices(
        "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
        "inverse_sqrt", "reduce_lr_on_plateau", "cosine_with_min_lr", "warmup_stable_decay"))
    num_train_epochs: float = field(default=1.0, metadata={"min": 0.0, "min_exclusive": True})
    max_steps: int = -1
    batch_size: int = field(default=1, metadata=_at_least(1))
    eval_batch_size: int | None = field(default=None, metadata=_at_least(1))
    gradient_accumulation_steps: int | None = field(default=None, metadata=_at_least(
        1, "default ceil(16 / batch_size / world_size)"))
    eval_steps: int = field(default=50, metadata=_at_least(1))
    save_steps: int | None = field(default=None, metadata=_at_least(1, "default: --eval_steps"))
    save_total_limit: int = field(default=2, metadata={"help": "-1 keeps every checkpoint"})
    logging_steps: int = field(default=5, metadata=_at_least(1))
    gradient_checkpointing: bool = True
    resume_from_checkpoint: str | None = None
    deepspeed: str | None = field(default=None, metadata={"help": "default-zero2, default-zero3 or a JSON file"})
    fsdp: str | None = field(default=None, metadata={"help": "PyTorch FSDP2 (ms-swift's flag): fsdp2 (preset), a JSON "
                                                     "file {fsdp, fsdp_config} as ms-swift's, or options such as "
                                                     "'full_shard auto_wrap' / 'shard_grad_op' / '... offload'"})
    packing: bool | None = field(default=None, metadata={"help": "padding-free packing; default: on for the GPU fast path"})
    fast_path: bool | None = field(default=None, metadata={"help": "GPU fast path (packing, chunked softcapped loss); "
                                                           "default: on where supported"})
    fp8: bool = field(default=False, metadata={"help": "the fast path's frozen base weights multiply in float8 "
                                               "(GPU of compute capability 8.9+; not exact, LoRA only)"})
    fp8_recipe: str | None = field(default=None, metadata={
        "choices": ("delayed", "tensorwise", "rowwise"), "help": "--fp8's scales: one per tensor from the last 16 "
                                                                 "micro-batches' maxima (delayed, the default: one "
                                                                 "pass less over each input; the weights cast "
                                                                 "once), one per tensor from its own maximum "
                                                                 "(tensorwise), or one per row (torchao: "
                                                                 "zhtune[fp8]; a little more accurate)"})
    memory_budget_gib: float | None = field(default=None, metadata={
        "min": 1.0, "help": "GPU fast path: checkpoint only as many decoder layers as keep the peak within this many "
                            "GiB per GPU (measured over the first two steps); default: 80% of the GPU's memory"})
    identity_probe: bool = field(default=True, metadata={"help": "after training with self-cognition, score the held-out identity probe"})
    identity_probe_max_new_tokens: int = field(default=64, metadata=_at_least(1, "the probe's reply length cap"))

    def resolved_learning_rate(self) -> float:
        if self.learning_rate is not None:
            return self.learning_rate
        return 1e-4 if self.sft_type == "lora" else 1e-5

    def resolved_grad_accum(self, world_size: int = 1) -> int:
        if self.gradient_accumulation_steps is not None:
            return self.gradient_accumulation_steps
        return max(1, math.ceil(16 / self.batch_size / world_size))


_ENCODING = frozenset({"max_length", "truncation_strategy", "preprocess_num_proc"})
_TRAINING_DATA = frozenset({"dataset", "val_dataset", "dataset_seed", "dataset_test_ratio"}) | _ENCODING


@dataclass
class InferArguments(ModelArguments, CheckpointArguments, GenerationArguments, DataArguments):
    # Shared fields this command has no use for: given on the command line or in --config, they are one
    # error line (parse_args) instead of silently doing nothing; --help leaves them out.
    not_used: ClassVar[frozenset] = _ENCODING
    eval_batch_size: int = field(default=8, metadata=_at_least(1))
    save_result: bool = field(default=True, metadata={"help": "batch inference: write the replies to "
                                                           "--result_dir (else print them)"})
    result_dir: str | None = field(default=None, metadata={"help": "batch inference output; default "
                                                           "<ckpt_dir>/infer_result or infer_result/<model_type>"})
    stream: bool = field(default=True, metadata={"help": "chat: print replies as they are generated"})
    verbose: bool = field(default=False, metadata={"help": "print each turn's full prompt to stderr"})


@dataclass
class EvalArguments(ModelArguments, CheckpointArguments, GenerationArguments, DataArguments):
    not_used: ClassVar[frozenset] = _TRAINING_DATA
    eval_dataset: list[str] = field(default_factory=lambda: ["arc", "ceval", "gsm8k", "mmlu"])
    eval_backend: str = field(default="Native", metadata=_choices("Native"))
    eval_limit: str | None = field(default=None, metadata={"help": "N, or '[a:b]' for a slice of every set"})
    eval_batch_size: int = field(default=8, metadata=_at_least(1))
    eval_few_shot: int = field(default=0, metadata=_at_least(0))
    eval_prompt: str = field(default="zhtune", metadata=_choices("zhtune", "seed"))
    eval_mode: str = field(default="generate", metadata=_choices("generate", "loglik"))
    eval_data_dir: str | None = field(default=None, metadata={"help": "local copies of the benchmark files"})
    eval_output_dir: str = "eval_outputs"
    name: str | None = None
    ckpt_dir: list[str] = field(default_factory=list, metadata={"help": "one or more checkpoints; with --model_type "
                                                                "or --model_id_or_path too, the base model is compared"})
    do_sample: bool = False
    max_new_tokens: int | None = field(default=None, metadata=_at_least(1, "default per dataset (letters 32, gsm8k 512)"))


@dataclass
class ExportArguments(ModelArguments, CheckpointArguments):
    not_used: ClassVar[frozenset] = frozenset({"dtype", "use_flash_attn", "seed", "infer_backend",
                                               "gpu_memory_utilization", "max_model_len", "tensor_parallel_size",
                                               "enforce_eager"})
    merge_lora: bool = True


@dataclass
class DeployArguments(InferArguments):
    not_used: ClassVar[frozenset] = _TRAINING_DATA | {"model_name", "model_author", "eval_batch_size", "save_result",
                                                      "result_dir", "stream", "verbose"}
    host: str = "127.0.0.1"
    port: int = field(default=8000, metadata=_between(1, 65535))
    served_model_name: str | None = None
    api_key: str | None = field(default=None, metadata={"help": "require 'Authorization: Bearer <key>' on /v1/* "
                                                        "(set it when --host is not loopback)"})
    max_concurrency: int = field(default=32, metadata=_at_least(1, "requests handed to the engine at once (it "
                                                                    "batches them; vllm's max_num_seqs); 1: one at a time"))
    max_queue_size: int = field(default=256, metadata=_at_least(0, "requests waiting beyond --max_concurrency; "
                                                                    "more get 503"))


# ------------------------------------------------------------------------------------------------
# parsing

def _base_type(tp):
    """(scalar type, is_list) for a field annotation like `list[str]` or `int | None`."""
    origin = typing.get_origin(tp)
    if origin is list:
        return typing.get_args(tp)[0], True
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _base_type(args[0])
    return tp, False


def _convert(name: str, raw, tp, choices):
    if isinstance(raw, str) and raw.lower() in ("none", "null") and tp is not str:
        return None
    try:
        if tp is bool:
            if isinstance(raw, bool):
                value = raw
            elif str(raw).lower() in ("true", "1", "yes"):
                value = True
            elif str(raw).lower() in ("false", "0", "no"):
                value = False
            else:
                raise ValueError
        elif tp is int:
            value = int(raw)
        elif tp is float:
            value = float(raw)
        else:
            value = str(raw)
    except (TypeError, ValueError):
        kind = "true or false" if tp is bool else tp.__name__
        raise UserError(f"--{name} takes {kind}, got '{raw}'.") from None
    if choices and value not in choices:
        raise UserError(f"--{name} '{value}' is not one of {', '.join(map(str, choices))}.{closest(value, choices)}")
    return value


def check_range(f, value) -> None:
    """A field's declared range (metadata min / max / min_exclusive), for values from any source."""
    low, high = f.metadata.get("min"), f.metadata.get("max")
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    if not math.isfinite(value):
        raise UserError(f"--{f.name} must be a finite number, got {value}.")
    if low is not None and (value <= low if f.metadata.get("min_exclusive") else value < low):
        word = "more than" if f.metadata.get("min_exclusive") else "at least"
        raise UserError(f"--{f.name} must be {word} {low}, got {value}.")
    if high is not None and value > high:
        raise UserError(f"--{f.name} must be at most {high}, got {value}.")


def _fields(cls):
    return {f.name: f for f in dataclasses.fields(cls)}


def _read_config(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"--config {path}: no such file. Give a YAML or JSON file of arguments.")
    with reading(f"--config {path}", "the arguments file", "Give a UTF-8 YAML or JSON file of argument names "
                 "and values."):
        text = p.read_text(encoding="utf-8")
        if "\x00" in text:
            raise ValueError("binary data, not text")
        if p.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            import yaml
            data = yaml.safe_load(text)
    if not isinstance(data, dict):
        raise UserError(f"--config {path} must hold a mapping of argument names to values, found "
                        f"{type(data).__name__}, e.g. `model_type: qwen2.5-7b-instruct` on its own line.")
    return data


def split_argv(argv: list[str]) -> dict[str, list[str]]:
    """`--a 1 --b x y --c=3` -> {'a': ['1'], 'b': ['x', 'y'], 'c': ['3']}."""
    out: dict[str, list[str]] = {}
    current = None
    for token in argv:
        if token.startswith("--") and len(token) > 2 and not _is_number(token):
            name, eq, value = token[2:].partition("=")
            name = name.replace("-", "_")
            current = name
            out[current] = [value] if eq else []
        elif current is None:
            raise UserError(f"unexpected value '{token}': values follow an argument name, e.g. --dataset {token}.")
        else:
            out[current].append(token)
    return out


def _is_number(token: str) -> bool:
    try:
        float(token)
        return True
    except ValueError:
        return False


def parse_args(cls, argv: list[str]):
    """Build `cls` from command-line tokens; `--config` values come first, the command line wins."""
    fields = _fields(cls)
    given = split_argv(argv)
    for name in given:
        if name not in fields and name != "help":
            raise UserError(f"unknown argument --{name}.{closest(name, fields)} "
                            f"See `zhtune {_command_of(cls)} --help`.")
        _check_used(cls, name)
    values: dict = {}
    if "config" in given:
        if len(given["config"]) != 1:
            raise UserError("--config takes one file.")
        for name, raw in _read_config(given["config"][0]).items():
            if name not in fields:
                raise UserError(f"unknown argument '{name}' in {given['config'][0]}.{closest(name, fields)}")
            _check_used(cls, name)
            values[name] = _from_values(fields[name], raw if isinstance(raw, list) else [raw])
    for name, raw in given.items():
        values[name] = _from_values(fields[name], raw)
    for name, value in values.items():
        for item in (value if isinstance(value, list) else [value]):
            check_range(fields[name], item)
    return cls(**values)


def _check_used(cls, name: str) -> None:
    if name in getattr(cls, "not_used", ()):
        raise UserError(f"--{name} has no effect on `zhtune {_command_of(cls)}`: drop it.")


def _from_values(f, raw: list):
    tp, is_list = _base_type(f.type)
    choices = f.metadata.get("choices")
    if is_list:
        return [_convert(f.name, r, tp, choices) for r in raw]
    if len(raw) == 0:
        if tp is bool:
            return True
        raise UserError(f"--{f.name} needs a value.")
    if len(raw) > 1:
        raise UserError(f"--{f.name} takes one value, got {len(raw)}: {' '.join(map(str, raw))}. Quote it if it has spaces.")
    return _convert(f.name, raw[0], tp, choices)


def _command_of(cls) -> str:
    return {SftArguments: "sft", InferArguments: "infer", EvalArguments: "eval",
            ExportArguments: "export", DeployArguments: "deploy"}.get(cls, "")


def format_help(cls, command: str, summary: str) -> str:
    lines = [f"usage: zhtune {command} [--name value ...]", "", summary, "", "arguments (default in brackets):"]
    for f in dataclasses.fields(cls):
        if f.name in getattr(cls, "not_used", ()):
            continue
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        tp, is_list = _base_type(f.type)
        kind = ("LIST " if is_list else "") + getattr(tp, "__name__", str(tp))
        extra = f.metadata.get("help", "")
        if "min" in f.metadata or "max" in f.metadata:
            low = f.metadata.get("min", "")
            extra = (extra + " " if extra else "") + f"range {'(' if f.metadata.get('min_exclusive') else '['}{low}, " \
                f"{f.metadata.get('max', '')}]"
        if f.metadata.get("choices"):
            extra = (extra + " " if extra else "") + "{" + "|".join(map(str, f.metadata["choices"])) + "}"
        lines.append(f"  --{f.name:<28} {kind:<10} [{default}]  {extra}".rstrip())
    return "\n".join(lines)


def env_world() -> dict:
    """Distributed settings from the seed's environment variables."""
    return {
        "nproc_per_node": int(os.environ.get("NPROC_PER_NODE", "1")),
        "nnodes": int(os.environ.get("NNODES", "1")),
        "node_rank": int(os.environ.get("NODE_RANK", "0")),
        "master_addr": os.environ.get("MASTER_ADDR", "127.0.0.1"),
        "master_port": int(os.environ.get("MASTER_PORT", "29500")),
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
    }
