"""On-disk cache of preprocessed cases: content-keyed, atomically written, checked on every load.

Key = SHA-256 of (the image and mask files' bytes, the preprocessing config, the preprocessing code
version, the entry format). Changing a file or the config gives a new key; stale entries are simply
never read again. Each entry is ``MAGIC + sha256(payload) + payload`` written to a temporary file in
the same folder and moved into place with ``os.replace``, so several processes (sites, DataLoader
workers) can fill one cache at once: a reader sees a whole entry or none. An entry that fails its
checksum or its shape checks is logged, deleted and rebuilt.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import multiprocessing
import os
import sys
import threading
import time
import zipfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from fedsubtype.configio import atomic_write_bytes
from fedsubtype.errors import ImageReadError, UserError
from fedsubtype.data.manifest import Case
from fedsubtype.data.preprocess import PREPROCESS_VERSION, PreprocessConfig, PreprocessedCase, preprocess_case

log = logging.getLogger(__name__)

CACHE_FORMAT = 1
"""Layout of an entry on disk; part of every key."""
_MAGIC = b"FSPCACHE"
_DIGEST = 32
_STALE_TMP_S = 3600.0

_hash_memo: dict[tuple, str] = {}
_memo_lock = threading.Lock()


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def content_hash(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes, or of a folder's files (names + bytes; DICOM series); memoised per (path, size, mtime)."""
    path = Path(path)
    try:
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file())
            stamp = tuple((str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns) for p in files)
        else:
            st = path.stat()
            files, stamp = [path], (st.st_size, st.st_mtime_ns)
    except OSError as exc:
        raise ImageReadError(f"cannot read {path} ({exc.strerror or exc.__class__.__name__})",
                             "check the manifest path and file permissions") from None
    memo_key = (str(path.resolve()), stamp)
    with _memo_lock:
        if memo_key in _hash_memo:
            return _hash_memo[memo_key]
    if path.is_dir():
        h = hashlib.sha256()
        for p in files:
            h.update(str(p.relative_to(path)).encode() + b"\0" + _file_sha256(p).encode())
        digest = h.hexdigest()
    else:
        digest = _file_sha256(path)
    with _memo_lock:
        _hash_memo[memo_key] = digest
    return digest


def _encode(pc: PreprocessedCase) -> bytes:
    buf = io.BytesIO()
    image16 = np.clip(pc.image, -6.0e4, 6.0e4).astype(np.float16)
    meta = np.frombuffer(json.dumps(pc.meta, sort_keys=True).encode("utf-8"), dtype=np.uint8)
    np.savez_compressed(buf, image=image16, regions=pc.regions.astype(np.uint8), meta=meta)
    payload = buf.getvalue()
    return _MAGIC + hashlib.sha256(payload).digest() + payload


def _decode(blob: bytes, size: int) -> PreprocessedCase:
    """Entry bytes -> PreprocessedCase; ValueError on any damage (wrong magic, checksum, shapes)."""
    head = len(_MAGIC) + _DIGEST
    if len(blob) < head or blob[:len(_MAGIC)] != _MAGIC:
        raise ValueError("not a cache entry (bad header)")
    payload = blob[head:]
    if hashlib.sha256(payload).digest() != blob[len(_MAGIC):head]:
        raise ValueError("checksum mismatch (truncated or corrupted)")
    try:
        with np.load(io.BytesIO(payload), allow_pickle=False) as npz:
            image, regions, meta = npz["image"], npz["regions"], npz["meta"]
    except (KeyError, zipfile.BadZipFile, EOFError) as exc:
        raise ValueError(f"unreadable payload ({exc.__class__.__name__})") from None
    if image.shape != (size,) * 3 or regions.shape != (size,) * 3 or regions.dtype != np.uint8:
        raise ValueError(f"unexpected arrays {image.shape}/{regions.shape}")
    return PreprocessedCase(image.astype(np.float32), regions, json.loads(meta.tobytes().decode("utf-8")))


class PreprocessCache:
    """Preprocessed cases on disk under `root`, computed on a miss (see the module docstring)."""

    def __init__(self, root: str | os.PathLike, cfg: PreprocessConfig) -> None:
        self.root = Path(root)
        self.cfg = cfg
        config = {"preprocess": cfg.to_dict(), "preprocess_version": PREPROCESS_VERSION, "format": CACHE_FORMAT}
        self._config_digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()

    def key(self, case: Case) -> str:
        """Content + config key of a case (hex)."""
        h = hashlib.sha256(self._config_digest.encode())
        for part in (content_hash(case.image), content_hash(case.mask),
                     case.extra.get("image_series_uid", ""), case.extra.get("mask_series_uid", "")):
            h.update(b"\0" + part.encode())
        if case.extra.get("mask_segment"):  # which DICOM SEG segment is the tumour (absent: keys unchanged)
            h.update(b"\0segment\0" + case.extra["mask_segment"].encode())
        return h.hexdigest()[:40]

    def path(self, case: Case) -> Path:
        """Where the case's entry lives (it may not exist yet)."""
        key = self.key(case)
        return self.root / f"v{CACHE_FORMAT}" / key[:2] / f"{key}.fspc"

    def get(self, case: Case) -> PreprocessedCase:
        """The preprocessed case: from disk when a valid entry exists, otherwise computed and stored."""
        return self.fetch(case)[0]

    def fetch(self, case: Case) -> tuple[PreprocessedCase, str]:
        """Like :meth:`get`, also saying what happened: 'hit', 'miss' or 'rebuilt' (a damaged entry was replaced)."""
        path = self.path(case)
        status = "miss"
        try:
            blob = path.read_bytes()
        except FileNotFoundError:
            blob = None
        if blob is not None:
            try:
                return _decode(blob, self.cfg.size), "hit"
            except (ValueError, OSError) as exc:
                log.warning("%s: damaged cache entry %s (%s); rebuilding it", case.case_id, path, exc)
                path.unlink(missing_ok=True)
                status = "rebuilt"
        pc = preprocess_case(case, self.cfg)
        atomic_write_bytes(path, _encode(pc))
        return pc, status

    def warm(self, cases: Iterable[Case], *, workers: int = 1, progress: bool = True,
             skip_bad: bool = False) -> dict[str, Any]:
        """Make sure every case is cached; returns counts of hit/miss/rebuilt, seconds and cases/s.

        A case that cannot be preprocessed raises its one-line UserError, or with `skip_bad` is counted
        under "failed" and its line kept in "problems".
        """
        from tqdm.auto import tqdm

        cases = list(cases)
        self._sweep_stale_tmp()
        counts = {"hit": 0, "miss": 0, "rebuilt": 0, "failed": 0}
        problems: list[str] = []
        start = time.perf_counter()
        bar = tqdm(total=len(cases), desc="preprocess", unit="case", disable=not progress, file=sys.stderr)
        jobs = [(str(self.root), self.cfg, c, skip_bad) for c in cases]
        if workers <= 1 or len(cases) <= 1:
            results = map(_warm_one, jobs)
            pool = None
        else:
            pool = ProcessPoolExecutor(max_workers=workers, mp_context=_worker_context(), initializer=_worker_init)
            results = pool.map(_warm_one, jobs)
        try:
            for status, problem in results:
                counts[status] += 1
                if problem:
                    problems.append(problem)
                bar.update()
        finally:
            if pool is not None:
                pool.shutdown(cancel_futures=True)
            bar.close()
        seconds = time.perf_counter() - start
        return {"cases": len(cases), **counts, "problems": problems, "seconds": seconds,
                "cases_per_s": len(cases) / seconds if seconds > 0 else float("inf")}

    def _sweep_stale_tmp(self) -> None:
        """Remove temporary files left by writers that died (older than an hour)."""
        base = self.root / f"v{CACHE_FORMAT}"
        if not base.is_dir():
            return
        now = time.time()
        for tmp in base.glob("*/.*.tmp"):
            try:
                if now - tmp.stat().st_mtime > _STALE_TMP_S:
                    tmp.unlink()
            except OSError:
                pass


def _worker_context() -> multiprocessing.context.BaseContext:
    """Workers forked from a clean forkserver that has imported MONAI once (plain fork can deadlock
    after ITK/torch started their thread pools); spawn where forkserver does not exist."""
    if "forkserver" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(["fedsubtype.data.cache", "monai.transforms", "monai.data"])
        return ctx
    return multiprocessing.get_context("spawn")


def _worker_init() -> None:
    import torch

    torch.set_num_threads(1)


def _warm_one(args: tuple[str, PreprocessConfig, Case, bool]) -> tuple[str, str | None]:
    root, cfg, case, skip_bad = args
    try:
        return PreprocessCache(root, cfg).fetch(case)[1], None
    except UserError as exc:
        if not skip_bad:
            raise
        return "failed", exc.line()
