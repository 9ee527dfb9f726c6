"""LLaVA's vision side (`models.vision`) against transformers: a tiny random LlavaForConditionalGeneration's tower and
projector, and `CLIPImageProcessor`'s preprocessing (its Pillow backend)."""

import io
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from PIL import Image  # noqa: E402

from models import vision  # noqa: E402

pytestmark = pytest.mark.quick_compile  # a tiny random tower: XLA optimizations off (conftest)

SIZE = 28


@pytest.mark.parametrize("select,layer,bias", [("default", -2, True), ("full", -1, False), ("default", 1, True)])
def test_the_tower_and_projector_match_transformers(tmp_path, select, layer, bias):
    """`image_features` on a saved checkpoint's tensors against `get_image_features`, for each feature strategy, a
    feature layer counted from either end, and a projector with and without biases."""
    from safetensors.numpy import load_file

    text = transformers.LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    tower = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                          num_attention_heads=4, image_size=SIZE, patch_size=7, projection_dim=32)
    cfg = transformers.LlavaConfig(vision_config=tower, text_config=text, image_token_id=299,
                                   vision_feature_select_strategy=select, vision_feature_layer=layer,
                                   multimodal_projector_bias=bias)
    torch.manual_seed(0)
    ref = transformers.LlavaForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    ref.save_pretrained(tmp_path)
    ours = vision.vision_config(json.load(open(tmp_path / "config.json")), None)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    params = vision.vision_params(tensors, "float32")
    pixels = np.random.default_rng(0).standard_normal((2, 3, SIZE, SIZE)).astype(np.float32)
    got = np.asarray(vision.image_features(params, pixels, ours))
    with torch.no_grad():
        out = ref.get_image_features(pixel_values=torch.tensor(pixels))
    want = torch.stack(list(out.pooler_output)).numpy()  # transformers 5: one [tokens, hidden] per picture
    assert ours.projector_bias == bias and ours.image_token_id == 299 and ("b" in params["linear_1"]) == bias
    assert got.shape == want.shape == (2, ours.tokens_per_image, 64)
    assert ours.tokens_per_image == 16 + (select == "full")
    np.testing.assert_allclose(got, want, atol=1e-4)
    # llava-hf's names (`vision_tower.vision_model.*`) and transformers 5's in memory (`model.*`) read the same
    for rename in (lambda k: k.replace("vision_tower.", "vision_tower.vision_model."), lambda k: "model." + k):
        again = vision.vision_params({rename(k): v for k, v in tensors.items()}, "float32")
        assert jax_equal(again, params)
    with pytest.raises(ValueError, match="not understood"):
        vision.vision_params({**tensors, "vision_tower.head.weight": np.zeros(3, np.float32)}, "float32")
    half = vision.image_features(vision.vision_params(tensors, "bfloat16"), pixels, ours)
    assert half.dtype == np.dtype("bfloat16") and np.abs(np.asarray(half, np.float32) - got).max() < 0.5


def jax_equal(a, b) -> bool:
    """Two pytrees of the same structure and values."""
    import jax

    return jax.tree.structure(a) == jax.tree.structure(b) and all(
        np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _pictures() -> list:
    """Random pictures taller, wider, square and long, an RGBA and a palette picture with a transparent colour."""
    rng = np.random.default_rng(1)
    out = [Image.fromarray(rng.integers(0, 256, (*shape, 3), dtype=np.uint8))
           for shape in ((40, 31), (17, 50), (20, 20), (10, 60))]
    out.append(Image.fromarray(rng.integers(0, 256, (33, 45, 4), dtype=np.uint8)))
    palette = Image.fromarray(rng.integers(0, 4, (23, 37), dtype=np.uint8), mode="P")
    palette.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 255])
    palette.info["transparency"] = 2
    return out + [palette]


@pytest.mark.parametrize("size,crop", [({"shortest_edge": SIZE}, {"height": SIZE, "width": SIZE}),
                                       ({"shortest_edge": 21}, {"height": SIZE, "width": SIZE}),
                                       ({"height": 30, "width": 30}, {"height": SIZE, "width": SIZE}),
                                       (SIZE + 5, SIZE)])
def test_preprocessing_matches_clips_image_processor(size, crop):
    """`preprocess`, configured from the processor's own `preprocessor_config.json` dict, against
    `CLIPImageProcessorPil`: a shortest edge, one smaller than the crop (zero padding), a square resize, plain ints; and
    pictures through `decode_image` from PNG bytes, transparency on white as transformers composites it."""
    processor = transformers.CLIPImageProcessorPil(size=size, crop_size=crop, image_mean=[0.5, 0.4, 0.3])
    cfg = vision.vision_config({"vision_config": {"image_size": SIZE, "patch_size": 7}, "image_token_index": 5},
                               processor.to_dict())
    assert cfg.crop_size == SIZE and cfg.image_mean == (0.5, 0.4, 0.3)
    for picture in _pictures():
        want = processor(images=[picture], return_tensors="np")["pixel_values"][0]
        got = vision.preprocess(picture, cfg)
        assert got.dtype == np.float32 and got.shape == (3, SIZE, SIZE)
        np.testing.assert_array_equal(got, want)
        encoded = io.BytesIO()
        picture.save(encoded, format="PNG")
        np.testing.assert_array_equal(vision.preprocess(vision.decode_image(encoded.getvalue()), cfg), want)


def test_bad_bytes_and_other_towers_are_value_errors():
    """Bytes that are no picture, a picture whose header says it is too long and thin, a SigLIP tower, features from
    several layers: `ValueError`s; without a preprocessor config CLIP's defaults at the tower's size."""
    with pytest.raises(ValueError, match="could not decode the image"):
        vision.decode_image(b"not an image")
    strip = io.BytesIO()
    Image.new("RGB", (1000, 1)).save(strip, format="PNG")
    with pytest.raises(ValueError, match="1000x1 pixels"):
        vision.decode_image(strip.getvalue())
    with pytest.raises(ValueError, match="only CLIP"):
        vision.vision_config({"vision_config": {"model_type": "siglip_vision_model"}, "image_token_index": 5}, None)
    with pytest.raises(ValueError, match="not supported"):
        vision.vision_config({"vision_feature_layer": [-2, -5], "image_token_index": 5}, None)
    cfg = vision.vision_config({"vision_config": {"image_size": 336, "patch_size": 14}, "image_token_id": 7}, None)
    assert (cfg.crop_size, cfg.resize_shortest, cfg.resize_square) == (336, 336, False)
    assert cfg.image_mean == vision.CLIP_MEAN and cfg.tokens_per_image == 576 and cfg.image_token_id == 7
