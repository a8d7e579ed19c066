"""Compile once: the persistent XLA compilation cache, and a clock that tells compile time from run time.

* :func:`enable_compile_cache` points JAX's persistent cache at a directory (by default
  ``$JAXPERSONA_COMPILE_CACHE``, else ``xla/`` in the package's cache, ``$JAXPERSONA_CACHE`` or
  ``~/.cache/jaxpersona``), so a second run of a pipeline loads its compiled programs instead of compiling them.
  ``JAXPERSONA_COMPILE_CACHE=off`` (or the CLI's ``--no-compile-cache``) turns it off. The CLI enables it;
  library users call it themselves. The cache is bounded (:data:`MAX_BYTES`, least recently used entries
  evicted first), and bounded is also what makes JAX take a file lock around every read and write, so several
  processes (parallel runs, a server beside a sweep, test workers) can share one directory without reading each
  other's half-written entries.
* :data:`COMPILE_CLOCK` sums, from JAX's own monitoring events, the seconds spent tracing, lowering and
  compiling, and counts persistent-cache hits and misses. The runner reads it around every stage and
  records ``compile_s`` beside ``wall_s`` in ``run.json``.

The cache never changes a result: an entry is keyed by the program, the compile options, the jax/jaxlib
version and the device, and a cached executable is the executable the compile would have produced.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path

import jax
from jax.experimental.compilation_cache import compilation_cache as jax_compilation_cache

from jaxpersona import errors
from jaxpersona.model.registry import cache_dir

OFF_VALUES = ("0", "off", "false", "no")
# the names JAX's bounded cache gives an entry and its last-use time (jax/_src/lru_cache.py)
ENTRY_SUFFIX, LAST_USE_SUFFIX = "-cache", "-atime"
MAX_BYTES = 4 << 30  # the persistent cache's size bound (LRU eviction; with a bound, JAX locks the directory)

# JAX events that are compile work (seconds), and the persistent cache's counters
COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration",
                  "/jax/core/compile/backend_compile_duration")
HIT_EVENT = "/jax/compilation_cache/cache_hits"
MISS_EVENT = "/jax/compilation_cache/cache_misses"


def default_cache_dir() -> Path:
    """Where compiled programs are kept unless told otherwise: ``$JAXPERSONA_COMPILE_CACHE`` (a path), else
    ``xla/`` in :func:`jaxpersona.model.registry.cache_dir`."""
    env = os.environ.get("JAXPERSONA_COMPILE_CACHE", "").strip()
    if env and env.lower() not in OFF_VALUES + ("1", "on", "true", "yes"):
        return Path(env).expanduser()
    return cache_dir() / "xla"


def enable_compile_cache(path: str | Path | None = None, max_bytes: int = MAX_BYTES) -> Path | None:
    """Use the persistent compilation cache at ``path`` (default :func:`default_cache_dir`); returns the
    directory, or None when ``JAXPERSONA_COMPILE_CACHE`` turns it off or the directory cannot be created (a
    warning: the run goes on, compiling as usual). Every program is cached, however quick its compile; the
    directory holds at most ``max_bytes`` (least recently used entries evicted), its reads and writes under a
    file lock, so concurrent processes may share it."""
    if os.environ.get("JAXPERSONA_COMPILE_CACHE", "").strip().lower() in OFF_VALUES:
        return None
    target = Path(path).expanduser() if path is not None else default_cache_dir()
    try:
        target.mkdir(parents=True, exist_ok=True)
        probe = target / f".probe-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        warnings.warn(f"compile cache {target} is not writable ({e}); compiling without it", errors.CacheWarning,
                      stacklevel=2)
        return None
    jax.config.update("jax_compilation_cache_dir", str(target))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    jax.config.update("jax_compilation_cache_max_size", int(max_bytes))
    _date_unbounded_entries(target)
    return target


def _date_unbounded_entries(target: Path) -> None:
    """A directory an unbounded cache wrote (jaxpersona 0.7.7 and earlier) has entries without the last-use file a
    bounded cache keeps beside each one; JAX's eviction reads that file on every write and, where it is missing,
    writes no new entry at all (a warning per program). Give each such entry its file's time as its last use."""
    for entry in target.glob(f"*{ENTRY_SUFFIX}"):
        used = entry.with_name(entry.name[: -len(ENTRY_SUFFIX)] + LAST_USE_SUFFIX)
        if not used.exists():
            with contextlib.suppress(OSError):  # another process may be evicting it: nothing to date
                used.write_bytes(entry.stat().st_mtime_ns.to_bytes(8, "little"))


_CACHE_KEYS = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
               "jax_persistent_cache_min_entry_size_bytes", "jax_compilation_cache_max_size")


@contextlib.contextmanager
def compile_cache(path: str | Path | None = None) -> Iterator[Path | None]:
    """:func:`enable_compile_cache` for the duration of a block, then the process's previous cache settings
    again (the CLI's ``main`` called in-process — a notebook, a test — leaves no global setting behind)."""
    before = {k: getattr(jax.config, k) for k in _CACHE_KEYS}
    jax_compilation_cache.reset_cache()  # jax remembers whether it uses a cache: ask it again under the new setting
    try:
        yield enable_compile_cache(path)
    finally:
        for k, v in before.items():
            jax.config.update(k, v)
        jax_compilation_cache.reset_cache()


@contextlib.contextmanager
def persistent_cache_off() -> Iterator[None]:
    """No persistent-cache read or write inside the block, then the process's cache as it was: for programs that
    cannot be loaded back (a deviceless TPU executable has no TPU client to load it into). Process-wide while it
    lasts, like every JAX cache setting."""
    before = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    jax_compilation_cache.reset_cache()  # jax remembers whether it uses a cache: ask it again
    try:
        yield
    finally:
        jax.config.update("jax_enable_compilation_cache", before)
        jax_compilation_cache.reset_cache()


def cache_dir_in_use() -> str | None:
    """The persistent compile cache directory this process uses (None: off)."""
    value = jax.config.values.get("jax_compilation_cache_dir")
    return str(value) if value else None


@dataclasses.dataclass(frozen=True)
class CompileTotals:
    """Running totals since the process started: compile seconds, persistent-cache hits and misses."""

    seconds: float = 0.0
    hits: int = 0
    misses: int = 0

    def __sub__(self, other: CompileTotals) -> CompileTotals:
        return CompileTotals(self.seconds - other.seconds, self.hits - other.hits, self.misses - other.misses)


class CompileClock:
    """Listens to JAX's monitoring events (registered once, on first use) and keeps :class:`CompileTotals`.

    Only counters: it never changes what is compiled or computed."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._totals = CompileTotals()
        self._registered = False

    def _on_duration(self, event: str, duration: float, **_: object) -> None:
        if event in COMPILE_EVENTS:
            with self._lock:
                t = self._totals
                self._totals = CompileTotals(t.seconds + duration, t.hits, t.misses)

    def _on_event(self, event: str, **_: object) -> None:
        if event in (HIT_EVENT, MISS_EVENT):
            with self._lock:
                t = self._totals
                hit = event == HIT_EVENT
                self._totals = CompileTotals(t.seconds, t.hits + hit, t.misses + (not hit))

    def now(self) -> CompileTotals:
        """The totals so far (start listening on the first call)."""
        if not self._registered:
            with self._lock:
                if not self._registered:
                    jax.monitoring.register_event_duration_secs_listener(self._on_duration)
                    jax.monitoring.register_event_listener(self._on_event)
                    self._registered = True
        with self._lock:
            return self._totals


COMPILE_CLOCK = CompileClock()
