"""A TPM 2.0, driven through the ``tpm2-tools`` commands (the adapter of that tool set).

Everything the agent asks of a TPM goes through :class:`Tpm`: persistent ECDSA P-256
signing keys (created inside, never readable), small sealed secrets, NV indices
(extend-only) and reads of PCRs. The device is named by a TCTI string:

- ``/dev/tpmrm0`` (or ``device:/dev/tpmrm0``): the kernel's resource manager, what a
  device uses;
- ``swtpm:path=SOCKET`` (the control socket at ``SOCKET.ctrl``): a software TPM, as in
  the tests; ``mssim:...``, ``tabrmd:...`` and ``device:/dev/tpm0`` are passed on as
  they are.

Without a resource manager (``swtpm``, ``mssim``, a raw ``/dev/tpm0``) nothing flushes
the transient objects and sessions a command leaves loaded, and a TPM holds only a
few: every operation that loads one is followed by ``tpm2_flushcontext`` of that kind
(with a resource manager that costs one quick command and flushes nothing of anyone
else's, each connection having its own).

**Why commands and not tpm2-pytss.** A router's firmware ships ``tpm2-tools`` and the
TSS libraries as packages (OpenWrt, Yocto's meta-security, Debian); ``tpm2-pytss`` is a
C extension built against those libraries with cffi, which firmware builds rarely carry
and PyPI has no wheels of. The agent asks the TPM for little (a signature per tracker
request, a few NV reads and extends per pass), so a process per operation (about 10-30 ms) is
cheap; and a power cut in the middle of one is a killed process, which the tests can
do for real.

**The owner hierarchy's password.** Defining and deleting NV indices, making the primary
key and the persistent keys (``peer init``, an identity renewal) are *owner* operations.
A device whose maker set an owner password (docs/SECURITY.md: so that root on the
device cannot undefine the floor index) names a file holding it (``tpm_owner_auth`` in
``device.json``): :func:`read_owner_auth` reads it only when an owner operation runs,
refuses a file that another user could read, and hands it to the command on its
standard input (``-P file:-``), never on its command line. A password the TPM refuses
is not tried again by this :class:`Tpm` (:class:`OwnerAuthError`): the owner
authorization carries no dictionary-attack lockout, the lockout one does, and a loop
of wrong passwords is what a lockout policy is made to stop; there is nothing to gain
from a second try with the same bytes.

Errors: :class:`TpmError` (a :class:`~peer.errors.PeerError` of status 30: the device's
TPM failed or does not answer, which ends a pass as a failure and is tried again at the
next one), with the tool's last words; a TPM setting that makes no sense (a device
name, a PCR selection, a password file) is a :class:`~peer.errors.ConfigError`.
Blocking: call from a worker thread in async code.
"""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import signal
import stat
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from swarmota.peer.crashpoints import crash_point
from swarmota.peer.errors import ConfigError, PeerError, StatusCode

__all__ = ["TOOLS", "OwnerAuthError", "PcrSelection", "Tpm", "TpmError", "read_owner_auth",
           "tcti_of", "tools_missing"]

TOOLS = ("tpm2_createprimary", "tpm2_create", "tpm2_load", "tpm2_evictcontrol",
         "tpm2_flushcontext", "tpm2_readpublic", "tpm2_sign", "tpm2_unseal",
         "tpm2_getcap", "tpm2_nvdefine", "tpm2_nvundefine", "tpm2_nvread",
         "tpm2_nvextend", "tpm2_createpolicy", "tpm2_pcrread")
"""The commands of ``tpm2-tools`` (Debian package ``tpm2-tools``) the agent runs."""

_TIMEOUT_S = 60.0
_LIBC = ctypes.CDLL(None, use_errno=True)
_PR_SET_PDEATHSIG = 1
_TCTI_RE = re.compile(r"(device|swtpm|mssim|tabrmd):[^\s]{0,512}")
_PCRS_RE = re.compile(r"(sha1|sha256|sha384):([0-9]|1[0-9]|2[0-3])(,([0-9]|1[0-9]|2[0-3])){0,23}")
_HANDLE_RE = re.compile(r"0x[0-9a-fA-F]{1,8}")
_PRIMARY_TEMPLATE = ("-C", "o", "-g", "sha256", "-G", "ecc256:aes128cfb")
_SIGNING_ATTRS = "fixedtpm|fixedparent|sensitivedataorigin|sign|noda"
_SEALED_ATTRS = "fixedtpm|fixedparent|noda"
_MAX_OWNER_AUTH = 64  # TPM2B_AUTH: at most the size of the hierarchy's digest
_BAD_AUTH_RE = re.compile(r"authorization failure|HMAC check failed|\(0x0*9(a2|8e)\)",
                          re.IGNORECASE)


class TpmError(PeerError):
    """The TPM (or the tools that speak to it) refused or failed an operation: the pass
    ends with status 30 and the next one tries again."""

    status = StatusCode.INSTALL_FAILED


class OwnerAuthError(TpmError):
    """The TPM refused the owner hierarchy's authorization (a password missing or
    wrong): not tried again by the same :class:`Tpm`."""


def read_owner_auth(path: Path) -> bytes:
    """The owner hierarchy's password, from the file at ``path`` (its bytes, without a
    trailing newline): a regular file owned by root or by this user, that neither its
    group nor anyone else may read or write.

    Raises:
        ConfigError: missing, unreadable, readable or writable by others, empty, or
            longer than a TPM takes (64 bytes).
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise ConfigError(f"tpm_owner_auth {path}: cannot read the TPM owner password: "
                          f"{exc.strerror or exc}") from None
    with os.fdopen(fd, "rb") as fh:
        info = os.fstat(fh.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise ConfigError(f"tpm_owner_auth {path}: not a regular file")
        if info.st_uid not in (0, os.geteuid()) or info.st_mode & 0o077:
            raise ConfigError(f"tpm_owner_auth {path}: must be owned by root (or the agent's "
                              f"user) with no access for group or others (mode "
                              f"{stat.S_IMODE(info.st_mode):04o}): chmod 0400 it")
        secret = fh.read(_MAX_OWNER_AUTH + 2)
    if secret.endswith(b"\n"):
        secret = secret[:-2] if secret.endswith(b"\r\n") else secret[:-1]
    if not 0 < len(secret) <= _MAX_OWNER_AUTH:
        raise ConfigError(f"tpm_owner_auth {path}: the password must be 1-{_MAX_OWNER_AUTH} "
                          "bytes")
    return secret


def tools_missing() -> list[str]:
    """The ``tpm2-tools`` commands not found on ``PATH``."""
    return [tool for tool in TOOLS if shutil.which(tool) is None]


def tcti_of(device: str) -> str:
    """The TCTI string for a device name (see the module docstring).

    Raises:
        ConfigError: not a device path or a TCTI string we know.
    """
    if device.startswith("/dev/"):
        device = f"device:{device}"
    if not _TCTI_RE.fullmatch(device):
        raise ConfigError(f"TPM device must be a path such as /dev/tpmrm0 or a TCTI such as "
                          f"swtpm:path=SOCKET, got {device!r}")
    return device


@dataclass(frozen=True)
class PcrSelection:
    """PCRs of one bank a key is sealed to (``sha256:7`` or ``sha256:0,2,7``)."""

    spec: str

    def __post_init__(self) -> None:
        if not _PCRS_RE.fullmatch(self.spec):
            raise ConfigError(f"PCR selection must look like sha256:7 or sha256:0,2,7, got "
                              f"{self.spec!r}")

    @property
    def auth(self) -> str:
        """The authorization a command gives for a key sealed to these PCRs."""
        return f"pcr:{self.spec}"


class Tpm:
    """One TPM, reached through ``tcti`` (:func:`tcti_of`); ``owner_auth``: the file of
    the owner hierarchy's password (none: the owner has no password). Methods block."""

    def __init__(self, tcti: str, *, owner_auth: Path | None = None,
                 timeout_s: float = _TIMEOUT_S) -> None:
        self.tcti = tcti_of(tcti)
        self.owner_auth = owner_auth
        self.timeout_s = timeout_s
        self._owner_refused: str | None = None  # the TPM's verdict on the password
        # a resource manager flushes what each connection loaded when it closes
        self.managed = self.tcti.startswith(("device:/dev/tpmrm", "tabrmd"))

    # --- running the tools -------------------------------------------------------------

    def run(self, *args: str, data: bytes | None = None, in_flight: str | None = None
            ) -> bytes:
        """Run one ``tpm2-tools`` command against this TPM; return its standard output.
        ``in_flight`` names a crash point passed while the command runs (after it has
        started and has its whole input, before its end is awaited): a test cuts the
        power there. The command dies with the agent (:func:`_die_with_parent`).

        Raises:
            TpmError: the command is missing, timed out or failed (its message).
        """
        environ = {**os.environ, "TPM2TOOLS_TCTI": self.tcti, "TSS2_LOG": "all+none"}
        try:
            proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, env=environ,
                                    preexec_fn=_die_with_parent)
        except FileNotFoundError:
            raise TpmError(f"{args[0]} not found: install tpm2-tools") from None
        except OSError as exc:
            raise TpmError(f"cannot run {args[0]}: {exc}") from None
        if in_flight is not None:
            # the whole input first: a command cut short never acts on part of it
            if data and proc.stdin is not None:
                try:
                    proc.stdin.write(data)
                    proc.stdin.flush()
                except BrokenPipeError:
                    pass  # the command ended early: its exit status says why
                data = None
            crash_point(in_flight)
        try:
            out, err = proc.communicate(data, timeout=self.timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise TpmError(f"{args[0]}: no answer from the TPM ({self.tcti}) within "
                           f"{self.timeout_s:g} s") from None
        if proc.returncode != 0:
            lines = [line for line in err.decode("utf-8", "replace").splitlines()
                     if line.strip()]
            raise TpmError(f"{args[0]} failed ({self.tcti}): "
                           f"{'; '.join(lines[-3:]) or f'exit {proc.returncode}'}")
        return out

    def run_as_owner(self, *args: str) -> bytes:
        """Run ``args``, an owner hierarchy operation, with the owner's authorization
        (``-P``, from :attr:`owner_auth`, on standard input).

        Raises:
            OwnerAuthError: the TPM refused the authorization, now or before (not tried
                again: module docstring).
            ConfigError: the password file cannot be used (:func:`read_owner_auth`).
            TpmError: as :meth:`run`.
        """
        if self._owner_refused is not None:
            raise OwnerAuthError(self._owner_refused)
        secret = None if self.owner_auth is None else read_owner_auth(self.owner_auth)
        auth = () if secret is None else ("-P", "file:-")
        try:
            return self.run(*args, *auth, data=secret)
        except OwnerAuthError:
            raise
        except TpmError as exc:
            if not _BAD_AUTH_RE.search(str(exc)):
                raise
            if self.owner_auth is None:
                why = ("the TPM's owner hierarchy has a password and the device "
                       "configuration names none: set tpm_owner_auth (peer init "
                       "--tpm-owner-auth FILE) to the file that holds it")
            else:
                why = (f"the TPM refused the owner password in {self.owner_auth} (wrong "
                       "password): not tried again; put the right one in that file")
            self._owner_refused = f"{args[0]}: {why}"
            raise OwnerAuthError(self._owner_refused) from None

    def flush(self, kind: str) -> None:
        """Flush the ``transient`` objects or loaded ``sessions`` (see the module
        docstring); nothing to do under a resource manager."""
        if not self.managed:
            self.run("tpm2_flushcontext", "-t" if kind == "transient" else "-l")

    # --- persistent keys and sealed secrets -------------------------------------------

    def persistent_handles(self) -> set[int]:
        """The handles of the persistent objects in the TPM."""
        return _handles(self.run("tpm2_getcap", "handles-persistent"))

    def evict(self, handle: int) -> None:
        """Remove the persistent object at ``handle`` (none there: nothing to do)."""
        if handle in self.persistent_handles():
            self.run_as_owner("tpm2_evictcontrol", "-C", "o", "-c", _hex(handle))

    def create_signing_key(self, handle: int, pcrs: PcrSelection | None = None
                           ) -> ec.EllipticCurvePublicKey:
        """Create an ECDSA P-256 key inside the TPM and make it persistent at ``handle``
        (replacing what was there); return its public key. The private key is made by
        the TPM and never leaves it. With ``pcrs`` the key signs only while those PCRs
        hold the values they hold now (measured boot)."""
        self._create_persistent(handle, ["-G", "ecc256:ecdsa-sha256"], _SIGNING_ATTRS,
                                pcrs, data=None)
        return self.public_key(handle)

    def seal(self, handle: int, secret: bytes, pcrs: PcrSelection | None = None) -> None:
        """Seal ``secret`` (at most 128 bytes) into a persistent object at ``handle``:
        only this TPM gives it back (:meth:`unseal`), with ``pcrs`` only in the boot
        state of now."""
        if not 0 < len(secret) <= 128:
            raise ValueError("a sealed secret is 1-128 bytes")
        self._create_persistent(handle, [], _SEALED_ATTRS, pcrs, data=secret)

    def _create_persistent(self, handle: int, key_args: Sequence[str], attrs: str,
                           pcrs: PcrSelection | None, *, data: bytes | None) -> None:
        self.evict(handle)
        with tempfile.TemporaryDirectory(prefix="swarmota-tpm-") as tmp:
            work = Path(tmp)
            policy: list[str] = []
            if pcrs is None:
                attrs += "|userwithauth"
            else:
                self.run("tpm2_createpolicy", "--policy-pcr", "-l", pcrs.spec,
                         "-L", str(work / "policy"))
                policy = ["-L", str(work / "policy")]
                self.flush("sessions")
            try:
                self.run_as_owner("tpm2_createprimary", *_PRIMARY_TEMPLATE,
                                  "-c", str(work / "p.ctx"))
                self.flush("transient")
                sealed = ["-i", "-"] if data is not None else []
                self.run("tpm2_create", "-C", str(work / "p.ctx"), *key_args, *policy,
                         "-a", attrs, *sealed, "-u", str(work / "k.pub"),
                         "-r", str(work / "k.priv"), data=data)
                self.flush("transient")
                self.run("tpm2_load", "-C", str(work / "p.ctx"), "-u", str(work / "k.pub"),
                         "-r", str(work / "k.priv"), "-c", str(work / "k.ctx"))
                self.flush("transient")
                self.run_as_owner("tpm2_evictcontrol", "-C", "o", "-c", str(work / "k.ctx"),
                                  _hex(handle))
            finally:
                self.flush("transient")

    def public_key(self, handle: int) -> ec.EllipticCurvePublicKey:
        """The public key of the persistent key at ``handle``."""
        with tempfile.TemporaryDirectory(prefix="swarmota-tpm-") as tmp:
            pem_path = Path(tmp) / "pub.pem"
            self.run("tpm2_readpublic", "-c", _hex(handle), "-f", "pem", "-o", str(pem_path))
            key = serialization.load_pem_public_key(pem_path.read_bytes())
        if not isinstance(key, ec.EllipticCurvePublicKey):
            raise TpmError(f"the key at {_hex(handle)} is not an ECDSA key")
        return key

    def sign_digest(self, handle: int, digest: bytes, pcrs: PcrSelection | None = None
                    ) -> bytes:
        """An ECDSA signature (DER) over a SHA-256 ``digest`` by the key at ``handle``.

        Raises:
            TpmError: no such key, or (with ``pcrs``) the boot state is not the one the
                key was sealed to ("a policy check failed").
        """
        if len(digest) != 32:
            raise ValueError("a SHA-256 digest is 32 bytes")
        auth = [] if pcrs is None else ["-p", pcrs.auth]
        try:
            return self.run("tpm2_sign", "-c", _hex(handle), *auth, "-g", "sha256",
                            "-s", "ecdsa", "-d", "-f", "plain", "-o", "/dev/stdout",
                            data=digest)
        finally:
            if pcrs is not None:
                self.flush("sessions")

    def unseal(self, handle: int, pcrs: PcrSelection | None = None) -> bytes:
        """The secret sealed at ``handle`` (see :meth:`sign_digest` for ``pcrs``)."""
        auth = [] if pcrs is None else ["-p", pcrs.auth]
        try:
            return self.run("tpm2_unseal", "-c", _hex(handle), *auth)
        finally:
            if pcrs is not None:
                self.flush("sessions")

    # --- NV indices ---------------------------------------------------------------------

    def nv_indices(self) -> set[int]:
        """The NV indices defined in the TPM."""
        return _handles(self.run("tpm2_getcap", "handles-nv-index"))

    def nv_define_extend(self, index: int) -> None:
        """Define NV index ``index`` as a SHA-256 extend-only index (``TPM_NT_EXTEND``,
        32 bytes): nothing can write it, only extend it. Read and extended with the
        index's own (empty) authorization; the owner's is needed to define and undefine
        it."""
        self.run_as_owner("tpm2_nvdefine", _hex(index), "-C", "o", "-s", "32", "-g", "sha256",
                          "-a", "nt=extend|authread|authwrite|no_da")

    def nv_undefine(self, index: int) -> None:
        """Delete NV index ``index`` (not defined: nothing to do)."""
        if index in self.nv_indices():
            self.run_as_owner("tpm2_nvundefine", _hex(index), "-C", "o")

    def nv_read(self, index: int, size: int) -> bytes:
        """The ``size`` bytes of NV index ``index``."""
        data = self.run("tpm2_nvread", _hex(index), "-C", _hex(index), "-s", str(size))
        if len(data) != size:
            raise TpmError(f"NV index {_hex(index)}: read {len(data)} bytes, not {size}")
        return data

    def nv_extend(self, index: int, data: bytes) -> None:
        """Extend NV index ``index``: its value becomes SHA-256(value || data). Crash
        point ``tpm.nv_extend.in_flight`` while it runs."""
        self.run("tpm2_nvextend", _hex(index), "-C", _hex(index), "-i", "-", data=data,
                 in_flight="tpm.nv_extend.in_flight")


def _die_with_parent() -> None:
    """In the child, before it runs the tool: the kernel kills it when the agent's
    thread that started it dies (``PR_SET_PDEATHSIG``). A killed agent leaves no
    command behind that could act on the TPM after it, perhaps after the next agent
    read the TPM (an extend the next agent also makes would be made twice)."""
    _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def _hex(handle: int) -> str:
    return f"0x{handle:08x}"


def _handles(listing: bytes) -> set[int]:
    """Handles in a ``tpm2_getcap handles-*`` listing (``- 0x81000101`` lines)."""
    return {int(match, 16) for match in _HANDLE_RE.findall(listing.decode("ascii", "replace"))}
