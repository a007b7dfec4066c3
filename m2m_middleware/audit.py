"""The audit log: one INFO record per request a credential was checked for, never two.

A request the engine refuses ends there, so the engine writes its ``denied``
record at once. A request it admits ends later, in the application, which may
still refuse it (each framework's ``require_scopes``) or fail: its adapter
calls :func:`ended` once the application has answered, and the record says
what the client got: ``denied`` with the refusal's status and error, or
``allowed`` with the response's status. A public path nobody refused leaves
no record.

Adapters test ``audit.isEnabledFor(logging.INFO)`` once per admitted request
and, when it is off, take their usual path: nothing is wrapped or allocated.
"""

from __future__ import annotations

import logging

from .outcome import Allowed, Denied
from .syntax import log_safe

#: One INFO record per authentication attempt (allowed or denied), never a secret.
audit = logging.getLogger("m2m_middleware.audit")

#: The status an admitted request is recorded with when the application raised,
#: or ended without answering: what the servers and frameworks answer then
#: (uvicorn, gunicorn, Starlette's ServerErrorMiddleware, Flask, Django: 500).
NO_ANSWER = 500


def ended(outcome: Allowed, method: str, path: str, status: int | None, refusal: object) -> None:
    """The record of a request the engine admitted, once the application answered it.

    ``refusal`` is what the adapter found where ``require_scopes`` leaves its
    :class:`Denied` (None, or anything else, when no view refused); ``status``
    the response's status, None when none was sent (the application raised).
    """
    if isinstance(refusal, Denied):
        write(refusal, method, path)
    elif outcome.client is not None:
        write(outcome, method, path, NO_ANSWER if status is None else status)


def write(outcome: Allowed | Denied, method: str, path: str, status: int = 200) -> None:
    """One audit record. Fields ride in ``extra`` for structured handlers.

    ``status`` is the response's status for an :class:`Allowed` (a Denied
    carries its own). Every value that a client, a key's creator or a
    token's issuer chose (method, path, client id, key id) is escaped with
    :func:`log_safe`, in the message and in the fields alike, so that no
    value can forge a line or a field (a path ``/x%0Aallowed GET /admin
    ...``, a ``sub`` with a newline). Checks of about 60 ns per value;
    nothing at all when the audit logger is off.
    """
    client = outcome.client
    method = log_safe(method)
    path = log_safe(path)
    client_id = log_safe(client.client_id) if client is not None else None
    key_id = client.key_id if client is not None else None
    if key_id is not None:
        key_id = log_safe(key_id)
    fields = {
        "m2m_allowed": outcome.allowed,
        "m2m_status": status if isinstance(outcome, Allowed) else outcome.status,
        "m2m_error": None if isinstance(outcome, Allowed) else outcome.error,
        "m2m_client_id": client_id,
        "m2m_key_id": key_id,
        "m2m_scheme": client.scheme if client is not None else None,
        "m2m_method": method,
        "m2m_path": path,
    }
    if isinstance(outcome, Denied) and outcome.credential_in_clear:
        # That a credential crossed the network in clear, never the credential.
        fields["m2m_credential_in_clear"] = True
    if isinstance(outcome, Allowed):
        audit.info("allowed %s %s client=%s key=%s", method, path, client_id, key_id, extra=fields)
    else:
        audit.info(
            "denied %s %s status=%d error=%s client=%s",
            method,
            path,
            outcome.status,
            outcome.error,
            client_id if client_id is not None else "-",
            extra=fields,
        )
