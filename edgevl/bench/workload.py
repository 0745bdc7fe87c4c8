"""Workload W4, what ``edgevl bench`` measures: one 1280x720 frame, four questions.

Two yes_no, one choice of three options, one text answer forced to 24 tokens:
the figures in docs/performance.md and in the issues are W4's.
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
