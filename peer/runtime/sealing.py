"""Per-hop sealing: ChaCha20-Poly1305 under the network key, with replay and clock windows.

Invariants:
- Every frame is sealed with the keyring's primary key; a frame opens under any key of the
  receiver's keyring (primary or accepted) whose key id matches.
- The header (magic .. timestamp), the network id and the route are associated data: no header
  field can be changed, no frame crosses from one network to another, and no frame sealed for
  one route (envelope, blob push, blob get, blob answer) opens on another, without failing
  decryption.
- Nothing a remote sends changes `Opener` state unless it authenticated: the replay windows,
  the sender table and `accepted` move only after decryption succeeds; failures only count
  in `rejected`.
- The prefix (magic, version, key id) is checkable on its own (`Opener.check_prefix`), so a
  receiver refuses a frame from a stranger after its first 7 bytes, before reading the rest.
- A stream holds at most `STREAM_CHUNK` bytes of unauthenticated ciphertext at a time: its
  length is authenticated first, then every chunk on its own.
- Memory is bounded: at most `max_senders` replay windows of `window` bits each.
- `Opener.open`, `Opener.check_prefix`, `Opener.open_stream` and `StreamOpening.open_chunk`
  raise nothing but `SealError`, whatever the input bytes.

Theory of operation

A network is defined by a 32-byte network key (keys, key ids, the network id and keyring
files are in `peer.runtime.keyring`). Every hop is sealed under it, so a peer without the key
can neither read nor inject anything.

Frame layout (all integers big-endian)::

    magic "GV" (2) | version (1) | key_id (4) | boot_id (8) | seq (8) | timestamp_ms (8)
    | nonce (12) | ciphertext + Poly1305 tag (16)

- ``key_id`` is the first 4 bytes of SHA-256(key): it lets the receiver pick the key without
  trial decryption and reveals nothing useful about the key.
- ``boot_id`` is 8 random bytes a sender picks once per process start; ``seq`` counts that
  sender's frames from 1. The receiver keeps, per boot id, a sliding window of the last
  ``window`` sequence numbers (RFC 4303 section 3.4.3, as IPsec and WireGuard do): a sequence
  number already seen, or older than the window, is a replay. A restarted sender has a new boot
  id, so it needs no persisted counter.
- ``timestamp_ms`` is the sender's wall clock. Frames outside ``now ± max_skew`` are refused,
  which bounds how long a captured frame is useful even after its boot id's window has been
  evicted from the (bounded, least-recently-used) sender table.
- The nonce is 12 random bytes per frame. Random 96-bit nonces stay collision-safe for about
  2**32 frames per key (NIST SP 800-38D section 8.3); rotate the key well before that.
- Associated data is ``network_id || header || route``: header fields are authenticated, a
  frame sealed for one network never opens in another that happens to share a key, and a frame
  captured on one route is garbage on every other (version 2; version 1 had no route).

Stream layout (blobs, up to 64 MiB: one AEAD frame would have to be read whole before it could
be authenticated), after the STREAM construction (Hoang, Reyhanitabar, Rogaway and Vizár,
"Online authenticated-encryption and its nonce-reuse misuse-resistance", CRYPTO 2015)::

    header (31) | nonce (12) | sealed length: 8 bytes + tag (16) | chunk 1 | ... | chunk n

- The length is the plaintext's size; chunk i (from 1) seals the i-th `STREAM_CHUNK` bytes of
  it (the last one fewer), each with its own tag, under the nonce XOR i; associated data as
  for a frame. The index in the nonce fixes each chunk's place, the authenticated length fixes
  their number, so chunks cannot be reordered, dropped or appended.
- The length opens first: the replay and clock checks run on it, and only then is any chunk
  read. So a stream costs a stranger's receiver `STREAM_HEAD_BYTES`, and a forged chunk costs at
  most one chunk's read before the stream is refused.

Timestamps here are wall-clock seconds (``time.time()``), unlike the monotonic ``now`` the
protocol machines take: the window compares clocks of two different machines.
"""

from __future__ import annotations

import os
from collections import Counter, OrderedDict
from collections.abc import Callable

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from peer.runtime.keyring import KEY_ID_BYTES, Keyring, key_id_of

BOOT_ID_BYTES = 8
NONCE_BYTES = 12
TAG_BYTES = 16

MAGIC = b"GV"
VERSION = 2
PREFIX_BYTES = len(MAGIC) + 1 + KEY_ID_BYTES
"""Bytes `Opener.check_prefix` needs: the magic, the version and the key id (7)."""
HEADER_BYTES = PREFIX_BYTES + BOOT_ID_BYTES + 8 + 8
"""Bytes covered as associated data, from the magic through the timestamp (31)."""
OVERHEAD = HEADER_BYTES + NONCE_BYTES + TAG_BYTES
"""Bytes a sealed frame adds to its plaintext (59); also the shortest valid frame."""
MAX_FRAME_BYTES = 8 * 1024 * 1024
"""Default largest frame `Opener` accepts; checked before any other work."""
MAX_SEQ = 2**64 - 1

ROUTE_ENVELOPE = b"envelope"
ROUTE_BLOB_PUSH = b"blob/push"
ROUTE_BLOB_GET = b"blob/get"
ROUTE_BLOB_ANSWER = b"blob/answer"
"""The routes a frame can be sealed for (its last piece of associated data)."""

STREAM_CHUNK = 64 * 1024
"""Plaintext bytes per stream chunk: the most a receiver reads before authenticating them."""
STREAM_HEAD_BYTES = OVERHEAD + 8
"""Bytes before a stream's first chunk: header, nonce and the sealed length (67)."""


def stream_bytes(size: int) -> int:
    """The length of a sealed stream whose plaintext is `size` bytes."""
    chunks = -(-size // STREAM_CHUNK)
    return STREAM_HEAD_BYTES + size + chunks * TAG_BYTES


class SealError(Exception):
    """A frame was refused; nothing in the `Opener` changed except its `rejected` counter.

    Attributes:
        reason: a short machine-readable cause: "too_large", "too_short", "bad_magic",
            "bad_version", "unknown_key", "decrypt_failed", "stale_timestamp",
            "future_timestamp" or "replay".
    """

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def _header(key_id: bytes, boot_id: bytes, seq: int, timestamp_ms: int) -> bytes:
    return (
        MAGIC
        + bytes((VERSION,))
        + key_id
        + boot_id
        + seq.to_bytes(8, "big")
        + timestamp_ms.to_bytes(8, "big")
    )


class Sealer:
    """Seals outgoing frames for one sender process (one boot id)."""

    __slots__ = ("_aead", "_key_id", "_network_id", "_random_bytes", "boot_id", "seq")

    def __init__(
        self,
        keyring: Keyring,
        boot_id: bytes,
        random_bytes: Callable[[int], bytes] = os.urandom,
    ) -> None:
        """Seal with `keyring.primary` as the sender `boot_id`.

        Args:
            keyring: the local keyring; only its primary key and network id are used.
            boot_id: 8 random bytes chosen once per process start.
            random_bytes: source of nonces (tests inject a deterministic one).

        Raises:
            ValueError: `boot_id` is not 8 bytes.
        """
        if len(boot_id) != BOOT_ID_BYTES:
            raise ValueError(f"a boot id is {BOOT_ID_BYTES} bytes, got {len(boot_id)}")
        self._aead = ChaCha20Poly1305(keyring.primary)
        self._key_id = key_id_of(keyring.primary)
        self._network_id = keyring.network_id
        self._random_bytes = random_bytes
        self.boot_id = bytes(boot_id)
        self.seq = 0
        """The sequence number of the last frame sealed (0: none yet)."""

    def rekeyed(self, keyring: Keyring) -> Sealer:
        """A sealer for `keyring` (key rotation) that goes on with this sender's boot id and
        sequence numbers, so receivers' replay windows keep accepting its frames.

        Args:
            keyring: the new local keyring; its primary key seals from now on.

        Returns:
            The new sealer; stop using this one (the two would reuse sequence numbers).
        """
        sealer = Sealer(keyring, self.boot_id, self._random_bytes)
        sealer.seq = self.seq
        return sealer

    def seal(self, plaintext: bytes, now: float, route: bytes = ROUTE_ENVELOPE) -> bytes:
        """Seal `plaintext` as the next frame of this sender.

        Args:
            plaintext: the bytes to protect (one encoded envelope).
            now: wall-clock seconds (``time.time()``), stamped into the frame.
            route: what the frame is for; it opens only for the same route.

        Returns:
            The sealed frame, `OVERHEAD` bytes longer than `plaintext`.

        Raises:
            OverflowError: the sequence space (2**64 - 1 frames) is exhausted, or `now` is
                not representable as unsigned milliseconds.
        """
        header = self._next_header(now)
        nonce = self._random_bytes(NONCE_BYTES)
        return header + nonce + self._aead.encrypt(nonce, plaintext, self._ad(header, route))

    def seal_stream(self, plaintext: bytes, now: float, route: bytes) -> bytes:
        """Seal `plaintext` as the next stream of this sender (see the stream layout).

        Args:
            plaintext: the bytes to protect (a blob request or answer).
            now: wall-clock seconds (``time.time()``), stamped into the stream's header.
            route: what the stream is for; it opens only for the same route.

        Returns:
            The sealed stream, `stream_bytes(len(plaintext))` bytes.

        Raises:
            OverflowError: as for `seal`.
        """
        header = self._next_header(now)
        nonce = self._random_bytes(NONCE_BYTES)
        ad = self._ad(header, route)
        parts = [header, nonce, self._aead.encrypt(nonce, len(plaintext).to_bytes(8, "big"), ad)]
        view = memoryview(plaintext)
        for index, start in enumerate(range(0, len(plaintext), STREAM_CHUNK), start=1):
            chunk = view[start : start + STREAM_CHUNK]
            parts.append(self._aead.encrypt(_chunk_nonce(nonce, index), chunk, ad))
        return b"".join(parts)

    def _next_header(self, now: float) -> bytes:
        if self.seq >= MAX_SEQ:
            raise OverflowError("sequence numbers exhausted; restart with a new boot id")
        timestamp_ms = int(now * 1000)
        if not 0 <= timestamp_ms <= MAX_SEQ:
            raise OverflowError(f"timestamp {now!r} is not unsigned 64-bit milliseconds")
        self.seq += 1
        return _header(self._key_id, self.boot_id, self.seq, timestamp_ms)

    def _ad(self, header: bytes, route: bytes) -> bytes:
        return self._network_id + header + route


def _chunk_nonce(nonce: bytes, index: int) -> bytes:
    return (int.from_bytes(nonce, "big") ^ index).to_bytes(NONCE_BYTES, "big")


class _ReplayWindow:
    """The highest sequence number seen and a bitmap of the `window` numbers up to it.

    Bit i of `bitmap` is set when sequence number `highest - i` has been accepted.
    """

    __slots__ = ("bitmap", "highest")

    def __init__(self) -> None:
        self.highest = 0
        self.bitmap = 0

    def is_replay(self, seq: int, window: int) -> bool:
        if seq > self.highest:
            return False
        behind = self.highest - seq
        return behind >= window or bool(self.bitmap >> behind & 1)

    def mark(self, seq: int, window: int) -> None:
        if seq > self.highest:
            self.bitmap = (self.bitmap << (seq - self.highest) | 1) & ((1 << window) - 1)
            self.highest = seq
        else:
            self.bitmap |= 1 << (self.highest - seq)


class Opener:
    """Opens incoming frames: authenticates them, then refuses replays and stale clocks."""

    __slots__ = (
        "_ciphers",
        "_network_id",
        "_senders",
        "accepted",
        "max_frame",
        "max_senders",
        "max_skew",
        "rejected",
        "window",
    )

    def __init__(
        self,
        keyring: Keyring,
        max_skew: float = 60.0,
        window: int = 1024,
        max_frame: int = MAX_FRAME_BYTES,
        max_senders: int = 4096,
    ) -> None:
        """Open frames sealed under any key of `keyring`.

        Args:
            keyring: the local keyring; frames may use its primary or any accepted key.
            max_skew: seconds a frame's timestamp may differ from `now` either way. Larger
                tolerates worse clock sync; it is also how long a captured frame stays
                replayable once its sender's window has been evicted.
            window: sequence numbers remembered per sender. Must exceed the reordering a
                sender's frames suffer in flight; costs `window / 8` bytes per sender.
            max_frame: largest frame accepted, checked before anything else.
            max_senders: boot ids remembered (least recently used evicted first); memory is
                about `max_senders * (window / 8 + 100)` bytes.

        Raises:
            ValueError: a limit is not positive.
        """
        if max_skew <= 0 or window <= 0 or max_frame < OVERHEAD or max_senders <= 0:
            raise ValueError("max_skew, window and max_senders must be positive, max_frame >= 59")
        self._ciphers: dict[bytes, list[ChaCha20Poly1305]] = {}
        for key in keyring.keys:
            self._ciphers.setdefault(key_id_of(key), []).append(ChaCha20Poly1305(key))
        self._network_id = keyring.network_id
        self._senders: OrderedDict[bytes, _ReplayWindow] = OrderedDict()
        self.max_skew = max_skew
        self.window = window
        self.max_frame = max_frame
        self.max_senders = max_senders
        self.rejected: Counter[str] = Counter()
        """Frames refused, by `SealError.reason`."""
        self.accepted = 0
        """Frames opened successfully."""

    @property
    def senders(self) -> int:
        """How many boot ids have a replay window here (at most `max_senders`)."""
        return len(self._senders)

    def rekeyed(self, keyring: Keyring) -> Opener:
        """An opener for `keyring` (key rotation) with this one's limits, taking over its
        replay windows and counters.

        Without the windows, a new opener would accept again, within the timestamp window,
        frames this one already accepted under the old keyring.

        Args:
            keyring: the new local keyring; frames may use any of its keys.

        Returns:
            The new opener, sharing `rejected` with this one; stop using this one.
        """
        opener = Opener(keyring, self.max_skew, self.window, self.max_frame, self.max_senders)
        opener._senders = self._senders
        opener.rejected = self.rejected
        opener.accepted = self.accepted
        return opener

    def check_prefix(self, prefix: bytes) -> None:
        """Refuse a frame or stream from its first `PREFIX_BYTES` bytes, before reading more.

        Raises:
            SealError: "too_short", "bad_magic", "bad_version" or "unknown_key" (counted).
        """
        try:
            self._cipher_for(prefix)
        except SealError as exc:
            self.rejected[exc.reason] += 1
            raise

    def open(self, frame: bytes, now: float, route: bytes = ROUTE_ENVELOPE) -> bytes:
        """Authenticate and decrypt one frame.

        Authentication comes first, so every reason after "decrypt_failed" describes a frame
        that really was sealed with a network key (a genuine replay or a skewed clock), and
        forged frames can never advance or poison a replay window.

        Args:
            frame: the sealed bytes as received.
            now: wall-clock seconds (``time.time()``).
            route: the route it arrived on; a frame sealed for another fails decryption.

        Returns:
            The plaintext.

        Raises:
            SealError: the frame was refused; `reason` says why. No state changed except
                `rejected`.
        """
        try:
            if len(frame) > self.max_frame:
                raise SealError("too_large", f"{len(frame)} bytes > {self.max_frame}")
            if len(frame) < OVERHEAD:
                raise SealError("too_short", f"{len(frame)} bytes < {OVERHEAD}")
            header = frame[:HEADER_BYTES]
            nonce = frame[HEADER_BYTES : HEADER_BYTES + NONCE_BYTES]
            ad = self._network_id + header + route
            plaintext, _ = self._decrypt(
                self._cipher_for(header), nonce, frame[len(header) + len(nonce) :], ad
            )
            boot_id, seq = self._fresh(header, now)
        except SealError as exc:
            self.rejected[exc.reason] += 1
            raise
        self._admit(boot_id, seq)
        return plaintext

    def open_stream(self, head: bytes, now: float, route: bytes, max_size: int) -> StreamOpening:
        """Authenticate a stream's head and admit the stream (its sequence number is used).

        Args:
            head: the stream's first `STREAM_HEAD_BYTES` bytes.
            now: wall-clock seconds (``time.time()``).
            route: the route it arrived on; a stream sealed for another fails decryption.
            max_size: the largest plaintext the caller takes; a longer one is "too_large".

        Returns:
            The opening: its `size`, and its chunks to open in order.

        Raises:
            SealError: the stream was refused; as for `open`, or "too_large". No state
                changed except `rejected`.
        """
        try:
            if len(head) != STREAM_HEAD_BYTES:
                raise SealError("too_short", f"{len(head)} bytes < {STREAM_HEAD_BYTES}")
            header = head[:HEADER_BYTES]
            nonce = head[HEADER_BYTES : HEADER_BYTES + NONCE_BYTES]
            ad = self._network_id + header + route
            length, aead = self._decrypt(
                self._cipher_for(header), nonce, head[len(header) + len(nonce) :], ad
            )
            size = int.from_bytes(length, "big")
            if size > max_size:
                raise SealError("too_large", f"a stream of {size} bytes > {max_size}")
            boot_id, seq = self._fresh(header, now)
        except SealError as exc:
            self.rejected[exc.reason] += 1
            raise
        self._admit(boot_id, seq)
        return StreamOpening(aead, nonce, ad, size, self.rejected)

    def _cipher_for(self, prefix: bytes) -> list[ChaCha20Poly1305]:
        if len(prefix) < PREFIX_BYTES:
            raise SealError("too_short", f"{len(prefix)} bytes < {PREFIX_BYTES}")
        if prefix[:2] != MAGIC:
            raise SealError("bad_magic")
        if prefix[2] != VERSION:
            raise SealError("bad_version", f"version {prefix[2]}")
        ciphers = self._ciphers.get(bytes(prefix[3:7]))
        if ciphers is None:
            raise SealError("unknown_key", f"key id {prefix[3:7].hex()}")
        return ciphers

    @staticmethod
    def _decrypt(
        ciphers: list[ChaCha20Poly1305], nonce: bytes, body: bytes, ad: bytes
    ) -> tuple[bytes, ChaCha20Poly1305]:
        for aead in ciphers:
            try:
                return aead.decrypt(nonce, body, ad), aead
            except InvalidTag:
                continue
        raise SealError("decrypt_failed")

    def _fresh(self, header: bytes, now: float) -> tuple[bytes, int]:
        boot_id = bytes(header[7:15])
        seq = int.from_bytes(header[15:23], "big")
        sent = int.from_bytes(header[23:31], "big") / 1000
        if sent < now - self.max_skew:
            raise SealError("stale_timestamp", f"{now - sent:.1f}s old")
        if sent > now + self.max_skew:
            raise SealError("future_timestamp", f"{sent - now:.1f}s ahead")
        replay = self._senders.get(boot_id)
        if replay is not None and replay.is_replay(seq, self.window):
            raise SealError("replay", f"seq {seq}")
        return boot_id, seq

    def _admit(self, boot_id: bytes, seq: int) -> None:
        replay = self._senders.get(boot_id)
        if replay is None:
            replay = self._senders[boot_id] = _ReplayWindow()
            if len(self._senders) > self.max_senders:
                self._senders.popitem(last=False)
        else:
            self._senders.move_to_end(boot_id)
        replay.mark(seq, self.window)
        self.accepted += 1


class StreamOpening:
    """The chunks of one admitted stream, opened in order (`Opener.open_stream`).

    A chunk that fails to open ends the stream: the caller drops what it read.
    """

    __slots__ = ("_aead", "_ad", "_index", "_nonce", "_rejected", "_remaining", "size")

    def __init__(
        self, aead: ChaCha20Poly1305, nonce: bytes, ad: bytes, size: int, rejected: Counter[str]
    ) -> None:
        self._aead = aead
        self._nonce = nonce
        self._ad = ad
        self._rejected = rejected
        self._index = 0
        self._remaining = size
        self.size = size
        """The stream's plaintext length, authenticated."""

    @property
    def next_chunk_bytes(self) -> int:
        """Sealed bytes of the next chunk to read; 0 once every chunk was opened."""
        if self._remaining == 0:
            return 0
        return min(self._remaining, STREAM_CHUNK) + TAG_BYTES

    def open_chunk(self, sealed: bytes) -> bytes:
        """Open the next chunk (`next_chunk_bytes` long).

        Raises:
            SealError: "decrypt_failed" (counted) when it is not the sender's next chunk.
        """
        if self._remaining == 0 or len(sealed) != self.next_chunk_bytes:
            self._rejected["decrypt_failed"] += 1
            raise SealError("decrypt_failed", "not the expected chunk")
        try:
            plain = self._aead.decrypt(_chunk_nonce(self._nonce, self._index + 1), sealed, self._ad)
        except InvalidTag:
            self._rejected["decrypt_failed"] += 1
            raise SealError("decrypt_failed", f"chunk {self._index + 1}") from None
        self._index += 1
        self._remaining -= len(plain)
        return plain
