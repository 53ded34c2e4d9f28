"""The seed document's commands, with `zhtune` for `swift`, parse and resolve (--dry_run true)."""

import json
import os
import shlex
import subprocess
import sys

import pytest

from zhtune.args import EvalArguments, InferArguments, SftArguments, parse_args
from zhtune.errors import UserError

SEED_COMMANDS = {
    "infer_base": ("CUDA_VISIBLE_DEVICES=0", "zhtune infer --model_id_or_path LLM-Research/gemma-2-9b-it --infer_backend vllm"),
    "eval_base": ("CUDA_VISIBLE_DEVICES=0", "zhtune eval --model_id_or_path LLM-Research/gemma-2-9b-it "
                  "--eval_dataset arc ceval gsm8k mmlu --eval_backend Native --infer_backend vllm"),
    "sft": ("MASTER_PORT=29500 NPROC_PER_NODE=4 CUDA_VISIBLE_DEVICES=0,1,2,3",
            "zhtune sft --model_id_or_path LLM-Research/gemma-2-9b-it "
            "--dataset swift-mix:sharegpt#10000 swift-mix:firefly#5000 swift-mix#5000 swift-mix:metamathqa#5000 "
            "self-cognition#500 --lora_target_modules EMBEDDING ALL lm_head --lora_modules_to_save LN "
            "--adam_beta2 0.95 --learning_rate 5e-5 --num_train_epochs 5 --eval_steps 100 --max_length 8192 "
            "--gradient_accumulation_steps 16 --model_name 小黄 'Xiao Huang' --model_author 魔搭 ModelScope "
            "--save_total_limit -1 --logging_steps 5 --use_flash_attn true"),
    "infer_ckpt": ("CUDA_VISIBLE_DEVICES=0", "zhtune infer --ckpt_dir output/gemma2-9b-instruct/vx-xxx/checkpoint-xxx "
                   "--infer_backend vllm --merge_lora true"),
    "eval_ckpt": ("CUDA_VISIBLE_DEVICES=0", "zhtune eval --ckpt_dir output/gemma2-9b-instruct/vx-xxx/checkpoint-xxx "
                  "--eval_dataset arc ceval gsm8k mmlu --eval_backend Native --infer_backend vllm --merge_lora true"),
}


def run_cli(command: str, env_prefix: str = "", cwd=None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    for pair in shlex.split(env_prefix):
        key, value = pair.split("=", 1)
        env[key] = value
    argv = shlex.split(command)
    assert argv[0] == "zhtune"
    return subprocess.run([sys.executable, "-m", "zhtune", *argv[1:]], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=300)


def last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", list(SEED_COMMANDS))
def test_seed_command_dry_run(name, tmp_path):
    env_prefix, command = SEED_COMMANDS[name]
    result = run_cli(command + " --dry_run true", env_prefix, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    info = last_json(result.stdout)
    assert info["command"] == command.split()[1]
    assert info["model_type"] == "gemma2-9b-instruct"
    assert info["template"] == "gemma"
    if name == "sft":
        assert info["lora_target_modules"] == ["embed_tokens", "down_proj", "gate_proj", "k_proj", "o_proj", "q_proj",
                                               "up_proj", "v_proj", "lm_head"]
        assert "post_feedforward_layernorm" in info["lora_modules_to_save"]
        assert [d["requested"] for d in info["datasets"]] == [10000, 5000, 5000, 5000, 500]
        assert info["world_size"] == 4 and info["gradient_accumulation_steps"] == 16
        assert info["learning_rate"] == 5e-5
    assert not (tmp_path / "output").exists(), "a dry run writes nothing"


def test_help_lists_the_five_commands():
    result = run_cli("zhtune --help")
    assert result.returncode == 0
    for command in ("sft", "infer", "eval", "export", "deploy"):
        assert f"  {command} " in result.stdout
    sft_help = run_cli("zhtune sft --help").stdout
    assert "--lora_target_modules" in sft_help and "['DEFAULT']" in sft_help


@pytest.mark.parametrize("command,message", [
    ("zhtune sft --lora_rnk 8 --dataset x", "unknown argument --lora_rnk. Did you mean 'lora_rank'?"),
    ("zhtune infer --infer_backend vlm", "Did you mean 'vllm'?"),
    ("zhtune infer --model_type gemma2-9b-instrct --dry_run true", "Did you mean 'gemma2-9b-instruct'?"),
    ("zhtune sfft", "unknown command 'sfft'. Did you mean 'sft'?"),
    ("zhtune infer --merge_lora maybe", "--merge_lora takes true or false"),
    ("zhtune infer --model_id_or_path ./no/such/folder", "no config.json there"),
    ("zhtune sft --model_type gemma3-270m --model_id_or_path /no/such/folder --dataset self-cognition#4 "
     "--model_name 小黄 --model_author 魔搭", "--model_id_or_path /no/such/folder: no config.json there"),
])
def test_bad_input_is_one_error_line(command, message):
    result = run_cli(command)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr


def test_values_and_booleans():
    args = parse_args(SftArguments, ["--model_name", "小黄", "Xiao Huang", "--use_flash_attn", "true",
                                     "--save_total_limit", "-1", "--learning_rate=5e-5", "--gradient_checkpointing", "false"])
    assert args.model_name == ["小黄", "Xiao Huang"] and args.use_flash_attn is True
    assert args.save_total_limit == -1 and args.learning_rate == 5e-5 and args.gradient_checkpointing is False
    assert args.resolved_grad_accum(world_size=4) == 4 and SftArguments(batch_size=2).resolved_grad_accum() == 8
    assert SftArguments().resolved_learning_rate() == 1e-4 and SftArguments(sft_type="full").resolved_learning_rate() == 1e-5
    assert parse_args(EvalArguments, ["--ckpt_dir", "a", "b"]).ckpt_dir == ["a", "b"]


def test_config_file_and_command_line_wins(tmp_path):
    (tmp_path / "c.yaml").write_text("lora_rank: 16\ndataset: [a.jsonl, b.jsonl]\n")
    (tmp_path / "bad.yaml").write_text("max_new_tokens: 5\n")
    (tmp_path / "c.json").write_text(json.dumps({"temperature": 0.1, "infer_backend": "pt"}))
    args = parse_args(SftArguments, ["--config", str(tmp_path / "c.yaml"), "--lora_rank", "4"])
    assert args.lora_rank == 4 and args.dataset == ["a.jsonl", "b.jsonl"]
    infer = parse_args(InferArguments, ["--config", str(tmp_path / "c.json")])
    assert infer.temperature == 0.1 and infer.infer_backend == "pt"
    with pytest.raises(UserError, match="unknown argument 'max_new_tokens'"):
        parse_args(SftArguments, ["--config", str(tmp_path / "bad.yaml")])
    with pytest.raises(UserError, match="no such file"):
        parse_args(SftArguments, ["--config", str(tmp_path / "missing.yaml")])


def test_long_silent_work_says_it_is_alive(zhtune_log):
    """Compilation and conversion run minutes without output of their own: a heartbeat line meanwhile."""
    import time

    from zhtune.log import still_running
    with still_running("compiling the decode step", every=0.05):
        time.sleep(0.3)
    beats = [m for m in zhtune_log.messages if m.startswith("still compiling the decode step (")]
    assert len(beats) >= 2
    count = len(beats)
    time.sleep(0.15)  # and it stops with its block
    assert len([m for m in zhtune_log.messages if m.startswith("still ")]) == count
