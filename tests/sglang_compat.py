"""SGLang's own wire classes, loaded from its wheel without torch, for the interop tests.

Not a test module: ``tests/test_sglang_interop.py`` calls :func:`load_sglang` once per session.

Where the code comes from
-------------------------
* If ``sglang`` is installed as a distribution (checked with ``importlib.metadata`` and, failing that,
  ``importlib.util.find_spec`` — neither executes ``sglang/__init__.py``), its files are used.
* Otherwise ``pip install --no-deps --target <repo>/.cache/sglang-0.5.23 sglang==0.5.23`` runs once (a
  39 MB wheel, no torch: ``--no-deps``), under a file lock, into a temporary folder renamed into place
  only when complete. ``msgspec``, ``pydantic`` and ``psutil`` (SGLang's small pure dependencies of the
  files below) are installed into the running environment if they are missing (they are in the
  ``test`` extra, so normally they are there already).
* Any failure (no network, no pip) raises :class:`SGLangUnavailable` whose message names the command;
  the tests turn it into a skip.

How the files are loaded
------------------------
``import sglang`` would run ``sglang/__init__.py``, which imports torch. Instead each needed file is
loaded by path with ``importlib.util.spec_from_file_location`` under its real dotted name, after empty
package shells (``__path__ = []``, so nothing else can be imported from them by accident) are put in
``sys.modules`` for its parent packages. The files' own ``from sglang... import`` lines then resolve to
what is already in ``sys.modules``. Loaded for real (SGLang's code, unchanged):

* ``srt/disaggregation/kv_events.py``: the event structs, ``KVEventBatch``, ``ZmqEventPublisher``.
* ``srt/managers/scheduler_components/load_publisher.py``: ``LoadStat``, ``SchedulerLoadPublisher``.
* ``srt/utils/network.py``: ``NetworkAddress`` (kv_events and load_publisher use it; needs psutil).
* ``srt/mem_cache/cpp_utils/native_hash.py``, ``srt/mem_cache/evict_policy.py``,
  ``srt/mem_cache/utils.py`` (``get_hash_str``, ``hash_str_to_int64``) and ``srt/mem_cache/events.py``
  (``KVCacheEventRecorder``, which turns radix-tree nodes into the published events).

Stubbed — the minimum found to work, each because the real module needs torch or has side effects:

* ``sglang.srt.runtime_context``: imports the server-argument machinery (and through it torch). Only
  its ``get_parallel()`` is used (by ``is_kv_publisher_rank`` and ``SchedulerLoadPublisher``); the stub
  returns the parallel layout of a single-GPU server (every rank 0, one DP rank).
* ``sglang.kernels.ops.kvcache.mla_buffer``: torch/triton kernels that ``mem_cache/utils.py`` merely
  re-exports. Any attribute is a function that raises if called.
* ``sglang.srt.environ``: stdlib-only, but importing it writes defaults into ``os.environ`` (cache
  folders of third-party libraries), which must not leak into the other tests. ``mem_cache/utils.py``
  imports ``envs`` only for ``maybe_init_custom_mem_pool``, never called here; the stub raises if used.
* ``sglang.srt.utils.cpp_extension_loader``: wraps ``torch.utils.cpp_extension.load``. SGLang 0.5.23
  has **no pure-Python block hash**: ``get_hash_str`` → ``get_native_hash`` → the C++ file
  ``srt/mem_cache/cpp_utils/hash_binding.cpp`` (OpenSSL SHA-256, pybind11), JIT-built by torch. The stub's
  ``load_extension_with_recovery`` builds that same file, with the flags SGLang passes plus
  ``-DTORCH_EXTENSION_NAME=<name>`` (what torch defines), using ``g++``, pybind11's headers and
  ``-lcrypto``, and caches the ``.so`` under ``.cache``. If no compiler, OpenSSL headers or pybind11 can
  be had, only the hash comparison is unavailable (``SGLang.native_hash_error`` says why).

Once loaded, every ``sglang*`` entry this module added is removed from ``sys.modules`` again, so the rest
of the test session never sees a half-package named ``sglang``. The loaded modules keep working: their
names are bound; the one lazy import (the native hash loader) is warmed first, and msgspec's per-class
type information is computed (by building the decoders) while the modules are still registered.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.machinery
import importlib.metadata
import importlib.util
import shutil
import subprocess
import sys
import sysconfig
import types
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SGLANG_VERSION = "0.5.23"
REPO = Path(__file__).resolve().parent.parent
CACHE = REPO / ".cache"
TARGET = CACHE / f"sglang-{SGLANG_VERSION}"
INSTALL_TIMEOUT_S = 300
BUILD_TIMEOUT_S = 180
PY_DEPS = ("msgspec", "pydantic", "psutil", "zmq")  # import names; "zmq" is pyzmq, a project dependency
PIP_NAMES = {"zmq": "pyzmq"}

INSTALL_COMMAND = f"pip install --no-deps --target {TARGET.relative_to(REPO)} sglang=={SGLANG_VERSION}"

_KV_EVENTS = "sglang/srt/disaggregation/kv_events.py"


class SGLangUnavailable(RuntimeError):
    """SGLang's code could not be obtained or loaded; the message says why and which command failed."""


@dataclass(frozen=True)
class SGLang:
    """SGLang's modules, loaded by path. ``origin`` says where the files came from."""

    version: str
    origin: str
    root: Path  # the folder holding the ``sglang`` package
    kv_events: types.ModuleType
    load_publisher: types.ModuleType
    mem_cache_utils: types.ModuleType
    events: types.ModuleType
    native_hash_error: str | None  # None when SGLang's native block hash was built and loaded

    def require_native_hash(self) -> None:
        """Raise :class:`SGLangUnavailable` if SGLang's native block hash could not be built."""
        if self.native_hash_error is not None:
            raise SGLangUnavailable(self.native_hash_error)


# ---------------------------------------------------------------------------------- obtaining the files


def _pip(args: Sequence[str], timeout: float, shown: str = "") -> None:
    """Run pip (bounded: each connection 20 s, one retry, the whole ``timeout``); ``shown`` names it."""
    cmd = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input", "--timeout", "20",
           "--retries", "1", *args]  # fmt: skip
    shown = shown or " ".join(["pip", *args])
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise SGLangUnavailable(f"`{shown}` did not finish within {timeout:g} s") from None
    except OSError as exc:
        raise SGLangUnavailable(f"`{shown}` could not run: {exc}") from exc
    if res.returncode != 0:
        tail = " | ".join((res.stderr or res.stdout).strip().splitlines()[-3:])
        raise SGLangUnavailable(f"`{shown}` failed (exit {res.returncode}): {tail}")


def _ensure_python_deps() -> None:
    missing = [m for m in PY_DEPS if importlib.util.find_spec(m) is None]
    if missing:
        _pip(["install", "-q", *(PIP_NAMES.get(m, m) for m in missing)], INSTALL_TIMEOUT_S)
        importlib.invalidate_caches()


@contextlib.contextmanager
def _locked(name: str) -> Iterator[None]:
    """An exclusive lock file under ``.cache`` (concurrent pytest processes install/build once)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / f"{name}.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _installed_root() -> tuple[Path, str] | None:
    """The folder holding an installed ``sglang`` package and its version, without importing it."""
    try:
        dist = importlib.metadata.distribution("sglang")
    except importlib.metadata.PackageNotFoundError:
        dist = None
    if dist is not None:
        root = Path(str(dist.locate_file("")))
        if (root / _KV_EVENTS).is_file():
            return root, dist.version
    spec = importlib.util.find_spec("sglang")  # top-level: locates, does not execute __init__
    if spec is not None and spec.submodule_search_locations:
        pkg = Path(next(iter(spec.submodule_search_locations)))
        if (pkg.parent / _KV_EVENTS).is_file():
            return pkg.parent, dist.version if dist is not None else "unknown"
    return None


def _cached_root() -> Path:
    """``.cache/sglang-0.5.23``, installing the wheel there first if needed."""
    marker = TARGET / ".complete"
    if marker.is_file():
        return TARGET
    if sys.version_info < (3, 11):  # the wheel's Requires-Python (cp311 only): pip would find no version
        raise SGLangUnavailable(
            f"sglang=={SGLANG_VERSION} requires Python >= 3.11 (this is {sys.version.split()[0]}); "
            "CI's Python 3.11 leg runs these tests"
        )
    with _locked("sglang-install"):
        if marker.is_file():
            return TARGET
        tmp = TARGET.with_name(TARGET.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        _pip(
            ["install", "-q", "--no-deps", "--target", str(tmp), f"sglang=={SGLANG_VERSION}"],
            INSTALL_TIMEOUT_S,
            shown=INSTALL_COMMAND,
        )
        if not (tmp / _KV_EVENTS).is_file():
            raise SGLangUnavailable(f"the sglang=={SGLANG_VERSION} wheel has no {_KV_EVENTS}")
        (tmp / ".complete").write_text(SGLANG_VERSION)
        shutil.rmtree(TARGET, ignore_errors=True)
        tmp.rename(TARGET)
    return TARGET


# ------------------------------------------------------------------------------------ the native hash


def _pybind11_include() -> str:
    if importlib.util.find_spec("pybind11") is not None:
        import pybind11

        return str(pybind11.get_include())
    target = CACHE / "pybind11"
    include = target / "pybind11" / "include"
    if not (include / "pybind11" / "pybind11.h").is_file():
        with _locked("pybind11-install"):
            if not (include / "pybind11" / "pybind11.h").is_file():
                shutil.rmtree(target, ignore_errors=True)
                _pip(["install", "-q", "--no-deps", "--target", str(target), "pybind11"], INSTALL_TIMEOUT_S)
    return str(include)


def _build_extension(
    name: str, sources: Sequence[str], extra_cflags: Sequence[str], extra_ldflags: Sequence[str]
) -> types.ModuleType:
    """Compile SGLang's C++ ``sources`` into a Python extension named ``name`` (cached) and import it."""
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        raise SGLangUnavailable("no C++ compiler (apt-get install g++)")
    key = hashlib.sha256()
    for src in sources:
        key.update(Path(src).read_bytes())
    key.update(" ".join([*extra_cflags, *extra_ldflags]).encode())
    out_dir = CACHE / "native" / f"{name}-{key.hexdigest()[:16]}"
    so = out_dir / f"{name}{sysconfig.get_config_var('EXT_SUFFIX') or '.so'}"
    if not so.is_file():
        with _locked(f"build-{name}"):
            if not so.is_file():
                out_dir.mkdir(parents=True, exist_ok=True)
                tmp = so.with_name(so.name + ".tmp")
                cmd = [
                    cxx, "-shared", "-fPIC", *extra_cflags, f"-DTORCH_EXTENSION_NAME={name}",
                    f"-I{_pybind11_include()}", f"-I{sysconfig.get_paths()['include']}",
                    *sources, "-o", str(tmp), *extra_ldflags,
                ]  # fmt: skip
                try:
                    res = subprocess.run(cmd, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    raise SGLangUnavailable(f"building {name} took over {BUILD_TIMEOUT_S} s") from None
                if res.returncode != 0:
                    errs = [ln for ln in res.stderr.splitlines() if "error" in ln][:3]
                    raise SGLangUnavailable(
                        f"building SGLang's {Path(sources[0]).name} failed "
                        f"(needs g++, pybind11 and OpenSSL headers: apt-get install g++ libssl-dev): "
                        + " | ".join(errs or res.stderr.strip().splitlines()[-3:])
                    )
                tmp.rename(so)
    loader = importlib.machinery.ExtensionFileLoader(name, str(so))
    spec = importlib.util.spec_from_file_location(name, so, loader=loader)
    assert spec is not None
    mod = importlib.util.module_from_spec(spec)
    loader.exec_module(mod)
    return mod


# ----------------------------------------------------------------------------------------- the stubs


def _raising(what: str) -> Callable[..., Any]:
    def fail(*_a: Any, **_k: Any) -> Any:
        raise RuntimeError(f"{what} is stubbed in tests/sglang_compat.py (needs torch)")

    return fail


def _stub(name: str, attrs: dict[str, Any] | None = None, any_attr: bool = False) -> types.ModuleType:
    mod = types.ModuleType(name, f"stub of {name} (tests/sglang_compat.py)")
    mod.__dict__.update(attrs or {})
    if any_attr:  # PEP 562: makes `from <stub> import whatever` work
        mod.__dict__["__getattr__"] = lambda attr: _raising(f"{name}.{attr}")
    return mod


def _single_gpu_parallel() -> types.SimpleNamespace:
    """``runtime_context.get_parallel()`` of a server with one GPU: every rank 0, one DP rank."""
    return types.SimpleNamespace(
        pp_rank=0, attn_tp_rank=0, attn_cp_rank=0, attn_dp_rank=0, attn_dp_size=1, dp_rank=0, num_dp_ranks=1
    )


def _load_extension_with_recovery(
    name: str,
    sources: Sequence[str],
    extra_cflags: Sequence[str] = (),
    extra_ldflags: Sequence[str] = (),
    with_cuda: bool = False,
    **_kw: Any,
) -> types.ModuleType:
    if with_cuda:
        raise SGLangUnavailable(f"{name} needs CUDA")
    return _build_extension(name, sources, extra_cflags, extra_ldflags)


STUBS: dict[str, Callable[[], types.ModuleType]] = {
    "sglang.srt.runtime_context": lambda: _stub(
        "sglang.srt.runtime_context", {"get_parallel": _single_gpu_parallel}
    ),
    "sglang.kernels.ops.kvcache.mla_buffer": lambda: _stub(
        "sglang.kernels.ops.kvcache.mla_buffer", any_attr=True
    ),
    "sglang.srt.environ": lambda: _stub("sglang.srt.environ", {"envs": _stub("envs", any_attr=True)}),
    "sglang.srt.utils.cpp_extension_loader": lambda: _stub(
        "sglang.srt.utils.cpp_extension_loader",
        {"load_extension_with_recovery": _load_extension_with_recovery},
    ),
}

# Loaded for real, in dependency order.
REAL = (
    "sglang.srt.utils.network",
    "sglang.srt.disaggregation.kv_events",
    "sglang.srt.managers.scheduler_components.load_publisher",
    "sglang.srt.mem_cache.cpp_utils.native_hash",
    "sglang.srt.mem_cache.evict_policy",
    "sglang.srt.mem_cache.utils",
    "sglang.srt.mem_cache.events",
)


@contextlib.contextmanager
def _sglang_in_sys_modules() -> Iterator[None]:
    """Let SGLang's absolute imports resolve while loading; take every added ``sglang*`` entry out after."""
    before = {k for k in sys.modules if k == "sglang" or k.startswith("sglang.")}
    if before:  # a real `import sglang` happened: do not mix our shells with it
        raise SGLangUnavailable(f"sglang is already imported in this process ({sorted(before)[:3]})")
    try:
        names = {*STUBS, *REAL}
        for name in sorted({".".join(n.split(".")[:i]) for n in names for i in range(1, n.count(".") + 1)}):
            shell = types.ModuleType(name, "package shell (tests/sglang_compat.py)")
            shell.__path__ = []
            sys.modules[name] = shell
        for name, make in STUBS.items():
            sys.modules[name] = make()
            parent, _, leaf = name.rpartition(".")
            setattr(sys.modules[parent], leaf, sys.modules[name])
        yield
    finally:
        for k in [k for k in sys.modules if k == "sglang" or k.startswith("sglang.")]:
            del sys.modules[k]


def _load_file(root: Path, name: str) -> types.ModuleType:
    path = root / (name.replace(".", "/") + ".py")
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise SGLangUnavailable(f"cannot load {path}")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    parent, _, leaf = name.rpartition(".")
    setattr(sys.modules[parent], leaf, mod)
    try:
        spec.loader.exec_module(mod)
    except Exception as exc:
        raise SGLangUnavailable(f"loading {path} failed: {type(exc).__name__}: {exc}") from exc
    return mod


def _load(root: Path, version: str, origin: str) -> SGLang:
    import msgspec

    with _sglang_in_sys_modules():
        mods = {name: _load_file(root, name) for name in REAL}
        kv = mods["sglang.srt.disaggregation.kv_events"]
        lp = mods["sglang.srt.managers.scheduler_components.load_publisher"]
        # msgspec resolves a Struct's annotations (load_publisher uses `from __future__ import
        # annotations`) through sys.modules the first time a decoder is built, then caches them.
        for cls in (kv.KVEventBatch, kv.EventBatch, kv.BlockStored, kv.BlockRemoved, lp.LoadStat):
            msgspec.msgpack.Decoder(cls)
        native_error: str | None = None
        try:  # warm the lru_cached native loader while its lazy import can still resolve to the stub
            mods["sglang.srt.mem_cache.cpp_utils.native_hash"]._load_native_hash_module()
        except Exception as exc:
            cause = exc.__cause__ if isinstance(exc.__cause__, SGLangUnavailable) else exc
            native_error = f"SGLang's native block hash (hash_binding.cpp) is unavailable: {cause}"
    return SGLang(
        version=version,
        origin=origin,
        root=root,
        kv_events=kv,
        load_publisher=lp,
        mem_cache_utils=mods["sglang.srt.mem_cache.utils"],
        events=mods["sglang.srt.mem_cache.events"],
        native_hash_error=native_error,
    )


def needs_setup() -> bool:
    """Whether :func:`load_sglang` may still have to install the wheel or build the native hash (slow)."""
    has_code = (TARGET / ".complete").is_file() or _installed_root() is not None
    return not has_code or not any(CACHE.glob("native/*/*.so"))


_RESULT: SGLang | SGLangUnavailable | None = None


def load_sglang() -> SGLang:
    """SGLang's modules (obtained and loaded once per process).

    Raises:
        SGLangUnavailable: the wheel could not be installed or its files could not be loaded; the same
        error is raised again on later calls without retrying.
    """
    global _RESULT
    if _RESULT is None:
        try:
            _ensure_python_deps()
            found = _installed_root()
            if found is not None:
                root, version = found
                origin = f"installed distribution sglang {version} at {root}"
            else:
                root, version = _cached_root(), SGLANG_VERSION
                origin = INSTALL_COMMAND
            _RESULT = _load(root, version, origin)
        except SGLangUnavailable as exc:
            _RESULT = exc
    if isinstance(_RESULT, SGLangUnavailable):
        raise _RESULT
    return _RESULT
