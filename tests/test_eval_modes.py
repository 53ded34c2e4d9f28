"""`--eval_mode loglik` (zhtune/eval/loglik.py), Wilson intervals, and --dry_run item counts."""

import json
import math
import threading

import pytest

from zhtune.args import EvalArguments, parse_args
from zhtune.errors import UserError
from zhtune.eval import bundled_samples_dir, run_evaluation
from zhtune.eval.evaluate import eval_main
from zhtune.eval.loglik import score_choices
from zhtune.eval.report import wilson_interval

SAMPLES = str(bundled_samples_dir())
V = 50


def _args(tmp_path, *argv):
    return parse_args(EvalArguments, ["--eval_data_dir", SAMPLES, "--eval_output_dir", str(tmp_path), *argv])


def test_wilson_interval():
    low, high = wilson_interval(50, 100)
    assert (round(low, 4), round(high, 4)) == (0.4038, 0.5962)
    assert wilson_interval(0, 20)[0] == 0.0 and round(wilson_interval(0, 20)[1], 4) == 0.1611
    assert wilson_interval(20, 20)[1] == 1.0
    assert wilson_interval(0, 0) == (0.0, 1.0)


class BigramModel:
    """logits at a position depend only on the token there: log P(next | prev) = table[prev]."""
    def __init__(self):
        import torch
        g = torch.Generator().manual_seed(0)
        self.table = torch.randn(V, V, generator=g)
        self.param = torch.nn.Parameter(torch.zeros(1))

    def parameters(self):
        yield self.param

    def get_output_embeddings(self):  # the scorer sizes its batches from the vocabulary
        import torch
        return torch.nn.Linear(1, V, bias=False)

    def __call__(self, input_ids, attention_mask, position_ids, logits_to_keep, use_cache):
        import types
        return types.SimpleNamespace(logits=self.table[input_ids][:, -logits_to_keep:])

    def logp(self, prev, nxt):
        import torch
        return torch.log_softmax(self.table[prev], -1)[nxt].item()


class Tok:
    pad_token_id = 0

    def encode(self, text, add_special_tokens=False):
        return [1 + (ord(c) % (V - 1)) for c in text]


class Engine:
    def __init__(self):
        self.model, self.tokenizer, self.lock = BigramModel(), Tok(), threading.Lock()

    def encode_prompt(self, messages):
        return self.tokenizer.encode(messages[-1]["content"] + ">")


def test_loglik_scores_are_the_model_log_probabilities_under_left_padding():
    engine = Engine()
    convs = [[{"role": "user", "content": "a long question here?"}], [{"role": "user", "content": "q?"}]]
    options = [["xy", "zzz", ""], ["é", "bb"]]  # an empty option text scores 0
    scores = score_choices(engine, convs, options, ["ABC", "AB"], batch_size=3)
    m, enc = engine.model, engine.tokenizer.encode
    for conv, opts, labels, s in zip(convs, options, ["ABC", "AB"], scores):
        prompt = engine.encode_prompt(conv)
        for j, text in enumerate(opts):
            ids = prompt + enc(text)
            want = sum(m.logp(ids[k - 1], ids[k]) for k in range(len(prompt), len(ids)))
            assert math.isclose(s.text_logprobs[j], want, abs_tol=1e-4)
            assert math.isclose(s.label_logprobs[j], m.logp(prompt[-1], enc(labels[j])[0]), abs_tol=1e-4)
        assert s.text_bytes == [len(t.encode()) for t in opts]
    assert scores[1].text_bytes == [2, 2]  # "é" is two bytes: acc_norm divides by bytes
    best = max(range(3), key=lambda j: scores[0].label_logprobs[j])
    assert scores[0].pred == best


def test_loglik_batches_split_to_bound_the_logits_memory(monkeypatch):
    """A batch whose kept logits would pass the budget is scored in pieces, with the same scores
    (a full MMLU run on a GPU ran out of memory before this)."""
    from zhtune.eval import loglik
    convs = [[{"role": "user", "content": f"question {i}?"}] for i in range(5)]
    options = [["a much longer option text", "b", "cc"]] * 5
    whole = score_choices(Engine(), convs, options, ["ABC"] * 5, batch_size=16)
    monkeypatch.setattr(loglik, "_LOGIT_BUDGET", V * 30)  # about one sequence's kept logits
    pieces = score_choices(Engine(), convs, options, ["ABC"] * 5, batch_size=16)
    for a, b in zip(whole, pieces):
        assert a.text_logprobs == pytest.approx(b.text_logprobs, abs=1e-5)
        assert a.label_logprobs == pytest.approx(b.label_logprobs, abs=1e-5)


class TinyEngine(Engine):
    """A real (tiny, random) transformers model under the character tokenizer above."""
    def __init__(self, architecture, window=128):
        import torch
        from transformers import AutoModelForCausalLM
        from tests.tiny_models import tiny_config
        super().__init__()
        config = tiny_config(architecture, V)
        if getattr(config, "sliding_window", None):
            config.sliding_window = window
        torch.manual_seed(0)
        self.model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


@pytest.mark.parametrize("architecture", ["gemma2", "gemma3_text", "qwen2"])
def test_loglik_shared_prompts_give_the_same_scores(architecture):
    """Each prompt once, its KV cache reused for the options (left padding, options of 0, 1 and many
    tokens, items of different lengths in one batch) == every prompt + option sequence on its own."""
    engine = TinyEngine(architecture)
    convs = [[{"role": "user", "content": q}] for q in ("a long question, longer than the others?", "q?",
                                                      "what is it", "medium one here")]
    options = [["xy", "zzz", "", "a much longer option text"], ["é", "bb", "c", "dd"], ["yes", "no"], ["k" * 9, "l"]]
    labels = ["ABCD", "ABCD", "AB", "AB"]
    shared = score_choices(engine, convs, options, labels, batch_size=3, share_prompt=True)
    plain = score_choices(engine, convs, options, labels, batch_size=3, share_prompt=False)
    for a, b in zip(shared, plain):
        assert a.text_logprobs == pytest.approx(b.text_logprobs, abs=1e-4)
        assert a.label_logprobs == pytest.approx(b.label_logprobs, abs=1e-4)
        assert a.text_bytes == b.text_bytes and a.pred == b.pred and a.pred_norm == b.pred_norm


def test_loglik_shares_prompts_only_within_the_sliding_window():
    engine = TinyEngine("gemma3_text", window=8)
    convs = [[{"role": "user", "content": "a question longer than the window"}]]
    with pytest.raises(ValueError, match="cannot share prompts"):
        score_choices(engine, convs, [["ab", "cd"]], ["AB"], share_prompt=True)
    auto = score_choices(engine, convs, [["ab", "cd"]], ["AB"])  # falls back to whole sequences
    plain = score_choices(engine, convs, [["ab", "cd"]], ["AB"], share_prompt=False)
    assert auto[0].text_logprobs == plain[0].text_logprobs


def test_loglik_refuses_vllm(tmp_path):
    with pytest.raises(UserError, match="--eval_mode loglik runs on the pt backend"):
        run_evaluation(_args(tmp_path, "--eval_mode", "loglik", "--infer_backend", "vllm"))


def test_dry_run_counts_items_and_files(capsys, tmp_path):
    args = _args(tmp_path, "--eval_limit", "3", "--eval_mode", "loglik", "--dry_run", "true")
    assert eval_main(args) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["items"]["arc"] == {"scored": 3, "total": 10} and out["items"]["mmlu"]["total"] == 10
    assert out["data_files"]["gsm8k"][0].endswith("gsm8k/test.jsonl")
    assert out["eval_mode"] == {"arc": "loglik", "ceval": "loglik", "gsm8k": "generate", "mmlu": "loglik"}
    hub = parse_args(EvalArguments, ["--eval_dataset", "arc", "--dry_run", "true"])
    eval_main(hub)
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["items"]["arc"].startswith("unknown without network")


def test_dry_run_fails_on_a_missing_or_empty_data_folder(tmp_path):
    with pytest.raises(UserError, match="no such folder"):
        eval_main(parse_args(EvalArguments, ["--eval_data_dir", str(tmp_path / "nope"), "--dry_run", "true"]))
    (tmp_path / "arc").mkdir()
    with pytest.raises(UserError, match="no arc items found") as e:
        eval_main(parse_args(EvalArguments, ["--eval_data_dir", str(tmp_path), "--eval_dataset", "arc",
                                             "--dry_run", "true"]))
    assert "\n" not in str(e.value)


@pytest.mark.slow
def test_loglik_on_the_embedded_model(tmp_path):
    """The real path: Gemma 3 270M (a base model), 3 items of ARC, C-Eval and MMLU in loglik mode."""
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = run_evaluation(_args(tmp_path, "--model_type", "gemma3-270m", "--eval_mode", "loglik",
                                      "--eval_dataset", "arc", "ceval", "mmlu", "gsm8k", "--eval_limit", "3",
                                      "--max_new_tokens", "4"))
    finally:
        torch.set_num_threads(threads)
    rows = {r["dataset"]: r for r in result["results"]}
    assert rows["gsm8k"]["mode"] == "generate" and "acc_norm" not in rows["gsm8k"]
    for ds in ("arc", "ceval", "mmlu"):
        r = rows[ds]
        assert r["mode"] == "loglik" and r["total"] == 3 and 0 <= r["acc"] <= 1 and 0 <= r["acc_norm"] <= 1
        assert r["ci95"][0] <= r["acc"] <= r["ci95"][1]
        items = [json.loads(line) for line in open(f"{result['output_dir']}/{ds}.jsonl")]
        assert all(set(i["loglik"]) == set(i["choices"]) and i["extracted"] in i["choices"] for i in items)
        assert all(v <= 0 for i in items for v in i["loglik"].values())
