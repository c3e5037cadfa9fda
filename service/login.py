"""Where a client keeps its login to a server: ``login.json`` in its home, readable by its
user only (mode 0600), holding the server's URL, the user's name and token.

Its presence is what puts a client in client mode: ``Client()`` then talks to that server's
HTTP API instead of the home's own store (``service.client``).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from conveyor.contracts import ConveyorError
from conveyor.service.home import Home

LOGIN_FILE = "login.json"
SERVER_TOKEN_ENV = "CONVEYOR_SERVER_TOKEN"
"""Where ``conveyor login`` finds the token when ``--token`` is not given (CI)."""


@dataclass(frozen=True)
class Login:
    """A client's login to a server."""

    url: str
    user: str
    token: str

    def __repr__(self) -> str:  # never the token, wherever a Login is printed
        return f"Login(url={self.url!r}, user={self.user!r})"


def no_engine_when_logged_in(login: Login) -> ConveyorError:
    """Why ``Conveyor`` (an engine on this home's own store) refuses a logged-in home: its
    runs would land where nobody of the team sees them."""
    return ConveyorError(
        f"this home is logged in to {login.url}, and Conveyor embeds an engine on this "
        "home's own store: call the pipeline, or use conveyor pipeline run or Client(), to "
        "run through the server; Conveyor(home=...) on another home, or conveyor logout, "
        "to run here"
    )


def login_path(home: Home) -> Path:
    return home.path / LOGIN_FILE


def read_login(home: Home) -> Login | None:
    """The home's login, or None when it uses its own store."""
    path = login_path(home)
    try:
        data = json.loads(path.read_text())
        return Login(url=str(data["url"]), user=str(data["user"]), token=str(data["token"]))
    except (FileNotFoundError, NotADirectoryError):
        # No login; a home that is not a folder is reported when the store is opened.
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConveyorError(
            f"cannot read the login in {path} ({exc}); log in again, or delete the file to use "
            "this home's own store"
        ) from None


def save_login(home: Home, login: Login) -> Path:
    """Write the login, created with mode 0600 (then renamed into place, so that a reader
    never sees half a file and the token is never readable by others, even briefly)."""
    home.path.mkdir(mode=0o700, parents=True, exist_ok=True)  # as the store makes it
    path = login_path(home)
    staged = path.with_suffix(".tmp")
    staged.unlink(missing_ok=True)
    fd = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        json.dump(asdict(login), out)
    os.replace(staged, path)
    return path


def forget_login(home: Home) -> bool:
    """Remove the login; whether there was one."""
    try:
        login_path(home).unlink()
    except FileNotFoundError:
        return False
    return True
