"""`zhtune eval`: score one or more models on ARC, C-Eval, GSM8K, MMLU and the identity probe.

The method (the settings behind the seed's table): every item is one user turn through the model's
chat template (prompts: prompts.py, `--eval_prompt zhtune|seed`; with `--eval_few_shot K`, K solved
examples from the dev/train split); decoding is greedy; the answer letter, or for GSM8K the final
number, is read from the reply (extract.py); the score is accuracy over the items. Generation is
batched through the inference engine (left padding, stops at end-of-turn) with a short reply budget
for letter answers (32 new tokens; GSM8K 512; `--max_new_tokens` overrides both).
`--eval_mode loglik` scores ARC, C-Eval and MMLU by log-likelihood instead (loglik.py; GSM8K and the
identity probe are still generated). Every summary row carries a 95% Wilson interval (report.py).

`run_evaluation(args)` is the same run for other code (e.g. the quickstart report): it returns
{"scores": {model: {dataset: accuracy}}, "output_dir": ..., "table": ..., "results": [...]}.
"""

import copy
import gc
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from zhtune.dry_run import print_dry_run
from zhtune.errors import UserError
from zhtune.eval import prompts, report
from zhtune.eval.base import Benchmark, EvalItem, pick_shots
from zhtune.eval.extract import LETTERS
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

    def mode(self, args) -> str:
        """loglik only for multiple choice; GSM8K and the identity probe are always generated."""
        return _mode(self.bench, args)


def _check(args) -> None:
    """What the argument ranges (zhtune/args.py, checked at parse time) cannot say."""
    if args.eval_data_dir and not Path(args.eval_data_dir).expanduser().is_dir():
        raise UserError(f"--eval_data_dir {args.eval_data_dir}: no such folder. Give a folder holding "
                        "arc/, ceval/, gsm8k/ and mmlu/ with the benchmarks' original files.")
    if args.eval_mode == "loglik" and args.infer_backend == "vllm":
        raise UserError("--eval_mode loglik runs on the pt backend (it reads the model's logits directly): "
                        "use --infer_backend pt (or AUTO, which picks pt for loglik).")


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
            "eval_prompt": args.eval_prompt, "eval_mode": {b.name: _mode(b, args) for b in benches},
            **count_items(benches, args, limit),
            "max_new_tokens": {b.name: args.max_new_tokens or b.max_new_tokens for b in benches},
            "eval_backend": args.eval_backend, "infer_backend": args.infer_backend, "merge_lora": args.merge_lora,
            "eval_batch_size": args.eval_batch_size,
            "eval_output_dir": str(Path(args.eval_output_dir) / report.slug(args.name or first.label) / "<timestamp>")}


def _mode(bench: Benchmark, args) -> str:
    return "loglik" if args.eval_mode == "loglik" and bench.kind == "choice" else "generate"


def count_items(benches: list[Benchmark], args, limit: slice | None) -> dict:
    """For --dry_run: how many items each dataset has and would score, and the files they come from.
    Local files are read (a missing or empty data folder is the usual one-line error); hub sets are
    not downloaded, so their count is unknown."""
    items, files = {}, {}
    for bench in benches:
        if bench.name != "self-cognition" and args.eval_data_dir is None:
            items[bench.name] = f"unknown without network (hub set {bench.source(None)})"
            files[bench.name] = []
            continue
        total = len(bench.load(args.eval_data_dir))
        scored = len(range(total)[limit]) if limit else total
        items[bench.name] = {"scored": scored, "total": total}
        if bench.name == "self-cognition":
            files[bench.name] = [bench.source(None)]
        else:
            folder = Path(args.eval_data_dir).expanduser() / bench.name
            paths = bench.data_files(folder)
            files[bench.name] = [str(p) for p in paths[:5]] + ([f"... {len(paths)} files"] if len(paths) > 5 else [])
        logger.info(f"eval data: {bench.name} {scored} of {total} items from {', '.join(files[bench.name])}")
    return {"items": items, "data_files": files}


def load_task(bench: Benchmark, args, limit: slice | None) -> Task:
    everything = bench.load(args.eval_data_dir)
    positions = list(range(len(everything)))[limit] if limit else list(range(len(everything)))
    items = [everything[i] for i in positions]
    if not items:
        raise UserError(f"--eval_limit {args.eval_limit} leaves no {bench.name} items (it has {len(everything)}).")
    own_shots = args.eval_prompt == "seed" and bench.name == "gsm8k"  # llmuses' fixed four examples
    pool = bench.load(args.eval_data_dir, few_shot=True) if args.eval_few_shot > 0 and not own_shots else []
    if args.eval_few_shot > 0 and not pool and bench.name != "self-cognition" and not own_shots:
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
    engine_args = args
    if args.eval_mode == "loglik" and args.infer_backend == "AUTO":
        engine_args = copy.copy(args)
        engine_args.infer_backend = "pt"  # loglik reads logits: pt even where vllm would be picked
    limit = parse_limit(args.eval_limit)
    benches = [make_benchmark(n, args) for n in dataset_names(args.eval_dataset)]
    models = plan_models(args)
    tasks = [load_task(b, args, limit) for b in benches]  # data problems show before a model loads
    out_dir = report.new_output_dir(args.eval_output_dir, args.name or models[0].label)
    logger.info(f"eval: {len(models)} model(s) x {len(tasks)} dataset(s); results in {out_dir}")
    scores: dict[str, dict[str, float]] = {}
    results: list[dict] = []
    for model in models:
        engine = load(model.resolved, engine_args)
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
    """Score every item (generate, or loglik for multiple choice): (summary, per-item rows)."""
    bench, k = task.bench, args.eval_few_shot
    conversations = [prompts.conversation(bench, item, pick_shots(item, task.pool, k), args.eval_prompt, k)
                     for item in task.items]
    labels = [prompts.shown_labels(item, args.eval_prompt) for item in task.items]
    if task.mode(args) == "loglik":
        return _loglik_task(engine, task, args, conversations, labels, label)
    return _generate_task(engine, task, args, conversations, labels, label)


def _item_row(position: int, item: EvalItem, messages: list[dict], prompt: str) -> dict:
    row = {"index": position, "id": item.id, "subject": item.subject, "messages": messages, "prompt": prompt}
    if item.choices:
        row["choices"] = dict(zip(item.letters, item.choices))
    if item.meta.get("labels"):  # the file's own labels (ARC "1".."4"): gold_label is the original key
        row["labels"] = dict(zip(item.letters, item.meta["labels"]))
        row["gold_label"] = item.meta["labels"][LETTERS.index(item.gold)]
    return row


def _summary(task: Task, args, rows: list[dict], mode: str, seconds: float, **extra) -> dict:
    correct = sum(r["correct"] for r in rows)
    low, high = report.wilson_interval(correct, len(rows))
    return {"dataset": task.name, "mode": mode, "prompt": args.eval_prompt, "accuracy": correct / len(rows),
            "acc": correct / len(rows), **extra, "ci95": [round(low, 4), round(high, 4)], "correct": correct,
            "total": len(rows), "eval_limit": describe_limit(parse_limit(args.eval_limit)), "few_shot": args.eval_few_shot,
            "data_source": task.source, "seconds": round(seconds, 1)}


def _loglik_task(engine, task: Task, args, conversations, labels, label: str) -> tuple[dict, list[dict]]:
    from zhtune.eval.loglik import score_choices

    if not hasattr(engine, "model"):
        raise UserError("--eval_mode loglik needs the pt backend (use --infer_backend pt).")
    start = time.time()
    scores = score_choices(engine, conversations, [it.choices for it in task.items], labels,
                           batch_size=args.eval_batch_size, label=f"{label} {task.name}")
    seconds = time.time() - start
    rows = []
    for position, item, messages, shown, s in zip(task.positions, task.items, conversations, labels, scores):
        row = _item_row(position, item, messages, engine.render_prompt(messages))
        pred, pred_norm = LETTERS[s.pred], LETTERS[s.pred_norm]
        row.update({"label_shown": dict(zip(item.letters, shown)),
                    "loglik": dict(zip(item.letters, [round(x, 4) for x in s.label_logprobs])),
                    "loglik_text": dict(zip(item.letters, [round(x, 4) for x in s.text_logprobs])),
                    "loglik_norm": dict(zip(item.letters, [round(x, 6) for x in s.norm_scores])),
                    "extracted": pred, "extracted_norm": pred_norm, "gold": item.gold,
                    "correct": pred == item.gold, "correct_norm": pred_norm == item.gold})
        rows.append(row)
    n_norm = sum(r["correct_norm"] for r in rows)
    low, high = report.wilson_interval(n_norm, len(rows))
    summary = _summary(task, args, rows, "loglik", seconds, acc_norm=n_norm / len(rows),
                       ci95_norm=[round(low, 4), round(high, 4)], correct_norm=n_norm)
    logger.info(f"eval {label} {task.name} (loglik): acc {summary['acc']:.4f} {_ci(summary['ci95'])}, "
                f"acc_norm {summary['acc_norm']:.4f} {_ci(summary['ci95_norm'])} over {len(rows)} items "
                f"in {seconds:.0f}s")
    return summary, rows


def _ci(interval: list[float]) -> str:
    return f"[95% CI {interval[0]:.2f}-{interval[1]:.2f}]"


def _generate_task(engine, task: Task, args, conversations, labels, label: str) -> tuple[dict, list[dict]]:
    from zhtune.infer.base import GenerationSettings

    bench = task.bench
    settings = GenerationSettings.from_args(args, max_new_tokens=task.max_new_tokens)
    # one call per dataset: the engine batches (continuous batching on pt, vllm's own scheduler) and shows
    # a progress bar of items and output tokens/s
    start = time.time()
    completions = engine.generate_completions(conversations, settings, batch_size=args.eval_batch_size,
                                              progress=True)
    seconds = time.time() - start
    rows = []
    for position, item, messages, shown, done in zip(task.positions, task.items, conversations, labels, completions):
        scored = bench.score(item, done.text, prompts.last_user_text(messages), shown)
        row = _item_row(position, item, messages, engine.render_prompt(messages))
        row.update({"output": done.text, "output_tokens": done.completion_tokens, "extracted": scored.extracted,
                    "gold": item.gold, "correct": scored.correct, "no_answer": scored.no_answer})
        rows.append(row)
    no_answer = sum(r["no_answer"] for r in rows)
    output_tokens = sum(c.completion_tokens for c in completions)
    summary = _summary(task, args, rows, "generate", seconds, no_answer=no_answer,
                       max_new_tokens=task.max_new_tokens, output_tokens=output_tokens,
                       output_tokens_per_s=round(output_tokens / max(seconds, 1e-9), 1))
    logger.info(f"eval {label} {task.name}: {summary['accuracy']:.4f} {_ci(summary['ci95'])} "
                f"({summary['correct']}/{len(rows)} correct, {no_answer} without an answer) in {seconds:.0f}s, "
                f"{output_tokens} output tokens ({summary['output_tokens_per_s']:.0f}/s)")
    return summary, rows


def _model_fields(model: ModelPlan) -> dict:
    return {"model": model.label, "model_type": model.model_type, "ckpt_dir": model.resolved.ckpt_dir,
            "model_location": model.resolved.location}


def _free_memory() -> None:
    gc.collect()
    torch = sys.modules.get("torch")  # only if a model was loaded: never import torch just for this
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()
