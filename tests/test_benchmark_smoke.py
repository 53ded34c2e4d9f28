"""benchmarks/sft_speed.py --smoke: the whole benchmark on a tiny Gemma 2 on the CPU, and the pieces of
its GPU-only variants that a CPU can check."""

import json
import sys
import types

import pytest
import torch
from helpers import load_benchmark


@pytest.mark.slow
def test_sft_speed_smoke(tmp_path, capsys):
    bench = load_benchmark("sft_speed")
    out = tmp_path / "results.json"
    assert bench.main(["--smoke", "--profile", "closs", "--out", str(out)]) == 0
    results = json.loads(out.read_text())
    variants = results["variants"]
    assert set(variants) == {"baseline", "eager_packed", "hf_best", "packed_full", "chunked", "chunked_nocast",
                             "mem_lean", "ckpt_auto", "fused_lora", "selective", "fused_selective", "closs"}
    assert variants["hf_best"] == {"skipped": "needs a GPU"}
    for name, r in variants.items():
        if name == "hf_best":
            continue
        assert r.get("tokens_per_s", 0) > 0, (name, r)
        assert r["x_baseline"] > 0 and r["x_eager_packed"] > 0
        assert r["lm_head_tokens"] == ("all" if name in ("baseline", "eager_packed", "packed_full") else "trained")
        if name != "baseline":  # every other variant against the per-sample eager reference (fp32 here)
            assert r["check"]["loss_abs_diff"] <= 1e-4, name
            assert r["check"]["grad_cosine"] > 0.9999 and r["check"]["grad_cosine_lora"] > 0.9999, name
    assert "LoRA-A of q/k/v and gate/up fused" in variants["fused_lora"]["note"]
    assert variants["closs"]["profile"]["wall_s"] > 0 and "profile" not in variants["chunked"]
    printed = capsys.readouterr()
    assert "[zhtune] training path: fast (packing + eager with softcap + chunked softcapped loss)" in printed.err
    assert "hf_best: skipped on the CPU" in printed.out
    assert "[bench] summary" in printed.out


def test_sft_speed_dropout_suffixes(tmp_path):
    """Any variant + _hashdrop (hashed LoRA dropout masks) or _nodrop (dropout off): timed, checked against the
    reference and noted; an unknown name is refused."""
    bench = load_benchmark("sft_speed")
    out = tmp_path / "results.json"
    assert bench.main(["--smoke", "--variants", "chunked_nocast_hashdrop,fused_selective_nodrop,chunked_nocast",
                       "--out", str(out)]) == 0
    variants = json.loads(out.read_text())["variants"]
    assert "LoRA dropout with hashed masks" in variants["chunked_nocast_hashdrop"]["note"]
    assert "LoRA dropout 0.0 (not the seed's 0.05)" in variants["fused_selective_nodrop"]["note"]
    assert "dropout" not in variants["chunked_nocast"]["note"]
    for r in variants.values():
        assert r["tokens_per_s"] > 0 and r["check"]["loss_abs_diff"] <= 1e-4
    with pytest.raises(SystemExit, match="unknown variants"):
        bench.main(["--smoke", "--variants", "chunked_nocast_hashdrop_x"])


def test_sft_speed_rounds(tmp_path, capsys, monkeypatch):
    """--rounds 2: every variant timed twice in turn, tokens/s and the ratios per round and their median."""
    bench = load_benchmark("sft_speed")
    out = tmp_path / "results.json"
    resets = []
    monkeypatch.setattr(torch._dynamo, "reset", lambda: resets.append(1))
    assert bench.main(["--smoke", "--variants", "eager_packed,chunked_nocast_hashdrop", "--check", "false",
                       "--rounds", "2", "--fresh_compile", "--out", str(out)]) == 0
    assert len(resets) == 4, "--fresh_compile: compile caches cleared before each variant in each round"
    variants = json.loads(out.read_text())["variants"]
    ref, fast = variants["eager_packed"], variants["chunked_nocast_hashdrop"]
    assert len(ref["rounds"]) == len(fast["rounds"]) == 2 and ref["rounds"][0] == ref["tokens_per_s"]
    assert ref["x_eager_packed_rounds"] == [1.0, 1.0]
    assert fast["x_eager_packed_rounds"] == pytest.approx([a / b for a, b in zip(fast["rounds"], ref["rounds"])])
    assert min(fast["rounds"]) <= fast["tokens_per_s_median"] <= max(fast["rounds"])
    assert fast["x_eager_packed_best"] == pytest.approx(fast["tokens_per_s_median"] / max(ref["rounds"]))
    printed = capsys.readouterr().out
    assert "(median over its best round" in printed and "[bench] round 2: chunked_nocast_hashdrop" in printed
    with pytest.raises(SystemExit, match="--rounds 0"):
        bench.main(["--smoke", "--rounds", "0"])


def test_flops_per_token_of_gemma2_9b():
    bench = load_benchmark("sft_speed")
    per_token = bench.model_flops(bench.GEMMA2_9B, [1]) / 1  # one token: no attention context to speak of
    assert 36.8e9 < per_token < 37.0e9  # 2 x 2 x (8.31B decoder linear + 0.92B lm_head) parameters
    # the chunked loss runs the lm_head on trained tokens only: 2 x 2 x 3584 x 256000 FLOPs per untrained token less
    head = 2 * 2 * 3584 * 256000
    assert bench.model_flops(bench.GEMMA2_9B, [1000], head_tokens=0) == \
        pytest.approx(bench.model_flops(bench.GEMMA2_9B, [1000]) - 1000 * head)
    assert bench.model_flops(bench.GEMMA2_9B, [1000], head_tokens=1000) == bench.model_flops(bench.GEMMA2_9B, [1000])


def test_hf_flattened_rows_train_what_the_reference_trains():
    """hf_best's data form (transformers' DataCollatorWithFlattening, padded to the flex block) gives the
    per-sample reference's loss and gradients (eager attention here; flex and liger need a GPU)."""
    bench = load_benchmark("sft_speed")
    torch.manual_seed(0)
    model = bench.build_model(bench.SMOKE, "cpu", torch.float32, "eager")
    rows = bench.pack_encoded(bench.make_samples(512, 256, scale=0.25, n_long=6), 256, seed=0)
    batch = bench.hf_flattened(bench.split_row(rows[0]))
    assert batch["input_ids"].shape[1] % 128 == 0 and batch["input_ids"].shape[1] >= len(rows[0]["input_ids"])
    assert set(batch) == {"input_ids", "labels", "position_ids"}
    no_autocast = lambda: torch.autocast("cpu", enabled=False)  # noqa: E731
    reference = bench.make_reference(model, rows[0], "cpu", no_autocast, "eager")
    check = bench.check_variant(model, bench.packed_full_step, batch, reference, "cpu", no_autocast)
    assert check["loss_abs_diff"] < 1e-5 and check["grad_cosine"] > 0.99999


def test_liger_patches_are_undone(monkeypatch):
    """apply_liger puts back what liger-kernel's apply function patches (module globals, torch's
    cross_entropy, instance attributes), here with a stand-in for liger (it needs Triton)."""
    import contextlib

    import torch.nn.functional as F
    from transformers.models.gemma2 import modeling_gemma2
    bench = load_benchmark("sft_speed")
    model = bench.build_model(bench.SMOKE, "cpu", torch.float32, "eager")
    before_globals = {n: getattr(modeling_gemma2, n) for n in ("apply_rotary_pos_emb", "Gemma2RMSNorm", "Gemma2MLP")}
    before_ce = F.cross_entropy
    before_dicts = {m: dict(m.__dict__) for m in model.get_base_model().modules()}
    calls = {}

    def fake_apply(rope, rms_norm, geglu, cross_entropy, fused_linear_cross_entropy, model):
        calls.update(rope=rope, rms_norm=rms_norm, geglu=geglu, cross_entropy=cross_entropy,
                     fused_linear_cross_entropy=fused_linear_cross_entropy)
        modeling_gemma2.apply_rotary_pos_emb = modeling_gemma2.Gemma2RMSNorm = modeling_gemma2.Gemma2MLP = object()
        F.cross_entropy = lambda *a, **k: None
        for layer in model.model.layers:
            layer.mlp.forward = lambda x: x
            layer.input_layernorm.offset = 1.0
            layer.input_layernorm.forward = lambda x: x

    fake = types.ModuleType("liger_kernel.transformers")
    fake.apply_liger_kernel_to_gemma2 = fake_apply
    monkeypatch.setitem(sys.modules, "liger_kernel", types.ModuleType("liger_kernel"))
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers", fake)
    with contextlib.ExitStack() as undo:
        bench.apply_liger(model, undo)
        assert F.cross_entropy is not before_ce
    assert calls == {"rope": True, "rms_norm": True, "geglu": True, "cross_entropy": True,
                     "fused_linear_cross_entropy": False}  # liger's FLCE would drop the lm_head's LoRA
    assert {n: getattr(modeling_gemma2, n) for n in before_globals} == before_globals
    assert F.cross_entropy is before_ce
    assert all(set(m.__dict__) == set(d) for m, d in before_dicts.items())


def test_kernel_profile_counts_each_kernel_once():
    """The profiler lists a kernel's time three times over: on the kernel itself, as the "self device time"
    of the CPU op that launched it, and (Triton) on inductor's annotation of the same name. The busy time
    and the table count the kernels only, as torch's own table does."""
    from types import SimpleNamespace

    from torch.autograd import DeviceType
    kernel_profile = load_benchmark("kernel_profile")

    def event(key, us, device, annotation=False):
        return SimpleNamespace(key=key, count=1, self_device_time_total=us, device_type=device,
                               is_user_annotation=annotation)
    averages = [event("aten::mm", 400, DeviceType.CPU), event("nvjet_sm90_tst_256x128", 400, DeviceType.CUDA),
                event("triton_poi_fused_gelu", 100, DeviceType.CPU, annotation=True),
                event("triton_poi_fused_gelu", 100, DeviceType.CUDA), event("cudaGraphLaunch", 0, DeviceType.CPU)]
    kernels = kernel_profile.Kernels(kernel_profile.device_events(averages))
    assert kernels.busy_us == 500
    assert [row["name"] for row in kernels.top(10)] == ["nvjet_sm90_tst_256x128", "triton_poi_fused_gelu"]
    assert kernels.by_kind() == {"matmul": 400, "compiled (inductor)": 100}


@pytest.mark.slow
def test_sft_speed_fp8_variant_and_loss_curve_smoke(tmp_path, capsys):
    """The float8 variant and `--fp8_curve` on the CPU (torch's float8 kernels, aot_eager graphs): the variant
    times, reports its gap to the exact reference (small, not zero), and the curves of bf16 and both recipes
    start from the same weights and stay within a few per cent, as does the curve without any lever."""
    pytest.importorskip("torchao")
    bench = load_benchmark("sft_speed")
    out = tmp_path / "results.json"
    assert bench.main(["--smoke", "--variants", "compiled_fused_selective_closs_fp8", "--compile_backend",
                       "aot_eager", "--fp8_curve", "3", "--uncompiled_curve", "--out", str(out)]) == 0
    results = json.loads(out.read_text())
    r = results["variants"]["compiled_fused_selective_closs_fp8"]
    assert r["tokens_per_s"] > 0 and "float8 base weights (rowwise scales, torchao, per call; not exact)" in r["note"]
    assert 0 < r["check"]["loss_abs_diff"] < 0.05 * r["check"]["loss"] and r["check"]["grad_cosine_lora"] > 0.95
    curve = results["fp8_curve"]
    assert set(curve["losses"]) == {"bf16_uncompiled", "bf16", "rowwise", "tensorwise"} and curve["steps"] == 3
    assert all(len(c) == 3 for c in curve["losses"].values())
    assert all(0 < gap < 0.05 for gap in curve["largest_relative_gap"].values()), curve
    assert "fp8 curve: rowwise against bf16 over 3 steps" in capsys.readouterr().out


def test_sft_speed_fp8_names():
    """The float8 variants and curves of the fourteenth session are known; an unknown curve is one line."""
    bench = load_benchmark("sft_speed")
    for name in ("compiled_fused_selective_closs_fp8_tensorwise_percall_hashdrop",
                 "compiled_fused_selective_closs_fp8_tensorwise_precisegi"):
        assert bench.known_variant(name)
    assert bench.spec_of("compiled_fused_selective_closs_fp8_tensorwise_percall")["fp8_once"] is False
    assert bench.spec_of("compiled_fused_selective_closs_fp8_tensorwise")["fp8_fast"] is True  # zhtune sft's default
    with pytest.raises(SystemExit, match="--fp8_curve_recipes: unknown nope; known: rowwise, tensorwise"):
        bench.main(["--smoke", "--variants", "", "--fp8_curve", "2", "--fp8_curve_recipes", "tensorwise,nope"])


def test_flex_attention_configs_rows_match_the_training_benchmark():
    """benchmarks/flex_attention_configs.py times attention on sft_speed's packed rows: each position's
    document index runs through the row's samples in order, and padding is its own document."""
    flex = load_benchmark("flex_attention_configs")
    sft = load_benchmark("sft_speed")
    ids = flex.doc_ids_of_rows(2, 1024, smoke=True)
    pool = sft.make_samples(1000, 1024, seed=0, scale=0.25, n_long=6)
    rows = sft.pack_encoded(pool, 1024, seed=0)[:2]
    assert len(ids) == 2
    for row_ids, row in zip(ids, rows):
        lengths = [len(d["input_ids"]) for d in sft.split_row(row)]
        assert row_ids.shape == (1024,)
        real = row_ids[row_ids < 10**6]
        assert torch.bincount(real.long()).tolist() == lengths
        assert bool((real[1:] >= real[:-1]).all()) and (row_ids >= 10**6).sum() == 1024 - sum(lengths)


def test_lora_rounding_probe_smoke(tmp_path):
    """benchmarks/lora_rounding_probe.py on the embedded model, two short steps: three runs from the same weights
    (the first step's losses agree: no update has happened yet) and their gaps to fp32."""
    probe = load_benchmark("lora_rounding_probe")
    out = tmp_path / "probe.json"
    assert probe.main(["--steps", "2", "--length", "8", "--out", str(out)]) == 0  # bf16 on an AVX2 CPU: a plain loop
    result = json.loads(out.read_text())
    assert set(result["losses"]) == {"fp32", "bf16_peft", "bf16_folded"}
    first = [losses[0] for losses in result["losses"].values()]
    assert max(first) - min(first) < 0.01 * min(first), result["losses"]
    assert set(result["gap_to_fp32"]) == {"bf16_peft", "bf16_folded"}
    assert all(len(g) == 2 for g in result["gap_to_fp32"].values())


def test_fp8_loss_probe_smoke(tmp_path):
    """benchmarks/fp8_loss_probe.py on the embedded model, two short steps of new rows from an alpaca-style file,
    the reference and the default float8 (delayed scales: the first step dynamic, the second from the first's
    amax), in float32 (on a CPU without AVX-512 bf16 every bf16 matmul of the 262k-wide lm_head runs a plain
    loop: 8.6 min for this test in bf16 on such a machine). Float8 moves the loss from the reference's at each
    step (a few repeated sentences: by up to ~12%, not the real measurement's size)."""
    probe = load_benchmark("fp8_loss_probe")
    data = tmp_path / "rows.json"
    rows = [{"instruction": "介绍一下长城。", "input": "", "output": "长城是中国古代的军事防御工程。"},
            {"instruction": "什么是光合作用？", "input": "", "output": "植物利用阳光把二氧化碳和水变成糖和氧气。"}]
    data.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    out = tmp_path / "probe.json"
    assert probe.main(["--data", str(data), "--steps", "2", "--length", "16", "--runs", "fp8_delayed",
                       "--dtype", "float32", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert set(result["losses"]) == {"bf16", "fp8_delayed"} and result["steps"] == 2 and result["dtype"] == "float32"
    assert set(result["relative_gap_to_bf16"]) == {"fp8_delayed"}
    for gap in result["relative_gap_to_bf16"]["fp8_delayed"]:
        assert 0 < abs(gap) < 0.5, gap
    with pytest.raises(SystemExit, match="unknown fp8_bogus"):
        probe.main(["--runs", "fp8_bogus"])
