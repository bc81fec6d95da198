"""How attacks and evaluation run a model: dict inputs, ModelOutput / tuple outputs, non-finite values.

Every path goes through ``robustcompress._utils.logits_of``; these tests
drive it through the public functions, with the exact exception type and a
fragment of the message that names what was wrong.
"""

import pytest
import torch
from torch import nn

from robustcompress import attacks
from robustcompress._utils import batches, logits_of, num_batches
from robustcompress.evaluate import accuracy, autoattack_accuracy, minimal_eps, robust_accuracy


def _mlp(classes=3, dim=6):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(dim, 16), nn.ReLU(), nn.Linear(16, classes)).eval()


class _Poisoned(nn.Module):
    """A model whose logits turn NaN (or inf) on the examples whose first input exceeds ``cut``."""

    def __init__(self, value=float("nan"), cut=0.5):
        super().__init__()
        self.inner, self.value, self.cut = _mlp(), value, cut

    def forward(self, x):
        z = self.inner(x)
        return torch.where(x[:, :1] > self.cut, torch.full_like(z, self.value), z)


def _data(n=12, dim=6, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, dim, generator=g), torch.randint(0, classes, (n,), generator=g)


# --------------------------------------------------------------------------- non-finite logits and inputs


_CALLS = {
    "accuracy": lambda m, x, y: accuracy(m, (x, y)),
    "robust_accuracy": lambda m, x, y: robust_accuracy(m, (x, y), "pgd", eps=0.1, steps=3),
    "robust_accuracy_fgsm": lambda m, x, y: robust_accuracy(m, (x, y), "fgsm", eps=0.1),
    "fgsm": lambda m, x, y: attacks.fgsm(m, x, y, 0.1),
    "pgd": lambda m, x, y: attacks.pgd(m, x, y, 0.1, steps=3),
    "pgd_constant": lambda m, x, y: attacks.pgd(m, x, y, 0.1, steps=3, schedule="constant"),
    "multi_targeted_pgd": lambda m, x, y: attacks.multi_targeted_pgd(m, x, y, 0.1, steps=3),
    "random_search": lambda m, x, y: attacks.random_search(m, x, y, 0.1, n_queries=5),
    "sensitive_direction_attack": lambda m, x, y: attacks.sensitive_direction_attack(m, x, y, 0.1),
    "universal_perturbation": lambda m, x, y: attacks.universal_perturbation(m, (x, y), 0.1, epochs=1),
    "fooling_rate": lambda m, x, y: attacks.fooling_rate(m, (x, y), torch.zeros(x.shape[1])),
    "adversarial_batch": lambda m, x, y: attacks.adversarial_batch(m, x, y, eps=0.1, steps=2, seed=0),
    "minimal_eps": lambda m, x, y: minimal_eps(m, x, y, tol=0.05),
}


@pytest.mark.parametrize("call", sorted(_CALLS))
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_logits_raise_in_the_call_that_meets_them(call, value):
    x, y = _data()
    n_bad = int((x[:, 0] > 0.5).sum())
    assert 0 < n_bad < len(x)
    with pytest.raises(FloatingPointError, match=f"non-finite logits .* for {n_bad} of {len(x)} examples"):
        _CALLS[call](_Poisoned(value), x, y)


def test_logits_that_turn_non_finite_during_the_attack_raise():
    # clean logits are finite; only points the attack reaches (x0 > 0.55) give nan
    x, y = _data()
    x[:, 0] = 0.5
    model = _Poisoned(cut=0.55)
    assert accuracy(model, (x, y)) >= 0
    with pytest.raises(FloatingPointError, match="non-finite logits"):
        attacks.pgd(model, x, torch.zeros_like(y), 0.2, steps=5, random_start=True, seed=0)


@pytest.mark.parametrize("call", ["accuracy", "robust_accuracy", "pgd", "fgsm", "fooling_rate"])
def test_nan_inputs_are_named(call):
    x, y = _data()
    x[3, 2] = float("nan")
    with pytest.raises(ValueError, match=r"x( of data)? to be finite"):
        _CALLS[call](_mlp(), x, y)


def test_an_attack_returning_nan_is_refused():
    x, y = _data()
    with pytest.raises(ValueError, match="attack returned an x_adv holding nan"):
        robust_accuracy(_mlp(), (x, y), lambda m, xb, yb: torch.full_like(xb, float("nan")), eps=0.1)


# --------------------------------------------------------------------------- outputs read through their logits


class _Wrapped(nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.inner, self.kind = _mlp(), kind

    def forward(self, x):
        z = self.inner(x)
        if self.kind == "tuple":
            return z, {"hidden": x}
        if self.kind == "dict":
            return {"loss": None, "logits": z}
        return type("Output", (), {"logits": z, "hidden_states": None})()


@pytest.mark.parametrize("kind", ["tuple", "dict", "attribute"])
def test_outputs_are_read_through_their_logits(kind):
    x, y = _data()
    plain, wrapped = _mlp(), _Wrapped(kind)
    assert accuracy(wrapped, (x, y)) == accuracy(plain, (x, y))
    assert torch.equal(attacks.pgd(wrapped, x, y, 0.1, steps=4), attacks.pgd(plain, x, y, 0.1, steps=4))
    assert robust_accuracy(wrapped, (x, y), eps=0.1, steps=4) == robust_accuracy(plain, (x, y), eps=0.1, steps=4)


def test_logits_of_rejects_outputs_without_logits():
    with pytest.raises(ValueError, match=r"logits of shape \(4, num_classes\), but got \(4, 2, 3\)"):
        logits_of(lambda x: torch.zeros(4, 2, 3), torch.zeros(4, 5))
    with pytest.raises(ValueError, match="but got str"):
        logits_of(lambda x: "nothing", torch.zeros(4, 5))


# --------------------------------------------------------------------------- dict inputs


class _Tokens(nn.Module):
    """A token classifier taking keyword inputs, as transformers models do."""

    def __init__(self, vocab=20, classes=3):
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.head = nn.Embedding(vocab, 8), nn.Linear(8, classes)

    def forward(self, input_ids, attention_mask):
        h = (self.emb(input_ids) * attention_mask[..., None]).sum(1) / attention_mask.sum(1, keepdim=True)
        return self.head(h)


def _tokens(n=10, length=5):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 20, (n, length), generator=g)
    mask = torch.ones(n, length, dtype=torch.long)
    mask[::2, -2:] = 0
    return {"input_ids": ids, "attention_mask": mask}, torch.randint(0, 3, (n,), generator=g)


def test_accuracy_on_dict_inputs_matches_a_manual_count():
    model = _Tokens().eval()
    x, y = _tokens()
    expected = int((model(**x).argmax(1) == y).sum()) / len(y)
    assert accuracy(model, (x, y), batch_size=3) == expected
    assert num_batches((x, y), 3) == 4
    # a collator's dict batches, labels inside
    loader = [{**{k: v[i : i + 4] for k, v in x.items()}, "labels": y[i : i + 4]} for i in range(0, 10, 4)]
    assert accuracy(model, torch.utils.data.DataLoader(loader, batch_size=None)) == expected


def test_dict_batches_need_labels_and_one_batch_size():
    x, y = _tokens()
    with pytest.raises(TypeError, match="'labels'"):
        list(batches(torch.utils.data.DataLoader([x], batch_size=None), 4))
    with pytest.raises(ValueError, match="share their first"):
        accuracy(_Tokens(), ({"input_ids": x["input_ids"], "attention_mask": x["attention_mask"][:3]}, y))


def test_gradient_attacks_refuse_integer_and_dict_inputs():
    model, (x, y) = _Tokens().eval(), _tokens()
    with pytest.raises(TypeError, match="Expected x to be a floating-point tensor, but got dtype=torch.int64"):
        attacks.pgd(model, x["input_ids"], y, 0.1)
    with pytest.raises(TypeError, match="Expected x to be one floating-point tensor .* dict"):
        attacks.fgsm(model, x, y, 0.1)
    with pytest.raises(TypeError, match="Expected x of data to be one floating-point tensor .* dict"):
        robust_accuracy(model, (x, y), "pgd", eps=0.1)
    with pytest.raises(TypeError, match="Expected x of data to be a floating-point tensor, but got dtype=torch.int64"):
        robust_accuracy(model, (x["input_ids"], y), "pgd", eps=0.1)
    pytest.importorskip("torchattacks")
    with pytest.raises(TypeError, match="Expected x of data to be one floating-point tensor .* dict"):
        autoattack_accuracy(model, (x, y), eps=0.1, components=("apgd-ce",), steps=2)


# --------------------------------------------------------------------------- transformers models from tiny configs


def test_bert_sequence_classifier_evaluates_on_token_batches():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=20, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32, num_labels=3, max_position_embeddings=16)
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(config).eval()
    x, y = _tokens()
    expected = int((model(**x).logits.argmax(1) == y).sum()) / len(y)
    assert accuracy(model, (x, y), batch_size=4) == expected
    with pytest.raises(TypeError, match="dict"):
        robust_accuracy(model, (x, y), "pgd", eps=0.1)


def test_vit_image_classifier_is_attacked_through_pixel_values():
    transformers = pytest.importorskip("transformers")
    config = transformers.ViTConfig(image_size=8, patch_size=4, num_channels=1, hidden_size=16, num_hidden_layers=1,
                                    num_attention_heads=2, intermediate_size=32, num_labels=4)
    torch.manual_seed(0)
    model = transformers.ViTForImageClassification(config)
    model.train()
    x = torch.rand(6, 1, 8, 8)
    with torch.no_grad():
        y = model.eval()(x).logits.argmax(1)
    model.train()
    x_adv = attacks.pgd(model, x, y, 0.3, steps=10)
    assert model.training and all(m.training for m in model.modules())  # mode restored
    assert float((x_adv - x).abs().max()) <= 0.3 + 1e-6
    assert accuracy(model, (x, y)) == 1.0
    robust = robust_accuracy(model, (x, y), "pgd", eps=0.3, steps=10)
    assert robust == accuracy(model, (x_adv, y)) < 1.0
    assert all(p.grad is None for p in model.parameters())
