"""What the end-to-end tests share: a real daemon process, a real Mosquitto, real filesystems, test pictures."""

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent  # the checkout
