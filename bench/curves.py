"""Two train.py runs side by side: their loss terms on shared axes, and the mean loss over the last
steps of each. The check behind BENCHMARKS.md's "FP8 does not change what is learned":

    python bench/curves.py runs/b2-bf16 runs/b2-fp8 --labels bf16 fp8 --out assets/fp8_loss.png

Reads each run's metrics.jsonl (one row per --log-every steps, each the mean over those steps).
Prints one JSON line: per run, the mean of each term over the rows of the last --last steps, and
the relative difference of each term's means (the second run's against the first's).
"""
import argparse, json, os, sys

from PIL import Image, ImageDraw

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from train import LOSS_TERMS, nice_ticks, smooth  # noqa: E402

COLOURS = [((31, 80, 180), (165, 190, 230)), ((200, 70, 30), (240, 190, 170))]  # (smoothed, raw) per run


def read_rows(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if "loss" in r]  # training rows, not evaluations


def last_means(rows, last):
    end = rows[-1]["step"]
    tail = [r for r in rows if r["step"] > end - last]
    return {k: sum(r[k] for r in tail) / len(tail) for k in LOSS_TERMS if k in tail[0]}


def plot(runs, path, width=760, panel_height=180):
    """One panel per loss term; each run's raw means light and smoothed dark, in its own colour."""
    keys = [k for k in LOSS_TERMS if all(k in rows[0] for rows in runs.values())]
    left, right, top, bottom = 70, 20, 24, 30
    image = Image.new("RGB", (width, panel_height * len(keys)), "white")
    draw = ImageDraw.Draw(image)
    x0 = min(r["step"] for rows in runs.values() for r in rows)
    x1 = max(max(r["step"] for rows in runs.values() for r in rows), x0 + 1)
    for i, key in enumerate(keys):
        y_top, y_bottom = i * panel_height + top, (i + 1) * panel_height - bottom
        values = [r[key] for rows in runs.values() for r in rows]
        lo, hi = min(values), max(values)
        lo, hi = lo - 0.05 * (hi - lo) - 1e-6, hi + 0.05 * (hi - lo) + 1e-6

        def px(x, y):
            return (left + (x - x0) / (x1 - x0) * (width - left - right),
                    y_bottom - (y - lo) / (hi - lo) * (y_bottom - y_top))

        for tick in nice_ticks(lo, hi, 4):
            draw.line([px(x0, tick), px(x1, tick)], fill=(232, 232, 232))
            draw.text((4, px(x0, tick)[1] - 6), f"{tick:.4g}", fill=(90, 90, 90))
        for tick in nice_ticks(x0, x1, 6):
            draw.text((px(tick, lo)[0] - 12, y_bottom + 6), f"{tick:g}", fill=(90, 90, 90))
        draw.rectangle([left, y_top, width - right, y_bottom], outline=(150, 150, 150))
        title = [key]
        for (label, rows), (dark, light) in zip(runs.items(), COLOURS):
            xs, ys = [r["step"] for r in rows], [r[key] for r in rows]
            draw.line([px(x, y) for x, y in zip(xs, ys)], fill=light, width=1)
        for (label, rows), (dark, light) in zip(runs.items(), COLOURS):
            xs, ys = [r["step"] for r in rows], [r[key] for r in rows]
            draw.line([px(x, y) for x, y in zip(xs, smooth(ys))], fill=dark, width=2)
            title.append(f"{label}: last {ys[-1]:.4g}")
        x_text = left
        for j, text in enumerate(title):  # the title doubles as the legend: each run in its colour
            draw.text((x_text, y_top - 16), text, fill=(0, 0, 0) if j == 0 else COLOURS[j - 1][0])
            x_text += 8 * len(text) + 16
    image.save(path)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs=2, help="two run directories of train.py")
    p.add_argument("--labels", nargs=2, default=None, help="their names in the plot (default: the folders)")
    p.add_argument("--last", type=int, default=500, help="steps at the end over which losses are averaged")
    p.add_argument("--out", default="curves.png")
    a = p.parse_args()
    labels = a.labels or [os.path.basename(os.path.normpath(r)) for r in a.runs]
    runs = {label: read_rows(r) for label, r in zip(labels, a.runs)}
    plot(runs, a.out)
    means = {label: last_means(rows, a.last) for label, rows in runs.items()}
    (ma, mb) = means.values()
    rel = {k: round((mb[k] - ma[k]) / abs(ma[k]), 5) for k in ma if k in mb}  # second run against the first
    print(json.dumps(dict(last_steps=a.last, means=means, rel_diff=rel, plot=a.out)))


if __name__ == "__main__":
    main()
