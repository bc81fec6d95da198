"""The command line on bad files and on a model of the user's own, in fresh processes.

Every fault: exit code 2, exactly one line on stderr naming the file and the
cause, no traceback. The round trip train → report → compress → report runs on
a model class defined here, with data from a factory defined here.
"""

import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch
from torch import nn

from robustcompress.compress import export, load_exported, prune

ROOT = pathlib.Path(__file__).resolve().parents[1]


class TinyNet(nn.Module):
    """A user's own model: two conv layers and a head, not one the package knows."""

    def __init__(self, width: int = 6, classes: int = 3) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(2, width, 3, padding=1), nn.ReLU(),
                                      nn.Conv2d(width, width, 3, padding=1), nn.ReLU())
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(width * 5 * 5, 16), nn.ReLU(), nn.Linear(16, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def tiny_data():
    """A Dataset factory for --data: 48 inputs 2×5×5 in [0, 1], labels from a fixed rule."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(48, 2, 5, 5, generator=g)
    y = (x[:, 0].mean((1, 2)) > x[:, 1].mean((1, 2))).long() + (x[:, 0, 0, 0] > 0.8).long()
    return torch.utils.data.TensorDataset(x, y)


def tiny_mlp():
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))


def _cli(*argv):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    args = [sys.executable, "-m", "robustcompress", *map(str, argv)]
    return subprocess.run(args, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)


def _main(capsys, *argv):
    """The CLI in this process (fast); the subprocess tests above and below cover the real entry point."""
    from robustcompress.cli import main

    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def _trained(seed=0):
    torch.manual_seed(seed)
    model = TinyNet()
    data = tiny_data()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, y = data.tensors
    for _ in range(15):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval()


def test_round_trip_train_report_compress_report_on_a_model_of_ones_own(tmp_path):
    model = _trained()
    ckpt = tmp_path / "tiny.pt"
    torch.save({"model": model.state_dict(), "epoch": 3}, ckpt)  # a training checkpoint, not a bare state dict
    spec = ["--model", "tests.test_faults_cli:TinyNet", "--model-kwargs", '{"width": 6}']

    done = _cli("report", ckpt, *spec, "--data", "tests.test_faults_cli:tiny_data", "--json")
    assert done.returncode == 0, done.stderr
    rows = json.loads(done.stdout)
    assert rows[-1]["input_shape"] == [2, 5, 5]
    assert [r["name"] for r in rows[:-1]] == ["features.0", "features.2", "head.1", "head.3"]

    out = tmp_path / "small.pt"
    done = _cli("compress", ckpt, *spec, "--prune", "0.5", "--data", "tests.test_faults_cli:tiny_data",
                "--finetune-epochs", "1", "--out", out)
    assert done.returncode == 0, done.stderr
    assert "compressed" in done.stdout and "exported" in done.stdout

    small = load_exported(out, TinyNet)
    assert small.features[0].out_channels == 3 and small.head[1].out_features == 8
    info = torch.load(out, weights_only=True)["info"]
    assert info["data"] == "tests.test_faults_cli:tiny_data" and 0 <= info["after"]["clean_acc"] <= 1

    done = _cli("report", out, *spec, "--input-shape", "2,5,5", "--json")
    assert done.returncode == 0, done.stderr
    rows = json.loads(done.stdout)
    assert [r["shape"] for r in rows[:-1]][0] == [3, 2, 3, 3]
    assert rows[-1]["K2"] > 0


def test_compress_without_data_measures_only_size(tmp_path, capsys):
    torch.manual_seed(0)
    ckpt = tmp_path / "mlp.pt"
    torch.save(tiny_mlp().state_dict(), ckpt)
    out = tmp_path / "small.pt"
    code, text, err = _main(capsys, "compress", ckpt, "--model", "tests.test_faults_cli:tiny_mlp", "--prune", "0.5",
                            "--out", out)
    assert code == 0, err
    assert "accuracy not measured" in text and "clean" not in text
    assert load_exported(out, tiny_mlp)[0].out_features == 4


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("faults")
    torch.manual_seed(0)
    sd = tiny_mlp().state_dict()
    good = d / "good.pt"
    torch.save(sd, good)
    raw = good.read_bytes()
    (d / "truncated.pt").write_bytes(raw[: len(raw) // 2])
    (d / "notes.txt").write_text("epoch 3: loss 0.12\n")
    torch.save(tiny_mlp(), d / "pickled.pt")
    raw_pickled = (d / "pickled.pt").read_bytes()
    (d / "pickled_truncated.pt").write_bytes(raw_pickled[: len(raw_pickled) // 2])
    torch.save(sd, d / "legacy.pt", _use_new_zipfile_serialization=False)
    legacy = (d / "legacy.pt").read_bytes()
    (d / "legacy_truncated.pt").write_bytes(legacy[: len(legacy) // 2])
    for name, value in (("nan", float("nan")), ("inf", float("inf"))):
        bad = {k: v.clone() for k, v in sd.items()}
        bad["2.weight"][1, 3] = value
        torch.save(bad, d / f"{name}.pt")
    torch.save([1, 2, 3], d / "list.pt")
    export(prune(tiny_mlp(), 0.5), d / "exported.pt")
    (d / "empty.pt").write_bytes(b"")
    return d


MLP_SPEC = ("--model", "tests.test_faults_cli:tiny_mlp")

FAULTS = [
    # (file, extra args, fragments of the one-line message)
    ("truncated.pt", (), ("truncated",)),
    ("truncated.pt", ("--trust-checkpoint",), ("truncated",)),
    ("pickled_truncated.pt", ("--trust-checkpoint",), ("truncated",)),
    ("legacy_truncated.pt", (), ("truncated",)),
    ("legacy_truncated.pt", ("--trust-checkpoint",), ("truncated",)),
    ("notes.txt", (), ("text file",)),
    ("notes.txt", ("--trust-checkpoint",), ("text file",)),
    ("pickled.pt", (), ("refused", "--trust-checkpoint")),
    ("nan.pt", (), ("'2.weight'", "NaN")),
    ("inf.pt", (), ("'2.weight'", "Inf")),
    ("list.pt", (), ("not a state dict",)),
    ("empty.pt", (), ("empty",)),
    ("missing.pt", (), ("does not exist",)),
    ("good.pt", ("--model-kwargs", "[1]"), ("--model-kwargs", "JSON object")),
    ("good.pt", ("--model-kwargs", "{bad"), ("--model-kwargs",)),
    ("exported.pt", ("--model", "tests.test_faults_cli:TinyNet"), ("export", "lacks")),
]


@pytest.mark.parametrize("command", ["report", "compress"])
@pytest.mark.parametrize("name, extra, fragments", FAULTS, ids=[f"{f}{'+' + '_'.join(e) if e else ''}"
                                                                 for f, e, _ in FAULTS])
def test_cli_fault_is_one_line_naming_the_file(files, command, name, extra, fragments, tmp_path, capsys):
    path = files / name
    args = [command, path, *MLP_SPEC, *extra]
    if command == "compress":
        args += ["--prune", "0.5", "--out", tmp_path / "out.pt"]
    code, _, err = _main(capsys, *args)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err and lines[0].startswith("error: ")
    assert str(path) in lines[0] or name in lines[0]
    for frag in fragments:
        assert frag in lines[0], lines[0]
    if "truncated" in fragments:  # a truncated file is not blamed on its format
        assert "--trust-checkpoint" not in lines[0] and "not a plain state dict" not in lines[0]
    assert not (tmp_path / "out.pt").exists()


@pytest.mark.parametrize("name, extra", [("truncated.pt", ("--trust-checkpoint",)), ("notes.txt", ())])
def test_fault_in_a_fresh_process_is_one_line(files, name, extra):
    done = _cli("compress", files / name, *MLP_SPEC, *extra, "--prune", "0.5", "--out", files / "never.pt")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and name in done.stderr


def test_debug_lets_the_exception_through(files):
    from robustcompress.cli import main

    with pytest.raises(ValueError, match="text file"):
        main(["report", str(files / "notes.txt"), *MLP_SPEC, "--debug"])


def test_report_reads_every_checkpoint_layout(files, tmp_path, capsys):
    sd = torch.load(files / "good.pt", weights_only=True)
    layouts = {"bare": sd, "model": {"model": sd, "step": 5}, "state_dict": {"state_dict": sd}}
    expected = None
    for key, obj in layouts.items():
        torch.save(obj, tmp_path / f"{key}.pt")
        code, out, err = _main(capsys, "report", tmp_path / f"{key}.pt", *MLP_SPEC, "--json")
        assert code == 0, (key, err)
        rows = json.loads(out)
        expected = expected or rows
        assert rows == expected, key
    code, out, err = _main(capsys, "report", files / "exported.pt", *MLP_SPEC, "--json")
    assert code == 0, err
    assert json.loads(out)[0]["shape"] == [4, 4]


def test_exported_corrupted_bytes_are_detected(tmp_path, capsys):
    torch.manual_seed(0)
    model = tiny_mlp()
    path = tmp_path / "small.pt"
    export(model, path)
    raw = bytearray(path.read_bytes())
    # Flip bytes inside the stored weight data (found by its float32 bytes), leaving the archive readable.
    needle = model[0].weight.detach().numpy().tobytes()[:16]
    at = bytes(raw).index(needle)
    raw[at + 4: at + 8] = b"\x00\x00\x80\x7f"
    bad = tmp_path / "bad.pt"
    bad.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=r"bad\.pt.*corrupted.*checksum"):
        load_exported(bad, tiny_mlp)
    code, _, err = _main(capsys, "report", bad, *MLP_SPEC)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "bad.pt" in err and ("corrupted" in err or "Inf" in err)


def test_export_without_checksum_loads_with_a_warning(tmp_path):
    torch.manual_seed(0)
    model = tiny_mlp()
    path = tmp_path / "old.pt"
    export(model, path)
    payload = torch.load(path, weights_only=True)
    payload["format"] = "robustcompress.compress/1"
    del payload["sha256"]
    torch.save(payload, path)
    with pytest.warns(UserWarning, match=r"old\.pt.*no checksum|old\.pt.*before exports carried a checksum"):
        loaded = load_exported(path, tiny_mlp)
    x = torch.rand(5, 4)
    assert torch.equal(loaded(x), model(x))


def test_load_exported_on_a_text_file_names_the_cause(files):
    with pytest.raises(ValueError, match=r"notes\.txt' is a text file"):
        load_exported(files / "notes.txt", tiny_mlp)
    with pytest.raises(ValueError, match=r"truncated"):
        load_exported(files / "truncated.pt", tiny_mlp)
    with pytest.raises(ValueError, match=r"not a robustcompress export"):
        load_exported(files / "good.pt", tiny_mlp)


def test_json_output_survives_non_finite_metrics(tmp_path, capsys):
    model = tiny_mlp()
    with torch.no_grad():
        model[0].weight.zero_()
    torch.save(model.state_dict(), tmp_path / "zero.pt")
    code, out, err = _main(capsys, "report", tmp_path / "zero.pt", *MLP_SPEC, "--json")
    assert code == 0, err
    rows = json.loads(out)
    assert rows[0]["name"] == "0" and rows[0]["frobenius"] == 0
