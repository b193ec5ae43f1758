"""models.first_token_only: the last block of a BERT-style sequence classifier computes the first
token alone. It must give the logits and gradients of the unchanged model, and stay on in training,
evaluate and predict (a speed feature: bench/README.md)."""

from __future__ import annotations

import pytest
import torch
from transformers import (AutoModelForSequenceClassification, BertConfig, BertForSequenceClassification,
                          BertForTokenClassification, ElectraConfig, ElectraForSequenceClassification,
                          MPNetConfig, MPNetForSequenceClassification, RobertaConfig,
                          RobertaForSequenceClassification, XLMRobertaConfig, XLMRobertaForSequenceClassification)

from tunesmith.models import first_token_only

from conftest import tiny_config

SIZES = dict(vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
             max_position_embeddings=40, num_labels=3)
CLASSIFIERS = [(BertConfig, BertForSequenceClassification), (RobertaConfig, RobertaForSequenceClassification),
               (XLMRobertaConfig, XLMRobertaForSequenceClassification),
               (ElectraConfig, ElectraForSequenceClassification)]


def _batch(seed: int = 1) -> dict[str, torch.Tensor]:
    """Four rows of different lengths (3 to 11 real tokens), padded to 11, with labels."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 60, (4, 11), generator=g)
    mask = torch.zeros_like(ids)
    for row, n in enumerate([11, 3, 7, 5]):
        mask[row, :n] = 1
    ids[mask == 0] = 1  # the pad id of these configs
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([0, 2, 1, 2])}


def _logits_and_grads(model, batch):
    model.zero_grad()
    out = model(**batch)
    out.loss.backward()
    return out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
@pytest.mark.parametrize("config_class, model_class", CLASSIFIERS, ids=lambda c: getattr(c, "__name__", c))
def test_first_token_block_gives_the_same_logits_and_gradients(config_class, model_class, attention):
    torch.manual_seed(0)
    model = model_class(config_class(**SIZES, pad_token_id=1, attn_implementation=attention)).eval()
    batch = _batch()
    plain_logits, plain_grads = _logits_and_grads(model, batch)

    assert first_token_only(model)
    widths = []
    model.base_model.encoder.layer[-1].register_forward_hook(lambda m, a, out: widths.append(out.shape[1]))
    logits, grads = _logits_and_grads(model, batch)

    assert widths == [1]  # the last block really computed one position
    torch.testing.assert_close(logits, plain_logits, rtol=0, atol=1e-5)
    assert grads.keys() == plain_grads.keys()  # every parameter still learns, the last block's too
    for name, grad in grads.items():
        torch.testing.assert_close(grad, plain_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_first_token_block_keeps_dropout_in_training_and_runs_under_bf16():
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(**SIZES, pad_token_id=1))
    batch = _batch()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        plain = model.eval()(**batch).logits.float()
        assert first_token_only(model)
        fast = model(**batch).logits.float()
        torch.testing.assert_close(fast, plain, rtol=0, atol=0.05)  # bf16 rounding only
    # Dropout on the attention probabilities only: it follows the attention module's mode, as in
    # Hugging Face's block (a strategy that freezes the module puts it in eval mode).
    attention = model.base_model.encoder.layer[-1].attention.self
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.5 if module is attention.dropout else 0.0
    model.train()
    with torch.no_grad():
        assert not torch.equal(model(**batch).logits, model(**batch).logits)
        attention.eval()
        assert torch.equal(model(**batch).logits, model(**batch).logits)


def test_first_token_block_is_left_alone_where_other_positions_are_read():
    torch.manual_seed(0)
    token_model = BertForTokenClassification(BertConfig(**SIZES, pad_token_id=1))
    mpnet = MPNetForSequenceClassification(MPNetConfig(**SIZES, pad_token_id=1))  # relative attention bias
    decoder = BertForSequenceClassification(BertConfig(**SIZES, pad_token_id=1, is_decoder=True))
    for model in (token_model, mpnet, decoder):
        forward = type(model.base_model.encoder.layer[-1]).forward
        assert not first_token_only(model)
        assert model.base_model.encoder.layer[-1].forward.__func__ is forward


def test_training_and_the_saved_model_use_the_first_token_block(tiny_model_dir, sentiment_csv, tmp_path):
    """Guard for a speed feature: the trained model and the one evaluate/predict load both have it,
    and the saved folder is still a plain Hugging Face model that reloads to the same logits."""
    import tunesmith
    from tunesmith.inference import LoadedRun

    result = tunesmith.train(tiny_config(tiny_model_dir, *sentiment_csv, tmp_path / "run", epochs=1))
    loaded = LoadedRun(result.run_dir)
    assert getattr(loaded.model.base_model.encoder.layer[-1], "first_token_only", False)
    plain = AutoModelForSequenceClassification.from_pretrained(result.run_dir / "model").eval()
    batch = loaded.processor(["a great film", "dull and boring acting , really"], padding=True, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(**batch).logits, plain(**batch).logits, rtol=0, atol=1e-5)
