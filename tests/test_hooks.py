"""Trackers: every-N recording, statistics against references, sinks, removal, NaN flags."""

import csv
import json
import math

import pytest
import torch
from torch import nn

from robustcompress.hooks import track
from robustcompress.spectral import SpectralState


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 3))


def test_records_every_n_training_steps_only():
    model = mlp()
    records = []
    t = track(model, every=3, sink=records)
    for _ in range(7):
        model(torch.randn(16, 6))
    model.eval()
    model(torch.randn(16, 6))  # eval passes are neither counted nor recorded
    assert sorted({r["step"] for r in records}) == [0, 3, 6] and t.steps == 7
    assert {r["layer"] for r in records} == {"0", "2"}
    t.remove()


def test_activation_statistics_match_references():
    model = mlp()
    records = []
    x = torch.randn(32, 6)
    with track(model, every=1, sink=records, layers=["0"]):
        model(x)
    a = model[0](x).detach().double()
    s = torch.linalg.svdvals(a)
    p = s / s.sum()
    got = {r["metric"]: r["value"] for r in records if r["layer"] == "0"}
    assert got["effective_rank"] == pytest.approx(float(torch.exp(-(p * p.log()).sum())), rel=1e-4)
    assert got["stable_rank"] == pytest.approx(float((s ** 2).sum() / s[0] ** 2), rel=1e-4)
    assert got["active_fraction"] == pytest.approx(float((a > 0).any(0).double().mean()))
    e = (a ** 2).sum(0)
    assert got["top_neuron_share"] == pytest.approx(float(e.max() / e.sum()), rel=1e-5)
    sig = float(torch.linalg.svdvals(model[0].weight.detach().double())[0])
    assert got["sigma_1"] == pytest.approx(sig, rel=1e-2) and got["sigma_1"] <= sig * (1 + 1e-6)
    assert got["weight_stable_rank"] == pytest.approx(
        float(model[0].weight.detach().double().square().sum()) / sig ** 2, rel=1e-2)
    # The logged residual interval holds a singular value of the weight (0 counts: the weight is not square).
    all_s = torch.linalg.svdvals(model[0].weight.detach().double()).tolist() + [0.0]
    assert any(got["sigma_1_interval_low"] - 1e-6 <= v <= got["sigma_1_interval_high"] + 1e-6 for v in all_s)
    assert got["sigma_1_interval_low"] <= got["sigma_1_interval_high"]


def test_conv_outputs_use_channels_as_units():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 16, 2))
    records = []
    with track(model, every=1, sink=records, layers=nn.Conv2d):
        model(torch.randn(2, 1, 6, 6))
    got = {r["metric"]: r["value"] for r in records if r["layer"] == "0"}
    assert 1 <= got["effective_rank"] <= 4 and got["active_fraction"] in (0.25, 0.5, 0.75, 1.0)


def test_weight_metrics_come_from_the_shared_state():
    model = mlp()
    state = SpectralState(model)
    records = []
    with track(model, every=1, sink=records, state=state, activations=False):
        model(torch.randn(4, 6))
    sig = {r["layer"]: r["value"] for r in records if r["metric"] == "sigma_1"}
    assert sig == {n: pytest.approx(float(state.sigmas(n)[0])) for n in state.names}
    assert int(state.steps) == 0  # a shared state is only read


def test_sinks(tmp_path):
    model = mlp()
    calls, scalars = [], []

    class Writer:
        def add_scalar(self, tag, value, step):
            scalars.append((tag, value, step))

    paths = [tmp_path / "s.csv", tmp_path / "s.jsonl"]
    trackers = [track(model, every=2, sink=calls.append), track(model, every=2, sink=Writer())]
    trackers += [track(model, every=2, sink=p) for p in paths]
    for _ in range(3):
        model(torch.randn(8, 6))
    for t in trackers:
        t.remove()
    n = len(calls)
    assert n > 0 and len(scalars) == n and {s[2] for s in scalars} == {0, 2}
    assert scalars[0][0] == f"{calls[0]['layer']}/{calls[0]['metric']}"
    rows = list(csv.DictReader(open(paths[0])))
    assert len(rows) == n and set(rows[0]) == {"step", "layer", "metric", "value"}
    lines = [json.loads(line) for line in open(paths[1])]
    assert len(lines) == n and lines[0] == calls[0]


def test_remove_takes_every_hook_off():
    model = mlp()
    t = track(model, every=1)
    assert model._forward_pre_hooks and model[0]._forward_hooks
    t.remove()
    assert not model._forward_pre_hooks and not model._forward_hooks
    assert not model[0]._forward_hooks and not model[2]._forward_hooks
    model(torch.randn(2, 6))
    assert t.records == []


def test_nan_activation_is_raised_in_the_forward_that_meets_it_naming_the_layer():
    model = mlp()
    t = track(model, every=3, weights=False, check_every=5)  # check_every defers only on CUDA
    model(torch.randn(4, 6))
    x = torch.randn(4, 6)
    x[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="layer '0'.*forward pass 1"):
        model(x)  # an off-step: still raised in this call
    model(torch.randn(4, 6))  # the flag was cleared: the next clean step passes
    with pytest.raises(ValueError, match="check_every"):
        track(model, check_every=0)
    t.remove()


def test_nan_weight_is_named():
    model = mlp()
    t = track(model, every=1, weights=False, check_finite=False)
    with torch.no_grad():
        model[2].weight[0, 0] = math.inf
    with pytest.raises(FloatingPointError, match="layer '2'"):
        model(torch.randn(4, 6))
    t.remove()


def test_bad_arguments():
    model = mlp()
    with pytest.raises(ValueError, match="every"):
        track(model, every=0)
    with pytest.raises(ValueError, match=".csv or .jsonl"):
        track(model, sink="stats.txt")
    with pytest.raises(TypeError, match="sink"):
        track(model, sink=3)
    with pytest.raises(ValueError, match="different model"):
        track(model, state=SpectralState(mlp()))
    with pytest.raises(ValueError, match="Unknown layer"):
        track(model, layers=["9"])
    assert not model._forward_pre_hooks  # failed calls registered nothing


def test_linear_on_sequences_counts_features_on_the_last_axis():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 3))
    rows = []
    handle = track(model, every=1, sink=rows)
    model.train()
    model(torch.randn(4, 7, 5))
    handle.remove()
    eff = [r["value"] for r in rows if r["metric"] == "effective_rank" and r["layer"] == "0"]
    assert eff and all(v <= 3 + 1e-6 for v in eff)  # at most the layer's 3 units


# ---------------------------------------------------------------------- checkpoints
_RESUME_SCRIPT = r"""
import sys
import torch
import torch.nn.functional as F
from torch import nn
from robustcompress.hooks import track
from robustcompress.optim import wrap
from robustcompress.penalties import default_penalties

torch.set_num_threads(1)


def run(mode, jsonl, ckpt, start, stop):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 12), nn.ReLU(), nn.Linear(12, 3))
    opt = wrap(torch.optim.AdamW(model.parameters(), lr=0.05), model, default_penalties(model, strength=0.1))
    tracker = track(model, every=3, sink=jsonl)
    if mode == "resume":
        saved = torch.load(ckpt, weights_only=True)
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optimizer"])
        tracker.load_state_dict(saved["tracker"])
    for i in range(start, stop):
        g = torch.Generator().manual_seed(1000 + i)
        x, y = torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    tracker.remove()
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "tracker": tracker.state_dict()}, ckpt)


args = sys.argv[1:]
for j in range(0, len(args), 5):  # independent runs, one after another: (mode, jsonl, ckpt, start, stop)
    run(args[j], args[j + 1], args[j + 2], int(args[j + 3]), int(args[j + 4]))
"""


@pytest.mark.slow
def test_fresh_process_resume_continues_the_tracker_jsonl(tmp_path):
    """4 steps, a checkpoint, a new process for steps 4..9: the JSONL equals one uninterrupted run's."""
    import os
    import pathlib
    import subprocess
    import sys

    script = tmp_path / "run.py"
    script.write_text(_RESUME_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(pathlib.Path(__file__).resolve().parents[1])}

    def run(*args):
        subprocess.run([sys.executable, str(script), *map(str, args)], check=True, env=env, timeout=120)

    run("fresh", tmp_path / "straight.jsonl", tmp_path / "straight.pt", 0, 10,
        "fresh", tmp_path / "split.jsonl", tmp_path / "split.pt", 0, 4)
    run("resume", tmp_path / "split.jsonl", tmp_path / "split.pt", 4, 10)
    straight = (tmp_path / "straight.jsonl").read_text().splitlines()
    split = (tmp_path / "split.jsonl").read_text().splitlines()
    assert sorted({json.loads(r)["step"] for r in split}) == [0, 3, 6, 9]
    assert split == straight
    a, b = torch.load(tmp_path / "straight.pt"), torch.load(tmp_path / "split.pt")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert a["tracker"]["steps"] == b["tracker"]["steps"] == 10
    assert all(torch.equal(a["tracker"]["state"][k], b["tracker"]["state"][k]) for k in a["tracker"]["state"])


def test_tracker_state_dict_round_trip_and_mismatches():
    model = mlp()
    t = track(model, every=2)
    for _ in range(3):
        model(torch.randn(8, 6))
    sd = t.state_dict()
    t.remove()
    u = track(model, every=2)
    u.load_state_dict(sd)
    assert u.steps == 3
    model(torch.randn(8, 6))  # step 3: not recorded
    model(torch.randn(8, 6))  # step 4: recorded
    assert sorted({r["step"] for r in u.records}) == [4]
    u.remove()
    with pytest.raises(ValueError, match="every=2"):
        track(model, every=5).load_state_dict(sd)
    with pytest.raises(ValueError, match="layers"):
        track(model, every=2, layers=["0"]).load_state_dict(sd)
    with pytest.raises(ValueError, match="owns"):
        track(model, every=2, state=SpectralState(model)).load_state_dict(sd)
    with pytest.raises(ValueError, match="keys"):
        track(model, every=2).load_state_dict({"steps": 3})


def test_large_finite_half_outputs_are_not_reported_as_nan():
    layer = nn.Linear(64, 1024).half()
    with torch.no_grad():
        layer.weight.fill_(0.01)
        layer.bias.fill_(0.5)
    model = nn.Sequential(layer)
    t = track(model, every=100, weights=False)
    out = model(torch.ones(128, 64, dtype=torch.half))  # element sum ≈ 1.5e5 > fp16's 65504
    assert torch.isfinite(out).all()
    t.remove()
