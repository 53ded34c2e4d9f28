"""The argument dataclasses: every declared argument is read somewhere, ranges and choices are checked
when parsing, and nothing is declared twice."""

import dataclasses
import re
from pathlib import Path

import pytest

import zhtune
from zhtune import args as A
from zhtune.errors import UserError

CLASSES = [A.ModelArguments, A.DataArguments, A.GenerationArguments, A.CheckpointArguments, A.SftArguments,
           A.InferArguments, A.EvalArguments, A.ExportArguments, A.DeployArguments]

# Arguments read by the parser itself (zhtune/args.py), not by a command. One line of reason each.
READ_BY_THE_PARSER = {
    "config": "parse_args reads the --config file and merges its values before the dataclass is built",
}


def _source_outside_args() -> str:
    package = Path(zhtune.__file__).parent
    return "\n".join(p.read_text(encoding="utf-8") for p in sorted(package.rglob("*.py"))
                     if p != package / "args.py")


def _is_read(name: str, source: str) -> bool:
    """`.name` attribute access, the name as a string key ("name" / 'name'), or `name=` as a keyword."""
    patterns = [rf"\.{name}\b", rf"[\"']{name}[\"']", rf"[(,]\s*{name}\s*=(?!=)"]
    return any(re.search(p, source) for p in patterns)


def test_every_declared_argument_is_read():
    source = _source_outside_args()
    declared = {f.name: cls.__name__ for cls in CLASSES for f in dataclasses.fields(cls)}
    assert set(READ_BY_THE_PARSER) <= set(declared), "an exception names no declared argument: drop it"
    unread = sorted(f"--{name} ({cls})" for name, cls in declared.items()
                    if name not in READ_BY_THE_PARSER and not _is_read(name, source))
    assert not unread, (f"declared in zhtune/args.py but read nowhere in zhtune: {', '.join(unread)}. "
                        "Make the flag work, or remove it (an accepted flag that does nothing misleads).")


def test_the_check_finds_an_unread_argument():
    source = _source_outside_args()
    assert _is_read("lora_rank", source) and _is_read("eval_limit", source)
    assert not _is_read("lora_rnak_never_declared", source)


def test_no_argument_is_declared_twice():
    for cls in CLASSES:
        names = [f.name for f in dataclasses.fields(cls)]
        assert len(names) == len(set(names)), cls.__name__
    # a command class re-declaring a shared field only to change its default is fine; re-declaring one
    # of its own (SftArguments' max_length once was) is not
    own = [n for n in A.SftArguments.__annotations__ if n in A.DataArguments.__annotations__]
    assert own == [], own


@pytest.mark.parametrize("cls,argv,message", [
    (A.SftArguments, ["--lora_rank", "0"], "--lora_rank must be at least 1, got 0."),
    (A.SftArguments, ["--dataset_test_ratio", "1"], "--dataset_test_ratio must be at most 0.99"),
    (A.SftArguments, ["--num_train_epochs", "0"], "--num_train_epochs must be more than 0.0"),
    (A.SftArguments, ["--learning_rate", "nan", "--warmup_ratio", "nan"], "must be a finite number"),
    (A.SftArguments, ["--lr_scheduler_type", "cosin"], "Did you mean 'cosine'?"),
    (A.InferArguments, ["--top_p", "1.5"], "--top_p must be at most 1.0, got 1.5."),
    (A.InferArguments, ["--gpu_memory_utilization", "0"], "--gpu_memory_utilization must be at least 0.05"),
    (A.InferArguments, ["--tensor_parallel_size", "0"], "--tensor_parallel_size must be at least 1"),
    (A.InferArguments, ["--log_level", "LOUD"], "--log_level 'LOUD' is not one of"),
    (A.DeployArguments, ["--port", "70000"], "--port must be at most 65535"),
])
def test_ranges_and_choices_are_checked_when_parsing(cls, argv, message):
    with pytest.raises(UserError, match=re.escape(message)):
        A.parse_args(cls, argv)


def test_ranges_apply_to_config_files_too(tmp_path):
    (tmp_path / "c.yaml").write_text("lora_rank: -4\n")
    with pytest.raises(UserError, match="--lora_rank must be at least 1"):
        A.parse_args(A.SftArguments, ["--config", str(tmp_path / "c.yaml")])


def test_new_engine_flags_parse():
    args = A.parse_args(A.InferArguments, ["--gpu_memory_utilization", "0.5", "--max_model_len", "4096",
                                           "--tensor_parallel_size", "2", "--result_dir", "out",
                                           "--save_result", "false", "--stream", "false", "--log_level", "DEBUG"])
    assert (args.gpu_memory_utilization, args.max_model_len, args.tensor_parallel_size) == (0.5, 4096, 2)
    assert (args.result_dir, args.save_result, args.stream, args.log_level) == ("out", False, False, "DEBUG")


@pytest.mark.parametrize("command, flag", [("infer", "--max_length 512"), ("eval", "--dataset x.jsonl"),
                                           ("export", "--infer_backend vllm"), ("deploy", "--stream false")])
def test_a_flag_the_command_does_not_use_is_refused(command, flag, capsys):
    """A shared argument a command would ignore is one error line, not a silent no-op; --help omits it."""
    from zhtune.cli import main
    assert main([command, *flag.split(), "--dry_run", "true"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"zhtune {command}: error: {flag.split()[0]} has no effect on `zhtune {command}`: drop it."]
    assert main([command, "--help"]) == 0
    assert f"  {flag.split()[0]} " not in capsys.readouterr().out
