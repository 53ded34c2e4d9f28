"""`zhtune sft`: the fine-tuning recipe, top to bottom.

1. resolve the model, template and LoRA targets; load and mix the datasets, encode them
2. load the model, wrap it with LoRA (or train it fully), pick the training path (fast or exact)
3. train with transformers' Trainer: logs, evals, atomic checkpoints, resume
4. close: curves, the best and last checkpoint, and the identity probe when self-cognition was trained
"""

import dataclasses
import functools
import os
import sys
from pathlib import Path

from zhtune.dry_run import print_dry_run
from zhtune.errors import UserError
from zhtune.files import write_json_atomic
from zhtune.log import logger
from zhtune.models.resolve import resolve_from_args
from zhtune.train import launch


def sft_main(args) -> int:
    _check(args)
    resolved = resolve_from_args(args, ckpt_dir=None)
    if args.dry_run:
        return _dry_run(args, resolved)
    if args.resume_from_checkpoint:
        run_dir = Path(args.resume_from_checkpoint).resolve().parent
    else:
        run_dir = launch.new_run_dir(args.output_dir, resolved.model_type, args.add_output_dir_suffix)
    # FSDP and DeepSpeed need a process group, also on one GPU: torchrun makes it
    if (launch.world_size() > 1 or args.fsdp or args.deepspeed) and not launch.is_distributed_child():
        return launch.relaunch_with_torchrun(getattr(args, "argv", None) or sys.argv[2:], run_dir)
    try:
        code = train(args, resolved, launch.shared_run_dir(run_dir))
    finally:
        launch.close_process_group()
    if launch.is_distributed_child():
        launch.leave_distributed_child(code)
    return code


def _check(args) -> None:
    if not args.dataset:
        raise UserError("zhtune sft needs --dataset, e.g. --dataset self-cognition#500 my_data.jsonl.")
    if args.resume_from_checkpoint:
        _check_resume_checkpoint(Path(args.resume_from_checkpoint))
    if args.fsdp:
        from zhtune.train.trainer import fsdp_config
        # a bad value, or --deepspeed beside it, is one line before anything loads
        fsdp_config(args.fsdp, args.gradient_checkpointing, args.deepspeed)
        import torch
        if not torch.cuda.is_available():  # accelerate would quietly run plain DDP instead
            raise UserError("--fsdp needs CUDA GPUs: accelerate runs FSDP on GPUs only (on a CPU it would train "
                            "with plain data parallelism instead). Drop --fsdp to train on the CPU.")
    if args.fp8:
        _check_fp8(args)
    elif args.fp8_recipe:
        raise UserError(f"--fp8_recipe {args.fp8_recipe} chooses --fp8's scales: add --fp8 true, or drop --fp8_recipe.")
    if args.deepspeed:
        try:
            import deepspeed  # noqa: F401
        except ImportError:
            raise UserError("--deepspeed needs DeepSpeed: `pip install 'zhtune[deepspeed]'`, or drop --deepspeed "
                            "to train with DDP.") from None


def _check_fp8(args) -> None:
    """--fp8 true needs LoRA, the fast path, float8 matmuls and, for rowwise scales, torchao: one line before
    anything loads."""
    import torch

    from zhtune.train.fast_path import SHARDING_FLAGS, sharded_head
    from zhtune.train.fp8 import DEFAULT_RECIPE, check_fp8_support
    if args.sft_type != "lora":
        raise UserError("--fp8 true runs LoRA's frozen base weights in float8; with --sft_type full drop --fp8.")
    off = "--fast_path false" if args.fast_path is False else sharded_head(args)
    if off:
        flag = SHARDING_FLAGS.get(off, off)
        raise UserError(f"--fp8 true runs on the fast path's compiled layers, which {off} turns off: drop --fp8 "
                        f"or {flag}.")
    if not torch.cuda.is_available() and args.fast_path is not True:
        raise UserError("--fp8 true runs on the GPU fast path and this machine has no CUDA GPU: drop --fp8 "
                        "(or add --fast_path true to check the float8 path on the CPU, slowly).")
    check_fp8_support(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu",
                      args.fp8_recipe or DEFAULT_RECIPE)


def _check_resume_checkpoint(ckpt: Path) -> None:
    """A checkpoint to resume from is whole (its trainer state reads) before anything is written."""
    import json
    hint = "Give a checkpoint-N folder of an earlier run, written by `zhtune sft`."
    if not ckpt.is_dir():
        raise UserError(f"--resume_from_checkpoint {ckpt}: no such folder. {hint}")
    state = ckpt / "trainer_state.json"
    try:
        json.loads(state.read_text(encoding="utf-8"))["global_step"]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"--resume_from_checkpoint {ckpt}: {state.name} is missing or damaged "
                        f"({type(e).__name__}). {hint}") from e


def lora_plan(args, resolved, model=None) -> tuple[list[str], list[str]]:
    """LoRA targets and fully trained modules, from the model's modules or its architecture table."""
    from zhtune.tuners.lora import modules_of, resolve_modules_to_save, resolve_targets
    if args.sft_type != "lora":
        return [], []
    modules = modules_of(model) if model is not None else resolved.arch.module_names()
    return (resolve_targets(args.lora_target_modules, modules, resolved.info),
            resolve_modules_to_save(args.lora_modules_to_save, modules, resolved.info))


def _dry_run(args, resolved) -> int:
    from zhtune.data import plan_datasets
    targets, to_save = lora_plan(args, resolved)
    plan = plan_datasets(args.dataset, seed=args.dataset_seed, test_ratio=args.dataset_test_ratio,
                         val_entries=args.val_dataset, model_name=args.model_name, model_author=args.model_author)
    world = launch.world_size()
    print_dry_run("sft", args, {
        **resolved.describe(), "sft_type": args.sft_type, "lora_target_modules": targets,
        "lora_modules_to_save": to_save, "datasets": plan.entries, "train_rows": plan.train_rows,
        "val_rows": plan.val_rows, "learning_rate": args.resolved_learning_rate(), "world_size": world,
        "gradient_accumulation_steps": args.resolved_grad_accum(world),
        "output_dir": str(Path(args.output_dir) / resolved.model_type / "v<N>-<time>")})
    return 0


def train(args, resolved, run_dir: Path) -> int:
    import torch
    from transformers import set_seed

    from zhtune.data import encode_rows, format_statistics, load_datasets
    from zhtune.models.loader import load_model_and_tokenizer
    from zhtune.templates import get_template
    from zhtune.train.callbacks import DivergenceGuard, plot_curves

    main = launch.is_main_process()
    set_seed(args.seed)
    split = load_datasets(args.dataset, seed=args.dataset_seed, test_ratio=args.dataset_test_ratio,
                          val_entries=args.val_dataset, model_name=args.model_name, model_author=args.model_author)
    device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
    model, tokenizer = load_model_and_tokenizer(resolved, args.dtype, args.use_flash_attn, device=device,
                                                attn_implementation=_fast_path_attention(args, resolved, device))
    template = get_template(resolved.template, tokenizer)
    if args.system:
        split.train, split.val = _with_system(split.train, args.system), _with_system(split.val, args.system)
    train_set = encode_rows(split.train, template, args.max_length, args.truncation_strategy, args.preprocess_num_proc)
    val_set = encode_rows(split.val, template, args.max_length, args.truncation_strategy, args.preprocess_num_proc)
    logger.info(format_statistics(split, train_set, val_set))
    if not train_set.items:
        raise UserError("no training rows are left after encoding: raise --max_length or use "
                        "--truncation_strategy truncation_left.")

    model = _wrap_model(args, resolved, model)
    fast_path = _pick_training_path(args, model, device)
    sft_args = {**dataclasses.asdict(args), "model_type": resolved.model_type, "template_type": resolved.template,
                "model_id_or_path": args.model_id_or_path, "run_dir": str(run_dir)}
    trainer = _build_trainer(args, model, tokenizer, train_set, val_set, run_dir, sft_args, fast_path, device)
    if main and not args.resume_from_checkpoint:  # a resumed run keeps its folder's own sft_args.json
        write_json_atomic(run_dir / "sft_args.json", sft_args)
    trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    guard = next(c for c in trainer.callback_handler.callbacks if isinstance(c, DivergenceGuard))
    if guard.diverged:
        removed = guard.remove_later_checkpoints(run_dir) if main else []
        raise UserError(guard.message(args.resolved_learning_rate(), removed))
    last = f"checkpoint-{trainer.state.global_step}"
    if not (run_dir / last).is_dir():
        if val_set.items:
            trainer.evaluate()
        trainer._save_checkpoint(trainer.model, None)
    if not main:
        return 0
    plot_curves(run_dir)
    best = trainer.state.best_model_checkpoint or str(run_dir / last)
    if _trains_self_cognition(args) and args.identity_probe:
        if fast_path is not None:
            fast_path.restore_model(trainer.model)
        _identity_probe(args, trainer.model, tokenizer, resolved, run_dir / last)
    logger.info(f"best checkpoint: {best}, last checkpoint: {run_dir / last}")
    return 0


def _wrap_model(args, resolved, model):
    if args.sft_type == "full":
        model.train()
        return model
    from peft import get_peft_model

    from zhtune.tuners.lora import lora_config, train_saved_modules_in_fp32
    targets, to_save = lora_plan(args, resolved, model)
    if args.gradient_checkpointing:
        model.enable_input_require_grads()
    model = get_peft_model(model, lora_config(args, targets, to_save))
    train_saved_modules_in_fp32(model)
    # PEFT would also write the whole base embedding matrix beside the LoRA weights of an embedding
    # target (a guard for resized vocabularies, which zhtune never does): the whole vocabulary per checkpoint.
    model.save_pretrained = functools.partial(model.save_pretrained, save_embedding_layers=False)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    logger.info(f"LoRA on {targets}; fully trained: {to_save or 'none'}; "
        f"trainable {trainable / 1e6:.2f}M of {total / 1e6:.1f}M parameters ({100 * trainable / total:.2f}%)")
    return model


def _fast_path_attention(args, resolved, device: str) -> str | None:
    """On a GPU the fast path runs on flex_attention (document masks, Gemma 2's softcap): load with it."""
    if args.fast_path is False:
        return None
    from zhtune.train.fast_path import attn_implementation
    return attn_implementation(resolved.arch, device)


def _pick_training_path(args, model, device):
    """The GPU fast path where it is supported, else the exact plain path; one log line says which."""
    from zhtune.train.fast_path import FastPath
    fast_path = FastPath.create(model, device, args)
    if fast_path is None and args.fp8:
        raise UserError("--fp8 true runs on the GPU fast path, and this run takes the exact plain path (the line "
                        "above says why); drop --fp8, or remove what keeps the fast path off.")
    if fast_path is not None:
        levers = fast_path.prepare_model(model)
        if levers:
            logger.info(f"fast path levers: {', '.join(levers)}")
    return fast_path


def _build_trainer(args, model, tokenizer, train_set, val_set, run_dir, sft_args, fast_path, device):
    import torch

    from zhtune.train.callbacks import DivergenceGuard, JsonlLogger, StepHeartbeat
    from zhtune.train.trainer import ZhTrainer, argmax_logits, plain_collator, token_accuracy, training_arguments

    bf16 = next(model.parameters()).dtype == torch.bfloat16
    train_rows = [{"input_ids": e.input_ids, "labels": e.labels} for e in train_set.items]
    val_rows = [{"input_ids": e.input_ids, "labels": e.labels} for e in val_set.items]
    collator = plain_collator(tokenizer, model)
    if fast_path is not None:
        train_rows, collator = fast_path.prepare_data(train_set.items, args, tokenizer)
    hf_args = training_arguments(args, run_dir, world=launch.world_size(), bf16=bf16, has_val=bool(val_rows),
                                 on_gpu=device.startswith("cuda"))
    trainer = ZhTrainer(model=model, args=hf_args, train_dataset=train_rows, eval_dataset=val_rows or None,
                        data_collator=collator, compute_metrics=token_accuracy,
                        preprocess_logits_for_metrics=argmax_logits, sft_args=sft_args, fast_path=fast_path)
    if args.fsdp and not trainer.is_fsdp_enabled:
        raise UserError(f"--fsdp {args.fsdp}: accelerate did not turn FSDP on (it chose "
                        f"{trainer.accelerator.distributed_type}); nothing was trained.")
    trainer.add_callback(JsonlLogger(run_dir, trainer))
    trainer.add_callback(DivergenceGuard())
    compiling = fast_path is not None and fast_path.compiles()
    trainer.add_callback(StepHeartbeat(first_step_note="the first training steps compile the decoder layers "
                                       "(torch.compile, one-time: minutes on a GPU; later steps are fast)"
                                       if compiling else None))
    planned = fast_path is not None and fast_path.chunked_loss  # ZeRO-3 / FSDP checkpoint every layer
    if planned and args.gradient_checkpointing and device.startswith("cuda"):
        from zhtune.train.memory_plan import CheckpointPlanner, mlp_output_bytes
        trainer.add_callback(CheckpointPlanner(model, budget_gib=args.memory_budget_gib,
                                               keep_cost=mlp_output_bytes(model, fast_path.one_shape_tokens(args))))
    elif args.memory_budget_gib:
        logger.warning(f"--memory_budget_gib {args.memory_budget_gib:g} is not used: it plans the GPU fast path's "
                       "activation checkpointing, and this run " + ("has no GPU" if not device.startswith("cuda") else
                       "trains on the plain path" if fast_path is None else
                       "shards the model (ZeRO-3 / FSDP)" if not planned else "has --gradient_checkpointing false"))
    return trainer


def _with_system(rows: list[dict], system: str) -> list[dict]:
    """--system for every row that brings none of its own."""
    return [row if row["messages"][0]["role"] == "system" else
            {**row, "messages": [{"role": "system", "content": system}] + row["messages"]} for row in rows]


def _trains_self_cognition(args) -> bool:
    from zhtune.data import describe_entries
    return any(entry["name"] == "self-cognition" for entry in describe_entries(args.dataset))


def _identity_probe(args, model, tokenizer, resolved, ckpt_dir: Path) -> None:
    """Ask the trained model the held-out identity questions; save and print the score."""
    from zhtune.eval.self_cognition import score_identity
    from zhtune.infer.pt_engine import PtEngine
    from zhtune.templates import get_template
    engine = PtEngine(model, tokenizer, get_template(resolved.template, tokenizer), name=ckpt_dir.name,
                      model_type=resolved.model_type, system=args.system)
    logger.info(f"identity probe: asking the held-out identity questions (at most "
                f"{args.identity_probe_max_new_tokens} new tokens each; --identity_probe false skips it)")
    result = score_identity(engine, args.model_name, args.model_author, progress=True,
                            max_new_tokens=args.identity_probe_max_new_tokens)
    write_json_atomic(ckpt_dir.parent / "identity_probe.json", result)
    logger.info(f"identity probe: {result['score']:.2%} of {result['total']} held-out questions name "
                f"{'/'.join(args.model_name)} and {'/'.join(args.model_author)}")
