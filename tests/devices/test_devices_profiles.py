import doctest

import pytest

import devices.boards as profiles


def test_doctests():
    assert doctest.testmod(profiles).failed == 0


def test_every_raspberry_pi_model_string_maps_to_its_profile(tmp_path):
    cases = {
        "Raspberry Pi 5 Model B Rev 1.0": "rpi-5",
        "Raspberry Pi 4 Model B Rev 1.5": "rpi-4b",
        "Raspberry Pi 3 Model B Plus Rev 1.3": "rpi-3b-plus",
        "Raspberry Pi Zero 2 W Rev 1.0": "rpi-zero-2w",
        "Pine64 RockPro64": "arm64-generic",
    }
    for model, expected in cases.items():
        tree = tmp_path / "model"
        tree.write_bytes(model.encode() + b"\x00")
        assert profiles.detect_profile(profiles.board_model(tree), "aarch64").id == expected


def test_unknown_profile_names_the_known_ones():
    with pytest.raises(ValueError, match="rpi-4b"):
        profiles.get_profile("rpi-9")
