"""The one schema: configs, spaces and exported files validate on load and name what is wrong."""

import pytest
import yaml

from tune_sota.config import (
    SPACES_DIR,
    Config,
    ConfigError,
    Dist,
    hold_epochs,
    load_space,
    parse_space,
    space_to_yaml,
)


def err(raw) -> str:
    with pytest.raises(ConfigError) as e:
        parse_space(raw, source="s.yaml")
    return str(e.value)


def test_defaults_are_a_valid_config():
    cfg = Config()
    assert cfg.stages == [(128, 1.0)] and cfg.item_size == 160


@pytest.mark.parametrize("raw,expected", [
    ({"lrr": 0.1}, "unknown key 'lrr'; allowed: data, arch,"),
    ({"epochs": "five"}, "epochs: 'five' is not an integer"),
    ({"epochs": 2.5}, "epochs: 2.5 is not an integer"),
    ({"epochs": True}, "epochs: True is not an integer"),
    ({"lr": "fast"}, "lr: 'fast' is not a number"),
    ({"arch": "resnet9000"}, "arch: 'resnet9000' is not allowed; must be one of xresnet18"),
    ({"label_smoothing": 1.0}, "label_smoothing: 1.0 is not allowed; must be in [0, 1)"),
    ({"mixup": -0.1}, "mixup: -0.1 is not allowed"),
    ({"lr": {"loguniform": [0.1, 0.01]}}, "range [0.1, 0.01] is empty"),
    ({"lr": {"uniform": [0.01, 0.01]}}, "is empty"),
    ({"lr": {"loguniform": [0.0, 0.01]}}, "is not allowed"),
    ({"mixup": {"choice": []}}, "choice needs a non-empty list"),
    ({"mixup": {"choice": [0.1, 0.1]}}, "lists an option twice"),
    ({"mixup": {"normal": [0, 1]}}, "unknown distribution 'normal'; use one of loguniform, uniform, randint, choice"),
    ({"mixup": {"uniform": [0, 1], "choice": [1]}}, "a distribution is one key"),
    ({"epochs": {"uniform": [1, 5]}}, "uniform does not fit an integer; use randint or choice"),
    ({"lr": {"randint": [1, 5]}}, "randint does not fit a number"),
    ({"resize": {"choice": [["64", "128"]]}}, "choice options must be plain values"),
    ({"resize": "64>96"}, "must be the final size"),
    ({"size": 64, "resize": {"choice": ["32>64", "32>128"]}}, "ends at 128 px but size is 64"),
    ({"resize": "96>64>128"}, "sizes must strictly increase"),
    ({"search": {"num_samples": 0}}, "search.num_samples: 0 is not allowed; must be in [1, 100000]"),
    ({"search": {"reduction_factor": 1}}, "search.reduction_factor"),
    ({"search": {"bogus": 1}}, "search.unknown key 'bogus'"),
    ({"search": {"epochs": "longest"}}, "search.epochs: 'longest' is not allowed; must be one of max, searched"),
    ({"search": [1, 2]}, "search.expected a mapping"),
    ([1, 2], "a space is a mapping"),
])
def test_bad_values_name_key_and_allowed(raw, expected):
    message = err(raw)
    assert message.startswith("s.yaml: ") and expected in message, message
    assert "\n" not in message


def test_space_with_distributions_and_search_section():
    space = parse_space({"lr": {"loguniform": [1e-3, 1e-2]}, "epochs": {"randint": [2, 4]},
                         "resize": {"choice": ["64>128", "128"]}, "search": {"num_samples": 3}})
    assert set(space.searched) == {"lr", "epochs", "resize"}
    assert space.search.num_samples == 3
    cfg = space.resolve({"lr": 0.005, "epochs": 3, "resize": "64>128"})
    assert cfg.lr == 0.005 and cfg.stages == [(64, 0.5), (128, 0.5)]
    with pytest.raises(ConfigError, match="still a distribution"):
        space.fixed()


def test_a_searched_epochs_range_is_trained_at_its_top_unless_searched():
    raw = {"lr": {"loguniform": [1e-3, 1e-2]}, "epochs": {"randint": [2, 6], "prior": 3}}
    held, top = hold_epochs(parse_space(raw))  # search.epochs: max, the default
    assert top == 6 and held.values["epochs"] == 6 and set(held.searched) == {"lr"}
    assert held.resolve({"lr": 0.005}).epochs == 6 and held.baseline_config().epochs == 6
    assert hold_epochs(parse_space({**raw, "epochs": {"choice": [5, 20, 10]}}))[0].values["epochs"] == 20
    space = parse_space({**raw, "search": {"epochs": "searched"}})
    assert hold_epochs(space) == (space, None) and set(space.searched) == {"lr", "epochs"}
    fixed = parse_space({**raw, "epochs": 4})
    assert hold_epochs(fixed) == (fixed, None)


def test_exported_config_round_trips_as_a_space():
    cfg = Config(lr=0.004, mixup=0.2, resize="64>128", epochs=7)
    text = space_to_yaml(cfg.to_dict(), result={"accuracy": 0.9, "tta_accuracy": 0.91})
    space = parse_space(yaml.safe_load(text))
    assert not space.searched and space.fixed() == cfg


def test_dist_yaml_round_trip():
    space = parse_space({"mixup": {"choice": [0.0, 0.2]}, "lr": {"loguniform": [1e-4, 1e-2]}})
    again = parse_space(yaml.safe_load(space_to_yaml(space.values, space.search)))
    assert again.values == space.values and again.values["mixup"] == Dist("choice", (0.0, 0.2))


def test_broken_yaml_names_line(tmp_path):
    p = tmp_path / "broken.yaml"
    p.write_text("lr: [1, 2\nepochs: 3\n")
    with pytest.raises(ConfigError, match=r"broken.yaml: broken YAML at line \d+"):
        load_space(str(p))


@pytest.mark.parametrize("path", sorted(SPACES_DIR.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_search_space_loads_and_resolves(path):
    space = load_space(path.stem)
    assert space.searched, "a shipped space searches something"
    assert {"lr", "mixup", "label_smoothing", "resize"} <= set(space.searched)
    assert "epochs" in space.searched or "epochs" in space.values, "epochs searched, or fixed on purpose (5ep)"
    header = path.read_text().splitlines()[0]
    assert header.startswith(f"# {path.stem}:"), "each space file starts with a line saying what it is for"
    for pick in (0, -1):  # the low and high ends of every distribution make valid configs
        sampled = {k: (d.args[pick]) for k, d in space.searched.items()}
        space.resolve(sampled)


def test_readme_documents_every_field():
    import dataclasses

    from tune_sota.config import SearchSettings

    readme = (SPACES_DIR.parent / "README.md").read_text()
    configs, search = readme.split("### Search settings (`search:`)", 1)  # Config and search share names (epochs)
    for cls, text in ((Config, configs), (SearchSettings, search)):
        for f in dataclasses.fields(cls):
            assert f"| `{f.name}` |" in text, f"README's tables lack {cls.__name__}.{f.name}"
