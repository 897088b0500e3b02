"""JAX's persistent compilation cache for the command-line tools.

A run's loop compiles in ~8-20 s on a 2-core machine, most of a short run's wall time. With the
cache on, XLA's executable for a given set of shapes and static features is written to disk once
and read back by every later process that asks for the same one (jax.readthedocs.io,
"Persistent compilation cache"). Single runs round their shapes up to size classes
(:meth:`jaxsim.planning.Dims.bucketed`), so runs of similar traces share an entry.

The scripts turn it on (``sim.compile_cache``, default true); the library leaves JAX's global
configuration alone unless :func:`enable` is called. The folder is safe to delete at any time.
"""

import os
from pathlib import Path

import jax


def default_dir() -> Path:
    """``$JAXSIM_CACHE_DIR``, else ``$XDG_CACHE_HOME/jaxsim/xla``, else ``~/.cache/jaxsim/xla``."""
    if os.environ.get("JAXSIM_CACHE_DIR"):
        return Path(os.environ["JAXSIM_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "jaxsim" / "xla"


def enable(path: str | Path | None = None) -> Path | None:
    """Turn the persistent compilation cache on in ``path`` (default :func:`default_dir`).

    Every compile is stored, not only those over JAX's default 1 s: building a run's state runs
    ~130 small operations, each compiled once per process (~25 ms each, 3 s in all), and reading
    them back is what makes a second ``scripts/run.py`` start fast (the default run: 31 s, then
    7.5-9 s; 125 entries, 1.2 MB). ``JAXSIM_COMPILE_CACHE=0`` in the environment turns it
    off everywhere. Returns the folder, or None when it is off or cannot be created (a read-only
    home: the run goes on without the cache, with a warning).
    """
    if os.environ.get("JAXSIM_COMPILE_CACHE", "").lower() in ("0", "false", "no", "off"):
        return None  # switched off for this environment (tests/conftest.py does this)
    folder = Path(path).expanduser() if path else default_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        import warnings

        warnings.warn(f"compile cache disabled: cannot create {folder} ({e}); set sim.compile_cache_dir", stacklevel=2)
        return None
    jax.config.update("jax_compilation_cache_dir", str(folder))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    return folder
