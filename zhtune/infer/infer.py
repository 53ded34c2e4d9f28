"""`zhtune infer`: chat with a model or checkpoint, or run a dataset through it in batches."""

import time
from pathlib import Path

from zhtune.dry_run import print_dry_run
from zhtune.files import write_jsonl_atomic
from zhtune.infer.base import GenerationSettings
from zhtune.infer.chat import run_chat
from zhtune.infer.engine import load_engine
from zhtune.log import logger
from zhtune.models.resolve import resolve_from_args


def infer_main(args) -> int:
    resolved = resolve_from_args(args)
    if args.dry_run:
        print_dry_run("infer", args, {**resolved.describe(), "infer_backend": args.infer_backend,
                                       "merge_lora": args.merge_lora,
                                       "mode": "batch" if (args.val_dataset or args.dataset) else "chat"})
        return 0
    rows = batch_rows(args) if (args.val_dataset or args.dataset) else None  # bad data fails before the load
    engine = load_engine(resolved, args)
    settings = GenerationSettings.from_args(args)
    if rows is not None:
        return batch_infer(engine, settings, args, rows)
    run_chat(engine, settings, verbose=args.verbose, stream=args.stream)
    return 0


def batch_rows(args) -> list[dict]:
    """The conversations of --val_dataset (all rows), else the validation split of --dataset."""
    from zhtune.data import load_datasets

    if args.val_dataset:
        split = load_datasets(args.val_dataset, seed=args.dataset_seed, test_ratio=0.0,
                              model_name=args.model_name, model_author=args.model_author, replies_optional=True)
        return split.train + split.val
    split = load_datasets(args.dataset, seed=args.dataset_seed, test_ratio=args.dataset_test_ratio,
                          model_name=args.model_name, model_author=args.model_author)
    return split.val


def batch_infer(engine, settings, args, rows: list[dict] | None = None) -> int:
    """Rows may end on a user turn (no reference reply); a reference, where present, is kept as `label`.
    Generation is batched by the engine (continuous batching on pt), with a progress bar of items and
    tokens/s."""
    if rows is None:
        rows = batch_rows(args)
    prompts, records = [], []
    for row in rows:
        messages = row["messages"]
        label = messages[-1]["content"] if messages[-1]["role"] == "assistant" else None
        conversation = messages[:-1] if label is not None else messages
        system = conversation[0]["content"] if conversation[0]["role"] == "system" else None
        turns = [m for m in conversation if m["role"] != "system"]
        history = [[turns[i]["content"], turns[i + 1]["content"]] for i in range(0, len(turns) - 1, 2)]
        prompts.append(conversation)
        records.append({"system": system, "query": turns[-1]["content"], "label": label, "history": history})
    with_label = sum(r["label"] is not None for r in records)
    logger.info(f"batch inference: {len(prompts)} rows ({with_label} with a reference reply), "
                f"batch size {args.eval_batch_size}")
    replies = engine.generate(prompts, settings, batch_size=args.eval_batch_size, progress=True)
    for record, reply in zip(records, replies):
        record["response"] = reply
    rows_out = [{k: r[k] for k in ("system", "query", "response", "label", "history")} for r in records]
    if not args.save_result:
        for row in rows_out:
            print(row["response"], flush=True)
        return 0
    if args.result_dir:
        base = Path(args.result_dir)
    else:
        base = Path(args.ckpt_dir) / "infer_result" if args.ckpt_dir else Path("infer_result") / engine.model_type
    out = base / f"{time.strftime('%Y%m%d-%H%M%S')}.jsonl"
    write_jsonl_atomic(out, rows_out)
    logger.info(f"wrote {len(records)} rows to {out}")
    return 0
