"""Image helpers for showing captions: captioned images, attention heatmaps and a self-contained HTML gallery.

Used by inference_visualize.py and the web demo. Only Pillow and numpy are needed; torch tensors
are accepted for attention weights.
"""
import base64
import functools
import html
import io

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from utils import atomic_write_text

MAX_CAPTION_LINES = 12      # a caption is at most a few lines; a runaway one is cut, not drawn ever longer


@functools.lru_cache(maxsize=16)
def _font(size: int):
    try:
        return ImageFont.truetype("DejaVuSans.ttf", size)
    except OSError:
        pass
    try:
        return ImageFont.load_default(size=size)  # scalable in Pillow >= 10.1
    except TypeError:
        return ImageFont.load_default()


def _wrap(draw: ImageDraw.ImageDraw, text: str, font, max_width: float) -> list[str]:
    """Greedy word wrap by measured pixel width; words wider than a line are split by characters."""
    lines = []
    for paragraph in text.split("\n"):
        line = ""
        for word in paragraph.split():
            candidate = f"{line} {word}" if line else word
            if draw.textlength(candidate, font=font) <= max_width:
                line = candidate
                continue
            if line:
                lines.append(line)
            line = ""
            for char in word:
                if line and draw.textlength(line + char, font=font) > max_width:
                    lines.append(line)
                    line = ""
                line += char
        lines.append(line)
    return lines


def caption_image(image: Image.Image, caption: str, width: int = 512, max_height: int = 1024) -> Image.Image:
    """New RGB image: the picture scaled to fit `width` x `max_height` (aspect kept, centred) over a white band
    with the wrapped caption. Bounded on both sides, whatever the picture's shape."""
    picture = image.convert("RGB")
    scale = min(width / picture.width, max_height / picture.height)
    picture = picture.resize((max(1, round(picture.width * scale)), max(1, round(picture.height * scale))),
                             Image.BICUBIC)
    height = picture.height
    font_size = max(12, width // 28)
    font = _font(font_size)
    margin = max(6, font_size // 2)
    measure = ImageDraw.Draw(picture)
    lines = _wrap(measure, caption, font, width - 2 * margin)[:MAX_CAPTION_LINES]
    line_height = round(font_size * 1.3)
    band = 2 * margin + line_height * len(lines)
    canvas = Image.new("RGB", (width, height + band), "white")
    canvas.paste(picture, ((width - picture.width) // 2, 0))
    draw = ImageDraw.Draw(canvas)
    for i, line in enumerate(lines):
        draw.text((margin, height + margin + i * line_height), line, fill="black", font=font)
    return canvas


def _heat_colors(values: np.ndarray) -> np.ndarray:
    """Map values in 0..1 (H, W) to a jet-like RGB colormap (H, W, 3) in 0..1."""
    red = np.clip(1.5 - np.abs(4 * values - 3), 0, 1)
    green = np.clip(1.5 - np.abs(4 * values - 2), 0, 1)
    blue = np.clip(1.5 - np.abs(4 * values - 1), 0, 1)
    return np.stack([red, green, blue], axis=-1)


def attention_overlay(image: Image.Image, weights, grid_hw: tuple[int, int], size: int = 160) -> Image.Image:
    """The image resized to size x size with a grid_h x grid_w attention map upsampled bilinearly as a heatmap."""
    grid_h, grid_w = grid_hw
    if hasattr(weights, "detach"):  # torch.Tensor
        weights = weights.detach().float().cpu().numpy()
    attention = np.asarray(weights, dtype=np.float32).reshape(-1)
    if attention.size != grid_h * grid_w:
        raise ValueError(f"attention_overlay: got {attention.size} weights for a {grid_h}x{grid_w} grid; "
                         f"pass one weight per encoder grid cell")
    if not np.all(np.isfinite(attention)) or attention.min() < 0:
        raise ValueError("attention_overlay: weights must be finite and >= 0 (softmax outputs)")
    # Weights sum to 1 over many cells, so scale each map to its own peak to make it visible.
    peak = attention.max()
    attention = attention / peak if peak > 0 else attention
    grid = Image.fromarray(attention.reshape(grid_h, grid_w))  # float32 -> mode "F"
    upsampled = np.asarray(grid.resize((size, size), Image.BILINEAR), dtype=np.float32).clip(0, 1)  # (size, size)
    picture = np.asarray(image.convert("RGB").resize((size, size), Image.BICUBIC), dtype=np.float32) / 255
    # Per-pixel blend strength follows the weight: unattended regions keep the original picture.
    alpha = (0.25 + 0.5 * upsampled)[..., None]  # (size, size, 1)
    blended = picture * (1 - alpha) + _heat_colors(upsampled) * alpha
    return Image.fromarray((blended * 255).round().astype(np.uint8))


def image_to_data_uri(image: Image.Image, format: str = "JPEG", max_side: int = 256) -> str:
    """Base64 data URI of a thumbnail (longest side <= max_side) of the image."""
    format = {"JPG": "JPEG"}.get(format.upper(), format.upper())
    thumbnail = image.copy()
    thumbnail.thumbnail((max_side, max_side), Image.BICUBIC)
    if format == "JPEG" and thumbnail.mode != "RGB":
        thumbnail = thumbnail.convert("RGB")  # JPEG has no alpha or palette
    buffer = io.BytesIO()
    thumbnail.save(buffer, format=format, **({"quality": 85} if format == "JPEG" else {}))
    mime = Image.MIME.get(format, f"image/{format.lower()}")
    return f"data:{mime};base64,{base64.b64encode(buffer.getvalue()).decode('ascii')}"


CSS = """
body { font-family: system-ui, sans-serif; margin: 1.5em; background: #f4f4f4; color: #222; }
header h1 { margin: 0 0 .2em 0; font-size: 1.5em; }
header p { margin: 0 0 1em 0; color: #555; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(300px, 1fr)); gap: 1em; }
.card { background: white; border-radius: 8px; padding: .8em; box-shadow: 0 1px 3px rgba(0,0,0,.15); }
.card > img { width: 100%; height: auto; border-radius: 4px; }
.name { font-size: .8em; color: #777; word-break: break-all; margin: .3em 0; }
.caption { font-weight: 600; font-size: 1.05em; margin: .3em 0; }
.card h3 { font-size: .8em; text-transform: uppercase; color: #777; margin: .7em 0 .2em 0; }
.card ol, .card ul { margin: 0; padding-left: 1.3em; font-size: .9em; }
.score { color: #888; font-variant-numeric: tabular-nums; }
.attention { display: flex; flex-wrap: wrap; gap: 4px; }
.attention figure { margin: 0; text-align: center; font-size: .75em; }
.attention img { width: 72px; height: 72px; display: block; }
"""


def _esc(value) -> str:
    return html.escape(str(value), quote=True)


def _score(score) -> str:
    try:
        return f"{float(score):.3f}"  # also numpy / 0-d torch scores
    except (TypeError, ValueError):
        return _esc(score)


def _data_uri(value: str, row_index: int, field: str) -> str:
    # Anything but a data URI would make the page load external resources.
    if not str(value).startswith("data:"):
        raise ValueError(f"write_gallery: row {row_index} {field} is not a data URI; "
                         f"build it with gallery.image_to_data_uri(image)")
    return _esc(value)


def _card(row: dict, row_index: int) -> str:
    parts = ['<div class="card">']
    if row.get("thumbnail"):
        parts.append(f'<img src="{_data_uri(row["thumbnail"], row_index, "thumbnail")}" '
                     f'alt="{_esc(row.get("image", ""))}">')
    parts.append(f'<div class="name">{_esc(row.get("image", ""))}</div>')
    parts.append(f'<div class="caption">{_esc(row.get("caption", ""))}</div>')
    beams = row.get("beams") or []
    if beams:
        items = "".join(f'<li>{_esc(text)} <span class="score">({_score(score)})</span></li>' for text, score in beams)
        parts.append(f"<h3>Beam candidates (score)</h3><ol>{items}</ol>")
    references = row.get("references") or []
    if references:
        items = "".join(f"<li>{_esc(reference)}</li>" for reference in references)
        parts.append(f"<h3>References ({len(references)})</h3><ul>{items}</ul>")
    attention = row.get("attention") or []
    if attention:
        figures = "".join(f'<figure><img src="{_data_uri(uri, row_index, "attention")}" alt="{_esc(word)}">'
                          f"<figcaption>{_esc(word)}</figcaption></figure>" for word, uri in attention)
        parts.append(f'<h3>Attention per word</h3><div class="attention">{figures}</div>')
    parts.append("</div>")
    return "\n".join(parts)


def write_gallery(path: str, rows: list[dict], title: str) -> None:
    """Write a self-contained HTML page (inline CSS, data-URI images) with one card per row, atomically."""
    cards = [_card(row, i) for i, row in enumerate(rows)]
    with_references = sum(1 for row in rows if row.get("references"))
    counts = f"{len(rows)} image{'s' if len(rows) != 1 else ''}, {with_references} with reference captions"
    page = (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f"<title>{_esc(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n"
            f"<header><h1>{_esc(title)}</h1><p>{_esc(counts)}</p></header>\n"
            f'<div class="grid">\n' + "\n".join(cards) + "\n</div>\n</body>\n</html>\n")
    atomic_write_text(path, page)
