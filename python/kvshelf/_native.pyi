"""Type stubs of the Rust extension ``kvshelf._native``."""

from collections.abc import Sequence
from typing import Any, Optional

from typing_extensions import Buffer

Hash = bytes | str
"""A block hash: 32 bytes, or 64 hex digits."""

class KvshelfError(Exception):
    """A failure that is not the caller's input; ``code`` is the library's stable code
    (``backend_unavailable``, ``backend_timeout``, ``config``, ...)."""

    code: str

class Namespace:
    """What must match for KV to be reusable, and whose hashes its keys carry.

    Keyword arguments are the sidecar configuration's namespace fields; the layout fields
    (``num_layers``, ``num_kv_heads``, ``head_dim``, ``tp_size``, ``tp_rank``, ``order``)
    may be given flat or nested under ``layout``. ``ttl`` in seconds or as ``"1h"``;
    ``hash_scheme`` is ``"kvshelf-v1"`` (default), ``"lmcache"``, ``"vllm"`` or ``"sglang"``. Raises ``ValueError``
    on an invalid namespace."""

    def __init__(self, **fields: Any) -> None: ...
    def to_json(self) -> str: ...
    @property
    def label(self) -> str: ...
    @property
    def block_size(self) -> int: ...
    @property
    def block_bytes(self) -> int:
        """Bytes of one full block (for a foreign scheme: the largest chunk)."""
    @property
    def block_shape(self) -> list[int]: ...
    @property
    def hash_scheme(self) -> str: ...

class PrefixHasher:
    """Hashes token prefixes of one namespace and tenant salt (``docs/hashing.md``)."""

    def __init__(self, namespace: Namespace, salt: Optional[bytes] = None) -> None: ...
    @property
    def root(self) -> bytes: ...
    @property
    def block_size(self) -> int: ...
    def hash_prefix(
        self, tokens: Sequence[int], extra_keys: Optional[Sequence[Sequence[bytes]]] = None
    ) -> list[bytes]:
        """32-byte hashes of every full block; a partial last block is not hashed."""

def lmcache_key_hash(key: str) -> bytes:
    """The block hash kvshelf stores an LMCache chunk under (``docs/hashing.md`` §8)."""

def vllm_identity(
    *,
    model: str,
    kv_dtype: str,
    tokens_per_hash: int,
    blocks_per_chunk: int,
    chunk_bytes: int,
    tp_size: int = 1,
    pp_size: int = 1,
    pcp_size: int = 1,
    dcp_size: int = 1,
    rank: int = 0,
    extra: str = "",
) -> bytes:
    """The 32-byte identity of a vLLM instance (``docs/hashing.md`` §9)."""

def vllm_key_hash(identity: bytes, key: bytes) -> bytes:
    """The block hash kvshelf stores a vLLM chunk under (``docs/hashing.md`` §9)."""

def sglang_key_hash(identity: str, key: str, part: int = 0) -> bytes:
    """The block hash kvshelf stores part ``part`` of an SGLang HiCache page under, for an
    instance's storage identity (``docs/hashing.md`` §10)."""

def sglang_key_hashes(identity: str, keys: Sequence[str], parts: int) -> list[bytes]:
    """``sglang_key_hash(identity, k, p)`` for every key ``k`` and part ``p < parts``,
    page-major."""

def block_key(label: str, hash: Hash) -> str:
    """``kvshelf:v1:<label>:<64 hex digits>``: the Redis key of a block."""

class Store:
    """The kvshelf library's Redis store in this process. Every call releases the GIL while
    it talks to Redis. ``options`` are ``StoreConfig`` fields (``ttl``, ``sliding_ttl``,
    ``response_timeout``, ``connection_timeout``, ``cluster``, ``tls_ca_file``,
    ``max_connections``, ...); durations in seconds or as ``"5s"``. Backend failures raise
    ``KvshelfError``; bad input raises ``ValueError`` and changes nothing."""

    def __init__(self, url: str = "redis://127.0.0.1:6379", **options: Any) -> None: ...
    def ping(self) -> None: ...
    def lookup(self, ns: Namespace, hashes: Sequence[Hash]) -> int:
        """Leading blocks on the shelf, one round trip."""
    def exists(self, ns: Namespace, hashes: Sequence[Hash]) -> list[bool]: ...
    def get_into(
        self,
        ns: Namespace,
        hashes: Sequence[Hash],
        buffers: Sequence[Buffer],
        timeout: Optional[float] = None,
    ) -> list[Optional[int]]:
        """Reads block i into writable ``buffers[i]`` (bytearray, memoryview, numpy array,
        ``tensor.view(torch.uint8).numpy()``); returns bytes written, ``None`` for a miss.
        The buffers are written only while the call runs; ``timeout`` (seconds) bounds
        it (``KvshelfError``, ``backend_timeout``), so a thread running it returns by
        then. Do not reuse the buffers of a call still running on another thread: use
        ``start_get_into`` (or ``AsyncStore``) to be able to cancel."""
    def start_get_into(
        self,
        ns: Namespace,
        hashes: Sequence[Hash],
        buffers: Sequence[Buffer],
        timeout: Optional[float] = None,
        keep: Optional[object] = None,
    ) -> Pending:
        """``get_into`` as a native task: ``wait()`` for its result, ``cancel()`` to stop
        it. The buffers, and ``keep`` (the owner of their memory, if it frees it when
        dropped), are held until the read has ended."""
    def get(self, ns: Namespace, hashes: Sequence[Hash]) -> list[Optional[bytes]]: ...
    def put(
        self,
        ns: Namespace,
        hashes: Sequence[Hash],
        buffers: Sequence[Buffer],
        timeout: Optional[float] = None,
    ) -> list[str]:
        """``"stored"``, ``"already_present"`` or ``"unavailable"`` per block. The buffers
        are read only while the call runs; ``timeout`` as for ``get_into``."""
    def start_put(
        self,
        ns: Namespace,
        hashes: Sequence[Hash],
        buffers: Sequence[Buffer],
        timeout: Optional[float] = None,
        keep: Optional[object] = None,
    ) -> Pending:
        """``put`` as a native task, as ``start_get_into`` is ``get_into``'s."""
    def delete(self, ns: Namespace, hashes: Sequence[Hash]) -> int: ...
    def ttl(self, ns: Namespace, hash: Hash) -> Optional[float]:
        """Seconds left; ``None`` when missing, ``inf`` when pinned."""

class Pending:
    """A call over your buffers running on kvshelf's threads (``Store.start_get_into``,
    ``Store.start_put``, ``Client.start_fetch_into``). It holds the buffers until the call has ended;
    dropped unfinished, it cancels the call and waits for its end."""

    def wait(self) -> Any:
        """Blocks (GIL released) until the call has ended; its result, as the synchronous
        method's. Raises ``KvshelfError`` with ``code == "cancelled"`` if ``cancel()``
        stopped it first. Once it returns or raises, the buffers are yours. Called once."""
    def cancel(self) -> None:
        """Asks the call to stop; returns at once (``wait()`` returns when it has)."""
    def done(self) -> bool: ...

class Client:
    """A client of a kvshelf sidecar (``docs/api.md``), over HTTP or gRPC, through the Rust
    client; every call releases the GIL. The sidecar's refusals raise ``KvshelfError``
    with its stable code (``unknown_namespace``, ``forbidden``, ``overloaded``, ...), an
    unreachable sidecar ``code == "transport"``; a bad configuration ``ValueError``."""

    def __init__(
        self,
        url: str = "http://127.0.0.1:7070",
        protocol: str = "http",
        token: Optional[str] = None,
        timeout: float = 30.0,
        connect_timeout: float = 1.0,
    ) -> None: ...
    def hash(self, namespace: str, tokens: Sequence[int]) -> list[bytes]:
        """32-byte hashes of every full block of ``tokens`` (with this token's salt)."""
    def lookup(
        self,
        namespace: str,
        tokens: Optional[Sequence[int]] = None,
        block_hashes: Optional[Sequence[Hash]] = None,
        warm: bool = False,
    ) -> dict[str, Any]:
        """``hit_blocks``, ``hit_tokens``, ``block_hashes`` (bytes), ``backend_ok``."""
    def fetch_into(
        self, namespace: str, hashes: Sequence[Hash], buffers: Sequence[Buffer]
    ) -> tuple[int, str]:
        """Writes the leading run into ``buffers``; ``(n, reason)`` with reason
        ``"complete"``, ``"miss"`` or ``"backend_unavailable"``."""
    def start_fetch_into(
        self,
        namespace: str,
        hashes: Sequence[Hash],
        buffers: Sequence[Buffer],
        keep: Optional[object] = None,
    ) -> Pending:
        """``fetch_into`` as a native task: ``wait()`` for ``(n, reason)``, ``cancel()`` to
        stop it; the buffers (and ``keep``) are held until it has ended."""
    def fetch(self, namespace: str, hashes: Sequence[Hash]) -> tuple[list[bytes], str]: ...
    def put(
        self,
        namespace: str,
        hashes: Sequence[Hash],
        buffers: Sequence[Buffer],
        asynchronous: bool = False,
    ) -> list[str]:
        """``"stored"``, ``"already_present"``, ``"queued"`` or ``"dropped"`` per block."""
    def start_put(
        self,
        namespace: str,
        hashes: Sequence[Hash],
        buffers: Sequence[Buffer],
        asynchronous: bool = False,
    ) -> Pending:
        """``put`` as a native task; the payloads are copied before it returns."""
    def delete(self, namespace: str, hashes: Sequence[Hash]) -> int: ...
    def pin(self, namespace: str, hash: Hash) -> bool: ...
    def unpin(self, namespace: str, hash: Hash) -> bool: ...

class Engine:
    """The Rust half of ``kvshelf.lmcache.KvshelfNativeConnector`` and of
    ``kvshelf.vllm.KvshelfTier``; use those classes. Keys are LMCache's strings in an
    ``lmcache`` namespace, block hashes in any other."""

    def __init__(
        self,
        url: str,
        namespace: Namespace,
        event_fd: int,
        timeout: float = 5.0,
        fanout: int = 2,
        max_keys_loading: int = 8,
        **options: Any,
    ) -> None: ...
    def submit_get(self, keys: Sequence[str], bufs: Sequence[Buffer]) -> int: ...
    def submit_set(self, keys: Sequence[str], bufs: Sequence[Buffer]) -> int: ...
    def submit_exists(self, keys: Sequence[str]) -> int: ...
    def submit_delete(self, keys: Sequence[str]) -> int: ...
    def submit_touch(self, keys: Sequence[Hash]) -> int: ...
    def drain(self) -> list[tuple[int, bool, str, Optional[list[bool]]]]: ...
    def in_flight(self) -> int: ...
    def close(self) -> None:
        """Cancels running batches and waits until none can touch a buffer; submits from
        any thread from then on fail at once and touch no buffer."""
