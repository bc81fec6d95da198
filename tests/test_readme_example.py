"""The three-line integration example of the README, executed as written."""

import json

import torch
import torch.nn.functional as F

from robustcompress.models import MLP

EXAMPLE = """\
from robustcompress import optim, penalties, hooks
opt = optim.wrap(torch.optim.SGD(model.parameters(), lr=0.05), model, penalties.default_penalties(model))
tracker = hooks.track(model, every=100, sink="train_stats.jsonl")
"""


def test_readme_integration_example_runs(tmp_path, monkeypatch, digits_data):
    monkeypatch.chdir(tmp_path)
    model = MLP(64, (32, 32), 10)
    scope = {"torch": torch, "model": model}
    exec(EXAMPLE, scope)  # noqa: S102 - the README's code, verbatim
    opt, tracker = scope["opt"], scope["tracker"]
    x, y = digits_data[0].tensors
    for i in range(0, 101 * 8, 8):  # the training loop is the user's, unchanged
        j = i % (len(x) - 8)
        opt.zero_grad()
        F.cross_entropy(model(x[j:j + 8]), y[j:j + 8]).backward()
        opt.step()
    tracker.remove()
    records = [json.loads(line) for line in open(tmp_path / "train_stats.jsonl")]
    assert {r["step"] for r in records} == {0, 100}
    assert {"effective_rank", "sigma_1", "active_fraction"} <= {r["metric"] for r in records}
    assert opt.penalties[0].value > 0 and opt.steps == 101
