"""A wheel of runner, installed into a fresh virtual environment, runs from any folder: the
configs travel inside the package (runner/conf/, package data), nothing is read from the checkout."""
from __future__ import annotations

import json
import subprocess
import sys
import venv

from conftest import ROOT


def test_the_wheel_runs_an_experiment_from_another_folder(tmp_path):
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(tmp_path / "dist"), str(ROOT)], capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr
    (wheel,) = (tmp_path / "dist").glob("runner-*.whl")
    # torch and the other dependencies come from this environment; runner from the wheel alone.
    venv.create(tmp_path / "venv", system_site_packages=True, with_pip=True)
    python = tmp_path / "venv" / "bin" / "python"
    installed = subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", str(wheel)],
                               capture_output=True, text=True, timeout=600)
    assert installed.returncode == 0, installed.stderr
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {"PATH": f"{tmp_path / 'venv' / 'bin'}:/usr/bin:/bin", "HOME": str(tmp_path)}
    where = subprocess.run([str(python), "-c", "import runner; print(runner.__file__)"], cwd=elsewhere, env=env,
                           capture_output=True, text=True)
    assert str(tmp_path / "venv") in where.stdout, where.stdout + where.stderr
    ran = subprocess.run([str(tmp_path / "venv" / "bin" / "runner"), "experiment=regression", "trainer.max_epochs=1",
                          "trainer.progress=none", f"output_root={tmp_path / 'out'}"], cwd=elsewhere, env=env,
                         capture_output=True, text=True, timeout=600)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    (run,) = (tmp_path / "out" / "runs").iterdir()
    assert json.loads((run / "summary.json").read_text())["status"] == "completed"
    helped = subprocess.run([str(python), "-m", "runner", "--help"], cwd=elsewhere, env=env, capture_output=True,
                            text=True, timeout=300)
    assert helped.returncode == 0 and "experiment" in helped.stdout, helped.stdout + helped.stderr
