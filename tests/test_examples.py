"""Every example runs end to end in a tiny configuration, as a user would run it (a subprocess).

Also checked: the frontier sweep resumes (finished points are skipped, new
ones trained, other settings refused), a CIFAR run resumed from its checkpoint
ends bit for bit where an uninterrupted run ends, and a missing CIFAR folder
fails with a message naming the expected layout.
"""

from __future__ import annotations

import json
import os
import pathlib
import runpy
import subprocess
import sys

import pytest
import torch

from robustcompress.data import write_fake_cifar10

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
SCRIPTS = ["train_with_hooks.py", "sweep_frontier.py", "cifar_resnet.py", "cifar_vgg.py", "transfer_learning.py"]


def run_python(*args: object, check: bool = True) -> subprocess.CompletedProcess:
    """``python *args`` with the project importable, one thread and no GPU; fails on a non-zero exit."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, *map(str, args)], env=env, capture_output=True, text=True, timeout=600)
    if check:
        assert proc.returncode == 0, f"python {' '.join(map(str, args))} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


def run_example(script: str, *flags: object, check: bool = True) -> subprocess.CompletedProcess:
    return run_python(EXAMPLES / script, *flags, check=check)


def json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


@pytest.fixture(scope="module")
def fake_cifar(tmp_path_factory) -> pathlib.Path:
    root = tmp_path_factory.mktemp("cifar")
    write_fake_cifar10(root, n_per_batch=4, seed=0)  # 20 train, 4 test images
    return root


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_script_has_help_and_the_common_flags(script, monkeypatch, capsys):
    # In-process (argparse exits before any work), so this costs no interpreter start.
    monkeypatch.setattr(sys, "argv", [script, "--help"])
    monkeypatch.syspath_prepend(str(EXAMPLES))
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(EXAMPLES / script), run_name="__main__")
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--device", "--seed", "--out", "--limit", "--epochs"):
        assert flag in text, f"{script} --help lacks {flag}"


def test_train_with_hooks_logs_compressibility(tmp_path):
    out = run_example("train_with_hooks.py", "--epochs", 2, "--limit", 64, "--every", 1, "--out", tmp_path).stdout
    assert "robust accuracy" in out
    records = [json.loads(line) for line in (tmp_path / "track.jsonl").read_text().splitlines()]
    # 64 images, batches of 64, 2 epochs: training forward passes 0 and 1, both tracked.
    assert sorted({r["step"] for r in records}) == [0, 1]
    assert {"sigma_1", "weight_stable_rank", "effective_rank"} <= {r["metric"] for r in records}
    assert all(isinstance(r["value"], float) for r in records)


def test_sweep_frontier_resumes_and_refuses_other_settings(tmp_path):
    tiny = ["--epochs", 1, "--limit", 64, "--width", 16, "--attack-steps", 2, "--out", tmp_path,
            "--lasso", "1e-3", "--nuclear", "1e-3"]
    first = run_example("sweep_frontier.py", *tiny, "--ranks", 4).stdout
    points = json.loads((tmp_path / "results.json").read_text())["points"]
    assert len(points) == 6 == len(json_lines(first))
    assert {(p["method"], p["guard"]) for p in points} == {
        (m, g) for m in ("group-lasso", "nuclear", "low-rank") for g in (False, True)}
    for p in points:
        assert 0 <= p["robust"] <= 1 and 0 <= p["clean"] <= 1 and 0 < p["kept"] <= 1 and p["k2"] > 0
    rank4 = next(p for p in points if p["key"] == "low-rank:4:plain")
    # Rank ≤ 4 per hidden layer (64→16, 16→16): at most 4·(64+16) + 4·(16+16) of the 64·16 + 16·16 weights.
    assert rank4["kept"] <= (4 * 80 + 4 * 32) / (64 * 16 + 16 * 16) + 1e-4
    assert (tmp_path / "frontier.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len((tmp_path / "results.csv").read_text().splitlines()) == 1 + 6

    second = run_example("sweep_frontier.py", *tiny, "--ranks", 4, 2).stdout
    assert second.count("skip ") == 6
    new = json_lines(second)
    assert [p["key"] for p in new] == ["low-rank:2:plain", "low-rank:2:guard"]
    saved = json.loads((tmp_path / "results.json").read_text())["points"]
    assert saved[:6] == points and len(saved) == 8

    refused = run_example("sweep_frontier.py", *tiny, "--ranks", 4, "--seed", 1, check=False)
    assert refused.returncode != 0 and "other settings" in refused.stderr
    assert json.loads((tmp_path / "results.json").read_text())["points"] == saved


def test_transfer_learning_reports_every_variant(tmp_path):
    run_example("transfer_learning.py", "--epochs", 2, "--finetune-epochs", 1, "--limit", 200, "--width", 32,
                "--attack-steps", 2, "--out", tmp_path)
    results = json.loads((tmp_path / "transfer.json").read_text())["results"]
    assert len(results) == 4 and any(name.startswith("dense") for name in results)
    for r in results.values():
        assert 0 <= r["robust"] <= r["clean"] <= 1


def test_cifar_resnet_tiny_run_with_penalty_and_adversarial_training(tmp_path, fake_cifar):
    out = run_example("cifar_resnet.py", "--data", fake_cifar, "--out", tmp_path, "--epochs", 1, "--limit", 8,
                      "--batch-size", 8, "--penalty", "spectral", "--adv-ratio", 0.5, "--adv-steps", 1,
                      "--robust-n", 4, "--eval-steps", 1).stdout
    assert "resnet18: 11.17M parameters" in out
    final = json.loads((tmp_path / "final.json").read_text())
    assert final["n"] == 4 and 0 <= final["robust_acc"] <= final["clean_acc"] <= 1
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == 1 and ckpt["arch"] == "resnet18" and len(ckpt["history"]) == 1
    # The wrapper's state (the shared SpectralState) travels in the optimizer's state_dict.
    assert ckpt["optimizer"] != {} and ckpt["penalty"] == "spectral"


def test_cifar_vgg_resume_continues_from_the_saved_epoch(tmp_path, fake_cifar):
    tiny = ["--data", fake_cifar, "--epochs", 2, "--limit", 8, "--batch-size", 4, "--robust-n", 0,
            "--penalty", "group-lasso", "--adv-ratio", 0.5, "--adv-steps", 1]
    run_example("cifar_vgg.py", *tiny, "--out", tmp_path / "straight")
    first = run_example("cifar_vgg.py", *tiny, "--out", tmp_path / "split", "--stop-after", 1).stdout
    assert len(json_lines(first)) == 1
    assert torch.load(tmp_path / "split" / "checkpoint.pt", weights_only=True)["epoch"] == 1
    second = run_example("cifar_vgg.py", *tiny, "--out", tmp_path / "split", "--resume").stdout
    assert "resumed from" in second and "at epoch 1" in second
    assert [r["epoch"] for r in json_lines(second)] == [2]

    a = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "split" / "checkpoint.pt", weights_only=True)
    assert a["epoch"] == b["epoch"] == 2
    # Same batches, augmentations, attacks, schedule and optimizer state: the same weights, bit for bit.
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert [h["train_loss"] for h in a["history"]] == [h["train_loss"] for h in b["history"]]
    log = [json.loads(line) for line in (tmp_path / "split" / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2]

    other = run_example("cifar_vgg.py", *tiny, "--out", tmp_path / "split", "--resume", "--arch", "vgg16", check=False)
    assert other.returncode != 0 and "arch=vgg11" in other.stderr


def test_cifar_missing_folder_names_the_layout(tmp_path):
    proc = run_example("cifar_vgg.py", "--data", tmp_path / "nowhere", "--out", tmp_path / "out", check=False)
    assert proc.returncode != 0
    assert "cifar-10-batches-py" in proc.stderr and "data_batch_1" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_cifar_runs_under_torchrun_with_two_processes(tmp_path, fake_cifar):
    # The same script, DistributedDataParallel over two CPU processes (gloo): each trains on its shard.
    proc = run_python("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", 2, EXAMPLES / "cifar_vgg.py",
                       "--data", fake_cifar, "--out", tmp_path, "--epochs", 1, "--limit", 8, "--batch-size", 2,
                       "--penalty", "spectral", "--adv-ratio", 0.5, "--adv-steps", 1, "--robust-n", 2,
                       "--eval-steps", 1, "--device", "cpu")
    assert "device cpu × 2" in proc.stdout
    assert [r["epoch"] for r in json_lines(proc.stdout) if "epoch" in r] == [1]  # rank 0 alone prints
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == 1 and not any(k.startswith("module.") for k in ckpt["model"])


def test_finetune_transformer_tiny_leaves_frozen_weights_alone():
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    rows = json_lines(run_example("finetune_transformer.py", "--tiny").stdout)
    assert [(r["mode"], r["strength"]) for r in rows] == [("full", 0.0), ("full", 0.01), ("lora", 0.0), ("lora", 0.01)]
    assert all(r["frozen_untouched"] for r in rows)
    assert all(r["frozen_tensors"] == 0 for r in rows[:2]) and all(r["frozen_tensors"] > 0 for r in rows[2:])
    # The same layers are reported with and without the penalty.
    assert rows[0]["layers"] == rows[1]["layers"] and rows[2]["layers"] == rows[3]["layers"]
    assert all(0.0 <= r["test_accuracy"] <= 1.0 and r["max_sigma1"] > 0 for r in rows)
