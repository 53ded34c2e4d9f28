"""benchmarks/sft_speed.py --smoke: the whole benchmark on a tiny Gemma 2 on the CPU."""

import json

import pytest
from helpers import load_benchmark


@pytest.mark.slow
def test_sft_speed_smoke(tmp_path, capsys):
    bench = load_benchmark("sft_speed")
    out = tmp_path / "results.json"
    assert bench.main(["--smoke", "--out", str(out)]) == 0
    results = json.loads(out.read_text())
    agreement = results["agreement"]
    assert agreement["loss_abs_diff"] <= 1e-4
    assert agreement["grad_cosine"] > 0.9999 and agreement["grad_cosine_lora"] > 0.9999
    variants = results["variants"]
    assert set(variants) == {"baseline", "packed_full", "chunked", "chunked_nocast", "mem_lean", "ckpt_auto"}
    for name, r in variants.items():
        assert r.get("tokens_per_s", 0) > 0, (name, r)
    printed = capsys.readouterr()
    assert "[zhtune] training path: fast (packing + eager with softcap + chunked softcapped loss)" in printed.err
    assert "[bench] summary" in printed.out


def test_flops_per_token_of_gemma2_9b():
    bench = load_benchmark("sft_speed")
    per_token = bench.model_flops(bench.GEMMA2_9B, [1]) / 1  # one token: no attention context to speak of
    assert 36.8e9 < per_token < 37.0e9  # 2 x 2 x (8.31B decoder linear + 0.92B lm_head) parameters
