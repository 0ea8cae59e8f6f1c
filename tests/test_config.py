import pytest
import torch

from course_lib import config


def test_mode_from_environment_and_override(monkeypatch):
    monkeypatch.setenv("COURSE_MODE", "laptop")
    assert config.course_mode() == "laptop"
    assert config.course_mode("FULL") == "full"
    monkeypatch.delenv("COURSE_MODE")
    assert config.course_mode() == ("full" if torch.cuda.is_available() else "laptop")


def test_unknown_mode_lists_valid_ones(monkeypatch):
    monkeypatch.setenv("COURSE_MODE", "fast")
    with pytest.raises(ValueError, match="smoke, laptop, full"):
        config.course_mode()
    with pytest.raises(ValueError, match="smoke, laptop, full"):
        config.pick("huge", smoke=1, laptop=2, full=3)


def test_pick():
    assert [config.pick(m, smoke=1, laptop=2, full=3) for m in config.MODES] == [1, 2, 3]


def test_announce_once_prints_once(capsys):
    config.announce_once("test-key", "hello offline")
    config.announce_once("test-key", "hello offline")
    assert capsys.readouterr().err.count("hello offline") == 1
