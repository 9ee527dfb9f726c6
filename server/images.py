"""Image parts of chat messages, for a model that reads images (`engine.images`): OpenAI's
`{"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}` (or the url as a plain string), read into
the pixels the vision tower takes (`models.vision.preprocess`). An image comes inline as a `data:` URL; this server
fetches nothing from the network (a link is a 400 that says so), as its hosts often reach nothing outside."""

from __future__ import annotations

import base64
import binascii

import numpy as np

from models import vision

IMAGE_PARTS = ("image_url",)


def url_of(part: dict, where: str) -> str:
    """The URL of an `image_url` part (an object with `url`, or the string itself); else a `ValueError` naming
    `where` (the caller's 400)."""
    ref = part.get("image_url")
    url = ref.get("url") if isinstance(ref, dict) else ref
    if not isinstance(url, str):
        raise ValueError(f"{where}.image_url must be an object like {{'url': 'data:image/png;base64,...'}}")
    return url


def pixels(url: str, cfg: vision.VisionConfig, where: str) -> np.ndarray:
    """The preprocessed pixels `[3, S, S]` of the image a `data:` URL holds; else a `ValueError` naming `where`."""
    if not url.startswith("data:"):
        shown = url if len(url) <= 60 else url[:57] + "..."
        raise ValueError(f"{where}: this server fetches no URLs ({shown!r}); send the image inline as a data: URL "
                         "(data:image/png;base64,...)")
    head, _, data = url.partition(",")
    if not head.endswith(";base64"):
        raise ValueError(f"{where}: an image data: URL must be base64 (data:image/...;base64,...)")
    try:
        raw = base64.b64decode(data, validate=True)
        return vision.preprocess(vision.decode_image(raw), cfg)
    except (binascii.Error, ValueError) as e:
        raise ValueError(f"{where}: {e}") from None
