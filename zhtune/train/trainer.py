"""transformers' Trainer with what zhtune adds: atomic checkpoints that carry sft_args.json, the fast
path's loss, a count of real tokens, token accuracy at evaluation, and FSDP2's mixed precision with fp32
gradient averaging; and `training_arguments`, the one mapping from zhtune's (ms-swift's) sft flags to
transformers' TrainingArguments.

zhtune needs transformers >= 5.17 (pyproject). Five pieces of transformers' Trainer beyond its documented
arguments are used: in `ZhTrainer`'s checkpoint section below `Trainer._get_output_dir(trial)`,
`Trainer._save_checkpoint(model, trial)`, `Trainer._save(output_dir, state_dict)` and
`transformers.trainer_utils.rotate_checkpoints`; and `Trainer.create_accelerator_and_postprocess()` (FSDP2's
policy). `PRIVATE_API` names them with the parameters relied on; tests/test_trainer.py fails loudly when a
transformers release changes them.
"""

import contextlib
import os
import shutil
from pathlib import Path

import torch
from transformers import Trainer

from zhtune.errors import UserError
from zhtune.files import write_json_atomic
from zhtune.templates import IGNORE_INDEX
from zhtune.train.packing import count_tokens

STAGING = ".tmp-checkpoint"
PRIVATE_API = {"Trainer._get_output_dir": ("self", "trial"), "Trainer._save_checkpoint": ("self", "model", "trial"),
               "Trainer._save": ("self", "output_dir", "state_dict"),
               "Trainer.create_accelerator_and_postprocess": ("self",),
               "trainer_utils.rotate_checkpoints": ("output_dir", "save_total_limit", "best_model_checkpoint",
                                                    "use_mtime")}


def training_arguments(args, run_dir, *, world: int, bf16: bool, has_val: bool, on_gpu: bool):
    """transformers TrainingArguments for `zhtune sft` arguments (ms-swift v2 names and defaults)."""
    from transformers import TrainingArguments
    fsdp = fsdp_config(getattr(args, "fsdp", None), args.gradient_checkpointing, args.deepspeed)
    return TrainingArguments(
        output_dir=str(run_dir), per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.eval_batch_size or args.batch_size,
        gradient_accumulation_steps=args.resolved_grad_accum(world), learning_rate=args.resolved_learning_rate(),
        adam_beta1=args.adam_beta1, adam_beta2=args.adam_beta2, adam_epsilon=args.adam_epsilon,
        weight_decay=args.weight_decay, max_grad_norm=args.max_grad_norm,
        warmup_steps=args.warmup_ratio,  # transformers 5: a float below 1 is a share of the total steps
        lr_scheduler_type=args.lr_scheduler_type, num_train_epochs=args.num_train_epochs, max_steps=args.max_steps,
        eval_strategy="steps" if has_val else "no", eval_steps=args.eval_steps, save_strategy="steps",
        save_steps=args.save_steps or args.eval_steps,
        save_total_limit=None if args.save_total_limit < 0 else args.save_total_limit,
        logging_steps=args.logging_steps, logging_first_step=True,
        logging_nan_inf_filter=False,  # a loss that is nan is logged as nan (DivergenceGuard stops the run)
        # under FSDP the checkpointing is FSDP's own (fsdp_config activation_checkpointing), as ms-swift does
        gradient_checkpointing=args.gradient_checkpointing and not fsdp,
        gradient_checkpointing_kwargs={"use_reentrant": False}, seed=args.seed, data_seed=args.seed, bf16=bf16,
        report_to=["tensorboard"], remove_unused_columns=False, dataloader_num_workers=0,
        metric_for_best_model="loss" if has_val else None, greater_is_better=False if has_val else None,
        ddp_backend="gloo" if world > 1 and not on_gpu else None, ddp_find_unused_parameters=False,
        deepspeed=deepspeed_config(args.deepspeed), use_cpu=not on_gpu, save_only_model=False,
        **({"fsdp": True, "fsdp_config": fsdp} if fsdp else {}),
    )


def plain_collator(tokenizer, model):
    """The plain path's collator: rows padded to the longest in the batch, labels with -100. A model on
    flex_attention gets batches padded to whole 128-token blocks: on a shorter batch inductor lowers
    flex_attention to its flex-decoding kernel, which has no valid configuration for Gemma 2's head
    size 256 (NoValidChoicesError on an H200, measured 2026-11-29); padded to 128 it trains, exactly
    (the padding is masked and carries no label)."""
    from transformers import DataCollatorForSeq2Seq

    from zhtune.templates import IGNORE_INDEX
    from zhtune.train.packing import FLEX_BLOCK
    flex = getattr(model.config, "_attn_implementation", None) == "flex_attention"
    return DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX,
                                  pad_to_multiple_of=FLEX_BLOCK if flex else None)


def deepspeed_config(value: str | None):
    """--deepspeed default-zero2 | default-zero3 | FILE.json -> what TrainingArguments takes."""
    if not value:
        return None
    stage = {"default-zero2": 2, "default-zero3": 3}.get(value)
    if stage is not None:
        zero = {"stage": stage, "overlap_comm": True, "contiguous_gradients": True}
        if stage == 3:
            zero["stage3_gather_16bit_weights_on_model_save"] = True
        return {"zero_optimization": zero, "bf16": {"enabled": "auto"}, "train_micro_batch_size_per_gpu": "auto",
                "gradient_accumulation_steps": "auto", "gradient_clipping": "auto"}
    if not Path(value).is_file():
        raise UserError(f"--deepspeed {value}: give default-zero2, default-zero3 or a JSON config file.")
    return value


FSDP_OPTIONS = {"full_shard": {"reshard_after_forward": True}, "shard_grad_op": {"reshard_after_forward": False},
                "offload": {"cpu_offload": True}, "auto_wrap": {}}
FSDP_ONLY_V1 = ("no_shard", "hybrid_shard", "hybrid_shard_zero2")


def fsdp_config(value: str | None, gradient_checkpointing: bool = True, deepspeed: str | None = None) -> dict | None:
    """--fsdp (ms-swift's flag) -> transformers' fsdp_config for PyTorch FSDP2 (TrainingArguments
    fsdp=True), or None.

    - `fsdp2`: ms-swift's preset: full_shard auto_wrap, i.e. parameters, gradients and optimizer state
      sharded, each decoder layer its own FSDP unit (TRANSFORMER_BASED_WRAP); parameters resharded after
      the forward. Unlike ms-swift's preset the state dict is FULL_STATE_DICT (the checkpoint holds the
      PEFT adapter files that `zhtune infer/export` read, not per-rank shards) and loading is not
      rank-0-only (zhtune loads the model on every rank).
    - a JSON file as ms-swift's: {"fsdp": "full_shard auto_wrap", "fsdp_config": {...}}; its
      fsdp_config keys win (`fsdp_` prefixes are dropped, as transformers does).
    - options, transformers' legacy words: full_shard | shard_grad_op (reshard after forward or not),
      offload (CPU offload), auto_wrap (the default wrapping). FSDP1-only strategies are refused.
    Activation checkpointing is FSDP's own (`activation_checkpointing`: --gradient_checkpointing),
    replacing transformers' gradient_checkpointing, which under FSDP gathers every layer's parameters
    once more in the backward. `deepspeed` (--deepspeed) given beside it is refused.
    """
    if not value:
        return None
    if deepspeed:
        raise UserError("--fsdp and --deepspeed are two ways to shard the model: give one of them.")
    config = {"version": 2, "reshard_after_forward": True, "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
              "state_dict_type": "FULL_STATE_DICT", "cpu_ram_efficient_loading": False,
              "activation_checkpointing": bool(gradient_checkpointing)}
    if value == "fsdp2":
        return config
    own = {}
    options = value
    if value.endswith(".json"):
        import json
        if not Path(value).is_file():
            raise UserError(f"--fsdp {value}: no such file. Give fsdp2, a JSON file or options such as "
                            "'full_shard auto_wrap'.")
        try:
            data = json.loads(Path(value).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise UserError(f"--fsdp {value}: not a readable JSON file ({type(e).__name__}).") from e
        if not isinstance(data, dict) or not isinstance(data.get("fsdp_config", {}), dict):
            raise UserError(f"--fsdp {value}: expected {{\"fsdp\": \"full_shard auto_wrap\", \"fsdp_config\": {{...}}}}.")
        options = data.get("fsdp", "full_shard auto_wrap")
        own = {(k[5:] if k.startswith("fsdp_") else k): v for k, v in data.get("fsdp_config", {}).items()
               if not k.startswith("_")}
    words = options.split() if isinstance(options, str) else list(options)
    for word in words:
        if word in FSDP_ONLY_V1:
            raise UserError(f"--fsdp {word}: only FSDP1 has it, and zhtune runs FSDP2 (transformers drops FSDP1); "
                            "use full_shard or shard_grad_op.")
        if word not in FSDP_OPTIONS:
            raise UserError(f"--fsdp: unknown option '{word}'; give fsdp2, a JSON file, or some of "
                            f"{', '.join(FSDP_OPTIONS)}.")
        config.update(FSDP_OPTIONS[word])
    config.update(own)
    if int(config.get("version", 2)) != 2:
        raise UserError(f"--fsdp {value}: fsdp_version {config['version']}; zhtune runs FSDP2 only.")
    return config


def fsdp_mixed_precision(policy):
    """FSDP2's mixed precision as zhtune runs it: accelerate's policy for --bf16 computes in bf16 (kept), but
    also averages the gradients over the GPUs in bf16 and casts the model's outputs to bf16, the loss included:
    the logged loss was rounded to steps of 1/16 (13.1875, 13.25). Here the gradients are reduced in fp32, as
    torchtitan does (the LoRA gradients are a few MB), and the outputs keep the dtype they were computed in
    (transformers' loss is fp32, the logits bf16)."""
    import torch
    from torch.distributed.fsdp import MixedPrecisionPolicy
    if policy is None or getattr(policy, "param_dtype", None) not in (torch.bfloat16, torch.float16):
        return policy
    return MixedPrecisionPolicy(param_dtype=policy.param_dtype, reduce_dtype=torch.float32, output_dtype=None,
                                cast_forward_inputs=policy.cast_forward_inputs)


class ZhTrainer(Trainer):
    def __init__(self, *args, sft_args: dict, fast_path=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.sft_args = sft_args
        self.fast_path = fast_path
        self.tokens_seen = 0  # this process's real (non-padding) tokens; trained: those with a label (tensors
                              # on the batch's device once training starts, read at log time only)
        self.trained_tokens_seen = 0
        self._staging = False

    def create_accelerator_and_postprocess(self):
        super().create_accelerator_and_postprocess()
        plugin = getattr(self.accelerator.state, "fsdp_plugin", None)
        if plugin is not None and getattr(plugin, "fsdp_version", 2) == 2:
            plugin.mixed_precision_policy = fsdp_mixed_precision(plugin.mixed_precision_policy)

    # -- loss ------------------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if model.training:
            real, trained = count_tokens(inputs, getattr(self.data_collator, "pad_id", -1))
            self.tokens_seen += real
            self.trained_tokens_seen += trained
        if self.fast_path is not None and model.training and not return_outputs:
            loss = self.fast_path.compute_loss(model, inputs, num_items_in_batch=num_items_in_batch)
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                # num_items_in_batch counts every rank's tokens; DDP averages the gradients over ranks
                loss = loss * self.accelerator.num_processes
            return loss
        if "position_ids" in inputs and "attention_mask" not in inputs:
            inputs = {**inputs, "use_cache": False}  # packed rows: transformers reads documents from position_ids
        return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                    num_items_in_batch=num_items_in_batch)

    def evaluate(self, *args, **kwargs):
        """An evaluation longer than the heartbeat interval (the first one compiles on a GPU) says it is alive."""
        from zhtune.log import still_running
        from zhtune.train import callbacks
        with still_running(f"evaluating at step {self.state.global_step}", every=callbacks.HEARTBEAT_EVERY):
            return super().evaluate(*args, **kwargs)

    # -- checkpoints -----------------------------------------------------------------------------
    def _save(self, output_dir=None, state_dict=None):
        with checkpoint_wrapper_names_hidden(self.model):
            return super()._save(output_dir, state_dict=state_dict)

    def _get_output_dir(self, trial):
        base = super()._get_output_dir(trial)
        return os.path.join(base, STAGING) if self._staging else base

    def _save_checkpoint(self, model, trial):
        """Write checkpoint-N under a staging folder, then rename it into place: a run killed while
        saving leaves the previous checkpoints whole and no half folder named checkpoint-N."""
        run_dir = self.args.output_dir
        name = f"checkpoint-{self.state.global_step}"
        self._staging = True
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._staging = False
        # every rank writes its own rng_state_<rank>.pth into the staging folder: all of them must be
        # done before rank 0 renames it, or a late rank writes into a folder that is gone
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            staged = Path(run_dir) / STAGING / name
            write_json_atomic(staged / "sft_args.json", self.sft_args)
            generation_config = getattr(self.model, "generation_config", None)
            if generation_config is not None:
                generation_config.save_pretrained(staged)
            final = Path(run_dir) / name
            if final.exists():
                shutil.rmtree(final)
            os.replace(staged, final)
            shutil.rmtree(Path(run_dir) / STAGING, ignore_errors=True)
            self._rotate(run_dir)
        if self.state.best_global_step:
            self.state.best_model_checkpoint = os.path.join(run_dir, f"checkpoint-{self.state.best_global_step}")
        self.accelerator.wait_for_everyone()

    def _rotate(self, run_dir: str) -> None:
        """Keep --save_total_limit checkpoints (the best and the latest always stay)."""
        from transformers.trainer_utils import rotate_checkpoints
        best = self.state.best_model_checkpoint
        if best and STAGING in best:
            best = None
        rotate_checkpoints(output_dir=run_dir, save_total_limit=self.args.save_total_limit,
                           best_model_checkpoint=best, use_mtime=False)


@contextlib.contextmanager
def checkpoint_wrapper_names_hidden(model):
    """Within the block, `model.named_modules()` names modules without torch's activation-checkpointing
    wrapper (`._checkpoint_wrapped_module`), as the state dict names them.

    FSDP2's activation checkpointing (--fsdp with --gradient_checkpointing) wraps each decoder layer; its
    full state dict drops the wrapper from the keys, but PEFT finds each `modules_to_save` module by its
    `named_modules()` name (it strips only FSDP1's prefix), so saving the seed's `--lora_modules_to_save LN`
    failed with KeyError 'modules_to_save.default.weight' (H200, 2026-11-29)."""
    wrapped = "_checkpoint_wrapped_module"
    named = type(model).named_modules
    if not any(wrapped in name for name, _ in named(model)):
        yield
        return

    def named_modules(*args, **kwargs):
        for name, module in named(model, *args, **kwargs):
            yield name.replace(f".{wrapped}", "").replace(f"{wrapped}.", ""), module
    model.named_modules = named_modules
    try:
        yield
    finally:
        del model.named_modules


def token_accuracy(eval_pred) -> dict:
    """Share of label tokens the model predicts exactly (next-token, teacher-forced)."""
    preds, labels = eval_pred.predictions, eval_pred.label_ids
    preds, labels = torch.as_tensor(preds)[:, :-1], torch.as_tensor(labels)[:, 1:]
    mask = labels != IGNORE_INDEX
    return {"token_acc": float((preds[mask] == labels[mask]).float().mean()) if mask.any() else 0.0}


def argmax_logits(logits, labels):
    if isinstance(logits, tuple):
        logits = logits[0]
    return logits.argmax(dim=-1)
