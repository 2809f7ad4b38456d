"""The report as one self-contained HTML page: no script, no network, every image a data: URI.

Everything taken from the report is escaped (model paths and class names come from untrusted
checkpoints and folders), and a Content-Security-Policy forbids the page to load anything.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Collection, Sequence
from html import escape
from pathlib import Path
from typing import Any

# Only inline styles and data: images: a report opened from a mail or an artifact store stays inert.
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
THUMB_PX = 96
MAX_COLUMNS = 40  # heat-map classes and inversion cards shown for models with many classes

STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0 auto;max-width:1100px;
padding:1rem 1.5rem;color:#1d2127;background:#fff}
h1{font-size:1.4rem;margin:.3rem 0}h2{font-size:1.15rem;margin-top:1.8rem;border-bottom:1px solid #ddd}
.banner{padding:.8rem 1rem;border-radius:6px;font-size:1.1rem;margin:.8rem 0}
.pass{background:#e3f4e6;border:1px solid #4c9a5b}.fail{background:#fbe4e4;border:1px solid #c0392b}
.info{background:#e8eef7;border:1px solid #5b7bb2}
.banner b{font-size:1.3rem;margin-right:.6rem}.banner ul{margin:.4rem 0 0 1rem;padding:0;font-size:.95rem}
table{border-collapse:collapse;margin:.6rem 0;font-size:.9rem}
th,td{border:1px solid #d5d8dc;padding:.25rem .5rem;text-align:right}th{background:#f3f4f6}
td.l,th.l{text-align:left}.bad{color:#b02a1d;font-weight:600}.ok{color:#2d7a3e}
.meta{color:#555;font-size:.85rem;word-break:break-all}.note{color:#666;font-style:italic}
.thumbs{display:flex;flex-wrap:wrap;gap:1rem}.thumb{text-align:center;font-size:.8rem}
.thumb img{image-rendering:pixelated;border:1px solid #ccc;margin:1px}
img.plot{max-width:100%;height:auto}
"""


# -- small HTML helpers ------------------------------------------------------------------------------

def _e(value: Any) -> str:
    return escape(str(value), quote=True)


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{value:.1%}"


def _png_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _img(data: bytes, alt: str, css: str = "plot", size: int | None = None) -> str:
    dims = f' width="{size}" height="{size}"' if size else ""
    return f'<img class="{css}" alt="{_e(alt)}" src="{_png_uri(data)}"{dims}>'


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]], left: int = 1) -> str:
    """Cells arrive already escaped (some carry markup); the first ``left`` columns align left."""
    head = "".join(f'<th class="{"l" if i < left else ""}">{_e(h)}</th>' for i, h in enumerate(headers))
    body = "".join("<tr>" + "".join(f'<td class="{"l" if i < left else ""}">{c}</td>' for i, c in enumerate(row))
                   + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _note(text: str) -> str:
    return f'<p class="note">{_e(text)}</p>'


# -- plots (matplotlib, imported lazily: scan's console path never pays for it) ---------------------

def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _figure_png(fig: Any) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    _pyplot().close(fig)
    return buffer.getvalue()


def _array_png(array: Any) -> bytes:
    """A (C, H, W) float tensor/array in [0, 1] as a PNG, upscaled with nearest neighbours."""
    import numpy as np
    from PIL import Image

    pixels = np.asarray(array, dtype=np.float32)
    pixels = (np.clip(pixels, 0.0, 1.0) * 255).round().astype(np.uint8)
    image = Image.fromarray(pixels[0]) if pixels.shape[0] == 1 else Image.fromarray(pixels.transpose(1, 2, 0))
    if max(image.size) > 2 * THUMB_PX:  # a 224-pixel input: a thumbnail, not a 100 KB PNG per picture
        image.thumbnail((2 * THUMB_PX, 2 * THUMB_PX), Image.Resampling.LANCZOS)
    scale = max(1, THUMB_PX // max(image.size))
    image = image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def heatmap_png(rows: Sequence[dict[str, Any]], class_names: Sequence[str]) -> bytes | None:
    """Triggers x classes: the share of held-out images each trigger sends to each class."""
    rows = [r for r in rows if r.get("asr_per_class")]
    if not rows:
        return None
    import numpy as np

    plt = _pyplot()
    grid = np.array([r["asr_per_class"] for r in rows], dtype=float) * 100
    names = list(class_names)[:grid.shape[1]] if class_names else [str(i) for i in range(grid.shape[1])]
    title = None
    if grid.shape[1] > MAX_COLUMNS:  # 1,000 classes: the classes some trigger sends the most images to
        keep = np.sort(np.argsort(-grid.max(axis=0), kind="stable")[:MAX_COLUMNS])
        grid, names = grid[:, keep], [names[i] for i in keep]
        title = f"the {MAX_COLUMNS} classes with the highest ASR of {len(class_names) or len(keep)}"
    n_classes = grid.shape[1]
    fig, ax = plt.subplots(figsize=(max(4.0, 0.55 * n_classes + 3), 0.38 * len(rows) + 1.4))
    image = ax.imshow(grid, cmap="Reds", vmin=0, vmax=100, aspect="auto")
    ax.set_xticks(range(n_classes), [n[:12] for n in names], rotation=45 if n_classes > 10 else 0, fontsize=8)
    ax.set_yticks(range(len(rows)), [r["spec"][:40] for r in rows], fontsize=8)
    ax.set_xlabel("target class" + (f" ({title})" if title else ""))
    if grid.size <= 400:
        for (i, j), value in np.ndenumerate(grid):
            ax.text(j, i, f"{value:.0f}", ha="center", va="center", fontsize=7,
                    color="white" if value > 60 else "black")
    fig.colorbar(image, ax=ax, label="ASR (%)")
    return _figure_png(fig)


def history_png(history: Sequence[dict[str, Any]]) -> bytes | None:
    """clean's per-epoch learning rate, clean accuracy and the ASR of every probed trigger."""
    if not history:
        return None
    plt = _pyplot()
    epochs = [row["epoch"] for row in history]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
    axes[0].plot(epochs, [row["lr"] for row in history], marker=".")
    axes[0].set_title("learning rate")
    axes[1].plot(epochs, [100 * row["clean_accuracy"] for row in history], marker=".", color="tab:green")
    axes[1].set_title("clean accuracy (%)")
    specs = list(dict.fromkeys(spec for row in history for spec in row.get("asr", {})))
    for spec in specs:
        values = [row["asr"].get(spec) for row in history]
        axes[2].plot(epochs, [float("nan") if v is None else 100 * v for v in values], marker=".",
                     label=spec[:30])
    axes[2].set_title("ASR per trigger (%)")
    axes[2].set_ylim(-3, 103)
    if specs:
        axes[2].legend(fontsize=6, loc="best")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return _figure_png(fig)


def roc_png(membership: dict[str, Any]) -> bytes | None:
    """Membership-inference ROC of the best attack, per member set and model."""
    curves = [(set_name, role, result) for set_name, results in membership.items()
              for role, result in results.items()
              if role != "change" and isinstance(result, dict)
              and result.get("attacks", {}).get(result.get("best_attack"), {}).get("roc")]
    if not curves:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.8, 4.2))
    for set_name, role, result in curves:
        points = result["attacks"][result["best_attack"]]["roc"]
        ax.plot([p[0] for p in points], [p[1] for p in points],
                label=f"{set_name.replace('_', ' ')} · {role} ({result['best_attack']}, AUC {result['best_auc']:.3f})")
    ax.plot([0, 1], [0, 1], linestyle="--", color="gray", linewidth=0.8)
    ax.set_xlabel("false-positive rate")
    ax.set_ylabel("true-positive rate")
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(alpha=0.3)
    return _figure_png(fig)


def anomaly_png(classes: Sequence[dict[str, Any]]) -> bytes:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(min(14.0, max(4.0, 0.45 * len(classes) + 2)), 2.8))
    values = [row["anomaly_index"] or 0.0 for row in classes]
    ax.bar(range(len(classes)), values, color=["tab:red" if row["flagged"] else "tab:blue" for row in classes])
    if len(classes) <= MAX_COLUMNS:
        ax.set_xticks(range(len(classes)), [str(row["name"])[:10] for row in classes], fontsize=8)
    else:
        ax.set_xlabel("class index")
    ax.set_ylabel("anomaly index")
    ax.grid(alpha=0.3, axis="y")
    return _figure_png(fig)


# -- trigger thumbnails, rendered at report time from the specs --------------------------------------

def sample_image(payload: dict[str, Any], avoid: Collection[str] = ()) -> Any | None:
    """One held-out image (C, H, W in [0, 1]) from the report's data folder, if it is still there;
    from a class not in ``avoid`` when possible (a trigger's own target class shows nothing)."""
    import numpy as np
    import torch
    from PIL import Image

    from bdaudit.core.data import IMAGE_SUFFIXES

    model, data = payload["model"], payload.get("data", {})
    for root in (data.get("eval_path"), data.get("path")):
        if not root or not Path(root).is_dir():
            continue
        folders = sorted(d for d in Path(root).iterdir() if d.is_dir())
        folders = [d for d in folders if d.name not in avoid] + [d for d in folders if d.name in avoid]
        files = [p for d in folders for p in sorted(d.iterdir())
                 if p.suffix.lower() in IMAGE_SUFFIXES]
        if not files:
            continue
        try:
            with Image.open(files[0]) as raw:
                image = raw.convert("L" if model.get("in_chans") == 1 else "RGB")
                height, width = model.get("input_size") or image.size[::-1]
                image = image.resize((width, height), Image.Resampling.BILINEAR)
                pixels = np.asarray(image, dtype=np.float32) / 255.0
        except OSError:
            continue
        tensor = torch.from_numpy(pixels)
        return tensor[None] if tensor.ndim == 2 else tensor.permute(2, 0, 1)
    return None


def trigger_thumbnails(payload: dict[str, Any], rows: Sequence[dict[str, Any]]) -> str:
    image = sample_image(payload, {str(r["target_name"]) for r in rows if r["flagged"]})
    if image is None:
        return _note("No thumbnails: the report's data folder is not available here (the JSON report stores "
                     "no images); render it where the data lives to see each trigger.")
    from bdaudit.triggers import parse_trigger

    cards, skipped = [], []
    for row in rows:
        try:
            triggered = parse_trigger(row["spec"]).apply(image[None].clone())[0].clamp(0, 1)
        except Exception:  # noqa: BLE001 - a trigger carried by the checkpoint cannot be rebuilt from JSON
            skipped.append(row["spec"])
            continue
        difference = (triggered - image).abs()
        difference = difference / difference.max().clamp(min=1e-6)
        spec = row["spec"]
        pictures = "".join(f'<div>{_img(_array_png(t), label + " " + spec, "thumb", THUMB_PX)}'
                           f"<br>{label}</div>"
                           for label, t in (("clean", image), ("triggered", triggered), ("difference", difference)))
        verdict = '<span class="bad">BACKDOOR</span>' if row["flagged"] else '<span class="ok">ok</span>'
        cards.append(f'<div class="thumb"><b>{_e(row["spec"])}</b> — ASR {_pct(row["asr"])} {verdict}'
                     f'<div style="display:flex;gap:2px">{pictures}</div></div>')
    html = f'<div class="thumbs">{"".join(cards)}</div>'
    if skipped:
        html += _note("Not drawn (the trigger lives in the checkpoint, not in its spec): " + ", ".join(skipped))
    return html


# -- sections ----------------------------------------------------------------------------------------

def _banner(payload: dict[str, Any]) -> str:
    verdict = payload["verdict"]
    passed = verdict["status"] == "pass"
    items = "".join(f"<li>{_e(reason)}</li>" for reason in verdict["reasons"])
    headline = "PASS" if passed else "FAIL"
    summary = "every gate passed" if passed else f"{len(verdict['reasons'])} gate(s) failed"
    return (f'<div class="banner {"pass" if passed else "fail"}"><b>{headline}</b>{_e(summary)}'
            f'{f"<ul>{items}</ul>" if items else ""}</div>')


def _trigger_rows(scan: dict[str, Any]) -> list[list[str]]:
    rows = []
    for row in scan["triggers"]:
        if row.get("error"):
            rows.append([_e(row["spec"]), "—", "—", "—", "—", f'<span class="note">skipped: {_e(row["error"])}</span>'])
            continue
        interval = row.get("asr_ci")
        asr = _pct(row["asr"]) + (f" [{_pct(interval[0])}, {_pct(interval[1])}]"
                                  if isinstance(interval, list | tuple) and len(interval) == 2 else "")
        verdict = ('<span class="bad">BACKDOOR' + (" (family)" if row.get("flag_reason") == "family" else "")
                   + "</span>") if row["flagged"] else '<span class="ok">ok</span>'
        rows.append([_e(row["spec"]), _e(row["target_name"]) + (" (given)" if row["target_fixed"] else ""),
                     asr, _pct(row["null_asr"]), _pct(row["robust_accuracy"]), verdict])
    return rows


def scan_html(payload: dict[str, Any], scan: dict[str, Any], title: str) -> str:
    class_names = payload["model"].get("class_names") or []
    probed = [r for r in scan["triggers"] if not r.get("error") and r.get("asr") is not None]
    parts = [f"<h2>{_e(title)}</h2>",
             f"<p>Clean accuracy {_pct(scan['clean_accuracy'])} on {scan['n_images']} held-out images.</p>",
             _table(["trigger", "target", "ASR", "null ASR", "robust acc", "verdict"], _trigger_rows(scan), left=2)]
    heat = heatmap_png(probed, class_names)
    if heat:
        parts += ["<h3>Where each trigger sends held-out images</h3>", _img(heat, "ASR heat-map, triggers x classes")]
    if probed:
        parts += ["<h3>Triggers on a held-out image</h3>", trigger_thumbnails(payload, probed)]
    return "".join(parts)


def inversion_html(section: dict[str, Any], live: Any | None) -> str:
    rows = [[_e(row["name"]), f"{row['mask_l1']:.1f}", _pct(row["attack_success"]),
             "—" if row["anomaly_index"] is None else f"{row['anomaly_index']:.2f}",
             '<span class="bad">OUTLIER</span>' if row["flagged"] else '<span class="ok">ok</span>']
            for row in section["classes"]]
    parts = ["<h2>Trigger inversion (Neural Cleanse)</h2>",
             _table(["class", "mask L1", "attack success", "anomaly index", "verdict"], rows),
             _img(anomaly_png(section["classes"]), "anomaly index per class")]
    masks = getattr(live, "masks", None)
    patterns = getattr(live, "patterns", None)
    if masks is None or patterns is None:
        parts.append(_note("Reversed masks and patterns are not stored in the JSON report; they are drawn when "
                           "the report is rendered by the scan that computed them (--html on scan/clean)."))
        return "".join(parts)
    cards = []
    # Outliers first, then the smallest reversed triggers: the classes worth a look.
    order = sorted(range(len(section["classes"])),
                   key=lambda i: (not section["classes"][i]["flagged"], section["classes"][i]["mask_l1"]))
    shown = sorted(order[:MAX_COLUMNS])
    for i in shown:
        row = section["classes"][i]
        mask, pattern = masks[i].detach().cpu(), patterns[i].detach().cpu()
        index = "—" if row["anomaly_index"] is None else f"{row['anomaly_index']:.2f}"
        cards.append(f'<div class="thumb"><b>{_e(row["name"])}</b> (index {index})<br>'
                     f'{_img(_array_png(mask), "mask " + str(row["name"]), "thumb", THUMB_PX)}'
                     f'{_img(_array_png(pattern * mask), "pattern " + str(row["name"]), "thumb", THUMB_PX)}'
                     f"<br>mask · mask × pattern</div>")
    parts.append(f'<div class="thumbs">{"".join(cards)}</div>')
    if len(shown) < len(section["classes"]):
        parts.append(_note(f"Masks of the {len(shown)} outlier or smallest-trigger classes of "
                           f"{len(section['classes'])}."))
    return "".join(parts)


def detection_html(section: dict[str, Any], title: str) -> str:
    """The unknown-trigger detector: per family, each class's reversed-trigger size and anomaly index."""
    if not section.get("ran"):
        return f"<h2>{_e(title)}</h2>" + _note(f"Not run: {section.get('skipped_because', 'off')}.")
    refined = section.get("refined")
    meta = (f"Seed {_e(section.get('seed'))}, {_e(section.get('n_images'))} clean images, "
            f"{len(section.get('candidates', []))} of {_e(section.get('num_classes'))} classes inverted, "
            f"{section.get('seconds', 0):.0f} s."
            + (f" The {refined['screen_steps']}-step screen was ambiguous (top index {refined['screen_top_index']}) "
               f"and was refined at {refined['steps']} steps." if refined else ""))
    parts = [f"<h2>{_e(title)}</h2><p>{meta}</p>"]
    for fam in section.get("families", []):
        rows = [[_e(row["name"]), f"{row['size']:.3g}", _pct(row["attack_success"]),
                 "—" if row["anomaly_index"] is None else f"{row['anomaly_index']:.2f}",
                 '<span class="bad">FLAGGED</span>' if row["flagged"] else
                 ('<span class="bad">suspect</span>' if row["class"] in fam.get("suspects", []) else
                  '<span class="ok">ok</span>')]
                for row in fam["classes"]]
        parts.append(f"<h3>{_e(fam['family'])} <small>({_e(fam['size_unit'])})</small></h3>"
                     + _table(["class", "size", "attack success", "anomaly index", "verdict"], rows))
    return "".join(parts)


def clean_html(payload: dict[str, Any], section: dict[str, Any]) -> str:
    before, after = section["before"], section["after"]
    rows = [["clean accuracy", "", _pct(before["clean_accuracy"]), _pct(after["clean_accuracy"])]]
    for b, a in zip(before["triggers"], after["triggers"], strict=True):
        if b.get("error"):
            continue
        css = "bad" if a["flagged"] else "ok"
        rows.append([f"ASR {_e(b['spec'])}", _e(b["target_name"]), _pct(b["asr"]),
                     f'<span class="{css}">{_pct(a["asr"])}</span>'])
    parts = [f"<h2>Cleaning: {_e(section['method'])} ({_e(section['scope'])} model), {section['seconds']:.0f} s</h2>",
             _table(["", "target", "before", "after"], rows, left=2)]
    curves = history_png(section.get("history", []))
    if curves:
        parts += ["<h3>Per epoch</h3>", _img(curves, "learning rate, clean accuracy and ASR per epoch")]
    parts.append(scan_html(payload, after, "After cleaning: trigger probes"))
    return "".join(parts)


def sequela_html(section: dict[str, Any]) -> str:
    rows = []
    for set_name, results in section["membership"].items():
        for role, result in results.items():
            if role == "change" or not isinstance(result, dict) or "best_attack" not in result:
                continue
            best = result["attacks"][result["best_attack"]]
            rows.append([_e(set_name.replace("_", " ")), _e(role), _e(result["best_attack"]),
                         f"{result['best_auc']:.3f}", _pct(best.get("tpr_at_1pct_fpr")), str(result["n_members"])])
    parts = ["<h2>Sequela: membership inference</h2>",
             _table(["member set", "model", "best attack", "AUC", "TPR @ 1% FPR", "members"], rows, left=3)]
    roc = roc_png(section["membership"])
    parts.append(_img(roc, "membership-inference ROC") if roc else
                 _note("No ROC points in this report (written before schema 1.3)."))
    reinjection = section.get("reinjection")
    if reinjection:
        rows = [[_e(role), _pct(r["initial_asr"]), _pct(r["final_asr"]),
                 "not reached" if r["steps_to_regain"] is None else str(r["steps_to_regain"]),
                 _pct(r["final_clean_accuracy"])] for role, r in reinjection["models"].items()]
        parts += [f"<h2>Re-injection: {_e(reinjection['trigger'])} → class {_e(reinjection['target'])}</h2>",
                  _table(["model", "ASR before", "ASR after retuning", "steps to 50% ASR", "clean acc after"], rows)]
    return "".join(parts)


def bench_html(payload: dict[str, Any]) -> str:
    from bdaudit.report.plots import plot_scatter

    recommended = payload.get("recommended", {})
    banner = "; ".join(f"{size} clean images: {method}" for size, method in recommended.items()) or "none"
    rows = [[str(r["clean_images"]), _e(r["method"]), _pct(r["worst_asr"]), _pct(r["mean_asr"]),
             _pct(r["mean_accuracy_drop"]), _pct(r["worst_accuracy_drop"]), f"{r['mean_seconds']:.0f}",
             '<span class="ok">recommended</span>' if recommended.get(str(r["clean_images"])) == r["method"] else ""]
            for r in payload.get("summary", [])]
    cells = [[_e(r["model"]), str(r["clean_images"]), _e(r["method"]), _pct(r["ca_before"]), _pct(r["ca_after"]),
              _pct(r["asr_before"]), _pct(r["asr_after"])] for r in payload.get("cells", [])]
    parts = [f'<div class="banner info"><b>BENCH</b>recommended — {_e(banner)}</div>',
             f"<p class=\"meta\">{_e(payload.get('rule', ''))}</p>",
             "<h2>Per method</h2>",
             _table(["clean", "method", "worst ASR", "mean ASR", "mean CA drop", "worst CA drop", "mean s", ""],
                    rows, left=2)]
    if payload.get("cells"):
        buffer = io.BytesIO()
        plot_scatter(payload["cells"], buffer)  # type: ignore[arg-type]  # savefig takes a file object
        parts += ["<h2>Clean accuracy vs ASR after each defense</h2>", _img(buffer.getvalue(), "accuracy vs ASR")]
    parts += ["<h2>Cells</h2>", _table(["model", "clean", "method", "CA before", "CA after", "ASR before",
                                         "ASR after"], cells, left=1)]
    return "".join(parts)


def _page(title: str, body: str) -> str:
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{_e(title)}</title><style>{STYLE}</style></head><body>{body}</body></html>\n")


def to_html(payload: dict[str, Any], artifacts: dict[str, Any] | None = None) -> str:
    """The page for a report dict (``Report.to_dict()``) or a bench result (``bench.json``)."""
    artifacts = artifacts or {}
    tool = payload.get("tool", {})
    if "bench_version" in payload:
        body = (f"<h1>bdaudit bench</h1><p class=\"meta\">bdaudit {_e(tool.get('version', ''))} · "
                f"{payload.get('wall_time_s', 0):.0f} s · {payload.get('computed', 0)} cells computed, "
                f"{payload.get('reused', 0)} reused</p>" + bench_html(payload))
        return _page("bdaudit bench", body)
    model = payload["model"]
    names = ", ".join(str(n) for n in model.get("class_names") or []) or "—"
    header = (f"<h1>bdaudit {_e(payload['kind'])}: {_e(Path(str(model.get('path') or 'model')).name)}</h1>"
              f'<p class="meta">model {_e(model.get("path"))} · {_e(model.get("arch"))}, '
              f"{model.get('parameters', 0):,} parameters, {_e(model.get('num_classes'))} classes ({_e(names)})"
              f"<br>sha256 {_e(model.get('sha256'))}<br>data {_e(payload['data'].get('path'))} · "
              f"bdaudit {_e(tool.get('version'))} · report {_e(payload['schema_version'])} · "
              f"{_e(payload['created'])} · {payload.get('wall_time_s', 0):.1f} s</p>")
    parts = [header, _banner(payload)]
    if "scan" in payload and "clean" not in payload:
        parts.append(scan_html(payload, payload["scan"], "Trigger probes"))
    if "clean" in payload:
        parts.append(clean_html(payload, payload["clean"]))
    if "detection" in payload:
        parts.append(detection_html(payload["detection"], "Unknown-trigger detector"))
    if "verification" in payload:
        parts.append(detection_html(payload["verification"], "Independent re-detection on the cleaned model"))
    if "inversion" in payload:
        parts.append(inversion_html(payload["inversion"], artifacts.get("inversion")))
    if "sequela" in payload:
        parts.append(sequela_html(payload["sequela"]))
    gates = [[_e(k), "off" if v is None else _e(v)] for k, v in payload["gates"].items()]
    parts += ["<h2>Gates in force</h2>", _table(["gate", "value"], gates)]
    return _page(f"bdaudit {payload['kind']}: {Path(str(model.get('path') or 'model')).name}", "".join(parts))
