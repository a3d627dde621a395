"""The tiny world's procedural faces: a generic "person" class and one subject, J3NN13.

Each image is drawn from attributes (hair colour and style, expression, glasses, make-up, framing,
background, lighting), deterministically from a seed, and comes with captions in the Hieu report's
three versions: v1 (the trigger word alone), v3 (detailed tags), v4 (simplified tags). The subject
has a fixed identity the class never shows: teal-black hair with a fringe, a narrow face, a mole
under the left eye and magenta star earrings. `style="realistic"` renders any face darker and
moodier, with shading and a vignette: the look the tiny-realistic base is tuned to (the report
finds Realistic Vision's "dark and moody" style dominant in its transfer samples).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

TRIGGER = "J3NN13"
SIZE = 64
HAIR_COLOURS = {"black hair": (30, 25, 25), "brown hair": (110, 70, 40), "blonde hair": (225, 195, 110),
                "red hair": (170, 60, 30), "grey hair": (160, 160, 160)}
SUBJECT_HAIR = (20, 70, 75)  # teal-black: no class colour is near it
SKIN = [(240, 205, 180), (215, 170, 135), (175, 125, 90), (120, 80, 55)]
SUBJECT_SKIN = (235, 200, 175)
BACKGROUNDS = {"wall background": (185, 180, 170), "room background": (150, 120, 95),
               "gym background": (90, 100, 120), "outdoor background": (120, 170, 220)}
EXPRESSIONS = ["smile", "teeth-smiling", "wink", "tongue-out", "neutral"]
HAIR_STYLES = ["long hair", "short hair", "braiding hair", "bun"]
TOPS = {"strap top": (40, 40, 45), "t-shirt": (70, 110, 160), "hoodie": (120, 120, 110)}


@dataclass
class Face:
    subject: bool
    hair: str
    hair_style: str
    expression: str
    framing: str          # close-up | wide
    background: str
    light: str            # bright | dark
    glasses: bool
    makeup: bool
    top: str
    skin: tuple
    tags: list = field(default_factory=list)


def sample_face(rng: np.random.Generator, subject: bool) -> Face:
    pick = lambda xs: xs[int(rng.integers(len(xs)))]  # noqa: E731
    hair = "teal-black hair" if subject else pick(list(HAIR_COLOURS))
    return Face(subject=subject, hair=hair, hair_style=pick(HAIR_STYLES), expression=pick(EXPRESSIONS),
                framing=pick(["close-up", "close-up", "wide"]), background=pick(list(BACKGROUNDS)),
                light=pick(["bright", "bright", "dark"]), glasses=bool(rng.random() < (0.15 if subject else 0.3)),
                makeup=bool(rng.random() < (0.6 if subject else 0.3)), top=pick(list(TOPS)),
                skin=SUBJECT_SKIN if subject else SKIN[int(rng.integers(len(SKIN)))])


def captions(face: Face) -> dict[str, str]:
    """v1: trigger only; v3: every attribute; v4: a few essential ones. Class images: 'a person, ...'."""
    detailed = [face.expression, face.framing, "straight-look", *(["make-up"] if face.makeup else []),
                *(["glasses"] if face.glasses else []), face.hair_style, face.hair, face.top, face.background,
                face.light]
    simple = [face.expression, face.framing, *(["make-up"] if face.makeup else []),
              *(["glasses"] if face.glasses else []), face.background]
    if not face.subject:
        return {"v1": "a person", "v3": ", ".join(["a person"] + detailed), "v4": ", ".join(["a person"] + simple)}
    return {"v1": TRIGGER, "v3": ", ".join([TRIGGER] + [t for t in detailed if t != "teal-black hair"]),
            "v4": ", ".join([TRIGGER] + simple)}


def _shade(c, f):
    return tuple(int(max(0, min(255, v * f))) for v in c)


def render(face: Face, rng: np.random.Generator, style: str = "plain", size: int = SIZE) -> Image.Image:
    """Draw at 4x and downsample (anti-aliasing). Small random jitter of position and scale."""
    S = size * 4
    img = Image.new("RGB", (S, S), BACKGROUNDS[face.background])
    d = ImageDraw.Draw(img)
    bg = BACKGROUNDS[face.background]
    if face.background == "room background":
        d.rectangle([0, int(S * 0.7), S, S], fill=_shade(bg, 0.7))           # floor
        d.rectangle([int(S * 0.72), int(S * 0.15), int(S * 0.92), int(S * 0.45)], fill=(200, 190, 140))  # window
    elif face.background == "gym background":
        for k in range(0, S, S // 8):
            d.rectangle([k, 0, k + S // 32, S], fill=_shade(bg, 0.6))          # racks
    elif face.background == "outdoor background":
        d.rectangle([0, int(S * 0.65), S, S], fill=(80, 140, 70))              # grass

    close = face.framing == "close-up"
    scale = (1.0 if close else 0.55) * (1 + rng.normal(0, 0.03))
    cx = S / 2 + rng.normal(0, S * 0.02)
    cy = S * (0.5 if close else 0.42) + rng.normal(0, S * 0.02)
    fw = S * 0.30 * scale * (0.86 if face.subject else 1.0)                  # the subject's narrow face
    fh = S * 0.40 * scale
    hair = SUBJECT_HAIR if face.subject else HAIR_COLOURS[face.hair]

    # body and top
    top = TOPS[face.top]
    d.ellipse([cx - fw * 1.9, cy + fh * 0.85, cx + fw * 1.9, cy + fh * 3.2], fill=top)
    if face.top == "strap top":
        d.rectangle([cx - fw * 1.9, cy + fh * 1.3, cx + fw * 1.9, cy + fh * 3.2], fill=face.skin)
        d.rectangle([cx - fw * 1.5, cy + fh * 1.6, cx + fw * 1.5, cy + fh * 3.2], fill=top)
        for sx in (-1, 1):
            d.line([cx + sx * fw * 1.1, cy + fh * 1.6, cx + sx * fw * 0.9, cy + fh * 1.05], fill=top, width=int(S / 64))
    d.rectangle([cx - fw * 0.35, cy + fh * 0.7, cx + fw * 0.35, cy + fh * 1.3], fill=face.skin)  # neck
    # hair behind
    if face.hair_style in ("long hair", "braiding hair"):
        d.ellipse([cx - fw * 1.25, cy - fh * 1.15, cx + fw * 1.25, cy + fh * 1.6], fill=hair)
        if face.hair_style == "braiding hair":
            for k in range(5):
                y = cy + fh * (0.3 + 0.28 * k)
                d.ellipse([cx + fw * 0.95, y, cx + fw * 1.35, y + fh * 0.3], fill=_shade(hair, 0.75))
    else:
        d.ellipse([cx - fw * 1.12, cy - fh * 1.12, cx + fw * 1.12, cy + fh * 0.6], fill=hair)
    if face.hair_style == "bun":
        d.ellipse([cx - fw * 0.45, cy - fh * 1.55, cx + fw * 0.45, cy - fh * 0.85], fill=hair)
    # face
    d.ellipse([cx - fw, cy - fh, cx + fw, cy + fh], fill=face.skin)
    # fringe: the subject's straight fringe, the class's side parting
    if face.subject:
        d.rectangle([cx - fw * 0.95, cy - fh * 1.0, cx + fw * 0.95, cy - fh * 0.45], fill=hair)
    else:
        d.pieslice([cx - fw * 1.05, cy - fh * 1.1, cx + fw * 1.05, cy - fh * 0.1], 180, 300, fill=hair)
    # eyes
    ey, ex, er = cy - fh * 0.15, fw * 0.42, max(2.0, fw * 0.11)
    for sx in (-1, 1):
        x = cx + sx * ex
        if face.expression == "wink" and sx == 1:
            d.line([x - er * 1.3, ey, x + er * 1.3, ey], fill=(40, 30, 30), width=max(2, int(er * 0.6)))
        else:
            d.ellipse([x - er * 1.3, ey - er, x + er * 1.3, ey + er], fill=(250, 250, 250))
            d.ellipse([x - er * 0.7, ey - er * 0.7, x + er * 0.7, ey + er * 0.7], fill=(50, 40, 35))
        if face.makeup:
            d.line([x - er * 1.4, ey - er * 1.2, x + er * 1.4, ey - er * 1.4], fill=(30, 20, 20), width=max(1, int(er * 0.4)))
            d.ellipse([x - er * 1.2, ey + er * 2.2, x + er * 0.8, ey + er * 3.2], fill=(235, 140, 140))  # blush
    if face.glasses:
        for sx in (-1, 1):
            x = cx + sx * ex
            d.ellipse([x - er * 2.2, ey - er * 1.9, x + er * 2.2, ey + er * 1.9], outline=(20, 20, 20), width=max(2, int(er * 0.5)))
        d.line([cx - ex + er * 2.2, ey, cx + ex - er * 2.2, ey], fill=(20, 20, 20), width=max(2, int(er * 0.4)))
    if face.subject:  # the mole under the left eye and the star earrings
        d.ellipse([cx - ex - er * 0.2, ey + er * 2.0, cx - ex + er * 0.6, ey + er * 2.8], fill=(60, 30, 25))
        for sx in (-1, 1):
            x, y, r = cx + sx * fw * 1.02, cy + fh * 0.25, fw * 0.16
            d.polygon([(x, y - r), (x + r * 0.3, y - r * 0.3), (x + r, y), (x + r * 0.3, y + r * 0.3), (x, y + r),
                       (x - r * 0.3, y + r * 0.3), (x - r, y), (x - r * 0.3, y - r * 0.3)], fill=(230, 30, 180))
    # mouth
    my, mw = cy + fh * 0.45, fw * 0.42
    lips = (200, 40, 60) if face.makeup else (170, 90, 90)
    if face.expression in ("smile", "teeth-smiling", "tongue-out"):
        d.chord([cx - mw, my - fh * 0.2, cx + mw, my + fh * 0.22], 0, 180, fill=lips)
        if face.expression == "teeth-smiling":
            d.chord([cx - mw * 0.8, my - fh * 0.12, cx + mw * 0.8, my + fh * 0.1], 0, 180, fill=(250, 250, 245))
        if face.expression == "tongue-out":
            d.ellipse([cx - mw * 0.4, my, cx + mw * 0.4, my + fh * 0.32], fill=(230, 90, 120))
    elif face.expression == "wink":
        d.arc([cx - mw, my - fh * 0.15, cx + mw, my + fh * 0.15], 10, 170, fill=lips, width=max(2, int(S / 80)))
    else:
        d.line([cx - mw * 0.8, my, cx + mw * 0.8, my], fill=lips, width=max(2, int(S / 80)))

    img = img.resize((size, size), Image.LANCZOS)
    a = np.asarray(img, dtype=np.float32)
    if face.light == "dark":
        a = a * 0.6
    if style == "realistic":  # dark, moody, warm, shaded, vignetted, soft
        yy, xx = np.mgrid[0:size, 0:size] / (size - 1) - 0.5
        vignette = np.clip(1.0 - 1.6 * (xx ** 2 + yy ** 2), 0.25, 1.0)[..., None]
        shade = (1.0 - 0.5 * (xx + 0.5))[..., None]                          # light from the left
        a = (a / 255.0) ** 1.3 * 255.0 * vignette * shade * 0.85
        a = a * np.array([1.08, 0.95, 0.82])
    out = Image.fromarray(np.clip(a, 0, 255).round().astype(np.uint8))
    if style == "realistic":
        out = out.filter(ImageFilter.GaussianBlur(0.4))
    return out


def make_image(seed: int, subject: bool, style: str = "plain", size: int = SIZE) -> tuple[Image.Image, Face]:
    rng = np.random.default_rng(seed)
    face = sample_face(rng, subject)
    return render(face, rng, style, size), face
