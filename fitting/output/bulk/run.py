"""Bulk rendering of labelled training sets (images, instance masks, COCO) from a recipe.

One recipe fixes the material, its parameter values and the imaging model; every image of a set
is a new draw of the geometry from the recipe's distributions (size, coverage, agglomeration):
image ``i`` of a set with seed ``S`` uses ``layout_seed = S * 100000 + i`` and its own render
seed (:func:`~fitting.output.bulk.jobs.seeds_for`), so any image can be re-rendered alone and
the set does not depend on how it was split between processes or machines.

Output folder (see :data:`~fitting.output.bulk.files.LAYOUT`)::

    OUT/
      images/000000.png      8-bit gray render
      masks/000000.png       16-bit instance ids 0..K (0 = substrate), no antialiasing: the particle most of the
                             pixel's render samples hit
      meta/000000.json       per-image sidecar: seeds, COCO annotations (RLE), particle features
      annotations.json       COCO instances file of every finished image (rebuilt from meta/)
      particles.csv          one row per instance of every finished image (rebuilt from meta/)
      dataset.json           recipe and settings of the set; a resumed run must match them

An image is finished when its PNG, its mask and its sidecar exist; a re-run skips finished
images. Every file is written atomically (temporary file + ``os.replace``), the sidecar last, so
an interruption at any moment leaves either a finished image or files that are re-rendered.
``annotations.json``/``particles.csv`` are rebuilt from the sidecars at the end of every run,
including interrupted and failed ones, so they always describe exactly the images present.

COCO specifics: image ``id`` = index + 1, ``file_name`` relative to ``images/`` (pass that folder
as the image root, e.g. to torchvision's ``CocoDetection``), category ``particle`` (and ``second
population`` for a material's second population),
``iscrowd`` 0, segmentations as *uncompressed* RLE (``counts`` a list of ints), which pycocotools,
detectron2 and torchvision's detection references all read (the references cannot read
compressed string RLE; ``rle="compressed"`` writes that instead).

Instances: per agglomerate by default (``instances="cluster"``): one mask per carbon-black
aggregate or sintered cluster, which is what an instance-segmentation model for such materials
is trained to find (primaries fused by necks are not separable objects in a micrograph, and
annotators label aggregates). ``"primary"`` gives one instance per primary particle. For
materials of single particles both are the same. Instances that are not visible in the image are
dropped; the ids that remain are relabelled 1..K in the order of the layout's ids.

Parallelism: a local process pool (default one process per core, each with one render thread;
``workers=1`` renders in the calling process, which is also the default when a GPU renders), or a Dask distributed cluster (``scheduler=``
address): tasks are chunks of image indices, the worker function imports ``fitting`` and
renders, and **workers write the files themselves into the output folder, which must therefore
be one shared folder (e.g. NFS) mounted at the same path on every worker and on the submitting
machine**. This is checked before rendering. Workers need the same matfit installation and
material library. A Dask worker process renders one image at a time; with ``nthreads > 1`` its
Mitsuba uses that many threads (``MATFIT_THREADS`` overrides); prefer ``--nthreads 1`` and one
worker process per core.
"""
from __future__ import annotations

import math
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fitting.core.errors import MatfitError
from fitting.core.events import CancelToken, EventSink, FitEvent, null_sink
from fitting.output.bulk.annotations import remove_temporaries, write_set_files
from fitting.output.bulk.files import LAYOUT, _probe_write, is_finished, stem
from fitting.output.bulk.jobs import (
    DEFAULT_TEXTURE_VARIANTS,
    SEED_STRIDE,
    _check_manifest,
    _dask_chunk,
    _pool_init,
    make_job,
    render_index,
)


@dataclass
class DatasetResult:
    out_dir: str
    count: int
    rendered: int
    skipped: int
    images: int                # images in annotations.json (every finished image in the folder)
    annotations: int
    seconds: float
    workers: int
    backend: str               # "inline", "pool" or "dask"
    stage_seconds: dict[str, float] = field(default_factory=dict)   # mean per rendered image
    cancelled: bool = False
    score: Any = None

    def to_dict(self) -> dict:
        d = dict(self.__dict__)
        if self.score is not None and hasattr(self.score, "to_dict"):
            d["score"] = self.score.to_dict()
        return d


def default_workers(device: str = "auto") -> int:
    """All usable cores on CPU; one process when rendering on a GPU (processes would share it)."""
    from fitting.core.runtime import cuda_device_name
    if device != "cpu" and os.environ.get("MATFIT_DEVICE", device).lower() != "cpu" and cuda_device_name():
        return 1
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


class _Progress:
    def __init__(self, sink: EventSink, total: int, done0: int) -> None:
        self.sink, self.total, self.done0 = sink, total, done0
        self.done = done0
        self.t0 = time.time()

    def step(self, n: int = 1, msg: str = "") -> None:
        self.done += n
        new = self.done - self.done0
        el = time.time() - self.t0
        eta = el / new * (self.total - self.done) if new > 0 else None
        self.sink(FitEvent("iteration", stage="bulk", progress=self.done / max(self.total, 1), eta_s=eta,
                           message=f"{self.done}/{self.total} images {msg}".rstrip(),
                           data={"done": self.done, "total": self.total}))


def render_dataset(recipe, out_dir: str | os.PathLike, count: int, *, size: int | None = None,
                   spp: int | None = None, seed: int = 0, workers: int | None = None,
                   scheduler=None, instances: str = "cluster", device: str = "auto",
                   chunk_size: int | None = None, reference: str | os.PathLike | None = None,
                   rle: str = "uncompressed", score_crops: int = 100,
                   texture_variants: int = DEFAULT_TEXTURE_VARIANTS, on_event: EventSink | None = None,
                   cancel: CancelToken | None = None) -> DatasetResult:
    """Render images 0..count-1 of a labelled set into ``out_dir`` (resuming a partial set).

    recipe: a :class:`~fitting.materials.recipe.Recipe` or a path to one. workers: local processes
    (default: :func:`default_workers`; 1 renders in this process). scheduler: a Dask scheduler address
    (``tcp://host:8786``) or a ``distributed.Client``; then ``out_dir`` must be shared with the
    workers. reference: a micrograph to score the finished set against (FID/KID).
    rle: segmentation format of annotations.json (see :func:`~fitting.output.bulk.annotations.build_coco`).
    texture_variants: surface-texture realisations shared by the set (0 = one per image).
    A CancelToken or Ctrl-C stops after the images in flight; the set files are rebuilt either way.
    """
    from fitting.materials.recipe import Recipe
    if not isinstance(recipe, Recipe):
        recipe = Recipe.load(recipe)
    count = int(count)
    if count < 1:
        raise MatfitError(f"--count must be >= 1, got {count}")
    if int(seed) < 0:
        raise MatfitError(f"--seed must be >= 0, got {seed}")
    if count > SEED_STRIDE:
        raise MatfitError(f"at most {SEED_STRIDE} images per seed (got {count})",
                          hint="render several sets with different --seed")
    sink = on_event or null_sink
    cancel = cancel or CancelToken()
    job = make_job(recipe, size, spp, seed, instances, device, texture_variants)
    if rle not in ("uncompressed", "compressed"):
        raise MatfitError(f"unknown RLE format {rle!r}", hint="use 'uncompressed' or 'compressed'")
    ref_work = None
    if reference is not None:      # a bad reference fails now, not after hours of rendering
        from fitting.reference.loading import load_reference
        scale = int((recipe.reference or {}).get("working_scale") or 512)
        ref_work = load_reference(reference).working(max_side=scale)
    out = Path(out_dir).expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise MatfitError(f"{out} exists and is not a folder")
    for sub in LAYOUT.values():
        (out / sub).mkdir(parents=True, exist_ok=True)
    man = _check_manifest(out, job, recipe.to_dict())
    remove_temporaries(out, stop_files=True)
    todo = [i for i in range(count) if not is_finished(out, i)]
    skipped = count - len(todo)
    t0 = time.time()
    prog = _Progress(sink, count, skipped)
    if skipped:
        sink(FitEvent("log", stage="bulk", message=f"{skipped} of {count} images already finished: skipped",
                      progress=skipped / count))
    if scheduler is not None:
        backend = "dask"
        nworkers = 0
    else:
        nworkers = int(workers) if workers else default_workers(device)
        nworkers = max(1, min(nworkers, len(todo) or 1))
        backend = "inline" if nworkers == 1 else "pool"
    results: list[dict] = []
    try:
        if todo:
            if backend == "inline":
                for i in todo:
                    if cancel.cancelled:
                        break
                    results.append(render_index(job, i, out))
                    prog.step()
            elif backend == "pool":
                results = _run_pool(job, todo, out, nworkers, device, prog, cancel)
            else:
                results, nworkers = _run_dask(job, todo, out, scheduler, chunk_size, prog, cancel)
    finally:
        remove_temporaries(out)
        n_img, n_ann = write_set_files(out, man.get("coco_info"), rle)
    rendered = [r for r in results if not r.get("skipped")]
    stages: dict[str, float] = {}
    for r in rendered:
        for k, v in r.get("seconds", {}).items():
            stages[k] = stages.get(k, 0.0) + v / len(rendered)
    missing = [i for i in range(count) if not is_finished(out, i)]
    res = DatasetResult(out_dir=str(out), count=count, rendered=len(rendered),
                        skipped=skipped + sum(1 for r in results if r.get("skipped")), images=n_img,
                        annotations=n_ann, seconds=time.time() - t0, workers=nworkers, backend=backend,
                        stage_seconds=stages, cancelled=bool(missing) and cancel.cancelled)
    if missing and not res.cancelled:
        raise MatfitError(f"{len(missing)} image(s) were not written (first: {stem(missing[0])})",
                          hint="run the same command again to render the missing images")
    if res.cancelled:
        sink(FitEvent("log", stage="bulk", message=f"stopped: {count - len(missing)} of {count} images finished; "
                      "run the same command again to resume", progress=(count - len(missing)) / count))
        return res
    sink(FitEvent("finished", stage="bulk", progress=1.0,
                  message=f"{count} images, {n_ann} instances in {res.seconds:.1f} s -> {out}"))
    if ref_work is not None:
        from fitting.describe.quality import score_folder
        sink(FitEvent("stage", stage="score", message=f"FID/KID against {reference}", progress=1.0))
        res.score = score_folder(ref_work, out, working_scale=scale, seed=int(seed), crops=int(score_crops))
    return res


def _sigint_ignored():
    """Context: SIGINT ignored in this process (main thread only), so that children spawned
    meanwhile start with it ignored too (an ignored signal stays ignored across exec); a Ctrl-C
    then reaches only the parent, which stops the pool cleanly."""
    import contextlib
    import signal

    @contextlib.contextmanager
    def cm():
        try:
            old = signal.signal(signal.SIGINT, signal.SIG_IGN)
        except ValueError:          # not the main thread: leave signals alone
            yield
            return
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, old)
    return cm()


def _run_pool(job, todo, out, nworkers, device, prog, cancel) -> list[dict]:
    import multiprocessing as mp
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
    from concurrent.futures.process import BrokenProcessPool
    ctx = mp.get_context("spawn")   # never fork a process that may hold Dr.Jit/LLVM threads
    results: list[dict] = []
    ex = ProcessPoolExecutor(max_workers=nworkers, mp_context=ctx, initializer=_pool_init, initargs=(device,))
    pending = list(todo)
    running: set = set()
    try:
        with _sigint_ignored():     # the workers are spawned by these first submits
            while pending and len(running) < 2 * nworkers:
                running.add(ex.submit(render_index, job, pending.pop(0), str(out)))
        while pending or running:
            while pending and len(running) < 2 * nworkers and not cancel.cancelled:
                running.add(ex.submit(render_index, job, pending.pop(0), str(out)))
            if not running:
                break
            done, running = wait(running, timeout=0.5, return_when=FIRST_COMPLETED)
            for f in done:
                try:
                    results.append(f.result())
                except BrokenProcessPool:
                    raise MatfitError("a render worker process died (out of memory, or killed)",
                                      hint="run the same command again to resume; use fewer --workers "
                                           "if memory is short") from None
                prog.step()
            if cancel.cancelled:
                pending.clear()
        ex.shutdown(wait=True)
    except KeyboardInterrupt:
        # Ctrl-C that the caller did not turn into a cancel (the CLI's second one): stop now.
        # Killed workers leave at most temporary files (removed by the caller), never a final one.
        _kill_pool(ex)
        raise
    except BaseException:
        # an error: drop queued images, let the running ones finish their files
        pending.clear()
        for f in running:
            f.cancel()
        try:
            ex.shutdown(wait=True, cancel_futures=True)
        except KeyboardInterrupt:
            _kill_pool(ex)
        raise
    return results


def _kill_pool(ex) -> None:
    procs = list((getattr(ex, "_processes", None) or {}).values())
    for p in procs:
        try:
            p.kill()
        except Exception:
            pass
    for p in procs:
        try:
            p.join(timeout=10)
        except Exception:
            pass
    ex.shutdown(wait=False, cancel_futures=True)


def _connect(scheduler):
    try:
        from distributed import Client
    except ImportError as e:
        raise MatfitError("--scheduler needs dask.distributed", hint='pip install "dask[distributed]"') from e
    if isinstance(scheduler, Client):
        return scheduler, False
    try:
        return Client(str(scheduler), timeout=30), True
    except (OSError, TimeoutError) as e:
        raise MatfitError(f"cannot reach the Dask scheduler at {scheduler}: {e}",
                          hint="start one with `dask scheduler` and workers with `dask worker ADDRESS "
                               "--nthreads 1`, then pass its tcp:// address") from None


def _run_dask(job, todo, out: Path, scheduler, chunk_size, prog, cancel) -> tuple[list[dict], int]:
    client, own = _connect(scheduler)
    results: list[dict] = []
    stop_file = str(out / f".stop-{uuid.uuid4().hex}")
    futures = []
    try:
        nworkers = max(1, len(client.scheduler_info(n_workers=-1).get("workers", {})) if _accepts_n_workers()
                       else len(client.scheduler_info().get("workers", {})))
        probe = f".probe-{uuid.uuid4().hex}"
        host = client.submit(_probe_write, str(out), probe, pure=False).result(timeout=120)
        if not (out / probe).is_file():
            raise MatfitError(f"a Dask worker on {host} wrote into {out}, but this machine does not see the "
                              "file: the output folder is not shared",
                              hint="put --out on a filesystem mounted at the same path on every worker "
                                   "(NFS, Lustre, ...)")
        (out / probe).unlink()
        c = chunk_size or max(1, min(16, math.ceil(len(todo) / (4 * nworkers))))
        chunks = [todo[i:i + c] for i in range(0, len(todo), c)]
        futures = [client.submit(_dask_chunk, job, ch, str(out), stop_file, pure=False) for ch in chunks]
        remaining = list(futures)
        while remaining:
            if cancel.cancelled and not os.path.exists(stop_file):
                Path(stop_file).touch()       # workers stop between images
            done = [f for f in remaining if f.done()]
            if not done:
                time.sleep(0.1)
                continue
            remaining = [f for f in remaining if not f.done()]
            for f in done:
                part = f.result()
                results.extend(part)
                prog.step(len(part))
        return results, nworkers
    except KeyboardInterrupt:
        # Ctrl-C not turned into a cancel (the CLI's second one): stop at once. Images already
        # rendering on workers still finish (atomically); the next run lists them.
        Path(stop_file).touch()
        stop_file = None            # keep it: running chunks read it between images (removed next run)
        client.cancel(futures)
        raise
    except BaseException:
        # an error: stop workers between images (they check the stop file), let images in flight finish
        try:
            Path(stop_file).touch()
            from distributed import wait as dwait
            dwait(futures, timeout=600)
        except BaseException:
            client.cancel(futures)
        raise
    finally:
        if stop_file:
            try:
                os.unlink(stop_file)
            except OSError:
                pass
        if own:
            client.close()


def _accepts_n_workers() -> bool:
    import inspect

    from distributed import Client
    try:
        return "n_workers" in inspect.signature(Client.scheduler_info).parameters
    except (TypeError, ValueError):
        return False
