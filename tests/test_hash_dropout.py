"""Hashed LoRA dropout (zhtune/train/hash_dropout.py): dropout's rate and scale, masks that do not correlate
between neighbours, rows or calls, the same mask eagerly and compiled, the same mask again when a compiled
checkpoint recomputes it, and the swap of PEFT's modules through FastPath. A model's selective recomputation
with hashed masks: tests/test_recompute.py."""

import torch
from test_fused_lora import lora_model
from torch.utils.checkpoint import checkpoint

from zhtune.train.fast_path import FastPath
from zhtune.train.hash_dropout import HashDropout, draw_seeds, hash_dropout, keep_mask


def _corr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a.flatten().float(), b.flatten().float()]))[0, 1])


def test_rate_scale_and_no_correlation():
    torch.manual_seed(0)
    shape, p = (256, 4096), 0.05
    n = shape[0] * shape[1]
    bound = 5 / n ** 0.5  # five standard deviations of a correlation (and of a rate, below) over n elements
    first = ~keep_mask(shape, draw_seeds("cpu"), p)
    second = ~keep_mask(shape, draw_seeds("cpu"), p)
    for dropped in (first, second):
        assert abs(dropped.float().mean().item() - p) < 5 * (p * (1 - p) / n) ** 0.5
    assert abs(_corr(first[:, 1:], first[:, :-1])) < bound  # neighbours in a row
    assert abs(_corr(first[1:], first[:-1])) < bound  # the same column, next row
    assert abs(_corr(first, second)) < bound  # two calls
    assert not torch.equal(first, second)
    x = torch.randn(shape)
    y = hash_dropout(x, p)
    kept = y != 0
    torch.testing.assert_close(y[kept], x[kept] / (1 - p))
    assert abs((~kept).float().mean().item() - p) < 5 * (p * (1 - p) / n) ** 0.5


def test_off_when_not_training_and_at_the_ends():
    x = torch.randn(64, 64)
    assert hash_dropout(x, 0.3, training=False) is x
    assert hash_dropout(x, 0.0) is x
    assert torch.equal(hash_dropout(x, 1.0), torch.zeros_like(x))


def test_same_mask_eagerly_and_compiled():
    seeds = torch.tensor([12345, -987654], dtype=torch.int32)
    eager = keep_mask((37, 301), seeds, 0.1)
    compiled = torch.compile(keep_mask, backend="inductor")((37, 301), seeds, 0.1)
    assert torch.equal(eager, compiled)


def _dropout_times(x, w):
    return hash_dropout(x, 0.25) * w


def test_a_compiled_checkpoint_recomputes_the_same_mask():
    """Under torch.compile the checkpointed region runs again in the backward: its seeds must be the forward's,
    or the gradient would belong to another mask."""
    torch.manual_seed(0)
    x = (torch.rand(48, 80) + 0.5).requires_grad_(True)  # no zeros: a zero output means a dropped element
    w = torch.rand(48, 80) + 0.5
    fn = torch.compile(lambda x, w: checkpoint(_dropout_times, x, w, use_reentrant=False), backend="inductor")
    y = fn(x, w)
    y.sum().backward()
    kept = (y != 0).float()
    assert 0.6 < kept.mean().item() < 0.9
    torch.testing.assert_close(x.grad, w * kept / 0.75)


class _Args:
    fast_path, packing, deepspeed = True, True, None


def test_fast_path_swaps_the_dropouts_where_compiled_and_puts_them_back(monkeypatch):
    model = lora_model(dropout=0.05, layers=2)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    fast = FastPath(compile=False, hash_dropout=True, fused_lora=True)
    fast.decide(model.get_base_model().config, "cpu", _Args())
    assert "hashed LoRA dropout masks" in fast.prepare_model(model)
    drops = [m for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    assert drops and all(type(d) is HashDropout and d.p == 0.05 for d in drops)
    assert model.state_dict().keys() == state.keys()
    fast.restore_model(model)
    assert all(type(m) is not HashDropout for m in model.modules())
    # off by default where the layers do not compile (eager code would build the index tensor), and by request
    plain = FastPath(compile=False)
    plain.decide(model.get_base_model().config, "cpu", _Args())
    assert "hashed LoRA dropout masks" not in plain.prepare_model(model)
    monkeypatch.setenv("ZHTUNE_HASH_DROPOUT", "0")
    assert "hashed LoRA dropout masks" not in fast.prepare_model(model)
    fast.restore_model(model)
