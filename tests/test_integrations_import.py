"""Importing robustcompress (and robustcompress.integrations) imports neither lightning nor transformers."""

import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_import_does_not_pull_in_lightning_or_transformers():
    code = ("import sys, robustcompress, robustcompress.integrations; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
            "('lightning', 'pytorch_lightning', 'lightning_fabric', 'transformers', 'peft', 'accelerate')); "
            "print(bad); assert not bad, bad")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_integrations_submodules_are_reached_through_the_package():
    import pytest

    pytest.importorskip("lightning")
    import robustcompress.integrations as integrations

    assert integrations.lightning.PenaltyCallback.__module__ == "robustcompress.integrations.lightning"
    with pytest.raises(AttributeError, match="no attribute"):
        integrations.keras  # noqa: B018
