"""`zhtune eval`: score one or more models on ARC, C-Eval, GSM8K, MMLU and the identity probe.

The method (the settings behind the seed's table): every item is one user turn through the model's
chat template (with `--eval_few_shot K`, K solved examples from the dev/train split come first as
earlier user/assistant turns); decoding is greedy; the answer letter, or for GSM8K the final number,
is read from the reply (extract.py); the score is accuracy over the items. Generation is batched
through the inference engine (left padding, stops at end-of-turn) with a short reply budget for
letter answers (32 new tokens; GSM8K 512; `--max_new_tokens` overrides both).

`run_evaluation(args)` is the same run for other code (e.g. the quickstart report): it returns
{"scores": {model: {dataset: accuracy}}, "output_dir": ..., "table": ..., "results": [...]}.
"""

import gc
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from zhtune.dry_run import print_dry_run
from zhtune.errors import UserError
from zhtune.eval import report
from zhtune.eval.base import Benchmark, EvalItem, pick_shots
from zhtune.eval.plan import ModelPlan, dataset_names, describe_limit, make_benchmark, parse_limit, plan_models
from zhtune.files import write_jsonl_atomic
from zhtune.log import logger


def eval_main(args) -> int:
    if args.dry_run:
        print_dry_run("eval", args, resolve(args))
        return 0
    run_evaluation(args)
    return 0


@dataclass
class Task:
    """One benchmark, ready to run: its items after --eval_limit and its few-shot pool."""
    bench: Benchmark
    items: list[EvalItem]
    positions: list[int]  # each item's index in the full split
    pool: list[EvalItem] = field(default_factory=list)
    max_new_tokens: int = 32
    source: str = ""

    @property
    def name(self) -> str:
        return self.bench.name


def _check(args) -> None:
    if args.eval_batch_size < 1:
        raise UserError(f"--eval_batch_size must be at least 1, got {args.eval_batch_size}.")
    if args.eval_few_shot < 0:
        raise UserError(f"--eval_few_shot must be 0 or more, got {args.eval_few_shot}.")
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise UserError(f"--max_new_tokens must be at least 1, got {args.max_new_tokens}.")
    if args.eval_data_dir and not Path(args.eval_data_dir).expanduser().is_dir():
        raise UserError(f"--eval_data_dir {args.eval_data_dir}: no such folder. Give a folder holding "
                        "arc/, ceval/, gsm8k/ and mmlu/ with the benchmarks' original files.")


def resolve(args) -> dict:
    """What a run would do, for --dry_run: names resolved, nothing loaded."""
    _check(args)
    names = dataset_names(args.eval_dataset)
    benches = [make_benchmark(n, args) for n in names]
    limit = parse_limit(args.eval_limit)
    models = plan_models(args, dry_run=True)
    first = models[0]
    return {"model_type": first.model_type, "template": first.resolved.template,
            "models": [m.describe() for m in models],
            "eval_dataset": names,
            "data_source": {b.name: b.source(args.eval_data_dir) for b in benches},
            "eval_limit": describe_limit(limit),
            "eval_few_shot": args.eval_few_shot,
            "max_new_tokens": {b.name: args.max_new_tokens or b.max_new_tokens for b in benches},
            "eval_backend": args.eval_backend, "infer_backend": args.infer_backend, "merge_lora": args.merge_lora,
            "eval_batch_size": args.eval_batch_size,
            "eval_output_dir": str(Path(args.eval_output_dir) / report.slug(args.name or first.label) / "<timestamp>")}


def load_task(bench: Benchmark, args, limit: slice | None) -> Task:
    everything = bench.load(args.eval_data_dir)
    positions = list(range(len(everything)))[limit] if limit else list(range(len(everything)))
    items = [everything[i] for i in positions]
    if not items:
        raise UserError(f"--eval_limit {args.eval_limit} leaves no {bench.name} items (it has {len(everything)}).")
    pool = bench.load(args.eval_data_dir, few_shot=True) if args.eval_few_shot > 0 else []
    if args.eval_few_shot > 0 and not pool and bench.name != "self-cognition":
        raise UserError(f"--eval_few_shot {args.eval_few_shot}: no {bench.name} few-shot split found. "
                        f"{bench.local_layout()}")
    source = bench.source(args.eval_data_dir)
    logger.info(f"eval data: {bench.name} {len(items)} items from {source}"
        + (f", {args.eval_few_shot}-shot from {len(pool)} examples" if pool else ""))
    return Task(bench, items, positions, pool, args.max_new_tokens or bench.max_new_tokens, source)


def run_evaluation(args, *, load=None) -> dict:
    """Score every model on every dataset; print the table; write the files. See the module docstring.

    `load(resolved, args) -> Engine` defaults to zhtune.infer.engine.load_engine.
    """
    if load is None:
        from zhtune.infer.engine import load_engine as load
    _check(args)
    limit = parse_limit(args.eval_limit)
    benches = [make_benchmark(n, args) for n in dataset_names(args.eval_dataset)]
    models = plan_models(args)
    tasks = [load_task(b, args, limit) for b in benches]  # data problems show before a model loads
    out_dir = report.new_output_dir(args.eval_output_dir, args.name or models[0].label)
    logger.info(f"eval: {len(models)} model(s) x {len(tasks)} dataset(s); results in {out_dir}")
    scores: dict[str, dict[str, float]] = {}
    results: list[dict] = []
    for model in models:
        engine = load(model.resolved, args)
        scores[model.label] = {}
        for task in tasks:
            summary, rows = evaluate_task(engine, task, args, label=model.label)
            path = report.item_file(out_dir, task.name, model.label, several_models=len(models) > 1)
            write_jsonl_atomic(path, rows)
            scores[model.label][task.name] = summary["accuracy"]
            results.append({**_model_fields(model), **summary, "file": str(path.relative_to(out_dir))})
            write_jsonl_atomic(out_dir / "eval_result.jsonl", results)
        del engine
        _free_memory()
    table = report.format_table(scores, [t.name for t in tasks])
    print(table, flush=True)
    logger.info(f"eval results written to {out_dir}")
    return {"scores": scores, "output_dir": str(out_dir), "table": table, "results": results}


def evaluate_task(engine, task: Task, args, label: str = "") -> tuple[dict, list[dict]]:
    """Generate for every item (batched), score the replies: (summary, per-item rows)."""
    from zhtune.infer.base import GenerationSettings

    bench, k = task.bench, args.eval_few_shot
    conversations = [bench.conversation(item, pick_shots(item, task.pool, k)) for item in task.items]
    settings = GenerationSettings.from_args(args, max_new_tokens=task.max_new_tokens)
    batch = args.eval_batch_size
    # vllm schedules everything itself; for pt, chunks only serve progress lines (at most ~20 per dataset)
    chunk = len(conversations) if engine.schedules_itself else max(batch * 8, 64, -(-len(conversations) // 20))
    start, outputs = time.time(), []
    for i in range(0, len(conversations), chunk):
        outputs += engine.generate(conversations[i:i + chunk], settings, batch_size=batch)
        if len(conversations) > chunk:
            logger.info(f"eval {label} {task.name}: {len(outputs)}/{len(conversations)} "
                f"({time.time() - start:.0f}s)")
    seconds = time.time() - start
    rows = []
    for position, item, messages, output in zip(task.positions, task.items, conversations, outputs):
        scored = bench.score(item, output)
        row = {"index": position, "id": item.id, "subject": item.subject, "messages": messages,
               "prompt": engine.render_prompt(messages), "output": output, "extracted": scored.extracted,
               "gold": item.gold, "correct": scored.correct, "no_answer": scored.no_answer}
        if item.choices:
            row["choices"] = dict(zip(item.letters, item.choices))
        rows.append(row)
    correct = sum(r["correct"] for r in rows)
    no_answer = sum(r["no_answer"] for r in rows)
    summary = {"dataset": task.name, "accuracy": correct / len(rows), "correct": correct, "total": len(rows),
               "no_answer": no_answer, "eval_limit": describe_limit(parse_limit(args.eval_limit)),
               "few_shot": k, "max_new_tokens": task.max_new_tokens, "data_source": task.source,
               "seconds": round(seconds, 1)}
    logger.info(f"eval {label} {task.name}: {summary['accuracy']:.4f} ({correct}/{len(rows)} correct, "
        f"{no_answer} without an answer) in {seconds:.0f}s")
    return summary, rows


def _model_fields(model: ModelPlan) -> dict:
    return {"model": model.label, "model_type": model.model_type, "ckpt_dir": model.resolved.ckpt_dir,
            "model_location": model.resolved.location}


def _free_memory() -> None:
    gc.collect()
    torch = sys.modules.get("torch")  # only if a model was loaded: never import torch just for this
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()
