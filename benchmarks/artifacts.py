"""Artifact store throughput and memory, each store beside its bare baseline, in one run.

numpy arrays (float64) of 1 MB, 100 MB and 1 GB are put and got back:

- ``local``: ``save_artifact``/``load_artifact`` on a LocalArtifactStore in a temporary
  directory, beside ``numpy``: ``np.save``/``np.load`` of the same array to a file there;
- ``s3``: ``save_artifact``/``load_artifact`` on an S3ArtifactStore against a moto server
  started here, beside ``obstore``: the bare client putting the ``.npy`` file that
  ``np.save`` wrote, and getting it into a file that ``np.load`` reads.

Every measurement runs in a fresh process (after a warm-up put and get of a tiny array and
an ``os.sync()``), which reports its time and its peak RSS
(VmHWM, reset to the current RSS just before the operation, so the array built beforehand
does not count). Each put stores new bytes (a new seed per repeat), so no put finds its
object already there. Figures are medians over ``--repeat`` runs, with the best run beside
them (peak RSS: the largest); ratios are against the baseline of the same size and
operation.

    python benchmarks/artifacts.py [--sizes 1MB,100MB,1GB] [--repeat 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import obstore
from obstore.store import S3Store

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from overhead import report  # noqa: E402

from conveyor.contracts import ArtifactRef  # noqa: E402
from conveyor.workers.artifact_store_local import LocalArtifactStore  # noqa: E402
from conveyor.workers.artifact_store_s3 import S3ArtifactStore  # noqa: E402
from conveyor.workers.execution import load_artifact, save_artifact  # noqa: E402
from conveyor.workers.s3_config import S3ArtifactStoreConfig  # noqa: E402

UNITS = {"KB": 1 << 10, "MB": 1 << 20, "GB": 1 << 30}
BASELINE = {"local": "numpy", "s3": "obstore"}
KEY = "bench-key"
SECRET = "bench-secret"


@dataclass
class Result:
    store: str
    size: str
    operation: str
    seconds: float
    best_seconds: float
    mb_per_s: float
    peak_rss_mb: float
    extra_rss_mb: float
    baseline: str | None
    ratio: float | None
    best_ratio: float | None


# --- one measurement, in a fresh process ----------------------------------------------


def make_array(size: int, seed: int) -> np.ndarray[Any, Any]:
    return np.random.default_rng(seed).random(size // 8)


def bare_client(spec: dict[str, Any]) -> S3Store:
    """obstore with its defaults, as a user of the bare client would make it."""
    return S3Store(
        spec["bucket"],
        endpoint=spec["endpoint"],
        region="us-east-1",
        access_key_id=KEY,
        secret_access_key=SECRET,
        client_options={"allow_http": True},
    )


def npy_path(spec: dict[str, Any]) -> str:
    return os.path.join(spec["dir"], f"npy-{spec['seed']}-{spec['size']}.npy")


def prepare(spec: dict[str, Any]) -> Any:
    """What an operation works through, made before the clock starts: a store or a client."""
    kind = spec["kind"]
    if kind == "local":
        return LocalArtifactStore(spec["dir"])
    if kind == "s3":
        return S3ArtifactStore(
            S3ArtifactStoreConfig(
                bucket=spec["bucket"], endpoint_url=spec["endpoint"], prefix="store"
            )
        )
    if kind == "obstore":
        return bare_client(spec)
    return None


def put_store(spec: dict[str, Any], value: Any, store: Any) -> Any:
    ref = save_artifact(store, value, allow_pickle=False, what="benchmark array")
    return ref.model_dump(mode="json")


def get_store(spec: dict[str, Any], value: Any, store: Any) -> Any:
    load_artifact(store, ArtifactRef.model_validate(spec["ref"]), allow_pickle=False)


def put_numpy(spec: dict[str, Any], value: Any, _: Any = None) -> Any:
    with open(npy_path(spec), "wb") as handle:
        np.save(handle, value, allow_pickle=False)


def get_numpy(spec: dict[str, Any], value: Any, _: Any = None) -> Any:
    with open(npy_path(spec), "rb") as handle:
        np.load(handle, allow_pickle=False)


def put_obstore(spec: dict[str, Any], value: Any, client: Any) -> Any:
    path = npy_path(spec)
    try:
        put_numpy(spec, value)
        obstore.put(client, spec["key"], Path(path))
    finally:
        os.unlink(path)


def get_obstore(spec: dict[str, Any], value: Any, client: Any) -> Any:
    path = npy_path(spec)
    try:
        with open(path, "wb") as out:
            for chunk in obstore.get(client, spec["key"]).stream():
                out.write(chunk)
        get_numpy(spec, value)
    finally:
        os.unlink(path)


OPERATIONS: dict[tuple[str, str], Callable[[dict[str, Any], Any, Any], Any]] = {
    ("local", "put"): put_store,
    ("local", "get"): get_store,
    ("s3", "put"): put_store,
    ("s3", "get"): get_store,
    ("numpy", "put"): put_numpy,
    ("numpy", "get"): get_numpy,
    ("obstore", "put"): put_obstore,
    ("obstore", "get"): get_obstore,
}


def warm_up(spec: dict[str, Any], through: Any) -> None:
    """A put and a get of a tiny array first: lazy imports, folders and connections are
    then ready, so the measurement is of moving the bytes, not of a cold process."""
    tiny = {**spec, "seed": -1, "size": 1024, "key": f"{spec['key']}-warm"}
    ref = OPERATIONS[(spec["kind"], "put")](tiny, make_array(1024, 0), through)
    OPERATIONS[(spec["kind"], "get")]({**tiny, "ref": ref}, None, through)
    forget(tiny, ref)


def status_mb(field: str) -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise KeyError(field)


def reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")
        return True
    except OSError:
        return False


def measure_here(spec: dict[str, Any]) -> dict[str, Any]:
    """Run one operation in this process: its seconds, peak RSS and output."""
    operation = OPERATIONS[(spec["kind"], spec["op"])]
    through = prepare(spec)
    warm_up(spec, through)
    value = make_array(spec["size"], spec["seed"]) if spec["op"] == "put" else None
    # Dirty pages of earlier measurements would be written back during this one.
    os.sync()
    resettable = reset_peak()
    before = status_mb("VmRSS")
    started = time.perf_counter()
    output = operation(spec, value, through)
    seconds = time.perf_counter() - started
    peak = (
        status_mb("VmHWM")
        if resettable
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    )
    return {"seconds": seconds, "peak_mb": peak, "extra_mb": peak - before, "output": output}


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(spec)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise SystemExit(f"{spec['kind']} {spec['op']} failed:\n{done.stderr}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


# --- the run --------------------------------------------------------------------------


@contextmanager
def moto_server() -> Iterator[str]:
    """moto's S3 server on a free port, with a bucket ``bench``; yields its endpoint."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    endpoint = f"http://127.0.0.1:{port}"
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(300):
            try:
                urllib.request.urlopen(f"{endpoint}/moto-api/data.json", timeout=2).close()
                break
            except OSError:
                time.sleep(0.1)
        else:
            raise SystemExit("moto did not start")
        # An unsigned PUT of a bucket: moto does not check keys unless told to.
        request = urllib.request.Request(f"{endpoint}/bench", method="PUT")
        urllib.request.urlopen(request, timeout=10).close()
        yield endpoint
    finally:
        process.terminate()
        process.wait(timeout=30)


def run_size(size: int, repeat: int, common: dict[str, Any]) -> dict[tuple[str, str], list[Any]]:
    """Measurements of every store and baseline at ``size``, interleaved per repeat."""
    found: dict[tuple[str, str], list[Any]] = {}
    for attempt in range(repeat):
        seed = size + attempt
        for kind in ("numpy", "local", "obstore", "s3"):
            spec = {**common, "kind": kind, "size": size, "seed": seed, "key": f"bare/{seed}"}
            put = measure({**spec, "op": "put"})
            got = measure({**spec, "op": "get", "ref": put["output"]})
            found.setdefault((kind, "put"), []).append(put)
            found.setdefault((kind, "get"), []).append(got)
            forget(spec, put["output"])
    return found


def forget(spec: dict[str, Any], ref: Any) -> None:
    """Delete what a repeat stored, so disk and moto's memory stay small."""
    with_file = npy_path(spec)
    if os.path.exists(with_file):
        os.unlink(with_file)
    if spec["kind"] == "local":
        os.unlink(LocalArtifactStore(spec["dir"]).path_of(ref["uri"]))
    elif spec["kind"] in ("s3", "obstore"):
        key = spec["key"] if spec["kind"] == "obstore" else ref["uri"].split("/", 3)[3]
        obstore.delete(bare_client(spec), key)


def summarize(size_name: str, size: int, found: dict[tuple[str, str], list[Any]]) -> list[Result]:
    medians = {k: statistics.median(m["seconds"] for m in v) for k, v in found.items()}
    # The best run beside the median: on a shared disk, writes of the same bytes take from
    # 1x to 10x as long from one moment to the next.
    bests = {k: min(m["seconds"] for m in v) for k, v in found.items()}
    results = []
    for (kind, op), measured in found.items():
        seconds = medians[(kind, op)]
        baseline = BASELINE.get(kind)
        ratio = seconds / medians[(baseline, op)] if baseline else None
        best_ratio = bests[(kind, op)] / bests[(baseline, op)] if baseline else None
        results.append(
            Result(
                store=kind,
                size=size_name,
                operation=op,
                seconds=round(seconds, 4),
                best_seconds=round(bests[(kind, op)], 4),
                mb_per_s=round(size / (1 << 20) / seconds, 1),
                peak_rss_mb=round(max(m["peak_mb"] for m in measured), 1),
                extra_rss_mb=round(max(m["extra_mb"] for m in measured), 1),
                baseline=baseline,
                ratio=round(ratio, 3) if ratio is not None else None,
                best_ratio=round(best_ratio, 3) if best_ratio is not None else None,
            )
        )
    return results


def parse_size(text: str) -> int:
    number, unit = text[:-2], text[-2:].upper()
    if unit not in UNITS or not number.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r}: expected a size such as 1MB or 1GB")
    return int(number) * UNITS[unit]


def main(args: argparse.Namespace) -> list[Result]:
    os.environ.update(AWS_ACCESS_KEY_ID=KEY, AWS_SECRET_ACCESS_KEY=SECRET, AWS_REGION="us-east-1")
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="conveyor-bench-") as folder, moto_server() as endpoint:
        common = {"dir": folder, "endpoint": endpoint, "bucket": "bench", "run": uuid.uuid4().hex}
        for name in args.sizes.split(","):
            size = parse_size(name.strip())
            results += summarize(name.strip(), size, run_size(size, args.repeat, common))
    return results


def print_table(results: list[Result]) -> None:
    print(
        f"{'store':<9}{'size':>7}{'op':>5}{'median s':>11}{'best s':>9}{'MB/s':>8}"
        f"{'peak RSS MB':>13}{'+RSS MB':>9}  ratio to baseline: median (best)"
    )
    for r in results:
        against = "(baseline)"
        if r.ratio is not None:
            against = f"{r.ratio:.2f}x ({r.best_ratio:.2f}x) {r.baseline}"
        print(
            f"{r.store:<9}{r.size:>7}{r.operation:>5}{r.seconds:>11.4f}{r.best_seconds:>9.4f}"
            f"{r.mb_per_s:>8.0f}{r.peak_rss_mb:>13.0f}{r.extra_rss_mb:>9.0f}  {against}"
        )


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        print(json.dumps(measure_here(json.loads(sys.argv[2]))))
        raise SystemExit(0)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sizes", default="1MB,100MB,1GB", help="comma-separated sizes (KB, MB, GB)"
    )
    parser.add_argument("--repeat", type=int, default=3, help="runs per measurement; median kept")
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    arguments = parser.parse_args()
    for size_text in arguments.sizes.split(","):
        parse_size(size_text.strip())
    # report() is typed for overhead.py's rows; it only needs dataclasses.
    report(cast(list[Any], main(arguments)), as_json=arguments.json, table=print_table)
