import pytest

from fakeprint.core.errors import FakeprintError
from fakeprint.engine.config import DEFAULTS, load_config, preset_names

REPORT = {  # DESIGN.md section 1
    "skipconcnn": dict(batch_size=8, lr=5e-4, weight_decay=1e-4, label_smoothing=0.0, plateau_patience=5,
                       plateau_factor=0.5, epochs=200, early_stop=25),
    "threecnn": dict(batch_size=16, lr=5e-4, weight_decay=1e-4, label_smoothing=0.0, plateau_patience=15,
                     plateau_factor=0.8, epochs=200, early_stop=15),
    "ensemblecnn": dict(batch_size=4, lr=1e-4, weight_decay=1e-4, label_smoothing=0.1, plateau_patience=5,
                        plateau_factor=0.5, epochs=80, early_stop=5),
}


@pytest.mark.parametrize("preset", REPORT)
def test_presets_carry_the_report_table(preset):
    cfg = load_config(preset)
    for key, value in REPORT[preset].items():
        assert cfg[key] == pytest.approx(value), key
    assert cfg["optimizer"] == "adam" and cfg["scheduler"] == "plateau"
    assert cfg["hflip"] and cfg["rotation"] == 15


def test_presets_are_listed():
    assert {"threecnn", "threecnn_dilated", "skipconcnn", "ensemblecnn", "demo"} <= set(preset_names())


def test_overrides_are_parsed_as_yaml_values():
    cfg = load_config("threecnn", ["lr=0.01", "hflip=false", "model_args={c3: 64}", "base_checkpoints=[a,b]"])
    assert cfg["lr"] == 0.01 and cfg["hflip"] is False
    assert cfg["model_args"] == {"c3": 64} and cfg["base_checkpoints"] == ["a", "b"]


def test_one_model_argument_is_set_and_the_presets_others_are_kept():
    preset = load_config("statmlp_v6_h2")["model_args"]
    cfg = load_config("statmlp_v6_h2", ["model_args.dropout=0.5", "model_args.width_new=3"])
    assert cfg["model_args"] == {**preset, "dropout": 0.5, "width_new": 3} and preset["dropout"] == 0.3
    # the whole mapping still replaces it, and a later single argument applies on top
    assert load_config("statmlp_v6_h2", ["model_args={hidden: 8}", "model_args.layers=1"])["model_args"] == {
        "hidden": 8, "layers": 1}
    with pytest.raises(FakeprintError, match="model_args.NAME=VALUE"):
        load_config("statmlp_v6_h2", ["model_args.=1"])


def test_a_path_to_a_yaml_file_works(tmp_path):
    p = tmp_path / "mine.yaml"
    p.write_text("model: fpnet_tiny\nepochs: 3\n")
    cfg = load_config(p)
    assert cfg["model"] == "fpnet_tiny" and cfg["epochs"] == 3 and cfg["lr"] == DEFAULTS["lr"]


@pytest.mark.parametrize("override,message", [
    (["lrr=1"], "unknown config key 'lrr'"),
    (["lr=fast"], "lr must be a number"),
    (["hflip=3"], "hflip must be true or false"),
    (["optimizer=rmsprop"], "optimizer must be one of"),
    (["epochs=0"], "epochs must be at least 1"),
    (["micro_batch=-1"], "micro_batch must be 0"),
    (["micro_batch=2.5"], "micro_batch must be 0"),
    (["noequals"], "expected key=value"),
])
def test_bad_overrides_are_refused_with_the_key_named(override, message):
    with pytest.raises(FakeprintError, match=message):
        load_config("threecnn", override)


def test_unknown_preset_lists_the_presets():
    with pytest.raises(FakeprintError, match="presets: .*threecnn"):
        load_config("nosuchpreset")


def test_the_fast_dilated_preset_is_the_recipe_that_was_measured():
    """threecnn_dilated_fast is exactly what round 3 of the recipe study trained (experiments/gpu_round3.py,
    dilated_fast_sK): the fpnet_cpu recipe on the report's dilated ThreeCNN and augmentation, 70 epochs."""
    round3 = {"model": "threecnn_dilated", "model_args": {}, "batch_size": 32, "hflip": True, "vflip": False,
              "rot90": False, "rotation": 15.0, "epochs": 70}
    assert load_config("threecnn_dilated_fast") == load_config("fpnet_cpu", round3)
    assert "experiments/threecnn_dilated_fast" in preset_names(experiments=True)


def test_the_width_32_preset_is_the_recipe_of_the_shipped_fast_model():
    """fast (was threecnn_dilated_w32) is exactly round 6's plain_w32_s0 (experiments/gpu_round6.py, the run shipped
    as the default model until round 10, now `fast`): threecnn_dilated_fast at width 32 (c3 128), 69 epochs, no
    distillation."""
    measured = load_config("threecnn_dilated_fast", {"model_args": {"width": 32, "c3": 128}, "epochs": 69})
    assert load_config("fast") == measured
    assert load_config("fast")["model_args"] == {"width": 32, "c3": 128}


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["threecnn_dilated_fast", "threecnn_dilated_w32"])
def test_the_fast_dilated_presets_train(cli, tiny_data, tmp_path, preset):
    import json

    proc = cli("train", "--data", str(tiny_data), "--config", preset, "--set", "epochs=1",
               "--set", "batch_size=10", "--set", "threads=1", "--set", "progress=false", "--out", str(tmp_path / "r"))
    assert proc.returncode == 0, proc.stderr
    meta = json.loads((tmp_path / "r" / "last.json").read_text())
    assert meta["model"] == "threecnn_dilated" and meta["tta"] == "flip"
    assert meta["parameters"] == {"threecnn_dilated_fast": 896_773, "threecnn_dilated_w32": 356_613}[preset]
