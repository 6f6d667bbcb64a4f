"""Patient and study identifiers, kept only as salted hashes.

Domains that know who an image belongs to (a manifest's patient column, DICOM ``PatientID`` /
``StudyInstanceUID``) group images by it so that one patient never straddles two splits. The identifier
itself is never stored: :func:`pseudonym` turns it into ``"p-" + 16 hex digits`` of
HMAC-SHA256(salt, identifier). The same salt gives the same pseudonym (so a rerun reuses the split); without
the salt a pseudonym cannot be traced back by hashing a list of candidate ids.

The salt is, in order: the domain's ``salt`` option (use it when colleagues must reproduce one split; it is
then written into the run's ``config.toml``, so treat that file as sensitive), or the environment variable
``MLTL_SALT``, or a per-user secret file -- ``$MLTL_SECRET_FILE`` or ``~/.mltl/secret`` -- created on first
use with 32 random bytes and permissions 0600. The secret file never enters a run directory.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

from ..errors import UserError

__all__ = ["pseudonym", "resolve_salt", "secret_file"]


def secret_file() -> Path:
    return Path(os.environ.get("MLTL_SECRET_FILE") or Path.home() / ".mltl" / "secret").expanduser()


def _user_secret() -> bytes:
    path = secret_file()
    try:
        if path.exists():
            data = path.read_bytes().strip()
            if len(data) < 16:
                raise UserError(f"{path}: the mltl secret (salt for patient ids) is shorter than 16 bytes; "
                                f"delete the file and a new one is made (patient groups then change)")
            return data
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(secrets.token_hex(32).encode())
        try:
            os.link(tmp, path)  # never replaces a secret another process made meanwhile
        except FileExistsError:
            pass
        finally:
            tmp.unlink(missing_ok=True)
        return path.read_bytes().strip()
    except OSError as exc:
        raise UserError(f"{path}: cannot read or create the mltl secret used to hash patient ids "
                        f"({exc.strerror or exc}); set MLTL_SECRET_FILE to a writable path, or give the "
                        f"domain a salt option") from None


def resolve_salt(salt: str | None) -> bytes:
    """The salt bytes: the option, else ``MLTL_SALT``, else the per-user secret file."""
    if salt:
        return salt.encode()
    env = os.environ.get("MLTL_SALT")
    if env:
        return env.encode()
    return _user_secret()


def pseudonym(identifier: str, salt: bytes) -> str:
    """``p-`` + the first 16 hex digits of HMAC-SHA256(salt, identifier)."""
    return "p-" + hmac.new(salt, identifier.encode("utf-8"), hashlib.sha256).hexdigest()[:16]
