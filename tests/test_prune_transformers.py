"""prune on transformers: attention heads and MLP neurons of BERT, ViT and nn.TransformerEncoder.

References are built here, independently of prune: the dense model with the
removed heads' Q/K/V rows and O columns (and the removed neurons' rows and
next-layer columns) zeroed by hand, and head scores from the weights.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

pytest.importorskip("torch_pruning")
transformers = pytest.importorskip("transformers")

from robustcompress.compress import prune, remove_masks  # noqa: E402

torch.set_num_threads(1)


def _bert():
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=48, max_position_embeddings=16, num_labels=3)
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(cfg).eval(), torch.randint(0, 50, (3, 8))


def _vit():
    cfg = transformers.ViTConfig(image_size=8, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2,
                                 num_attention_heads=4, intermediate_size=48, num_labels=3)
    torch.manual_seed(0)
    return transformers.ViTForImageClassification(cfg).eval(), torch.randn(3, 3, 8, 8)


def _blocks(model):
    """Per encoder layer: (attention block, [Q, K, V, O], (MLP up, MLP down))."""
    out = []
    for name, m in model.named_modules():
        if type(m).__name__ == "BertLayer":
            a = m.attention
            out.append((a.self, [a.self.query, a.self.key, a.self.value, a.output.dense],
                        (m.intermediate.dense, m.output.dense)))
        elif type(m).__name__ == "ViTLayer":
            a = m.attention
            out.append((a, [a.q_proj, a.k_proj, a.v_proj, a.o_proj], (m.mlp.fc1, m.mlp.fc2)))
    assert out
    return out


def _logits(model, x):
    with torch.no_grad():
        return model(x).logits


def _removed_rows(linear):
    return sorted(int(i) for i in (linear.weight == 0).all(1).nonzero())


def _expected_heads(qkvo, heads, dh, n_remove):
    """The lowest-l2 heads: Σ of ‖row‖₂ over the head's Q/K/V rows plus ‖column‖₂ over its O columns."""
    q, k, v, o = (lin.weight.detach().double() for lin in qkvo)
    per_unit = q.norm(dim=1) + k.norm(dim=1) + v.norm(dim=1) + o.norm(dim=0)
    scores = per_unit.view(heads, dh).sum(1)
    return sorted(int(i) for i in torch.sort(scores, stable=True).indices[:n_remove])


@pytest.mark.parametrize("build", [_bert, _vit], ids=["bert", "vit"])
def test_heads_and_neurons_mask_and_physical(build):
    model, x = build()
    heads, dh = 4, 8
    dense = _logits(model, x)
    with pytest.warns(UserWarning, match=r"full width .*LayerNorm") as record:
        masked = prune(model, 0.5, example_inputs=x, mask_only=True)
    kept = str(record[0].message)
    for _, qkvo, (_, down) in _blocks(model):  # the residual stream's writers are listed, not pruned
        names = {m: n for n, m in model.named_modules()}
        assert repr(names[qkvo[3]]) in kept and repr(names[down]) in kept

    # Reference: the dense model with the same heads and neurons zeroed by hand.
    reference = copy.deepcopy(model)
    for (_, qkvo, (up, down)), (_, m_qkvo, (m_up, _)), (_, d_qkvo, _) in zip(
            _blocks(reference), _blocks(masked), _blocks(model)):
        rows = _removed_rows(m_qkvo[0])
        removed = sorted({r // dh for r in rows})
        assert rows == [h * dh + j for h in removed for j in range(dh)]  # whole heads
        assert removed == _expected_heads(d_qkvo, heads, dh, 2)
        for lin in m_qkvo[1:3]:
            assert _removed_rows(lin) == rows
        assert sorted(int(i) for i in (m_qkvo[3].weight == 0).all(0).nonzero()) == rows
        neurons = _removed_rows(m_up)
        assert len(neurons) == 24
        with torch.no_grad():
            for lin in qkvo[:3]:
                lin.weight[rows] = 0
                lin.bias[rows] = 0
            qkvo[3].weight[:, rows] = 0
            up.weight[neurons] = 0
            up.bias[neurons] = 0
            down.weight[:, neurons] = 0
    if hasattr(model, "bert"):  # BERT's pooler is an MLP neuron layer too (its outputs feed the classifier)
        pooled = _removed_rows(masked.bert.pooler.dense)
        assert len(pooled) == 16
        with torch.no_grad():
            reference.bert.pooler.dense.weight[pooled] = 0
            reference.bert.pooler.dense.bias[pooled] = 0
            reference.classifier.weight[:, pooled] = 0
    torch.testing.assert_close(_logits(masked, x), _logits(reference, x), rtol=0, atol=1e-6)
    assert not torch.allclose(_logits(masked, x), dense, atol=1e-4)  # something was removed

    with pytest.warns(UserWarning, match="full width"):
        physical = prune(model, 0.5, example_inputs=x)
    torch.testing.assert_close(_logits(physical, x), _logits(masked, x), rtol=1e-5, atol=1e-5)
    for block, qkvo, (up, down) in _blocks(physical):
        assert [lin.out_features for lin in qkvo[:3]] == [2 * dh] * 3 and qkvo[3].in_features == 2 * dh
        assert up.out_features == 24 and down.in_features == 24
        assert getattr(block, "num_attention_heads") == 2
        if hasattr(block, "all_head_size"):
            assert block.all_head_size == 2 * dh
    n_dense = sum(p.numel() for p in model.parameters())
    n_small = sum(p.numel() for p in physical.parameters())
    assert n_small < 0.7 * n_dense
    assert model.config.num_attention_heads == 4  # the input model is untouched (inplace=False)


def test_heads_only_by_name_and_residual_refused():
    model, x = _bert()
    attn = "bert.encoder.layer.0.attention"
    pruned = prune(model, {attn: 0.25}, example_inputs=x)
    blocks = _blocks(pruned)
    assert blocks[0][1][0].out_features == 24 and blocks[1][1][0].out_features == 32
    assert blocks[0][2][0].out_features == 48
    with pytest.raises(ValueError, match="LayerNorm"):
        prune(model, 0.5, example_inputs=x, layers=["bert.encoder.layer.0.output.dense"])


def _encoder(batch_first):
    torch.manual_seed(1)
    layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=batch_first)
    return nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval(), torch.randn(3, 5, 16)


def _zeroed_encoder(enc, heads_of, neurons_of, dh=4):
    ref = copy.deepcopy(enc)
    with torch.no_grad():
        for layer, heads, neurons in zip(ref.layers, heads_of, neurons_of):
            rows = [h * dh + j for h in heads for j in range(dh)]
            mha, e = layer.self_attn, layer.self_attn.embed_dim
            for i in range(3):
                mha.in_proj_weight[[r + i * e for r in rows]] = 0
                mha.in_proj_bias[[r + i * e for r in rows]] = 0
            mha.out_proj.weight[:, rows] = 0
            layer.linear1.weight[neurons] = 0
            layer.linear1.bias[neurons] = 0
            layer.linear2.weight[:, neurons] = 0
    return ref


@pytest.mark.parametrize("batch_first", [True, False])
def test_transformer_encoder(batch_first):
    enc, x = _encoder(batch_first)
    masked = prune(enc, 0.5, example_inputs=x, mask_only=True)
    heads_of, neurons_of = [], []
    for layer, dense_layer in zip(masked.layers, enc.layers):
        mha = layer.self_attn
        q_rows = sorted(int(i) for i in (mha.in_proj_weight[:16] == 0).all(1).nonzero())
        heads = sorted({r // 4 for r in q_rows})
        assert len(heads) == 2 and q_rows == [h * 4 + j for h in heads for j in range(4)]
        d = dense_layer.self_attn
        w = d.in_proj_weight.detach().double()
        per_unit = sum(w[i * 16:(i + 1) * 16].norm(dim=1) for i in range(3)) + d.out_proj.weight.double().norm(dim=0)
        assert heads == sorted(int(i) for i in torch.sort(per_unit.view(4, 4).sum(1), stable=True).indices[:2])
        heads_of.append(heads)
        neurons_of.append(_removed_rows(layer.linear1))
        assert len(neurons_of[-1]) == 16
    reference = _zeroed_encoder(enc, heads_of, neurons_of)
    with torch.no_grad():
        torch.testing.assert_close(masked(x), reference(x), rtol=0, atol=1e-6)

    # Masks hold through a training step, also on the fused inference path (no_grad, eval).
    masked.train()
    opt = torch.optim.SGD(masked.parameters(), lr=0.1)
    masked(x).square().sum().backward()
    opt.step()
    masked.eval()
    with torch.no_grad():
        masked(x)
    for layer, heads in zip(masked.layers, heads_of):
        rows = [h * 4 + j for h in heads for j in range(4)]
        assert bool((layer.self_attn.in_proj_weight[rows] == 0).all())
        assert bool((layer.self_attn.out_proj.weight[:, rows] == 0).all())
    remove_masks(masked)

    # Physically: the feed-forward neurons go; the packed heads are refused with a clear reason.
    ff = [f"layers.{i}.linear1" for i in range(2)]
    physical = prune(enc, 0.5, example_inputs=x, layers=ff)
    ff_masked = prune(enc, 0.5, example_inputs=x, layers=ff, mask_only=True)
    assert [layer.linear1.out_features for layer in physical.layers] == [16, 16]
    with torch.no_grad():
        torch.testing.assert_close(physical(x), ff_masked(x), rtol=1e-5, atol=1e-5)
    assert sum(p.numel() for p in physical.parameters()) < sum(p.numel() for p in enc.parameters())
    with pytest.raises(ValueError, match="MultiheadAttention.*mask_only=True"):
        prune(enc, 0.5, example_inputs=x)


def test_unsupported_kinds_are_refused_by_name():
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=30,
                                                                n_positions=8, bos_token_id=0,
                                                                eos_token_id=0))
    with pytest.raises(ValueError, match="Conv1D"):
        prune(gpt2, 0.5, example_inputs=torch.zeros(1, 4, dtype=torch.long))
    lstm = nn.Sequential(nn.LSTM(4, 8, batch_first=True))
    with pytest.raises(ValueError, match="LSTM"):
        prune(lstm, 0.5, example_inputs=torch.zeros(1, 3, 4))


def test_attention_prune_rule_examples_run():
    import doctest
    import importlib

    mod = importlib.import_module("robustcompress.layers.attention")
    result = doctest.testmod(mod, optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 4 and result.failed == 0


def test_set_num_heads_matches_what_a_fresh_block_holds():
    from robustcompress.layers.attention import head_layout, set_num_heads

    def config(heads):
        return transformers.BertConfig(hidden_size=8 * heads, num_attention_heads=heads, num_hidden_layers=1,
                                       intermediate_size=8, vocab_size=10)

    block = transformers.BertForSequenceClassification(config(4)).bert.encoder.layer[0].attention
    fresh = transformers.BertForSequenceClassification(config(3)).bert.encoder.layer[0].attention
    assert head_layout(block).heads == 4 and head_layout(block).head_dim == 8
    set_num_heads(block, 3)
    for attr in ("num_attention_heads", "attention_head_size", "all_head_size"):
        assert getattr(block.self, attr) == getattr(fresh.self, attr)


def test_masked_encoder_counts_and_separate_projections():
    from robustcompress.compress import count_parameters

    enc, x = _encoder(True)
    masked = prune(enc, 0.5, example_inputs=x, mask_only=True)
    # Per layer: 2 of 4 heads (3·8 rows of in_proj_weight + 3·8 biases + 8 out_proj columns of 16) and 16 of 32
    # neurons (16 rows of 16 + 16 biases + 16 columns of linear2).
    per_layer = 3 * 8 * 16 + 3 * 8 + 8 * 16 + 16 * 16 + 16 + 16 * 16
    assert count_parameters(masked) == count_parameters(enc) - 2 * per_layer

    torch.manual_seed(2)
    mha = nn.MultiheadAttention(8, 2, kdim=6, vdim=6, batch_first=True).eval()
    q, kv = torch.randn(2, 3, 8), torch.randn(2, 4, 6)

    class Cross(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = mha

        def forward(self, x):
            return self.attn(x, kv, kv, need_weights=False)[0]

    model = Cross()
    masked = prune(model, 0.5, example_inputs=q, mask_only=True)
    ref = copy.deepcopy(model)
    removed = sorted(int(i) for i in (masked.attn.q_proj_weight == 0).all(1).nonzero())
    assert len(removed) == 4 and removed in ([0, 1, 2, 3], [4, 5, 6, 7])
    with torch.no_grad():
        for w in (ref.attn.q_proj_weight, ref.attn.k_proj_weight, ref.attn.v_proj_weight):
            w[removed] = 0
        ref.attn.out_proj.weight[:, removed] = 0
        # a removed head's value path reaches nothing once O's columns are 0, whatever its biases
        torch.testing.assert_close(masked(q), ref(q), rtol=0, atol=1e-6)


def test_llama_attention_is_refused_instead_of_hanging():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=16)
    model = transformers.LlamaForCausalLM(config).eval()
    with pytest.raises(ValueError, match="LlamaAttention.*did not finish"):
        prune(model, 0.25, example_inputs=torch.randint(0, 50, (1, 8)))
