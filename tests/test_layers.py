"""Low-rank layers: forward equals the dense product, Eckart–Young initialisation, to_low_rank."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from robustcompress.layers import LowRankConv2d, LowRankLinear, best_rank_factors, to_low_rank


@given(m=st.integers(2, 9), n=st.integers(2, 9), r=st.integers(1, 4), seed=st.integers(0, 100))
def test_best_rank_factors_reach_the_eckart_young_error(m, n, r, seed):
    r = min(r, m, n)
    w = torch.randn(m, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    a, b = best_rank_factors(w, r)
    s = torch.linalg.svdvals(w)
    torch.testing.assert_close(torch.linalg.matrix_norm(w - b @ a) ** 2, (s[r:] ** 2).sum(), rtol=1e-9, atol=1e-12)
    assert torch.linalg.matrix_rank(b @ a) <= r


def test_low_rank_linear_forward_is_the_dense_product():
    layer = LowRankLinear(7, 5, rank=2).double()
    x = torch.randn(3, 7, dtype=torch.float64)
    torch.testing.assert_close(layer(x), x @ (layer.weight_b @ layer.weight_a).T + layer.bias)
    torch.testing.assert_close(layer.weight, layer.weight_b @ layer.weight_a)


def test_low_rank_conv_forward_is_the_dense_convolution():
    dense = nn.Conv2d(3, 6, 3, stride=2, padding=1).double()
    layer = LowRankConv2d.from_conv(dense, rank=2)
    x = torch.randn(2, 3, 7, 7, dtype=torch.float64)
    ref = nn.functional.conv2d(x, layer.weight, layer.bias, stride=2, padding=1)
    torch.testing.assert_close(layer(x), ref)
    # rank 2 of a 6×27 matrix view: the product has rank 2
    assert torch.linalg.matrix_rank(layer.weight.reshape(6, -1)) == 2


def test_from_linear_full_rank_reproduces_the_layer():
    dense = nn.Linear(5, 4).double()
    layer = LowRankLinear.from_linear(dense, rank=4)
    x = torch.randn(3, 5, dtype=torch.float64)
    torch.testing.assert_close(layer(x), dense(x))


def test_to_low_rank_keeps_the_head_and_copies():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    out = to_low_rank(model, {"0": 2})
    assert isinstance(out[0], LowRankLinear) and isinstance(out[2], nn.Linear) and isinstance(out[4], nn.Linear)
    assert isinstance(model[0], nn.Linear)  # the original is untouched
    fresh = to_low_rank(model, 3, from_weights=False)
    assert isinstance(fresh[0], LowRankLinear) and fresh[0].rank == 3 and isinstance(fresh[4], nn.Linear)


def test_bad_inputs():
    with pytest.raises(ValueError, match="rank"):
        LowRankLinear(4, 4, rank=0)
    with pytest.raises(ValueError, match="rank <="):
        LowRankLinear.from_linear(nn.Linear(4, 3), rank=4)
    with pytest.raises(ValueError, match="Unknown layer names"):
        to_low_rank(nn.Sequential(nn.Linear(4, 4)), {"x": 2})
    with pytest.raises(ValueError, match="groups"):
        LowRankConv2d.from_conv(nn.Conv2d(4, 4, 3, groups=2), rank=1)


# --------------------------------------------------------------------------- operators of every layer kind
# Each kind's operator is checked against the TRUE operator built independently from the stored
# weights: its materialised matrix, σ₁ by power iteration through matvec/rmatvec against float64
# svdvals, adjointness, the gradient of uᵀ·op·v (top singular pair) against autograd through
# svdvals of the true operator in the weight's own layout, and that views share the weight's storage.

from robustcompress.layers import find_layers, layer_views, to_dense  # noqa: E402
from robustcompress.layers import LoRASpec, ViewOptions  # noqa: E402
from robustcompress.spectral.views import operator_from_spec  # noqa: E402


def _power_sigma(op, iters=400):
    v = torch.randn(op.shape[1], 1, dtype=op.dtype, generator=torch.Generator().manual_seed(0))
    for _ in range(iters):
        v = op.rmatvec(op.matvec(v))
        v = v / v.norm()
    return op.matvec(v).norm()


def _check(spec, true_fn, params, *, power=True):
    """``true_fn()`` builds the true operator (float64) from the stored parameters, independently of ``spec``."""
    op = operator_from_spec(spec)
    with torch.no_grad():
        true = true_fn()
        assert op.shape == tuple(true.shape)
        torch.testing.assert_close(op.matrix(), true, rtol=1e-10, atol=1e-12)
        s = torch.linalg.svdvals(true)
        if power:
            torch.testing.assert_close(_power_sigma(op), s[0], rtol=1e-6, atol=1e-12)
        x = torch.randn(op.shape[1], 2, dtype=torch.float64)
        y = torch.randn(op.shape[0], 2, dtype=torch.float64)
        torch.testing.assert_close((y * op.matvec(x)).sum(), (op.rmatvec(y) * x).sum(), rtol=1e-10, atol=1e-12)
        u_, _, vh = torch.linalg.svd(true)
        u, v = u_[:, :1], vh[:1].T
    got = torch.autograd.grad((u * op.matvec(v)).sum(), params, allow_unused=True)
    want = torch.autograd.grad(torch.linalg.svdvals(true_fn())[0], params, allow_unused=True)
    for p, g, w in zip(params, got, want):
        assert (g is None) == (w is None)
        if g is not None:
            assert g.shape == p.shape  # the gradient lands in the weight's own layout
            torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-9)


def _shares_storage(view_tensor, stored):
    return view_tensor.untyped_storage().data_ptr() == stored.untyped_storage().data_ptr()


def test_linear_and_grouped_conv_matrix_views():
    torch.manual_seed(0)
    lin = nn.Linear(7, 5).double()
    (v,) = layer_views(lin)
    _check(v.spec, lambda: lin.weight, [lin.weight])
    assert v.spec.matrix() is lin.weight or _shares_storage(v.spec.matrix(), lin.weight)
    for conv in (nn.Conv1d(4, 6, 3, groups=2), nn.Conv2d(4, 6, 3, groups=2), nn.Conv3d(2, 3, 2)):
        conv = conv.double()
        (v,) = layer_views(conv)
        g = conv.groups

        def true(conv=conv, g=g):
            w = conv.weight
            return torch.block_diag(*[b.reshape(b.shape[0], -1) for b in w.chunk(g, dim=0)])
        _check(v.spec, true, [conv.weight])
        assert _shares_storage(v.spec.blocks(), conv.weight)


@pytest.mark.parametrize("padding_mode", ["zeros", "circular", "reflect"])
def test_conv_exact_operator_view_is_the_convolution(padding_mode):
    torch.manual_seed(1)
    conv = nn.Conv2d(2, 3, 3, stride=2, padding=1, groups=1, padding_mode=padding_mode).double()
    (v,) = layer_views(conv)
    shape = (2, 5, 5)
    op = operator_from_spec(v.spec, "operator", shape)

    def true():
        eye = torch.eye(50, dtype=torch.float64).reshape(50, *shape)
        return conv._conv_forward(eye, conv.weight, None).reshape(50, -1).T
    assert op.shape == tuple(true().shape)
    torch.testing.assert_close(op.matrix(), true().detach())
    torch.testing.assert_close(op.frobenius(), torch.linalg.matrix_norm(true()).detach())
    y = torch.randn(op.shape[0], 2, dtype=torch.float64)
    torch.testing.assert_close(op.rmatvec(y), true().detach().T @ y)


def test_transformers_conv1d_operator_is_the_transpose():
    pytorch_utils = pytest.importorskip("transformers.pytorch_utils")
    torch.manual_seed(2)
    layer = pytorch_utils.Conv1D(5, 7).double()           # weight stored 7 × 5 (in × out)
    (v,) = layer_views(layer)
    _check(v.spec, lambda: layer.weight.T, [layer.weight])
    x = torch.randn(3, 7, dtype=torch.float64)
    torch.testing.assert_close(layer(x) - layer.bias, (operator_from_spec(v.spec).matvec(x.T)).T)
    assert _shares_storage(v.spec.matrix(), layer.weight)
    square = pytorch_utils.Conv1D(6, 6).double()          # the wrong orientation would have the right shape
    (v,) = layer_views(square)
    _check(v.spec, lambda: square.weight.T, [square.weight])


def test_low_rank_layers_are_one_operator():
    torch.manual_seed(3)
    for layer in (LowRankLinear(6, 5, rank=2).double(), LowRankConv2d(2, 4, 3, rank=2).double()):
        (v,) = layer_views(layer)
        _check(v.spec, lambda layer=layer: layer.weight.reshape(layer.weight.shape[0], -1),
               [layer.weight_a, layer.weight_b])


def test_multihead_attention_projections_and_circuits_packed_and_separate():
    torch.manual_seed(4)
    for mha in (nn.MultiheadAttention(6, 2), nn.MultiheadAttention(6, 3, kdim=4, vdim=5)):
        mha = mha.double()
        e, h = mha.embed_dim, mha.num_heads
        dh = e // h
        if mha._qkv_same_embed_dim:
            ws = dict(zip("qkv", [lambda i=i: mha.in_proj_weight[i * e:(i + 1) * e] for i in range(3)]))
            params = [mha.in_proj_weight, mha.out_proj.weight]
        else:
            ws = {x: (lambda x=x: getattr(mha, f"{x}_proj_weight")) for x in "qkv"}
            params = [mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight, mha.out_proj.weight]
        ws["out_proj"] = lambda: mha.out_proj.weight
        views = {v.name: v for v in layer_views(mha)}
        assert list(views) == ["q", "k", "v", "out_proj"]
        for name, fn in ws.items():
            _check(views[name].spec, fn, params)
        if mha._qkv_same_embed_dim:
            assert all(_shares_storage(views[x].spec.matrix(), mha.in_proj_weight) for x in "qkv")
        circuits = {v.name: v for v in layer_views(mha, ViewOptions(attention="circuits"))}
        assert len(circuits) == 2 * h
        for i in range(h):
            r = slice(i * dh, (i + 1) * dh)
            _check(circuits[f"ov.h{i}"].spec, lambda r=r: ws["out_proj"]()[:, r] @ ws["v"]()[r], params)
            _check(circuits[f"qk.h{i}"].spec, lambda r=r: ws["q"]()[r].T @ ws["k"]()[r], params)


def test_mha_projections_reproduce_the_module_forward():
    torch.manual_seed(5)
    mha = nn.MultiheadAttention(6, 2, bias=False, batch_first=True).double()
    views = {v.name: operator_from_spec(v.spec) for v in layer_views(mha)}
    x = torch.randn(1, 4, 6, dtype=torch.float64)
    q, k, val = (views[n].matvec(x[0].T).T.reshape(4, 2, 3).transpose(0, 1) for n in "qkv")
    att = torch.softmax(q @ k.transpose(1, 2) / 3 ** 0.5, -1) @ val
    out = views["out_proj"].matvec(att.transpose(0, 1).reshape(4, 6).T).T
    torch.testing.assert_close(out, mha(x, x, x, need_weights=False)[0][0])


def test_gpt2_attention_splits_the_packed_conv1d():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(6)
    model = transformers.GPT2Model(transformers.GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=20,
                                                          n_positions=8)).double()
    attn = model.h[0].attn
    views = {v.name: v for v in layer_views(attn)}
    assert list(views) == ["c_attn.q", "c_attn.k", "c_attn.v", "c_proj"]
    w, o = attn.c_attn.weight, attn.c_proj.weight
    for i, x in enumerate("qkv"):
        _check(views[f"c_attn.{x}"].spec, lambda i=i: w.T[i * 8:(i + 1) * 8], [w, o])
        assert _shares_storage(views[f"c_attn.{x}"].spec.matrix(), w)
    _check(views["c_proj"].spec, lambda: o.T, [w, o])
    circuits = {v.name: v for v in layer_views(attn, ViewOptions(attention="circuits"))}
    _check(circuits["ov.h1"].spec, lambda: o.T[:, 4:8] @ w.T[20:24], [w, o])
    _check(circuits["qk.h0"].spec, lambda: w.T[0:4].T @ w.T[8:12], [w, o])
    cat = find_layers(model)
    covered = {id(p) for layer in cat.layers for p in layer.parameters}
    assert all(id(p) in covered for p in model.parameters() if p.dim() >= 2)


@pytest.mark.parametrize("cls,gates", [(nn.LSTM, 4), (nn.GRU, 3), (nn.RNN, 1)])
def test_recurrent_gate_views_are_row_blocks(cls, gates):
    torch.manual_seed(7)
    rnn = cls(3, 4, num_layers=2, bidirectional=True).double()
    views = layer_views(rnn)
    assert len(views) == 2 * 2 * 2 * gates
    for v in views:
        stored = rnn.get_parameter(v.params[0])
        g = {"i": 0, "f": 1, "g": 2, "o": 3, "r": 0, "z": 1, "n": 2}.get(v.name.split(".")[-1], 0) if "." in v.name else 0
        _check(v.spec, lambda s=stored, g=g: s[g * 4:(g + 1) * 4], [stored])
        assert _shares_storage(v.spec.matrix(), stored)


def test_parametrized_weights_are_the_parametrized_operator_with_gradients_through_it():
    torch.manual_seed(8)
    lin = nn.utils.parametrizations.weight_norm(nn.Linear(5, 4).double())
    g, v = lin.parametrizations.weight.original0, lin.parametrizations.weight.original1
    (view,) = layer_views(lin)
    # power=False: every product recomputes the weight through the parametrization (torch._weight_norm, slow
    # on a busy multi-threaded CPU); the products are the Linear's, power-checked above.
    _check(view.spec, lambda: g * v / v.norm(dim=1, keepdim=True), [g, v], power=False)
    sn = nn.utils.parametrizations.spectral_norm(nn.Linear(5, 4).double())
    (view,) = layer_views(sn)
    assert view.params == ("parametrizations.weight.original",)
    sn.eval()
    torch.testing.assert_close(operator_from_spec(view.spec).matrix(), sn.weight)
    old = nn.utils.weight_norm(nn.Linear(5, 4).double())
    (view,) = layer_views(old)
    assert view.params == ("weight_g", "weight_v")
    _check(view.spec, lambda: old.weight_g * old.weight_v / old.weight_v.norm(dim=1, keepdim=True),
           [old.weight_g, old.weight_v], power=False)


def test_embedding_is_metrics_only_and_its_operator_is_the_transpose():
    emb = nn.Embedding(9, 4).double()
    cat = find_layers(nn.Sequential(emb))
    (layer,) = cat.layers
    assert not layer.penalize and "lookup table" in layer.exclusion_reason
    _check(layer.spec, lambda: emb.weight.T, [emb.weight])


def _lora_gpt2(**config):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    torch.manual_seed(9)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=20,
                                                                n_positions=8))
    cfg = peft.LoraConfig(r=2, lora_alpha=3, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True,
                          **config)
    pm = peft.get_peft_model(model, cfg).double()
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.normal_()
    return pm


@pytest.mark.parametrize("rslora", [False, True])
def test_peft_lora_operator_is_the_merged_weight(rslora):
    pm = _lora_gpt2(use_rslora=rslora)
    cat = find_layers(pm)
    sigma = {layer.name.removeprefix("base_model.model."): torch.linalg.svdvals(
        operator_from_spec(layer.spec).matrix().detach())[0] for layer in cat.layers}
    lora = {layer.name: layer for layer in cat.layers if isinstance(layer.spec, LoRASpec)}
    assert len(lora) == 6  # q, k, v (slices of the adapted c_attn), attn.c_proj, mlp.c_fc, mlp.c_proj
    layer = lora["base_model.model.transformer.h.0.attn.c_proj"]
    adapters = [p for n, p in zip(layer.view.params, layer.parameters) if "lora_" in n]
    base = layer.parameters[0]
    assert not base.requires_grad
    got = torch.autograd.grad(operator_from_spec(layer.spec).matvec(torch.ones(8, 1, dtype=torch.float64)).sum(),
                              adapters)
    assert all(g.abs().sum() > 0 for g in got)
    merged = pm.merge_and_unload()
    h = merged.transformer.h[0]
    for name, w in (("transformer.h.0.attn.c_proj", h.attn.c_proj.weight), ("transformer.h.0.mlp.c_fc", h.mlp.c_fc.weight),
                    ("transformer.h.0.attn.c_attn.k", h.attn.c_attn.weight[:, 8:16])):
        torch.testing.assert_close(sigma[name], torch.linalg.svdvals(w.T.detach())[0], rtol=1e-10, atol=1e-12)


def test_peft_lora_gradients_against_svdvals_of_the_merged_weight():
    pm = _lora_gpt2()
    cat = find_layers(pm)
    for name in ("transformer.h.0.attn.c_proj", "transformer.h.0.mlp.c_proj"):
        layer = cat["base_model.model." + name]
        m = pm.get_submodule("base_model.model." + name)
        a, b = m.lora_A["default"].weight, m.lora_B["default"].weight
        w0 = m.base_layer.weight
        _check(layer.spec, lambda: w0.T + m.scaling["default"] * (b @ a), [a, b])


def test_peft_dora_and_several_adapters_are_refused():
    peft = pytest.importorskip("peft")
    pm = _lora_gpt2(use_dora=True)
    with pytest.raises(ValueError, match="DoRA adapter 'default' \\(use_dora=True\\) is not supported"):
        find_layers(pm)
    pm = _lora_gpt2()
    pm.add_adapter("second", peft.LoraConfig(r=2, target_modules=["c_proj"], fan_in_fan_out=True))
    pm.base_model.set_adapter(["default", "second"])
    with pytest.raises(ValueError, match="several active adapters \\['default', 'second'\\]"):
        find_layers(pm)


@given(m=st.integers(1, 6), n=st.integers(1, 6), r0=st.integers(0, 5), rows=st.integers(1, 6),
       transpose=st.booleans(), seed=st.integers(0, 50))
def test_sliced_and_transposed_views_are_strided_views_of_the_stored_weight(m, n, r0, rows, transpose, seed):
    from robustcompress.layers import MatrixSpec
    w = torch.randn(m, n, dtype=torch.float64, generator=torch.Generator().manual_seed(seed), requires_grad=True)
    full = (n, m) if transpose else (m, n)
    r0 = min(r0, full[0] - 1)
    sl = slice(r0, min(full[0], r0 + rows))
    spec = MatrixSpec(lambda: w, transpose=transpose, rows=sl)
    true = (w.T if transpose else w)[sl]
    assert _shares_storage(spec.matrix(), w) and spec.shape == tuple(true.shape)
    op = operator_from_spec(spec)
    x = torch.randn(true.shape[1], 2, dtype=torch.float64)
    y = torch.randn(true.shape[0], 2, dtype=torch.float64)
    torch.testing.assert_close(op.matvec(x), true @ x)
    torch.testing.assert_close(op.rmatvec(y), true.T @ y)
    (g,) = torch.autograd.grad((y * op.matvec(x)).sum(), w)
    (want,) = torch.autograd.grad((y * (true @ x)).sum(), w)
    torch.testing.assert_close(g, want)


def test_to_dense_inverts_to_low_rank():
    torch.manual_seed(10)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 4 * 4, 8),
                          nn.ReLU(), nn.Linear(8, 2)).double()
    low = to_low_rank(model, 2)
    dense = to_dense(low)
    assert [type(m) for m in dense] == [type(m) for m in model]
    assert isinstance(low[0], LowRankConv2d)  # the input is untouched
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    torch.testing.assert_close(dense(x), low(x))
    assert torch.linalg.matrix_rank(dense[3].weight) == 2
    with pytest.raises(TypeError, match="Expected model to be an nn.Module"):
        to_dense("model")


def test_recurrent_cells_split_their_gates():
    cell = nn.LSTMCell(3, 4).double()
    views = {v.name: v for v in layer_views(cell)}
    assert len(views) == 8
    _check(views["weight_hh.g"].spec, lambda: cell.weight_hh[8:12], [cell.weight_hh])


def _covered_or_listed(model, options=None):
    """Every ≥ 2-D parameter is read by a found layer or belongs to a module listed as skipped: nothing silent."""
    cat = find_layers(model, options)
    read = {id(p) for layer in cat.layers for p in layer.parameters}
    for name, p in model.named_parameters():
        if p.dim() >= 2 and id(p) not in read:
            owner = name.rpartition(".")[0]
            assert owner in cat.skipped, f"{name} is neither tracked nor listed as skipped"
    return cat


@pytest.mark.parametrize("arch", ["bert", "t5", "vit", "llama"])
def test_transformers_models_circuits_and_nothing_left_out_silently(arch):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(11)
    common = {"num_hidden_layers": 1, "num_attention_heads": 4, "intermediate_size": 12, "hidden_size": 8}
    model = {
        "bert": lambda: transformers.BertModel(transformers.BertConfig(vocab_size=20, **common)),
        "t5": lambda: transformers.T5Model(transformers.T5Config(vocab_size=20, d_model=8, d_kv=2, num_heads=4,
                                                                 num_layers=1, d_ff=12)),
        "vit": lambda: transformers.ViTModel(transformers.ViTConfig(image_size=8, patch_size=4, **common)),
        "llama": lambda: transformers.LlamaModel(transformers.LlamaConfig(vocab_size=20, num_key_value_heads=2,
                                                                          **common)),
    }[arch]().double()
    projections = _covered_or_listed(model)
    linear_names = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert linear_names <= set(projections.names())  # separate Q/K/V/O stay Linear layers under their own names
    circuits = _covered_or_listed(model, ViewOptions(attention="circuits"))
    ov = [layer for layer in circuits.layers if layer.name.endswith("ov.h3")]
    assert ov
    attn = ov[0].module
    paths = {"bert": ("self.query", "self.key", "self.value", "output.dense"), "t5": tuple("qkvo")}.get(
        arch, ("q_proj", "k_proj", "v_proj", "o_proj"))
    q, k, v, o = (attn.get_submodule(p).weight for p in paths)
    kv = slice(2, 4) if arch == "llama" else slice(6, 8)   # llama: 4 query heads share 2 key/value heads
    _check(ov[0].spec, lambda: o[:, 6:8] @ v[kv], [q, k, v, o])
    qk = circuits[ov[0].name.replace("ov.h3", "qk.h3")]
    _check(qk.spec, lambda: q[6:8].T @ k[kv], [q, k, v, o])
    if arch == "t5":
        rel = [layer for layer in circuits.layers if layer.name.endswith("relative_attention_bias")]
        assert rel and not rel[0].penalize


@given(out=st.integers(1, 9), inn=st.integers(1, 9), taps=st.sampled_from([(), (3,), (2, 2)]),
       transpose=st.booleans(), rows=st.sampled_from([None, slice(0, 1), slice(1, None), slice(0, 8, 3)]),
       cols=st.sampled_from([None, slice(0, 2), slice(2, None)]))
def test_matrix_spec_shape_is_the_shape_of_its_view(out, inn, taps, transpose, rows, cols):
    # shape is computed from the weight's shape alone; it must be that of the strided view.
    from robustcompress.layers import MatrixSpec

    w = torch.zeros(out, inn, *taps)
    if transpose and taps:
        with pytest.raises(ValueError, match="2-D"):
            MatrixSpec(lambda: w, transpose=True).shape
        return
    spec = MatrixSpec(lambda: w, transpose=transpose, rows=rows, cols=cols)
    assert spec.shape == tuple(spec.sliced().shape)
