"""The config schema and load_config: shipped configs, defaults, and error messages that name the key."""

import copy
import os
from pathlib import Path

import pytest

from holopipe.config import ConfigError, load_config, schema, with_overrides

REPO = Path(__file__).resolve().parents[1]

MINIMAL = {
    "splits": {"train": {"source": "simulate", "n_holograms": 2, "seed": 1}},
    "optics": {"wavelength": 3.55e-7, "dx": 2.96e-6, "dy": 2.96e-6, "nx": 64, "ny": 64,
               "z_min": 0.001, "z_max": 0.003},
}


def with_change(change) -> dict:
    config = copy.deepcopy(MINIMAL)
    change(config)
    return config


def error_of(config) -> str:
    with pytest.raises(ConfigError) as excinfo:
        load_config(config)
    return str(excinfo.value)


@pytest.mark.parametrize("name", ["config.yaml", "holodec.yaml"])
def test_shipped_configs_validate(name):
    config = load_config(REPO / "config" / name)
    assert set(config) == set(schema()["properties"])  # every section present, defaulted or set
    assert config["optics"]["z_min"] < config["optics"]["z_max"]


def test_defaults_are_filled_without_touching_the_input():
    original = copy.deepcopy(MINIMAL)
    config = load_config(MINIMAL)
    assert MINIMAL == original
    simulate = config["simulate"]
    assert simulate["particles"] == [3, 12]
    assert simulate["diameter"] == {"distribution": "gamma", "gamma_lambda": 1.0e5, "gamma_mu": [1.0, 5.0],
                                    "min": 1.0e-5, "max": 7.0e-5}
    assert simulate["method"] == "angular_spectrum"
    assert simulate["slab_thickness"] == 1.0e-3
    assert simulate["pad"] == 64
    assert simulate["band_limit"] is True
    assert simulate["camera"] == {"noise": True, "electrons": 20000.0, "read_noise": 12.0,
                                  "gray_level": 128.0, "beam_waist": 2.0e-3}


def test_partial_section_keeps_given_values_and_fills_the_rest():
    config = load_config(with_change(lambda c: c.update(simulate={"camera": {"beam_waist": None}})))
    assert config["simulate"]["camera"]["beam_waist"] is None
    assert config["simulate"]["camera"]["electrons"] == 20000.0
    assert config["simulate"]["pad"] == 64


def test_defaults_are_not_shared_between_configs():
    first = load_config(MINIMAL)
    first["simulate"]["camera"]["noise"] = False
    first["simulate"]["particles"].append(99)
    second = load_config(MINIMAL)
    assert second["simulate"]["camera"]["noise"] is True
    assert second["simulate"]["particles"] == [3, 12]


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda c: c.update(colour="red"), "colour: unknown key"),
        (lambda c: c["optics"].update(wavelenght=1.0), "optics.wavelenght: unknown key"),
        (lambda c: c.update(simulate={"camera": {"gain": 2}}), "simulate.camera.gain: unknown key"),
        (lambda c: c["splits"]["train"].update(path="a.nc"), "splits.train.path: key not allowed"),
    ],
)
def test_unknown_key_is_named(change, expected):
    assert expected in error_of(with_change(change))


def test_wrong_type_names_the_key():
    message = error_of(with_change(lambda c: c["optics"].update(nx="wide")))
    assert "optics.nx: 'wide' is not of type 'integer'" in message


def test_yaml_text_exponent_gets_a_hint(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text((REPO / "config" / "config.yaml").read_text().replace("1.0e+5", "1e5"))
    message = error_of(path)
    assert "simulate.diameter.gamma_lambda: '1e5' is not of type 'number'" in message
    assert str(path) in message


def test_out_of_range_names_the_key():
    message = error_of(with_change(lambda c: c.update(simulate={"camera": {"electrons": -3}})))
    assert "simulate.camera.electrons: -3 is less than or equal to the minimum of 0" in message


def test_every_problem_is_reported():
    def change(config):
        config["optics"]["dx"] = -1.0
        config["simulate"] = {"pad": -1}

    message = error_of(with_change(change))
    assert "optics.dx" in message and "simulate.pad" in message


def test_z_range_must_be_increasing():
    message = error_of(with_change(lambda c: c["optics"].update(z_min=0.003, z_max=0.003)))
    assert "optics.z_min" in message and "optics.z_max" in message


@pytest.mark.parametrize(
    ("simulate", "expected"),
    [
        ({"particles": [5, 2]}, "simulate.particles"),
        ({"diameter": {"min": 1.0e-4}}, "simulate.diameter.min"),
        ({"diameter": {"gamma_mu": [3.0, 2.0]}}, "simulate.diameter.gamma_mu"),
    ],
)
def test_ranges_must_be_ordered(simulate, expected):
    assert expected in error_of(with_change(lambda c: c.update(simulate=simulate)))


def test_file_split_needs_a_path():
    message = error_of(with_change(lambda c: c["splits"].update(real={"source": "file"})))
    assert "splits.real: 'path' is a required property" in message


def test_file_split_with_path_is_valid():
    config = load_config(with_change(lambda c: c["splits"].update(real={"source": "file", "path": "r.nc"})))
    assert config["splits"]["real"] == {"source": "file", "path": "r.nc"}


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda c: c["splits"]["train"].pop("seed"), "splits.train: 'seed' is a required property"),
        (lambda c: c["splits"].update({"my-split": {"source": "file", "path": "a.nc"}}), "splits.my-split"),
        (lambda c: c.update(splits={}), "splits: {} should be non-empty"),
        (lambda c: c.pop("optics"), "'optics' is a required property"),
    ],
)
def test_split_and_section_rules(change, expected):
    assert expected in error_of(with_change(change))


def test_not_a_mapping(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("")
    assert "expected a mapping" in error_of(path)


def test_workflow_schema_is_a_relative_link_to_the_packaged_one():
    link = REPO / "workflow" / "schemas" / "config.schema.yaml"
    assert link.is_symlink()
    assert not os.path.isabs(os.readlink(link))
    assert link.resolve() == (REPO / "src" / "holopipe" / "schemas" / "config.schema.yaml").resolve()


def _undescribed(node, path="#"):
    """Declared properties without a description; `if` conditions only test keys, so they are skipped."""
    if isinstance(node, list):
        for index, item in enumerate(node):
            yield from _undescribed(item, f"{path}/{index}")
    elif isinstance(node, dict):
        for key, value in node.items():
            if key == "properties":
                for name, subschema in value.items():
                    if "description" not in subschema:
                        yield f"{path}/properties/{name}"
                    yield from _undescribed(subschema, f"{path}/properties/{name}")
            elif key != "if":
                yield from _undescribed(value, f"{path}/{key}")


def test_every_property_has_a_description():
    assert list(_undescribed(schema())) == []


def test_overrides_replace_dotted_keys_and_are_validated():
    config = load_config(MINIMAL)
    updated = with_overrides(config, {"train.learning_rate": 0.01, "augment.corruptions.0.beam_waist": 1e-3})
    assert updated["train"]["learning_rate"] == 0.01
    assert updated["augment"]["corruptions"][0]["beam_waist"] == 1e-3
    assert config["train"]["learning_rate"] != 0.01  # the input is untouched
    with pytest.raises(ConfigError, match="train.learning_rat: no such config key"):
        with_overrides(config, {"train.learning_rat": 0.01})
    with pytest.raises(ConfigError, match="train.learning_rate"):
        with_overrides(config, {"train.learning_rate": -1.0})


def test_search_space_keys_must_exist():
    space = {"model.widht": {"type": "int", "low": 4, "high": 8}}
    message = error_of(with_change(lambda c: c.update(tune={"search_space": space})))
    assert "tune.search_space.model.widht: no such config key to tune" in message
