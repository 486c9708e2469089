"""Time and peak memory of opening a CC3M-595K-sized data set, and of ``llava-lora data check`` over it, in each
layout the tool reads: chat.json + images_dl/, chat.json + images.zip, parquet with embedded images, tar shards.

    .venv/bin/python benchmarks/data_open.py              # 595K records, ~160 MB of JSON; --n 20000 for a quick run
    .venv/bin/python benchmarks/data_open.py --layout parquet --layout zip --layout shards --n 20000
    .venv/bin/python benchmarks/data_open.py --layout parquet --layout zip --layout shards --check-records 60000

For zip, parquet and shards the images' bytes are real copies (about 14 KB per record: 8 GB at 595K per layout);
the parquet file has row groups of 100 rows (as ``datasets`` writes image sets), the shards 10,000 samples each
(img2dataset's default), caption-only (``key.jpg`` + ``key.txt``). Their phases: ``open`` (``load_data`` and the
stat/look-up pass), ``check`` and ``first batch`` (opening, then decoding the images of 8 records drawn at random: the
data's share of the first training step's latency). Shards are opened twice: with an empty index cache (the
header walk, ``data/tarindex.py``) and then with the index it cached (a cache folder of the benchmark's own).

Writes the set in a temporary folder: ``chat.json`` with CC3M-style records (the 11 LLaVA pretraining
questions, captions of 5-20 words) and ``images_dl/``, one hard link per record to one of a few JPEGs
(320x240, photo-like). Each phase runs in a fresh Python process, so its peak RSS is its own:

- ``json.load``: the stdlib reading the whole file as dicts (the baseline that ``load_records`` avoids);
- ``load_records``: parsing into compact Records;
- ``locate``: parsing, then train's pass before step 1 that finds missing or escaping images by a stat
  (``locate_records``, timed on its own);
- ``data check``: parse + resolve + decode every image (``check_image``) in a process pool (``--workers``);
  the peak RSS is given for the main process and for the largest worker, the speed per wall-clock second
  and per CPU-second (the machine may be shared: the load average before each phase is printed). With
  ``--check-records N`` the whole set is opened and the images of its first N records decoded (the rate is
  then of those N; opening stays at the full size).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

QUESTIONS = [
    "Describe the image concisely.", "Provide a brief description of the given image.",
    "Offer a succinct explanation of the picture presented.", "Summarize the visual content of the image.",
    "Give a short and clear explanation of the subsequent image.", "Share a concise interpretation of the image provided.",
    "Present a compact description of the photo's key features.", "Relay a brief, clear account of the picture shown.",
    "Render a clear and concise summary of the photo.", "Write a terse but informative summary of the picture.",
    "Create a compact narrative representing the image presented.",
]
WORDS = ("a the of and in on with at for person man woman city street view building tree sky water beach dog "
         "cat car house river mountain night day old new young beautiful red blue green white black small large "
         "stock photo vector illustration group people walking standing sitting near during background").split()
JPEGS = 4
LINKS_PER_FILE = 60_000


def _write_jpegs(folder: Path) -> list[Path]:
    """A few 320x240 photo-like JPEGs (gradient, a shape, texture), 12-16 KB each."""
    from PIL import Image, ImageDraw, ImageFilter

    paths = []
    for k in range(JPEGS):
        rng = random.Random(k)
        base = Image.linear_gradient("L").resize((320, 240)).rotate(rng.randint(0, 359))
        img = Image.merge("RGB", [base.point(lambda v, s=rng.random(): int(v * s + 60)) for _ in range(3)])
        ImageDraw.Draw(img).ellipse((60 + 20 * k, 40, 220, 200), fill=tuple(rng.randint(0, 255) for _ in range(3)))
        # blurred colour noise: texture that makes the file as large as a photo's (~12-16 KB at 320x240)
        noise = Image.merge("RGB", [Image.effect_noise((320, 240), 40) for _ in range(3)])
        img = Image.blend(img, noise.filter(ImageFilter.GaussianBlur(0.6)), 0.2 + 0.05 * k)
        paths.append(folder / f"source_{k}.jpg")
        img.save(paths[-1], quality=85)
    return paths


def _source(sources: list[Path], i: int) -> Path:
    """The JPEG record ``i`` links to; a fresh copy every LINKS_PER_FILE links (ext4 allows 65,000 per inode)."""
    base, copy = sources[i % JPEGS], i // (JPEGS * LINKS_PER_FILE)
    if copy == 0:
        return base
    path = base.with_name(f"{base.stem}_{copy}.jpg")
    if not path.exists():
        shutil.copyfile(base, path)
    return path


def write_dataset(folder: Path, n: int) -> tuple[Path, float]:
    """``folder/chat.json`` with ``n`` records and ``folder/images_dl/`` hard links; returns (file, seconds)."""
    start = time.perf_counter()
    rng = random.Random(0)
    images = folder / "images_dl"
    images.mkdir(parents=True)
    sources = _write_jpegs(folder)
    path = folder / "chat.json"
    # written record by record: this process stays small while the phases run
    with open(path, "w") as f:
        f.write("[")
        for i in range(n):
            rid = f"GCC_train_{rng.randrange(10**9):09d}_{i}"
            caption = " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 20))) + " ."
            q = rng.choice(QUESTIONS)
            q = f"{q}\n<image>" if rng.random() < 0.5 else f"<image>\n{q}"
            record = {"id": rid, "image": f"{rid}.jpg",
                      "conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": caption}]}
            f.write((", " if i else "") + json.dumps(record))
            os.link(_source(sources, i), images / f"{rid}.jpg")
        f.write("]")
    return path, time.perf_counter() - start


SHARD_SIZE = 10_000
ROW_GROUP = 100


def _cc3m_rows(n: int):
    """(id, question with <image>, caption) of ``n`` CC3M-style records, seeded."""
    rng = random.Random(0)
    for i in range(n):
        rid = f"GCC_train_{rng.randrange(10**9):09d}_{i}"
        caption = " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 20))) + " ."
        q = rng.choice(QUESTIONS)
        yield rid, (f"{q}\n<image>" if rng.random() < 0.5 else f"<image>\n{q}"), caption


def write_layout(folder: Path, n: int, layout: str) -> tuple[Path, float]:
    """The set in ``layout`` (zip, parquet, shards) under ``folder``; returns (DATA, seconds)."""
    import zipfile

    start = time.perf_counter()
    folder.mkdir(parents=True, exist_ok=True)
    jpegs = [p.read_bytes() for p in _write_jpegs(folder)]
    conv = lambda q, c: [{"from": "human", "value": q}, {"from": "gpt", "value": c}]  # noqa: E731
    if layout == "zip":
        with zipfile.ZipFile(folder / "images.zip", "w") as z, open(folder / "chat.json", "w") as f:
            f.write("[")
            for i, (rid, q, c) in enumerate(_cc3m_rows(n)):
                z.writestr(f"{rid}.jpg", jpegs[i % JPEGS])  # stored: JPEGs do not deflate
                f.write((", " if i else "") + json.dumps({"id": rid, "image": f"{rid}.jpg", "conversations": conv(q, c)}))
            f.write("]")
        return folder, time.perf_counter() - start
    if layout == "parquet":
        return _write_parquet(folder, n, jpegs, conv), time.perf_counter() - start
    return _write_shards(folder, n, jpegs), time.perf_counter() - start


def _write_parquet(folder: Path, n: int, jpegs: list[bytes], conv) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = folder / "train.parquet"
    writer, rows = None, []
    for i, (rid, q, c) in enumerate(_cc3m_rows(n)):
        rows.append({"id": rid, "conversations": conv(q, c), "image": {"bytes": jpegs[i % JPEGS], "path": None}})
        if len(rows) == 10_000 or i == n - 1:
            table = pa.Table.from_pylist(rows)
            writer = writer or pq.ParquetWriter(path, table.schema, use_dictionary=["id"])  # bytes stay bytes
            writer.write_table(table, row_group_size=ROW_GROUP)
            rows = []
    writer.close()
    return path


def _write_shards(folder: Path, n: int, jpegs: list[bytes]) -> Path:
    import io
    import tarfile

    tar = None
    for i, (rid, _, caption) in enumerate(_cc3m_rows(n)):
        if i % SHARD_SIZE == 0:
            if tar is not None:
                tar.close()
            tar = tarfile.open(folder / f"{i // SHARD_SIZE:05d}.tar", "w")
        for name, data in ((f"{i:09d}.jpg", jpegs[i % JPEGS]), (f"{i:09d}.txt", caption.encode())):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    tar.close()
    return folder / ("{00000..%05d}.tar" % ((n - 1) // SHARD_SIZE))


def _hwm_mb(pid: str = "self") -> float:
    """Peak RSS (VmHWM) of a live process, in MB. Unlike getrusage's ru_maxrss it starts afresh at exec, so
    a child does not inherit the peak of the process that forked it."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _watch_children(peaks: dict[str, float], stop: threading.Event) -> None:
    """Sample the peak RSS of this process's children (the pool workers) until ``stop``."""
    me = str(os.getpid())
    while not stop.wait(0.2):
        for pid in os.listdir("/proc"):
            if pid.isdigit():
                try:
                    with open(f"/proc/{pid}/stat") as f:
                        ppid = f.read().rsplit(")", 1)[1].split()[1]
                except OSError:
                    continue
                if ppid == me:
                    peaks[pid] = max(peaks.get(pid, 0.0), _hwm_mb(pid))


def phase(name: str, path: str, workers: int, limit: int = 0) -> dict:
    """Run one phase in this process; returns its figures (printed as JSON by ``--phase``)."""
    import resource

    peaks: dict[str, float] = {}
    stop = threading.Event()
    watcher = threading.Thread(target=_watch_children, args=(peaks, stop), daemon=True)
    watcher.start()
    start = time.perf_counter()
    out: dict = {}
    if name == "json.load":
        with open(path) as f:
            out["records"] = len(json.load(f))
    elif name == "load_records":
        from llava_lora.data.records import load_records

        good, bad = load_records(path)
        out["records"], out["bad"] = len(good), len(bad)
    elif name == "locate":
        from llava_lora.data.images import locate_records
        from llava_lora.data.records import load_records, resolve_data

        file, root = resolve_data(path)
        good, _ = load_records(file)
        t0 = time.perf_counter()
        kept, bad = locate_records(good, root)
        out["locate_seconds"] = time.perf_counter() - t0
        out["records"], out["bad"] = len(kept), len(bad)
    elif name == "check":
        from llava_lora.data.check import check_records
        from llava_lora.data.records import load_data, resolve_data

        file, root = resolve_data(path)
        loaded = load_data(file)
        out["open_seconds"] = time.perf_counter() - start
        checked = loaded.records[:limit] if limit else loaded.records
        t0 = time.perf_counter()
        report = check_records(checked, root, workers=workers, progress=False)
        out["decode_seconds"] = time.perf_counter() - t0
        out["records"], out["bad"] = len(checked), len(loaded.bad) + len(report.bad)
        out["images"] = sum(len(r.images) for r in checked)
    elif name == "first batch":
        out.update(_first_batch(path))
    out["seconds"] = time.perf_counter() - start
    stop.set()
    watcher.join()
    # CPU time (this process + its reaped pool workers) does not depend on what else the machine runs
    cpu = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    out["cpu_seconds"] = sum(r.ru_utime + r.ru_stime for r in cpu)
    out["children_cpu_seconds"] = cpu[1].ru_utime + cpu[1].ru_stime  # the pool's, which only decodes
    out["peak_rss_mb"] = _hwm_mb()
    out["worker_peak_rss_mb"] = max(peaks.values(), default=0.0)
    return out


def _first_batch(path: str) -> dict:
    """Open the set, then decode the images of 8 records drawn at random (the sampler's first draw)."""
    from llava_lora.data.images import as_store, locate_records, open_ref
    from llava_lora.data.records import load_records, resolve_data

    file, root = resolve_data(path)
    good, _ = load_records(file)
    kept, bad = locate_records(good, root)
    opened = time.perf_counter()
    store = as_store(root)
    for k in random.Random(0).sample(range(len(kept)), 8):
        for ref in kept[k].images:
            open_ref(store, ref)
    return {"records": len(kept), "bad": len(bad), "decode_seconds": time.perf_counter() - opened}


def _run_phase(name: str, path: Path, workers: int, check_records: int = 0, cache: Path | None = None) -> dict:
    cmd = [sys.executable, __file__, "--phase", name, "--path", str(path), "--workers", str(workers),
           "--check-records", str(check_records)]
    env = {**os.environ, "LLAVA_LORA_CACHE": str(cache) if cache else "off"}  # shard indexes: the run's own cache
    res = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=595_375, help="records (CC3M-595K has 595,375)")
    ap.add_argument("--workers", type=int, default=0, help="image-check processes; 0: one per core")
    ap.add_argument("--skip-check", action="store_true", help="only time opening the file")
    ap.add_argument("--check-records", type=int, default=0,
                    help="data check decodes the images of the first N records only (0: all); opening is of all")
    ap.add_argument("--layout", action="append", choices=["json", "zip", "parquet", "shards"],
                    help="data layout, repeatable (default: json)")
    ap.add_argument("--phase", help=argparse.SUPPRESS)
    ap.add_argument("--path", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.phase:
        print(json.dumps(phase(args.phase, args.path, args.workers, args.check_records)))
        return

    for layout in args.layout or ["json"]:
        with tempfile.TemporaryDirectory(prefix="data_open_") as tmp:
            _bench_layout(layout, Path(tmp), args)


def _bench_layout(layout: str, tmp: Path, args) -> None:
    if layout == "json":
        path, took = write_dataset(tmp, args.n)
        data = tmp
        size_mb = path.stat().st_size / 2**20
        print(f"json: wrote {args.n:,} records, {size_mb:.0f} MB chat.json, {args.n:,} hard-linked 320x240 JPEGs "
              f"in {took:.1f} s ({os.cpu_count()} CPU cores)")
        phases = ["json.load", "load_records", "locate"] + ([] if args.skip_check else ["check"])
    else:
        data, took = write_layout(tmp, args.n, layout)
        size_mb = sum(p.stat().st_size for p in tmp.rglob("*") if p.is_file()) / 2**20
        print(f"{layout}: wrote {args.n:,} records, {size_mb:,.0f} MB in {took:.1f} s ({os.cpu_count()} CPU cores)")
        phases = ["locate"] + (["locate"] if layout == "shards" else []) + ["first batch"] \
            + ([] if args.skip_check else ["check"])
    cache = tmp / "index-cache"
    for k, name in enumerate(phases):
        load = os.getloadavg()[0]  # the machine may be shared: a busy one slows the check
        r = _run_phase(name, path if name in ("json.load", "load_records") else data, args.workers,
                       args.check_records, cache)
        shown = "locate, cached" if name == "locate" and k == 1 else name
        line = f"{shown:>14}: {r['seconds']:7.1f} s  peak RSS {r['peak_rss_mb']:6.0f} MB  (load avg {load:.1f})"
        if name == "locate":
            line += f"\n               of which the stat pass {r['locate_seconds']:.2f} s, {r['bad']} not found"
        if name == "first batch":
            line += f"\n               of which decoding 8 random records' images {r['decode_seconds'] * 1000:.0f} ms"
        if name == "check":
            if "open_seconds" in r:  # the decoding alone, of the records checked
                line += (f"\n               opening {r['open_seconds']:.1f} s, then {r['images']:,} images of "
                         f"{r['records']:,} records decoded in {r['decode_seconds']:.1f} s: "
                         f"{r['images'] / r['decode_seconds']:,.0f} images/s, "
                         f"{r['images'] / (r['children_cpu_seconds'] or r['cpu_seconds']):,.0f} per CPU-second decoding")
            line += (f"\n               largest worker {r['worker_peak_rss_mb']:.0f} MB, "
                     f"{r['records'] / r['seconds']:,.0f} records/s in all, {r['records'] / r['cpu_seconds']:,.0f} "
                     f"per CPU-second, {r['bad']} bad")
        print(line, flush=True)


if __name__ == "__main__":
    main()
