"""sweep_report(): a sweep folder's summary table and figures (word-map statistics, IoU, scene parts, slowest)."""

from __future__ import annotations

import io
import json
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import InvalidArgumentError
from . import folder as fs
from .plan import SweepItem

PARTS = ("colour", "background", "shape", "place", "all")
SLOWEST = 10


@dataclass
class SweepReport:
    """A sweep's summary: ``summary`` (plain figures), ``markdown`` (the table), ``figures`` (name → PNG path),
    ``rows`` (the index rows it was made from). Shown as its table in a notebook."""

    folder: Path
    rows: list[dict[str, Any]]
    summary: dict[str, Any]
    markdown: str
    figures: dict[str, Path] = field(default_factory=dict)

    def _repr_markdown_(self) -> str:
        return self.markdown


def sweep_report(folder: str | Path, out: str | Path | None = None) -> SweepReport:
    """Summarise the sweep in ``folder`` into ``out`` (default ``folder/report``): ``summary.md``,
    ``summary.json`` and PNG figures ``word_maps.png`` (per-word map statistics), ``iou.png`` (the shape word's
    IoU where the scene gives ground truth), ``scene_parts.png`` (the scorer's accuracy per scene part) and
    ``slowest.png`` (the slowest items). Reads only the sweep's files, so it works on a sweep still running or
    stopped half-way (items are read from their verified manifests)."""
    folder = Path(folder).expanduser()
    settings_path = folder / fs.SETTINGS
    if not settings_path.is_file():
        raise InvalidArgumentError(
            f"{folder} is not a sweep folder (no {fs.SETTINGS}); pass the --out of a sweep"
        )
    settings = json.loads(settings_path.read_text())["settings"]
    rows = _rows(folder)
    done = [r for r in rows if r["status"] == "done"]
    summary = _summary(settings, done)
    target = Path(out).expanduser() if out is not None else folder / "report"
    target.mkdir(parents=True, exist_ok=True)
    figures = {}
    for name, draw in (
        ("word_maps", _word_figure),
        ("iou", _iou_figure),
        ("scene_parts", _parts_figure),
        ("slowest", _slowest_figure),
    ):
        png = draw(summary, done)
        if png is not None:
            figures[name] = target / f"{name}.png"
            _write_bytes(figures[name], png)
    markdown = _markdown(folder, summary)
    fs.write_text_atomic(target / "summary.md", markdown)
    fs.write_text_atomic(target / "summary.json", json.dumps(summary, indent=1, sort_keys=True) + "\n")
    return SweepReport(folder, rows, summary, markdown, figures)


def _rows(folder: Path) -> list[dict[str, Any]]:
    """Every item the folder holds complete (verified), in index order."""
    root = folder / fs.ITEMS
    rows = []
    for manifest_path in sorted(root.glob(f"[0-9]*/{fs.MANIFEST}")) if root.is_dir() else []:
        try:
            spec = json.loads(manifest_path.read_text())["item"]
            item = SweepItem(**{**spec, "words": tuple(spec["words"]) if spec["words"] else None})
        except (OSError, ValueError, KeyError, TypeError):
            continue
        rows.extend(fs.index_rows(folder, [item]))
    return rows


def _mean(values: list[float]) -> float | None:
    return statistics.fmean(values) if values else None


def _summary(settings: dict[str, Any], done: list[dict[str, Any]]) -> dict[str, Any]:
    seconds = [r["seconds"] for r in done if r.get("seconds") is not None]
    out: dict[str, Any] = {
        "items": settings["items"],
        "done": len(done),
        "pending": settings["items"] - len(done),
        "model": settings["model"],
        "steps": settings["steps"],
        "guidance_scale": settings["guidance_scale"],
        "seconds_per_item": {
            "mean": _mean(seconds),
            "median": statistics.median(seconds) if seconds else None,
        },
    }
    scene = [r for r in done if r.get("all") is not None]
    if scene:
        parts = {}
        for part in PARTS:
            said = [bool(r[part]) for r in scene if r.get(part) is not None]
            parts[part] = {"accuracy": _mean([float(v) for v in said]), "n": len(said)}
        ious = [r["iou"] for r in scene if r.get("iou") is not None]
        out["scene"] = {"n": len(scene), "parts": parts, "iou": {"mean": _mean(ious), "n": len(ious)}}
    words: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in done:
        for word, stats in (r.get("maps") or {}).items():
            for k, v in stats.items():
                words[word][k].append(v)
    out["words"] = {
        w: {"n": len(s["mass"]), **{k: _mean(v) for k, v in s.items()}}
        for w, s in sorted(words.items(), key=lambda kv: (-len(kv[1]["mass"]), kv[0]))
    }
    slow = sorted((r for r in done if r.get("seconds") is not None), key=lambda r: -r["seconds"])[:SLOWEST]
    out["slowest"] = [{k: r[k] for k in ("item", "prompt", "seed", "seconds")} for r in slow]
    return out


def _markdown(folder: Path, s: dict[str, Any]) -> str:
    def f(x: Any, digits: int = 3) -> str:
        return "–" if x is None else (f"{x:.{digits}f}" if isinstance(x, float) else str(x))

    lines = [
        f"# Sweep report: {folder}",
        "",
        f"{s['done']} of {s['items']} items done ({s['pending']} pending); model {s['model']}, {s['steps']} steps, "
        f"CFG {f(s['guidance_scale'], 1)}; seconds per item: mean {f(s['seconds_per_item']['mean'])}, "
        f"median {f(s['seconds_per_item']['median'])}.",
        "",
    ]
    if "scene" in s:
        sc = s["scene"]
        lines += ["## Scene scorer (embedded model)", "", "| part | accuracy | n |", "| --- | --- | --- |"]
        lines += [f"| {p} | {f(v['accuracy'])} | {v['n']} |" for p, v in sc["parts"].items()]
        lines += [
            "",
            f"Shape word attention IoU: mean {f(sc['iou']['mean'])} over {sc['iou']['n']} items.",
            "",
        ]
    if s["words"]:
        lines += [
            "## Word maps",
            "",
            "mass: mean attention mass per pixel; peak: its maximum; area: fraction of pixels above half-way "
            "between the map's minimum and maximum.",
            "",
            "| word | n | mass | peak | area |",
            "| --- | --- | --- | --- | --- |",
        ]
        lines += [
            f"| {w} | {v['n']} | {f(v['mass'])} | {f(v['peak'])} | {f(v['area'])} |"
            for w, v in s["words"].items()
        ]
        lines.append("")
    if s["slowest"]:
        lines += ["## Slowest items", "", "| item | prompt | seed | seconds |", "| --- | --- | --- | --- |"]
        lines += [
            f"| {r['item']} | {r['prompt']} | {r['seed']} | {f(r['seconds'], 2)} |" for r in s["slowest"]
        ]
        lines.append("")
    return "\n".join(lines)


def _figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure  # no pyplot: no global state, safe in any backend

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _png(fig: Any) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def _write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


def _word_figure(s: dict[str, Any], done: list[dict[str, Any]]) -> bytes | None:
    words = list(s["words"])[:20]
    if not words:
        return None
    per = {w: [r["maps"][w] for r in done if w in (r.get("maps") or {})] for w in words}
    fig = _figure(max(6.0, 0.45 * len(words) + 2), 5.5)
    top, bottom = fig.subplots(2, 1, sharex=True)
    top.boxplot([[m["mass"] for m in per[w]] for w in words])
    top.set_ylabel("attention mass per pixel")
    top.set_title("per-word map statistics (each box: the items whose maps hold the word)")
    bottom.boxplot([[m["area"] for m in per[w]] for w in words])
    bottom.set_ylabel("area above half-max")
    bottom.set_xticks(range(1, len(words) + 1), words, rotation=45, ha="right")
    return _png(fig)


def _iou_figure(s: dict[str, Any], done: list[dict[str, Any]]) -> bytes | None:
    by_shape: dict[str, list[float]] = defaultdict(list)
    for r in done:
        if r.get("iou") is not None:
            by_shape[_shape_of(r)].append(r["iou"])
    if not by_shape:
        return None
    fig = _figure(6.0, 3.8)
    ax = fig.subplots()
    names = sorted(by_shape)
    ax.hist([by_shape[n] for n in names], bins=20, range=(0, 1), stacked=True, label=names)
    mean = s["scene"]["iou"]["mean"]
    ax.axvline(mean, color="black", linestyle="--", label=f"mean {mean:.3f}")
    ax.set_xlabel("IoU of the shape word's map (thresholded at half-max) with the drawn shape")
    ax.set_ylabel("items")
    ax.legend()
    return _png(fig)


def _shape_of(row: dict[str, Any]) -> str:
    for shape in ("circle", "square", "triangle"):
        if shape in row["prompt"].lower().split():
            return shape
    return "other"


def _parts_figure(s: dict[str, Any], done: list[dict[str, Any]]) -> bytes | None:
    if "scene" not in s:
        return None
    parts = s["scene"]["parts"]
    names = [p for p in PARTS if parts[p]["n"]]
    fig = _figure(6.0, 3.5)
    ax = fig.subplots()
    values = [parts[p]["accuracy"] for p in names]
    bars = ax.bar(names, values, color="#4c72b0")
    for bar, p in zip(bars, names, strict=True):
        ax.text(
            bar.get_x() + bar.get_width() / 2,
            bar.get_height(),
            f"{parts[p]['accuracy']:.3f}\nn={parts[p]['n']}",
            ha="center",
            va="bottom",
            fontsize=8,
        )
    ax.set_ylim(0, 1.2)
    ax.set_ylabel("fraction right (scene scorer)")
    ax.set_title("accuracy per scene part")
    return _png(fig)


def _slowest_figure(s: dict[str, Any], done: list[dict[str, Any]]) -> bytes | None:
    slow = s["slowest"]
    if not slow:
        return None
    fig = _figure(7.5, 0.35 * len(slow) + 1.2)
    ax = fig.subplots()
    labels = [f"#{r['item']} {r['prompt'][:40]} (seed {r['seed']})" for r in slow][::-1]
    ax.barh(labels, [r["seconds"] for r in slow][::-1], color="#dd8452")
    ax.set_xlabel("seconds per item")
    ax.set_title(f"the {len(slow)} slowest items")
    return _png(fig)
