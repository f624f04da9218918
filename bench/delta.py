"""Delta benchmark: our delta engines against xdelta3, ``zstd --patch-from`` and bsdiff4.

For every base -> newer pair of the images in ``--data`` (by default the three real
``rootfs-openssl-*.img.zst`` images in ``../shared/data``) this measures, in one run:

* our engines (:data:`seeder.delta.ENGINES`) through
  :func:`seeder.delta.build_delta_from_files`, exactly what publish runs in its worker
  processes (its time therefore includes reading both images, page-cached, and the
  verification apply it does before returning); "ours" is the smaller of them, the one
  publish keeps;
* baselines: stock ``bsdiff4.diff`` / ``bsdiff4.patch``, ``xdelta3 -9 -e -s`` /
  ``xdelta3 -d``, ``zstd -19 --long=27 --patch-from`` / ``zstd -d --long=27
  --patch-from``;
* the full target image compressed at the zstd level (python-zstandard), for reference.

For each candidate: payload bytes (deterministic, checked equal across repeats), median
generation wall time, peak resident memory of the generating process, median apply
time, and a round trip (the applied output must equal the target byte for byte).

Measurement method. Every generation runs in a fresh process, launched through GNU
``/usr/bin/time -f %M`` when present (else through a tiny ``python -S`` launcher that
``wait4``s its child): a child forked directly from this (large) process would report
this process's resident size as its own peak (Linux keeps the pre-exec high-water mark
in ``ru_maxrss``). Python baselines run in a worker that loads both images, then
times only the delta call itself; our engines' worker times the call that reads the
images and builds the delta (publish's worker function). Every peak includes the
interpreter and both images; that level is measured by a ``noop`` worker ("floor").
CLI tools are timed by wall clock around the process. Python applies are timed in this
process, CLI applies around the tool process.

Missing CLI tools (Debian packages ``xdelta3`` and ``zstd``) are installed with
``apt-get`` when running as root (unless ``--no-install``), else reported and their
baselines skipped; a missing data directory exits 0 with "skipped: no data".

Run: ``.venv/bin/python -m bench.delta [--data DIR] [--repeat N] [--out DIR] [--level L]``.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import bsdiff4
import zstandard

from swarmota.peer.delta import apply_delta
from swarmota.seeder.delta import ENGINES, build_delta_from_files

__all__ = [
    "BASELINES",
    "METHODS",
    "load_images",
    "main",
    "render_markdown",
    "run_bench",
]

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = REPO_ROOT.parent / "shared" / "data"
DEFAULT_OUT = REPO_ROOT / "bench" / "results"
IMAGE_GLOB = "rootfs-openssl-*.img.zst"
MAX_IMAGE_BYTES = 64 * 1024 * 1024
TARGET_RATIO = 0.85
GNU_TIME = "/usr/bin/time"

BASELINES: tuple[str, ...] = ("bsdiff4", "xdelta3", "zstd-cli", "full-zstd")
METHODS: tuple[str, ...] = (*ENGINES, *BASELINES)
DELTA_BASELINES: tuple[str, ...] = ("bsdiff4", "xdelta3", "zstd-cli")  # "smallest other"
CLI_TOOLS = {"xdelta3": "xdelta3", "zstd-cli": "zstd"}
_PY_METHODS = frozenset({*ENGINES, "bsdiff4", "full-zstd", "noop"})

LABELS = {
    "bsdiff-zstd": "bsdiff-zstd (ours)",
    "zstd-patch": "zstd-patch (ours)",
    "bsdiff4": "bsdiff4 stock (BSDIFF40, bz2)",
    "xdelta3": "xdelta3 -9",
    "zstd-cli": "zstd -19 --long=27 --patch-from",
    "full-zstd": "full image, zstd -L (reference)",
}

Progress = Callable[[str], None]

_LAUNCHER = (
    "import os, sys\n"
    "pid = os.posix_spawn(sys.argv[2], sys.argv[2:], os.environ)\n"
    "_, status, usage = os.wait4(pid, 0)\n"
    "open(sys.argv[1], 'w').write(str(usage.ru_maxrss))\n"
    "sys.exit(os.waitstatus_to_exitcode(status))\n"
)
_WORKER = "import sys; from bench.delta import _worker; sys.exit(_worker(sys.argv[1:]))"


# --- worker (runs in a fresh process) ----------------------------------------------------

def _worker(argv: list[str]) -> int:
    """Generate one delta: ``method base target out level``; print timing JSON."""
    method, base_path, target_path, out_path, level_s = argv
    level = int(level_s)
    if method in ENGINES:  # publish's own worker function: it reads the images itself
        start = time.perf_counter()
        delta = build_delta_from_files(method, Path(base_path), Path(target_path),
                                       level=level)
        return _worker_done(out_path, delta, time.perf_counter() - start)
    base = Path(base_path).read_bytes()
    target = Path(target_path).read_bytes()
    start = time.perf_counter()
    if method == "bsdiff4":
        delta = bsdiff4.diff(base, target)
    elif method == "full-zstd":
        delta = zstandard.ZstdCompressor(level=level).compress(target)
    elif method == "noop":
        delta = b""
    else:
        print(f"unknown method {method!r}", file=sys.stderr)
        return 2
    return _worker_done(out_path, delta, time.perf_counter() - start)


def _worker_done(out_path: str, delta: bytes, seconds: float) -> int:
    Path(out_path).write_bytes(delta)
    print(json.dumps({"seconds": seconds, "vmhwm_kib": _vmhwm_kib()}))
    return 0


def _vmhwm_kib() -> int | None:
    """Peak RSS of this process's own address space (unaffected by the parent's)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


# --- process measurement -----------------------------------------------------------------

def _gnu_time_works() -> bool:
    if not os.access(GNU_TIME, os.X_OK):
        return False
    true = shutil.which("true") or "/bin/true"
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rss"
        try:
            subprocess.run([GNU_TIME, "-f", "%M", "-o", str(out), true], check=True,
                           capture_output=True, timeout=30)
            return out.read_text().strip().splitlines()[-1].isdigit()
        except (OSError, subprocess.SubprocessError, IndexError):
            return False


class _Runner:
    """Runs a command in a fresh process and reports wall time and the child's peak RSS."""

    def __init__(self, work_dir: Path) -> None:
        self.work_dir = work_dir
        self.use_gnu_time = _gnu_time_works()
        self.rss_source = ("GNU time %M of the process" if self.use_gnu_time else
                           "wait4 ru_maxrss via a python -S launcher (includes ~launcher size)")
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
        self.env = env

    def run(self, argv: Sequence[str], tag: str) -> tuple[float, int, int | None, str, str]:
        """``(wall_s, returncode, peak_rss_kib, stdout, stderr)`` of ``argv``."""
        rss_file = self.work_dir / f"{tag}.rss"
        rss_file.unlink(missing_ok=True)
        if self.use_gnu_time:
            cmd = [GNU_TIME, "-f", "%M", "-o", str(rss_file), *argv]
        else:
            cmd = [sys.executable, "-S", "-c", _LAUNCHER, str(rss_file), *argv]
        start = time.perf_counter()
        proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True,
                              env=self.env, check=False)
        wall = time.perf_counter() - start
        rss: int | None = None
        try:
            lines = rss_file.read_text().strip().splitlines()
            rss = int(lines[-1]) if lines and lines[-1].strip().isdigit() else None
        except OSError:
            pass
        return (wall, proc.returncode, rss, proc.stdout.decode(errors="replace"),
                proc.stderr.decode(errors="replace"))


# --- tools -------------------------------------------------------------------------------

def ensure_tools(*, install: bool, say: Progress = print) -> dict[str, str | None]:
    """Paths of the ``xdelta3`` and ``zstd`` CLIs (None when missing).

    When one is missing, ``install`` is set, we run as root and ``apt-get`` exists, the
    Debian packages are installed; otherwise prints how to install them.
    """
    found = {m: shutil.which(tool) for m, tool in CLI_TOOLS.items()}
    missing = [CLI_TOOLS[m] for m, p in found.items() if p is None]
    if not missing:
        return found
    apt = shutil.which("apt-get")
    if install and apt and hasattr(os, "geteuid") and os.geteuid() == 0:
        say(f"installing missing tools with apt-get: {' '.join(missing)}")
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        try:
            subprocess.run([apt, "update"], env=env, check=False, capture_output=True,
                           timeout=600)
            done = subprocess.run([apt, "install", "-y", "xdelta3", "zstd"], env=env,
                                  check=False, capture_output=True, timeout=600)
            if done.returncode != 0:
                say(f"apt-get install failed: {done.stderr.decode(errors='replace')[-500:]}")
        except (OSError, subprocess.SubprocessError) as exc:
            say(f"apt-get failed: {exc}")
        found = {m: shutil.which(tool) for m, tool in CLI_TOOLS.items()}
    still = [CLI_TOOLS[m] for m, p in found.items() if p is None]
    if still:
        say(f"missing {' '.join(still)}: install with `sudo apt-get install -y xdelta3 zstd`;"
            " those baselines are skipped")
    return found


def _tool_version(path: str | None, flag: str) -> str | None:
    if path is None:
        return None
    try:
        proc = subprocess.run([path, flag], capture_output=True, timeout=30, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    text = (proc.stdout + proc.stderr).decode(errors="replace").strip()
    return text.splitlines()[0].split(", Copyright")[0].strip(" *") if text else None


def _package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine_info(tools: dict[str, str | None]) -> dict[str, Any]:
    """nproc, CPU, memory, Python, library and tool versions."""
    cpu = None
    mem_kib = None
    try:
        match = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
        cpu = match.group(1).strip() if match else None
        match = re.search(r"^MemTotal:\s*(\d+)", Path("/proc/meminfo").read_text(), re.M)
        mem_kib = int(match.group(1)) if match else None
    except OSError:
        pass
    return {
        "nproc": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
        else os.cpu_count(),
        "cpu_count": os.cpu_count(),
        "cpu": cpu,
        "mem_total_kib": mem_kib,
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "packages": {n: _package_version(n)
                     for n in ("bsdiff4", "zstandard", "backports.zstd")},
        "tools": {
            "xdelta3": {"path": tools.get("xdelta3"),
                        "version": _tool_version(tools.get("xdelta3"), "-V")},
            "zstd": {"path": tools.get("zstd-cli"),
                     "version": _tool_version(tools.get("zstd-cli"), "--version")},
        },
    }


# --- data --------------------------------------------------------------------------------

def _version_key(version: str) -> tuple[int | str, ...]:
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"[.\-]", version))


def load_images(data_dir: Path, work_dir: Path) -> list[tuple[str, Path]]:
    """Decompress ``rootfs-openssl-*.img.zst`` into ``work_dir``.

    Returns ``[(version, path)]``, oldest first.
    """
    images = []
    for src in data_dir.glob(IMAGE_GLOB):
        version = src.name[len("rootfs-openssl-"):-len(".img.zst")]
        raw = zstandard.ZstdDecompressor().decompress(src.read_bytes(),
                                                      max_output_size=MAX_IMAGE_BYTES)
        dst = work_dir / f"rootfs-openssl-{version}.img"
        dst.write_bytes(raw)
        images.append((version, dst))
    return sorted(images, key=lambda item: _version_key(item[0]))


# --- the benchmark -----------------------------------------------------------------------

def _median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def _apply_python(method: str, base: bytes, delta: bytes, target_size: int) -> bytes:
    if method in ENGINES:
        return apply_delta(method, base, delta, target_size=target_size)
    if method == "bsdiff4":
        return bytes(bsdiff4.patch(base, delta))
    if method == "full-zstd":
        return bytes(zstandard.ZstdDecompressor().decompress(
            delta, max_output_size=MAX_IMAGE_BYTES))
    raise RuntimeError(f"no python apply for {method}")


def _gen_argv(method: str, base: Path, target: Path, out: Path, level: int,
              tools: dict[str, str | None]) -> list[str]:
    if method in _PY_METHODS:
        return [sys.executable, "-c", _WORKER, method, str(base), str(target), str(out),
                str(level)]
    if method == "xdelta3":
        return [str(tools["xdelta3"]), "-9", "-e", "-s", str(base), str(target), str(out)]
    if method == "zstd-cli":
        return [str(tools["zstd-cli"]), f"-{level}", "--long=27", f"--patch-from={base}",
                str(target), "-o", str(out)]
    raise RuntimeError(f"unknown method {method}")


def _apply_argv(method: str, base: Path, delta: Path, out: Path,
                tools: dict[str, str | None]) -> list[str]:
    if method == "xdelta3":
        return [str(tools["xdelta3"]), "-d", "-s", str(base), str(delta), str(out)]
    return [str(tools["zstd-cli"]), "-d", "--long=27", f"--patch-from={base}", str(delta),
            "-o", str(out)]


@dataclass
class _Generations:
    """The generation runs of one method on one pair (filled one run at a time)."""

    argv: list[str] = field(default_factory=list)
    gen_s: list[float] = field(default_factory=list)
    wall_s: list[float] = field(default_factory=list)
    rss: list[int] = field(default_factory=list)
    vmhwm: list[int] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)
    delta: bytes = b""
    error: str | None = None


def _generate_once(method: str, base_path: Path, target_path: Path, runs: _Generations, *,
                   runner: _Runner, work_dir: Path, level: int,
                   tools: dict[str, str | None]) -> None:
    """One generation in a fresh process, appended to ``runs`` (or its error recorded)."""
    if runs.error is not None:
        return
    out = work_dir / f"{method}.delta"
    out.unlink(missing_ok=True)
    runs.argv = _gen_argv(method, base_path, target_path, out, level, tools)
    wall, rc, peak, stdout, stderr = runner.run(runs.argv, f"{method}-{len(runs.sizes)}")
    if rc != 0 or not out.exists():
        runs.error = f"generation exited {rc}: {stderr.strip()[-800:]}"
        return
    runs.delta = out.read_bytes()
    out.unlink()
    runs.sizes.append(len(runs.delta))
    runs.wall_s.append(wall)
    if peak is not None:
        runs.rss.append(peak)
    if method in _PY_METHODS:
        report = json.loads(stdout.strip().splitlines()[-1])
        runs.gen_s.append(float(report["seconds"]))
        if report.get("vmhwm_kib") is not None:
            runs.vmhwm.append(int(report["vmhwm_kib"]))
    else:
        runs.gen_s.append(wall)


def _measure(method: str, base_path: Path, target_path: Path, base: bytes, target: bytes,
             runs: _Generations, *, runner: _Runner, work_dir: Path, repeat: int,
             tools: dict[str, str | None]) -> dict[str, Any]:
    """The result of ``runs`` (generations done), then ``repeat`` timed applies."""
    if runs.error is not None:
        return {"error": runs.error, "command": _show(runs.argv)}
    delta = runs.delta
    result: dict[str, Any] = {
        "command": _show(runs.argv).replace(str(work_dir) + "/", ""),
        "bytes": runs.sizes[-1],
        "sizes_seen": sorted(set(runs.sizes)),
        "deterministic": len(set(runs.sizes)) == 1,
        "gen_s": _median(runs.gen_s),
        "gen_s_runs": runs.gen_s,
        "process_wall_s_runs": runs.wall_s,
        "peak_rss_kib": max(runs.rss) if runs.rss else None,
        "peak_rss_kib_runs": runs.rss,
        "vmhwm_kib_runs": runs.vmhwm,
    }
    if method == "noop":
        return result
    out = work_dir / f"{method}.delta"
    out.write_bytes(delta)
    apply_s: list[float] = []
    ok = True
    error = None
    for i in range(repeat):
        try:
            if method in _PY_METHODS:
                start = time.perf_counter()
                rebuilt = _apply_python(method, base, delta, len(target))
                apply_s.append(time.perf_counter() - start)
            else:
                rebuilt_path = work_dir / f"{method}-{i}.out"
                rebuilt_path.unlink(missing_ok=True)
                wall, rc, _, _, stderr = runner.run(
                    _apply_argv(method, base_path, out, rebuilt_path, tools), f"{method}-apply")
                if rc != 0:
                    raise RuntimeError(f"apply exited {rc}: {stderr.strip()[-500:]}")
                apply_s.append(wall)
                rebuilt = rebuilt_path.read_bytes()
                rebuilt_path.unlink()
        except Exception as exc:  # a baseline failing must not stop the bench
            ok, error = False, f"{type(exc).__name__}: {exc}"
            break
        ok = ok and rebuilt == target
    result.update({"apply_s": _median(apply_s), "apply_s_runs": apply_s, "round_trip": ok})
    if error:
        result["apply_error"] = error
    out.unlink(missing_ok=True)
    return result


def _show(argv: Sequence[str]) -> str:
    if len(argv) > 2 and argv[1] == "-c":
        return "python -c <bench.delta worker> " + " ".join(Path(a).name for a in argv[3:])
    return " ".join([Path(argv[0]).name, *(Path(a).name if "/" in a else a for a in argv[1:])])


def _ratio(num: float | None, den: float | None) -> float | None:
    if num is None or den is None or den == 0:
        return None
    return num / den


def _summarize(pair: dict[str, Any]) -> dict[str, Any]:
    methods = pair["methods"]
    ok = {m: r for m, r in methods.items() if "bytes" in r and r.get("round_trip", True)}
    engines = [m for m in ENGINES if m in ok]
    summary: dict[str, Any] = {"ours": None}
    if not engines:
        return summary
    ours = min(engines, key=lambda m: (ok[m]["bytes"], ENGINES.index(m)))
    o = ok[ours]
    summary.update({"ours": ours, "ours_bytes": o["bytes"],
                    "ours_pct_of_target": 100 * o["bytes"] / pair["target_bytes"],
                    "both_engines_gen_s": sum(ok[m]["gen_s"] for m in engines)})
    others = [m for m in DELTA_BASELINES if m in ok]
    if others:
        best = min(others, key=lambda m: ok[m]["bytes"])
        ratio = o["bytes"] / ok[best]["bytes"]
        summary.update({"smallest_other": best, "smallest_other_bytes": ok[best]["bytes"],
                        "ratio_vs_smallest_other": ratio,
                        "meets_target": ratio <= TARGET_RATIO})
    if "bsdiff4" in ok:
        b = ok["bsdiff4"]
        floor = pair.get("floor_rss_kib")
        summary.update({
            "bytes_ratio_vs_bsdiff4": o["bytes"] / b["bytes"],
            "gen_time_ratio_vs_bsdiff4": _ratio(o["gen_s"], b["gen_s"]),
            "peak_rss_ratio_vs_bsdiff4": _ratio(o["peak_rss_kib"], b["peak_rss_kib"]),
            "peak_rss_above_floor_ratio_vs_bsdiff4": (
                _ratio(o["peak_rss_kib"] - floor, b["peak_rss_kib"] - floor)
                if floor is not None and o["peak_rss_kib"] and b["peak_rss_kib"] else None),
            "apply_time_ratio_vs_bsdiff4": _ratio(o.get("apply_s"), b.get("apply_s")),
        })
    return summary


def run_bench(images: Sequence[tuple[str, Path]], *, work_dir: Path, repeat: int = 3,
              level: int = 19, methods: Sequence[str] = METHODS,
              tools: dict[str, str | None] | None = None,
              progress: Progress = print) -> dict[str, Any]:
    """Benchmark every base -> newer pair of ``images`` (``[(version, path)]``, oldest first).

    ``methods`` picks candidates from :data:`METHODS`; CLI baselines whose tool is missing
    from ``tools`` are recorded as skipped. Returns the JSON-ready result (no files
    written outside ``work_dir``).
    """
    if repeat < 1:
        raise ValueError("repeat must be >= 1")
    tools = tools if tools is not None else {m: shutil.which(t) for m, t in CLI_TOOLS.items()}
    runner = _Runner(work_dir)
    pairs = []
    full_cache: dict[str, dict[str, Any]] = {}
    for i, (base_v, base_path) in enumerate(images):
        for target_v, target_path in images[i + 1:]:
            base, target = base_path.read_bytes(), target_path.read_bytes()
            pair: dict[str, Any] = {
                "base": base_v, "target": target_v,
                "base_bytes": len(base), "target_bytes": len(target),
                "base_sha256": hashlib.sha256(base).hexdigest(),
                "target_sha256": hashlib.sha256(target).hexdigest(),
                "methods": {},
            }
            gen_args: dict[str, Any] = {"runner": runner, "work_dir": work_dir,
                                        "level": level, "tools": tools}
            todo = ["noop"]
            for method in methods:
                if method in CLI_TOOLS and not tools.get(method):
                    pair["methods"][method] = {"skipped": f"{CLI_TOOLS[method]} not installed"}
                elif method == "full-zstd" and target_v in full_cache:
                    pair["methods"][method] = full_cache[target_v]
                else:
                    todo.append(method)
            # Round robin: each repetition runs every method once, so that ours and the
            # baselines see the same machine (shared CPUs drift over minutes).
            gens = {method: _Generations() for method in todo}
            for rep in range(repeat):
                progress(f"{base_v} -> {target_v}: generation round {rep + 1}/{repeat} "
                         f"({', '.join(todo[1:])})")
                for method in todo:
                    _generate_once(method, base_path, target_path, gens[method], **gen_args)
            for method in todo:
                result = _measure(method, base_path, target_path, base, target, gens[method],
                                  runner=runner, work_dir=work_dir, repeat=repeat,
                                  tools=tools)
                if method == "noop":
                    pair["floor_rss_kib"] = result.get("peak_rss_kib")
                    continue
                pair["methods"][method] = result
                if method == "full-zstd":
                    full_cache[target_v] = result
                progress(f"{base_v} -> {target_v}: {method}: "
                         + (f"{result['bytes']} B, gen {result['gen_s']:.2f} s, "
                            f"apply {result['apply_s']:.3f} s, round trip "
                            f"{result['round_trip']}" if "bytes" in result and
                            result.get("apply_s") is not None else
                            str(result.get("error") or result.get("apply_error"))))
            pair["summary"] = _summarize(pair)
            pairs.append(pair)
    return {
        "benchmark": "delta",
        "repeat": repeat,
        "level": level,
        "target_ratio": TARGET_RATIO,
        "methods": list(methods),
        "rss_source": runner.rss_source,
        "notes": [
            "sizes are deterministic; times are medians over `repeat` runs, taken round "
            "robin (every method once per round) so that all see the same machine",
            "our generation times come from swarmota.seeder.delta.build_delta_from_files "
            "and include its verification apply",
            "python peak RSS includes the interpreter and both images (see floor_rss_kib)",
            "CLI times are wall clock around the tool process",
        ],
        "pairs": pairs,
    }


# --- report ------------------------------------------------------------------------------

def _fmt_b(n: int | None) -> str:
    return "-" if n is None else f"{n:,}"


def _fmt_s(s: float | None) -> str:
    if s is None:
        return "-"
    return f"{s:.3f}" if s < 1 else f"{s:.2f}"


def _fmt_mib(kib: int | None) -> str:
    return "-" if kib is None else f"{kib / 1024:.0f}"


def _fmt_r(r: float | None) -> str:
    return "-" if r is None else f"{r:.2f}"


def render_markdown(result: dict[str, Any]) -> str:
    """A summary table over pairs, then one table per pair."""
    lines = ["# Delta benchmark", ""]
    machine = result.get("machine")
    if machine:
        tools = machine["tools"]
        lines += [f"Machine: {machine['nproc']} CPUs ({machine.get('cpu') or '?'}), "
                  f"Python {machine['python']}, bsdiff4 {machine['packages']['bsdiff4']}, "
                  f"zstandard {machine['packages']['zstandard']}, backports.zstd "
                  f"{machine['packages']['backports.zstd']}, xdelta3: "
                  f"{tools['xdelta3']['version'] or 'missing'}, zstd: "
                  f"{tools['zstd']['version'] or 'missing'}.", ""]
    lines += [f"Level {result['level']}, times are medians of {result['repeat']} runs; "
              f"peak RSS: {result['rss_source']}. \"ours\" = the smaller of our engines "
              "(what publish keeps). Issue target: ours / smallest other delta "
              f"<= {result['target_ratio']}.", "",
              "| pair | ours | ours bytes | smallest other | other bytes | ours/other "
              "| target met | gen s ours / bsdiff4 (ratio) | peak RSS MiB ours / bsdiff4 "
              "(ratio) | apply s ours / bsdiff4 |",
              "|---|---|---:|---|---:|---:|---|---|---|---|"]
    for pair in result["pairs"]:
        s = pair["summary"]
        m = pair["methods"]
        ours = s.get("ours")
        if ours is None:
            lines.append(f"| {pair['base']} -> {pair['target']} | failed | | | | | | | | |")
            continue
        o = m[ours]
        b = m.get("bsdiff4", {})
        met = s.get("meets_target")
        lines.append(
            f"| {pair['base']} -> {pair['target']} | {ours} | {_fmt_b(s['ours_bytes'])} "
            f"| {LABELS.get(s.get('smallest_other', ''), '-')} "
            f"| {_fmt_b(s.get('smallest_other_bytes'))} "
            f"| {_fmt_r(s.get('ratio_vs_smallest_other'))} "
            f"| {'-' if met is None else ('yes' if met else 'no')} "
            f"| {_fmt_s(o['gen_s'])} / {_fmt_s(b.get('gen_s'))} "
            f"({_fmt_r(s.get('gen_time_ratio_vs_bsdiff4'))}) "
            f"| {_fmt_mib(o['peak_rss_kib'])} / {_fmt_mib(b.get('peak_rss_kib'))} "
            f"({_fmt_r(s.get('peak_rss_ratio_vs_bsdiff4'))}) "
            f"| {_fmt_s(o.get('apply_s'))} / {_fmt_s(b.get('apply_s'))} |")
    for pair in result["pairs"]:
        lines += ["", f"## {pair['base']} -> {pair['target']}", "",
                  f"Base {pair['base_bytes']:,} B, target {pair['target_bytes']:,} B; "
                  f"python worker floor (interpreter + both images): "
                  f"{_fmt_mib(pair.get('floor_rss_kib'))} MiB.", "",
                  "| method | bytes | % of target | gen s | peak RSS MiB | apply s "
                  "| round trip |", "|---|---:|---:|---:|---:|---:|---|"]
        ours = pair["summary"].get("ours")
        for method, r in pair["methods"].items():
            label = LABELS.get(method, method).replace("zstd -L", f"zstd -{result['level']}")
            if method == ours:
                label = f"**{label}, kept**"
            if "bytes" not in r:
                reason = r.get("skipped") or r.get("error", "?")
                lines.append(f"| {label} | skipped: {reason} | | | | | |")
                continue
            lines.append(
                f"| {label} | {_fmt_b(r['bytes'])} "
                f"| {100 * r['bytes'] / pair['target_bytes']:.1f}% "
                f"| {_fmt_s(r['gen_s'])} | {_fmt_mib(r['peak_rss_kib'])} "
                f"| {_fmt_s(r.get('apply_s'))} "
                f"| {'ok' if r.get('round_trip') else 'FAILED'} |")
    notes = result.get("notes", [])
    if notes:
        lines += ["", "Notes: " + "; ".join(notes) + "."]
    return "\n".join(lines) + "\n"


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.delta",
        description="Compare our delta engines "
                    "(swarmota.seeder.delta.build_delta_from_files) with xdelta3, "
                    "zstd --patch-from and stock bsdiff4 on every base -> newer pair of "
                    "the real rootfs images: payload bytes, generation time, peak "
                    "memory, apply time, round trip. Writes delta.json and delta.md.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA,
                        help=f"directory with {IMAGE_GLOB} (zstd-compressed images)")
    parser.add_argument("--repeat", type=int, default=3,
                        help="runs per measurement; times are medians")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help="directory for delta.json and delta.md")
    parser.add_argument("--level", type=int, default=19,
                        help="zstd level for our engines, zstd --patch-from and the full image")
    parser.add_argument("--no-baselines", action="store_true",
                        help="measure only our engines")
    parser.add_argument("--no-install", action="store_true",
                        help="never run apt-get for missing xdelta3/zstd")
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be >= 1")
    if not 1 <= args.level <= 22:
        parser.error("--level must be in 1..22")
    if not args.data.is_dir() or not any(args.data.glob(IMAGE_GLOB)):
        print(f"skipped: no data ({args.data} has no {IMAGE_GLOB})")
        return 0
    methods = ENGINES if args.no_baselines else METHODS
    tools: dict[str, str | None] = (
        dict.fromkeys(CLI_TOOLS) if args.no_baselines
        else ensure_tools(install=not args.no_install))
    with tempfile.TemporaryDirectory(prefix="bench-delta-") as tmp:
        work_dir = Path(tmp)
        images = load_images(args.data, work_dir)
        if len(images) < 2:
            print(f"skipped: no data (need two images in {args.data})")
            return 0
        result = run_bench(images, work_dir=work_dir, repeat=args.repeat, level=args.level,
                           methods=methods, tools=tools)
    result["machine"] = machine_info(tools)
    result["data"] = str(args.data)
    markdown = render_markdown(result)
    _write_atomic(args.out / "delta.json", json.dumps(result, indent=2) + "\n")
    _write_atomic(args.out / "delta.md", markdown)
    print()
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
