"""A small synchronous client of the admin API, for the ``saga`` command line.

Every failure becomes an :class:`AdminError` carrying the text to show and the exit status
scripts can branch on: 1 when the orchestrator refused (no such saga or dead letter, or the
action does not apply in the saga's state), 2 for everything else that went wrong (usage,
settings, token, connection).
"""

from __future__ import annotations

import getpass
import os
import socket
from datetime import datetime
from typing import Any
from urllib.parse import quote
from uuid import UUID

import httpx

from saga.admin.times import parse_time
from saga.secrets import redact_url

__all__ = [
    "DEFAULT_URL",
    "EXIT_ERROR",
    "EXIT_OK",
    "EXIT_REFUSED",
    "AdminClient",
    "AdminError",
    "default_actor",
    "parse_time",
]

#: where ``saga`` looks for the admin API unless --url or SAGA_ADMIN_URL says otherwise; the
#: orchestrator serves it only when SAGA_ADMIN_PORT is set (8080 to match this default)
DEFAULT_URL = "http://127.0.0.1:8080"
EXIT_OK, EXIT_REFUSED, EXIT_ERROR = 0, 1, 2

_ACTOR_HEADER = "X-Saga-Actor"  # saga.admin.app.ACTOR_HEADER, without importing FastAPI


class AdminError(Exception):
    """What went wrong, in words, and the exit status it maps to."""

    def __init__(self, message: str, exit_code: int = EXIT_ERROR, *, status: int | None = None):
        super().__init__(message)
        self.exit_code = exit_code
        self.status = status


def default_actor() -> str:
    """Who acts, for the saga's history: SAGA_ACTOR, else user@host."""
    if os.environ.get("SAGA_ACTOR"):
        return os.environ["SAGA_ACTOR"]
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no name for this uid (a bare container)
        user = f"uid{os.getuid()}"
    return f"{user}@{socket.gethostname()}"


class AdminClient:
    """The admin API at ``url``, authorized by ``token``; ``actor`` names who acts."""

    def __init__(
        self,
        url: str,
        token: str,
        *,
        actor: str | None = None,
        timeout: float = 15.0,
        transport: httpx.BaseTransport | None = None,
    ):
        self.url = url.rstrip("/")
        headers = {"Authorization": f"Bearer {token}", "Accept": "application/json"}
        if actor:
            headers[_ACTOR_HEADER] = actor
        self._http = httpx.Client(
            base_url=self.url, headers=headers, timeout=timeout, transport=transport
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> AdminClient:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    # --- calls ---------------------------------------------------------------------------

    def list_sagas(
        self,
        *,
        statuses: list[str] | None = None,
        name: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        key: str | None = None,
        q: str | None = None,
        limit: int = 50,
        cursor: str | None = None,
    ) -> dict[str, Any]:
        params: list[tuple[str, str]] = [("status", s) for s in statuses or ()]
        for field, value in (
            ("name", name),
            ("since", since.isoformat() if since else None),
            ("until", until.isoformat() if until else None),
            ("key", key),
            ("q", q),
            ("cursor", cursor),
        ):
            if value is not None:
                params.append((field, value))
        params.append(("limit", str(limit)))
        found: dict[str, Any] = self._call("GET", "/api/sagas", params=params)
        return found

    def get_saga(self, saga_id: str) -> dict[str, Any]:
        found: dict[str, Any] = self._call("GET", f"/api/sagas/{self.find_id(saga_id)}")
        return found

    def definitions(self) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = self._call("GET", "/api/definitions")
        return found

    def start(self, name: str, input: dict[str, Any], key: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"name": name, "input": input, "key": key}
        found: dict[str, Any] = self._call("POST", "/api/sagas", json=body)
        return found

    def act(
        self, saga_id: str, action: str, reason: str, data: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """``retry``, ``abort`` or ``resolve`` the saga; AdminError(exit 1) when refused."""
        body: dict[str, Any] = {"reason": reason}
        if data is not None:
            body["data"] = data
        path = f"/api/sagas/{self.find_id(saga_id)}/{action}"
        found: dict[str, Any] = self._call("POST", path, json=body)
        return found

    def batch(self, action: str, body: dict[str, Any]) -> dict[str, Any]:
        """A batch ``retry``, ``abort`` or ``resolve``: a dry run's preview, or the batch
        started (follow it with :meth:`batch_progress`)."""
        found: dict[str, Any] = self._call("POST", f"/api/sagas/batch/{action}", json=body)
        return found

    def batch_progress(self, batch_id: str) -> dict[str, Any]:
        found: dict[str, Any] = self._call("GET", f"/api/sagas/batch/{batch_id}")
        return found

    def dead_letters(
        self,
        *,
        queue: str | None = None,
        cause: str | None = None,
        saga_id: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        limit: int = 100,
    ) -> dict[str, Any]:
        params = {
            k: v
            for k, v in (
                ("queue", queue),
                ("reason", cause),
                ("saga_id", saga_id),
                ("since", since.isoformat() if since else None),
                ("until", until.isoformat() if until else None),
                ("limit", str(limit)),
            )
            if v is not None
        }
        found: dict[str, Any] = self._call("GET", "/api/dead-letters", params=params)
        return found

    def dead_letter(self, queue: str, message_id: str) -> dict[str, Any]:
        found: dict[str, Any] = self._call("GET", _dead_letter_path(queue, message_id))
        return found

    def settle_dead_letter(
        self, action: str, queue: str, message_id: str, reason: str
    ) -> dict[str, Any]:
        """``replay`` or ``discard`` one dead letter; AdminError(exit 1) when it is not there."""
        path = f"{_dead_letter_path(queue, message_id)}/{action}"
        found: dict[str, Any] = self._call("POST", path, json={"reason": reason})
        return found

    def settle_dead_letters(
        self, action: str, match: dict[str, Any], reason: str, limit: int = 100
    ) -> dict[str, Any]:
        """``replay`` or ``discard`` every dead letter ``match`` (the API's filter) takes."""
        body = {"reason": reason, "filter": match, "limit": limit}
        found: dict[str, Any] = self._call("POST", f"/api/dead-letters/{action}", json=body)
        return found

    def find_id(self, text: str) -> str:
        """A full saga id as it is; the start of one if exactly one saga's id starts so."""
        try:
            return str(UUID(text))
        except ValueError:
            pass
        page = self.list_sagas(q=text, limit=2)
        ids = [item["saga_id"] for item in page["items"]]
        if not ids:
            raise AdminError(f"no saga id starts with {text!r}", EXIT_REFUSED, status=404)
        if len(ids) > 1:
            raise AdminError(f"{text!r} is the start of several saga ids: give more of it")
        return str(ids[0])

    # --- plumbing ------------------------------------------------------------------------

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        where = redact_url(self.url)
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.ConnectError as exc:
            raise AdminError(
                f"cannot connect to the admin API at {where} ({exc}). Is the orchestrator "
                "running with SAGA_ADMIN_PORT set (and SAGA_ADMIN_HOST reachable from here)? "
                "Point --url or SAGA_ADMIN_URL at it."
            ) from None
        except httpx.TimeoutException:
            raise AdminError(f"the admin API at {where} did not answer in time") from None
        except httpx.HTTPError as exc:
            raise AdminError(f"request to the admin API at {where} failed: {exc}") from None
        if response.status_code < 400:
            try:
                return response.json()
            except ValueError:
                raise AdminError(
                    f"{where} did not answer with JSON: is it the admin API?"
                ) from None
        raise _error(response)


def _dead_letter_path(queue: str, message_id: str) -> str:
    return f"/api/dead-letters/{quote(queue, safe='')}/{quote(message_id, safe='')}"


def _error(response: httpx.Response) -> AdminError:
    try:
        detail = response.json().get("detail")
    except (ValueError, AttributeError):
        detail = None
    why = str(detail) if detail else (response.text.strip()[:300] or response.reason_phrase)
    status = response.status_code
    if status == 401:
        return AdminError(f"not authorized: {why} (set SAGA_ADMIN_TOKEN or --token)", status=401)
    if status == 403:
        return AdminError(f"forbidden: {why}", status=403)
    if status == 404 and ("saga" in why or "dead letter" in why or "dead-letter" in why):
        return AdminError(why, EXIT_REFUSED, status=404)
    if status == 404:
        return AdminError(f"{why}: is {response.url} the admin API?", status=404)
    if status == 409:
        return AdminError(f"refused: {why}", EXIT_REFUSED, status=409)
    return AdminError(f"the admin API answered {status}: {why}", status=status)
