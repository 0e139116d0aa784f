"""Memory-loss recovery ρ of a run initialised from a memory model (docs/ablations.md#memory-loss-recovery).

Three runs start from the same trained memory model and train the same way except for the encoder:
the no-memory control (``model.use_memory=False``), one with the loaded encoder frozen
(``train.frozen`` names ``encoder``) and one with it trainable. At each evaluation step t

    ρ(t) = (L_nomem(t) − L_frozen(t)) / (L_nomem(t) − L_trainable(t)),

the share of the loss that memories save with a trainable encoder which a frozen one saves as well
(1: freezing costs nothing; 0: a frozen encoder's memories are no better than none).

The run being trained supplies its own role's loss (nomem with ``model.use_memory=False``, else
frozen or trainable, read off its frozen groups); ``train.recovery_runs='nomem=DIR,trainable=DIR'``
(for a frozen run; the two roles it is not, in general) names the finished runs of the other roles, whose ``results.json`` holds their evaluation losses by step
(``eval_history``). ρ is computed at the steps all three evaluated.
"""
from __future__ import annotations

import json
import math
import os
from typing import Any

from mixers_jax.config import field
from mixers_jax.curriculum import Stage, csv_names
from mixers_jax.errors import UserError

ROLES = ("nomem", "frozen", "trainable")
MEMORY_KINDS = ("memory",)  # models whose memories come from an encoder
RESULTS_FILE = "results.json"


def rho(l_nomem: float, l_frozen: float, l_trainable: float) -> float:
    """(L_nomem − L_frozen) / (L_nomem − L_trainable); NaN when memories save nothing (the
    denominator is 0)."""
    gap = l_nomem - l_trainable
    return (l_nomem - l_frozen) / gap if gap != 0 else math.nan


def own_role(model_cfg: Any, stage: Stage) -> str:
    """'nomem' for the no-memory control, 'frozen' when the stage freezes the encoder group, else
    'trainable'."""
    if not field(model_cfg, "use_memory", True):
        return "nomem"
    return "frozen" if "encoder" in csv_names(stage.train.frozen) else "trainable"


def parse_runs(text: str) -> dict[str, str]:
    """'nomem=DIR,trainable=DIR' -> {role: absolute DIR}; UserError for a malformed entry."""
    out = {}
    for item in csv_names(text):
        role, sep, path = item.partition("=")
        role = role.strip()
        if not sep or role not in ROLES or not path.strip():
            raise UserError(f"train.recovery_runs entries look like 'ROLE=DIR' with ROLE one of "
                            f"{ROLES}, got {item!r}")
        out[role] = os.path.abspath(path.strip())
    return out


def eval_history(workdir: str) -> dict[int, float]:
    """{step: evaluation loss} from a finished run's results.json; UserError when it has none."""
    path = os.path.join(workdir, RESULTS_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            results = json.load(f)
    except FileNotFoundError:
        raise UserError(f"train.recovery_runs: {workdir} has no {RESULTS_FILE} (finish that run "
                        "first)") from None
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"train.recovery_runs: cannot read {path}: {e}") from None
    history = results.get("eval_history")
    if not history:
        raise UserError(f"train.recovery_runs: {path} has no eval_history (a run diverged, or one "
                        "made before evaluation losses were recorded by step)")
    return {int(step): float(loss) for step, loss in history}


class Recovery:
    """ρ(t) of one stage: the reference runs' losses by step and this run's role."""

    def __init__(self, role: str, references: dict[str, dict[int, float]], runs: dict[str, str]):
        self.role, self.references, self.runs = role, references, runs
        self.values: dict[int, float] = {}

    def at(self, step: int, loss: float) -> float | None:
        """ρ at ``step`` with this run's evaluation ``loss``; None when a reference run has no
        evaluation at that step."""
        if any(step not in ref for ref in self.references.values()):
            return None
        losses = {self.role: float(loss), **{r: ref[step] for r, ref in self.references.items()}}
        value = rho(losses["nomem"], losses["frozen"], losses["trainable"])
        self.values[step] = value
        return value

    def summary(self) -> dict[str, Any]:
        """What results.json records: this run's role, the reference runs and ρ by step."""
        return {"role": self.role, "runs": self.runs,
                "rho": [[step, value] for step, value in sorted(self.values.items())]}


def for_stage(model_cfg: Any, stage: Stage, source_config: Any | None) -> Recovery | None:
    """The stage's :class:`Recovery` when ``train.recovery_runs`` is set and the stage is
    initialised from a memory model (``source_config``: its init_from run's config); UserError
    unless the two other roles' runs are named and finished. None otherwise (see :func:`check`)."""
    runs = parse_runs(getattr(stage.train, "recovery_runs", ""))
    if not runs or source_config is None or field(source_config.model, "kind") not in MEMORY_KINDS:
        return None
    role = own_role(model_cfg, stage)
    wanted = set(ROLES) - {role}
    if set(runs) != wanted:
        raise UserError(f"train.recovery_runs: this run is the {role} one, so name the runs of "
                        f"{sorted(wanted)} (got {sorted(runs)})")
    return Recovery(role, {r: eval_history(path) for r, path in runs.items()}, runs)


def check(train_cfg: Any, recoveries: dict[int, Recovery | None]) -> None:
    """UserError when ``train.recovery_runs`` is set but no stage is initialised from a memory
    model (``recoveries``: :func:`for_stage` of every stage)."""
    if csv_names(train_cfg.recovery_runs) and not any(recoveries.values()):
        raise UserError("train.recovery_runs needs a run initialised from a memory model "
                        f"(train.init_from naming a workdir of kind {MEMORY_KINDS})")
