"""Tests for robustcompress.models: shapes, structure, fx tracing, options and errors."""


import pytest
import torch
import torch.fx
from torch import nn

from robustcompress.models import ACTIVATIONS, MLP, SmallCNN, resnet18, vgg11, vgg16


def n_params(model):
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------- MLP


def test_mlp_structure_and_shapes():
    model = MLP(64, (32, 16), 10)
    kinds = [type(m) for m in model]
    assert kinds == [nn.Flatten, nn.Linear, nn.ReLU, nn.Linear, nn.ReLU, nn.Linear]
    assert [(m.in_features, m.out_features) for m in model if isinstance(m, nn.Linear)] == [
        (64, 32),
        (32, 16),
        (16, 10),
    ]
    assert model.head is model[-1]
    assert model(torch.rand(5, 64)).shape == (5, 10)
    # Flatten first: image-shaped digits go straight in
    assert model(torch.rand(5, 1, 8, 8)).shape == (5, 10)
    assert n_params(model) == 64 * 32 + 32 + 32 * 16 + 16 + 16 * 10 + 10


def test_mlp_defaults_and_no_hidden_layers():
    assert [m.out_features for m in MLP() if isinstance(m, nn.Linear)] == [256, 256, 10]
    linear = MLP(5, (), 3)
    assert [type(m) for m in linear] == [nn.Flatten, nn.Linear]
    x = torch.randn(4, 5)
    assert torch.allclose(linear(x), x @ linear.head.weight.T + linear.head.bias)


def test_mlp_matches_manual_forward():
    model = MLP(6, (4,), 3, activation="tanh")
    x = torch.randn(7, 6)
    l1, l2 = model[1], model[3]
    expected = torch.tanh(x @ l1.weight.T + l1.bias) @ l2.weight.T + l2.bias
    assert torch.allclose(model(x), expected, atol=1e-6)


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_mlp_activation_options(name):
    model = MLP(8, (6, 6), 3, activation=name)
    acts = [m for m in model if not isinstance(m, (nn.Linear, nn.Flatten))]
    assert len(acts) == 2 and all(type(a) is ACTIVATIONS[name] for a in acts)
    assert acts[0] is not acts[1]  # one module per layer, so hooks can tell them apart
    z = torch.linspace(-3, 3, 13)
    reference = {
        "relu": torch.relu,
        "gelu": nn.functional.gelu,
        "silu": nn.functional.silu,
        "mish": nn.functional.mish,
        "hardswish": nn.functional.hardswish,
        "tanh": torch.tanh,
        "leaky_relu": nn.functional.leaky_relu,
    }[name]
    assert torch.allclose(acts[0](z), reference(z))
    assert model(torch.randn(2, 8)).shape == (2, 3)


def test_activation_names_are_the_documented_set():
    assert set(ACTIVATIONS) == {"relu", "gelu", "silu", "mish", "hardswish", "tanh", "leaky_relu"}


def test_mlp_bad_activation_lists_allowed_names():
    with pytest.raises(ValueError, match=r"activation.*'relu'.*'leaky_relu'.*'sigmoid'"):
        MLP(activation="sigmoid")
    with pytest.raises(ValueError, match="activation"):
        MLP(activation=nn.ReLU)


def test_mlp_bias_false_has_no_biases():
    model = MLP(10, (8, 8), 4, bias=False)
    assert all(m.bias is None for m in model if isinstance(m, nn.Linear))
    assert not any("bias" in name for name, _ in model.named_parameters())
    assert torch.equal(model(torch.zeros(3, 10)), torch.zeros(3, 4))


@pytest.mark.parametrize(
    "kwargs, err, name",
    [
        ({"in_features": 0}, ValueError, "in_features"),
        ({"num_classes": 2.0}, ValueError, "num_classes"),
        ({"widths": (8, 0)}, ValueError, r"widths\[1\]"),
        ({"widths": 8}, TypeError, "widths"),
        ({"widths": "88"}, TypeError, "widths"),
        ({"bias": 0}, TypeError, "bias"),
    ],
)
def test_mlp_bad_arguments(kwargs, err, name):
    with pytest.raises(err, match=name):
        MLP(**kwargs)


def test_init_is_deterministic_under_manual_seed():
    def build():
        torch.manual_seed(11)
        return MLP(12, (9,), 4), SmallCNN(1, 3, width=4, input_size=8)

    (m1, c1), (m2, c2) = build(), build()
    for a, b in ((m1, m2), (c1, c2)):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys()
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    torch.manual_seed(12)
    assert not torch.equal(MLP(12, (9,), 4).head.weight, m1.head.weight)


# ----------------------------------------------------------------------------- CNNs


@pytest.mark.parametrize("in_channels, input_size", [(1, 8), (3, 32), (3, 12)])
def test_small_cnn_shapes(in_channels, input_size):
    model = SmallCNN(in_channels=in_channels, num_classes=7, width=4, input_size=input_size)
    assert model(torch.rand(2, in_channels, input_size, input_size)).shape == (2, 7)
    assert model.head.in_features == 8 * (input_size // 4) ** 2


def test_small_cnn_batch_norm_option():
    with_bn = SmallCNN(width=4)
    without = SmallCNN(width=4, batch_norm=False)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in with_bn.modules()) == 2
    assert not any(isinstance(m, nn.BatchNorm2d) for m in without.modules())
    # the conv bias is redundant before BN and present without it
    assert all(m.bias is None for m in with_bn.modules() if isinstance(m, nn.Conv2d))
    assert all(m.bias is not None for m in without.modules() if isinstance(m, nn.Conv2d))
    pools = [m for m in with_bn.modules() if isinstance(m, nn.MaxPool2d)]
    assert len(pools) == 2 and all(p.kernel_size == p.stride == 2 for p in pools)


@pytest.mark.parametrize(
    "kwargs, err, name",
    [
        ({"input_size": 10}, ValueError, "input_size"),
        ({"width": 0}, ValueError, "width"),
        ({"in_channels": -1}, ValueError, "in_channels"),
        ({"batch_norm": "no"}, TypeError, "batch_norm"),
    ],
)
def test_small_cnn_bad_arguments(kwargs, err, name):
    with pytest.raises(err, match=name):
        SmallCNN(**kwargs)


def test_resnet18_structure_and_parameter_count():
    model = resnet18(num_classes=10)
    # the CIFAR ResNet-18 reference count (3x3 stem, no max-pool, option-B shortcuts)
    assert n_params(model) == 11_173_962
    assert not any(isinstance(m, nn.MaxPool2d) for m in model.modules())
    stem = model.stem[0]
    assert stem.kernel_size == (3, 3) and stem.stride == (1, 1) and stem.out_channels == 64
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 1 + 16 + 3  # stem, 8 blocks × 2, 3 projections
    projections = [
        name for name, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1)
    ]
    assert projections == ["layer2.0.shortcut.0", "layer3.0.shortcut.0", "layer4.0.shortcut.0"]
    assert isinstance(model.head, nn.Linear) and model.head.in_features == 512
    other = resnet18(num_classes=100, in_channels=1)
    assert other.head.out_features == 100 and other.stem[0].in_channels == 1


def test_resnet18_forward_and_trace():
    model = resnet18().eval()
    x = torch.rand(2, 3, 32, 32)
    gm = torch.fx.symbolic_trace(model)
    with torch.no_grad():
        out = model(x)
        assert out.shape == (2, 10)
        assert torch.allclose(gm(x), out)
    # the residual additions appear as graph nodes (the bound rules act on them)
    adds = [n for n in gm.graph.nodes if n.op == "call_function" and "add" in str(n.target)]
    assert len(adds) == 8


VGG11_CONVS = [64, 128, 256, 256, 512, 512, 512, 512]
VGG16_CONVS = [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]


def _vgg_param_count(channels, batch_norm):
    # 3x3 conv weights, then either BN (gamma, beta) or a conv bias, then Linear(512, 10)
    total, cin = 0, 3
    for cout in channels:
        total += 9 * cin * cout + (2 * cout if batch_norm else cout)
        cin = cout
    return total + 512 * 10 + 10


@pytest.mark.parametrize("build, channels", [(vgg11, VGG11_CONVS), (vgg16, VGG16_CONVS)])
def test_vgg_structure_forward_and_trace(build, channels):
    model = build().eval()
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == channels
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == len(channels)
    assert sum(isinstance(m, nn.MaxPool2d) for m in model.modules()) == 5
    assert n_params(model) == _vgg_param_count(channels, batch_norm=True)
    assert n_params(build(batch_norm=False)) == _vgg_param_count(channels, batch_norm=False)
    x = torch.rand(2, 3, 32, 32)
    gm = torch.fx.symbolic_trace(model)
    with torch.no_grad():
        out = model(x)
        assert out.shape == (2, 10)
        assert torch.allclose(gm(x), out)


def test_vgg_options():
    model = vgg11(num_classes=5, in_channels=1, batch_norm=False)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert model.features[0].in_channels == 1 and model.head.out_features == 5
    with pytest.raises(ValueError, match="num_classes"):
        vgg16(num_classes=0)
    with pytest.raises(TypeError, match="batch_norm"):
        vgg11(batch_norm=None)
    with pytest.raises(ValueError, match="in_channels"):
        resnet18(in_channels=0)


@pytest.mark.parametrize(
    "model, shape",
    [
        (MLP(64, (16,), 10, activation="gelu"), (3, 64)),
        (SmallCNN(1, 10, width=4, input_size=8), (3, 1, 8, 8)),
        (SmallCNN(3, 10, width=4, batch_norm=False), (3, 3, 32, 32)),
    ],
    ids=["mlp", "cnn8", "cnn32"],
)
def test_small_models_trace_with_fx(model, shape):
    model.eval()
    gm = torch.fx.symbolic_trace(model)
    x = torch.rand(shape)
    assert torch.allclose(gm(x), model(x))
    # every module of the model is called from the graph (nothing hidden in Python code)
    called = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    leaves = {name for name, m in model.named_modules() if not list(m.children())}
    assert called == leaves
