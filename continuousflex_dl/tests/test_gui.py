"""`continuousflex-dl gui`: the command and environment that open the Scipion GUI on a project."""
import sys

import pytest

from continuousflex_dl import gui
from continuousflex_dl.__main__ import main as cli_main


def _project(user_data, name="my_project"):
    folder = user_data / "projects" / name
    folder.mkdir(parents=True)
    (folder / gui.PROJECT_DB).write_bytes(b"")
    return folder


def test_project_folder_gives_user_data_and_name(tmp_path):
    folder = _project(tmp_path / "userdata")
    assert gui.resolve_project(str(folder)) == (tmp_path / "userdata", "my_project")
    assert gui.resolve_project("my_project", tmp_path / "userdata") == (tmp_path / "userdata", "my_project")
    assert gui.resolve_project(None, tmp_path / "userdata") == (tmp_path / "userdata", None)
    with pytest.raises(ValueError, match="projects there: my_project"):
        gui.resolve_project("other", tmp_path / "userdata")
    with pytest.raises(ValueError, match="not a Scipion project folder"):
        gui.resolve_project(str(tmp_path))


def test_command_and_environment(tmp_path, monkeypatch):
    folder = _project(tmp_path / "root" / "userdata")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.delenv("SCIPION_HOSTS", raising=False)
    monkeypatch.delenv("SCIPION_DOMAIN", raising=False)
    argv, env = gui.gui_command(str(folder))
    assert argv == [sys.executable, "-O", "-m", "pyworkflow.apps.pw_project", "my_project"]
    assert env["SCIPION_DOMAIN"] == "pwem" and env["SCIPION_NOTIFY"] == "False"
    assert env["SCIPION_USER_DATA"] == str(tmp_path / "root" / "userdata")
    assert env["SCIPION_PYTHON"] == sys.executable
    hosts = tmp_path / "root" / "hosts.conf"  # written beside the user data when none is set
    assert env["SCIPION_HOSTS"] == str(hosts) and "[localhost]" in hosts.read_text()
    assert "MPLBACKEND" not in env  # plots of the GUI open windows
    assert env["SCIPION_FONT_NAME"] == "DejaVu Sans"  # draws the ring of 'Å' in the summaries
    monkeypatch.setenv("SCIPION_FONT_NAME", "Courier")
    assert gui.gui_command(str(folder))[1]["SCIPION_FONT_NAME"] == "Courier"  # the user's choice stays
    argv, _ = gui.gui_command(None, tmp_path / "root" / "userdata")
    assert argv[1:] == ["-O", "-m", "pyworkflow.apps.pw_manager"]


def test_cli_prints_the_command(tmp_path, capsys):
    folder = _project(tmp_path / "userdata")
    assert cli_main(["gui", str(folder), "--print"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("SCIPION_DOMAIN=pwem SCIPION_USER_DATA=" + str(tmp_path / "userdata"))
    assert line.endswith("-O -m pyworkflow.apps.pw_project my_project")
    assert f"SCIPION_PYTHON={sys.executable}" in line and "SCIPION_FONT_NAME='DejaVu Sans'" in line
    assert cli_main(["gui", "missing", "--user-data", str(tmp_path / "userdata")]) == 2
    assert "No project 'missing'" in capsys.readouterr().err
