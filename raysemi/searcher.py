"""The search's proposer: Optuna's TPE through Ray Tune's `OptunaSearch`, told which trials ASHA
stopped.

Tune hands the searcher a stopped trial's last result as if the trial had finished, and
`OptunaSearch` tells Optuna it COMPLETE with that value: TPE would then weigh a config stopped
at the first rung by its Dice there against the completed trials' Dice at the full budget. A
stopped trial's Dice at each report goes to Optuna as intermediate values (the one it was stopped
at too, which Tune passes only with the end); told PRUNED instead, TPE ranks it below every completed trial and, among the stopped ones, by how far
it got and then by its last Dice: ASHA's own verdict. A trial that diverged stays COMPLETE with
Dice 0 (a bad config, not a short one); one that errored is FAIL, as before.
"""

from __future__ import annotations

from typing import Any

from ray.tune.search.optuna import OptunaSearch


class AshaAwareOptunaSearch(OptunaSearch):
    """`OptunaSearch` that tells Optuna a trial which ended short of `max_iterations` (counted in
    the results' `time_attr`), without diverging or failing, as PRUNED."""

    def __init__(self, *args: Any, max_iterations: int, time_attr: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.max_iterations, self.time_attr = max_iterations, time_attr

    def stopped_early(self, result: dict | None, error: bool) -> bool:
        """Whether a trial's last result is that of a trial the scheduler stopped."""
        return (bool(result) and not error and not result.get("diverged")
                and result.get(self.time_attr, self.max_iterations) < self.max_iterations)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if self.stopped_early(result, error):
            self.on_trial_result(trial_id, result)  # the result ASHA stopped it at comes only here
            result = None  # `OptunaSearch` tells a trial that ended with no value and no error as PRUNED
        super().on_trial_complete(trial_id, result, error)
