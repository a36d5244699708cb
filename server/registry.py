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
from typing import Annotated

import tomli_w
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from privacy.keys import check_name, write_public
from shared_models.errors import EduflError

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


class Registry(BaseModel):
    """Every enrolled institution, by name."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    institutions: dict[str, Institution] = Field(default_factory=dict)

    def with_institution(self, name: str, public_key: str, *, replace: bool = False) -> Registry:
        """A copy with ``name`` enrolled; refuses a taken name (unless ``replace``) or key."""
        check_name(name)
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
        return Registry.model_validate(tomllib.loads(path.read_text("utf-8")))
    except (tomllib.TOMLDecodeError, ValidationError) as exc:
        raise EnrolmentError(f"{path}: not a valid institution registry ({exc})") from None


def save_registry(state_dir: Path, registry: Registry) -> Path:
    """Write the registry atomically; returns its path."""
    state_dir.mkdir(parents=True, exist_ok=True)
    path = state_dir / REGISTRY_FILE
    data = registry.model_dump(mode="json", exclude_none=True)
    write_public(path, tomli_w.dumps(data).encode())
    logger.info("saved %d institution(s) to %s", len(registry.institutions), path)
    return path
