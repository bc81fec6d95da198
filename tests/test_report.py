"""The report table, its JSON, and the command line."""

import argparse
import json
import math

import pytest
import torch
from torch import nn

from robustcompress.models import MLP, SmallCNN, resnet18
from robustcompress.cli.report import add_arguments, run_cli
from robustcompress.reporting import format_report, report


def test_report_on_demo_mlp():
    torch.manual_seed(0)
    model = MLP()  # the demo MLP 64-256-256-10
    rows = report(model, k=8)
    layers, net = rows[:-1], rows[-1]
    assert [r["name"] for r in layers] == ["1", "3", "5"]
    for r, lin in zip(layers, [model[1], model[3], model[5]]):
        s = torch.linalg.svdvals(lin.weight.detach().double())
        assert r["shape"] == list(lin.weight.shape)
        assert r["sigma_estimate"] <= r["sigma_bound"] <= float(s[0]) * (1 + 1e-5)
        assert r["frobenius"] == pytest.approx(float(s.norm()), rel=1e-9)
        assert r["stable_rank"] == pytest.approx(float((s**2).sum() / s[0] ** 2), rel=1e-9)
        assert r["source"] == "exact"
    assert net["K2"] == pytest.approx(math.prod(r["sigma_bound"] for r in layers), rel=1e-9)
    assert net["input_shape"] == [64]
    assert "units" in net["units"] and "loose" in net["note"]
    text = format_report(rows)
    assert "K_2" in text and "K_∞" in text and "rank99" in text and "64" in text
    json.dumps(rows, allow_nan=False)


def test_report_on_resnet18_runs_and_marks_estimates():
    model = resnet18().eval()
    rows = report(model, input_shape=(3, 32, 32), k=8)
    layers = rows[:-1]
    assert len(layers) == 21  # stem + 16 block convs + 3 projections + head
    for r in layers:
        assert r["sigma_estimate"] <= r["sigma_bound"] * (1 + 1e-5), r["name"]
    big = [r for r in layers if r["name"] == "layer4.1.conv2"][0]
    assert big["source"] == "estimate" and big["rank_99"] == "> 8" and big["effective_rank"] is None
    assert rows[-1]["log_split"] is None  # residual adds: no additive split
    assert rows[-1]["K2"] > 0 and rows[-1]["Kinf"] > rows[-1]["K2"]
    json.dumps(rows, allow_nan=False)


def _run(argv, capsys):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    code = run_cli(parser.parse_args(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_round_trips_a_state_dict(tmp_path, capsys):
    torch.manual_seed(0)
    model = MLP()
    path = tmp_path / "mlp.pt"
    torch.save(model.state_dict(), path)
    code, out, err = _run([str(path), "--model", "robustcompress.models:MLP", "--json"], capsys)
    assert code == 0, err
    rows = json.loads(out)
    assert rows == json.loads(json.dumps(report(model, k=8)))
    code, out, _ = _run([str(path), "--model", "robustcompress.models:MLP"], capsys)
    assert code == 0 and "K_2" in out


def test_cli_through_the_package_entry_point(tmp_path, capsys):
    from robustcompress.cli import main

    model = SmallCNN(in_channels=1, input_size=8, width=4)
    path = tmp_path / "cnn.pt"
    torch.save({"state_dict": model.state_dict()}, path)
    code = main(["report", str(path), "--model", "tests.test_report:_small_cnn", "--input-shape", "1,8,8", "--json"])
    assert code == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows[-1]["input_shape"] == [1, 8, 8]


def _small_cnn():
    return SmallCNN(in_channels=1, input_size=8, width=4)


def test_cli_bad_input(tmp_path, capsys):
    bad = tmp_path / "list.pt"
    torch.save([1, 2, 3], bad)
    code, _, err = _run([str(bad), "--model", "robustcompress.models:MLP"], capsys)
    assert code == 2 and "not a state dict" in err

    pickled = tmp_path / "full.pt"
    torch.save(MLP(), pickled)
    code, _, err = _run([str(pickled), "--model", "robustcompress.models:MLP"], capsys)
    assert code == 2 and "--trust-checkpoint" in err
    code, out, err = _run([str(pickled), "--model", "robustcompress.models:MLP", "--trust-checkpoint", "--json"], capsys)
    assert code == 0, err
    assert json.loads(out)[-1]["input_shape"] == [64]

    cnn = tmp_path / "cnn.pt"
    torch.save(_small_cnn().state_dict(), cnn)
    code, _, err = _run([str(cnn), "--model", "tests.test_report:_small_cnn"], capsys)
    assert code == 2 and "input_shape is required" in err
    code, _, err = _run([str(cnn), "--model", "tests.test_report:_small_cnn", "--input-shape", "1,x"], capsys)
    assert code == 2 and "input-shape" in err
    code, _, err = _run([str(cnn), "--model", "robustcompress.models:MLP"], capsys)
    assert code == 2 and "does not fit" in err
    code, _, err = _run([str(cnn), "--model", "robustcompress.models"], capsys)
    assert code == 2 and "MODULE:FACTORY" in err
    code, _, err = _run([str(tmp_path / "missing.pt"), "--model", "robustcompress.models:MLP"], capsys)
    assert code == 2 and "does not exist" in err


def test_report_bad_input():
    with pytest.raises(ValueError, match="no eligible layer"):
        report(nn.Sequential(nn.ReLU()), input_shape=(3,))
    with pytest.raises(ValueError, match="no eligible layer"):
        report(nn.Sequential(nn.ReLU()))
    # A node without a global Lipschitz rule: the table still comes, and one line names the node.
    rows = report(nn.Sequential(nn.Linear(3, 3), nn.Softmax(dim=1)))
    assert [r["name"] for r in rows[:-1]] == ["0"]
    assert rows[-1]["K2"] is None and rows[-1]["stopped_at"] == "1"
    assert rows[-1]["note"].startswith("Not certified: No Lipschitz rule for module '1' (Softmax)")
    with pytest.raises(ValueError, match="input_shape is required"):
        report(_small_cnn())
    with pytest.raises(ValueError, match="rows"):
        format_report([])
