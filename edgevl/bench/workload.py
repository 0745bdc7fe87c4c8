"""The workloads ``edgevl bench`` measures.

W4: one 1280x720 frame, four questions (two yes_no, one choice of three options,
one text answer forced to 24 tokens): the camera case.  W4x8: eight such frames queued, answered together
(the stream mode): a burst.  W-doc: one A4 page scan
(1240x1754) at max_pixels 1024x1024 with one text answer forced to 128 tokens: the
document terminal's case, a long prefill (4,096 vision patches) and a long decode.
"""

from __future__ import annotations

import io

from edgevl.questions import Question

W4_TEXT_TOKENS = 24
W4_SHORT_TOKENS = 4  # new tokens of the naive baseline's generate() for the short answer types
W4_QUESTIONS = (
    Question(id="defect", ask="Is there a visible defect on the weld seam?", type="yes_no", alarm_above=0.5),
    Question(id="label_present", ask="Is the part label present?", type="yes_no"),
    Question(id="connector", ask="Which connector type is fitted?", type="choice",
             options=("type-A", "type-B", "none")),
    Question(id="label", ask="Read the text on the part label.", type="text", max_tokens=W4_TEXT_TOKENS),
)
FRAMES = 5  # the first one warms up and is not timed; the median of the others is reported
W4X8_FRAMES = 8  # W4x8: W4's frames queued eight at a time (the stream mode)

WDOC_MAX_PIXELS = 1024 * 1024
WDOC_TOKENS = 128
WDOC_QUESTION = Question(id="text", ask="Transcribe the text of this page.", type="text", max_tokens=WDOC_TOKENS)


def frame_bytes(seed: int) -> bytes:
    """A 1280x720 JPEG frame: noise, coloured boxes and a label, the same for every run of a seed."""
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    base = rng.integers(60, 200, (720, 1280, 3), dtype=np.uint8)
    img = Image.fromarray(base, "RGB")
    draw = ImageDraw.Draw(img)
    for _ in range(12):
        x, y = int(rng.integers(0, 1200)), int(rng.integers(0, 650))
        draw.rectangle([x, y, x + 80, y + 50], fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
    draw.text((40, 40), f"A-{seed:03d}", fill=(0, 0, 0))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def page_bytes(seed: int) -> bytes:
    """A 1240x1754 grey-scale scan of an A4 page (150 dpi): lines of text, a table, the same for every run."""
    import random

    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    page = Image.new("L", (1240, 1754), 250)
    draw = ImageDraw.Draw(page)
    y = 120
    while y < 1600:
        if rng.random() < 0.1:  # a table row
            for x in range(120, 1120, 250):
                draw.rectangle([x, y, x + 250, y + 40], outline=40)
        words = " ".join(rng.choice(("invoice", "total", "date", "qty", "item", "EUR", "net", "tax", "no."))
                         + str(rng.randint(0, 999)) for _ in range(rng.randint(4, 12)))
        draw.text((130, y + 12), words, fill=20)
        y += rng.choice((44, 48, 96))
    buf = io.BytesIO()
    page.save(buf, "PNG")
    return buf.getvalue()
