"""The search space of `medi sweep` (params `sweep.space`): dotted params mapped to choices or ranges, the
params that cannot change a method (left out of its study), a trial's config (validated like params.yaml), and
the objective over the tasks scored so far. Pure functions of the config: no Optuna, no MLflow."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from medi import config as config_mod
from medi.config import Config
from medi.errors import MediError

log = logging.getLogger(__name__)

# What changing a section costs a trial; the other sections change the dataset or only the reports.
SWEEPABLE = {"model": "trains", "train": "trains", "sample": "new pool", "probe": "probe only", "encoder": "probe only"}


# ----------------------------------------------------------------------------------------------- the space
@dataclass(frozen=True)
class Dimension:
    """One searched param: categorical choices, or an int / float range."""
    name: str
    choices: tuple | None = None
    low: float | None = None
    high: float | None = None
    step: float | None = None
    log: bool = False

    @property
    def is_int(self) -> bool:
        return all(isinstance(v, int) and not isinstance(v, bool) for v in (self.low, self.high, self.step or 1))

    def suggest(self, trial) -> Any:
        if self.choices is not None:
            return trial.suggest_categorical(self.name, list(self.choices))
        if self.is_int:
            return trial.suggest_int(self.name, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        return trial.suggest_float(self.name, float(self.low), float(self.high), step=self.step, log=self.log)

    def grid_values(self) -> list:
        """Every value, for the grid sampler (a range needs a step)."""
        if self.choices is not None:
            return list(self.choices)
        if self.step is None:
            raise MediError(f"sweep.sampler grid: '{self.name}' is a range without a step; give it a step or choices")
        values = np.arange(self.low, self.high + self.step / 2, self.step)
        return [int(v) for v in values] if self.is_int else [round(float(v), 10) for v in values]

    def ends(self) -> list:
        return list(self.choices) if self.choices is not None else [self.low, self.high]


def parse_space(cfg: Config, method: str | None = None) -> list[Dimension]:
    """`sweep.space` as dimensions; every choice and both ends of every range are checked as param values.
    With a method, the params that cannot change it are left out (`inert`)."""
    where = f"{cfg.source_path}: sweep.space"
    if not cfg.sweep.space:
        raise MediError(f"{where} is empty; name at least one param to search, e.g. probe.strategy: [grid, unseen]")
    dims = []
    for name, spec in cfg.sweep.space.items():
        section = name.partition(".")[0]
        if section not in SWEEPABLE:
            raise MediError(f"{where}: '{name}' cannot be swept; sweepable sections: {', '.join(SWEEPABLE)} "
                            "(data, split and synthetic change the dataset: run a pipeline per setting)")
        if isinstance(spec, list):
            if not spec:
                raise MediError(f"{where}: '{name}' has no choices")
            dim = Dimension(name, choices=tuple(spec))
        elif isinstance(spec, dict):
            extra = sorted(set(spec) - {"low", "high", "step", "log"})
            if extra or not {"low", "high"} <= set(spec):
                raise MediError(f"{where}: '{name}' needs {{low, high}} and optionally step and log; got {spec}")
            dim = Dimension(name, low=spec["low"], high=spec["high"], step=spec.get("step"), log=bool(spec.get("log", False)))
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (dim.low, dim.high)) \
                    or dim.low >= dim.high:
                raise MediError(f"{where}: '{name}' needs numbers low < high, got {spec}")
        else:
            raise MediError(f"{where}: '{name}' must be a list of choices or {{low, high, step, log}}, got {spec!r}")
        for value in dim.ends():
            config_mod.override(cfg, {name: value}, where=f"{where} ({name}: {value!r})")
        dims.append(dim)
    if method is not None:
        dims = [d for d in dims if d.name not in inert(cfg, method)]
        if not dims:
            raise MediError(f"{where}: no param of the space can change method '{method}' "
                            f"(left out: {', '.join(sorted(inert(cfg, method)))})")
    return dims


def inert(cfg: Config, method: str) -> set[str]:
    """Params that cannot change a method's figures: the site strategy without site conditioning, attribute
    embeddings and their dropout without any attribute."""
    attributes = cfg.variant(cfg.probe.models[method])
    out = set() if "tss" in attributes else {"probe.strategy", "model.site_pathway"}
    if not attributes:
        out |= {"model.d_e", "model.attribute_dropout", "model.continuous", "model.nested_dropout",
                "model.metadata_route", "sample.metadata_guidance"}
    return out


def study_name(cfg: Config, method: str) -> str:
    return f"{cfg.sweep.study}-{method}"


def trial_config(cfg: Config, values: dict[str, Any]) -> Config:
    return config_mod.override(cfg, values, where=f"{cfg.source_path}: sweep trial {values}")


def pairs_only(objectives) -> bool:
    """Whether every objective is a figure of the unseen-pairs evaluation (its trials fit no probe)."""
    return bool(objectives) and all(o.startswith("pairs_") for o in objectives)


def split_of(objectives) -> str:
    """Where the objectives are measured: the validation sites, or (unseen-pairs figures alone) training sites."""
    return "unseen-pairs grid (training sites)" if pairs_only(objectives) else "validation"


def scope(objectives) -> str:
    """`split_of` for titles."""
    split = split_of(objectives)
    return "on the validation sites" if split == "validation" else f"on the {split}"


def objective_value(tasks: dict[str, dict], objective: str, method: str) -> float:
    """The objective over the tasks scored so far: the mean of the method's validation figure (gain: minus
    none's)."""
    figures = [t["validation"]["arms"] for t in tasks.values() if "arms" in t.get("validation", {})]
    if not figures:
        raise MediError("sweep: no task has validation sites (a class needs two or more holdout sites to give one "
                        "to validation; see split.validation_fraction and artifacts/splits/sites.csv)")
    if objective == "gain":
        return float(np.mean([m[method]["tss_avg"] - m["none"]["tss_avg"] for m in figures]))
    return float(np.mean([m[method][objective] for m in figures]))
