"""``continuousflex-dl gui [PROJECT]``: the Scipion GUI on a project, or the project manager.

Scipion runs its GUI optimised (``python -O``) with a few variables set
(:func:`continuousflex_dl.scipion_env.gui_environment`); this command does the
same with this environment's Python, so no scipion-app install is needed.
Imports nothing from Scipion: the GUI runs in a child process.
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from .scipion_env import gui_environment

#: Where ``make demo`` leaves its Scipion user data (demo.py's default output folder).
DEMO_USER_DATA = Path("demo_output") / "scipion" / "userdata"
PROJECT_DB = "project.sqlite"


def default_user_data() -> Path:
    """$SCIPION_USER_DATA, else the demo's folder when it exists here, else Scipion's default."""
    if os.environ.get("SCIPION_USER_DATA"):
        return Path(os.environ["SCIPION_USER_DATA"])
    if DEMO_USER_DATA.is_dir():
        return DEMO_USER_DATA.absolute()
    return Path("~/ScipionUserData").expanduser()


def resolve_project(project: Optional[str], user_data: Optional[Path] = None) -> Tuple[Path, Optional[str]]:
    """``(user data folder, project name or None)`` of a project given by name or folder.

    project: a project folder (``<user data>/projects/<name>``, the path the demo
    prints), a project name inside ``user_data`` (default :func:`default_user_data`),
    or None for the project manager. Raises ValueError with the projects found when
    the project does not exist.
    """
    if project and (os.sep in project or Path(project).is_dir()):
        folder = Path(project).expanduser().absolute()
        if not (folder / PROJECT_DB).is_file():
            raise ValueError(f"{folder} is not a Scipion project folder (it has no {PROJECT_DB}).")
        if folder.parent.name != "projects":
            raise ValueError(f"Scipion opens projects from <user data>/projects/<name>; {folder} is not "
                             f"in a 'projects' folder.")
        return folder.parent.parent, folder.name
    user_data = Path(user_data).expanduser().absolute() if user_data else default_user_data()
    if project is None:
        return user_data, None
    if not (user_data / "projects" / project / PROJECT_DB).is_file():
        found = sorted(p.parent.name for p in (user_data / "projects").glob(f"*/{PROJECT_DB}"))
        raise ValueError(f"No project '{project}' in {user_data / 'projects'}; projects there: "
                         f"{', '.join(found) or 'none'}. Give the project's folder, or --user-data.")
    return user_data, project


def gui_command(project: Optional[str], user_data: Optional[Path] = None) -> Tuple[List[str], Dict[str, str]]:
    """``(argv, environment)`` of the GUI process: ``python -O -m pyworkflow.apps.pw_project NAME``
    (or ``pyworkflow.apps.pw_manager`` without a project), in :func:`gui_environment`."""
    user_data, name = resolve_project(project, user_data)
    module = "pyworkflow.apps.pw_manager" if name is None else "pyworkflow.apps.pw_project"
    argv = [sys.executable, "-O", "-m", module] + ([name] if name else [])
    return argv, gui_environment(user_data)


def shell_line(project: Optional[str], user_data: Optional[Path] = None) -> str:
    """The same command as one shell line (what the demo prints)."""
    argv, env = gui_command(project, user_data)
    keys = ("SCIPION_DOMAIN", "SCIPION_USER_DATA", "SCIPION_HOSTS", "SCIPION_NOTIFY", "SCIPION_PYTHON",
            "SCIPION_FONT_NAME")
    return " ".join([f"{k}={shlex.quote(env[k])}" for k in keys] + [shlex.quote(a) for a in argv])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="continuousflex-dl gui", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("project", nargs="?",
                        help="project folder (as the demo prints it) or project name; "
                             "none: the project manager")
    parser.add_argument("--user-data", type=Path,
                        help="Scipion user data folder of a project given by name (default: "
                             "$SCIPION_USER_DATA, else ./demo_output/scipion/userdata if present, "
                             "else ~/ScipionUserData)")
    parser.add_argument("--print", action="store_true", dest="print_only",
                        help="print the command instead of running it")
    args = parser.parse_args(argv)
    try:
        command, env = gui_command(args.project, args.user_data)
    except ValueError as exc:
        print(exc, file=sys.stderr)
        return 2
    if args.print_only:
        print(shell_line(args.project, args.user_data))
        return 0
    os.execve(command[0], command, env)  # the GUI replaces this process (signals reach it)
    return 0  # not reached
