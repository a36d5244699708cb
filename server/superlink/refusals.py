"""Naming the nodes the SuperLink refuses, and telling a revoked node it was revoked.

Flower 1.41 refuses a node key it does not know at the Fleet API's ``activate-node`` (HTTP 412,
code 2004, "Failed to activate SuperNode.") and a request signed by a key whose node was
unregistered with 401; its own log line shows only the key's PEM. `NodeRefusals` sits in front
of the public listener (`server.superlink.serve.PublicPlane`), sees those refusals on their way
out and logs who the key belongs to, from the registry (``STATE/institutions.toml``): an
enrolled institution, the revoked or replaced key of one, or an unenrolled key by fingerprint.

To a revoked key's activation it adds a note (Flower's ``extra`` in the error's public JSON,
which the SuperNode prints with the refusal), starting with
`shared_models.deployment.REVOKED_NOTICE`, saying what was revoked and what to do. Only the key's
holder can get that far: Flower checks the request's signature by that key before the handler
runs, so nobody learns from it whether another institution's key was revoked.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import time
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from privacy.keys import KeyMaterialError, fingerprint, public_key_line
from server.institutions import EnrolmentError, Registry, load_registry
from shared_models.deployment import REVOKED_NOTICE

logger = logging.getLogger(__name__)

Message = MutableMapping[str, Any]
Send = Callable[[Message], Awaitable[None]]

#: A node refused again within this many seconds is not logged again (it retries every few s).
LOG_EVERY_S = 60.0


class NodeRefusals:
    """Names refused node keys in the log; notes a revoked key's refusal for its node.

    Args:
        registry_file: ``STATE/institutions.toml``, read afresh at each refusal (enrolments
            and revocations happen while the server runs); None: keys are named by
            fingerprint only.
        key_header: The request header with the node's base64 PEM public key (Flower's).
        activate_path: The Fleet route that activates a node.
        activation_failed: Flower's error code for a refused activation.
    """

    def __init__(
        self,
        registry_file: Path | None,
        *,
        key_header: str,
        activate_path: str,
        activation_failed: int,
    ) -> None:
        self.registry_file = registry_file
        self.key_header = key_header.lower().encode("latin-1")
        self.activate_path = activate_path
        self.activation_failed = int(activation_failed)
        self._logged: dict[tuple[str, str], float] = {}

    def watch(self, scope: MutableMapping[str, Any], send: Send) -> Send:
        """``send`` for one request, holding back an error response to name (and note) it."""
        held: list[Message] = []

        async def watched(message: Message) -> None:
            if held or (message["type"] == "http.response.start" and message["status"] >= 400):
                held.append(message)
                if message["type"] == "http.response.body" and not message.get("more_body"):
                    await self._release(scope, held, send)
                return
            await send(message)

        return watched

    async def _release(
        self, scope: MutableMapping[str, Any], held: list[Message], send: Send
    ) -> None:
        start = held[0]
        body = b"".join(m.get("body", b"") for m in held[1:])
        note = self.refused(scope, start["status"], body)
        if note is not None:
            body = note
            headers = [(k, v) for k, v in start.get("headers", []) if k != b"content-length"]
            start = {**start, "headers": [*headers, (b"content-length", str(len(body)).encode())]}
        await send(start)
        await send({"type": "http.response.body", "body": body})

    def refused(self, scope: MutableMapping[str, Any], status: int, body: bytes) -> bytes | None:
        """Log a refused node request; the response body with a revocation note, or None."""
        path = scope.get("path", "")
        if status not in (401, 412):
            return None
        pem = self._public_key(scope)
        if pem is None:
            return None
        try:
            payload = json.loads(body)
        except ValueError:
            payload = None
        activation = (
            path == self.activate_path
            and isinstance(payload, dict)
            and payload.get("code") == self.activation_failed
        )
        if status == 412 and not activation:
            return None
        who, notice = self.describe(pem)
        if self._log_now(who, path):
            client = (scope.get("client") or ("?", 0))[0]
            what = "activation" if activation else f"request {path}"
            logger.warning("refused node %s from %s: %s", what, client, who)
        if not activation or notice is None:
            return None
        assert isinstance(payload, dict)
        return json.dumps({**payload, "extra": notice}).encode()

    def describe(self, pem: bytes) -> tuple[str, str | None]:
        """Who ``pem`` belongs to, for the log; and the note for its node if it was revoked."""
        try:
            key = load_pem_public_key(pem)
            if not isinstance(key, ec.EllipticCurvePublicKey):
                raise ValueError("not an EC key")
            line = public_key_line(key)
            fp = fingerprint(line)
        except (ValueError, KeyMaterialError):
            return "a key that is no EC public key", None
        registry = self._registry()
        for name, entry in registry.institutions.items():
            if entry.public_key == line:
                return (
                    f"enrolled institution {name} (key {fp}; not registered with this SuperLink "
                    "yet, or an earlier session of its node is still marked online)"
                ), None
        revocation = registry.revocation_of(line)
        if revocation is None:
            return f"unenrolled key {fp}", None
        when = f"{revocation.revoked_at:%Y-%m-%d %H:%M} UTC"
        who = f"{revocation.reason} key of {revocation.name} ({fp}, {revocation.reason} {when})"
        notice = (
            f"{REVOKED_NOTICE}: the key of {revocation.name} ({fp}) was {revocation.reason} by "
            f"the consortium operator on {when}. Make a new key pair (`edufl client keys init "
            f"--force`) and ask the operator to enrol its .pub (`edufl server enrol NEW.pub "
            f"--name {revocation.name}"
            + (" --replace`)" if revocation.reason == "replaced" else "`)")
            + "; if the replacement key is enrolled already, start the node with it (--key)"
        )
        return who, notice

    def _registry(self) -> Registry:
        if self.registry_file is None:
            return Registry()
        try:
            return load_registry(self.registry_file.parent)
        except EnrolmentError as exc:
            logger.warning("cannot name refused nodes: %s", exc)
            return Registry()

    def _public_key(self, scope: MutableMapping[str, Any]) -> bytes | None:
        for name, value in scope.get("headers", []):
            if name == self.key_header:
                try:
                    return base64.b64decode(value, validate=True)
                except (binascii.Error, ValueError):
                    return None
        return None

    def _log_now(self, who: str, path: str) -> bool:
        now = time.monotonic()
        key = (who, path)
        if now - self._logged.get(key, -LOG_EVERY_S) < LOG_EVERY_S:
            return False
        self._logged[key] = now
        return True
