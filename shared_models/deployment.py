"""What a deployment's server and nodes check at start and agree on outside Flower's messages.

edufl's adapters (`client.node`, `server.superlink`) patch and parse Flower 1.41.0's internals
(private names, log lines; listed in each package's ``flower_surface``), which may change in
any release. So the server and the node refuse to start with another Flower than the one
``pyproject.toml`` pins, and refuse plaintext (``--insecure``) off loopback. Nothing here
imports Flower.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from importlib import metadata

from shared_models.processes import DeploymentError

#: The Flower release edufl is written and tested against; ``pyproject.toml`` pins exactly it.
FLOWER_VERSION = "1.41.0"
#: Opens the note the SuperLink adds to its refusal of a revoked node's key; the node looks for
#: it in its log (`client.node.launcher.follow`) to say it was revoked.
REVOKED_NOTICE = "edufl: node key revoked"
_FIX = f'pip install "flwr[simulation]=={FLOWER_VERSION}" (or reinstall edufl)'


@dataclass(frozen=True)
class FlowerName:
    """A Flower-internal name edufl imports, calls or replaces.

    ``tests/test_flower_pin.py`` checks that it exists and, when ``params`` is given, that it
    takes every parameter edufl passes and needs no other.
    """

    module: str
    attr: str = ""  # dotted inside ``module`` ("HttpGrid.push_messages"); "" for the module
    params: tuple[str, ...] | None = None  # parameter names edufl passes (self excluded)


@dataclass(frozen=True)
class FlowerText:
    """Text edufl looks for in Flower's output (or a literal it replaces in Flower's code).

    ``tests/test_flower_pin.py`` checks that ``text`` still appears in ``module``'s source.
    """

    module: str
    text: str


def check_flower_version(installed: str | None = None) -> str:
    """Refuse any Flower but `FLOWER_VERSION`; returns the installed version.

    Args:
        installed: The version to check; the installed ``flwr`` distribution's when None.
    """
    if installed is None:
        try:
            installed = metadata.version("flwr")
        except metadata.PackageNotFoundError:
            raise DeploymentError(f"Flower (flwr) is not installed; {_FIX}") from None
    if installed != FLOWER_VERSION:
        raise DeploymentError(
            f"installed Flower is {installed}, edufl needs exactly {FLOWER_VERSION} (it "
            f"patches that release's internals); {_FIX}"
        )
    return installed


def exit_unless_pinned_flower() -> None:
    """`check_flower_version` for an entry point: exits with its one-line message."""
    try:
        check_flower_version()
    except DeploymentError as exc:
        raise SystemExit(f"edufl: {exc}") from None


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an IP address or a name) reaches only this machine.

    A name counts only if every address it resolves to is a loopback one; ``0.0.0.0`` and
    ``::`` (every interface) and a name that does not resolve do not.
    """
    host = host.strip("[]")
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    addresses = {info[4][0] for info in infos}
    return bool(addresses) and all(
        ipaddress.ip_address(str(a).split("%")[0]).is_loopback for a in addresses
    )


def check_insecure_address(host: str, option: str) -> None:
    """Refuse ``--insecure`` (plaintext, no node authentication) unless ``host`` is loopback.

    Args:
        host: The address the plaintext connection would use.
        option: The option that named ``host``, for the message (e.g. ``--address``).
    """
    if not is_loopback(host):
        raise DeploymentError(
            f"--insecure (plaintext, no node authentication) is refused on {option} {host}, "
            "which is not a loopback address: anyone on the network could join and read the "
            "model. Drop --insecure and use the consortium's TLS keys, or use 127.0.0.1 for "
            "a local test"
        )
