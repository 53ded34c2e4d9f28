"""From `zhtune eval` arguments to what will run: which models, which benchmarks, which items.

Nothing here loads a model or touches the network, so `--dry_run` uses all of it.

Models, in table order:
  --model_type / --model_id_or_path only      one model
  --ckpt_dir A [B ...] only                   each checkpoint
  --model_type T --ckpt_dir A [B ...]         the base T first, then each checkpoint (before/after)
  nothing                                     the embedded default (gemma3-270m)
"""

from dataclasses import dataclass

from zhtune.errors import UserError, closest
from zhtune.eval.arc import ARC
from zhtune.eval.base import Benchmark
from zhtune.eval.ceval import CEval
from zhtune.eval.gsm8k import GSM8K
from zhtune.eval.mmlu import MMLU
from zhtune.eval.self_cognition import SelfCognition
from zhtune.models.resolve import ResolvedModel, resolve_from_args, resolve_model

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
    resolved: ResolvedModel

    @property
    def model_type(self) -> str:
        return self.resolved.model_type

    def describe(self) -> dict:
        return {"label": self.label, **self.resolved.describe()}


def plan_models(args, dry_run: bool = False) -> list[ModelPlan]:
    """The models to score, in order. A missing --ckpt_dir is an error, except in a dry run, where
    its model type is read from its path (output/<model_type>/...) and it is reported as missing."""
    plans = []
    ckpts = list(args.ckpt_dir or [])
    if args.model_type or args.model_id_or_path or not ckpts:
        resolved = resolve_model(args.model_type, args.model_id_or_path, template_type=args.template_type,
                                 system=args.system, revision=args.model_revision)
        plans.append(ModelPlan(resolved.label, resolved))
    for ckpt in ckpts:
        resolved = resolve_from_args(args, ckpt_dir=ckpt, dry_run=dry_run)
        plans.append(ModelPlan(resolved.label, resolved))
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
