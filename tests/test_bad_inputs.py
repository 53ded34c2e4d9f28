"""Bad input, as a new user would give it, to all five commands.

The rule every case checks: exit code 2, exactly one `zhtune <cmd>: error: ...` line on stderr (log
lines before it are allowed), no traceback, and nothing new on disk under the folder the command ran
in. Cases run in-process through `zhtune.cli.main` (most on `--dry_run true`, so nothing loads); the
few that must load a model use the tiny random Qwen2 folder, or damaged copies of it, and fail
before any real work. Two cases run a real process, for the exit code and ZHTUNE_DEBUG=1.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import qa_rows, row_in_format, write_chat_jsonl, write_rows
from zhtune.cli import main

QWEN_TYPE = "qwen2.5-7b-instruct"
PNG = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x10\x00\x00\x00\x10\x08\x06\x00\x00\x00\x1f\xf3\xffa"


# -- the rule --------------------------------------------------------------------------------------

def listing(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def assert_refused(capsys, root: Path, argv: list[str], *needles: str) -> str:
    """Run `zhtune argv` in `root`; it must fail by the rule. Returns the error line."""
    before = listing(root)
    capsys.readouterr()
    cwd = os.getcwd()
    os.chdir(root)
    try:
        rc = main(argv)
    finally:
        os.chdir(cwd)
    err = capsys.readouterr().err
    command = argv[0]
    assert rc == 2, f"exit {rc}, stderr:\n{err}"
    assert "Traceback" not in err, err
    ours = [line for line in err.splitlines() if line.startswith("zhtune ")]
    assert len(ours) == 1 and ours[0].startswith(f"zhtune {command}: error: "), err
    assert err.rstrip().splitlines()[-1] == ours[0], f"the error line is not the last one:\n{err}"
    for needle in needles:
        assert needle in ours[0], f"{needle!r} not in: {ours[0]}"
    assert listing(root) == before, f"left on disk: {sorted(listing(root) - before)}"
    return ours[0]


# -- building damaged inputs -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def qwen(tiny_models) -> Path:
    return tiny_models["qwen2"]


def model_copy(root: Path, base: Path, name: str = "model", **files) -> Path:
    """A copy of model folder `base` (links to its files) where each `files[name]` replaces that file:
    bytes to write, or None to leave the file out."""
    folder = root / name
    folder.mkdir()
    for f in base.iterdir():
        key = f.name.replace(".", "_")
        if key in files:
            if files[key] is not None:
                (folder / f.name).write_bytes(files[key])
        else:
            (folder / f.name).symlink_to(f)
    return folder


def truncated(file: Path, size: int = 4096) -> bytes:
    with open(file, "rb") as f:
        return f.read(size)


def lora_checkpoint(root: Path, base: Path, adapter: bytes | None = None, adapter_config: dict | None = None,
                    sft_args=None) -> Path:
    """A LoRA checkpoint folder as `zhtune sft` writes one, with the parts given damaged."""
    ckpt = root / "output" / QWEN_TYPE / "v0-20250101-000000" / "checkpoint-4"
    ckpt.mkdir(parents=True)
    config = adapter_config or {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(base),
                                "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}
    (ckpt / "adapter_config.json").write_text(json.dumps(config))
    if adapter is not None:
        (ckpt / "adapter_model.safetensors").write_bytes(adapter)
    args = sft_args if sft_args is not None else {"model_type": QWEN_TYPE, "model_id_or_path": str(base),
                                                   "template_type": "qwen2_5", "sft_type": "lora"}
    (ckpt / "sft_args.json").write_text(args if isinstance(args, str) else json.dumps(args))
    return ckpt


@pytest.fixture
def data(tmp_path) -> Path:
    return write_rows(tmp_path / "good.jsonl", qa_rows(6))


# -- numbers out of range, bad choices, unknown names: parse time, every command -------------------

PARSE_CASES = [
    # sft
    (["sft", "--dataset", "x.jsonl", "--lora_rank", "0"], "--lora_rank must be at least 1"),
    (["sft", "--dataset", "x.jsonl", "--batch_size", "-2"], "--batch_size"),
    (["sft", "--dataset", "x.jsonl", "--num_train_epochs", "0"], "--num_train_epochs must be more than 0"),
    (["sft", "--dataset", "x.jsonl", "--max_length", "0"], "--max_length"),
    (["sft", "--dataset", "x.jsonl", "--lr_scheduler_type", "cosin"], "Did you mean 'cosine'?"),
    (["sft", "--dataset", "x.jsonl", "--sft_type", "qlora"], "--sft_type"),
    (["sft", "--dataset", "x.jsonl", "--learning_rate", "fast"], "--learning_rate takes float"),
    (["sft", "--dataset", "x.jsonl", "--dataset_test_ratio", "1.5"], "--dataset_test_ratio must be at most"),
    (["sft", "--dataset", "x.jsonl", "--lora_dropout_p", "nan"], "finite"),
    (["sft", "--dataset", "x.jsonl", "--gradient_accumulation_steps", "0"], "--gradient_accumulation_steps"),
    (["sft", "--dataset", "x.jsonl", "--lora_rnk", "8"], "Did you mean 'lora_rank'?"),
    (["sft", "--dataset", "x.jsonl", "--eval_dataset", "arc"], "unknown argument --eval_dataset"),
    (["sft", "lora"], "unexpected value 'lora'"),
    (["sft", "--dataset", "x.jsonl", "--seed"], "--seed needs a value"),
    # infer
    (["infer", "--max_new_tokens", "0"], "--max_new_tokens"),
    (["infer", "--top_p", "1.5"], "--top_p must be at most 1.0"),
    (["infer", "--temperature", "-0.5"], "--temperature"),
    (["infer", "--infer_backend", "tgi"], "--infer_backend"),
    (["infer", "--dtype", "fp8"], "--dtype"),
    (["infer", "--num_beams", "0"], "--num_beams"),
    (["infer", "--merge_lora", "perhaps"], "--merge_lora takes true or false"),
    (["infer", "--max_length", "512"], "has no effect on `zhtune infer`"),
    (["infer", "--system", "a", "b"], "--system takes one value"),
    # eval
    (["eval", "--eval_mode", "ppl"], "--eval_mode"),
    (["eval", "--eval_few_shot", "-1"], "--eval_few_shot"),
    (["eval", "--eval_batch_size", "0"], "--eval_batch_size"),
    (["eval", "--eval_prompt", "fancy"], "--eval_prompt"),
    (["eval", "--dataset", "mine.jsonl"], "has no effect on `zhtune eval`"),
    (["eval", "--eval_backend", "OpenCompass"], "--eval_backend"),
    # export
    (["export", "--ckpt_dir", "c", "--dtype", "bf16"], "has no effect on `zhtune export`"),
    (["export", "--ckpt_dir", "c", "--infer_backend", "vllm"], "has no effect on `zhtune export`"),
    (["export", "--ckpt_dir", "c", "--lora_rank", "8"], "unknown argument --lora_rank"),
    (["export"], "needs --ckpt_dir"),
    (["export", "--ckpt_dir", "c", "--merge_lora", "false"], "--merge_lora true"),
    # deploy
    (["deploy", "--port", "0"], "--port must be at least 1"),
    (["deploy", "--port", "70000"], "--port must be at most 65535"),
    (["deploy", "--port", "http"], "--port takes int"),
    (["deploy", "--max_concurrency", "0"], "--max_concurrency"),
    (["deploy", "--max_queue_size", "-1"], "--max_queue_size"),
    (["deploy", "--verbose", "true"], "has no effect on `zhtune deploy`"),
    (["deploy", "--dataset", "x.jsonl"], "has no effect on `zhtune deploy`"),
    # commands
    (["trian"], "unknown command 'trian'"),
    (["serve", "--port", "8000"], "unknown command 'serve'"),
]


@pytest.mark.parametrize("argv,needle", PARSE_CASES, ids=[" ".join(a)[:60] for a, _ in PARSE_CASES])
def test_bad_argument_is_refused_at_parse_time(argv, needle, tmp_path, capsys):
    assert_refused(capsys, tmp_path, argv + ["--dry_run", "true"] if argv[0] != "trian" else argv, needle)


# -- --config files ---------------------------------------------------------------------------------

CONFIGS = {
    "binary.yaml": (PNG, "--config"),
    "latin1.yaml": ("system: caf\xe9\n".encode("latin-1"), "UnicodeDecodeError"),
    "list.yaml": (b"- lora_rank: 4\n- batch_size: 2\n", "must hold a mapping"),
    "scalar.json": (b"42", "must hold a mapping"),
    "broken.json": (b'{"lora_rank": 4,', "JSONDecodeError"),
    "broken.yaml": (b"lora_rank: [4\n", "--config"),
    "unknown.yaml": (b"lora_rnak: 4\n", "unknown argument 'lora_rnak'"),
    "range.yaml": (b"lora_rank: 0\n", "--lora_rank must be at least 1"),
    "choice.yaml": (b"sft_type: qlora\n", "--sft_type"),
    "unused.yaml": (b"port: 8000\n", "unknown argument 'port'"),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_bad_config_file(name, tmp_path, capsys):
    content, needle = CONFIGS[name]
    (tmp_path / name).write_bytes(content)
    assert_refused(capsys, tmp_path, ["sft", "--config", name, "--dataset", "x.jsonl", "--dry_run", "true"], needle)


def test_config_that_is_a_folder_or_missing(tmp_path, capsys):
    (tmp_path / "conf.yaml").mkdir()
    assert_refused(capsys, tmp_path, ["infer", "--config", "conf.yaml", "--dry_run", "true"], "no such file")
    assert_refused(capsys, tmp_path, ["eval", "--config", "nope.json", "--dry_run", "true"], "no such file")


def test_config_with_a_flag_the_command_does_not_use(tmp_path, capsys):
    (tmp_path / "c.yaml").write_text("truncation_strategy: delete\n")
    assert_refused(capsys, tmp_path, ["infer", "--config", "c.yaml", "--dry_run", "true"], "--truncation_strategy")


# -- model folders ------------------------------------------------------------------------------------

def test_model_config_not_json(qwen, tmp_path, capsys):
    folder = model_copy(tmp_path, qwen, config_json=b"{model_type: qwen2")
    assert_refused(capsys, tmp_path, ["infer", "--model_id_or_path", str(folder), "--dry_run", "true"],
                   "--model_id_or_path", "config.json", "JSONDecodeError")


def test_model_config_not_utf8(qwen, tmp_path, capsys):
    text = (qwen / "config.json").read_text().replace('"qwen2"', '"qw\xe9n2"', 1)
    folder = model_copy(tmp_path, qwen, config_json=text.encode("latin-1"))
    assert_refused(capsys, tmp_path, ["eval", "--model_id_or_path", str(folder), "--dry_run", "true"],
                   "config.json", "UnicodeDecodeError")


def test_model_config_not_an_object(qwen, tmp_path, capsys):
    folder = model_copy(tmp_path, qwen, config_json=b'["qwen2"]')
    assert_refused(capsys, tmp_path, ["deploy", "--model_id_or_path", str(folder), "--dry_run", "true"],
                   "config.json", "not an object")


def test_model_folder_without_config(qwen, tmp_path, capsys):
    folder = model_copy(tmp_path, qwen, config_json=None)
    assert_refused(capsys, tmp_path, ["sft", "--model_id_or_path", str(folder), "--dataset", "x.jsonl",
                                      "--dry_run", "true"], "no config.json there")


def test_model_of_unknown_architecture(qwen, tmp_path, capsys):
    config = json.loads((qwen / "config.json").read_text())
    folder = model_copy(tmp_path, qwen, config_json=json.dumps({**config, "model_type": "mamba9"}).encode())
    assert_refused(capsys, tmp_path, ["infer", "--model_id_or_path", str(folder), "--dry_run", "true"],
                   "cannot tell the model type", "--model_type")


def test_model_folder_that_is_a_file(tmp_path, capsys):
    (tmp_path / "model.bin").write_bytes(PNG)
    assert_refused(capsys, tmp_path, ["infer", "--model_id_or_path", "./model.bin", "--dry_run", "true"],
                   "no config.json there")


def test_model_without_weights(qwen, tmp_path, data, capsys):
    folder = model_copy(tmp_path, qwen, model_safetensors=None)
    assert_refused(capsys, tmp_path, ["infer", "--model_id_or_path", str(folder), "--infer_backend", "pt",
                                      "--val_dataset", str(data)], str(folder), "cannot read the model")


def test_model_with_truncated_weights(qwen, tmp_path, data, capsys):
    folder = model_copy(tmp_path, qwen, model_safetensors=truncated(qwen / "model.safetensors"))
    assert_refused(capsys, tmp_path, ["infer", "--model_id_or_path", str(folder), "--infer_backend", "pt",
                                      "--val_dataset", str(data)], "cannot read the model", "Re-download")


def test_model_without_tokenizer(qwen, tmp_path, data, capsys):
    folder = model_copy(tmp_path, qwen, tokenizer_json=None, tokenizer_config_json=None)
    assert_refused(capsys, tmp_path, ["infer", "--model_id_or_path", str(folder), "--infer_backend", "pt",
                                      "--val_dataset", str(data)], "has no tokenizer")


def test_deploy_of_truncated_model_frees_the_port(qwen, tmp_path, capsys):
    folder = model_copy(tmp_path, qwen, model_safetensors=truncated(qwen / "model.safetensors"))
    port = free_port()
    assert_refused(capsys, tmp_path, ["deploy", "--model_id_or_path", str(folder), "--infer_backend", "pt",
                                      "--port", str(port)], "cannot read the model")
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))  # closed again after the failed load


# -- checkpoints --------------------------------------------------------------------------------------

def test_ckpt_dir_missing(tmp_path, capsys):
    assert_refused(capsys, tmp_path, ["infer", "--ckpt_dir", "output/nowhere/checkpoint-1"],
                   "--ckpt_dir output/nowhere/checkpoint-1: no such folder")


def test_ckpt_dir_without_sft_args(qwen, tmp_path, capsys):
    folder = model_copy(tmp_path, qwen)
    assert_refused(capsys, tmp_path, ["export", "--ckpt_dir", str(folder), "--dry_run", "true"],
                   "has no sft_args.json", "--model_id_or_path instead")


@pytest.mark.parametrize("content", ["{\"model_type\": ", "[1, 2]", "\xff\xfe"], ids=["cut", "list", "binary"])
def test_ckpt_dir_with_damaged_sft_args(qwen, tmp_path, capsys, content):
    ckpt = lora_checkpoint(tmp_path, qwen, sft_args=content)
    if content == "\xff\xfe":
        (ckpt / "sft_args.json").write_bytes(b"\xff\xfe\x00\x81")
    assert_refused(capsys, tmp_path, ["eval", "--ckpt_dir", str(ckpt), "--dry_run", "true"],
                   "--ckpt_dir", "sft_args.json", "another checkpoint-N")


def test_ckpt_dir_with_neither_adapter_nor_model(qwen, tmp_path, capsys):
    ckpt = lora_checkpoint(tmp_path, qwen)
    (ckpt / "adapter_config.json").unlink()
    assert_refused(capsys, tmp_path, ["export", "--ckpt_dir", str(ckpt), "--dry_run", "true"],
                   "--ckpt_dir", "neither adapter_config.json")


def test_full_checkpoint_with_bad_config_names_ckpt_dir(qwen, tmp_path, capsys):
    ckpt = lora_checkpoint(tmp_path, qwen, sft_args={"sft_type": "full"})
    (ckpt / "adapter_config.json").unlink()
    (ckpt / "config.json").write_text("{oops")
    line = assert_refused(capsys, tmp_path, ["infer", "--ckpt_dir", str(ckpt), "--dry_run", "true"],
                          "--ckpt_dir", "another checkpoint-N")
    assert "--model_id_or_path" not in line


def test_full_checkpoint_without_weights_names_ckpt_dir(qwen, tmp_path, data, capsys):
    ckpt = lora_checkpoint(tmp_path, qwen, sft_args={"model_type": QWEN_TYPE, "sft_type": "full"})
    (ckpt / "adapter_config.json").unlink()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (ckpt / name).symlink_to(qwen / name)
    assert_refused(capsys, tmp_path, ["infer", "--ckpt_dir", str(ckpt), "--infer_backend", "pt",
                                      "--val_dataset", str(data)], f"--ckpt_dir {ckpt}", "is damaged")


def test_truncated_adapter_on_export(qwen, tmp_path, capsys):
    ckpt = lora_checkpoint(tmp_path, qwen, adapter=b"\x40\x00\x00\x00\x00\x00\x00\x00{\"__metadata__\"")
    assert_refused(capsys, tmp_path, ["export", "--ckpt_dir", str(ckpt)],
                   f"--ckpt_dir {ckpt}", "the LoRA adapter", "another checkpoint-N")


def test_truncated_adapter_on_infer(qwen, tmp_path, data, capsys):
    ckpt = lora_checkpoint(tmp_path, qwen, adapter=PNG)
    assert_refused(capsys, tmp_path, ["infer", "--ckpt_dir", str(ckpt), "--infer_backend", "pt",
                                      "--val_dataset", str(data)], "--ckpt_dir", "the LoRA adapter")


def test_damaged_adapter_config_on_export(qwen, tmp_path, capsys):
    ckpt = lora_checkpoint(tmp_path, qwen, adapter=PNG)
    (ckpt / "adapter_config.json").write_text("{\"peft_type\": \"LORA\", ")
    assert_refused(capsys, tmp_path, ["export", "--ckpt_dir", str(ckpt)], "--ckpt_dir", "the LoRA adapter")


@pytest.mark.parametrize("state", [None, "{\"global_step\": ", "{}"], ids=["missing", "cut", "no-step"])
def test_resume_from_damaged_checkpoint(qwen, tmp_path, data, capsys, state):
    ckpt = lora_checkpoint(tmp_path, qwen, adapter=PNG)
    if state is not None:
        (ckpt / "trainer_state.json").write_text(state)
    assert_refused(capsys, tmp_path, ["sft", "--model_id_or_path", str(qwen), "--dataset", str(data),
                                      "--resume_from_checkpoint", str(ckpt)], "--resume_from_checkpoint",
                   "trainer_state.json")


def test_resume_from_missing_checkpoint(qwen, tmp_path, data, capsys):
    assert_refused(capsys, tmp_path, ["sft", "--model_id_or_path", str(qwen), "--dataset", str(data),
                                      "--resume_from_checkpoint", "output/x/checkpoint-9"], "no such folder")


# -- data files -----------------------------------------------------------------------------------------

def write_lines(path: Path, lines: list) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line, ensure_ascii=False)) + "\n"
                            for line in lines), encoding="utf-8")
    return path


DATA_CASES = {
    "binary": (lambda p: p.with_suffix(".jsonl").write_bytes(PNG * 4), "UTF-8"),
    "latin1": (lambda p: p.with_suffix(".jsonl").write_bytes(
        '{"query": "caf\xe9", "response": "oui"}\n'.encode("latin-1")), "is not UTF-8"),
    "empty": (lambda p: p.with_suffix(".jsonl").write_bytes(b""), "at least one conversation"),
    "blank-lines": (lambda p: p.with_suffix(".jsonl").write_text("\n\n  \n"), "at least one conversation"),
    "mixed-layouts": (lambda p: write_lines(p.with_suffix(".jsonl"), [
        row_in_format("query/response"), row_in_format("messages")]), "line 2", "messages format"),
    "mixed-alpaca-sharegpt": (lambda p: write_lines(p.with_suffix(".jsonl"), [
        row_in_format("alpaca"), row_in_format("alpaca"), row_in_format("sharegpt")]), "line 3", "one format"),
    "no-layout-later": (lambda p: write_lines(p.with_suffix(".jsonl"), [
        {"query": "a", "response": "b"}, {"question": "c", "answer": "d"}]), "line 2", "question, answer"),
    "no-layout-first": (lambda p: write_lines(p.with_suffix(".jsonl"), [{"prompt": "a", "completion": "b"}]),
                        "fits no known format", "prompt, completion"),
    "broken-line": (lambda p: write_lines(p.with_suffix(".jsonl"), [{"query": "a", "response": "b"},
                                                                     '{"query": "c", "respo']), "line 2",
                    "not valid JSON"),
    "not-objects": (lambda p: write_lines(p.with_suffix(".jsonl"), ["[1, 2]"]), "expected an object"),
    "json-object": (lambda p: p.with_suffix(".json").write_text('{"query": "a", "response": "b"}'), "array of rows"),
    "bad-parquet": (lambda p: p.with_suffix(".parquet").write_bytes(PNG), "cannot be read as .parquet"),
    "txt-suffix": (lambda p: p.with_suffix(".txt").write_text("hello\n"), "unsupported file type"),
    "empty-reply": (lambda p: write_lines(p.with_suffix(".jsonl"), [{"query": "a", "response": " "}]),
                    "empty assistant reply"),
}


def data_file(tmp_path: Path, case: str) -> Path:
    base = tmp_path / f"data-{case}"
    DATA_CASES[case][0](base)
    return next(tmp_path.glob(f"data-{case}.*"))


@pytest.mark.parametrize("case", list(DATA_CASES))
def test_bad_data_file_on_sft(case, qwen, tmp_path, capsys):
    path = data_file(tmp_path, case)
    assert_refused(capsys, tmp_path, ["sft", "--model_id_or_path", str(qwen), "--dataset", path.name,
                                      "--dry_run", "true"], path.name, *DATA_CASES[case][1:])


@pytest.mark.parametrize("case", ["mixed-layouts", "binary", "empty"])
def test_bad_data_file_on_infer_fails_before_the_model_loads(case, qwen, tmp_path, capsys):
    path = data_file(tmp_path, case)
    assert_refused(capsys, tmp_path, ["infer", "--model_id_or_path", str(qwen), "--val_dataset", path.name],
                   path.name)


def test_missing_data_file(qwen, tmp_path, capsys):
    assert_refused(capsys, tmp_path, ["sft", "--model_id_or_path", str(qwen), "--dataset", "nope.jsonl",
                                      "--dry_run", "true"], "does not exist")


def test_unknown_dataset_name(qwen, tmp_path, capsys):
    assert_refused(capsys, tmp_path, ["sft", "--model_id_or_path", str(qwen), "--dataset", "self-cognitoin#10",
                                      "--dry_run", "true"], "self-cognitoin")


def test_self_cognition_without_model_name(qwen, tmp_path, capsys):
    assert_refused(capsys, tmp_path, ["sft", "--model_id_or_path", str(qwen), "--dataset", "self-cognition#20",
                                      "--dry_run", "true"], "--model_name")


def test_sft_without_dataset(qwen, tmp_path, capsys):
    assert_refused(capsys, tmp_path, ["sft", "--model_id_or_path", str(qwen)], "needs --dataset")


def test_sft_with_data_folder_as_dataset(qwen, tmp_path, capsys):
    (tmp_path / "rows.jsonl").mkdir()
    assert_refused(capsys, tmp_path, ["sft", "--model_id_or_path", str(qwen), "--dataset", "rows.jsonl",
                                      "--dry_run", "true"], "rows.jsonl")


# -- eval -------------------------------------------------------------------------------------------------

def test_eval_unknown_dataset(qwen, tmp_path, capsys):
    assert_refused(capsys, tmp_path, ["eval", "--model_id_or_path", str(qwen), "--eval_dataset", "mmlu", "mmmu",
                                      "--dry_run", "true"], "mmmu")


@pytest.mark.parametrize("limit", ["ten", "0", "[5:2]", "[-3:]", "1:2:3"])
def test_eval_bad_limit(limit, qwen, tmp_path, capsys):
    assert_refused(capsys, tmp_path, ["eval", "--model_id_or_path", str(qwen), "--eval_limit", limit,
                                      "--dry_run", "true"], "--eval_limit")


def test_eval_missing_data_dir(qwen, tmp_path, capsys):
    assert_refused(capsys, tmp_path, ["eval", "--model_id_or_path", str(qwen), "--eval_data_dir", "benchdata",
                                      "--dry_run", "true"], "--eval_data_dir benchdata: no such folder")


def test_eval_empty_data_dir(qwen, tmp_path, capsys):
    (tmp_path / "benchdata").mkdir()
    assert_refused(capsys, tmp_path, ["eval", "--model_id_or_path", str(qwen), "--eval_data_dir", "benchdata",
                                      "--eval_dataset", "arc", "--dry_run", "true"], "arc")


def test_eval_real_run_with_empty_data_dir_writes_nothing(qwen, tmp_path, capsys):
    (tmp_path / "benchdata" / "gsm8k").mkdir(parents=True)
    assert_refused(capsys, tmp_path, ["eval", "--model_id_or_path", str(qwen), "--eval_data_dir", "benchdata",
                                      "--eval_dataset", "gsm8k", "--infer_backend", "pt"], "gsm8k")


# -- deploy -----------------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_deploy_port_in_use(qwen, tmp_path, capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        assert_refused(capsys, tmp_path, ["deploy", "--model_id_or_path", str(qwen), "--port", str(port)],
                       "already in use", "--port")


@pytest.mark.parametrize("host", ["999.1.1.1", "no such host", "203.0.113.7"])
def test_deploy_bad_host(host, qwen, tmp_path, capsys):
    assert_refused(capsys, tmp_path, ["deploy", "--model_id_or_path", str(qwen), "--host", host,
                                      "--port", str(free_port())], "--host")


# -- a real process ---------------------------------------------------------------------------------------

def run_process(tmp_path: Path, argv: list[str], **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "zhtune", *argv], capture_output=True, text=True, cwd=tmp_path,
                          env={**os.environ, **env}, timeout=120)


def test_process_exit_code_and_one_line(tmp_path):
    (tmp_path / "c.yaml").write_bytes(PNG)
    result = run_process(tmp_path, ["sft", "--config", "c.yaml", "--dataset", "x.jsonl"])
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [l for l in result.stderr.strip().splitlines()
                                                  if l.startswith("zhtune sft: error: --config c.yaml")]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.yaml"]


def test_debug_switch_shows_the_cause(qwen, tmp_path):
    folder = model_copy(tmp_path, qwen, config_json=b"{broken")
    result = run_process(tmp_path, ["infer", "--model_id_or_path", str(folder), "--dry_run", "true"],
                         ZHTUNE_DEBUG="1")
    assert result.returncode == 2
    assert "JSONDecodeError" in result.stderr and "direct cause" in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("zhtune infer: error: ")


def test_good_inputs_still_pass(qwen, tmp_path, capsys, monkeypatch):
    """The corpus' baseline: the same folders and files, undamaged, are accepted."""
    rows = [row_in_format(fmt, i) for i, fmt in enumerate(["query/response"] * 3)]
    write_rows(tmp_path / "ok.jsonl", rows)
    write_chat_jsonl(tmp_path / "chat.jsonl", 4)
    monkeypatch.chdir(tmp_path)
    assert main(["sft", "--model_id_or_path", str(qwen), "--dataset", "ok.jsonl", "chat.jsonl",
                 "--dry_run", "true"]) == 0
    assert "error" not in capsys.readouterr().err
