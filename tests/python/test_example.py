"""docs/python_example.py runs as written."""

import pathlib
import runpy


def test_docs_example_runs(tmp_path, monkeypatch, capsys):
    example = pathlib.Path(__file__).resolve().parent.parent.parent / "docs" / "python_example.py"
    monkeypatch.chdir(tmp_path)
    runpy.run_path(str(example), run_name="__main__")
    out = capsys.readouterr().out
    assert "held-out L0" in out and "W_dec is a view: (256, 64) True" in out
    assert (tmp_path / "out" / "notebook_sae" / "sae" / "cfg.json").exists()
