"""The layer registry: lookup precedence, registration errors, discovery (skipped, aliases, claimed children), head."""

import pytest
import torch
from torch import nn

from robustcompress.layers import (
    LayerKind,
    LayerView,
    LowRankSpec,
    MatrixSpec,
    ViewOptions,
    batchnorm_scale,
    find_layers,
    head_name,
    layer_kind,
    layer_kinds,
    layer_views,
    register_layer_kind,
    unregister_layer_kind,
)


class Scaled(nn.Module):
    def __init__(self, m=3, n=5):
        super().__init__()
        self.w = nn.Parameter(torch.randn(m, n))

    def forward(self, x):
        return x @ (2 * self.w).T


def _scaled_kind(name="scaled", types=(Scaled,), views=None):
    views = views or (lambda m, o: [LayerView("", MatrixSpec(lambda: 2 * m.w), ("w",))])
    return LayerKind(name, types, views)


@pytest.fixture
def registered():
    added = []

    def add(kind, **kw):
        added.append(kind.name)
        return register_layer_kind(kind, **kw)
    yield add
    for name in added:
        if name in layer_kinds():
            unregister_layer_kind(name)


def test_custom_kind_is_discovered_and_its_operator_is_the_described_one(registered):
    registered(_scaled_kind(), example=Scaled())
    model = nn.Sequential(Scaled(), nn.ReLU(), nn.Linear(3, 2))
    cat = find_layers(model)
    assert cat.names() == ["0", "2"] and cat.skipped == {}
    torch.testing.assert_close(cat["0"].spec.matrix(), 2 * model[0].w)
    assert cat["0"].parameters == [model[0].w]


def test_registering_a_type_twice_is_an_error(registered):
    registered(_scaled_kind())
    with pytest.raises(ValueError, match="Scaled is already registered as layer kind 'scaled'"):
        register_layer_kind(_scaled_kind(name="other"))
    with pytest.raises(ValueError, match="already registered as layer kind 'scaled'"):
        register_layer_kind(_scaled_kind(name="other", types=(f"{Scaled.__module__}.Scaled",)))
    with pytest.raises(ValueError, match="A layer kind called 'scaled' is already registered"):
        register_layer_kind(_scaled_kind(types=(nn.Bilinear,)))
    with pytest.raises(ValueError, match="nn.Linear|Linear is already registered as layer kind 'linear'"):
        register_layer_kind(_scaled_kind(name="mine", types=(nn.Linear,)))


def test_a_view_that_does_not_fit_its_weight_is_an_error_at_registration_and_discovery(registered):
    bad_slice = _scaled_kind(views=lambda m, o: [LayerView("", MatrixSpec(lambda: m.w, rows=slice(0, 7)), ("w",))])
    with pytest.raises(ValueError, match=r"rows slice slice\(0, 7, None\) does not fit the weight's operator shape \(3, 5\)"):
        register_layer_kind(bad_slice, example=Scaled())
    assert layer_kind(Scaled()) is None  # nothing half-registered
    bad_factors = _scaled_kind(views=lambda m, o: [LayerView("", LowRankSpec(MatrixSpec(lambda: m.w),
                                                                           MatrixSpec(lambda: m.w)), ("w",))])
    registered(bad_factors)
    with pytest.raises(ValueError, match=r"0 \(Scaled\): factor B is 3×5 but factor A is 3×5"):
        find_layers(nn.Sequential(Scaled()))
    unregister_layer_kind("scaled")
    missing = _scaled_kind(views=lambda m, o: [LayerView("", MatrixSpec(lambda: m.w), ("weight",))])
    with pytest.raises(ValueError, match=r"parameters \['weight'\] are not parameters of the module"):
        register_layer_kind(missing, example=Scaled())


def test_bad_kind_definitions_are_refused():
    with pytest.raises(TypeError, match="types to be a non-empty tuple"):
        LayerKind("x", nn.Linear, lambda m, o: [])
    with pytest.raises(TypeError, match="qualified class name"):
        LayerKind("x", ("Linear",), lambda m, o: [])
    with pytest.raises(ValueError, match="prune to be one of"):
        LayerKind("x", (Scaled,), lambda m, o: [], prune="columns")
    with pytest.raises(ValueError, match="needs an exclusion_reason"):
        LayerKind("x", (Scaled,), lambda m, o: [], penalize=False)
    with pytest.raises(ValueError, match="attention to be 'projections' or 'circuits'"):
        ViewOptions(attention="heads")
    with pytest.raises(KeyError, match="No layer kind called 'nope'"):
        unregister_layer_kind("nope")


def test_lookup_precedence_most_derived_class_then_class_before_name(registered):
    class MyLinear(nn.Linear):
        pass

    assert layer_kind(MyLinear(2, 2)).name == "linear"           # subclass: its registered ancestor
    assert layer_kind(nn.modules.linear.NonDynamicallyQuantizableLinear(2, 2)).name == "linear"
    registered(_scaled_kind(name="mine", types=(MyLinear,),
                            views=lambda m, o: [LayerView("", MatrixSpec(lambda: m.weight), ("weight",))]))
    assert layer_kind(MyLinear(2, 2)).name == "mine"             # its own entry wins
    assert layer_kind(nn.Linear(2, 2)).name == "linear"
    registered(_scaled_kind(name="by_name", types=(f"{Scaled.__module__}.{Scaled.__qualname__}",)))
    assert layer_kind(Scaled()).name == "by_name"                 # a qualified name, no import needed


def test_unknown_weight_bearing_modules_are_listed_as_skipped_with_their_type():
    model = nn.Sequential(nn.Linear(4, 4), nn.Bilinear(4, 4, 2), nn.LayerNorm(2), nn.ConvTranspose2d(2, 2, 3),
                          nn.utils.parametrizations.weight_norm(nn.ConvTranspose1d(2, 2, 3)))
    cat = find_layers(model)
    assert cat.names() == ["0"]
    assert set(cat.skipped) == {"1", "3", "4"}                    # LayerNorm has only 1-D parameters
    assert "'weight'" in cat.skipped["4"]                         # a parametrized weight of an unknown kind
    assert "torch.nn.modules.linear.Bilinear" in cat.skipped["1"] and "'weight'" in cat.skipped["1"]


def test_tied_head_follows_its_embedding_even_when_it_comes_first():
    class LM(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(4, 10, bias=False)
            self.emb = nn.Embedding(10, 4)
            self.head.weight = self.emb.weight

    cat = find_layers(LM())
    assert cat.names() == ["emb"] and cat.aliases == {"head": "emb"}
    assert not cat["head"].penalize and "lookup table" in cat["head"].exclusion_reason
    shared = nn.Linear(3, 3)
    cat = find_layers(nn.Sequential(shared, nn.ReLU(), shared))
    assert cat.names() == ["0"] and cat.aliases == {"2": "0"}


def test_packed_attention_claims_its_output_projection():
    model = nn.Sequential(nn.Linear(8, 8), nn.MultiheadAttention(8, 2))
    cat = find_layers(model)
    assert cat.names() == ["0", "1.q", "1.k", "1.v", "1.out_proj"]
    assert cat["1.out_proj"].view.params == ("out_proj.weight",)
    layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16)
    names = find_layers(layer, ViewOptions(attention="circuits")).names()
    assert names == ["self_attn.ov.h0", "self_attn.qk.h0", "self_attn.ov.h1", "self_attn.qk.h1", "linear1", "linear2"]


def test_head_is_the_last_head_capable_layer():
    model = nn.Sequential(nn.Embedding(5, 4), nn.LSTM(4, 4), nn.Linear(4, 3), nn.MultiheadAttention(3, 1))
    assert head_name(model) == "2"
    assert head_name(nn.Sequential(nn.ReLU())) is None


def test_batchnorm_scale_is_abs_gamma_over_std_and_refuses_batch_statistics():
    bn = nn.BatchNorm2d(3).eval()
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([-2.0, 0.5, 1.0]))
        bn.running_var.copy_(torch.tensor([4.0, 1.0, 0.25]))
    expected = torch.tensor([2.0, 0.5, 1.0]) / torch.sqrt(torch.tensor([4.0, 1.0, 0.25]) + bn.eps)
    torch.testing.assert_close(batchnorm_scale(bn), expected, rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match="track_running_stats=True"):
        batchnorm_scale(nn.BatchNorm1d(3, track_running_stats=False))
    with pytest.raises(TypeError, match="Expected a BatchNorm module, but got LayerNorm"):
        batchnorm_scale(nn.LayerNorm(3))


def test_recurrent_views_cover_every_weight_once():
    lstm = nn.LSTM(3, 5, num_layers=2, bidirectional=True, proj_size=2)
    views = layer_views(lstm)
    weights = {n for n, p in lstm.named_parameters() if p.dim() == 2}
    assert {p for v in views for p in v.params} == weights
    rows = {}
    for v in views:
        rows.setdefault(v.params[0], 0)
        rows[v.params[0]] += v.spec.shape[0]
    assert rows == {n: lstm.get_parameter(n).shape[0] for n in weights}
    assert "weight_hh_l1_reverse.o" in {v.name for v in views} and "weight_hr_l0_reverse" in {v.name for v in views}
