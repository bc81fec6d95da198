"""The README's loss-term and compression snippets run as written."""

import pathlib
import re

import torch
import torch.nn.functional as F

import robustcompress as rc

README = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()


def _block(marker: str) -> str:
    for block in re.findall(r"```python\n(.*?)\n```", README, flags=re.S):
        if marker in block:
            return block
    raise AssertionError(f"no README python block contains {marker!r}")


def test_loss_term_snippet(digits_data):
    code = _block("state.step()").replace("    ...", "    loss.backward(); opt.step(); opt.zero_grad()")
    model = rc.MLP(64, (32, 32), 10)
    x, y = digits_data[0].tensors
    scope = {"model": model, "F": F, "torch": torch, "loader": [(x[:64], y[:64]), (x[64:128], y[64:128])],
             "opt": torch.optim.SGD(model.parameters(), lr=0.01)}
    exec(code, scope)  # noqa: S102 - the README's code
    assert scope["spec"].value > 0 and scope["tail"].value >= 0
    assert int(scope["state"].steps) == 2


def test_compression_snippet(tmp_path, monkeypatch, trained_digits_mlp, digits_data):
    import copy

    monkeypatch.chdir(tmp_path)
    train, test = digits_data
    x = train.tensors[0]
    scope = {"rc": rc, "model": copy.deepcopy(trained_digits_mlp), "x": x, "train": train, "test": test,
             "print": lambda *a: None}
    exec(_block("rc.prune("), scope)  # noqa: S102 - the README's code
    assert (tmp_path / "small.pt").exists()
    assert isinstance(scope["small"].get_submodule("1"), rc.LowRankLinear)
    assert scope["pruned"].get_submodule("1").out_features == 32
    x = test.tensors[0][:16]
    assert torch.equal(scope["same"](x), scope["small"](x))


def test_estimate_error_snippet():
    printed = []
    scope = {"print": printed.append}
    exec(_block("sigma1_bounds"), scope)  # noqa: S102 - the README's code
    interval, (lo, hi) = printed
    w = scope["model"][0].weight.detach().double()
    s = torch.linalg.svdvals(w)
    assert interval.shape == (2, 2)
    assert lo <= float(s[0]) * (1 + 1e-6) and float(s[0]) <= hi * (1 + 1e-6)
    for left, right in interval.tolist():
        candidates = torch.cat([s, torch.zeros(1, dtype=s.dtype)])
        assert bool(((candidates >= left - 1e-5) & (candidates <= right + 1e-5)).any())
