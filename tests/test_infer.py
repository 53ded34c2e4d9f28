"""`zhtune infer` and `zhtune export`: a terminal session, merged checkpoints, batch inference."""

import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from helpers import terminal
from zhtune.cli import main


@pytest.mark.slow
def test_terminal_session_keeps_history_until_clear():
    """Through a pseudo-terminal with the embedded model: two turns, the second's prompt holds the first."""
    with terminal(["infer", "--model_type", "gemma3-270m", "--max_new_tokens", "6", "--do_sample", "false",
                   "--verbose", "true"]) as chat:
        assert "-" * 50 in chat.say("浙江的省会在哪？")
        prompt2 = chat.prompt_line(chat.say("这有什么好吃的？"))
        assert "浙江的省会在哪？" in prompt2 and "这有什么好吃的？" in prompt2
        assert prompt2.count("<start_of_turn>user") == 2
        chat.say("clear")
        prompt3 = chat.prompt_line(chat.say("你是谁？"))
        assert "浙江" not in prompt3 and prompt3.count("<start_of_turn>user") == 1


@pytest.mark.slow
def test_merged_checkpoint_equals_base_plus_adapter(trained_run):
    """The merged folder loads with plain transformers and gives the logits of base + adapter."""
    from peft import PeftModel
    from zhtune.tuners.merge import merged_dir_for
    ckpt = trained_run["run_dir"] / "checkpoint-6"
    assert main(["export", "--ckpt_dir", str(ckpt), "--merge_lora", "true"]) == 0
    merged_dir = merged_dir_for(ckpt)
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    args = json.loads((ckpt / "sft_args.json").read_text())
    base = AutoModelForCausalLM.from_pretrained(args["model_id_or_path"], dtype=torch.float32)
    with_adapter = PeftModel.from_pretrained(base, str(ckpt)).eval()
    ids = torch.tensor([[2, 105, 2364, 107, 236743, 236770, 106, 107, 105, 4368, 107]])
    with torch.no_grad():
        expected, got = with_adapter(input_ids=ids).logits, merged(input_ids=ids).logits
        plain = AutoModelForCausalLM.from_pretrained(args["model_id_or_path"], dtype=torch.float32).eval()(input_ids=ids).logits
    assert not torch.allclose(expected, plain, atol=1e-3), "the adapter changed the model"
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    # tied in the base, untied after the merge: head and embedding each carry their own LoRA update
    assert merged.config.tie_word_embeddings is False
    assert not torch.equal(merged.get_output_embeddings().weight, merged.get_input_embeddings().weight)


@pytest.mark.slow
def test_piped_question_through_merged_checkpoint(trained_run):
    ckpt = trained_run["run_dir"] / "checkpoint-6"
    result = subprocess.run([sys.executable, "-m", "zhtune", "infer", "--ckpt_dir", str(ckpt), "--merge_lora", "true",
                             "--max_new_tokens", "5"], input="浙江的省会在哪？\n", capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert "-" * 50 in result.stdout
    assert "merged" in result.stderr + result.stdout


@pytest.mark.slow
def test_batch_inference_writes_one_row_per_sample(trained_run, tmp_path):
    from helpers import write_chat_jsonl
    data = write_chat_jsonl(tmp_path / "q.jsonl", 20, seed=3)
    ckpt = trained_run["run_dir"] / "checkpoint-3"
    assert main(["infer", "--ckpt_dir", str(ckpt), "--val_dataset", str(data), "--max_new_tokens", "4",
                 "--eval_batch_size", "8", "--do_sample", "false"]) == 0
    results = list((ckpt / "infer_result").glob("*.jsonl"))
    assert len(results) == 1
    rows = [json.loads(line) for line in results[0].read_text().splitlines()]
    assert len(rows) == 20
    assert set(rows[0]) == {"system", "query", "response", "label", "history"}
    assert rows[0]["label"].endswith("。") and rows[0]["query"].endswith(")")


def test_missing_checkpoint_and_vllm_are_clear_errors(tmp_path, capsys):
    assert main(["infer", "--ckpt_dir", str(tmp_path / "nope")]) == 2
    assert "no such folder" in capsys.readouterr().err
    try:
        import vllm  # noqa: F401
        pytest.skip("vllm is installed here")
    except ImportError:
        pass
    assert main(["infer", "--model_type", "gemma3-270m", "--infer_backend", "vllm"]) == 2
    assert "needs vllm" in capsys.readouterr().err


def test_result_dir_save_result_and_stream_flags(tiny_models, tmp_path, capsys, monkeypatch):
    """--result_dir chooses where batch results go; --save_result false prints the replies instead;
    --stream false prints each chat reply whole."""
    import io
    from helpers import write_chat_jsonl
    data = write_chat_jsonl(tmp_path / "q.jsonl", 3, seed=5)
    common = ["--model_id_or_path", str(tiny_models["gemma2"]), "--max_new_tokens", "3", "--do_sample", "false",
              "--infer_backend", "pt"]
    assert main(["infer", *common, "--val_dataset", str(data), "--result_dir", str(tmp_path / "res")]) == 0
    (written,) = list((tmp_path / "res").glob("*.jsonl"))
    assert len(written.read_text().splitlines()) == 3
    capsys.readouterr()
    monkeypatch.chdir(tmp_path)
    assert main(["infer", *common, "--val_dataset", str(data), "--save_result", "false"]) == 0
    assert len(capsys.readouterr().out.splitlines()) >= 3 and not (tmp_path / "infer_result").exists()
    monkeypatch.setattr("sys.stdin", io.StringIO("浙江的省会在哪？\n"))
    assert main(["infer", *common, "--stream", "false"]) == 0
    assert "-" * 50 in capsys.readouterr().out
