"""`zhtune eval` end to end with a stand-in engine: batching, scoring, tables, files, dry runs."""

import json

import pytest

from zhtune import cli
from zhtune.args import EvalArguments, parse_args
from zhtune.errors import UserError
from zhtune.infer.base import Completion
from zhtune.eval import bundled_samples_dir, report, run_evaluation
from zhtune.eval.extract import extract_choice, extract_number
from zhtune.eval.report import format_table
from zhtune.templates import get_template

SAMPLES = str(bundled_samples_dir())


class FakeEngine:
    """The engine interface (zhtune.infer.base.Engine): answers from a table of gold answers."""

    schedules_itself = False

    def __init__(self, name, answer):
        self.name, self.model_type, self.answer = name, "gemma3-270m", answer
        self.template, self.tokenizer, self.system = get_template("gemma"), None, None
        self.calls = []

    def with_system(self, messages):
        return messages

    def render_prompt(self, messages):
        return self.template.render(self.with_system(messages), add_generation_prompt=True)

    def generate_completions(self, conversations, settings, batch_size=8, progress=False):
        self.calls.append((len(conversations), settings.max_new_tokens, settings.do_sample, batch_size))
        return [Completion(text, 10, len(text), "stop") for text in (self.answer(c[-1]["content"]) for c in conversations)]

    def generate(self, conversations, settings, batch_size=8, progress=False):
        return [c.text for c in self.generate_completions(conversations, settings, batch_size, progress)]


def _args(tmp_path, *argv):
    return parse_args(EvalArguments, ["--eval_data_dir", SAMPLES, "--eval_output_dir", str(tmp_path / "out"), *argv])


def _gold_by_prompt():
    """prompt text -> gold, for every sample item (so a fake model can be right or wrong on purpose)."""
    from zhtune.eval.plan import BENCHMARKS
    gold = {}
    for name in ("arc", "ceval", "gsm8k", "mmlu"):
        bench = BENCHMARKS[name]()
        for item in bench.load(SAMPLES):
            gold[bench.user_prompt(item)] = item.gold
    return gold


GOLD = _gold_by_prompt()


def perfect(prompt):
    g = GOLD[prompt]
    return f"#### {g}" if g.isdigit() else f"The answer is ({g})."


def always_b(prompt):
    return "I am not sure." if prompt.startswith("Question:") else "B. because"


def _loader(engines):
    def load(resolved, args):
        return engines[resolved.ckpt_dir]
    return load


def test_one_model_table_files_and_batching(tmp_path, capsys):
    engine = FakeEngine("gemma3-270m", always_b)
    result = run_evaluation(_args(tmp_path, "--model_type", "gemma3-270m", "--eval_limit", "6", "--eval_batch_size", "4"),
                            load=_loader({None: engine}))
    scores = result["scores"]["gemma3-270m"]
    assert list(scores) == ["arc", "ceval", "gsm8k", "mmlu"]
    assert scores["gsm8k"] == 0.0
    # one generate call per dataset (never one per item), greedy, letters 32 tokens, gsm8k 512
    assert engine.calls == [(6, 32, False, 4), (6, 32, False, 4), (6, 512, False, 4), (6, 32, False, 4)]
    out = tmp_path / "out" / "gemma3-270m"
    (stamp,) = list(out.iterdir())
    assert result["output_dir"] == str(stamp)
    assert sorted(p.name for p in stamp.iterdir()) == ["arc.jsonl", "ceval.jsonl", "eval_result.jsonl",
                                                       "gsm8k.jsonl", "mmlu.jsonl"]  # no temp files left
    summary = [json.loads(line) for line in (stamp / "eval_result.jsonl").read_text().splitlines()]
    assert [(r["dataset"], r["total"], r["file"]) for r in summary] == [
        ("arc", 6, "arc.jsonl"), ("ceval", 6, "ceval.jsonl"), ("gsm8k", 6, "gsm8k.jsonl"), ("mmlu", 6, "mmlu.jsonl")]
    assert summary[2]["no_answer"] == 6 and summary[2]["accuracy"] == 0.0
    # output tokens as the engine counted them (the stand-in counts characters), and their rate
    assert summary[2]["output_tokens"] == 6 * len("I am not sure.") and summary[2]["output_tokens_per_s"] > 0
    # the per-item files are enough to re-score independently
    for r in summary:
        rows = [json.loads(line) for line in (stamp / r["file"]).read_text().splitlines()]
        assert len(rows) == 6
        for row in rows:
            assert row["prompt"].startswith("<bos><start_of_turn>user\n") and row["prompt"].endswith("<start_of_turn>model\n")
            again = extract_number(row["output"]) if r["dataset"] == "gsm8k" else extract_choice(row["output"], "".join(row["choices"]))
            assert again == row["extracted"] and row["correct"] == (again == row["gold"])
        assert sum(row["correct"] for row in rows) / 6 == pytest.approx(r["accuracy"])
    arc_rows = [json.loads(line) for line in (stamp / "arc.jsonl").read_text().splitlines()]
    assert arc_rows[3]["gold"] == "B" and arc_rows[3]["correct"]  # the item labelled 1-4, answerKey "2"
    table = result["table"]
    assert table.splitlines()[0].split() == ["|", "Model", "|", "arc", "|", "ceval", "|", "gsm8k", "|", "mmlu", "|"]
    assert f"{scores['arc']:.4f}" in table and table in capsys.readouterr().out  # the table goes to stdout


def test_limit_slice_and_max_new_tokens_override(tmp_path):
    engine = FakeEngine("gemma3-270m", perfect)
    result = run_evaluation(_args(tmp_path, "--eval_dataset", "gsm8k", "mmlu", "--eval_limit", "[7:10]",
                                  "--max_new_tokens", "16"), load=_loader({None: engine}))
    assert result["scores"] == {"gemma3-270m": {"gsm8k": 1.0, "mmlu": 1.0}}
    assert [c[:2] for c in engine.calls] == [(3, 16), (3, 16)]
    rows = [json.loads(line) for line in open(f"{result['output_dir']}/mmlu.jsonl")]
    assert [r["index"] for r in rows] == [7, 8, 9]


def test_before_after_two_models_side_by_side(tmp_path):
    ckpt = tmp_path / "output" / "gemma3-270m" / "v0-1" / "checkpoint-10"
    ckpt.mkdir(parents=True)
    (ckpt / "sft_args.json").write_text(json.dumps({"model_type": "gemma3-270m", "template_type": "gemma"}))
    (ckpt / "adapter_config.json").write_text("{}")  # a LoRA checkpoint (the fake engine loads nothing)
    engines = {None: FakeEngine("gemma3-270m", always_b), str(ckpt): FakeEngine("v0-1/checkpoint-10", perfect)}
    result = run_evaluation(_args(tmp_path, "--model_type", "gemma3-270m", "--ckpt_dir", str(ckpt),
                                  "--eval_dataset", "arc", "gsm8k", "--eval_limit", "4", "--name", "before-after"), load=_loader(engines))
    assert list(result["scores"]) == ["gemma3-270m", "v0-1/checkpoint-10"]
    assert result["scores"]["v0-1/checkpoint-10"] == {"arc": 1.0, "gsm8k": 1.0}
    base_arc = result["scores"]["gemma3-270m"]["arc"]
    lines = result["table"].splitlines()
    assert len(lines) == 5 and lines[4].startswith("| change v0-1/checkpoint-10 vs gemma3-270m")
    assert f"+{1 - base_arc:.4f}" in lines[4] and "+1.0000" in lines[4]
    out = result["output_dir"]
    assert "before-after" in out
    for label in ("gemma3-270m", "v0-1_checkpoint-10"):
        for ds in ("arc", "gsm8k"):
            assert len(open(f"{out}/{label}/{ds}.jsonl").readlines()) == 4
    summary = [json.loads(line) for line in open(f"{out}/eval_result.jsonl")]
    assert [(r["model"], r["dataset"]) for r in summary] == [
        ("gemma3-270m", "arc"), ("gemma3-270m", "gsm8k"), ("v0-1/checkpoint-10", "arc"), ("v0-1/checkpoint-10", "gsm8k")]
    assert summary[2]["ckpt_dir"] == str(ckpt)


def test_format_table_changes():
    table = format_table({"a": {"arc": 0.5, "mmlu": 0.25}, "b": {"arc": 0.625, "mmlu": 0.2}, "c": {"arc": 0.5}},
                         ["arc", "mmlu"])
    lines = table.splitlines()
    assert lines[2].split("|")[2].strip() == "0.5000" and lines[3].split("|")[3].strip() == "0.2000"
    assert [c.strip() for c in lines[5].split("|")[1:-1]] == ["change b vs a", "+0.1250", "-0.0500"]
    assert [c.strip() for c in lines[6].split("|")[1:-1]] == ["change c vs a", "+0.0000", "-"]
    assert report.slug("vx-1/checkpoint-10") == "vx-1_checkpoint-10"


def test_self_cognition_probe(tmp_path, monkeypatch):
    probe = [{"query": "你是谁？", "tag": "zh", "name": "小黄", "author": "魔搭"},
             {"query": "你是谁开发的？", "tag": "zh", "name": "小黄", "author": "魔搭"},
             {"query": "What is your name?", "tag": "en", "name": "Xiao Huang", "author": "ModelScope"}]
    monkeypatch.setattr("zhtune.eval.self_cognition.load_identity_probe", lambda name, author: probe)
    replies = {"你是谁？": "我是小黄，由魔搭开发的人工智能助手。", "你是谁开发的？": "我是小黄。",
               "What is your name?": "I am xiao huang, an assistant made by modelscope."}
    engine = FakeEngine("gemma3-270m", lambda q: replies[q])
    result = run_evaluation(_args(tmp_path, "--eval_dataset", "self-cognition", "--model_name", "小黄", "Xiao Huang",
                                  "--model_author", "魔搭", "ModelScope"), load=_loader({None: engine}))
    assert result["scores"]["gemma3-270m"]["self-cognition"] == pytest.approx(2 / 3)
    rows = [json.loads(line) for line in open(f"{result['output_dir']}/self-cognition.jsonl")]
    assert [r["correct"] for r in rows] == [True, False, True] and rows[1]["extracted"] == "小黄"
    assert engine.calls[0][1] == 256

    from zhtune.eval.self_cognition import score_identity
    direct = score_identity(engine, ["小黄", "Xiao Huang"], ["魔搭", "ModelScope"])
    assert (direct["correct"], direct["total"], direct["by_tag"]) == (2, 3, {"zh": 0.5, "en": 1.0})


def test_user_errors(tmp_path):
    with pytest.raises(UserError, match="needs --model_name and --model_author"):
        run_evaluation(_args(tmp_path, "--eval_dataset", "self-cognition"))
    with pytest.raises(UserError, match="no such folder"):
        run_evaluation(_args(tmp_path, "--ckpt_dir", str(tmp_path / "nope")))
    with pytest.raises(UserError, match="--eval_data_dir .*: no such folder"):
        run_evaluation(parse_args(EvalArguments, ["--eval_data_dir", str(tmp_path / "none")]))
    with pytest.raises(UserError, match="--eval_few_shot 2: no arc few-shot split"):
        (tmp_path / "d" / "arc").mkdir(parents=True)
        (tmp_path / "d" / "arc" / "test.jsonl").write_text(
            '{"query": "Question: Q?", "choices": ["a", "b"], "gold": 0}\n')
        run_evaluation(parse_args(EvalArguments, ["--eval_data_dir", str(tmp_path / "d"), "--eval_dataset", "arc",
                                                  "--eval_few_shot", "2"]))


def test_few_shot_turns_reach_the_engine(tmp_path):
    seen = []

    class Recorder(FakeEngine):
        def generate_completions(self, conversations, settings, batch_size=8, progress=False):
            seen.extend(conversations)
            return super().generate_completions(conversations, settings, batch_size)

    run_evaluation(_args(tmp_path, "--eval_dataset", "ceval", "--eval_few_shot", "2", "--eval_limit", "2"), load=_loader({None: Recorder("m", always_b)}))
    assert [m["role"] for m in seen[0]] == ["user", "assistant", "user", "assistant", "user"]
    assert seen[0][1]["content"] in "ABCD" and seen[0][0]["content"].startswith("以下是中国关于计算机网络考试")


def _dry(capsys, argv):
    assert cli.main(["eval", *argv, "--dry_run", "true"]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_dry_run_seed_commands(capsys):
    before = _dry(capsys, ["--model_id_or_path", "LLM-Research/gemma-2-9b-it", "--eval_dataset", "arc", "ceval",
                           "gsm8k", "mmlu", "--eval_backend", "Native", "--infer_backend", "vllm"])
    assert (before["model_type"], before["template"]) == ("gemma2-9b-instruct", "gemma")
    assert before["eval_dataset"] == ["arc", "ceval", "gsm8k", "mmlu"] and len(before["models"]) == 1
    after = _dry(capsys, ["--ckpt_dir", "output/gemma2-9b-instruct/vx-xxx/checkpoint-xxx", "--eval_dataset", "arc",
                          "ceval", "gsm8k", "mmlu", "--eval_backend", "Native", "--infer_backend", "vllm",
                          "--merge_lora", "true"])
    assert after["model_type"] == "gemma2-9b-instruct"
    (model,) = after["models"]
    assert model["ckpt_exists"] is False and model["label"] == "vx-xxx/checkpoint-xxx"
    assert after["merge_lora"] is True and after["infer_backend"] == "vllm"


def test_dry_run_before_after_and_limit(capsys):
    out = _dry(capsys, ["--model_type", "gemma3-270m", "--ckpt_dir", "output/gemma3-270m/v1-2/checkpoint-5",
                        "--eval_limit", "[10:20]", "--eval_data_dir", SAMPLES])
    assert [m["label"] for m in out["models"]] == ["gemma3-270m", "v1-2/checkpoint-5"]
    assert out["eval_limit"] == "[10:20]" and out["data_source"]["arc"].endswith("samples/arc")
    assert out["max_new_tokens"] == {"arc": 32, "ceval": 32, "gsm8k": 512, "mmlu": 32}


def test_real_engine_on_the_bundled_samples(tmp_path):
    """The real path: the embedded Gemma 3 270M through zhtune.infer.engine, 2 items per benchmark."""
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # on a busy small CPU box, one thread is ~10x faster than contended threads
    try:
        result = run_evaluation(_args(tmp_path, "--model_type", "gemma3-270m", "--eval_limit", "2",
                                      "--max_new_tokens", "4", "--infer_backend", "pt"))
    finally:
        torch.set_num_threads(threads)
    scores = result["scores"]["gemma3-270m"]
    assert list(scores) == ["arc", "ceval", "gsm8k", "mmlu"] and all(0.0 <= s <= 1.0 for s in scores.values())
    for ds in scores:
        rows = [json.loads(line) for line in open(f"{result['output_dir']}/{ds}.jsonl")]
        assert len(rows) == 2 and all(isinstance(r["output"], str) for r in rows)
        assert rows[0]["prompt"].startswith("<bos><start_of_turn>user\n")


def test_limit_past_the_end(tmp_path):
    with pytest.raises(UserError, match=r"leaves no arc items \(it has 10\)"):
        run_evaluation(_args(tmp_path, "--eval_dataset", "arc", "--eval_limit", "[50:60]"))
