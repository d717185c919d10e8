"""Every yaml under configs/ composes with Hydra's compose API and resolves (all but `hydra:` interpolations).

The yaml files are found by globbing the configs folder, so a new primary config, group option or strategy
is covered without editing this file.
"""

from __future__ import annotations

import importlib.resources
import re
from pathlib import Path

import pytest
import torch
import yaml
from hydra import compose, initialize_config_module
from hydra.errors import ConfigCompositionException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

CONFIG_MODULE = "kdtool.configs"
CONFIGS = Path(str(importlib.resources.files(CONFIG_MODULE)))
REPO_CONFIGS = Path(__file__).resolve().parent.parent / "configs"
NOT_PRIMARY = {"base"}  # included by every primary's defaults; not a stage of its own
# values a user must give (`???` in the yaml) and what the test gives them
FILL = {"teacher.name": "resnet18", "student.name": "resnet18", "dataset.root": "/tmp/kdtool-test-no-such-root"}
BASE_OVERRIDES = ["output_dir=/tmp/kdtool-test-output"]  # output_dir is ${hydra:runtime.output_dir}
TIME = r"\d{4}-\d{2}-\d{2}_\d{2}-\d{2}-\d{2}"


def primaries() -> list[str]:
    return sorted(p.stem for p in CONFIGS.glob("*.yaml") if p.stem not in NOT_PRIMARY)


def groups() -> dict[str, list[str]]:
    """Every folder under configs/ holding yaml files is a group, named by its path ('strategy', 'hydra/launcher')."""
    found = {}
    for d in sorted(CONFIGS.rglob("*")):
        if d.is_dir() and "__pycache__" not in d.parts and list(d.glob("*.yaml")):
            found[d.relative_to(CONFIGS).as_posix()] = sorted(p.stem for p in d.glob("*.yaml"))
    return found


def defaults_groups(primary: str) -> list[str]:
    """The config groups a primary config's defaults list selects."""
    doc = yaml.safe_load((CONFIGS / f"{primary}.yaml").read_text()) or {}
    names = []
    for entry in doc.get("defaults", []):
        if isinstance(entry, dict):
            key = next(iter(entry)).split("@")[0].removeprefix("override ").removeprefix("optional ").strip()
            names.append(key.lstrip("/"))
    return names


def is_hydra_group(group: str) -> bool:
    return group.startswith("hydra/")  # Hydra's own groups (launcher, sweeper): always selectable


def selection(group: str, option: str) -> tuple[str, str]:
    """(primary, override) that selects a group option: in a primary's defaults -> group=option (distill first),
    Hydra's own groups -> group=option in distill, anything else is appended: +group=option in distill."""
    having = [p for p in primaries() if group in defaults_groups(p)]
    if having:
        return ("distill" if "distill" in having else having[0]), f"{group}={option}"
    if is_hydra_group(group):
        return "distill", f"{group}={option}"
    return "distill", f"+{group}={option}"


def group_cases() -> list[tuple[str, str]]:
    """(group, option) for every yaml in a group folder under configs/."""
    return [(group, option) for group, options in groups().items() for option in options]


def compose_resolved(primary: str, overrides: list[str], keep_hydra: bool = False) -> tuple[DictConfig, dict]:
    """Compose (with the hydra node), give every `???` outside it its FILL value, and resolve everything but
    the hydra node; return the config (what a stage gets: without `hydra`, unless keep_hydra) and the plain
    dict without `hydra`."""
    def run(extra):
        return compose(config_name=primary, overrides=[*BASE_OVERRIDES, *overrides, *extra], return_hydra_config=True)

    def without_hydra(cfg):
        job = cfg.copy()
        with open_dict(job):
            del job["hydra"]
        return job

    cfg = run([])
    missing = sorted(OmegaConf.missing_keys(without_hydra(cfg)))
    unknown = [k for k in missing if k not in FILL]
    assert not unknown, f"{primary} {overrides}: mandatory values {unknown} have no test value in FILL"
    if missing:
        cfg = run([f"{k}={FILL[k]}" for k in missing])
    job = without_hydra(cfg)
    plain = OmegaConf.to_container(job, resolve=True, throw_on_missing=True)
    return (cfg if keep_hydra else job), plain


@pytest.fixture(scope="module", autouse=True)
def hydra_context():
    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
        yield


def test_the_package_configs_are_the_repository_configs():
    """The installed kdtool.configs is this repository's configs/ (else these tests check the wrong files)."""
    assert sorted(p.relative_to(CONFIGS) for p in CONFIGS.rglob("*.yaml")) == \
        sorted(p.relative_to(REPO_CONFIGS) for p in REPO_CONFIGS.rglob("*.yaml"))


def test_every_primary_config_is_a_cli_stage():
    from kdtool.cli import STAGES

    assert sorted(name for name, _ in STAGES.values()) == primaries()


@pytest.mark.parametrize("primary", primaries())
def test_primary_composes_and_resolves(primary, monkeypatch):
    from kdtool.cli import STAGES

    monkeypatch.delenv("RANK", raising=False)
    cfg, plain = compose_resolved(primary, ["runs_dir=/tmp/kdtool-test-runs"], keep_hydra=True)
    assert plain["output_dir"] == "/tmp/kdtool-test-output"
    stage = next(name for name, (config, _) in STAGES.items() if config == primary)
    assert plain["stage"] == stage, f"{primary}.yaml says stage: {plain['stage']}, the CLI calls it {stage}"
    # the run-folder layout: ${runs_dir}/<stage>/<time>/ and ${runs_dir}/<stage>/multirun/<time>/<n>/
    assert re.fullmatch(rf"/tmp/kdtool-test-runs/{stage}/{TIME}", str(cfg.hydra.run.dir)), cfg.hydra.run.dir
    sweep_dir = str(cfg.hydra.sweep.dir)
    assert re.fullmatch(rf"/tmp/kdtool-test-runs/{stage}/multirun/{TIME}", sweep_dir), sweep_dir
    assert OmegaConf.to_container(cfg.hydra.sweep, resolve=False)["subdir"] == "${hydra.job.num}"
    assert cfg.hydra.job.name == stage and cfg.hydra.job.chdir is False


@pytest.mark.parametrize("group,option", group_cases(), ids=lambda v: str(v))
def test_group_option_composes_resolves_and_is_usable(group, option):
    primary, override = selection(group, option)
    try:
        cfg, plain = compose_resolved(primary, [override], keep_hydra=is_hydra_group(group))
    except ConfigCompositionException as e:
        pytest.fail(f"kdtool {primary} {override} does not compose: {e}")
    check_usable(group, option, cfg, plain)
    if plain["stage"] in ("train-teacher", "distill", "pipeline"):
        from kdtool.validate import validate

        validate(cfg)  # kdtool's own pre-flight checks accept every shipped option


def documented_selections() -> list[tuple[str, str, list[str]]]:
    """(yaml file, stage, group selections) for each `kdtool STAGE ... group=option` example in a yaml comment."""
    from kdtool.cli import STAGES

    known = groups()
    found = []
    for path in sorted(CONFIGS.rglob("*.yaml")):
        for line in path.read_text().splitlines():
            m = re.search(r"#.*\bkdtool ([\w-]+)\s(.*)", line)
            if not m or m.group(1) not in STAGES:
                continue
            tokens = [tok.strip("`'\",;:()") for tok in m.group(2).split()]
            picks = [tok for tok in tokens
                     if re.fullmatch(r"\+?[\w/]+=[\w.-]+", tok) and tok.lstrip("+").split("=")[0] in known]
            case = (path.relative_to(CONFIGS).as_posix(), m.group(1), picks)
            if picks and case not in found:
                found.append(case)
    return found


@pytest.mark.parametrize("where,stage,picks", documented_selections(), ids=lambda v: str(v))
def test_documented_group_selections_compose(where, stage, picks):
    """A comment that says `kdtool distill logger=tensorboard` is only true if that selection composes."""
    from kdtool.cli import STAGES

    try:
        compose_resolved(STAGES[stage][0], picks)
    except ConfigCompositionException as e:
        pytest.fail(f"{where} documents `kdtool {stage} {' '.join(picks)}`, which does not compose: {e}")


def check_usable(group: str, option: str, cfg: DictConfig, plain: dict) -> None:
    """What the stages will do with the group's value works."""
    if group == "dataset":
        from kdtool.datasets import DATASETS, FILE_DATASETS

        assert plain["dataset"]["name"] in (*DATASETS, *FILE_DATASETS), f"dataset/{option}: unknown name"
    elif group in ("teacher", "student"):
        from kdtool.models import check_model_name

        check_model_name(plain[group]["name"])
        assert isinstance(plain[group].get("kwargs") or {}, dict)
    elif group == "optimizer":
        opt = instantiate(cfg.optimizer, params=[torch.nn.Parameter(torch.zeros(2))])
        assert isinstance(opt, torch.optim.Optimizer)
    elif group == "scheduler":
        if not cfg.get("scheduler"):  # an empty scheduler is a constant learning rate: the stages build none
            assert not plain.get("scheduler"), f"scheduler/{option}"
            return
        from kdtool.optim import build_optimizer

        opt, sched = build_optimizer(cfg, [torch.nn.Linear(2, 2)], steps_per_epoch=3)
        opt.step()
        sched.after_step()
        sched.after_epoch()
        assert isinstance(sched.scheduler, torch.optim.lr_scheduler.LRScheduler)
    elif group == "temperature":
        from kdtool.tasks import check_temperature, temperature_at

        check_temperature(cfg.temperature)
        epochs = int(plain["train"]["epochs"])
        assert all(temperature_at(plain["temperature"], e, epochs) > 0 for e in range(epochs))
    elif group == "strategy":
        from kdtool.strategies import build_strategies

        assert option in plain["strategies"], f"+strategy={option} must add strategies.{option}"
        assert option in build_strategies(plain["strategies"]), f"strategy {option} is not registered"
    elif is_hydra_group(group):
        from hydra.utils import get_class

        node = OmegaConf.select(cfg, group.replace("/", "."))
        assert node is not None and get_class(node._target_), f"{group}/{option}: no usable _target_"
    elif group == "train":
        for key in ("epochs", "batch_size", "lr"):
            assert key in plain["train"], f"train/{option} lacks {key}"


def test_strategy_is_not_in_the_defaults_and_soft_targets_always_is():
    _, plain = compose_resolved("distill", [])
    assert list(plain["strategies"]) == ["soft_targets"]
    assert "strategy" not in defaults_groups("distill")


def test_timm_options_need_a_name():
    """teacher=timm without teacher.name is a missing value, not a silent default."""
    cfg = compose(config_name="distill", overrides=[*BASE_OVERRIDES, "teacher=timm", "student=timm"])
    assert sorted(OmegaConf.missing_keys(cfg)) == ["student.name", "teacher.name"]
