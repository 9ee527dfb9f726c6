"""Side-by-side benchmark of what a picture costs before its prompt is prefilled: Sparkler's preprocessing
(`models.vision.preprocess`, Pillow) and vision tower + projector (`models.vision.image_features`, jitted) against
transformers' `CLIPImageProcessor` (its Pillow backend) and `LlavaForConditionalGeneration.get_image_features` (PyTorch)
on the same random weights of LLaVA 1.5's shape (CLIP ViT-L/14 at 336 pixels, 576 features of 4,096), in one run.

Prints one markdown table (median seconds per picture, and the ratio); `make bench-images`. Not a test: read the
ratios. `--smoke`: a small tower, in seconds.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def median_time(fn, reps: int) -> float:
    """Median seconds of `fn()` over `reps` runs, after one untimed run (compilation, caches)."""
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    """Build the checkpoint, time both sides, print the table."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--smoke", action="store_true", help="a 2-layer tower of 224 pixels")
    args = ap.parse_args()

    import jax
    import torch
    import transformers
    from PIL import Image
    from safetensors.numpy import load_file

    from models import vision

    big = not args.smoke
    tower = transformers.CLIPVisionConfig(hidden_size=1024 if big else 64, intermediate_size=4096 if big else 128,
                                          num_hidden_layers=24 if big else 2, num_attention_heads=16 if big else 4,
                                          image_size=336 if big else 224, patch_size=14)
    text = transformers.LlamaConfig(vocab_size=1024, hidden_size=4096 if big else 64, intermediate_size=64,
                                    num_hidden_layers=1, num_attention_heads=32 if big else 4)
    cfg = transformers.LlavaConfig(vision_config=tower, text_config=text, image_token_id=1023)
    torch.manual_seed(0)
    ref = transformers.LlavaForConditionalGeneration(cfg).eval()
    with tempfile.TemporaryDirectory() as folder:
        ref.save_pretrained(folder)
        ours = vision.vision_config(json.load(open(os.path.join(folder, "config.json"))),
                                    {"size": {"shortest_edge": tower.image_size},
                                     "crop_size": {"height": tower.image_size, "width": tower.image_size}})
        params = jax.device_put(vision.vision_params(load_file(os.path.join(folder, "model.safetensors")),
                                                     "float32"))
    processor = transformers.CLIPImageProcessorPil(size={"shortest_edge": tower.image_size},
                                                   crop_size={"height": tower.image_size, "width": tower.image_size})
    photo = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (480, 640, 3), dtype=np.uint8)).save(photo, "JPEG")
    data = photo.getvalue()
    encode = jax.jit(lambda p, x: vision.image_features(p, x, ours))
    pixels = vision.preprocess(vision.decode_image(data), ours)[None]

    rows = [("decode + preprocess a 640x480 JPEG",
             median_time(lambda: vision.preprocess(vision.decode_image(data), ours), args.reps),
             median_time(lambda: processor(images=[Image.open(io.BytesIO(data))], return_tensors="np"), args.reps)),
            (f"tower + projector ({ours.tokens_per_image} features)",
             median_time(lambda: jax.block_until_ready(encode(params, pixels)), args.reps),
             median_time(lambda: _torch_features(ref, pixels), args.reps))]
    got = np.asarray(encode(params, pixels)).ravel()
    want = np.asarray(_torch_features(ref, pixels)).ravel()
    print(f"\n{platform.processor() or platform.machine()}, {os.cpu_count()} cores; jax {jax.__version__}, torch "
          f"{torch.__version__} ({torch.get_num_threads()} threads), transformers {transformers.__version__}; "
          f"float32; features agree to {np.abs(got - want).max():.1e}\n")
    print("| per picture | Sparkler (s) | transformers (s) | transformers / Sparkler |")
    print("| --- | ---: | ---: | ---: |")
    for name, a, b in rows:
        print(f"| {name} | {a:.4f} | {b:.4f} | {b / a:.2f} |")


def _torch_features(ref, pixels: np.ndarray):
    import torch

    with torch.no_grad():
        out = ref.get_image_features(pixel_values=torch.tensor(pixels))
    out = getattr(out, "pooler_output", out)
    return (torch.stack(list(out)) if isinstance(out, (list, tuple)) else out).numpy()


if __name__ == "__main__":
    main()
