"""`kdtool <stage> [hydra overrides]`: one Hydra application per stage, dispatched on the first word."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

import hydra
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from kdtool.errors import KdtoolError

# subcommand -> (name, what it does): the stage's primary config is configs/<name>.yaml and its
# function is kdtool.stages.<name>.<name>
STAGES = {
    "train-teacher": ("train_teacher", "train (or fine-tune) the teacher with cross-entropy"),
    "distill": ("distill", "distil a teacher checkpoint into a student"),
    "evaluate": ("evaluate", "compare checkpoints: accuracy, calibration, agreement, size, MACs, latency"),
    "export": ("export", "write TorchScript, ONNX (fp32, int8) and safetensors, each verified"),
    "prune": ("prune", "remove channels of a trained model to a MACs or parameter target (Torch-Pruning)"),
    "pipeline": ("pipeline", "all of the above on the default config, with a student-alone baseline"),
}

# commands that read run folders instead of composing a config: plain argparse, no Hydra run folder
COMMANDS = {
    "report": ("kdtool.summary", "summarise a sweep or several runs: ranked table, best run, mean ± std over seeds"),
}

USAGE = """usage: kdtool <stage> [hydra overrides ...]

stages:
{stages}

Each stage is a Hydra application: `kdtool <stage> --help` lists its config groups,
`kdtool <stage> --cfg job` prints the composed config, `-m` runs a sweep, e.g.
  kdtool distill -m temperature.value=1,4,8
"""


def _run(name: str, cfg: DictConfig) -> Any:
    """Run a stage; a user's mistake becomes one line on stderr and exit status 2 (128 + signal when stopped)."""
    import importlib

    from kdtool.validate import validate

    try:
        validate(cfg)
        return getattr(importlib.import_module(f"kdtool.stages.{name}"), name)(cfg)
    except (KdtoolError, OmegaConfBaseException) as e:
        if os.environ.get("HYDRA_FULL_ERROR") == "1" or os.environ.get("KDTOOL_DEBUG") == "1":
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if isinstance(e, OmegaConfBaseException):
            key = getattr(e, "full_key", None)
            msg = f"config error{f' at {key}' if key else ''}: {msg}"
        print(f"kdtool: {getattr(e, 'prefix', 'error')}: {msg}", file=sys.stderr, flush=True)
        sys.exit(getattr(e, "exit_code", 2))


# module-level task functions: Hydra's launcher plugins pickle them
def run_train_teacher(cfg: DictConfig) -> Any:
    return _run("train_teacher", cfg)


def run_distill(cfg: DictConfig) -> Any:
    return _run("distill", cfg)


def run_evaluate(cfg: DictConfig) -> Any:
    return _run("evaluate", cfg)


def run_export(cfg: DictConfig) -> Any:
    return _run("export", cfg)


def run_pipeline(cfg: DictConfig) -> Any:
    return _run("pipeline", cfg)


def run_prune(cfg: DictConfig) -> Any:
    return _run("prune", cfg)


TASKS: dict[str, Callable[[DictConfig], Any]] = {
    name: globals()[f"run_{name}"] for name, _ in STAGES.values()
}


def usage() -> str:
    docs = {**{name: doc for name, (_, doc) in STAGES.items()}, **{name: doc for name, (_, doc) in COMMANDS.items()}}
    width = max(map(len, docs))
    return USAGE.format(stages="\n".join(f"  {name:<{width}}  {doc}" for name, doc in docs.items()))


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `kdtool` command."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in COMMANDS:
        import importlib

        sys.exit(importlib.import_module(COMMANDS[argv[0]][0]).main(argv[1:]))
    if not argv or argv[0] not in STAGES:
        if argv and argv[0] in ("-h", "--help", "help"):
            print(usage())
            sys.exit(0)
        if argv:
            print(f"kdtool: unknown stage '{argv[0]}'\n", file=sys.stderr)
        print(usage(), file=sys.stderr)
        sys.exit(2)
    stage = argv[0]
    name = STAGES[stage][0]
    sys.argv = [f"kdtool {stage}", *argv[1:]]
    app = hydra.main(version_base="1.3", config_path=config_source(), config_name=name)(TASKS[name])
    app()


def config_source() -> str:
    """Where Hydra finds the configs: the installed `kdtool.configs` package, or `configs/` of a source checkout.

    `python -m kdtool` run from the repository root imports the checkout's `kdtool/`, which does not hold
    the configs (they live at the top level and are installed as `kdtool.configs`).
    """
    import importlib.util
    from pathlib import Path

    if importlib.util.find_spec("kdtool.configs") is not None:
        return "pkg://kdtool.configs"
    checkout = Path(__file__).resolve().parent.parent / "configs"
    return str(checkout) if checkout.is_dir() else "pkg://kdtool.configs"


if __name__ == "__main__":
    main()
