"""`training_arguments`: zhtune's (ms-swift v2's) sft flags -> transformers' TrainingArguments; and the
private transformers API the trainer relies on (`PRIVATE_API`) still exists with the same parameters."""

import importlib
import inspect
import json

import pytest
import transformers

from zhtune.args import SftArguments, parse_args
from zhtune.errors import UserError
from zhtune.train.trainer import PRIVATE_API, deepspeed_config, fsdp_config, training_arguments


def _sft(*argv) -> SftArguments:
    return parse_args(SftArguments, list(argv))


def _kwargs(monkeypatch, args, **where) -> dict:
    """The values training_arguments gives TrainingArguments, without its __post_init__ (whose device
    setup would start a process group for world > 1); an unknown parameter name still fails."""
    from transformers.training_args import TrainingArguments
    with monkeypatch.context() as m:
        m.setattr(TrainingArguments, "__post_init__", lambda self: None)
        hf = training_arguments(args, "run", **{"world": 1, "bf16": False, "has_val": True, "on_gpu": False,
                                                **where})
    return vars(hf)


def test_ms_swift_names_map_onto_training_arguments(tmp_path):
    args = _sft("--batch_size", "2", "--warmup_ratio", "0.1", "--learning_rate", "5e-5", "--adam_beta2", "0.95",
                "--eval_steps", "7", "--logging_steps", "3", "--lr_scheduler_type", "linear", "--max_steps", "200")
    hf = training_arguments(args, tmp_path, world=1, bf16=False, has_val=True, on_gpu=False)
    assert hf.output_dir == str(tmp_path) and hf.per_device_train_batch_size == 2
    assert hf.per_device_eval_batch_size == 2  # --eval_batch_size defaults to --batch_size
    # --warmup_ratio is a share of the steps: transformers 5 reads a float below 1 in warmup_steps so
    assert hf.get_warmup_steps(200) == 20
    assert hf.learning_rate == 5e-5 and hf.adam_beta2 == 0.95 and hf.max_steps == 200
    assert str(hf.lr_scheduler_type.value) == "linear"
    assert hf.eval_steps == 7 and hf.save_steps == 7  # --save_steps defaults to --eval_steps
    assert hf.logging_steps == 3 and hf.seed == args.seed
    assert hf.save_total_limit == 2 and hf.metric_for_best_model == "loss" and hf.greater_is_better is False
    assert hf.use_cpu and hf.ddp_backend is None and hf.deepspeed is None


def test_save_total_limit_minus_one_keeps_everything(tmp_path):
    hf = training_arguments(_sft("--save_total_limit", "-1"), tmp_path, world=1, bf16=False, has_val=False,
                            on_gpu=False)
    assert hf.save_total_limit is None
    assert str(hf.eval_strategy.value) == "no" and hf.metric_for_best_model is None


def test_gradient_accumulation_default_is_16_over_batch_and_world(monkeypatch):
    assert _kwargs(monkeypatch, _sft())["gradient_accumulation_steps"] == 16
    assert _kwargs(monkeypatch, _sft("--batch_size", "2"), world=4)["gradient_accumulation_steps"] == 2
    assert _kwargs(monkeypatch, _sft("--batch_size", "3"), world=2)["gradient_accumulation_steps"] == 3  # ceil
    assert _kwargs(monkeypatch, _sft("--batch_size", "32"))["gradient_accumulation_steps"] == 1
    assert _kwargs(monkeypatch, _sft("--gradient_accumulation_steps", "5"), world=8)["gradient_accumulation_steps"] == 5


def test_gloo_only_when_distributed_on_a_cpu(monkeypatch):
    assert _kwargs(monkeypatch, _sft(), world=2, on_gpu=False)["ddp_backend"] == "gloo"
    assert _kwargs(monkeypatch, _sft(), world=2, on_gpu=True)["ddp_backend"] is None
    assert _kwargs(monkeypatch, _sft(), world=1, on_gpu=False)["ddp_backend"] is None
    on_gpu = _kwargs(monkeypatch, _sft(), world=1, on_gpu=True, bf16=True)
    assert on_gpu["use_cpu"] is False and on_gpu["bf16"] is True


def test_deepspeed_presets_and_files(monkeypatch, tmp_path):
    zero2, zero3 = deepspeed_config("default-zero2"), deepspeed_config("default-zero3")
    assert zero2["zero_optimization"]["stage"] == 2 and zero3["zero_optimization"]["stage"] == 3
    assert zero3["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    assert "stage3_gather_16bit_weights_on_model_save" not in zero2["zero_optimization"]
    for preset in (zero2, zero3):  # the Trainer fills these in from TrainingArguments
        assert preset["train_micro_batch_size_per_gpu"] == preset["gradient_accumulation_steps"] == "auto"
        assert preset["bf16"] == {"enabled": "auto"}
    assert deepspeed_config(None) is None and deepspeed_config("") is None
    own = tmp_path / "ds.json"
    own.write_text(json.dumps({"zero_optimization": {"stage": 1}}))
    assert deepspeed_config(str(own)) == str(own)
    with pytest.raises(UserError, match="default-zero2, default-zero3 or a JSON config file"):
        deepspeed_config("default-zero4")
    assert _kwargs(monkeypatch, _sft("--deepspeed", "default-zero3"))["deepspeed"] == zero3


def test_fsdp_maps_onto_fsdp2(monkeypatch, tmp_path):
    preset = fsdp_config("fsdp2")  # ms-swift's preset name: full_shard auto_wrap, FSDP2
    assert preset == {"version": 2, "reshard_after_forward": True, "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
                      "state_dict_type": "FULL_STATE_DICT", "cpu_ram_efficient_loading": False,
                      "activation_checkpointing": True}
    assert fsdp_config(None) is None and fsdp_config("") is None
    assert fsdp_config("fsdp2", gradient_checkpointing=False)["activation_checkpointing"] is False
    # transformers' legacy option words, translated here (transformers 5.17 deprecates the string form)
    assert fsdp_config("full_shard auto_wrap") == preset
    grad_op = fsdp_config("shard_grad_op auto_wrap offload")
    assert grad_op["reshard_after_forward"] is False and grad_op["cpu_offload"] is True
    with pytest.raises(UserError, match="only FSDP1"):
        fsdp_config("hybrid_shard")
    with pytest.raises(UserError, match="unknown option 'full_shrad'"):
        fsdp_config("full_shrad auto_wrap")
    # ms-swift's JSON form: {"fsdp": options, "fsdp_config": {...}}; its keys win, fsdp_ prefixes dropped
    own = tmp_path / "fsdp2.json"
    own.write_text(json.dumps({"_description": "x", "fsdp": "shard_grad_op auto_wrap", "fsdp_config": {
        "fsdp_version": 2, "state_dict_type": "SHARDED_STATE_DICT", "activation_checkpointing": False,
        "_note": "ignored"}}))
    mine = fsdp_config(str(own))
    assert mine["reshard_after_forward"] is False and mine["state_dict_type"] == "SHARDED_STATE_DICT"
    assert mine["activation_checkpointing"] is False and "_note" not in mine and "fsdp_version" not in mine
    own.write_text(json.dumps({"fsdp": "full_shard", "fsdp_config": {"fsdp_version": 1}}))
    with pytest.raises(UserError, match="FSDP2 only"):
        fsdp_config(str(own))
    with pytest.raises(UserError, match="no such file"):
        fsdp_config(str(tmp_path / "missing.json"))
    # into TrainingArguments: fsdp=True + the config; transformers' own checkpointing off (FSDP's instead)
    kwargs = _kwargs(monkeypatch, _sft("--fsdp", "fsdp2"))
    assert kwargs["fsdp"] is True and kwargs["fsdp_config"] == preset
    assert not kwargs.get("gradient_checkpointing", kwargs.get("activation_checkpointing"))
    assert "fsdp" not in {k for k, v in _kwargs(monkeypatch, _sft()).items() if v is True}
    with pytest.raises(UserError, match="give one of them"):
        _kwargs(monkeypatch, _sft("--fsdp", "fsdp2", "--deepspeed", "default-zero2"))


def test_fsdp_reaches_accelerate_as_fsdp2(tmp_path):
    """transformers turns the config into accelerate's FSDP plugin arguments, version 2."""
    hf = training_arguments(_sft("--fsdp", "shard_grad_op"), tmp_path, world=1, bf16=False, has_val=False,
                            on_gpu=False)
    plugin = hf.fsdp_plugin_args
    assert plugin["fsdp_version"] == 2 and plugin["reshard_after_forward"] is False
    assert plugin["auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP" and plugin["state_dict_type"] == "FULL_STATE_DICT"
    assert plugin["activation_checkpointing"] is True


def _resolve_private(name: str):
    """'Trainer._save_checkpoint' -> transformers.Trainer._save_checkpoint; 'trainer_utils.x' -> the
    function x of the module transformers.trainer_utils."""
    owner, attr = name.rsplit(".", 1)
    try:
        container = importlib.import_module(f"transformers.{owner}")
    except ImportError:
        container = getattr(transformers, owner)
    return getattr(container, attr)


@pytest.mark.parametrize("name", sorted(PRIVATE_API))
def test_private_transformers_api_is_still_there(name):
    expected = list(PRIVATE_API[name])
    where = f"transformers {transformers.__version__}"
    try:
        target = _resolve_private(name)
    except AttributeError:
        pytest.fail(f"{where} has no {name}: zhtune.train.trainer's checkpoint section relies on it "
                    "(see PRIVATE_API); adapt ZhTrainer or pin transformers.")
    params = inspect.signature(target).parameters
    got = list(params)[:len(expected)]
    assert got == expected, (f"{where}: {name} takes ({', '.join(params)}), zhtune calls it as "
                             f"({', '.join(expected)}); adapt ZhTrainer or pin transformers.")
    required_extra = [p for p in list(params)[len(expected):] if params[p].default is inspect.Parameter.empty
                      and params[p].kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)]
    assert not required_extra, f"{where}: {name} now also requires {required_extra}, which zhtune does not pass."


@pytest.mark.parametrize("attention, width", [("flex_attention", 128), ("eager", 7)])
def test_plain_path_pads_flex_attention_batches_to_whole_blocks(tiny_models, gemma_tokenizer, attention, width):
    """A batch shorter than 128 tokens on flex_attention failed to compile for Gemma 2 on the H200
    (flex-decoding kernel, no valid configuration for head size 256); other attentions pad to the longest row."""
    from transformers import AutoModelForCausalLM

    from zhtune.train.trainer import plain_collator
    model = AutoModelForCausalLM.from_pretrained(tiny_models["gemma2"], attn_implementation=attention)
    batch = plain_collator(gemma_tokenizer, model)([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]},
                                                     {"input_ids": [8, 9, 10, 11, 12, 13, 14], "labels": [8] * 7}])
    assert batch["input_ids"].shape == (2, width) and batch["labels"].shape == (2, width)
    assert int(batch["attention_mask"].sum()) == 10 and int((batch["labels"] != -100).sum()) == 9


def test_checkpoint_saves_modules_to_save_under_activation_checkpointing_wrappers(tiny_models, tmp_path):
    """FSDP2's activation checkpointing wraps each decoder layer (torch's checkpoint_wrapper); its state
    dict drops the wrapper from the keys but PEFT looked the seed's `--lora_modules_to_save LN` up by
    module name: saving failed with KeyError on the H200. ZhTrainer's save writes the same adapter as
    an unwrapped model's."""
    import torch
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (apply_activation_checkpointing,
                                                                             checkpoint_wrapper)
    from transformers import AutoModelForCausalLM, TrainingArguments

    from zhtune.train.trainer import ZhTrainer

    def lora_model():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(tiny_models["gemma2"], dtype=torch.float32)
        config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                            modules_to_save=["input_layernorm", "post_attention_layernorm"])
        return get_peft_model(model, config)

    plain = lora_model()
    plain.save_pretrained(tmp_path / "plain")
    expected = load_file(tmp_path / "plain" / "adapter_model.safetensors")
    assert any("input_layernorm" in k for k in expected) and any("lora_A" in k for k in expected)

    wrapped = lora_model()
    layer_class = type(wrapped.base_model.model.model.layers[0])
    apply_activation_checkpointing(wrapped, checkpoint_wrapper_fn=checkpoint_wrapper,
                                   check_fn=lambda m: isinstance(m, layer_class))
    assert any("_checkpoint_wrapped_module" in name for name, _ in wrapped.named_modules())
    with pytest.raises(KeyError, match="modules_to_save"):  # PEFT on its own: the bug
        wrapped.save_pretrained(tmp_path / "bare", state_dict=wrapped.state_dict())

    trainer = ZhTrainer(model=wrapped, args=TrainingArguments(tmp_path / "run", use_cpu=True, report_to=[]),
                        sft_args={})
    trainer._save(str(tmp_path / "ours"), state_dict=wrapped.state_dict())
    saved = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert saved.keys() == expected.keys()
    assert all(torch.equal(saved[k], expected[k]) for k in expected)
    assert "named_modules" not in wrapped.__dict__  # the model is left as it was


def test_fsdp2_reduces_gradients_in_fp32_and_keeps_the_fp32_loss():
    """accelerate's FSDP2 policy for bf16 averages gradients in bf16 and casts the outputs, the loss included, to
    bf16 (the logged loss moved in steps of 1/16); zhtune's keeps bf16 compute only."""
    import torch
    from accelerate.utils import FullyShardedDataParallelPlugin

    from zhtune.train.trainer import fsdp_mixed_precision
    plugin = FullyShardedDataParallelPlugin(fsdp_version=2)
    plugin.set_mixed_precision("bf16")
    default = plugin.mixed_precision_policy
    assert (default.param_dtype, default.reduce_dtype, default.output_dtype) == (torch.bfloat16,) * 3
    ours = fsdp_mixed_precision(default)
    assert (ours.param_dtype, ours.reduce_dtype, ours.output_dtype) == (torch.bfloat16, torch.float32, None)
    assert fsdp_mixed_precision(None) is None
    plugin = FullyShardedDataParallelPlugin(fsdp_version=2)
    plugin.set_mixed_precision("fp32")
    assert fsdp_mixed_precision(plugin.mixed_precision_policy) is plugin.mixed_precision_policy
