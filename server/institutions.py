"""The consortium's registry of enrolled institutions: name → node-authentication public key.

The SuperLink's own database knows nodes only by key and a random node id; this file is the
operator's readable record of *who* each key belongs to, kept next to that database and used
to register every institution again with a fresh SuperLink database.
"""

from __future__ import annotations

import datetime as dt
import logging
import tomllib
from pathlib import Path
from typing import Annotated, Any

import tomli_w
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from privacy.keys import check_name, write_public
from shared_models.errors import EduflError
from shared_models.user_files import describe_read_error, load_toml

logger = logging.getLogger(__name__)

REGISTRY_FILE = "institutions.toml"


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
    """A key the consortium revoked: never let in again, whoever enrols it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    public_key: str
    revoked_at: dt.datetime
    node_id: Annotated[str | None, Field(pattern=r"^\d+$")] = None


class Registry(BaseModel):
    """Every enrolled institution, by name, and every revoked key."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    institutions: dict[str, Institution] = Field(default_factory=dict)
    revoked: dict[str, Revocation] = Field(default_factory=dict)  # by institution name

    @field_validator("institutions", "revoked")
    @classmethod
    def _names(cls, entries: dict[str, Any]) -> dict[str, Any]:
        for name in entries:
            check_name(name)  # names become file names; a KeyMaterialError is a ValueError
        return entries

    def with_institution(self, name: str, public_key: str, *, replace: bool = False) -> Registry:
        """A copy with ``name`` enrolled; refuses a taken name (unless ``replace``) or key."""
        check_name(name)
        for other, revocation in self.revoked.items():
            if revocation.public_key == public_key:
                raise EnrolmentError(
                    f"this public key was revoked ({other}, "
                    f"{revocation.revoked_at:%Y-%m-%d %H:%M} UTC); the institution must make a "
                    "new key pair (`edufl client keys init --force`) and send its .pub"
                )
        for other, entry in self.institutions.items():
            if entry.public_key == public_key and other != name:
                raise EnrolmentError(f"this public key is already enrolled as {other!r}")
        current = self.institutions.get(name)
        if current is not None and current.public_key != public_key and not replace:
            raise EnrolmentError(
                f"{name!r} is already enrolled with another key; pass --replace to change it "
                "(then restart the server so the old key is no longer accepted)"
            )
        if current is not None and current.public_key == public_key:
            return self
        entry = Institution(public_key=public_key, enrolled_at=dt.datetime.now(dt.UTC))
        return self.model_copy(update={"institutions": {**self.institutions, name: entry}})

    def without(self, name: str) -> Registry:
        """A copy with ``name`` removed and its key revoked.

        Raises:
            EnrolmentError: ``name`` is not enrolled (the message lists who is).
        """
        entry = self.institutions.get(name)
        if entry is None:
            enrolled = ", ".join(sorted(self.institutions)) or "none"
            raise EnrolmentError(f"{name!r} is not enrolled (enrolled: {enrolled})")
        revocation = Revocation(
            public_key=entry.public_key,
            revoked_at=dt.datetime.now(dt.UTC),
            node_id=entry.node_id,
        )
        rest = {k: v for k, v in self.institutions.items() if k != name}
        return self.model_copy(
            update={"institutions": rest, "revoked": {**self.revoked, name: revocation}}
        )

    def node_ids(self) -> set[str]:
        """The SuperLink node ids of the enrolled institutions (those registered so far)."""
        return {e.node_id for e in self.institutions.values() if e.node_id is not None}

    def with_node_id(self, name: str, node_id: str) -> Registry:
        """A copy recording the node id the SuperLink gave ``name``."""
        entry = self.institutions[name].model_copy(update={"node_id": node_id})
        return self.model_copy(update={"institutions": {**self.institutions, name: entry}})


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
    state_dir.mkdir(parents=True, exist_ok=True)
    path = state_dir / REGISTRY_FILE
    data = registry.model_dump(mode="json", exclude_none=True)
    write_public(path, tomli_w.dumps(data).encode())
    logger.info("saved %d institution(s) to %s", len(registry.institutions), path)
    return path
