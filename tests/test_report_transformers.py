"""report on models from transformers (built from tiny configs, nothing downloaded) and on plain models.

The per-layer table always comes; the certified bound where the graph has a rule for every node; otherwise
one line naming the first node without a global Lipschitz rule (found through torch.export).
"""

import json
import math
import warnings

import pytest
import torch
from torch import nn

from robustcompress.bound import lipschitz_bound
from robustcompress.bound.capture import find_stop, logits_of
from robustcompress.models import MLP, SmallCNN
from robustcompress.reporting import format_report, report

transformers = pytest.importorskip("transformers")


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def _true_operator(model, name):
    """The matrix a row describes, built by hand: a module's weight (Wᵀ for transformers' Conv1D, stored
    in × out), or one of GPT-2's packed ``c_attn`` projections ``name.q/k/v`` (row blocks of ``c_attnᵀ``)."""
    try:
        module = model.get_submodule(name)
    except AttributeError:
        parent, view = name.rsplit(".", 1)
        w = model.get_submodule(parent).weight.detach().double().T
        d = w.shape[0] // 3
        return w[{"q": 0, "k": 1, "v": 2}[view] * d:][:d]
    w = module.weight.detach().double()
    return w.T if type(module).__name__ == "Conv1D" else w


def _check_table(model, rows):
    """Every layer row matches float64 svdvals of its weight; the network row is one uncertified line."""
    layers, net = rows[:-1], rows[-1]
    assert layers, "the per-layer table is empty"
    for r in layers:
        w = _true_operator(model, r["name"])
        s = torch.linalg.svdvals(w.flatten(1))
        assert r["frobenius"] == pytest.approx(float(s.norm()), rel=1e-6), r["name"]
        if r["sigma_bound"] is not None and w.dim() == 2:
            assert float(s[0]) <= r["sigma_bound"] <= float(s[0]) * (1 + 1e-5), r["name"]
    assert net["certified"] is False and net["K2"] is None and net["Kinf"] is None
    assert "\n" not in net["note"] and net["note"].startswith("Not certified")
    json.dumps(rows, allow_nan=False)
    text = format_report(rows)
    assert net["note"] in text and "K_2 =" not in text
    return net


def test_gpt2_tokens_stop_at_the_embedding():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=50, n_positions=16)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    ids = torch.randint(0, 50, (2, 8))
    rows = _quiet(report, model, example_input={"input_ids": ids}, k=2)
    net = _check_table(model, rows)
    names = [r["name"] for r in rows[:-1]]
    # Every Conv1D projection has a row (packed c_attn as q/k/v); lm_head is tied to the token embedding, left out.
    assert {"transformer.h.1.attn.c_attn.v", "transformer.h.1.mlp.c_proj"} <= set(names) and "lm_head" not in names
    assert net["stopped_at"] == "transformer.wte" and "Embedding" in net["note"] and "integer tokens" in net["note"]
    # The same on a bare tensor of token ids.
    assert _quiet(report, model, example_input=ids, k=2)[-1]["stopped_at"] == "transformer.wte"


def test_bert_tokens_stop_at_the_word_embedding():
    torch.manual_seed(0)
    cfg = transformers.BertConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, intermediate_size=64,
                                  vocab_size=50, max_position_embeddings=16, num_labels=3)
    model = transformers.BertForSequenceClassification(cfg).eval()
    ids = torch.randint(0, 50, (2, 8))
    rows = _quiet(report, model, example_input={"input_ids": ids, "attention_mask": torch.ones_like(ids)}, k=2)
    net = _check_table(model, rows)
    names = [r["name"] for r in rows[:-1]]
    assert "bert.encoder.layer.0.attention.self.query" in names and "classifier" in names
    assert net["stopped_at"] == "bert.embeddings.word_embeddings"
    # Linear layers applied per token: their input shapes are recorded (sequence × features).
    q = next(r for r in rows if r["name"] == "bert.encoder.layer.0.attention.self.query")
    assert q["input_shape"] == [8, 32]


def test_vit_pixels_stop_at_the_first_layernorm():
    torch.manual_seed(0)
    cfg = transformers.ViTConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, intermediate_size=64,
                                 image_size=8, patch_size=4, num_channels=3, num_labels=3)
    model = transformers.ViTForImageClassification(cfg).eval()
    x = torch.rand(2, 3, 8, 8)
    rows = _quiet(report, model, example_input={"pixel_values": x}, k=2)
    net = _check_table(model, rows)
    stop_module = model.get_submodule(net["stopped_at"])
    assert isinstance(stop_module, nn.LayerNorm) and net["stopped_at"].endswith("layernorm_before")
    assert "layer_norm" in net["note"]
    # The patch embedding (a convolution before the stop) gets its certified bound at its input size.
    patch = next(r for r in rows if r["type"] == "Conv2d")
    assert patch["input_shape"] == [3, 8, 8] and patch["sigma_bound"] > 0
    # A plain tensor input (fx cannot trace ViT, so capture goes through torch.export): same stop.
    assert _quiet(report, model, example_input=x, k=2)[-1]["stopped_at"] == net["stopped_at"]


def test_plain_models_keep_their_certified_bound():
    torch.manual_seed(0)
    mlp = MLP(8, (6,), 3)
    rows = report(mlp, example_input=torch.randn(4, 8), k=2)
    assert rows[-1]["certified"] is True
    assert rows[-1]["K2"] == pytest.approx(lipschitz_bound(mlp, (8,)).K2, rel=1e-12)
    cnn = SmallCNN(in_channels=1, input_size=8, width=4).eval()
    rows = report(cnn, input_shape=(1, 8, 8), k=2)
    assert rows[-1]["certified"] is True
    assert rows[-1]["K2"] == pytest.approx(lipschitz_bound(cnn, (1, 8, 8)).K2, rel=1e-12)


def test_plain_attention_and_layernorm_name_the_node():
    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = nn.Linear(4, 4)
            self.att = nn.MultiheadAttention(4, 1, batch_first=True)

        def forward(self, x):
            h = self.inp(x)
            return self.att(h, h, h)[0]

    rows = report(Attn().eval(), input_shape=(3, 4), k=2)
    assert rows[-1]["stopped_at"] == "att" and "MultiheadAttention" in rows[-1]["note"]
    assert "inp" in [r["name"] for r in rows[:-1]]


def test_capture_failure_names_the_module():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(2, 2)
            self.inner = Inner()

        def forward(self, x):
            return self.inner(self.lin(x))

    class Inner(nn.Module):
        def forward(self, x):
            return x if float(x.sum()) > 0 else -x  # data-dependent: neither fx nor export captures it

    rows = report(Branchy().eval(), input_shape=(2,), k=1)
    assert rows[-1]["stopped_at"] == "inner" and "capture stopped in module 'inner' (Inner)" in rows[-1]["note"]
    assert [r["name"] for r in rows[:-1]] == ["lin"]


def test_logits_are_read_from_model_outputs():
    out = transformers.modeling_outputs.SequenceClassifierOutput(logits=torch.ones(1, 3))
    assert logits_of(out).shape == (1, 3)
    assert logits_of((torch.zeros(2, 4), "cache")).shape == (2, 4)
    with pytest.raises(TypeError, match="Cannot read logits"):
        logits_of("text")
    assert find_stop(nn.Sequential(nn.Linear(2, 2), nn.ReLU()), torch.zeros(1, 2)) is None


def test_report_json_with_an_all_zero_layer_is_valid_json():
    model = MLP(8, (6,), 3)
    with torch.no_grad():
        model[1].weight.zero_()
    rows = report(model, k=2)
    text = json.dumps(rows, allow_nan=False)  # raises on -inf / nan
    net = rows[-1]
    assert net["K2"] == 0.0
    assert net["log_split"]["scale"] is None and net["log_split"]["concentration"] is None
    zero = rows[0]
    assert zero["frobenius"] == 0.0 and zero["sigma_bound"] == 0.0
    assert "Infinity" not in text and "NaN" not in text
    assert "K_2 = 0" in format_report(rows)


def test_a_model_that_does_not_run_on_the_default_input_says_what_to_pass():
    cfg = transformers.BertConfig(num_hidden_layers=1, hidden_size=16, num_attention_heads=2, intermediate_size=32,
                                  vocab_size=20, max_position_embeddings=8, num_labels=2)
    model = transformers.BertForSequenceClassification(cfg).eval()
    with pytest.raises(ValueError, match="pass example_input= as the model takes it"):
        _quiet(report, model, k=1)
    with pytest.raises(TypeError, match="example_input"):
        report(model, example_input="text")
