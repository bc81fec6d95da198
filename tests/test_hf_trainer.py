"""The Hugging Face Trainer callback: resume (4 + 4 = 8 steps), logs, clipping, missing state, wrap conflict."""

import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")
from transformers import (  # noqa: E402
    BertConfig,
    BertForSequenceClassification,
    PrinterCallback,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from robustcompress.integrations.hf import STATE_FILE, PenaltyCallback  # noqa: E402
from robustcompress.optim import wrap  # noqa: E402
from robustcompress.penalties import SpectralNormPenalty, default_penalties  # noqa: E402
from robustcompress.spectral import SpectralState  # noqa: E402

warnings.filterwarnings("ignore")


def bert():
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=8, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0, num_labels=2)
    return BertForSequenceClassification(cfg)


def data(n=32):
    g = torch.Generator().manual_seed(1)
    return [{"input_ids": torch.randint(0, 40, (8,), generator=g), "labels": int(torch.randint(0, 2, (), generator=g))}
            for _ in range(n)]


def args(out, **kw):
    opts = dict(output_dir=str(out), use_cpu=True, report_to=[], save_strategy="steps", save_steps=4, max_steps=8,
                per_device_train_batch_size=4, learning_rate=5e-3, logging_steps=2, seed=0, disable_tqdm=True,
                dataloader_num_workers=0)
    opts.update(kw)
    return TrainingArguments(**opts)


def trainer(model, out, callbacks, **kw):
    t = Trainer(model=model, args=args(out, **kw), train_dataset=data(), callbacks=callbacks)
    t.remove_callback(PrinterCallback)
    return t


def callback(model, **kw):
    state = SpectralState(model, k=1)
    return PenaltyCallback(default_penalties(state, strength=0.5), track_every=3, **kw)


@pytest.mark.slow
def test_four_plus_four_resumed_steps_equal_eight_straight(tmp_path):
    straight = bert()
    cb_straight = callback(straight)
    t = trainer(straight, tmp_path, [cb_straight])
    t.train()
    assert (tmp_path / "checkpoint-4" / STATE_FILE).is_file()
    logged = [h for h in t.state.log_history if "loss" in h]
    assert all("robustcompress/penalty" in h for h in logged)
    assert any(k.endswith("/sigma_1") for h in logged for k in h)

    resumed = bert()
    cb_resumed = callback(resumed)
    trainer(resumed, tmp_path, [cb_resumed]).train(resume_from_checkpoint=str(tmp_path / "checkpoint-4"))
    assert all(torch.equal(p, q) for p, q in zip(straight.parameters(), resumed.parameters()))
    a, b = cb_straight.state_dict(), cb_resumed.state_dict()
    assert a["penalties"]["steps"] == b["penalties"]["steps"] == 8
    assert a["tracker"]["steps"] == b["tracker"]["steps"] == 8
    assert all(torch.equal(x, y) for x, y in zip(a["penalties"]["spectral_state"].values(),
                                                 b["penalties"]["spectral_state"].values()))
    assert a["penalties"]["penalties"][0]["_extra_state"] == b["penalties"]["penalties"][0]["_extra_state"]

    # The same checkpoint from another output_dir: found through resume_from=, refused without it.
    elsewhere = bert()
    with pytest.raises(FileNotFoundError, match="resume_from"):
        trainer(elsewhere, tmp_path / "b", [callback(elsewhere)]).train(
            resume_from_checkpoint=str(tmp_path / "checkpoint-4"))
    elsewhere = bert()
    cb_elsewhere = callback(elsewhere, resume_from=tmp_path / "checkpoint-4")
    trainer(elsewhere, tmp_path / "c", [cb_elsewhere]).train(resume_from_checkpoint=str(tmp_path / "checkpoint-4"))
    assert all(torch.equal(p, q) for p, q in zip(straight.parameters(), elsewhere.parameters()))


def test_checkpoint_without_the_callback_state_is_a_clear_error(tmp_path):
    model = bert()
    trainer(model, tmp_path, [], max_steps=4).train()
    resumed = bert()
    with pytest.raises(FileNotFoundError, match="saved without PenaltyCallback"):
        trainer(resumed, tmp_path, [callback(resumed)]).train(resume_from_checkpoint=str(tmp_path / "checkpoint-4"))


def test_penalty_gradient_comes_after_the_trainers_clipping(tmp_path):
    """max_grad_norm=1e-9 clips the task gradient to nothing; the SGD update is -lr · the unclipped penalty gradient."""
    model = bert()
    layer = "bert.encoder.layer.0.intermediate.dense"
    state = SpectralState(model, k=1, layers=[layer])
    cb = PenaltyCallback([SpectralNormPenalty(state, 1.0)])
    seen = {}
    weight = model.get_submodule(layer).weight

    class Spy(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            seen["w"] = weight.detach().clone()
            seen["task_norm"] = float(weight.grad.norm())

    trainer(model, tmp_path, [Spy(), cb], max_steps=1, max_grad_norm=1e-9, optim="sgd", weight_decay=0.0,
            lr_scheduler_type="constant", learning_rate=0.1, save_strategy="no").train()
    u, v = state.vectors(layer)
    expected = 0.1 * 2 * state.sigmas(layer)[0] * torch.outer(u[:, 0], v[:, 0])
    assert seen["task_norm"] <= 1e-8  # clipped before on_pre_optimizer_step, without the penalty
    torch.testing.assert_close(seen["w"] - weight.detach(), expected, rtol=1e-4, atol=1e-7)
    assert float(expected.norm()) > 1e-2


def test_callback_on_a_wrapped_optimizer_is_an_error(tmp_path):
    model = bert()
    opt = wrap(torch.optim.SGD(model.parameters(), lr=0.1), model, default_penalties(model))
    t = Trainer(model=model, args=args(tmp_path, max_steps=1, save_strategy="no"), train_dataset=data(),
                callbacks=[PenaltyCallback(default_penalties(model))], optimizers=(opt, None))
    with pytest.raises(ValueError, match="never both"):
        t.train()


@pytest.mark.slow
def test_example_script_tiny_run(tmp_path):
    import json
    import os
    import pathlib
    import subprocess
    import sys

    root = pathlib.Path(__file__).resolve().parents[1]
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(root))
    subprocess.run([sys.executable, str(root / "examples" / "hf_tiny_bert.py"), "--epochs", "1", "--limit", "64",
                    "--hidden", "16", "--every", "1", "--log-steps", "1", "--save-steps", "2", "--device", "cpu",
                    "--out", str(tmp_path)], check=True, env=env, timeout=300, capture_output=True)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["penalty"] > 0 and summary["max_sigma_1"] > 0
    assert (tmp_path / "checkpoint-2" / STATE_FILE).is_file()


def test_readme_snippet_runs(tmp_path, monkeypatch):
    import pathlib
    import re

    readme = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
    code = next(b for b in re.findall(r"```python\n(.*?)\n```", readme, flags=re.S) if "integrations.hf import" in b)
    monkeypatch.chdir(tmp_path)
    code = code.replace('TrainingArguments(output_dir="out",',
                        'TrainingArguments(output_dir="out", use_cpu=True, report_to=[], max_steps=2, disable_tqdm=True,')
    scope = {"model": bert(), "train": data(8)}
    exec(code, scope)  # noqa: S102 - the README's code
    assert scope["callback"].hooks.steps == 2
