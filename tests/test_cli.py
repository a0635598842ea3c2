"""The command line's own options, in this process (nothing here trains or loads a model)."""

import argparse

import pytest

from conftest import TINY, main_fails
from knnlm import __version__
from knnlm.artifacts import UserError
from knnlm.cli import main
from knnlm.config import load_config, save_config


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"knnlm {__version__}"


def test_help_shows_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["sweep", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: 1)" in text and "(default: None)" not in text and "(default: False)" not in text


@pytest.mark.parametrize("argv", [["--debug", "run", "--out", "{out}"], ["run", "--out", "{out}", "--debug"]])
def test_debug_before_or_after_the_subcommand_shows_the_traceback(argv, tmp_path):
    with pytest.raises(UserError, match="--config: required"):
        main([a.format(out=tmp_path / "run") for a in argv])


@pytest.mark.parametrize("command", ["run", "train"])
def test_a_new_run_needs_a_config(command, tmp_path, capsys):
    """The built-in defaults are a full-size model: starting one by omission would take days on a laptop."""
    out = tmp_path / "run"
    assert "--config: required to start a run" in main_fails(capsys, command, "--out", out)
    assert not out.exists()


def test_a_started_run_continues_with_its_own_config(tmp_path):
    from knnlm.cli import _training_config

    out = tmp_path / "run"
    out.mkdir()
    save_config(load_config(TINY, ["train.seed=7"]), out / "config.json")
    args = argparse.Namespace(config=None, out=out, omega=0.5, regularizer=None, overrides=["train.epochs=2"])
    cfg = _training_config(args)
    tiny = load_config(TINY)
    assert (cfg.train.seed, cfg.train.omega, cfg.train.epochs, cfg.model.d_model) == (7, 0.5, 2, tiny.model.d_model)


def test_the_hugging_face_example_without_a_model_is_refused_not_trained_as_the_built_in_one(tmp_path, capsys):
    hf_example = TINY.parent / "hf-example.toml"
    out = tmp_path / "run"
    line = main_fails(capsys, "run", "--config", hf_example, "--out", out)
    assert line.startswith("knnlm: error: model.hf_path:") and 'model.kind = "hf"' in line
    assert not out.exists()
    # an option only a Hugging Face model reads also asks for one; with hf_path the same configs are accepted
    assert "model.key_module" in main_fails(capsys, "train", "--config", TINY, "--out", out, "model.key_module=x.mlp")
    assert load_config(hf_example, ["model.hf_path=/models/m"]).model.hf_path == "/models/m"
    assert load_config(TINY, ["model.hf_path=/models/m", "model.key_io=output"]).model.key_io == "output"
    with pytest.raises(UserError, match="model.kind"):
        load_config(TINY, ["model.hf_path=/models/m", "model.kind=builtin"])
    with pytest.raises(UserError, match="model.kind"):
        load_config(TINY, ["model.kind=gpt"])
