"""The consortium's registry of enrolled institutions: name → node-authentication public key.

The SuperLink's own database knows nodes only by key and a random node id; this file is the
operator's readable record of *who* each key belongs to, kept next to that database and used
to register every institution again with a fresh SuperLink database.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal

import tomli_w
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from privacy.keys import KeyMaterialError, check_name, fingerprint, write_private
from shared_models.errors import EduflError
from shared_models.user_files import describe_read_error, load_toml

logger = logging.getLogger(__name__)

REGISTRY_FILE = "institutions.toml"
#: Set by `edufl server start` for the ServerApp: the registry the update guard reads node
#: identities from. Unset (a simulation), the guard takes the name a reply gives.
REGISTRY_ENV = "EDUFL_INSTITUTIONS"


class EnrolmentError(EduflError, ValueError):
    """An institution cannot be enrolled as asked (name or key already taken, bad file)."""


class Institution(BaseModel):
    """One enrolled institution."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    public_key: Annotated[str, Field(pattern=r"^ecdsa-sha2-nistp(256|384|521) [A-Za-z0-9+/=]+$")]
    enrolled_at: dt.datetime
    #: Flower's id for the node, set once the running SuperLink registered the key.
    node_id: Annotated[str | None, Field(pattern=r"^\d+$")] = None


class Revocation(BaseModel):
    """A key the consortium revoked or replaced: never let in again, whoever enrols it.

    Kept with the window in which the key was valid, so that ledger entries it signed before
    the revocation still verify (`edufl audit verify --keys institutions.toml`).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str  # the institution the key belonged to
    public_key: str
    fingerprint: str  # `privacy.keys.fingerprint`: what the list is searched by
    revoked_at: dt.datetime
    enrolled_at: dt.datetime | None = None  # None: revoked before windows were recorded
    node_id: Annotated[str | None, Field(pattern=r"^\d+$")] = None
    reason: Literal["revoked", "replaced"] = "revoked"


class Registry(BaseModel):
    """Every enrolled institution, by name, and every revoked key, in the order revoked."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    institutions: dict[str, Institution] = Field(default_factory=dict)
    #: Appended to, never overwritten: a name revoked twice keeps both keys refused.
    revocations: list[Revocation] = Field(default_factory=list)

    @model_validator(mode="before")
    @classmethod
    def _migrate(cls, data: Any) -> Any:
        # Registries written before revocations became a list kept one per name.
        if isinstance(data, dict) and isinstance(data.get("revoked"), dict):
            data = dict(data)
            old = data.pop("revoked")
            data["revocations"] = [
                *data.get("revocations", []),
                *(
                    {**entry, "name": name, "fingerprint": _fingerprint_or_blank(entry)}
                    for name, entry in old.items()
                    if isinstance(entry, dict)
                ),
            ]
        return data

    @field_validator("institutions")
    @classmethod
    def _names(cls, entries: dict[str, Any]) -> dict[str, Any]:
        for name in entries:
            check_name(name)  # names become file names; a KeyMaterialError is a ValueError
        return entries

    @property
    def revoked(self) -> dict[str, Revocation]:
        """The latest revocation of each name (all of them are in `revocations`)."""
        return {r.name: r for r in self.revocations}

    def revocation_of(self, public_key: str) -> Revocation | None:
        """The revocation of ``public_key`` (matched by fingerprint), if it was revoked."""
        wanted = fingerprint(public_key)
        return next((r for r in self.revocations if r.fingerprint == wanted), None)

    def with_institution(self, name: str, public_key: str, *, replace: bool = False) -> Registry:
        """A copy with ``name`` enrolled; refuses a taken name (unless ``replace``) or key.

        With ``replace``, the name's current key is revoked (reason ``replaced``) and the new
        one enrolled in its place.
        """
        check_name(name)
        revocation = self.revocation_of(public_key)
        if revocation is not None:
            raise EnrolmentError(
                f"this public key ({revocation.fingerprint}) was {revocation.reason} "
                f"({revocation.name}, {revocation.revoked_at:%Y-%m-%d %H:%M} UTC); the "
                "institution must make a new key pair (`edufl client keys init --force`) and "
                "send its .pub"
            )
        for other, entry in self.institutions.items():
            if entry.public_key == public_key and other != name:
                raise EnrolmentError(f"this public key is already enrolled as {other!r}")
        current = self.institutions.get(name)
        if current is not None and current.public_key == public_key:
            return self
        registry = self
        if current is not None:
            if not replace:
                raise EnrolmentError(
                    f"{name!r} is already enrolled with another key; to change it, run "
                    f"`edufl server enrol NEW.pub --name {name} --replace` (the old key is "
                    "revoked and its node unregistered)"
                )
            registry = self.without(name, reason="replaced")
        entry = Institution(public_key=public_key, enrolled_at=dt.datetime.now(dt.UTC))
        return registry.model_copy(update={"institutions": {**registry.institutions, name: entry}})

    def without(self, name: str, *, reason: Literal["revoked", "replaced"] = "revoked") -> Registry:
        """A copy with ``name`` removed and its key revoked.

        Raises:
            EnrolmentError: ``name`` is not enrolled (the message lists who is).
        """
        entry = self.institutions.get(name)
        if entry is None:
            enrolled = ", ".join(sorted(self.institutions)) or "none"
            raise EnrolmentError(f"{name!r} is not enrolled (enrolled: {enrolled})")
        revocation = Revocation(
            name=name,
            public_key=entry.public_key,
            fingerprint=fingerprint(entry.public_key),
            revoked_at=dt.datetime.now(dt.UTC),
            enrolled_at=entry.enrolled_at,
            node_id=entry.node_id,
            reason=reason,
        )
        rest = {k: v for k, v in self.institutions.items() if k != name}
        return self.model_copy(
            update={"institutions": rest, "revocations": [*self.revocations, revocation]}
        )

    def node_ids(self) -> set[str]:
        """The SuperLink node ids of the enrolled institutions (those registered so far)."""
        return {e.node_id for e in self.institutions.values() if e.node_id is not None}

    def identities(self) -> dict[int, str]:
        """Institution name by SuperLink node id: who a reply really comes from."""
        return {
            int(e.node_id): name for name, e in self.institutions.items() if e.node_id is not None
        }

    def with_node_id(self, name: str, node_id: str) -> Registry:
        """A copy recording the node id the SuperLink gave ``name``."""
        entry = self.institutions[name].model_copy(update={"node_id": node_id})
        return self.model_copy(update={"institutions": {**self.institutions, name: entry}})


def _fingerprint_or_blank(entry: dict[str, Any]) -> str:
    try:
        return fingerprint(str(entry.get("public_key", "")))
    except KeyMaterialError:
        return ""  # the model's own validation reports the bad entry


def load_registry(state_dir: Path) -> Registry:
    """The registry in ``state_dir`` (empty when there is none yet)."""
    path = state_dir / REGISTRY_FILE
    if not path.exists():
        return Registry()
    try:
        raw = load_toml(path)
    except (OSError, UnicodeDecodeError) as exc:
        raise EnrolmentError(
            f"{path}: cannot read the institution registry ({describe_read_error(exc)})"
        ) from None
    except tomllib.TOMLDecodeError as exc:
        raise EnrolmentError(f"{path}: not valid TOML ({exc}); fix the syntax") from None
    try:
        return Registry.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '(registry)'}: {e['msg']}"
            for e in exc.errors()[:5]
        )
        raise EnrolmentError(f"{path}: not a valid institution registry ({problems})") from None


def save_registry(state_dir: Path, registry: Registry) -> Path:
    """Write the registry atomically; returns its path."""
    private_dir(state_dir)
    path = state_dir / REGISTRY_FILE
    data = registry.model_dump(mode="json", exclude_none=True)
    write_private(path, tomli_w.dumps(data).encode())
    logger.info("saved %d institution(s) to %s", len(registry.institutions), path)
    return path


def private_dir(path: Path) -> Path:
    """Create ``path`` (and parents) as 0700, narrowing it if it exists wider; returns it."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    if path.stat().st_mode & 0o077:
        path.chmod(0o700)
    return path


def identities_from_env() -> Callable[[], dict[int, str]] | None:
    """Node identities from the registry `REGISTRY_ENV` names, read afresh at each call.

    None when the variable is unset (a simulation: no enrolment, no registry).
    """
    value = os.environ.get(REGISTRY_ENV)
    if not value:
        return None
    path = Path(value)
    return lambda: load_registry(path.parent).identities()
