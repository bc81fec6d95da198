"""Drop-in on the models people train: transformers (from configs), attention, recurrent layers, LoRA, frozen layers.

Every model is built from a tiny config with random weights (no download).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import robustcompress as rc
from robustcompress.penalties import SpectralNormPenalty, default_penalties
from robustcompress.spectral import SpectralState

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _quiet(fn):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn()


def gpt2():
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=50, n_positions=16)
    return _quiet(lambda: transformers.GPT2LMHeadModel(cfg))


def bert():
    cfg = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                  vocab_size=50, max_position_embeddings=16, num_labels=3)
    return transformers.BertForSequenceClassification(cfg)


def vit():
    cfg = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                 image_size=8, patch_size=4, num_channels=3, num_labels=3)
    return transformers.ViTForImageClassification(cfg)


def t5():
    cfg = transformers.T5Config(d_model=32, d_kv=8, d_ff=64, num_layers=1, num_decoder_layers=1, num_heads=4,
                                vocab_size=50, relative_attention_num_buckets=8)
    return transformers.T5ForConditionalGeneration(cfg)


def torch_encoder():
    layer = nn.TransformerEncoderLayer(32, 4, 64, batch_first=True)
    return nn.Sequential(nn.TransformerEncoder(layer, 2, enable_nested_tensor=False), nn.Linear(32, 3))


class LSTMTagger(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(8, 12, num_layers=2, bidirectional=True, proj_size=6, batch_first=True)
        self.head = nn.Linear(12, 3)

    def forward(self, x):
        return self.head(self.lstm(x)[0])


# Per model: the ≥2-D parameters a state leaves out — embeddings (and weights tied to them),
# position and cls parameters — exactly.
MODELS = {
    "gpt2": (gpt2, {"transformer.wte.weight", "transformer.wpe.weight"}),
    "bert": (bert, {"bert.embeddings.word_embeddings.weight", "bert.embeddings.position_embeddings.weight",
                    "bert.embeddings.token_type_embeddings.weight"}),
    "vit": (vit, {"vit.embeddings.cls_token", "vit.embeddings.position_embeddings"}),
    "t5": (t5, {"shared.weight", "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
                "decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"}),
    "torch_encoder": (torch_encoder, set()),
    "lstm": (LSTMTagger, set()),
}


def _untracked(model: nn.Module, state: SpectralState) -> tuple[set[str], float]:
    tracked = {id(t) for n in state.names for t in state.operator_tensors(n)}
    weights = {n: p for n, p in model.named_parameters() if p.dim() >= 2}
    left = {n for n, p in weights.items() if id(p) not in tracked}
    return left, tracked


@pytest.mark.parametrize("name", sorted(MODELS))
def test_coverage_of_every_model_leaves_out_exactly_embeddings_positions_and_cls(name):
    build, excluded = MODELS[name]
    torch.manual_seed(0)
    model = build()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        state = SpectralState(model, init_iter=0)
    ours = [w for w in caught if "leaves out" in str(w.message)]
    assert len(ours) == (1 if excluded else 0)
    left, tracked = _untracked(model, state)
    assert left == excluded
    weights = {n: p for n, p in model.named_parameters() if p.dim() >= 2}
    denominator = sum(p.numel() for n, p in weights.items() if n not in excluded)
    covered = sum(p.numel() for p in weights.values() if id(p) in tracked)
    assert covered / denominator >= 0.95
    cov = state.coverage()
    assert cov.tracked == len(state.names) and cov.skipped == len(state.skipped)
    assert cov.tracked_elements == covered
    assert cov.weight_elements == sum(p.numel() for p in weights.values())


def _reference_operators(name: str, model: nn.Module) -> dict[str, torch.Tensor]:
    """True operators written out by hand from the stored weights (float64)."""
    if name == "gpt2":
        attn = model.transformer.h[0].attn
        w = attn.c_attn.weight.detach().double()  # in × 3d (Conv1D)
        d = w.shape[0]
        return {"transformer.h.0.attn.c_attn.q": w[:, :d].T, "transformer.h.0.attn.c_attn.v": w[:, 2 * d:].T,
                "transformer.h.0.attn.c_proj": attn.c_proj.weight.detach().double().T,
                "transformer.h.1.mlp.c_fc": model.transformer.h[1].mlp.c_fc.weight.detach().double().T}
    if name == "torch_encoder":
        mha = model[0].layers[0].self_attn
        w = mha.in_proj_weight.detach().double()
        return {"0.layers.0.self_attn.q": w[:32], "0.layers.0.self_attn.k": w[32:64],
                "0.layers.0.self_attn.out_proj": mha.out_proj.weight.detach().double()}
    if name == "lstm":
        lstm = model.lstm
        h = 12
        return {"lstm.weight_ih_l0.f": lstm.weight_ih_l0.detach().double()[h:2 * h],
                "lstm.weight_hh_l1_reverse.o": lstm.weight_hh_l1_reverse.detach().double()[3 * h:],
                "lstm.weight_hr_l0": lstm.weight_hr_l0.detach().double()}
    if name == "vit":
        conv = model.vit.embeddings.patch_embeddings.projection
        return {"vit.embeddings.patch_embeddings.projection": conv.weight.detach().double().flatten(1)}
    if name == "t5":
        att = model.encoder.block[0].layer[0].SelfAttention
        return {"encoder.block.0.layer.0.SelfAttention.q": att.q.weight.detach().double(),
                "encoder.block.0.layer.0.SelfAttention.o": att.o.weight.detach().double()}
    return {}


@pytest.mark.parametrize("name", ["gpt2", "torch_encoder", "lstm", "vit", "t5"])
def test_sigma1_of_every_kind_matches_svdvals_of_the_true_operator(name):
    torch.manual_seed(0)
    model = MODELS[name][0]()
    refs = _reference_operators(name, model)
    state = SpectralState(model, layers=list(refs), init_iter=0)
    state.step(300)
    for layer, w in refs.items():
        exact = torch.linalg.svdvals(w)[0]
        assert float(state.sigmas(layer)[0]) == pytest.approx(float(exact), rel=1e-4), layer


def _frozen_encoder_bert():
    torch.manual_seed(0)
    model = bert()
    for p in model.bert.parameters():
        p.requires_grad_(False)
    for p in model.bert.pooler.parameters():
        p.requires_grad_(True)
    return model


def _batch():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 50, (4, 10), generator=g), torch.randint(0, 3, (4,), generator=g)


@pytest.mark.parametrize("via", ["wrap", "loss"])
def test_frozen_encoder_stays_bit_identical_and_gets_no_grad(via):
    model = _frozen_encoder_bert()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    penalties = default_penalties(model, strength=1.0)
    (pen,) = penalties
    # The encoder's layers are selected by default, frozen, and left out: only the pooler remains.
    assert pen.names == ["bert.pooler.dense"]
    assert "bert.encoder.layer.0.attention.self.query" in pen.frozen
    assert all(p.requires_grad for p in pen.parameters_acted_on())
    x, y = _batch()
    if via == "wrap":
        opt = rc.wrap(opt, model, penalties)
    for _ in range(3):
        opt.zero_grad()
        loss = model(input_ids=x, labels=y).loss
        if via == "loss":
            loss = loss + pen()
        loss.backward()
        opt.step()
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
            assert p.grad is None, n
    assert not torch.equal(model.bert.pooler.dense.weight, _frozen_encoder_bert().bert.pooler.dense.weight)


def test_a_penalty_on_frozen_layers_only_is_an_error():
    model = _frozen_encoder_bert()
    with pytest.raises(ValueError, match="frozen"):
        SpectralNormPenalty(model, layers=["bert.encoder.layer.0.intermediate.dense"])
    state = SpectralState(model)
    assert "bert.encoder.layer.1.output.dense" in state.coverage().frozen
    with pytest.raises(ValueError, match="frozen"):
        SpectralNormPenalty(state, layers=lambda n, m: "encoder" in n)


def _lora_run(strength: float):
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(n_layer=1, n_embd=32, n_head=4, vocab_size=50, n_positions=16))
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"],
                                                      fan_in_fan_out=True))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    pen = SpectralNormPenalty(model, strength=strength, layers=lambda n, m: "c_attn" in n)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x = torch.randint(0, 50, (4, 12), generator=torch.Generator().manual_seed(2))
    for _ in range(20):
        opt.zero_grad()
        (model(input_ids=x, labels=x).loss + pen()).backward()
        opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    pen.state.step(200)
    tracked = {n.rsplit(".", 1)[1]: float(pen.state.sigmas(n)[0]) for n in pen.names}
    merged = model.merge_and_unload().transformer.h[0].attn.c_attn.weight.detach().double()
    return changed, tracked, merged


def test_lora_finetune_moves_only_adapters_and_penalises_the_merged_weight():
    changed, tracked, merged = _lora_run(1.0)
    assert changed and all(".lora_A." in n or ".lora_B." in n for n in changed)
    assert set(tracked) == {"q", "k", "v"}
    d = merged.shape[0]
    for i, view in enumerate("qkv"):
        exact = float(torch.linalg.svdvals(merged[:, i * d:(i + 1) * d])[0])
        assert tracked[view] == pytest.approx(exact, rel=1e-4)
    _, plain, plain_merged = _lora_run(0.0)
    for i, view in enumerate("qkv"):
        without = float(torch.linalg.svdvals(plain_merged[:, i * d:(i + 1) * d])[0])
        assert tracked[view] <= 0.95 * without


def test_tracker_records_attention_and_lstm_outputs():
    torch.manual_seed(0)
    model = torch_encoder()
    model.train()
    with rc.track(model, every=1) as t:
        model(torch.randn(2, 5, 32))
    layers = {r["layer"] for r in t.records if r["metric"] == "effective_rank"}
    assert "0.layers.0.self_attn" in layers and "0.layers.0.linear1" in layers
    lstm = LSTMTagger().train()
    with rc.track(lstm, every=1) as t:
        lstm(torch.randn(2, 5, 8))
    assert "lstm" in {r["layer"] for r in t.records if r["metric"] == "effective_rank"}
    gru = nn.GRU(4, 6).train()
    packed = nn.utils.rnn.pack_padded_sequence(torch.randn(5, 3, 4), [5, 4, 2])
    with rc.track(gru, every=1) as t:
        gru(packed)
    rows = [r for r in t.records if r["layer"] == "" and r["metric"] == "effective_rank"]
    assert len(rows) == 1 and 1.0 <= rows[0]["value"] <= 6.0
    # The state's shape recording sees every layer even where eval mode would take the fused fast path.
    model.eval()
    shapes = rc.record_input_shapes(model, torch.randn(2, 5, 32), ["0.layers.0.linear1"])
    assert shapes == {"0.layers.0.linear1": (5, 32)}


def test_readme_coverage_snippet_runs_as_written():
    import pathlib
    import re

    readme = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
    (code,) = [b for b in re.findall(r"```python\n(.*?)\n```", readme, flags=re.S) if "coverage()" in b]
    printed = []
    exec(code, {"print": lambda *a: printed.append(" ".join(map(str, a)))})  # noqa: S102 - the README's code
    assert printed == ["12 3 0.87", "['transformer.wte', 'transformer.wpe', 'lm_head']"]
