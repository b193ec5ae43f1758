"""dropout.py: the cheaper dropout masks the training loop uses on CPUs. They must drop with the stated
probability, independently, scale what they keep so the expectation is unchanged, give the right gradients,
and compute the attention SDPA computes for the same mask (a speed feature: bench/README.md)."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

import tunesmith.dropout as fd

from conftest import tiny_config


def test_masks_drop_with_the_probability_asked_and_independently():
    torch.manual_seed(0)
    keep = fd.keep_mask((1000, 4000), 0.1)
    assert keep.dtype == torch.bool and keep.shape == (1000, 4000)
    dropped = ~keep.flatten()
    assert abs(dropped.float().mean().item() - 0.1) < 1e-3  # 4M draws: standard error 1.5e-4
    # elements that share one 64-bit draw (0-1, 0-3) and neighbours of different draws (3-4) are independent
    pairs = dropped[: 4_000_000 // 8 * 8].view(-1, 8)
    for a, b in [(0, 1), (0, 3), (3, 4), (1, 2)]:
        both = (pairs[:, a] & pairs[:, b]).float().mean().item()
        assert abs(both - 0.01) < 1e-3, (a, b, both)  # 500k pairs: standard error 1.4e-4
    torch.manual_seed(0)
    assert torch.equal(fd.keep_mask((1000, 4000), 0.1), keep)  # the seed fixes the masks
    assert not torch.equal(fd.keep_mask((1000, 4000), 0.1), keep)  # and each call draws anew
    assert fd.keep_mask((7, 3), 0.5).shape == (7, 3)  # sizes that are not a multiple of four


def test_dropout_keeps_the_expectation_and_its_gradient_is_the_mask():
    torch.manual_seed(1)
    x = torch.randn(200, 300, dtype=torch.float64).abs().add_(0.1).requires_grad_()
    y = fd.fast_dropout(x, 0.125)  # 8192 / 65536: p' = p
    kept = y != 0
    assert abs(kept.double().mean().item() - 0.875) < 5e-3
    torch.testing.assert_close(y[kept], x[kept] / 0.875)
    upstream = torch.randn_like(x)
    (grad,) = torch.autograd.grad(y, x, upstream)
    torch.testing.assert_close(grad, torch.where(kept, upstream / 0.875, 0))
    ones = torch.ones(2_000_000)
    assert abs(fd.fast_dropout(ones, 0.1).mean().item() - 1.0) < 2e-3
    assert fd.fast_dropout(x, 0.1, training=False) is x and fd.fast_dropout(x, 0.0) is x
    assert torch.count_nonzero(fd.fast_dropout(x, 1.0)) == 0
    half = torch.randn(64, 32, dtype=torch.bfloat16)
    assert fd.fast_dropout(half, 0.1).dtype == torch.bfloat16


def _attention_inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(3, 4, 6, 8, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    mask = torch.ones(3, 1, 6, 6, dtype=torch.bool)
    mask[1, :, :, 4:] = False  # the second row's last two tokens are padding
    return q, k, v, mask


def test_attention_with_dropout_is_sdpas_math_with_the_same_mask(monkeypatch):
    """The training path (attention dropout on) against torch's own math SDPA given the same dropout mask:
    outputs and the gradients of query, key and value."""
    q, k, v, mask = _attention_inputs()
    drop = torch.rand(3, 4, 6, 6, generator=torch.Generator().manual_seed(5)) < 0.125
    monkeypatch.setattr(fd, "keep_mask", lambda shape, p, device="cpu": ~drop)
    module = torch.nn.Module().train()
    module.is_causal = False  # as in BERT's self-attention
    ours, _ = fd._attention(module, q, k, v, mask, dropout=0.125, scaling=0.3)
    additive = torch.zeros(mask.shape, dtype=q.dtype).masked_fill(~mask, float("-inf"))  # what SDPA passes it
    reference = torch.ops.aten._scaled_dot_product_attention_math(q, k, v, additive, 0.125, False,
                                                                   drop.logical_not(), scale=0.3)[0]
    torch.testing.assert_close(ours, reference.transpose(1, 2))
    upstream = torch.randn_like(ours)
    ours_grads = torch.autograd.grad(ours, (q, k, v), upstream)
    reference_grads = torch.autograd.grad(reference.transpose(1, 2), (q, k, v), upstream)
    for a, b in zip(ours_grads, reference_grads):
        torch.testing.assert_close(a, b)
    # evaluation (Hugging Face passes dropout 0 there) is SDPA itself; training without attention dropout
    # (train.dropout 0) keeps the math path, which trained faster than SDPA's CPU kernel: the same to rounding
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3)
    plain, _ = fd._attention(module.train(False), q, k, v, mask, dropout=0.0, scaling=0.3)
    torch.testing.assert_close(plain, expected.transpose(1, 2), rtol=0, atol=0)
    trained, _ = fd._attention(module.train(True), q, k, v, mask, dropout=0.0, scaling=0.3)
    no_drop = torch.ops.aten._scaled_dot_product_attention_math(q, k, v, additive, 0.0, False, scale=0.3)[0]
    torch.testing.assert_close(trained, no_drop.transpose(1, 2))
    torch.testing.assert_close(trained, expected.transpose(1, 2))


def test_attention_under_bf16_autocast_is_as_accurate_as_sdpa(monkeypatch):
    """Training in bf16 runs under autocast, which would put the scores' matmul in bf16: SDPA computes them in
    float32 there, and so must this (bf16 scores made the attention output 7x less accurate)."""
    g = torch.Generator().manual_seed(0)
    q, k = ((torch.randn(4, 4, 40, 32, generator=g) * 2).bfloat16() for _ in range(2))
    v = torch.randn(4, 4, 40, 32, generator=g).bfloat16()
    mask = torch.ones(4, 1, 40, 40, dtype=torch.bool)
    mask[1, :, :, 30:] = False
    monkeypatch.setattr(fd, "keep_mask", lambda shape, p, device="cpu": torch.ones(shape, dtype=torch.bool))
    module = torch.nn.Module().train()
    module.is_causal = False
    scores = (q.double() @ k.double().transpose(-1, -2) * 32 ** -0.5).masked_fill(~mask, float("-inf"))
    exact = (scores.softmax(-1) @ v.double()).transpose(1, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours, _ = fd._attention(module, q, k, v, mask, dropout=0.125, scaling=32 ** -0.5)
        sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=32 ** -0.5)
    assert ours.dtype == torch.bfloat16
    sdpa_error = (sdpa.double().transpose(1, 2) - exact).abs().max()
    assert (ours.double() * 0.875 - exact).abs().max() <= 1.5 * sdpa_error


def test_a_model_with_fast_dropout_is_unchanged_in_evaluation_and_drops_in_training():
    config = BertConfig(vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=48, max_position_embeddings=40, num_labels=3)
    torch.manual_seed(0)
    model = BertForSequenceClassification(config).eval()
    ids = torch.randint(5, 60, (4, 9))
    before = model(input_ids=ids).logits
    # embeddings, three per block (attention probabilities, attention output, feed-forward), the head
    assert fd.use_fast_dropout(model) == 1 + 3 * 2 + 1
    assert model.config._attn_implementation == fd.FAST_DROPOUT_ATTENTION
    torch.testing.assert_close(model(input_ids=ids).logits, before, rtol=0, atol=0)
    model.train()
    torch.manual_seed(3)
    first = model(input_ids=ids).logits
    torch.manual_seed(3)
    torch.testing.assert_close(model(input_ids=ids).logits, first, rtol=0, atol=0)  # seeded
    assert not torch.allclose(model(input_ids=ids).logits, first)  # and random
    assert "tunesmith" not in model.config.to_json_string()  # the name stays in memory


def test_training_on_a_cpu_draws_its_dropout_masks_the_cheap_way(tiny_model_dir, sentiment_csv, tmp_path,
                                                                 monkeypatch):
    """Guard for a speed feature: no dropout of the model goes through torch's Bernoulli masks in training
    (hidden states and attention probabilities alike), and the saved model is plain Hugging Face."""
    import tunesmith

    calls = {"fast": 0, "torch": 0}
    fast_mask, torch_dropout = fd.keep_mask, torch.nn.functional.dropout

    def counted_mask(*args, **kwargs):
        calls["fast"] += 1
        return fast_mask(*args, **kwargs)

    def counted_dropout(x, p=0.5, training=True, inplace=False):
        calls["torch"] += bool(training and p > 0)
        return torch_dropout(x, p, training, inplace)

    monkeypatch.setattr(fd, "keep_mask", counted_mask)
    monkeypatch.setattr(torch.nn.functional, "dropout", counted_dropout)
    # the model's own dropout: dropout auto turns it off for this one pass
    result = tunesmith.train(tiny_config(tiny_model_dir, *sentiment_csv, tmp_path / "run", epochs=1, dropout="model"))
    steps = json.loads((result.run_dir / "metrics.json").read_text())["train"]["steps"]
    # per step: embeddings + 2 per block + head, and the first block's attention probabilities
    assert calls["fast"] >= 5 * steps and calls["torch"] == 0
    assert "tunesmith" not in (result.run_dir / "model" / "config.json").read_text()
    # train.fast_dropout: false keeps torch's
    calls.update(fast=0, torch=0)
    tunesmith.train(tiny_config(tiny_model_dir, *sentiment_csv, tmp_path / "torch", epochs=1, fast_dropout=False,
                                dropout="model"))
    assert calls["fast"] == 0 and calls["torch"] >= 4 * steps


def test_fast_dropout_auto_means_on_cpus():
    from tunesmith.config import load_config

    base = {"data": {"train": "x.csv"}}
    assert load_config(base).uses_fast_dropout("cpu") is True
    assert load_config(base).uses_fast_dropout("cuda") is False
    for value in (True, False):
        cfg = load_config({**base, "train": {"fast_dropout": value}})
        assert cfg.uses_fast_dropout("cpu") is cfg.uses_fast_dropout("cuda") is value


@pytest.mark.parametrize("p", [0.1, 0.3])
def test_the_dropped_share_is_p_rounded_to_a_65536th(p):
    torch.manual_seed(2)
    share = 1 - fd.keep_mask((2_000_000,), p).float().mean().item()
    assert abs(share - round(p * 65536) / 65536) < 1.5e-3
