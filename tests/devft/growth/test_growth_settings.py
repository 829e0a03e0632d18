"""GrowthSettings: valid defaults, and errors that name the field and the value."""

import dataclasses

import pytest

from devft.growth import GROUPING_MODES, SIMILARITY_VIEWS, GrowthSettings


def test_defaults_are_valid_and_every_field_has_help():
    settings = GrowthSettings()
    assert settings.grouping in GROUPING_MODES and settings.similarity in SIMILARITY_VIEWS
    for f in dataclasses.fields(GrowthSettings):
        assert f.metadata.get("help"), f.name


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_stages": 0}, "num_stages=0"),
        ({"capacities": (8, 4, 30)}, r"capacities=\(8, 4, 30\)"),
        ({"capacities": (0, 30)}, r"capacities=\(0, 30\)"),
        ({"rounds_per_stage": (1, 0, 1, 1)}, r"rounds_per_stage=\(1, 0, 1, 1\)"),
        ({"rounds_per_stage": (1, 1)}, r"one entry per stage \(4\)"),
        ({"grouping": "kmeans"}, "grouping='kmeans'"),
        ({"similarity": "raw"}, "similarity='raw'"),
        ({"fusion": "mean"}, "fusion='mean'"),
        ({"lora_fusion": "qr"}, "lora_fusion='qr'"),
        ({"transfer": "scale"}, "transfer='scale'"),
        ({"beta": -0.1}, "beta=-0.1"),
        ({"calibration_sequences": 0}, "calibration_sequences=0"),
    ],
)
def test_invalid_settings_raise_naming_field_and_value(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GrowthSettings(**kwargs)


def test_lists_become_tuples():
    settings = GrowthSettings(capacities=[4, 30], rounds_per_stage=[2, 2])
    assert settings.capacities == (4, 30) and settings.rounds_per_stage == (2, 2)
