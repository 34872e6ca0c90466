"""The search's proposer: Optuna's TPE through Ray Tune's `OptunaSearch`, told which trials ASHA
stopped and which diverged.

Tune hands the searcher a stopped trial's last result as if the trial had finished, and
`OptunaSearch` tells Optuna it COMPLETE with that value: TPE would then weigh a config stopped
at the first rung by its Dice there against the completed trials' Dice at the full budget.
Optuna's TPE ranks every COMPLETE trial above every PRUNED one, the PRUNED ones by how far they
got (their last intermediate step), then by their last value, and one without intermediate
values last of all. So a trial is told:
- completed: COMPLETE with its last Dice;
- stopped by ASHA: PRUNED, its Dice at each report as intermediate values (the last one too,
  which Tune passes only with the end): ASHA's own verdict;
- diverged, or a config no strategy can run: PRUNED with no intermediate values, below every other
  trial (as COMPLETE with Dice 0 it would rank above every stopped trial);
- errored: FAIL, as before (TPE leaves it out).

The reports are held here until the trial ends, not given to Optuna as they come: a running
trial is in TPE's worse group whatever it reported (`constant_liar`), and no Optuna pruner reads
them, so nothing is lost, and a trial that later diverges brings none of its earlier Dice.
"""

from __future__ import annotations

from typing import Any

from ray.tune.result import TRAINING_ITERATION
from ray.tune.search.optuna import OptunaSearch


class AshaAwareOptunaSearch(OptunaSearch):
    """`OptunaSearch` telling Optuna how each trial ended (module docstring). `time_attr` is the
    results' iteration count; a trial short of `max_iterations` of it was stopped early."""

    def __init__(self, *args: Any, max_iterations: int, time_attr: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.max_iterations, self.time_attr = max_iterations, time_attr
        self.held: dict[str, list[dict]] = {}  # trial id -> its reports so far, as `kept` (saved with the searcher)

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        self.held.setdefault(trial_id, []).append(self.kept(result))

    def kept(self, result: dict) -> dict:
        """What Optuna is given of a result: its metric at its report's number."""
        return {self.metric: result[self.metric], TRAINING_ITERATION: result[TRAINING_ITERATION]}

    def ending(self, result: dict | None, error: bool) -> str:
        """How a trial ended, from its last result: 'failed', 'diverged', 'stopped' or 'completed'."""
        if error:
            return "failed"
        if result is None:  # ended before any result (stopped while pending or paused)
            return "stopped"
        if result.get("diverged"):
            return "diverged"
        return "stopped" if result.get(self.time_attr, self.max_iterations) < self.max_iterations else "completed"

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        held = self.held.pop(trial_id, [])
        how = self.ending(result, error)
        if how in ("stopped", "completed"):
            # the last result comes only here (Tune decides the trial's end on it)
            if result and (not held or held[-1][TRAINING_ITERATION] != result[TRAINING_ITERATION]):
                held.append(self.kept(result))
            for r in held:
                super().on_trial_result(trial_id, r)  # its intermediate values
        # `OptunaSearch` tells a trial that ended with a value as COMPLETE, with none and an error as
        # FAIL, with none and no error as PRUNED
        super().on_trial_complete(trial_id, result if how == "completed" else None, how == "failed")
