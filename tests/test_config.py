"""The config schema and load_config: shipped configs, defaults, and error messages that name the key."""

import copy
import os
import re
from pathlib import Path

import pytest

from holopipe.core.config import (
    TUNE_RUNTIME_KEYS,
    TUNE_STORAGE_KEYS,
    ConfigError,
    load_config,
    schema,
    split_simulation_config,
    with_overrides,
)
from holopipe.run.config_reference import config_reference_markdown, update_readme_reference

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


@pytest.mark.parametrize("name", ["config.yaml", "holodec.yaml", "holodec-crop.yaml"])
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
                                  "gray_level": 128.0, "beam_waist": 2.0e-3,
                                  "fringe_amplitude": 0.0, "fringe_period": 5.0e-4}


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


def test_coarse_to_fine_cannot_save_a_probability_volume():
    message = error_of(with_change(lambda c: c.update(infer={"coarse_stride": 4, "save_probabilities": True})))
    assert "infer.coarse_stride (4)" in message and "infer.save_probabilities" in message
    assert load_config(with_change(lambda c: c.update(infer={"coarse_stride": 4})))["infer"]["coarse_stride"] == 4
    message = error_of(with_change(lambda c: c.update(infer={"coarse_stride": 2, "compile": True})))
    assert "infer.coarse_stride (2)" in message and "infer.compile" in message


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


# --- The generated config reference (config_reference_markdown) and the README's copy of it.

START, END = "<!-- config-reference:start -->", "<!-- config-reference:end -->"

SMALL_SCHEMA = {
    "description": "A toy config.",
    "required": ["beam"],
    "properties": {
        "beam": {
            "description": "The light source.",
            "type": "object",
            "required": ["wavelength"],
            "properties": {
                "wavelength": {"description": "In m.", "type": "number", "exclusiveMinimum": 0},
                "waist": {"description": "Radius; null is flat.", "type": ["number", "null"], "minimum": 0,
                          "default": None},
                "shape": {"description": "Profile.", "enum": ["gauss", "flat"], "default": "gauss"},
                "camera": {
                    "description": "Sensor.",
                    "type": "object",
                    "default": {},
                    "properties": {"gain": {"description": "Fraction of a | b.", "type": "number", "minimum": 0,
                                            "maximum": 1, "default": 0.5}},
                },
            },
        },
        "runs": {
            "description": "Runs by name.",
            "type": "object",
            "propertyNames": {"pattern": "^[a-z]+$"},
            "additionalProperties": {"$ref": "#/$defs/run"},
        },
    },
    "$defs": {
        "run": {
            "description": "One run.",
            "type": "object",
            "required": ["kind"],
            "properties": {
                "kind": {"description": "a or b.", "enum": ["a", "b"]},
                "count": {"description": "Items.", "type": "integer", "minimum": 1},
                "edges": {"description": "Bin edges in m.", "type": "array", "items": {"type": "number"},
                          "minItems": 2, "default": [0.0, 1.0e-5]},
            },
            "allOf": [{"if": {"properties": {"kind": {"const": "a"}}}, "then": {"required": ["count"]}}],
        }
    },
}

SMALL_REFERENCE = """\
A toy config.

### beam

The light source. Required.

| Key | Type | Default | Description |
| --- | --- | --- | --- |
| `beam.wavelength` | number > 0 | required | In m. |
| `beam.waist` | number ≥ 0 or null | `null` | Radius; null is flat. |
| `beam.shape` | one of `gauss`, `flat` | `gauss` | Profile. |
| `beam.camera` | object | `{}` | Sensor. |
| `beam.camera.gain` | number in [0, 1] | `0.5` | Fraction of a \\| b. |

### runs

Runs by name.

| Key | Type | Default | Description |
| --- | --- | --- | --- |
| `runs.<name>` | object, name matching `^[a-z]+$` |  | One run. |
| `runs.<name>.kind` | one of `a`, `b` | required | a or b. |
| `runs.<name>.count` | integer ≥ 1 | required if kind is `a` | Items. |
| `runs.<name>.edges` | list of number, ≥ 2 items | `[0.0, 1.0e-05]` | Bin edges in m. |
"""


def test_reference_of_a_small_schema_is_exact():
    original = copy.deepcopy(SMALL_SCHEMA)
    assert config_reference_markdown(SMALL_SCHEMA) == SMALL_REFERENCE
    assert SMALL_SCHEMA == original  # $ref resolution does not write into the schema


def _leaf_paths(node, root, path):
    """Dotted paths of the keys that hold values, walked independently of the renderer."""
    while "$ref" in node:
        target = root
        for part in node["$ref"].removeprefix("#/").split("/"):
            target = target[part]
        node = {**target, **{k: v for k, v in node.items() if k != "$ref"}}
    children = dict(node.get("properties", {}))
    if isinstance(node.get("additionalProperties"), dict):
        children["<name>"] = node["additionalProperties"]
    if isinstance(node.get("items"), dict) and node["items"] != {}:
        items = node["items"]
        if "properties" in items or "$ref" in items:
            children["<i>"] = items
    if not children:
        yield path
    for key, child in children.items():
        yield from _leaf_paths(child, root, f"{path}.{key}" if path else key)


def test_reference_names_every_key_of_the_packaged_schema():
    packaged = schema()
    text = config_reference_markdown()
    leaves = list(_leaf_paths(packaged, packaged, ""))
    assert len(leaves) > 100
    missing = [path for path in leaves if f"| `{path}` |" not in text]
    assert missing == []
    headings = [line.removeprefix("### ") for line in text.splitlines() if line.startswith("### ")]
    assert headings == list(packaged["properties"])
    assert text == config_reference_markdown(schema())  # deterministic


def test_reference_tables_have_four_cells_per_row():
    """Patterns such as ^(auto|cpu|cuda...)$ contain pipes, which must not split a cell."""
    rows = [line for line in config_reference_markdown().splitlines() if line.startswith("| ")]
    assert rows
    for row in rows:
        cells = [cell for cell in re.split(r"(?<!\\)\|", row)][1:-1]
        assert len(cells) == 4, row


def _between_markers(text: str) -> str:
    lines = text.splitlines()
    return "\n".join(lines[lines.index(START) + 1:lines.index(END)]).strip("\n")


def test_readme_reference_is_current():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    if START not in readme.splitlines() or END not in readme.splitlines():
        pytest.fail(f"README.md lacks the lines {START} and {END}; add them and run `make docs`")
    assert _between_markers(readme) == config_reference_markdown().strip("\n"), (
        "README.md's configuration reference is out of date with src/holopipe/schemas/config.schema.yaml: "
        "run `make docs` to regenerate it")


def test_update_readme_reference_rewrites_only_the_marked_block(tmp_path):
    readme = tmp_path / "README.md"
    before, after = "# Title\n\nIntro.\n\n", "\nTrailing text.\n"
    readme.write_text(f"{before}{START}\nstale table\n{END}{after}", encoding="utf-8")
    readme.chmod(0o640)
    assert update_readme_reference(readme) is True
    text = readme.read_text(encoding="utf-8")
    assert text.startswith(before + START + "\n") and text.endswith(END + after)
    assert _between_markers(text) == config_reference_markdown().strip("\n")
    assert readme.stat().st_mode & 0o777 == 0o640  # the temporary file's 0600 does not leak
    assert update_readme_reference(readme) is False
    assert readme.read_text(encoding="utf-8") == text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md"]  # no temporary files left


@pytest.mark.parametrize(
    "body",
    [
        "no markers at all\n",
        f"{END}\nold\n{START}\n",
        f"{START}\n{START}\nold\n{END}\n",
    ],
    ids=["missing", "out-of-order", "duplicated"],
)
def test_update_readme_reference_refuses_bad_markers(tmp_path, body):
    readme = tmp_path / "NOTES.md"
    readme.write_text(body, encoding="utf-8")
    with pytest.raises(ValueError, match="NOTES.md"):
        update_readme_reference(readme)
    assert readme.read_text(encoding="utf-8") == body


def test_a_split_simulate_keys_merge_over_simulate_and_are_checked_as_it():
    config = load_config(with_change(lambda c: c["splits"].update(
        dim={"source": "simulate", "n_holograms": 1, "seed": 3,
             "simulate": {"method": "fraunhofer", "camera": {"electrons": 5000.0}}})))
    merged = split_simulation_config(config, "dim")["simulate"]
    assert merged["method"] == "fraunhofer" and merged["camera"]["electrons"] == 5000.0
    assert merged["camera"]["read_noise"] == config["simulate"]["camera"]["read_noise"]
    assert config["simulate"]["method"] == "angular_spectrum"
    assert split_simulation_config(config, "train") is config
    message = error_of(with_change(lambda c: c["splits"].update(
        dim={"source": "simulate", "n_holograms": 1, "seed": 3,
             "simulate": {"camera": {"electronz": 1.0}, "particles": [1, 2]}})))
    assert "splits.dim.simulate.camera.electronz: unknown key" in message
    message = error_of(with_change(lambda c: c["splits"].update(
        dim={"source": "simulate", "n_holograms": 1, "seed": 3, "simulate": {"particles": [5, 2]}})))
    assert "splits.dim.simulate.particles: minimum 5 exceeds maximum 2" in message
    message = error_of(with_change(lambda c: c["splits"].update(
        real={"source": "file", "path": "r.nc", "simulate": {"method": "fraunhofer"}})))
    assert "splits.real.simulate: key not allowed" in message


def test_the_tune_keys_left_out_of_a_studys_name_are_tune_keys():
    # A misspelt key would silently enter the study's name (holopipe.ml.tune.study_name) and the workflow's
    # tune_study config, so that raising n_trials started a new study.
    tune_keys = set(schema()["properties"]["tune"]["properties"])
    assert set(TUNE_RUNTIME_KEYS) <= tune_keys and set(TUNE_STORAGE_KEYS) <= tune_keys
    assert not set(TUNE_RUNTIME_KEYS) & set(TUNE_STORAGE_KEYS)
    assert {"search_space", "epochs"} <= tune_keys - set(TUNE_RUNTIME_KEYS) - set(TUNE_STORAGE_KEYS)
