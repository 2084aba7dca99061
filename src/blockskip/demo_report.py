"""The demo's report: a loss plot with axes (PIL only) and one self-contained HTML page.

Written for someone who has never seen the project: every number says what it is compared with
(chance, the base model, the full model), every image is shown at the same scale with what
produced it (prompt, seed), and the loss headline is a moving average, not two single steps.
"""

from __future__ import annotations

import base64
import html
import json
import io
import math
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

DISPLAY = 128  # CSS pixels per image side in the report: every image, photo or sample, at this size


def smoothing_window(steps: int) -> int:
    """Steps averaged in the loss headline and the smoothed curve: a tenth of the run."""
    return max(1, steps // 10)


def loss_summary(losses: list[float]) -> dict:
    """Mean loss of the first and of the last tenth of the steps (single steps are too noisy)."""
    w = smoothing_window(len(losses))
    return {"window": w, "first": sum(losses[:w]) / w, "last": sum(losses[-w:]) / w, "steps": len(losses)}


def moving_average(values: list[float], window: int) -> list[float]:
    """Trailing mean over `window` values (fewer at the start)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def nice_ticks(lo: float, hi: float, count: int = 5, integer: bool = False) -> list[float]:
    """Round tick values (1, 2, 2.5, 5 x 10^k apart; whole numbers if `integer`) covering [lo, hi]."""
    span = (hi - lo) or abs(hi) or 1.0
    raw = span / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    if integer:
        step = max(1, round(step))
    first, last = math.floor(lo / step) * step, math.ceil(hi / step) * step
    return [first + i * step for i in range(round((last - first) / step) + 1)]


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)  # a scalable font (Pillow >= 10.1 with FreeType)
    except TypeError:
        return ImageFont.load_default()


def loss_plot(losses: list[float], out: Path, width: int = 720, height: int = 320) -> Path:
    """Per-step loss (light) and its moving average (dark) against the step, with labelled axes."""
    font, small = _font(14), _font(12)
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    left, right, top, bottom = 84, width - 20, 40, height - 50
    y_ticks = nice_ticks(min(losses), max(losses))
    x_ticks = nice_ticks(0, len(losses), integer=True)
    y_lo, y_hi, x_hi = y_ticks[0], y_ticks[-1], x_ticks[-1]

    def to_xy(step: float, value: float) -> tuple[float, float]:
        return (left + step / x_hi * (right - left), bottom - (value - y_lo) / (y_hi - y_lo) * (bottom - top))

    for value in y_ticks:
        _, y = to_xy(0, value)
        draw.line([(left, y), (right, y)], fill=(230, 230, 230))
        draw.text((left - 6, y), f"{value:g}", fill="black", font=small, anchor="rm")
    for step in x_ticks:
        x, _ = to_xy(step, y_lo)
        draw.line([(x, bottom), (x, bottom + 4)], fill="black")
        draw.text((x, bottom + 6), f"{step:g}", fill="black", font=small, anchor="mt")
    draw.line([(left, top), (left, bottom), (right, bottom)], fill="black")
    window = smoothing_window(len(losses))
    raw = [to_xy(i + 1, v) for i, v in enumerate(losses)]
    smooth = [to_xy(i + 1, v) for i, v in enumerate(moving_average(losses, window))]
    if len(raw) > 1:
        draw.line(raw, fill=(170, 200, 240), width=1)
        draw.line(smooth, fill=(20, 70, 180), width=3)
    else:
        draw.ellipse([raw[0][0] - 3, raw[0][1] - 3, raw[0][0] + 3, raw[0][1] + 3], fill=(20, 70, 180))
    draw.text((left, 12), "training loss (flow-matching MSE) per optimizer step", fill="black", font=font)
    draw.text(((left + right) / 2, height - 8), "training step", fill="black", font=font, anchor="mb")
    draw.text((12, (top + bottom) / 2), "loss", fill="black", font=font, anchor="lm")
    legend_x = right - 260
    draw.line([(legend_x, 20), (legend_x + 20, 20)], fill=(170, 200, 240), width=2)
    draw.text((legend_x + 26, 20), "each step", fill="black", font=small, anchor="lm")
    draw.line([(legend_x + 100, 20), (legend_x + 120, 20)], fill=(20, 70, 180), width=3)
    draw.text((legend_x + 126, 20), f"mean of last {window} step" + "s" * (window > 1), fill="black", font=small,
              anchor="lm")
    image.save(out)
    return out


def size_text(count: int) -> str:
    """Bytes on disk as a reader takes them in: KiB below a MiB, else MiB."""
    return f"{count / 2**20:.1f} MiB" if count >= 2**20 else f"{count / 2**10:.0f} KiB"


def _embed(path: Path | str) -> str:
    image = Image.open(path)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _figure(path: str | Path, lines: list[str]) -> str:
    caption = "<br>".join(lines)
    return (f"<figure><img src='{_embed(path)}' width={DISPLAY} height={DISPLAY} alt=''>"
            f"<figcaption>{caption}</figcaption></figure>")


def _predicted(prediction: dict | None, subject: dict) -> str:
    """What the attribute classifier sees in an image; the subject's values in bold."""
    if not prediction:
        return ""
    words = [f"<b>{html.escape(v)}</b>" if subject.get(k) == v else f"<s>{html.escape(v)}</s>"
             for k, v in prediction.items()]
    return "sees: " + " ".join(words)


def _scores_table(report: dict) -> str:
    scores = report["attribute_scores"]
    rows = "".join(
        f"<tr><td>{attr}</td><td>{html.escape(s['subject'])}</td><td>{s['chance']:.0%} (1 of {s['classes']})</td>"
        f"<td>{s['photos']:.0%}</td><td>{s['before']:.0%}</td><td><b>{s['after']:.0%}</b></td></tr>"
        for attr, s in scores.items())
    n = len(report["samples"])
    return f"""<table class=grid><tr><th>attribute</th><th>subject</th><th>chance</th>
<th>subject photos</th><th>base model</th><th>after training</th></tr>{rows}</table>
<p class=note>Share of images in which a small classifier trained on all leaf kinds recognises the
subject's shape, colour and pattern. <i>chance</i>: guessing among the classifier's values of that
attribute. <i>subject photos</i>: the training photos themselves (the best to expect).
<i>base model</i> and <i>after training</i>: the same {n} samples (same prompts and seeds) before
and after training the adapter.</p>"""


def _samples(report: dict, subject: dict) -> str:
    """One row per prompt: the base model's samples, then the adapter's, same seeds in the same order."""
    rows = {}
    for sample in report["samples"]:
        rows.setdefault(sample["prompt"], []).append(sample)
    seeds = max(len(r) for r in rows.values())
    body = []
    for prompt, samples in rows.items():
        cells = []
        for name in ("before", "after"):
            for sample in samples:
                caption = [f"&ldquo;{html.escape(prompt)}&rdquo;, seed {sample['seed']}",
                           _predicted(sample.get(f"{name}_seen"), subject)]
                split = " class=split" if name == "after" and sample is samples[0] else ""
                cells.append(f"<td{split}>{_figure(sample[name], caption)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    head = f"<tr><th colspan={seeds}>base model</th><th colspan={seeds} class=split>with the adapter</th></tr>"
    return f"<table class=pairs>{head}{''.join(body)}</table>"


def _dataset(report: dict) -> str:
    """The small dataset `generate --dataset` made with the adapter: its images and how to load it."""
    dataset = report.get("dataset")
    if not dataset or not dataset["rows"]:
        return ""
    folder = Path(dataset["folder"])
    figures = "".join(_figure(folder / row["file_name"], [html.escape(row["file_name"]),
                                                           f"&ldquo;{html.escape(row['prompt'])}&rdquo;, seed {row['seed']}"])
                      for row in dataset["rows"][:8])
    first = html.escape(json.dumps(dataset["rows"][0], sort_keys=True))
    return (f"<h2>A generated dataset</h2><p>{len(dataset['rows'])} images of the subject made with the adapter by "
            f"<code>blockskip generate --dataset SPEC</code> into <code>{html.escape(folder.name)}/</code>: one folder "
            f"per class, a caption <code>.txt</code> beside each image and <code>metadata.jsonl</code>, which "
            f"<code>datasets.load_dataset(\"imagefolder\", data_dir=...)</code> loads as is. Its first line:</p>"
            f"<pre class=note style='white-space:pre-wrap'>{first}</pre>{figures}")


def html_page(out: Path, report: dict, subject_photos: list[Path], loss_png: Path, subject: dict) -> Path:
    plan, loss = report["plan"], report["loss"]
    photos = "".join(_figure(p, [html.escape(Path(p).name)]) for p in subject_photos)
    memory = "".join(f"<tr><td>{html.escape(k)}</td><td>{v}</td></tr>" for k, v in report["memory_table"].items())
    stages = "".join(f"<tr><td>{k}</td><td>{v:.1f}</td></tr>" for k, v in report["seconds"].items())
    total = sum(report["seconds"].values())
    if report.get("attribute_scores"):
        scores = "<h2>Did the model learn the subject?</h2>" + _scores_table(report)
    elif report["model"] != "builtin":
        scores = ("<p class=note>A random tiny model: its images show no leaf; this run shows the "
                  "pipeline's mechanics only.</p>")
    else:
        scores = ("<p class=note>No attribute scores: the attribute classifier knows only the demo's own "
                  "leaf, and this run trained on your photos.</p>")
    kept = ", ".join(str(i) for i in plan["kept"])
    model = "built-in crop-leaf" if report["model"] == "builtin" else f"random {report['model']}"
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>blockskip demo report</title>
<style>
body{{font-family:system-ui,sans-serif;max-width:62em;margin:2em auto;padding:0 1em;color:#222;line-height:1.45}}
h2{{margin-top:1.8em;border-bottom:1px solid #ddd}}
img{{image-rendering:pixelated;display:block}}
figure{{display:inline-block;margin:0 12px 12px 0;vertical-align:top;width:{DISPLAY + 24}px}}
figcaption{{font-size:12px;color:#444;margin-top:4px}}
table.grid,table.pairs{{border-collapse:collapse}}
table.grid td,table.grid th{{padding:3px 12px;border-bottom:1px solid #eee;text-align:left}}
table.nums td+td{{text-align:right}}
table.pairs td{{padding:0;vertical-align:top}} table.pairs th{{text-align:left;padding-bottom:4px}}
table.pairs .split{{border-left:2px solid #ccc;padding-left:16px}}
.note{{color:#555;font-size:14px}} s{{color:#999}}
</style></head><body>
<h1>blockskip demo report</h1>
<p>The {model} text-to-image model ({report['family']} family, {plan['num_blocks']} transformer blocks)
was personalized on the {len(subject_photos)} subject photos below: a LoRA adapter trained for
{report['steps']} steps on {report['samples_cached']} cached training draws. The prompts name the
subject with the rare word <i>sks</i>.</p>
<p>DiT-BlockSkip: the host ran the frozen full model once per training draw and cached what the
kept blocks need, skipping the first {plan['n']} and the last {plan['m']} blocks. The board (here:
this CPU) trained only {len(plan['kept'])} of the {plan['num_blocks']} blocks (numbered from 0: {kept})
and never loaded the others' weights. The cache travelled as a signed subject bundle
({size_text(report['bundle_bytes']['subject bundle'])}: features and prompt bank) naming its signed base
pack ({size_text(report['bundle_bytes']['base pack'])}: the kept weights, installed once per model and
plan), both verified before training. Images were generated through {report['backend']}.</p>
{scores}
<h2>Subject photos (the training set)</h2>{photos}
<h2>Samples: base model and with the adapter</h2>
<p class=note>One row per prompt, the same seeds on both sides. Under each image: its prompt and
seed, and what the attribute classifier sees in it (the subject's values in bold, others struck
out).</p>{_samples(report, subject)}
{_dataset(report)}
<h2>Training loss</h2>
<p>Loss {loss['first']:.4f} &rarr; {loss['last']:.4f}: mean of the first and of the last {loss['window']}
of {loss['steps']} steps (single steps vary a lot with the random timestep of each draw).</p>
<img src='{_embed(loss_png)}' alt='training loss per step'>
<h2>Memory</h2><table class="grid nums">{memory}</table>
<p class=note>The edge trainer holds only the kept blocks' weights; the peaks are measured during training.</p>
<h2>Seconds per stage</h2><table class="grid nums"><tr><th>stage</th><th>seconds</th></tr>{stages}
<tr><td><b>total</b></td><td><b>{total:.1f}</b></td></tr></table>
<p class=note>This folder also holds report.json (every number above), profile.json, plan.json, the
signed base pack and subject bundle, the adapter, and the images as PNG files.</p>
</body></html>"""
    tmp = out / "report.html.tmp"
    tmp.write_text(page)
    tmp.replace(out / "report.html")  # a report.html is only ever a finished one
    return out / "report.html"
