import math

import pytest

from raysemi.schedules import consistency_weight, ema_alpha, poly_lr, sigmoid_rampup, uncertainty_threshold


@pytest.mark.parametrize("it,expected", [(0, 0.01), (50, 0.01 * 0.5 ** 0.9), (100, 0.0)])
def test_poly_lr(it, expected):
    assert poly_lr(it, 100, 0.01) == pytest.approx(expected)


@pytest.mark.parametrize("current,length,expected", [
    (0, 200, math.exp(-5)), (100, 200, math.exp(-5 * 0.25)), (200, 200, 1.0), (500, 200, 1.0), (3, 0, 1.0)])
def test_sigmoid_rampup(current, length, expected):
    assert sigmoid_rampup(current, length) == pytest.approx(expected)


def test_consistency_weight_uses_iteration_floor_150():
    # iterations 0..149 share ramp unit 0; 150 starts unit 1
    assert consistency_weight(149, 0.1, 200) == pytest.approx(0.1 * math.exp(-5))
    assert consistency_weight(150, 0.1, 200) == pytest.approx(0.1 * math.exp(-5 * (1 - 1 / 200) ** 2))
    assert consistency_weight(30000, 0.1, 200) == pytest.approx(0.1)


@pytest.mark.parametrize("it,decay,expected", [(0, 0.99, 0.0), (1, 0.99, 0.5), (9, 0.99, 0.9), (1000, 0.99, 0.99)])
def test_ema_alpha(it, decay, expected):
    assert ema_alpha(it, decay) == pytest.approx(expected)


def test_uncertainty_threshold_ramps_from_start_to_end():
    assert uncertainty_threshold(0, 1000) == pytest.approx((0.75 + 0.25 * math.exp(-5)) * math.log(2))
    assert uncertainty_threshold(1000, 1000) == pytest.approx(math.log(2))
    assert uncertainty_threshold(1000, 1000, 0.5, 0.9) == pytest.approx(0.9 * math.log(2))


# -- schedules against the budget ------------------------------------------------------------------
def test_reference_schedules_scaled_to_a_budget_are_the_quick_starts():
    from raysemi.schedules import scaled_to_budget

    assert (scaled_to_budget(150, 300), scaled_to_budget(1000, 300)) == (2, 10)  # the quick start's
    assert (scaled_to_budget(150, 30_000), scaled_to_budget(1000, 30_000)) == (150, 1000)
    assert scaled_to_budget(1000, 10) == 1  # never 0


def test_ramp_reached_is_the_weight_at_the_last_iteration():
    from raysemi.schedules import ramp_reached

    assert ramp_reached(30_000, 200, 150) == pytest.approx(consistency_weight(29_999, 1.0, 200, 150))
    assert ramp_reached(30_000, 200, 150) == pytest.approx(math.exp(-5 * (1 / 200) ** 2))  # unit 199 of 200
    assert ramp_reached(1000, 200, 150) == pytest.approx(math.exp(-5 * (1 - 6 / 200) ** 2))
    assert ramp_reached(300, 200, 2) == pytest.approx(math.exp(-5 * (1 - 149 / 200) ** 2))


def test_short_budget_note_says_what_stays_off_and_the_scaled_values():
    from raysemi.schedules import ramp_reached, schedule_lengths, short_budget_note

    assert short_budget_note(30_000, {"mean_teacher": 0.99}, {"mean_teacher": 1000}) is None
    assert short_budget_note(300, {"mean_teacher": 0.72}, {"mean_teacher": 10}) is None  # the quick start
    assert short_budget_note(300, {"mean_teacher": 0.5}, {"mean_teacher": 149}) is None  # the limits
    note = short_budget_note(1000, {"mean_teacher": 0.0094, "entropy_minimization": 0.09}, {"mean_teacher": 1000})
    assert note == ("note: in 1,000 iterations the consistency weight reaches at most 9% of --consistency by the last "
                    "iteration (mean_teacher, entropy_minimization; its ramp is --consistency-rampup units of "
                    "--rampup-interval iterations); mean_teacher's consistency term is off throughout (--mt-warmup "
                    "1000). The reference's schedules (set for 30,000 iterations) scaled to this budget: "
                    "--rampup-interval 5 --mt-warmup 33; or --schedules budget with --rampup-interval 150 --mt-warmup "
                    "1000 (the reference's values, the defaults), which it scales to any --max-iterations (README: "
                    "Short budgets)")
    assert ": --rampup-interval 5; or --schedules budget" in short_budget_note(1000, {"mean_teacher": 0.49}, {})
    # the suggested ramp spans the run whatever its units: 2000 of them over 10,000 iterations is 5 a unit
    assert ": --rampup-interval 5; or" in short_budget_note(10_000, {"mean_teacher": 0.1}, {}, rampup=2000)
    # fewer iterations than units: units of one iteration, one per iteration
    assert ": --rampup-interval 1 --consistency-rampup 40; or" in short_budget_note(40, {"mean_teacher": 0.01}, {})
    # with --schedules budget, the values it scales: the reference's own for its 200 units
    assert short_budget_note(1000, {"mean_teacher": 0.01}, {"mean_teacher": 667}, mode="budget") == (
        "note: in 1,000 iterations the consistency weight reaches at most 1% of --consistency by the last iteration "
        "(mean_teacher; its ramp is --consistency-rampup units of --rampup-interval iterations of the reference's "
        "30,000, scaled to this run by --schedules budget); mean_teacher's consistency term is off for the first 667 "
        "of them. The reference's schedules, which --schedules budget scales to this budget: --rampup-interval 150 "
        "--mt-warmup 1000 (README: Short budgets)")
    # more units than the reference's 30,000 iterations: units of one of them, 30,000 of them
    assert ": --rampup-interval 1 --consistency-rampup 30000 (README" in short_budget_note(
        1000, {"m": 0.0}, {}, rampup=100_000, mode="budget")
    # and the suggestion is enough, in iterations or (budget) scaled from the reference's
    for budget, rampup, mode in ((40, 200, "reference"), (1000, 200, "reference"), (10_000, 2000, "reference"),
                                 (300, 20, "reference"), (1000, 1900, "reference"), (1000, 1400, "reference"),
                                 (1000, 200, "budget"), (300, 45_000, "budget"), (300, 100_000, "budget")):
        note = short_budget_note(budget, {"m": 0.0}, {}, rampup, mode=mode)
        fixes = [(note.split("to this budget: ")[1].split(";")[0].split(" (README")[0], mode)]
        if mode == "reference":  # and its alternative, under --schedules budget
            fixes.append((note.split("; or --schedules budget with ")[1].split(",")[0].split(" (the")[0], "budget"))
        for fix, fix_mode in fixes:
            suggested = fix.split()
            values = dict(zip(suggested[::2], map(float, suggested[1::2])))
            interval, _ = schedule_lengths(int(values["--rampup-interval"]), 0, budget, fix_mode)
            reached = ramp_reached(budget, values.get("--consistency-rampup", rampup), interval)
            assert reached > 0.9, (budget, rampup, mode, fix)
    only_warmup = short_budget_note(1000, {"mean_teacher": 0.8}, {"mean_teacher": 500})
    assert "off for the first 500 of them (--mt-warmup 500)" in only_warmup and "ramp" not in only_warmup
    assert ": --mt-warmup 33; or --schedules budget with --mt-warmup 1000 (the reference's value, the default), " \
        "which" in only_warmup
    # a ramp of 2000 units: the reference's 150 would not do under --schedules budget either
    assert ": --rampup-interval 5; or --schedules budget with --rampup-interval 15, which" in short_budget_note(
        10_000, {"m": 0.0}, {}, rampup=2000)
    # under budget, a scaled warm-up's floor of 1 is not said (nothing would change it)
    assert short_budget_note(2, {}, {"mean_teacher": 1}, mode="budget") is None
    assert short_budget_note(1, {"m": 0.1}, {}).startswith("note: in 1 iteration the")


def test_values_budget_would_scale_again_are_said_with_what_they_become():
    """Under --schedules budget the quick start's hand-scaled --rampup-interval 2 --mt-warmup 10
    count as set for 30,000 iterations: at 300 a ramp full by iteration 4 (200 units of 0.02) and a
    1-iteration warm-up. Values a user may mean (the reference's, the short-budget note's own
    alternative of 15 for a 2,000-unit ramp, no warm-up) are not said; a search counts the longest
    ramp its spaces can draw and leaves out what they draw."""
    from raysemi.config import TrainConfig
    from raysemi.schedules import scaled_again_note
    from raysemi.search_space import Dist, load_spaces
    from raysemi.train import budget_note

    note = scaled_again_note(300, 2, 10, 200 * 2)
    assert note == ("note: --schedules budget counts --rampup-interval 2 --mt-warmup 10 as set for 30,000 iterations "
                    "and scales them: in 300 iterations the consistency weight is at its full value by iteration 4 "
                    "and the warm-up is 1 iteration. If they were scaled to this budget by hand, give the reference's "
                    "--rampup-interval 150 --mt-warmup 1000 (the defaults) and let it scale them (README: Short "
                    "budgets)")
    # iteration 13 counts 195 units of 1/15, 14 counts 210: full by 14
    assert "value by iteration 14. If it was scaled" in scaled_again_note(1000, 2, 1000, 200 * 2)
    assert "--mt-warmup 10 as set" in scaled_again_note(1000, 150, 10, 200 * 150)
    assert "warm-up is 10 iterations" in scaled_again_note(30_000, 150, 10, 200 * 150)
    for quiet in [(300, 150, 1000, 200 * 150), (300, 15, 1000, 2000 * 15), (300, 2, 0, 0.0), (300, None, None, 400)]:
        assert scaled_again_note(*quiet) is None, quiet
    config = TrainConfig(method="mean_teacher", max_iterations=300, schedules="budget", rampup_interval=2, mt_warmup=10)
    assert budget_note(config) == note
    assert budget_note(config.replace(schedules="reference")) is None  # as given: the quick start, no note
    assert budget_note(config.replace(method="supervised")) is None
    assert "--mt-warmup" not in budget_note(config.replace(method="entropy_minimization"))  # it has no warm-up
    # mean teacher's space draws --consistency-rampup up to 400: its longest ramp is 400 x 2
    searched = budget_note(config, ["mean_teacher", "supervised"], load_spaces(["mean_teacher", "supervised"]))
    assert "full value by iteration 8 and" in searched
    drawn = {"mean_teacher": {"rampup_interval": Dist("choice", values=(1, 2)), "mt_warmup": Dist("int", 5, 20)}}
    assert budget_note(config, ["mean_teacher"], drawn) is None


def test_a_searchs_budget_note_counts_the_soonest_ramp_its_spaces_can_draw():
    """A search whose spaces sample --consistency-rampup down to 20 ramps up fully in 3,000
    iterations (no note); the same strategy trained at its base config does not (a note)."""
    from raysemi.config import TrainConfig
    from raysemi.search_space import Dist, load_spaces
    from raysemi.train import budget_note

    base = TrainConfig(method="mean_teacher", max_iterations=3000)
    assert budget_note(base, ["mean_teacher"], load_spaces(["mean_teacher"])) is None
    assert "reaches at most 2% of --consistency" in budget_note(base)
    assert budget_note(base.replace(method="supervised")) is None  # nothing ramps
    # a numeric choice written as text counts as its number
    text = {"mean_teacher": {"consistency_rampup": Dist("choice", values=("200", 20)),
                             "rampup_interval": Dist("choice", values=(150, "1.5e2"))}}
    assert budget_note(base, ["mean_teacher"], text) is None
    text["mean_teacher"]["consistency_rampup"] = Dist("choice", values=("200", "1e3"))
    assert "reaches at most 2% of --consistency" in budget_note(base, ["mean_teacher"], text)
    short = budget_note(base.replace(max_iterations=300), ["supervised", "mean_teacher"],
                        load_spaces(["supervised", "mean_teacher"]))
    assert short.startswith("note: in 300 iterations the consistency weight reaches at most 1% of --consistency by "
                            "the last iteration (mean_teacher; ")
    assert "supervised" not in short and ": --rampup-interval 2 --mt-warmup 10; or --schedules budget" in short
    # at 100 iterations a run is told to shorten its ramp to the run (units of 1, 100 of them); a
    # search whose space draws --consistency-rampup cannot be (the draws override the flag): it is
    # told the reference's interval scaled, and the units are said to be drawn
    run = budget_note(base.replace(max_iterations=100))
    assert ": --rampup-interval 1 --consistency-rampup 100 --mt-warmup 3; or" in run and "drawn" not in run
    searched = budget_note(base.replace(max_iterations=100), ["mean_teacher"], load_spaces(["mean_teacher"]))
    assert ": --rampup-interval 1 --mt-warmup 3; or --schedules budget with --rampup-interval 150 --mt-warmup 1000 " \
        "(the reference's values, the defaults)" in searched
    assert "its ramp is --consistency-rampup units (drawn by the spaces) of --rampup-interval iterations" in searched
    assert "--consistency-rampup 100" not in searched
    # a run set to a 2,000-unit ramp is told the interval that spans its run; a search drawing the units, 150 scaled
    assert ": --rampup-interval 5; or --schedules budget with --rampup-interval 15," in budget_note(
        base.replace(max_iterations=10_000, consistency_rampup=2000.0, mt_warmup=0))
    assert ": --rampup-interval 50; or --schedules budget with --rampup-interval 150 " in budget_note(
        base.replace(max_iterations=10_000, consistency_rampup=2000.0, mt_warmup=0), ["mean_teacher"],
        {"mean_teacher": {"consistency_rampup": Dist("uniform", 1000.0, 3000.0)}})


def test_budget_schedules_scale_the_reference_lengths_to_the_run():
    """`schedules: budget` reads --rampup-interval and --mt-warmup as set for the reference's
    30,000 iterations: at 30,000 the reference's own, at 300 a ramp of 1.5-iteration units that
    spans the run (a float: 200 x 2 would not) and a 10-iteration warm-up; 'reference' leaves them."""
    from raysemi.schedules import ramp_reached, schedule_lengths

    assert schedule_lengths(150, 1000, 30_000, "budget") == (150, 1000)
    assert schedule_lengths(150, 1000, 300, "budget") == (1.5, 10)
    assert schedule_lengths(150, 1000, 300, "reference") == (150, 1000)
    assert ramp_reached(300, 200, 1.5) == pytest.approx(math.exp(-5 * (1 / 200) ** 2))  # unit 199 of 200
    assert consistency_weight(299, 0.1, 200, 1.5) == pytest.approx(0.1 * math.exp(-5 * (1 / 200) ** 2))
    interval = schedule_lengths(150, 1000, 6, "budget")[0]  # 0.03: 33 1/3 units an iteration
    assert consistency_weight(3, 0.1, 200, interval) == pytest.approx(0.1 * math.exp(-5 * (1 - 100 / 200) ** 2))
    assert schedule_lengths(150, 1000, 10, "budget")[1] == 1  # a scaled warm-up is never 0 ...
    assert schedule_lengths(150, 0, 10, "budget")[1] == 0  # ... unless there is none
    with pytest.raises(ValueError, match="schedules: 'bugdet'"):
        schedule_lengths(150, 1000, 300, "bugdet")


def test_budget_ramp_units_start_where_the_references_scaled_down_do():
    """Unit k of a budget-scaled ramp starts at the first iteration i with i * 30,000 >= k * 150 * N,
    at every budget N: an exact quotient. A float product lands some boundaries a step late (at 12
    iterations, 150 x 12 / 30,000 = 0.06000000000000001, and iteration 3 counted 49 units, not 50)."""
    from raysemi.schedules import schedule_lengths

    assert 3 // schedule_lengths(150, 1000, 12, "budget")[0] == 50
    for budget in range(10, 200):
        for rampup_interval in (150, 7):
            interval = schedule_lengths(rampup_interval, 1000, budget, "budget")[0]
            units = [i // interval for i in range(budget)]
            assert units == [i * 30_000 // (rampup_interval * budget) for i in range(budget)], (budget, rampup_interval)


def test_a_strategy_built_with_budget_schedules_ramps_over_its_run():
    from raysemi.config import TrainConfig
    from raysemi.loop import build_strategy
    from raysemi.train import budget_note

    config = TrainConfig(method="mean_teacher", max_iterations=300, schedules="budget")
    _, strategy = build_strategy(config)
    assert (strategy.rampup_interval, strategy.warmup) == (1.5, 10)
    assert strategy.step_inputs(9)["consistency_weight"] == 0.0 and strategy.step_inputs(10)["consistency_weight"] > 0
    assert strategy.step_inputs(299)["consistency_weight"] == pytest.approx(0.1, rel=1e-3)
    assert budget_note(config) is None and budget_note(config.replace(schedules="reference")) is not None
    _, reference = build_strategy(config.replace(schedules="reference"))
    assert (reference.rampup_interval, reference.warmup) == (150, 1000)
