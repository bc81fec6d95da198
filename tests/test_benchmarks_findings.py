"""The findings scripts' building blocks, and each script's run in a tiny configuration.

The scripts live in ``benchmarks/`` (not part of the package); these tests keep
them importable and their measurements right: statistics against references,
the ViT's projections tracked and factorised as Linear layers, the Jacobian
sensitivity against the exact value for a linear model, and one short run of
each experiment.
"""

import math
import pathlib
import sys

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

BENCH = pathlib.Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH))

import _findings_common as C  # noqa: E402
import choose_default  # noqa: E402
import implicit_compression  # noqa: E402
import vit_findings  # noqa: E402
from _vit_digits import KINDS, ViTDigits, kind_of  # noqa: E402

import robustcompress as rc  # noqa: E402


@given(st.integers(2, 12), st.integers(2, 12), st.integers(0, 10_000))
def test_spectral_stats_match_float64_svdvals(m, n, seed):
    w = torch.randn(m, n, generator=torch.Generator().manual_seed(seed))
    s = torch.linalg.svdvals(w.double())
    got = C.spectral_stats(w)
    e = s.square()
    assert math.isclose(got["sigma1"], float(s[0]), rel_tol=1e-9)
    assert math.isclose(got["c_spec"], float(e[0] / e.sum()), rel_tol=1e-9)
    assert math.isclose(got["stable_rank"], float(e.sum() / e[0]), rel_tol=1e-9)
    # rank99: the fewest singular values holding 99 % of the energy
    r = got["rank99"]
    assert float(e[:r].sum()) >= 0.99 * float(e.sum()) - 1e-12
    assert r == 1 or float(e[: r - 1].sum()) < 0.99 * float(e.sum())
    rows = w.double().square().sum(1)
    assert math.isclose(got["c_neu"], float(rows.max() / e.sum()), rel_tol=1e-9)


@pytest.mark.filterwarnings("ignore:An input array is constant")
@given(st.lists(st.integers(-5, 5), min_size=3, max_size=20), st.integers(0, 1000))
def test_spearman_matches_scipy_with_ties(xs, seed):
    stats = pytest.importorskip("scipy.stats")
    g = torch.Generator().manual_seed(seed)
    ys = torch.randint(-3, 4, (len(xs),), generator=g).tolist()
    ref = stats.spearmanr(xs, ys).statistic
    got = C.spearman([float(x) for x in xs], [float(y) for y in ys])
    if math.isnan(ref):
        assert math.isnan(got)
    else:
        assert math.isclose(got, ref, abs_tol=1e-12)


def test_replace_section_replaces_in_place_and_appends(tmp_path):
    md = tmp_path / "F.md"
    md.write_text("# head\n\nbody\n", encoding="utf-8")
    C.replace_section(md, "f", "one")
    C.replace_section(md, "g", "two")
    C.replace_section(md, "f", "three")
    text = md.read_text(encoding="utf-8")
    assert text.startswith("# head\n\nbody\n")
    assert "one" not in text and text.count("<!-- begin f -->") == 1
    assert text.index("three") < text.index("two")  # (f) stays where it was


def test_jacobian_sensitivity_of_a_linear_model_is_its_norms():
    lin = nn.Linear(6, 4)
    x = torch.rand(5, 6)
    got = C.jacobian_sensitivity(lin, x)
    w = lin.weight.detach().double()
    assert math.isclose(got["jac_l2_mean"], float(torch.linalg.matrix_norm(w, 2)), rel_tol=1e-9)
    assert math.isclose(got["jac_linf_mean"], float(w.abs().sum(1).max()), rel_tol=1e-9)


def test_vit_projections_are_tracked_and_factorised():
    model = ViTDigits(patch=4, dim=16, depth=2, heads=2, mlp=32)
    assert model(torch.rand(3, 64)).shape == (3, 10)
    low = rc.to_low_rank(model, lambda n, m: 4 if kind_of(n) else None, from_weights=False)
    factorised = sorted(n for n, m in low.named_modules() if isinstance(m, rc.LowRankLinear))
    assert factorised == sorted(f"blocks.{b}.{'attn.' if k in 'qkvo' else ''}{k}" for b in range(2) for k in KINDS)
    names = rc.SpectralState(low, k=1).names
    assert set(factorised) <= set(names) and {"embed", "head"} <= set(names)
    # patches: the 4×4 patch of token 1 is the top-right quarter of the image
    x = torch.zeros(1, 64)
    x.view(8, 8)[:4, 4:] = 1.0
    z = x.reshape(1, 2, 4, 2, 4).permute(0, 1, 3, 2, 4).reshape(1, 4, 16)
    assert z[0, 1].eq(1).all() and z[0, [0, 2, 3]].eq(0).all()


def test_implicit_recipe_with_plugin_trains_and_is_measured():
    d = implicit_compression.Dyn("t", "SGD", optimizer="sgd", lr=0.05, weight_decay=5e-4, epochs=1,
                                 penalty=1e-2, tail=1e-3, tail_k=(4, 4))
    make = implicit_compression.penalties_for(d, 0)
    model = implicit_compression.build(0)
    kinds = [type(t).__name__ for t in make(model)]
    assert kinds == ["SpectralNormPenalty", "TailEnergyPenalty", "TailEnergyPenalty"]
    train, test = rc.digits(seed=0)
    small = torch.utils.data.TensorDataset(*(t[:128] for t in train.tensors))
    tiny = torch.utils.data.TensorDataset(*(t[:48] for t in test.tensors))
    C.train(model, small, epochs=1, optimizer=d.optimizer, lr=d.lr, weight_decay=d.weight_decay, penalties=make)
    row = C.measure(model, small, tiny, 0, pgd_steps=2, uap_epochs=1)
    assert 0 <= row["pgd_linf"] <= row["clean"] <= 1 and row["k2"] > 0 and 0 <= row["prunable"] <= 1
    assert set(row["layers"]) == {"1", "3"} and 0 <= row["uap"] <= 1
    assert implicit_compression.plugin_specs({"t": {"0": row}}, d)[1].tail_k == tuple(
        max(1, v["rank99"]) for v in row["layers"].values())


def test_sweep_terms_share_one_state_and_train():
    job = choose_default.Job("group lasso 0.001", (("S", 1e-2), ("H", 1.0)))
    model = choose_default.build(job.model, 0)
    terms = choose_default.make_terms(job, 0)(model)
    assert [type(t).__name__ for t in terms] == ["GroupLassoPenalty", "SpectralNormPenalty", "HeadSpreadPenalty"]
    assert len({id(t.state) for t in terms}) == 1 and terms[0].names == ["1", "3"]
    low = choose_default.build("rank 8", 0)
    assert all(m.rank == 8 for m in low.modules() if isinstance(m, rc.LowRankLinear))
    assert choose_default.make_terms(choose_default.Job("rank 8", ()), 0)(low) == []
    train, _ = rc.digits(seed=0)
    small = torch.utils.data.TensorDataset(*(t[:128] for t in train.tensors))
    before = model[1].weight.detach().clone()
    C.train(model, small, epochs=1, penalties=choose_default.make_terms(job, 0))
    assert not torch.equal(before, model[1].weight)


def test_vit_penalised_low_rank_model_trains_and_is_measured():
    spec = vit_findings.Spec("rank 4 + σ₁²", 4, 1e-2)
    model = vit_findings.build(spec, 0)
    train, test = rc.digits(seed=0)
    small = torch.utils.data.TensorDataset(*(t[:128] for t in train.tensors))
    tiny = torch.utils.data.TensorDataset(*(t[:32] for t in test.tensors))
    C.train(model, small, epochs=1, penalties=vit_findings.penalties_for(spec, 0), **vit_findings.OPT)
    row = C.measure(model, small, tiny, 0, pgd_steps=2, parts=("attacks", "spectra", "jacobian"),
                    layers=C.weight_layers(model))
    assert row["jac_l2_mean"] > 0 and 0 <= row["pgd_l2"] <= row["clean"] <= 1
    assert all(v["rank99"] <= 4 for n, v in row["layers"].items() if kind_of(n))
