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


def test_dense_copy_keeps_the_function():
    model = rc.to_low_rank(rc.MLP(8, (16, 16), 3), 2, from_weights=False)
    dense = C.dense_copy(model)
    assert not any(isinstance(m, rc.LowRankLinear) for m in dense.modules())
    x = torch.rand(4, 8)
    torch.testing.assert_close(dense(x), model(x))


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


def test_each_script_runs_one_tiny_configuration():
    implicit = implicit_compression.run_one(
        implicit_compression.Dyn("t", "SGD", optimizer="sgd", lr=0.05, weight_decay=5e-4, epochs=1,
                                 penalty=1e-2, tail=1e-3, tail_k=(4, 4)), seed=0, quick=True)
    assert 0 <= implicit["pgd_linf"] <= implicit["clean"] <= 1 and implicit["k2"] > 0
    assert set(implicit["layers"]) == {"1", "3"}
    job = choose_default.Job("rank 8", (("S", 1e-2), ("H", 1.0)))
    sweep = choose_default.run_one(job, seed=0, epochs=1, quick=True)
    assert all(v["rank99"] <= 8 for v in sweep["layers"].values())
    vit = vit_findings.run_one(vit_findings.Spec("rank 4 + σ₁²", 4, 1e-2), seed=0, epochs=1, quick=True)
    assert vit["jac_l2_mean"] > 0 and 0 <= vit["pgd_l2"] <= vit["clean"]
    assert all(v["rank99"] <= 4 for n, v in vit["layers"].items() if kind_of(n))
