"""The demo (``python -m robustcompress.demo``): the ``--quick`` run end to end, and its parts."""

import contextlib
import io
import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from robustcompress import demo
from robustcompress.demo import VARIANTS, DemoConfig
from robustcompress.layers import to_dense


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """Two ``--quick`` runs with the same seed into different folders (in-process, via main).

    The second saves its models and runs with stderr redirected to a buffer (not a terminal) and no
    ``--no-progress``: its captured stderr is kept to check that no progress bar was drawn.
    """
    outs = [tmp_path_factory.mktemp(f"demo{i}") for i in range(2)]
    codes = [demo.main(["--quick", "--no-progress", "--seed", "0", "--out", str(outs[0])])]
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        codes.append(demo.main(["--quick", "--seed", "0", "--out", str(outs[1]),
                                "--save-models", str(outs[1] / "models")]))
    (outs[1] / "stderr.txt").write_text(err.getvalue(), encoding="utf-8")
    return codes, outs


def _rows(out):
    return json.loads((out / "results.json").read_text(encoding="utf-8"))["rows"]


def test_quick_run_exits_cleanly_and_writes_everything(quick_run, capsys):
    codes, outs = quick_run
    assert codes == [0, 0]
    for out in outs:
        for name in ("table.txt", "results.json", "spectra.png", "robust_vs_compressibility.png"):
            path = out / name
            assert path.is_file() and path.stat().st_size > 0, name
        # Real PNGs, not empty placeholders.
        for name in ("spectra.png", "robust_vs_compressibility.png"):
            assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_redirected_run_draws_no_progress_bars(quick_run):
    codes, outs = quick_run
    err = (outs[1] / "stderr.txt").read_text(encoding="utf-8")
    assert codes[1] == 0 and "\r" not in err and "it/s" not in err


def test_saved_models_load_with_report_and_compress_layouts(quick_run):
    from robustcompress.compress import load_exported
    from robustcompress.data import digits
    from robustcompress.evaluate import accuracy
    from robustcompress.models import MLP

    _, outs = quick_run
    rows = _rows(outs[1])
    _, test = digits(seed=0)
    for variant in VARIANTS:
        path = outs[1] / "models" / f"{variant}.pt"
        info = torch.load(path, weights_only=True)["info"]
        model = load_exported(path, lambda: MLP(**info["model_kwargs"]))
        assert info["variant"] == variant and info["model"] == "robustcompress.models:MLP"
        assert accuracy(model, test.tensors) == pytest.approx(rows[variant]["clean"], abs=1e-12), variant


def test_quick_table_is_sane(quick_run):
    _, outs = quick_run
    rows = _rows(outs[0])
    table = (outs[0] / "table.txt").read_text(encoding="utf-8")
    assert list(rows) == list(VARIANTS)
    body = table.splitlines()
    for variant in VARIANTS:
        assert sum(line.split("  ")[0].strip() == variant for line in body) == 1, variant
    cfg = DemoConfig.quick()
    for variant, row in rows.items():
        for key in ("clean", "pgd_linf", "pgd_l2", "uap", "prunable"):
            assert 0.0 <= row[key] <= 1.0, (variant, key, row[key])
        # An attack can only lower accuracy; the quick run still learns digits.
        assert row["pgd_linf"] <= row["clean"] + 1e-9 and row["pgd_l2"] <= row["clean"] + 1e-9
        assert row["clean"] > 0.6, (variant, row["clean"])
        assert len(row["rank99"]) == len(cfg.widths)
        assert all(1 <= r <= w for r, w in zip(row["rank99"], cfg.widths))
        if variant.startswith("low-rank"):
            assert all(r <= cfg.rank for r in row["rank99"])
        # The largest σ₁ is the first singular value of some layer's spectrum.
        assert row["sigma1"] == pytest.approx(max(s[0] for s in row["spectra"]))
        assert row["k2"] > 0 and row["radius"] >= 0
        # Soundness across modules: an example certified beyond ε cannot be broken by PGD-L2 at ε.
        assert row["pgd_l2"] >= row["certified_l2"] - 1e-9, variant


def test_same_seed_gives_identical_table(quick_run):
    _, outs = quick_run
    tables = [(o / "table.txt").read_text(encoding="utf-8") for o in outs]
    assert tables[0] == tables[1]
    assert _rows(outs[0]) == _rows(outs[1])


def test_table_states_the_attack_settings(quick_run):
    _, outs = quick_run
    head = (outs[0] / "table.txt").read_text(encoding="utf-8")
    cfg = DemoConfig.quick()
    assert f"PGD-L∞ ε={cfg.eps_linf:g}" in head and f"PGD-L2 ε={cfg.eps_l2:g}" in head
    assert f"{cfg.pgd_steps} steps" in head and f"{cfg.epochs} epochs" in head


def test_build_model_is_seeded_and_leaves_global_rng_alone():
    cfg = DemoConfig(seed=3)
    before = torch.get_rng_state()
    a, b = demo.build_model("dense", cfg), demo.build_model("group-lasso", cfg)
    assert torch.equal(torch.get_rng_state(), before)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
    other = demo.build_model("dense", DemoConfig(seed=4))
    assert not torch.equal(a[1].weight, other[1].weight)
    low = demo.build_model("low-rank", cfg)
    assert [type(m).__name__ for m in low if hasattr(m, "weight")] == ["LowRankLinear", "LowRankLinear", "Linear"]
    assert low[1].rank == cfg.rank


def test_make_penalties_share_one_state_and_match_their_formulas():
    cfg = DemoConfig(group_lasso=0.5, penalty=0.25)
    model = demo.build_model("dense", cfg)
    assert demo.make_penalties("dense", model, cfg) == []
    terms = demo.make_penalties("group-lasso + penalty", model, cfg)
    assert len(terms) == 2 and terms[0].state is terms[1].state
    hidden = [model[1].weight, model[3].weight]
    with torch.no_grad():
        gl = sum(w.norm(dim=1).sum() for w in hidden)
    assert float(terms[0]().detach()) == pytest.approx(0.5 * float(gl), rel=1e-5)
    sigma_sq = sum(torch.linalg.matrix_norm(w.detach().double(), 2) ** 2 for w in hidden)
    # Warm power iteration gives a lower bound of σ₁, tight once the shared state has iterated
    # (as it does once per training step inside wrap).
    assert float(terms[1]().detach()) <= 0.25 * float(sigma_sq) * (1 + 1e-5)
    terms[0].state.step(200)
    assert float(terms[1]().detach()) == pytest.approx(0.25 * float(sigma_sq), rel=2e-2)


def test_to_dense_is_the_same_function():
    cfg = DemoConfig(rank=4)
    low = demo.build_model("low-rank", cfg)
    dense = to_dense(low)
    assert all(isinstance(m, nn.Linear) for m in dense if hasattr(m, "weight"))
    x = torch.rand(7, 64)
    torch.testing.assert_close(dense(x), low(x), rtol=1e-5, atol=1e-5)


def test_prunable_fraction_finds_dead_neurons(trained_digits_mlp, digits_data):
    model = to_dense(trained_digits_mlp)
    _, test = digits_data
    x, y = test.tensors
    base = float((model(x).argmax(1) == y).double().mean())
    # Silence the 32 lightest neurons of each hidden layer (zero row, bias −1: ReLU outputs 0 on
    # every input). They are now the lightest rows, and removing them cannot change the output.
    with torch.no_grad():
        for layer in (model[1], model[3]):
            dead = layer.weight.norm(dim=1).argsort()[:32]
            layer.weight[dead] = 0
            layer.bias[dead] = -1.0
    assert float((model(x).argmax(1) == y).double().mean()) < base + 1e-9
    share = demo.prunable_fraction(model, (x, y), max_loss=0.0, resolution=0.05)
    assert 0.5 - 1e-9 <= share < 1.0
    # Allowing a large loss can only allow more pruning.
    assert demo.prunable_fraction(model, (x, y), max_loss=0.5, resolution=0.05) >= share
    # A model with no slack: a 0-point budget on a model whose every neuron matters still returns a share in [0, 1].
    assert 0.0 <= demo.prunable_fraction(trained_digits_mlp, (x, y), max_loss=0.0, resolution=0.25) <= 1.0


def test_format_table_lists_every_row_in_order():
    row = dict(clean=0.9, pgd_linf=0.4, pgd_l2=0.5, uap=0.1, prunable=0.3, rank99=[8, 7],
               sigma1=2.5, k2=40.0, radius=0.1)
    rows = {v: dict(row) for v in reversed(VARIANTS)}
    text = demo.format_table(rows, DemoConfig(), 1437, 360)
    lines = [line for line in text.splitlines() if line.split("  ")[0].strip() in VARIANTS]
    assert [line.split("  ")[0].strip() for line in lines] == list(reversed(VARIANTS))
    assert "8/7" in text and text == demo.format_table(rows, DemoConfig(), 1437, 360)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--epochs", "0"], "epochs"),
        (["--rank", "-1"], "rank"),
        (["--device", "nonsense"], "device"),
    ],
)
def test_bad_flags_fail_with_a_clear_message(argv, message, capsys, tmp_path):
    assert demo.main(argv + ["--out", str(tmp_path), "--no-progress"]) == 2
    assert message in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_cli_subcommand_dispatches_to_the_demo():
    from robustcompress.cli import build_parser

    argv = ["demo", "--quick", "--seed", "2"]
    args = build_parser(argv).parse_args(argv)
    assert args._run is demo.run_cli and args.quick and args.seed == 2


def test_bad_arguments_to_the_functions():
    with pytest.raises(ValueError, match="variant"):
        demo.build_model("sparse", DemoConfig())
    with pytest.raises(ValueError, match="widths"):
        DemoConfig(widths=(256, 0))
    with pytest.raises(TypeError, match="cfg"):
        demo.run_demo({"epochs": 1}, "out")


@settings(max_examples=10)
@given(rank=st.integers(1, 12), seed=st.integers(0, 2**16))
def test_to_dense_matches_every_rank_and_seed(rank, seed):
    low = demo.build_model("low-rank", DemoConfig(rank=rank, seed=seed, widths=(16, 12)))
    dense = to_dense(low)
    x = torch.rand(5, 64, generator=torch.Generator().manual_seed(seed))
    torch.testing.assert_close(dense(x), low(x), rtol=1e-5, atol=1e-5)
    # The copy is independent of the original.
    with torch.no_grad():
        dense[1].weight.zero_()
    assert low[1].weight_a.abs().sum() > 0
