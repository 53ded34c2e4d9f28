"""From `zhtune eval` arguments to what will run: which models, which benchmarks, which items.

Nothing here loads a model or touches the network, so `--dry_run` uses all of it.

Models, in table order:
  --model_type / --model_id_or_path only      one model
  --ckpt_dir A [B ...] only                   each checkpoint
  --model_type T --ckpt_dir A [B ...]         the base T first, then each checkpoint (before/after)
  nothing                                     the embedded default (gemma3-270m)
"""

from dataclasses import dataclass
from pathlib import Path

from zhtune.errors import UserError, closest
from zhtune.eval.arc import ARC
from zhtune.eval.base import Benchmark
from zhtune.eval.ceval import CEval
from zhtune.eval.gsm8k import GSM8K
from zhtune.eval.mmlu import MMLU
from zhtune.eval.self_cognition import SelfCognition

BENCHMARKS = {"arc": ARC, "ceval": CEval, "gsm8k": GSM8K, "mmlu": MMLU, "self-cognition": SelfCognition}
_ALIASES = {"arc_c": "arc", "arc-challenge": "arc", "ai2_arc": "arc", "c-eval": "ceval", "ceval-exam": "ceval",
            "gsm": "gsm8k", "self_cognition": "self-cognition", "identity": "self-cognition"}


def dataset_names(requested: list[str]) -> list[str]:
    """Canonical benchmark names, in the order given, without repeats."""
    if not requested:
        raise UserError(f"--eval_dataset is empty: give one or more of {', '.join(BENCHMARKS)}.")
    names = []
    for raw in requested:
        key = raw.strip().lower()
        key = _ALIASES.get(key, key)
        if key not in BENCHMARKS:
            raise UserError(f"unknown --eval_dataset '{raw}'.{closest(key, BENCHMARKS)} "
                            f"Known: {', '.join(BENCHMARKS)}.")
        if key not in names:
            names.append(key)
    return names


def make_benchmark(name: str, args) -> Benchmark:
    if name == "self-cognition":
        return SelfCognition(args.model_name, args.model_author)
    return BENCHMARKS[name]()


def parse_limit(text: str | int | None) -> slice | None:
    """--eval_limit: N (the first N items of every set) or '[a:b]' (items a..b-1, as a Python slice)."""
    if text is None or str(text).strip() in ("", "None", "none"):
        return None
    raw = str(text).strip()
    hint = f"--eval_limit takes N or '[a:b]' (e.g. 100 or '[100:200]'), got '{raw}'."
    body = raw[1:-1] if raw.startswith("[") and raw.endswith("]") else raw
    try:
        if ":" not in body:
            n = int(body)
            if n <= 0:
                raise UserError(hint)
            return slice(0, n)
        a, b = body.split(":")
        start, stop = int(a) if a.strip() else 0, int(b) if b.strip() else None
    except ValueError:
        raise UserError(hint) from None
    if start < 0 or (stop is not None and stop <= start):
        raise UserError(hint + " Use 0 <= a < b.")
    return slice(start, stop)


def describe_limit(limit: slice | None) -> str:
    if limit is None:
        return "all"
    return f"[{limit.start}:{'' if limit.stop is None else limit.stop}]"


@dataclass
class ModelPlan:
    label: str  # the row name in the table; unique within a run
    spec: object  # zhtune.infer.engine.ModelSpec
    model_type: str | None
    template: str | None
    ckpt_exists: bool | None = None  # None: not a checkpoint

    def describe(self) -> dict:
        d = {"label": self.label, "model_type": self.model_type, "template": self.template,
             "model_id_or_path": self.spec.model_id_or_path}
        if self.spec.ckpt_dir:
            d.update(ckpt_dir=self.spec.ckpt_dir, ckpt_exists=self.ckpt_exists, merge_lora=self.spec.merge_lora)
        return d


def plan_models(args, dry_run: bool = False) -> list[ModelPlan]:
    """The models to score, in order. A missing --ckpt_dir is an error, except in a dry run, where
    its model type is read from its path (output/<model_type>/...) and it is reported as missing."""
    from zhtune.checkpoint import read_sft_args, sft_args_or_guess
    from zhtune.infer.engine import ModelSpec
    from zhtune.models.loader import resolve_model

    common = dict(merge_lora=args.merge_lora, infer_backend=args.infer_backend, dtype=args.dtype,
                  use_flash_attn=args.use_flash_attn, template_type=args.template_type, system=args.system,
                  model_revision=args.model_revision)
    plans = []
    ckpts = list(args.ckpt_dir or [])
    if args.model_type or args.model_id_or_path or not ckpts:
        resolved = resolve_model(args.model_type, args.model_id_or_path, args.template_type)
        spec = ModelSpec(model_type=args.model_type, model_id_or_path=args.model_id_or_path, **common)
        plans.append(ModelPlan(resolved.model_type, spec, resolved.model_type, resolved.template))
    for ckpt in ckpts:
        exists = Path(ckpt).is_dir()
        sft = sft_args_or_guess(ckpt) if dry_run else read_sft_args(ckpt)  # read_sft_args: UserError if missing
        spec = ModelSpec(model_type=args.model_type, model_id_or_path=args.model_id_or_path, ckpt_dir=ckpt, **common)
        model_type = args.model_type or sft.get("model_type")
        model_path = args.model_id_or_path or sft.get("model_id_or_path")
        if model_type or model_path:
            template = args.template_type if args.template_type != "AUTO" else sft.get("template_type", "AUTO")
            resolved = resolve_model(model_type, model_path, template)
            model_type, template = resolved.model_type, resolved.template
        else:  # dry run of a checkpoint not written yet, whose path names no model type
            template = None
        plans.append(ModelPlan(spec.display_name, spec, model_type, template, ckpt_exists=exists))
    _unique_labels(plans)
    return plans


def _unique_labels(plans: list[ModelPlan]) -> None:
    seen: dict[str, int] = {}
    for plan in plans:
        if plan.label in seen:
            seen[plan.label] += 1
            plan.label = f"{plan.label} #{seen[plan.label]}"
        else:
            seen[plan.label] = 1
