import argparse

import pytest
import yaml

from raysemi.config import (FIELDS, TrainConfig, YamlLoader, add_config_arguments, from_dict, load_yaml, resolve,
                            save_yaml)
from raysemi.errors import UserError


def test_reference_defaults():
    c = TrainConfig()
    assert (c.batch_size, c.labeled_bs, c.base_lr, c.ema_decay, c.consistency, c.consistency_rampup) == \
        (24, 12, 0.01, 0.99, 0.1, 200.0)
    assert (c.patch_size, c.eval_interval, c.ict_alpha, c.dan_lr, c.uncertainty_passes) == ((256, 256), 200, 0.2, 1e-4, 8)


def test_yaml_round_trip(tmp_path):
    c = TrainConfig(method="mean_teacher", patch_size=(64, 32), ema_decay=0.95).validate()
    path = save_yaml(c, tmp_path / "c.yaml")
    assert load_yaml(path) == c


def test_saved_config_leaves_out_the_test_suites_fault_switch_while_it_is_off(tmp_path):
    path = save_yaml(TrainConfig(method="mean_teacher").validate(), tmp_path / "c.yaml")
    text = path.read_text()
    assert "fault_nan_at" not in text and "ema_decay: 0.99" in text
    assert load_yaml(path) == TrainConfig(method="mean_teacher")
    on = save_yaml(TrainConfig(fault_nan_at=5), tmp_path / "on.yaml")  # a run that diverges on purpose says so
    assert "fault_nan_at: 5" in on.read_text() and load_yaml(on).fault_nan_at == 5


def test_every_field_is_a_cli_flag_and_cli_overrides_yaml(tmp_path):
    p = argparse.ArgumentParser()
    p.add_argument("--config")
    add_config_arguments(p)
    flags = {a for action in p._actions for a in action.option_strings}
    for name in FIELDS:
        assert "--" + name.replace("_", "-") in flags
    (tmp_path / "c.yaml").write_text("method: mean_teacher\nbatch_size: 8\nlabeled_bs: 4\nema_decay: 0.9\n")
    args = p.parse_args(["--config", str(tmp_path / "c.yaml"), "--ema-decay", "0.95", "--patch-size", "64", "64"])
    c = resolve(args, args.config)
    assert (c.method, c.batch_size, c.ema_decay, c.patch_size) == ("mean_teacher", 8, 0.95, (64, 64))


def test_aliases_resolve():
    c = from_dict({"DAN_lr": 0.001, "method": "dan"}).validate()
    assert c.dan_lr == 0.001 and c.method == "adversarial"


@pytest.mark.parametrize("values,match", [
    ({"batchsize": 3}, "batchsize: unknown config key.*batch_size"),
    # names other tools use get the field they mean, and every key says where the valid ones are
    ({"learning_rate": 0.01}, r"learning_rate: unknown config key \(did you mean 'base_lr'\?\); expected one of the "
                              r"config fields, the long flags of `python -m raysemi.train --help` written with _ for -"),
    ({"max_iter": 100}, r"max_iter: unknown config key \(did you mean 'max_iterations'\?\)"),
    ({"batch_size": "big"}, "batch_size: 'big' has the wrong type; expected an integer"),
    ({"base_lr": True}, "base_lr: true has the wrong type"),  # spelled as in the YAML file
    ({"max_iterations": None}, "max_iterations: null has the wrong type; expected an integer"),
    ({"base_lr": "nan"}, "base_lr: 'nan' has the wrong type; expected a number"),
    ({"max_iterations": "1.5e3x"}, "max_iterations: '1.5e3x' has the wrong type"),
    ({"patch_size": [1, 2, 3]}, "patch_size"),
])
def test_wrong_keys_and_types(values, match):
    with pytest.raises(UserError, match=match):
        from_dict(values, source="x.yaml")


def test_text_that_looks_like_a_number_round_trips(tmp_path):
    c = TrainConfig(run_name="1e5", experiment="2.0e3", data="3.5")
    path = save_yaml(c, tmp_path / "c.yaml")
    assert load_yaml(path) == c
    # a YAML 1.2 reader, which takes bare 1e5 for a number, reads them as text too: they are quoted
    saved = yaml.load(path.read_text(), Loader=YamlLoader)
    assert (saved["run_name"], saved["experiment"], saved["data"]) == ("1e5", "2.0e3", "3.5")
    (tmp_path / "bad.yaml").write_text("run_name: 1.5\n")
    with pytest.raises(UserError, match=r"run_name: 1.5 has the wrong type; expected a string \(in quotes"):
        load_yaml(tmp_path / "bad.yaml")


def test_numbers_yaml_reads_as_strings_are_numbers(tmp_path):
    """PyYAML (YAML 1.1) reads `1e-3` and `3e4` as strings: they are still the numbers meant."""
    path = tmp_path / "c.yaml"
    path.write_text("base_lr: 1e-3\nmax_iterations: 3e4\nema_decay: '0.95'\n")
    c = load_yaml(path)
    assert (c.base_lr, c.max_iterations, c.ema_decay) == (0.001, 30000, 0.95)
    assert isinstance(c.max_iterations, int)


@pytest.mark.parametrize("field,value,match", [
    ("method", "magic", "method: 'magic' is invalid; expected one of supervised"),
    ("ema_decay", 1.0, r"ema_decay: 1.0 is invalid; expected a number in \[0, 1\)"),
    ("consistency", -1.0, "consistency"),
    ("ict_alpha", 0.0, "ict_alpha"),
    ("uncertainty_passes", 0, "T >= 1"),
    ("uncertainty_copies", 0, r"uncertainty_copies: 0 is invalid; expected an integer >= 1"),
    ("dan_lr", 0.0, "dan_lr"),
    ("patch_size", (30, 30), "multiples of 16"),
    ("labeled_patients", 0, "labeled_patients"),
    ("schedules", "bugdet", "schedules: 'bugdet' is invalid; expected 'reference' or 'budget'"),
])
def test_validation_names_field_value_and_expectation(field, value, match):
    with pytest.raises(UserError, match=match):
        TrainConfig(method="mean_teacher", **{field: value}).validate(source="cfg.yaml") if field != "method" \
            else TrainConfig(method=value).validate(source="cfg.yaml")


def test_labeled_bs_must_leave_room_for_unlabeled():
    with pytest.raises(UserError, match="labeled_bs: 24 is invalid"):
        TrainConfig(method="mean_teacher", labeled_bs=24).validate()
    TrainConfig(method="supervised", labeled_bs=24).validate()  # the baseline draws labeled batches only
