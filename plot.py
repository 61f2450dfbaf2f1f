"""Line plots drawn with PIL, so that no plotting library is needed: train.py's loss.png, fid.png
and mem.png (monitor.py) and every lab's figure go through `line_plot`.

    line_plot([dict(title="loss", series=[dict(name="REG", x=steps, y=losses, band=(lo, hi))])], "loss.png")

A figure is a grid of panels (`columns` wide), each on its own scales. A panel is a dict:
    title   text above the panel
    series  a list of series (below), drawn in order, later ones on top
    xlabel  text under the x axis (optional)
    log_x, log_y   log10 axes (optional; values <= 0 are left out)
A series is a dict:
    x, y    equal-length lists of numbers; a y of None (or NaN) is skipped
    name    legend entry, right of the panel (optional: none, no entry)
    band    (lo, hi): lists like y, filled between them in the series' colour, light
            (min..max or mean -/+ std over seeds; optional)
    dots    a dot at each point (sparse points such as evaluations; default False)
    colour  (r, g, b); default: the next of COLOURS
    width   line width in pixels (default 2)
    last    write "last <y>" beside the title from this series (default False)
Tick labels are round numbers (1, 2 or 5 times a power of ten apart) printed with the digits their
spacing needs, one format per axis, so an axis never reads "-0.0376 ... 9.06e+03".
"""
import math

from PIL import Image, ImageDraw

COLOURS = [(31, 80, 180), (200, 60, 40), (40, 150, 60), (150, 60, 170), (230, 140, 20), (20, 160, 170),
           (120, 120, 120), (0, 0, 0)]
GRID, AXIS, TEXT = (232, 232, 232), (150, 150, 150), (90, 90, 90)


def smooth(values):
    """Debiased exponential moving average, as TensorBoard smooths, over about 2 % of the points, so
    the smoothed line lags the raw one by little however long the run (short runs stay raw)."""
    weight = 1 - 1 / max(1.0, len(values) / 50)
    out, avg = [], 0.0
    for i, v in enumerate(values, 1):
        avg = weight * avg + (1 - weight) * v
        out.append(avg / (1 - weight ** i))  # the debiasing: the average does not start at 0
    return out


def nice_ticks(lo, hi, count=5):
    """About `count` round tick values (1, 2 or 5 times a power of ten apart) covering [lo, hi]."""
    span = max(hi - lo, 1e-12)
    raw = span / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = min((m * magnitude for m in (1, 2, 5, 10)), key=lambda step: abs(span / step - count))
    first = step * math.ceil(lo / step - 1e-9)
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


def tick_labels(ticks):
    """One format for all ticks of an axis: as many decimals as their spacing needs, or powers of
    ten (1e+04) when the numbers are large or tiny."""
    if len(ticks) < 2:
        return [f"{t:.3g}" for t in ticks]
    step, top = abs(ticks[1] - ticks[0]), max(abs(t) for t in ticks)
    if top >= 1e5 or top < 1e-3:
        digits = max(0, math.floor(math.log10(top)) - math.floor(math.log10(step)))
        return [f"{t:.{digits}e}" for t in ticks]
    decimals = max(0, -math.floor(math.log10(step) + 1e-9))
    return [f"{0.0 if abs(t) < step / 2 else t:.{decimals}f}" for t in ticks]


def _log_ticks(lo, hi):
    """Tick exponents for a log10 axis spanning 10**lo .. 10**hi: the decades inside, or 1-2-5 within one."""
    decades = list(range(math.ceil(lo - 1e-9), math.floor(hi + 1e-9) + 1))
    if len(decades) >= 2:
        return decades
    return [math.log10(m * 10 ** d) for d in range(math.floor(lo), math.ceil(hi) + 1) for m in (1, 2, 5)
            if lo - 1e-9 <= math.log10(m * 10 ** d) <= hi + 1e-9]


def _axis(values, log):
    """(lo, hi) of an axis in drawn units (log10 when log), padded by 5 %; a flat range gets a width."""
    lo, hi = min(values), max(values)
    if hi - lo <= 1e-12 * max(1.0, abs(hi)):
        pad = 0.5 if log else max(1e-3, 0.05 * abs(hi))
        return lo - pad, hi + pad
    return lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo)


def _ok(v, log):
    return v is not None and not math.isnan(v) and (v > 0 or not log)


def _panel(draw, panel, box):
    """Draw one panel in the pixel box (left, top, right, bottom) of its plot area."""
    left, top, right, bottom = box
    log_x, log_y = panel.get("log_x", False), panel.get("log_y", False)
    fx = math.log10 if log_x else float
    fy = math.log10 if log_y else float
    series = panel["series"]
    xs = [fx(x) for s in series for x, y in zip(s["x"], s["y"]) if _ok(x, log_x) and _ok(y, log_y)]
    ys = [fy(v) for s in series for k in ("y", "band") for column in ([s[k]] if k == "y" else s.get(k) or [])
          for x, v in zip(s["x"], column) if _ok(x, log_x) and _ok(v, log_y)]
    draw.text((left, top - 18), panel.get("title", ""), fill=(0, 0, 0))
    if not xs or not ys:
        return
    x0, x1 = _axis(xs, log_x) if log_x else (min(xs), max(max(xs), min(xs) + 1))
    y0, y1 = _axis(ys, log_y)

    def px(x, y):
        return (left + (fx(x) - x0) / (x1 - x0) * (right - left), bottom - (fy(y) - y0) / (y1 - y0) * (bottom - top))

    y_ticks = _log_ticks(y0, y1) if log_y else nice_ticks(y0, y1, 4)
    y_names = [f"{10 ** t:.3g}" for t in y_ticks] if log_y else tick_labels(y_ticks)
    for t, name in zip(y_ticks, y_names):
        v = bottom - (t - y0) / (y1 - y0) * (bottom - top)
        draw.line([(left, v), (right, v)], fill=GRID)
        draw.text((left - 6 - 6 * len(name), v - 6), name, fill=TEXT)
    x_ticks = _log_ticks(x0, x1) if log_x else nice_ticks(x0, x1, 6)
    x_names = [f"{10 ** t:.3g}" for t in x_ticks] if log_x else tick_labels(x_ticks)
    for t, name in zip(x_ticks, x_names):
        u = left + (t - x0) / (x1 - x0) * (right - left)
        draw.line([(u, bottom), (u, bottom + 4)], fill=TEXT)
        draw.text((u - 3 * len(name), bottom + 6), name, fill=TEXT)
    draw.rectangle([left, top, right, bottom], outline=AXIS)
    if panel.get("xlabel"):
        draw.text((right - 6 * len(panel["xlabel"]), bottom + 18), panel["xlabel"], fill=(0, 0, 0))
    legend = 0
    for k, s in enumerate(series):
        colour = tuple(s.get("colour") or COLOURS[k % len(COLOURS)])
        if s.get("band"):
            lo, hi = s["band"]
            ends = [(x, a, b) for x, a, b in zip(s["x"], lo, hi) if _ok(x, log_x) and _ok(a, log_y) and _ok(b, log_y)]
            if len(ends) > 1:
                draw.polygon([px(x, b) for x, _, b in ends] + [px(x, a) for x, a, _ in reversed(ends)],
                             fill=(*colour, 50))
            for x, a, b in ends if len(ends) == 1 else []:  # one point: its band as a bar
                draw.line([px(x, a), px(x, b)], fill=colour)
        points = [px(x, y) for x, y in zip(s["x"], s["y"]) if _ok(x, log_x) and _ok(y, log_y)]
        if len(points) > 1:
            draw.line(points, fill=colour, width=s.get("width", 2))
        for u, v in points if s.get("dots") else []:
            draw.ellipse([u - 3, v - 3, u + 3, v + 3], fill=colour)
        if s.get("name"):
            draw.text((right + 8, top + 14 * legend), s["name"], fill=colour)
            legend += 1
        if s.get("last") and points:
            x, y = [(x, y) for x, y in zip(s["x"], s["y"]) if _ok(x, log_x) and _ok(y, log_y)][-1]
            draw.text((left + 6 * len(panel.get("title", "")) + 12, top - 18), f"(last {y:.4g}; at {x:g})",
                      fill=(0, 0, 0))


def line_plot(panels, path, *, columns=1, width=720, height=200, title=None):
    """Draw `panels` (module docstring) into a PNG at `path`: `columns` panels a row, each panel
    width x height pixels; `title` above the whole figure. Nothing is written when no panel has a point."""
    if not any(y is not None for p in panels for s in p["series"] for y in s["y"]):
        return
    legend = 130 if any(s.get("name") for p in panels for s in p["series"]) else 20
    head = 24 if title else 0
    rows = -(-len(panels) // columns)
    image = Image.new("RGB", (width * columns, height * rows + head), "white")
    draw = ImageDraw.Draw(image, "RGBA")  # RGBA: the bands are translucent
    if title:
        draw.text((10, 6), title, fill=(0, 0, 0))
    for k, panel in enumerate(panels):
        ox, oy = (k % columns) * width, (k // columns) * height + head
        _panel(draw, panel, (ox + 70, oy + 26, ox + width - legend, oy + height - 36))
    image.save(path)
