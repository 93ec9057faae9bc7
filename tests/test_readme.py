"""README.md is executed: every command in its code blocks and tables runs here.

Extracted: each line of a ```bash block (``\\`` continuations joined), each ``$ `` line of another
block (the lines after it are the output the README shows, checked against the real one), each
Python block that uses ``from runner import run``, and each table cell in backticks that starts
with one of PREFIXES. Files the README shows (a block whose first line is ``# <path>.py|yaml``) are
written into every command's folder first, so its own examples run as a reader would type them.

Each command is classified once, in COMMANDS below:

* ``Run``: executed with the smoke overrides of its entry appended (short: a few steps, a small
  dataset), in a folder of its own (its ``outputs/`` lands there); it must exit 0, and every run it
  wrote must have summary.json saying ``completed`` (and the files its entry names must exist).
* ``Fails``: the README shows it failing on purpose: it must exit 2 with its message.
* ``Compose``: long by nature or for a GPU: composed only (``--cfg job`` appended), must exit 0.
* ``Skip``: cannot run here (a cluster, several machines, ``pip install`` — tests/test_install.py
  covers installing), with the reason.

A command found in README.md but not in COMMANDS fails the test (classify it); an entry of
COMMANDS that README.md no longer holds fails too. The slowest commands (SLOW) are marked ``slow``,
left out of the default run (``python -m pytest -m slow tests/test_readme.py`` runs them); every
README section keeps a command in the default run. Each test's id is the README line(s) of its
command. Placeholders are replaced (SUBSTITUTE): ``outputs/runs/<run>`` by a copy of a run trained
here first, ``outputs/multirun/<sweep>`` by a small sweep, ``../shared/data`` by the data copies of
tests/conftest.py (a command needing an absent file is skipped naming it), ``data/pets``,
``new_photos/``, ``labels.csv`` and ``images/`` by small image folders made here.

``python -m runner ...`` commands run in a fork of one interpreter that has imported torch, Hydra
and runner already (tests/readme_forkserver.py): a fresh process each, without ~6 CPU seconds of
imports each. Commands whose point is the process start (the ``runner`` console script, an
environment variable before the command, ``&&``) run as real subprocesses.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from conftest import NETWORK_GUARD, ROOT, SHARED_DATA

README = ROOT / "README.md"
PREFIXES = ("python -m runner", "runner ", "pip install", "torchrun", "srun", "bash ")
TIMEOUT = 300

# --- smoke overrides, appended to a command (written once, here) ---------------------------------
SHORT = ("trainer.max_epochs=1", "trainer.limit_train_batches=2", "trainer.limit_val_batches=1",
         "trainer.limit_test_batches=1")  # one epoch of 2 batches: its validation, checkpoints and test still run
SMALL = ("dataset.n_train=32", "dataset.n_val=32", "dataset.n_test=32")  # the embedded sets
SHAPES = (*SHORT, *SMALL, "trainer.batch_size=16")  # the default experiment: DenseNet121 on shapes
# Drawing the plots is 2-4 s of such a run on the 2-core CPU: left out where the command is about
# something else (an optimizer, a schedule, a sweep's jobs, a model of one's own); the default run,
# the families' presets and the debug runs keep them.
QUICK = (*SHAPES, "~callbacks.plots")
PATTERNS = (*SHORT, *SMALL)
SILHOUETTES = (*SHORT, *SMALL, "loss.eval_k=10")
MNIST_IWAE = (*SHORT, "loss.eval_k=10", "trainer.eval_batch_size=20")
IMAGES = ("trainer.max_epochs=1", "dataset.image_size=32", "trainer.batch_size=4")  # the image folders made below
MNIST = SHARED_DATA / "mnist" / "train-images-idx3-ubyte.gz"
DENSENET_WEIGHTS = Path(os.environ.get("TORCH_HOME", Path.home() / ".cache" / "torch")) / "hub" / "checkpoints" \
    / "densenet121-a639ec97.pth"


@dataclass(frozen=True)
class Run:
    smoke: tuple[str, ...] = ()
    base: str | None = None  # the run folder <run> stands for: "regression", "pets" or "sweep"
    needs: Path | None = None  # a data file: skipped, naming it, where it is absent
    files: tuple[str, ...] = ()  # globs under the command's folder that must exist afterwards
    absent: tuple[str, ...] = ()  # ... and that must not
    stdout: str | None = None  # text the command must print
    log: str | None = None  # text one of the run.log files it wrote must hold
    summary: tuple[tuple[str, object], ...] = ()  # (key, value) pairs every summary.json it wrote must hold
    runs: bool = True  # it trains or evaluates: every summary.json it leaves says completed


@dataclass(frozen=True)
class Fails:
    message: str  # part of the one line on stderr
    base: str | None = None
    unless: Path | None = None  # where this file exists the command would not fail: skipped


@dataclass(frozen=True)
class Compose:
    why: str
    needs: Path | None = None


@dataclass(frozen=True)
class Skip:
    why: str


SLURM = ("needs a SLURM cluster; tests/test_slurm.py (SLURM's task variables as the process group) and "
         "tests/test_requeue.py (checkpoint and requeue on SIGUSR2) cover what runner does there")
INSTALLS = "pip install: tests/test_install.py builds the wheel, installs it in a fresh venv and runs it"
COMMANDS: dict[str, Run | Fails | Compose | Skip] = {
    # Quick start
    "pip install torch==2.14.1 torchvision==0.29.1 && pip install -e . && python -m runner": Skip(
        INSTALLS + "; `python -m runner` itself runs below"),
    "pip install torch==2.14.1 torchvision==0.29.1 && pip install -e '.[test]' && python -m pytest -q": Skip(
        INSTALLS + "; the pytest command is this suite"),
    # the smoke overrides go into the title (focal_densenet-max_epochs1-...): what a run leaves behind
    "python -m runner": Run(SHAPES, files=tuple(f"outputs/runs/*_focal_densenet*/{f}" for f in (
        ".hydra/config.yaml", "run.log", "metrics.jsonl", "metrics.csv", "checkpoints/last.pt", "checkpoints/best.pt",
        "plots/curves.png", "plots/pr_curves.png", "per_class.csv"))),
    "python -m runner experiment=classify": Run(PATTERNS),
    "python -m runner experiment=iwae_mnist --cfg job": Run(runs=False, stdout="_target_: runner.data.binarized.mnist"),
    "python -m runner --help": Run(runs=False, stdout="hparams_search"),
    "python -m runner -m loss=bce,focal trainer.seed=0,1,2": Run(QUICK, files=("outputs/multirun/*/summary.csv",
                                                                                  "outputs/multirun/*/5/summary.json")),
    "python -m runner.report outputs/multirun/<sweep>": Run(base="sweep", runs=False, files=(
        "outputs/multirun/*/report.csv",)),
    "python -m runner resume=outputs/runs/<run>": Run(base="regression"),
    "python -m runner mode=eval ckpt_path=outputs/runs/<run>/checkpoints/best.pt": Run(base="regression"),
    "python -m runner mode=predict ckpt_path=outputs/runs/<run>/checkpoints/best.pt": Run(
        base="regression", files=("outputs/runs/*/predictions.csv",)),
    # Your own experiment
    "python -m runner --config-dir myconf model=tiny": Run(QUICK),
    "runner --config-dir myconf model=tiny": Fails("No module named 'mynets'"),
    "PYTHONPATH=. runner --config-dir myconf model=tiny": Run(QUICK),
    "python -m runner optim._target_=torch.optim.RAdam optim.lr=3e-4": Run(QUICK),
    "python -m runner optim=sgd optim.lr=0.1 optim.weight_decay=5e-4 optim.decay_bias_and_norm=false": Run(QUICK),
    "python -m runner schedule=one_cycle schedule.max_lr=0.01": Run(QUICK),
    "python -m runner schedule._target_=torch.optim.lr_scheduler.ExponentialLR +schedule.gamma=0.9 "
    "schedule.interval=epoch": Run(QUICK),
    "<python: from runner import run>": Run(stdout="completed"),
    # The families
    "python -m runner experiment=asl_densenet": Run(SHAPES),
    "python -m runner experiment=focal_densenet trainer.accumulate_grad_batches=10 device=gpu": Compose(
        "device=gpu needs a CUDA GPU"),
    "python -m runner dataset=multilabel_csv dataset.csv=labels.csv dataset.split_column=split dataset.image_dir=images/": Run(
        IMAGES),
    "python -m runner experiment=classify dataset=mnist_classes dataset.root=../shared/data/mnist": Run(
        SHORT, needs=MNIST),
    "python -m runner experiment=classify dataset=imagefolder dataset.root=data/pets dataset.image_size=64": Run(
        IMAGES),
    "python -m runner experiment=fashion_resnet device=gpu": Compose(
        "device=gpu needs a CUDA GPU (and 15 epochs of Fashion-MNIST)"),
    "python -m runner experiment=iwae_silhouettes": Run(SILHOUETTES),
    "python -m runner experiment=iwae_mnist dataset.root=../shared/data/mnist": Run(MNIST_IWAE, needs=MNIST),
    "python -m runner experiment=iwae_paper dataset.root=../shared/data/mnist device=gpu": Compose(
        "device=gpu needs a CUDA GPU; the paper's schedule is 9.84 M steps"),
    "python -m runner experiment=char_lstm": Run(SHORT),
    "python -m runner experiment=char_lstm_shakespeare dataset.path=../shared/data/tinyshakespeare/input.txt "
    "device=gpu": Compose("device=gpu needs a CUDA GPU; 50 epochs"),
    # Configuration
    "python -m runner trainer.batch_sz=8": Fails("unknown key 'trainer.batch_sz' (did you mean 'batch_size'?)"),
    # Callbacks and debug runs
    "python -m runner --config-dir myconf experiment=regression 'callbacks=[default,good_enough]'": Run(
        log="val/best_loss="),
    "python -m runner experiment=regression '~callbacks.plots' '~callbacks.early_stopping'": Run(
        files=("outputs/runs/*/checkpoints/last.pt",), absent=("outputs/runs/*/plots",)),
    "python -m runner debug=fdr": Run(SMALL),
    "python -m runner debug=limit": Run((*SMALL, "trainer.batch_size=16")),
    "python -m runner experiment=regression debug=overfit": Run(),
    "python -m runner experiment=regression debug=profiler": Run(files=("outputs/runs/*/profiler/top_ops.txt",)),
    "python -m runner experiment=regression debug=anomaly": Run(),
    # Speed
    "python -m runner experiment=regression": Run(),
    # What a run leaves behind: titles, tags
    "python -m runner experiment=regression optim.lr=0.01 'tags=[baseline]'": Run(
        files=("outputs/runs/*_regression-lr0.01/summary.json",), summary=(("tags", ["baseline"]),)),
    # Resume and fine-tuning
    "python -m runner resume=outputs/runs/<run> trainer.max_epochs=4": Run(base="regression"),
    "python -m runner resume=outputs/runs/<run> trainer.max_epochs=4 optim.lr=0.5": Fails(
        "resume= cannot change optim.lr", base="regression"),
    "python -m runner experiment=regression ckpt_path=outputs/runs/<run>/checkpoints/best.pt optim.lr=0.01": Run(
        base="regression"),
    # Evaluation and prediction
    "python -m runner experiment=classify dataset=imagefolder dataset.root=data/pets mode=predict "
    "ckpt_path=outputs/runs/<run>/checkpoints/best.pt dataset.predict=new_photos/": Run(
        base="pets", files=("outputs/runs/*/predictions.csv",)),
    # Sweeps
    "python -m runner.report outputs/multirun/<sweep> --metric test/mAP --group-by loss": Run(
        base="sweep", runs=False, stdout="test/mAP"),
    "python -m runner -m hydra/launcher=fused experiment=iwae_paper dataset.root=../shared/data/mnist "
    "trainer.seed=0,1,2,3": Run(MNIST_IWAE, needs=MNIST, log="fused group of 4 jobs",
                                files=("outputs/multirun/*/3/summary.json",)),
    "python -m runner hparams_search=regression hydra.sweeper.n_trials=3 hydra.sweeper.storage=sqlite:///search.db "
    "'optim.lr=choice(0.05, 1e4)'": Run(runs=False, files=("outputs/multirun/*/best.json", "search.db")),
    # Going past one machine
    "python -m runner device=ddp": Compose("device=ddp starts one process per GPU: needs CUDA GPUs"),
    "python -m runner experiment=regression device=ddp device.devices=2 device.backend=gloo": Run(),
    "torchrun --nnodes=2 --nproc-per-node=8 --rdzv-backend=c10d --rdzv-endpoint=node0:29500 --rdzv-id=exp1 "
    "-m runner device=ddp experiment=focal_densenet": Skip("several machines with 8 GPUs each (torchrun, multi-node)"),
    # On a cluster (SLURM)
    "python -m runner -m hydra/launcher=slurm_gpu hydra.launcher.partition=gpu loss=bce,focal trainer.seed=0,1,2": Skip(
        SLURM + " (submitit submits each job with sbatch)"),
    "python -m runner -m hydra/launcher=slurm_node device=ddp experiment=focal_densenet trainer.seed=0,1,2": Skip(
        SLURM + " with 8-GPU nodes (submitit submits each job with sbatch)"),
    "srun python -m runner device=ddp experiment=focal_densenet": Skip(
        SLURM + ": srun inside an sbatch job of 2 nodes with 8 GPUs each"),
    # Bad input
    "python -m runner.report <folder>": Fails("is neither a sweep folder"),
    # Troubleshooting
    "OMP_WAIT_POLICY=PASSIVE python -m runner": Run(QUICK),
    "python -m runner model.weights=DEFAULT": Fails("is not in the local cache", unless=DENSENET_WEIGHTS),
    # Coming from lightning-hydra-template
    "python -m runner experiment=X": Skip("X stands for any preset; the presets' own commands run under The families"),
}

# The slowest commands, marked `slow` (left out of the default run: python -m pytest -m slow runs them) to
# keep this file near 3 minutes on the 2-core CPU. Each README section keeps a command in the default run
# (asserted below). Not among them: the sweep (~30 s), which the report commands' <sweep> needs anyway.
SLOW = {
    "python -m runner experiment=regression device=ddp device.devices=2 device.backend=gloo",  # ~24 s: 2 spawned
    # gloo workers; tests/test_distributed.py covers DDP on the CPU
    "OMP_WAIT_POLICY=PASSIVE python -m runner",  # ~16 s: a real subprocess of the default experiment
    "PYTHONPATH=. runner --config-dir myconf model=tiny",  # ~13 s: a real subprocess (the console script)
    "runner --config-dir myconf model=tiny",  # ~13 s: the same, failing (tests/test_install.py runs the script too)
    "python -m runner schedule=one_cycle schedule.max_lr=0.01",  # ~7 s: DenseNet121; the ExponentialLR one stays
    "python -m runner debug=limit",  # ~8 s: DenseNet121, 3 epochs
    "python -m runner experiment=asl_densenet",  # ~8 s: DenseNet121 (the default run trains the same model)
}

# The sweep the report commands read: the README's sweep command ("loss" swept, test/mAP) in its smoke
# form (its own test's folder, where that test ran first); the regression run <run> stands for; the
# image folders' run for dataset.predict.
BASES = {
    "sweep": ("python -m runner -m loss=bce,focal trainer.seed=0,1,2", QUICK),
    "regression": ("python -m runner experiment=regression trainer.deterministic=true", ()),
    "pets": ("python -m runner experiment=classify dataset=imagefolder dataset.root=data/pets", IMAGES),
}

SUBSTITUTE = {  # placeholder -> what the test puts there ({...}: filled per command)
    "outputs/runs/<run>": "outputs/runs/{run}",
    "outputs/multirun/<sweep>": "outputs/multirun/{sweep}",
    "<folder>": "not_a_run",  # an empty folder the test makes
    "../shared/data": str(SHARED_DATA),
    "PYTHONPATH=.": "PYTHONPATH=.:$PYTHONPATH",  # keep the tests' PYTHONPATH (this checkout, the network guard)
}


# --- extraction ----------------------------------------------------------------------------------
@dataclass
class Command:
    text: str
    lines: list[int]
    shown: list[str] = field(default_factory=list)  # the output the README shows after a `$ ` line
    code: str | None = None  # a Python block


def extract(readme: str) -> tuple[list[Command], dict[str, str]]:
    """The commands (in README order, duplicates merged) and the files the README shows."""
    found: dict[str, Command] = {}
    files: dict[str, str] = {}

    def add(text: str, line: int, shown=(), code=None) -> None:
        text = " ".join(text.split())
        if text in found:
            found[text].lines.append(line)
        else:
            found[text] = Command(text, [line], list(shown), code)

    lines = readme.splitlines()
    i = 0
    while i < len(lines):
        fence = re.match(r"^```(\w*)\s*$", lines[i])
        if not fence:
            if lines[i].startswith("|"):
                for span in re.findall(r"`([^`]+)`", lines[i]):
                    if span.startswith(PREFIXES):
                        add(span, i + 1)
            i += 1
            continue
        lang, start = fence.group(1), i + 1
        end = start
        while end < len(lines) and not lines[end].startswith("```"):
            end += 1
        body = lines[start:end]
        first = body[0].strip() if body else ""
        path = re.match(r"^#\s+([\w./-]+\.(py|yaml))$", first)
        if path:
            files[path.group(1)] = "\n".join(body) + "\n"
        elif lang == "python" and "from runner import run" in "\n".join(body):
            add("<python: from runner import run>", start, code="\n".join(body) + "\n")
        elif lang in ("bash", "sh"):
            joined, begun = "", None
            for n, line in enumerate(body, start + 1):
                if not joined and (not line.strip() or line.lstrip().startswith("#")):
                    continue
                begun = begun or n
                if line.rstrip().endswith("\\"):
                    joined += line.rstrip()[:-1] + " "
                    continue
                add(joined + line, begun)
                joined, begun = "", None
        else:
            for n, line in enumerate(body):
                if line.startswith("$ "):
                    shown = []
                    for after in body[n + 1:]:
                        if after.startswith("$ "):
                            break
                        shown.append(after)
                    add(line[2:], start + n + 1, shown)
        i = end + 1
    return list(found.values()), files


COMMANDS_FOUND, FILES = extract(README.read_text())


def test_every_readme_command_is_classified_and_every_entry_is_in_the_readme():
    found = {c.text for c in COMMANDS_FOUND}
    unclassified = sorted(f"README.md:{c.lines[0]}: {c.text}" for c in COMMANDS_FOUND if c.text not in COMMANDS)
    stale = sorted(set(COMMANDS) - found)
    assert not unclassified, "classify these in tests/test_readme.py COMMANDS:\n" + "\n".join(unclassified)
    assert not stale, "README.md no longer holds these COMMANDS entries:\n" + "\n".join(stale)
    assert {"mynets.py", "myconf/model/tiny.yaml", "mycallbacks.py", "myconf/callbacks/good_enough.yaml"} <= set(FILES)
    assert SLOW <= set(COMMANDS), f"SLOW names commands COMMANDS does not: {sorted(SLOW - set(COMMANDS))}"


def test_every_readme_section_keeps_a_command_in_the_default_run():
    """Marking commands `slow` leaves each section with a command that runs by default (where it
    has any that run here)."""
    headings = [(n, line[3:]) for n, line in enumerate(README.read_text().splitlines(), 1) if line.startswith("## ")]
    by_section: dict[str, list[Command]] = {}
    for command in COMMANDS_FOUND:
        for line in command.lines:
            section = [title for n, title in headings if n < line][-1]
            by_section.setdefault(section, []).append(command)
    bare = sorted(section for section, commands in by_section.items()
                  if any(not isinstance(COMMANDS.get(c.text), Skip) for c in commands)
                  and all(isinstance(COMMANDS.get(c.text), Skip) or c.text in SLOW for c in commands))
    assert not bare, f"every command these sections run here is marked slow: {bare}"


# --- the places the commands run -----------------------------------------------------------------
class ForkServer:
    def __init__(self, env: dict[str, str]):
        self.process = subprocess.Popen([sys.executable, str(ROOT / "tests" / "readme_forkserver.py")], cwd=ROOT,
                                        env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        ready = self.process.stdout.readline()
        assert ready.startswith('{"ready"'), f"the fork server did not start: {ready!r}"

    def run(self, cwd: Path, env: dict[str, str], module: str | None = None, args=(), code: str | None = None):
        out, err = cwd / ".stdout", cwd / ".stderr"
        request = {"module": module, "args": list(args), "code": code, "cwd": str(cwd), "env": env,
                   "stdout": str(out), "stderr": str(err), "timeout": TIMEOUT}
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        rc = json.loads(self.process.stdout.readline())["rc"]
        return rc, out.read_text(), err.read_text()

    def close(self):
        self.process.stdin.close()
        self.process.wait(timeout=30)


def environment(tmp: Path) -> dict[str, str]:
    """The commands' environment: this checkout's runner first, the network guard (its log below),
    the interpreter of this test on PATH, output unbuffered, OpenMP threads that do not spin."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTEST_CURRENT_TEST", "RUNNER_TEST_NETWORK_LOG")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(NETWORK_GUARD)])
    env["RUNNER_TEST_NETWORK_LOG"] = str(tmp / "network_attempts.log")
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["PYTHONUNBUFFERED"] = "1"
    # OpenMP threads that sleep while they wait: on a shared 2-core machine spinning threads slowed
    # a DenseNet121 step by ~10x (README.md, Troubleshooting). It changes no result, only the wait.
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return env


@dataclass
class Place:
    tmp: Path
    env: dict[str, str]
    server: ForkServer
    made: dict[str, Path | str] = field(default_factory=dict)  # a base run's folder, or why it failed

    def folder(self, name: str) -> Path:
        """A new folder holding the README's files and the image folders (data/pets, new_photos/,
        labels.csv with images/) its commands name."""
        cwd = self.tmp / name
        cwd.mkdir(parents=True)
        for path, text in FILES.items():
            (cwd / path).parent.mkdir(parents=True, exist_ok=True)
            (cwd / path).write_text(text)
        for name in ("data", "new_photos", "images", "labels.csv"):
            (cwd / name).symlink_to(self.images() / name)
        (cwd / "not_a_run").mkdir()
        return cwd

    def images(self) -> Path:
        """data/pets/{train,val,test}/{cat,dog}/, new_photos/ (unlabelled), and labels.csv with images/
        for multilabel_csv: small JPEGs whose class (label) is in their colour, so they can be learnt."""
        import torch
        from torchvision.io import encode_jpeg, write_file

        root = self.tmp / "images"
        if root.is_dir():
            return root
        g = torch.Generator().manual_seed(0)

        def jpeg(path: Path, red: float, green: float) -> None:
            path.parent.mkdir(parents=True, exist_ok=True)
            image = torch.rand(3, 40, 40, generator=g) * 60
            image[0] += 190 * red
            image[1] += 190 * green
            write_file(str(path), encode_jpeg(image.clamp(0, 255).to(torch.uint8)))

        for split, n in (("train", 8), ("val", 4), ("test", 4)):
            for c, name in enumerate(("cat", "dog")):
                for k in range(n):
                    jpeg(root / "data" / "pets" / split / name / f"{k}.jpg", c, 1 - c)
        for k in range(3):
            jpeg(root / "new_photos" / f"photo{k}.jpg", k % 2, 1 - k % 2)
        rows = ["path,red,green,split"]
        for k in range(24):
            red, green = k % 2, (k // 2) % 2
            jpeg(root / "images" / f"{k}.jpg", red, green)
            rows.append(f"{k}.jpg,{red},{green},{('train', 'train', 'val', 'test')[k % 4]}")
        (root / "labels.csv").write_text("\n".join(rows) + "\n")
        return root

    def base(self, name: str) -> Path:
        """The run (or sweep) folder a placeholder stands for, trained once (lazily)."""
        if name not in self.made:
            command, smoke = BASES[name]
            cwd = self.folder(f"base_{name}")
            rc, out, err = self.execute(cwd, command, smoke)
            kind = "multirun" if "-m" in shlex.split(command)[3:] else "runs"
            made = list((cwd / "outputs" / kind).glob("*"))
            self.made[name] = made[0] if rc == 0 and len(made) == 1 else \
                f"the run {name!r} for the README's placeholders failed (exit {rc}): {command}\n{out[-3000:]}\n{err[-3000:]}"
        assert isinstance(self.made[name], Path), self.made[name]
        return self.made[name]

    def execute(self, cwd: Path, command: str, smoke=(), code: str | None = None):
        if code is not None:
            return self.server.run(cwd, self.env, code=code)
        words = shlex.split(command)
        plain = words[:2] == ["python", "-m"] and not set(words) & {"&&", "||", "|", ";"}
        if plain:
            return self.server.run(cwd, self.env, module=words[2], args=[*words[3:], *smoke])
        full = " ".join([command, *map(shlex.quote, smoke)])
        result = subprocess.run(["bash", "-c", full], cwd=cwd, env=self.env, capture_output=True, text=True,
                                timeout=TIMEOUT)
        return result.returncode, result.stdout, result.stderr


@pytest.fixture(scope="module")
def place(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("readme")
    env = environment(tmp)
    server = ForkServer(env)
    yield Place(tmp, env, server)
    server.close()


# --- the commands --------------------------------------------------------------------------------
def substituted(command: Command, spec, place: Place, cwd: Path) -> str:
    text = command.text
    base = getattr(spec, "base", None)
    if base is not None:
        made = place.base(base)
        shutil.copytree(made, cwd / "outputs" / made.parent.name / made.name)
        text = text.replace("<run>", made.name).replace("<sweep>", made.name)
    for placeholder, replacement in SUBSTITUTE.items():
        if "{" not in replacement:
            text = text.replace(placeholder, replacement)
    return text


def summaries(cwd: Path) -> dict[Path, dict]:
    return {p.parent: json.loads(p.read_text()) for p in (cwd / "outputs").rglob("summary.json")}


def check_shown_output(command: Command, out: str) -> None:
    """The lines the README shows after a `$ ` command are in its output, one line each (`...`
    stands for any text: the README shortens a long path or list)."""
    for line in filter(str.strip, command.shown):
        pattern = ".*".join(map(re.escape, line.split("...")))
        assert re.search(pattern, out), f"README.md:{command.lines[0]} shows {line!r}; the command printed:\n{out}"


@pytest.mark.parametrize("command", [
    pytest.param(c, id=f"README.md:{','.join(map(str, c.lines))}", marks=[pytest.mark.slow] if c.text in SLOW else [])
    for c in COMMANDS_FOUND])
def test_readme_command(command, place, request):
    spec = COMMANDS.get(command.text)
    assert spec is not None, f"README.md:{command.lines[0]}: unclassified command: {command.text}"
    where = f"README.md:{','.join(map(str, command.lines))}: {command.text}"
    if isinstance(spec, Skip):
        pytest.skip(f"not run: {spec.why}")
    needs = getattr(spec, "needs", None)
    if needs is not None and not needs.exists():
        pytest.skip(f"data not available: {needs} is absent")
    if isinstance(spec, Fails) and spec.unless is not None and spec.unless.exists():
        pytest.skip(f"{spec.unless} exists here, so the command would not fail as the README shows")
    if command.text.startswith("runner ") and shutil.which("runner", path=place.env["PATH"]) is None:
        pytest.skip("the runner console script is not installed (pip install -e .)")
    cwd = place.folder(re.sub(r"\W+", "_", request.node.callspec.id))
    text = substituted(command, spec, place, cwd)
    before = summaries(cwd)
    smoke = (*spec.smoke, ) if isinstance(spec, Run) else ()
    if isinstance(spec, Compose):
        smoke = ("--cfg", "job")
    rc, out, err = place.execute(cwd, text, smoke, command.code)
    said = f"{where}\n(run as: {text} {' '.join(smoke)})\n--- stdout\n{out[-4000:]}\n--- stderr\n{err[-4000:]}"
    log = Path(place.env["RUNNER_TEST_NETWORK_LOG"])
    assert not log.is_file() or not log.read_text(), f"{where} tried to open network connections:\n{log.read_text()}"
    if isinstance(spec, Fails):
        assert rc == 2, f"expected exit 2; got {rc}\n{said}"
        assert spec.message in err, f"expected {spec.message!r} on stderr\n{said}"
        check_shown_output(command, err)
        assert summaries(cwd) == before, f"a refused command changed a run folder\n{said}"
        return
    assert rc == 0, f"exit {rc}\n{said}"
    if isinstance(spec, Compose):
        assert "trainer:" in out, f"no composed config printed\n{said}"
        return
    check_shown_output(command, out)
    if spec.stdout is not None:
        assert spec.stdout in out, f"expected {spec.stdout!r} in its output\n{said}"
    if spec.log is not None:
        logs = [p.read_text() for p in (cwd / "outputs").rglob("run.log")]
        assert any(spec.log in text for text in logs), f"no run.log holds {spec.log!r}\n{said}"
    for pattern in spec.files:
        assert list(cwd.glob(pattern)), f"no {pattern} after the command\n{said}"
    for name, (base_command, smoke) in BASES.items():
        if command.text == base_command and spec.smoke == smoke and name not in place.made:
            kind = "multirun" if "-m" in shlex.split(base_command)[3:] else "runs"
            (place.made[name],) = (cwd / "outputs" / kind).iterdir()  # what a later command's <sweep> stands for
    for key, value in spec.summary:
        for folder, summary in summaries(cwd).items():
            assert summary.get(key) == value, f"{folder}/summary.json: {key}={summary.get(key)!r}, not {value!r}\n{said}"
    for pattern in spec.absent:
        assert not list(cwd.glob(pattern)), f"{pattern} should not be there after the command\n{said}"
    if spec.runs:
        after = summaries(cwd)
        written = {d: s for d, s in after.items() if before.get(d) != s or d not in before}
        if not written:  # a completed run resumed as it is: left untouched, and says so
            assert "resume=" in text and "completed" in out, f"no run folder written\n{said}"
            written = after
        bad = {str(d.relative_to(cwd)): (s["status"], s.get("error")) for d, s in written.items()
               if s["status"] != "completed"}
        assert not bad, f"runs not completed: {bad}\n{said}"
