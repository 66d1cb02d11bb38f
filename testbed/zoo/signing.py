"""Signed zoos: the publisher signs ``manifest.json`` with a private key; anyone verifies it with the public key.

The manifest's own checksum only catches accidents: whoever edits a zoo can recompute it (a *re-seal*).  A
signature cannot be recomputed without the publisher's private key, and since the manifest records the sha256
of every file of the zoo (and ``testbed zoo verify`` cross-checks the entries' own records against it), a
valid signature over the manifest vouches for the whole zoo.

Signing uses the OpenSSF ``model-signing`` package (its offline, key-based mode: an ECDSA key pair, P-256 or
larger, PEM files; no network, no transparency log): the signature ``ZOO/manifest.sig`` is a Sigstore bundle
that ``model_signing verify key`` checks too.  ``model_signing`` is imported only when signing or verifying
(it is an optional, heavy dependency: ``pip install 'segbackdoor[signing]'``).
"""

from __future__ import annotations

import os
from pathlib import Path

from testbed.core import atomic, safeload
from testbed.core.errors import UserError
from testbed.zoo.integrity import MANIFEST, path_problem
from testbed.zoo.manifest import SIGNATURE

INSTALL = "zoo signing needs the model-signing package: pip install 'segbackdoor[signing]'"


def _model_signing():
    try:  # an optional dependency, heavy (sigstore, ~1.5 s): imported only to sign or verify; the package
        import model_signing  # imports its signing and verifying modules itself
    except ImportError as e:
        raise UserError(f"{INSTALL} ({e})") from None
    return model_signing


def key_file(path: str | os.PathLike, flag: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{flag} {path}: no such file; generate a key pair as docs/zoo.md shows (\"Signing a zoo\")")
    if path.stat().st_size > 64 << 10:
        raise UserError(f"{flag} {path}: not a PEM key file (over 64 KiB)")
    return path


def _manifest_of(zoo: Path) -> Path:
    if not os.path.lexists(zoo / MANIFEST):
        raise UserError(f"zoo {zoo} has no {MANIFEST}; only a built zoo can be signed or verified")
    problem = path_problem(zoo, MANIFEST)
    if problem is not None:
        raise UserError(f"zoo {zoo}: {problem}; refusing it")
    return zoo / MANIFEST


def sign(zoo: str | os.PathLike, private_key: str | os.PathLike) -> Path:
    """Write ``ZOO/manifest.sig``, the signature of ``ZOO/manifest.json`` by ``private_key`` (atomically)."""
    zoo = Path(zoo)
    manifest = _manifest_of(zoo)
    key = key_file(private_key, "--private-key")
    ms = _model_signing()
    with atomic.atomic_file(zoo / SIGNATURE) as tmp:
        try:
            ms.signing.Config().use_elliptic_key_signer(private_key=key).sign(manifest, tmp)
        except Exception as e:  # noqa: BLE001 - a third-party key parser: any failure is a bad key file
            raise UserError(f"--private-key {key}: cannot sign with it ({' '.join(str(e).split())[:160]}); it must be an "
                            "unencrypted PEM ECDSA private key (P-256, P-384 or P-521)") from None
    return zoo / SIGNATURE


def signature_problem(zoo: str | os.PathLike, public_key: str | os.PathLike) -> str | None:
    """Why ``ZOO/manifest.json`` is not signed by the holder of ``public_key`` (None when it is)."""
    zoo = Path(zoo)
    manifest = _manifest_of(zoo)
    key = key_file(public_key, "--public-key")
    if not os.path.lexists(zoo / SIGNATURE):
        return f"{SIGNATURE}: missing: the zoo is not signed (sign it with `testbed zoo sign {zoo} --private-key KEY`)"
    problem = path_problem(zoo, SIGNATURE)
    if problem is not None:
        return problem
    try:
        safeload.load_json(zoo / SIGNATURE)  # bounded and well-formed before the third-party parser sees it
    except UserError as e:
        return f"{SIGNATURE}: not a signature ({str(e).removeprefix(str(zoo / SIGNATURE) + ': ')})"
    ms = _model_signing()
    try:
        ms.verifying.Config().use_elliptic_key_verifier(public_key=key).verify(manifest, zoo / SIGNATURE)
    except Exception as e:  # noqa: BLE001 - any failure of the verifier means: not signed by this key
        why = "signed by another key" if "Key mismatch" in str(e) else ("manifest.json changed since it was signed"
                                                                       if "mismatch" in str(e) else str(e))
        return f"{SIGNATURE}: the signature does not verify against {key} ({' '.join(why.split())[:160]})"
    return None


def require_signed(zoo: str | os.PathLike, public_key: str | os.PathLike | None) -> None:
    """Refuse (``UserError``) a zoo not signed by the holder of ``public_key``; nothing when no key is given."""
    if public_key is None:
        return
    problem = signature_problem(zoo, public_key)
    if problem is not None:
        raise UserError(f"zoo {zoo}: {problem}; refusing it (--public-key given)")
