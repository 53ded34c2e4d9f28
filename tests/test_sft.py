"""`zhtune sft` on tiny random models from real configs, on a CPU."""

import json
import os
import subprocess
import sys

import pytest
from transformers import AutoModelForCausalLM

from zhtune.args import SftArguments
from helpers import write_chat_jsonl
from zhtune.cli import main
from zhtune.models.resolve import resolve_model
from zhtune.train.sft import lora_plan
from zhtune.tuners.lora import modules_of


@pytest.mark.parametrize("arch,model_type", [("gemma2", "gemma2-9b-instruct"), ("gemma3_text", "gemma3-270m"),
                                             ("qwen2", "qwen2.5-7b-instruct")])
def test_target_keywords_resolve_the_same_with_and_without_the_model(tiny_models, arch, model_type):
    model = AutoModelForCausalLM.from_pretrained(tiny_models[arch])
    resolved = resolve_model(model_type, str(tiny_models[arch]))
    args = SftArguments(lora_target_modules=["EMBEDDING", "ALL", "lm_head"], lora_modules_to_save=["LN"])
    from_model, from_table = lora_plan(args, resolved, model), lora_plan(args, resolved)
    assert from_model == from_table
    targets, to_save = from_model
    assert targets[0] == "embed_tokens" and targets[-1] == "lm_head" and "down_proj" in targets
    assert set(to_save) == set(modules_of(model)["norm"]) and "input_layernorm" in to_save
    real, table = modules_of(model), resolved.arch.module_names()  # the architecture record matches the model
    assert {k: real[k] for k in ("linear", "embedding", "norm", "head")} == \
        {k: table[k] for k in ("linear", "embedding", "norm", "head")}


@pytest.mark.slow
def test_run_layout_and_loss_falls(trained_run):
    run_dir = trained_run["run_dir"]
    assert (run_dir / "sft_args.json").is_file()
    rows = [json.loads(line) for line in (run_dir / "logging.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) >= 5 and losses[-1] < losses[0]
    assert any("eval_loss" in r and "eval_token_acc" in r for r in rows)
    assert all("tokens_per_s" in r and "memory_gib" in r for r in rows if "loss" in r)
    assert all(0 < r["trained_tokens_per_s"] <= r["tokens_per_s"] for r in rows if "loss" in r)
    assert (run_dir / "images" / "train_loss.png").stat().st_size > 10_000
    assert list((run_dir / "runs").rglob("events.out.tfevents*")), "tensorboard logs"
    for step in (3, 6):
        ckpt = run_dir / f"checkpoint-{step}"
        names = {p.name for p in ckpt.iterdir()}
        assert {"adapter_model.safetensors", "adapter_config.json", "sft_args.json", "generation_config.json",
                "optimizer.pt", "scheduler.pt", "trainer_state.json"} <= names, names
        assert json.loads((ckpt / "sft_args.json").read_text())["model_type"] == "gemma2-9b-instruct"
    assert not list(run_dir.glob(".tmp*")), "no staging folder left behind"


def test_closing_line_names_best_and_last(tiny_models, tmp_path, capsys):
    from helpers import write_chat_jsonl
    data = write_chat_jsonl(tmp_path / "d.jsonl", 10)
    assert main(["sft", "--model_id_or_path", str(tiny_models["qwen2"]), "--model_type", "qwen2.5-0.5b-instruct",
                 "--dataset", str(data), "--max_steps", "2", "--eval_steps", "1", "--batch_size", "2", "--gradient_accumulation_steps", "1",
                 "--output_dir", str(tmp_path / "out")]) == 0
    last_line = capsys.readouterr().err.strip().splitlines()[-1]  # log lines go to stderr
    assert last_line.startswith("[zhtune] best checkpoint: ") and "last checkpoint: " in last_line
    assert last_line.endswith("checkpoint-2")


def test_fast_path_under_bf16_mixed_precision(tiny_models, tmp_path, capsys):
    """What runs on a GPU: a bf16 model, fp32 LoRA weights, Trainer's bf16 autocast around the forward
    only, the fast path's chunked loss calling the lm_head outside it (and bf16 LoRA inputs)."""
    from helpers import write_chat_jsonl
    data = write_chat_jsonl(tmp_path / "d.jsonl", 12)
    assert main(["sft", "--model_id_or_path", str(tiny_models["gemma2"]), "--dataset", str(data),
                 "--lora_target_modules", "EMBEDDING", "ALL", "lm_head", "--lora_modules_to_save", "LN",
                 "--dtype", "bf16", "--fast_path", "true", "--max_steps", "2", "--eval_steps", "2",
                 "--output_dir", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().err
    assert "[zhtune] training path: fast" in out and "bf16 LoRA inputs" in out
    run = next((tmp_path / "out").glob("*/v*"))
    losses = [r["loss"] for r in map(json.loads, (run / "logging.jsonl").read_text().splitlines()) if "loss" in r]
    assert losses and all(0 < x < 20 for x in losses)
    assert (run / "checkpoint-2" / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_resume_after_sigkill_matches_uninterrupted(trained_run, tmp_path):
    """Kill a run right after its first checkpoint; resuming finishes with the same final loss."""
    argv = trained_run["argv"]
    full_losses = [json.loads(l).get("loss") for l in (trained_run["run_dir"] / "logging.jsonl").read_text().splitlines()]
    out = tmp_path / "killed"
    argv = [a if a != argv[argv.index("--output_dir") + 1] else str(out) for a in argv]
    proc = subprocess.Popen([sys.executable, "-m", "zhtune", *argv], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    run_dir = None
    import time
    deadline = time.time() + 240
    while time.time() < deadline:
        found = list(out.glob("gemma2-9b-instruct/v0-*/checkpoint-3"))
        if found:
            run_dir = found[0].parent
            break
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    assert run_dir is not None, "the first checkpoint appeared"
    assert main([*argv, "--resume_from_checkpoint", str(run_dir / "checkpoint-3")]) == 0
    resumed = [json.loads(l) for l in (run_dir / "logging.jsonl").read_text().splitlines()]
    final_resumed = [r["loss"] for r in resumed if "loss" in r and r["step"] == 6][-1]
    final_full = [l for l in full_losses if l is not None][-1]
    assert final_resumed == pytest.approx(final_full, abs=1e-4)


@pytest.mark.slow
def test_two_processes_through_nproc_per_node(tiny_models, tmp_path):
    from helpers import write_chat_jsonl
    data = write_chat_jsonl(tmp_path / "d.jsonl", 12)
    import socket
    with socket.socket() as sock:  # a free port: another run of the suite may hold a fixed one
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "NPROC_PER_NODE": "2", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "zhtune", "sft", "--model_id_or_path", str(tiny_models["gemma2"]),
                             "--dataset", str(data), "--max_steps", "2", "--eval_steps", "2", "--output_dir",
                             str(tmp_path / "out")], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "launching 2 processes" in result.stderr
    run_dirs = list((tmp_path / "out" / "gemma2-9b-instruct").glob("v*-*"))
    assert len(run_dirs) == 1, "both ranks write into one run folder"
    args = json.loads((run_dirs[0] / "checkpoint-2" / "sft_args.json").read_text())
    assert args["gradient_accumulation_steps"] is None  # default: ceil(16 / batch / world) = 8
    state = json.loads((run_dirs[0] / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["global_step"] == 2
    # each rank's random state lands in the checkpoint (a resume on 2 ranks needs both); no staging left
    assert {p.name for p in (run_dirs[0] / "checkpoint-2").glob("rng_state_*.pth")} == \
        {"rng_state_0.pth", "rng_state_1.pth"}
    assert not (run_dirs[0] / ".tmp-checkpoint").exists()


@pytest.mark.slow
def test_two_nodes_on_loopback(tiny_models, tmp_path):
    """ms-swift's multi-node variables: two launchers (NNODES=2, NODE_RANK 0 and 1, one process each)
    meet through torchrun at MASTER_ADDR:MASTER_PORT; both ranks train, and one checkpoint is written,
    into rank 0's run folder although node 1's launcher named its own (it starts later)."""
    import signal
    import socket
    import time
    from helpers import write_chat_jsonl
    data = write_chat_jsonl(tmp_path / "d.jsonl", 12)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    argv = [sys.executable, "-m", "zhtune", "sft", "--model_id_or_path", str(tiny_models["gemma2"]), "--dataset",
            str(data), "--max_steps", "2", "--eval_steps", "2", "--logging_steps", "1", "--output_dir",
            str(tmp_path / "out")]
    nodes, files = [], []
    for rank in (0, 1):
        env = {**os.environ, "NNODES": "2", "NODE_RANK": str(rank), "NPROC_PER_NODE": "1",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
        files += [open(tmp_path / f"node{rank}.out", "w"), open(tmp_path / f"node{rank}.err", "w")]  # noqa: SIM115
        nodes.append(subprocess.Popen(argv, env=env, stdout=files[-2], stderr=files[-1], text=True,
                                      start_new_session=True))  # a process group: the launcher and its torchrun
        time.sleep(2.0)  # node 1's launcher names a later run folder (v<N>-<time>) than node 0's
    deadline = time.time() + 600
    while any(node.poll() is None for node in nodes) and time.time() < deadline:
        if any(node.poll() not in (None, 0) for node in nodes):  # one node failed: the other would wait for it
            break
        time.sleep(0.5)
    for node in nodes:
        if node.poll() is None:
            os.killpg(node.pid, signal.SIGKILL)
        node.wait()
    for f in files:
        f.close()
    outputs = [((tmp_path / f"node{r}.out").read_text(), (tmp_path / f"node{r}.err").read_text()) for r in (0, 1)]
    for node, (out, err) in zip(nodes, outputs):
        assert node.returncode == 0, out[-3000:] + err[-3000:]
        assert "launching 1 processes per node" in err
    run_dirs = [p for p in (tmp_path / "out" / "gemma2-9b-instruct").glob("v*-*") if p.is_dir()]
    assert len(run_dirs) == 1, f"both ranks write into rank 0's run folder: {run_dirs}"
    ckpt = run_dirs[0] / "checkpoint-2"
    assert json.loads((ckpt / "trainer_state.json").read_text())["global_step"] == 2
    # each rank saved its random state into the one checkpoint: rank 1 (node 1) trained both steps with rank 0
    assert {p.name for p in ckpt.glob("rng_state_*.pth")} == {"rng_state_0.pth", "rng_state_1.pth"}
    steps = [json.loads(line) for line in (run_dirs[0] / "logging.jsonl").read_text().splitlines()]
    assert [r["step"] for r in steps if "loss" in r] == [1, 2]
    assert not (run_dirs[0] / ".tmp-checkpoint").exists()


def test_bad_sft_input(tmp_path):
    assert main(["sft", "--model_type", "gemma3-270m"]) == 2
    assert main(["sft", "--dataset", "x.jsonl", "--resume_from_checkpoint", str(tmp_path / "nope")]) == 2


def test_deepspeed_without_deepspeed_is_one_line(tmp_path, capsys):
    pytest.importorskip("torch")
    try:
        import deepspeed  # noqa: F401
        pytest.skip("DeepSpeed is installed here")
    except ImportError:
        pass
    out = tmp_path / "out"
    assert main(["sft", "--model_type", "gemma3-270m", "--dataset", "self-cognition#4", "--model_name", "小黄",
                 "Xiao Huang", "--model_author", "魔搭", "ModelScope", "--deepspeed", "default-zero2",
                 "--output_dir", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install 'zhtune[deepspeed]'" in err[0]
    assert not out.exists(), "nothing written"


def test_fsdp_bad_values_and_cpu_are_one_line(tmp_path, capsys):
    out = tmp_path / "out"
    base = ["sft", "--model_type", "gemma3-270m", "--dataset", "self-cognition#4", "--model_name", "小黄",
            "Xiao Huang", "--model_author", "魔搭", "ModelScope", "--output_dir", str(out)]
    cases = {("--fsdp", "hybrid_shard"): "only FSDP1",
             ("--fsdp", "fsdp2", "--deepspeed", "default-zero2"): "give one of them",
             ("--fsdp", "fsdp2"): "--fsdp needs CUDA GPUs"}
    import torch
    if torch.cuda.is_available():
        del cases[("--fsdp", "fsdp2")]
    for extra, message in cases.items():
        assert main(base + list(extra)) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
    assert not out.exists(), "nothing written"


@pytest.mark.parametrize("eval_steps", ["1", "100"])  # 100: broken checkpoints are saved before a log line shows it
def test_a_diverging_run_stops_with_one_line_and_keeps_no_broken_checkpoint(tiny_models, tmp_path, capsys,
                                                                            eval_steps):
    """A learning rate that overflows the weights: the run stops at the first non-finite log line, says what
    to change, and leaves no checkpoint saved after its last finite step (on the H200 a run whose gradient
    norm was nan from step 5 on saved its broken weights as the best checkpoint)."""
    data = write_chat_jsonl(tmp_path / "train.jsonl", 24)
    code = main(["sft", "--model_id_or_path", str(tiny_models["gemma2"]), "--dataset", str(data),
                 "--learning_rate", "1e30", "--max_steps", "8", "--eval_steps", eval_steps, "--save_steps", "1",
                 "--batch_size", "2", "--gradient_accumulation_steps", "1", "--logging_steps", "2",
                 "--output_dir", str(tmp_path / "out"), "--dataset_test_ratio", "0.1", "--save_total_limit", "-1"])
    err = [line for line in capsys.readouterr().err.splitlines() if "zhtune sft: error" in line]
    assert code == 2 and len(err) == 1 and "training diverged at step" in err[0], err
    assert "Lower --learning_rate (it was 1e+30)" in err[0]
    assert ("removed checkpoint-" in err[0]) == (eval_steps == "100"), err[0]
    from safetensors.torch import load_file
    run = next((tmp_path / "out").glob("*/v0-*"))
    diverged = int(err[0].split("training diverged at step ")[1].split()[0])
    kept = sorted(run.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    assert kept and all(int(p.name.split("-")[1]) < diverged for p in kept), (kept, diverged)
    for checkpoint in kept:  # saved every step: each one left is whole and finite
        weights = load_file(checkpoint / "adapter_model.safetensors")
        assert weights and all(bool(w.isfinite().all()) for w in weights.values()), checkpoint.name


def test_a_long_training_step_and_evaluation_say_they_are_alive(tiny_models, tmp_path, capsys, monkeypatch):
    """The first step of a compiled run compiles for minutes (5.5 on the H200 for the embedded model), the first
    evaluation too: a step or an evaluation longer than the heartbeat interval logs "still in training step N
    (seconds)" / "still evaluating at step N (seconds)" while it runs."""
    import time

    from zhtune.train import callbacks
    from zhtune.train.trainer import ZhTrainer
    monkeypatch.setattr(callbacks, "HEARTBEAT_EVERY", 0.4)
    original = ZhTrainer.training_step

    def slow_first_step(self, *args, **kwargs):
        if self.state.global_step == 0:
            time.sleep(2.5)
        return original(self, *args, **kwargs)
    monkeypatch.setattr(ZhTrainer, "training_step", slow_first_step)
    evaluate = ZhTrainer.evaluation_loop

    def slow_evaluation(self, *args, **kwargs):
        time.sleep(1.2)
        return evaluate(self, *args, **kwargs)
    monkeypatch.setattr(ZhTrainer, "evaluation_loop", slow_evaluation)
    data = write_chat_jsonl(tmp_path / "train.jsonl", 10)
    code = main(["sft", "--model_id_or_path", str(tiny_models["gemma2"]), "--dataset", str(data), "--max_steps", "3",
                 "--batch_size", "2", "--gradient_accumulation_steps", "1", "--output_dir", str(tmp_path / "out"),
                 "--dataset_test_ratio", "0.2", "--eval_steps", "3", "--identity_probe", "false"])
    err = capsys.readouterr().err
    assert code == 0, err[-2000:]
    beats = [line for line in err.splitlines() if "still in training step" in line]
    first = [line.split("still in training step 1 (")[1] for line in beats if "still in training step 1 (" in line]
    assert len(first) >= 3 and int(first[-1].split("s")[0]) >= 2, beats  # every 0.4 s through the 2.5 s step
    assert any("still evaluating at step 3 (" in line for line in err.splitlines()), err[-2000:]


def test_a_compiled_run_compiles_once_however_full_its_micro_batches(tiny_models, tmp_path, monkeypatch, capsys):
    """The fast path compiles the decoder layers (on a GPU); a micro-batch of another shape compiles them again.
    On the H200 the embedded model's first step took 332 s: its micro-batches of 8 packed rows and the epoch's
    short last one (2 rows) had two shapes. Every micro-batch now has one shape (--batch_size x --max_length),
    so one graph serves the whole run (dynamo's eager backend here: the graphs are counted, not built), and
    one more the chunked loss's per-chunk arithmetic (compiled with the layers by default)."""
    import torch._dynamo

    import zhtune.train.fast_path as fast_path
    monkeypatch.setattr(fast_path.FastPath, "compiles", lambda self: True)
    compile_layers = fast_path.compile_decoder_layers
    monkeypatch.setattr(fast_path, "compile_decoder_layers",
                        lambda model, part="layer": compile_layers(model, part, backend="eager"))
    data = write_chat_jsonl(tmp_path / "train.jsonl", 24)
    torch._dynamo.reset()
    before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    code = main(["sft", "--model_id_or_path", str(tiny_models["gemma2"]), "--dataset", str(data), "--fast_path", "true",
                 "--max_length", "128", "--batch_size", "4", "--gradient_accumulation_steps", "1",
                 "--num_train_epochs", "2", "--output_dir", str(tmp_path / "out"), "--dataset_test_ratio", "0",
                 "--identity_probe", "false"])
    err = capsys.readouterr().err
    assert code == 0 and "packing: 24 samples into 6 rows of at most 128 tokens" in err, err[-2000:]  # 4 + 2 rows
    assert "fused LoRA-A, selective recomputation, torch.compile per decoder layer" in err, err[-2000:]
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - before == 2


def test_memory_budget_without_a_gpu_says_it_is_not_used(tiny_models, tmp_path, capsys):
    data = write_chat_jsonl(tmp_path / "train.jsonl", 4)
    code = main(["sft", "--model_id_or_path", str(tiny_models["gemma2"]), "--dataset", str(data), "--max_steps", "1",
                 "--memory_budget_gib", "20", "--output_dir", str(tmp_path / "out"), "--dataset_test_ratio", "0",
                 "--identity_probe", "false"])
    err = capsys.readouterr().err
    assert code == 0
    assert "[zhtune] warning: --memory_budget_gib 20 is not used: it plans the GPU fast path's activation " \
           "checkpointing, and this run has no GPU" in err


def test_a_run_that_diverges_after_a_resume_keeps_the_checkpoint_it_resumed_from(tmp_path):
    from transformers import TrainerControl, TrainerState

    from zhtune.train.callbacks import DivergenceGuard
    for step in (100, 104):
        (tmp_path / f"checkpoint-{step}").mkdir()
    guard, state, control = DivergenceGuard(), TrainerState(global_step=100), TrainerControl()
    guard.on_train_begin(None, state, control)  # resumed from checkpoint-100
    state.global_step = 105
    guard.on_log(None, state, control, logs={"loss": float("nan"), "grad_norm": float("nan")})
    assert control.should_training_stop and not control.should_save
    assert guard.remove_later_checkpoints(tmp_path) == ["checkpoint-104"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-100"]
    assert "training diverged at step 105 (loss nan, grad_norm nan)" in guard.message(1e-4, ["checkpoint-104"])


def test_bf16_run_trains_the_saved_norms(tiny_models, tmp_path):
    """`--lora_modules_to_save LN` on a bf16 model: the norms train (in bf16 an AdamW step of 1e-4 on a weight
    near 1 rounds back to the same number; real Gemma 2 norm weights are of that size) and the hidden states
    after them stay bf16."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from helpers import write_chat_jsonl
    from zhtune.tuners.lora import train_saved_modules_in_fp32
    model = AutoModelForCausalLM.from_pretrained(tiny_models["gemma2"], dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.5)
    model.save_pretrained(tmp_path / "model")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        if (tiny_models["gemma2"] / name).is_file():
            (tmp_path / "model" / name).write_bytes((tiny_models["gemma2"] / name).read_bytes())
    data = write_chat_jsonl(tmp_path / "d.jsonl", 12)
    assert main(["sft", "--model_id_or_path", str(tmp_path / "model"), "--model_type", "gemma2-9b-instruct",
                 "--dataset", str(data), "--lora_modules_to_save", "LN", "--dtype", "bf16", "--learning_rate", "1e-4",
                 "--warmup_ratio", "0", "--max_steps", "2", "--eval_steps", "2", "--output_dir", str(tmp_path / "out")]) == 0
    adapter = load_file(next((tmp_path / "out").glob("*/v*/checkpoint-2/adapter_model.safetensors")))
    norms = {k: v for k, v in adapter.items() if "norm" in k}
    assert norms and all(v.dtype == torch.float32 for v in norms.values())
    moved = [k for k, v in norms.items() if (v - 1.5).abs().max() > 5e-5]
    assert len(moved) == len(norms), sorted(set(norms) - set(moved))

    from peft import LoraConfig, get_peft_model
    bf16 = get_peft_model(AutoModelForCausalLM.from_pretrained(tmp_path / "model", dtype=torch.bfloat16),
                          LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["input_layernorm", "norm"]))
    assert train_saved_modules_in_fp32(bf16) == 4 * 2 + 1  # "norm" names every norm: 4 a layer, 2 layers, the last
    out = bf16(input_ids=torch.tensor([[5, 6, 7]]), output_hidden_states=True)
    assert all(h.dtype == torch.bfloat16 for h in out.hidden_states) and out.logits.dtype == torch.bfloat16
