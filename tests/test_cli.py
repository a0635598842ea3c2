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


def test_package_front_door_user_error_load_docstring_license_and_citation():
    import pydoc

    import knnlm

    assert knnlm.UserError is UserError and "UserError" in knnlm.__all__
    text = pydoc.render_doc(knnlm.load, renderer=pydoc.plaintext)
    for part in ("Args:", "protocol", "Returns:", "KNNLM", "Example:", 'knnlm.load("runs/tiny")'):
        assert part in text, part
    license_text = (TINY.parents[1] / "LICENSE").read_text()
    assert license_text.startswith("MIT License") and "knnlm contributors" in license_text
    cff = (TINY.parents[1] / "CITATION.cff").read_text()
    assert "license: MIT" in cff and "cff-version: 1.2.0" in cff
    for title in ("Generalization through Memorization: Nearest Neighbor Language Models",
                  "Regularized Training of Nearest Neighbor Language Models"):
        assert f'title: "{title}"' in cff
    assert "family-names: Khandelwal" in cff and "year: 2020" in cff and "family-names: Susskind" in cff


def test_tables_align_their_columns_and_the_evaluation_table_shows_both_protocols():
    from knnlm.report import evaluation_table, table

    lines = table([("a", "1.00"), ("longer name", "123.45")]).splitlines()
    assert len({len(line) for line in lines}) == 1  # every row as wide as the widest: the columns line up
    assert lines[2].endswith("|   1.00 |") and lines[3].endswith("| 123.45 |")  # numbers align right
    protocol = {"knnlm_ppl": 90.0, "knnlm_word_ppl": 95.5, "lambda": 0.25, "k": 64, "temperature": 3.0,
                "target_in_neighbors": 0.5}
    summary = {"split": "valid", "tokens": 10000, "words": 9000, "lm_ppl": 100.0, "lm_word_ppl": 110.0,
               "protocols": {"tuned": protocol, "paper": {**protocol, "k": 1024, "temperature": 1.0}},
               "index": "Flat", "search": "Flat", "datastore_size": 100000, "oov_rate": 0.0123}
    text = evaluation_table(summary)
    assert len({len(line) for line in text.splitlines()}) == 1
    for part in ("10,000 (9,000)", "100.00 (110.00)", "90.00 (95.50)", "0.25, 64, 3", "0.25, 1024, 1", "1.23%",
                 "50.0%", "100,000 keys"):
        assert part in text, part
    held = {"tuned": {**protocol, "knnlm_ppl": 91.5, "whole_valid_choice_ppl": 89.25},
            "paper": {**protocol, "knnlm_ppl": 97.0, "whole_valid_choice_ppl": 96.75}}
    text = evaluation_table({**summary, "held_out": {"scored_on": [5000, 10000], "lm_ppl": 101.0, "protocols": held}})
    assert len({len(line) for line in text.splitlines()}) == 1
    for part in ("second half (tokens 5,000–10,000): LM ppl", "101.00", "91.50 / 89.25", "97.00 / 96.75"):
        assert part in text, part
    text = evaluation_table({**summary, "split": "test", "held_out": {"protocols": held}})
    assert "tuned chosen on valid's first half" in text and "91.50" in text
