"""The embedded control plane's state directory and tokens file, without the control plane.

Why a module of its own: `lpuctl get nodes` (and every other client command) needs where the
state directory keeps `endpoint.json`, the cluster CA and the tokens — not the store, the
controller, the compiler and the servers that `orchestrator.control_plane` imports. On this
machine those imports were most of a client command's time. `orchestrator.control_plane` and
`orchestrator.admin_server` re-export these names.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

ENDPOINT_FILE = "endpoint.json"
TOKENS_FILE = "tokens"
PORTS_FILE = "ports.json"
AGENTS_FILE = "agents.json"
ROLES = ("admin", "viewer")


@dataclass(frozen=True)
class StatePaths:
    root: Path

    @property
    def store(self) -> Path:
        return self.root / "store.db"

    @property
    def certs(self) -> Path:
        return self.root / "certs"

    @property
    def tokens(self) -> Path:
        return self.root / TOKENS_FILE

    @property
    def shards(self) -> Path:
        return self.root / "shards"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def endpoint(self) -> Path:
        return self.root / ENDPOINT_FILE

    @property
    def ports(self) -> Path:
        return self.root / PORTS_FILE

    @property
    def agents(self) -> Path:
        return self.root / AGENTS_FILE


class TokenError(Exception):
    """A tokens file that cannot be used."""


@dataclass(frozen=True)
class Principal:
    name: str
    role: str


def load_tokens(path: str | Path) -> dict[str, Principal]:
    """Tokens file: one `TOKEN ROLE [NAME]` per line, `#` comments (see the module docstring
    of `orchestrator.admin_server`)."""
    tokens: dict[str, Principal] = {}
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise TokenError(f"cannot read tokens file {path}: {exc.strerror}") from None
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) not in (2, 3) or parts[1] not in ROLES or len(parts[0]) < 16:
            raise TokenError(
                f"{path}:{number}: expected 'TOKEN ROLE [NAME]' with a token of at least 16 "
                f"characters and a role of {', '.join(ROLES)}"
            )
        tokens[parts[0]] = Principal(parts[2] if len(parts) == 3 else f"token-{number}", parts[1])
    if not tokens:
        raise TokenError(f"tokens file {path} holds no token")
    return tokens


def token_for(paths: StatePaths, role: str) -> str:
    for token, principal in load_tokens(paths.tokens).items():
        if principal.role == role:
            return token
    raise LookupError(f"no {role} token in {paths.tokens}")


__all__ = [
    "AGENTS_FILE",
    "ENDPOINT_FILE",
    "PORTS_FILE",
    "ROLES",
    "TOKENS_FILE",
    "Principal",
    "StatePaths",
    "TokenError",
    "load_tokens",
    "token_for",
]
