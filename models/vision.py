"""LLaVA's vision side (`LlavaForConditionalGeneration`): a CLIP vision tower and the two-layer projector into the
language model's embedding space, as pure functions over a pytree of arrays (run once per picture, outside the paged
step programs: `engine.images`), and the picture's preprocessing, transformers' `CLIPImageProcessor`'s steps.

The features are the tower's hidden state after layer `feature_layer` (HF's `hidden_states[feature_layer]`, where
`hidden_states[0]` is the pre-norm's output; no post-norm), without the class token under the "default" strategy,
through `linear_1`, the activation and `linear_2`."""

from __future__ import annotations

import dataclasses
import io

import jax
import jax.numpy as jnp
import numpy as np

# Tensor names of the vision side: transformers 5's (`vision_tower.encoder...`), llava-hf's
# (`vision_tower.vision_model.encoder...`) and transformers 5's in memory (`model.vision_tower...`).
PREFIXES = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.", "model.multi_modal_projector.")
UNUSED = ("vision_tower.post_layernorm.", "vision_tower.embeddings.position_ids")  # LLaVA never reads these
MAX_PIXELS = 50_000_000  # a picture's decoded size (150 MB of RGB): more is refused before it is decoded
MAX_ASPECT = 50  # its long side over its short one: more would resize to a strip of 336 x 16,800+ pixels first
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """A LLaVA's vision tower, projector, image token and preprocessing."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    patch_size: int
    image_size: int
    layer_norm_eps: float
    hidden_act: str  # the tower's ("quick_gelu" for OpenAI's CLIP)
    feature_layer: int  # HF's `vision_feature_layer`: an index into the tower's hidden states
    select: str  # "default": the class token dropped; "full": kept
    projector_act: str
    image_token_id: int
    projector_bias: bool = True
    image_mean: tuple[float, ...] = CLIP_MEAN
    image_std: tuple[float, ...] = CLIP_STD
    crop_size: int = 336
    resize_shortest: int = 336  # the resized picture's shortest edge
    resize_square: bool = False  # True: resized to `resize_shortest` square, whatever its shape (size {height, width})

    @property
    def tokens_per_image(self) -> int:
        """Positions one picture takes in a prompt."""
        return (self.image_size // self.patch_size) ** 2 + (self.select == "full")

    @property
    def depth(self) -> int:
        """Encoder layers the features need (the layers after the feature layer are never run)."""
        return self.feature_layer % (self.num_layers + 1)


def _size(v, default: int) -> tuple[int, bool]:
    """A processor's `size` or `crop_size` (an int, `{"shortest_edge"}` or `{"height", "width"}`) as (edge, square)."""
    if v is None or isinstance(v, int):
        return v or default, False
    if "shortest_edge" in v:
        return v["shortest_edge"], False
    if v.get("height") is None or v.get("height") != v.get("width"):
        raise ValueError(f"an image processor size {v!r} is not supported (shortest_edge, or a square)")
    return v["height"], True


def vision_config(config: dict, preprocessor: dict | None) -> VisionConfig:
    """A LLaVA folder's `config.json` (and `preprocessor_config.json`, if it has one) as a `VisionConfig`."""
    v = config.get("vision_config") or {}
    if v.get("model_type", "clip_vision_model") != "clip_vision_model":
        raise ValueError(f"a LLaVA vision tower of type {v.get('model_type')!r} is not supported; only CLIP towers "
                         "(clip_vision_model) are served")
    layer = config.get("vision_feature_layer", -2)
    if not isinstance(layer, int):
        raise ValueError(f"vision_feature_layer {layer!r}: features from several layers are not supported")
    select = config.get("vision_feature_select_strategy", "default")
    if select not in ("default", "full"):
        raise ValueError(f"vision_feature_select_strategy {select!r} is not supported (default, full)")
    token = config.get("image_token_index", config.get("image_token_id"))
    if token is None:
        raise ValueError("the LLaVA config names no image token (image_token_index)")
    image, pre = v.get("image_size", 224), preprocessor or {}
    resize, square = _size(pre.get("size"), image)
    return VisionConfig(
        hidden_size=v.get("hidden_size", 768), intermediate_size=v.get("intermediate_size", 3072),
        num_layers=v.get("num_hidden_layers", 12), num_heads=v.get("num_attention_heads", 12),
        patch_size=v.get("patch_size", 32), image_size=image, layer_norm_eps=v.get("layer_norm_eps", 1e-5),
        hidden_act=v.get("hidden_act", "quick_gelu"), feature_layer=layer, select=select,
        projector_act=config.get("projector_hidden_act", "gelu"), image_token_id=int(token),
        projector_bias=bool(config.get("multimodal_projector_bias", True)),
        image_mean=tuple(pre.get("image_mean", CLIP_MEAN)), image_std=tuple(pre.get("image_std", CLIP_STD)),
        crop_size=_size(pre.get("crop_size"), image)[0], resize_shortest=resize, resize_square=square)


def vision_params(tensors: dict[str, np.ndarray], dtype: str) -> dict:
    """The tower's and projector's tensors (HF names, any of `PREFIXES`; others ignored) as the pytree
    `image_features` reads, in `dtype`: the encoder layers stacked on a leading axis, linear weights as `[in, out]`,
    a projector without biases without `b`. A vision tensor it does not know is a `ValueError`."""
    def short(name: str) -> str:
        return name.removeprefix("model.").replace("vision_tower.vision_model.", "vision_tower.")

    t = {short(k): v for k, v in tensors.items() if k.startswith(PREFIXES)}
    cast, used = jnp.dtype(dtype), set()

    def get(name: str) -> np.ndarray:
        used.add(name)
        return np.asarray(t[name], np.float32).astype(cast)

    def linear(prefix: str) -> dict:
        bias = {"b": get(prefix + ".bias")} if prefix + ".bias" in t else {}
        return {"w": get(prefix + ".weight").T, **bias}

    def norm(prefix: str) -> dict:
        return {"scale": get(prefix + ".weight"), "bias": get(prefix + ".bias")}

    def layer(i: int) -> dict:
        at = f"vision_tower.encoder.layers.{i}."
        return {"norm1": norm(at + "layer_norm1"), "norm2": norm(at + "layer_norm2"),
                **{p: linear(at + "self_attn." + p) for p in ("q_proj", "k_proj", "v_proj", "out_proj")},
                "fc1": linear(at + "mlp.fc1"), "fc2": linear(at + "mlp.fc2")}

    count = 1 + max(int(k.split(".")[3]) for k in t if k.startswith("vision_tower.encoder.layers."))
    patch = get("vision_tower.embeddings.patch_embedding.weight")  # [hidden, 3, p, p]
    params = {"patch": patch.reshape(patch.shape[0], -1).T,  # [3 * p * p, hidden]
              "cls": get("vision_tower.embeddings.class_embedding"),
              "positions": get("vision_tower.embeddings.position_embedding.weight"),
              "pre_norm": norm("vision_tower.pre_layrnorm"),
              "layers": jax.tree.map(lambda *xs: np.stack(xs), *[layer(i) for i in range(count)]),
              "linear_1": linear("multi_modal_projector.linear_1"),
              "linear_2": linear("multi_modal_projector.linear_2")}
    unknown = sorted(k for k in t if k not in used and not k.startswith(UNUSED))
    if unknown:
        raise ValueError(f"LLaVA vision tensors not understood: {unknown[:5]}")
    return jax.tree.map(jnp.asarray, params)


def _act(name: str, x):
    if name == "quick_gelu":
        return x * jax.nn.sigmoid(1.702 * x)
    if name in ("gelu", "gelu_python"):
        return jax.nn.gelu(x, approximate=False)
    if name in ("gelu_new", "gelu_pytorch_tanh"):
        return jax.nn.gelu(x, approximate=True)
    raise ValueError(f"activation {name!r} is not supported")


def _norm(p: dict, x, eps: float):
    x32 = x.astype(jnp.float32)
    mean = x32.mean(-1, keepdims=True)
    var = ((x32 - mean) ** 2).mean(-1, keepdims=True)
    return ((x32 - mean) * jax.lax.rsqrt(var + eps) * p["scale"] + p["bias"]).astype(x.dtype)


def _dense(p: dict, x):
    y = jnp.dot(x, p["w"], preferred_element_type=jnp.float32).astype(x.dtype)
    return y + p["b"] if "b" in p else y


def image_features(params: dict, pixels, cfg: VisionConfig):
    """Features `[N, tokens_per_image, text hidden]` of preprocessed pictures `[N, 3, S, S]` (see the module doc)."""
    n, p, heads = pixels.shape[0], cfg.patch_size, cfg.num_heads
    dtype = params["patch"].dtype
    side = pixels.shape[-1] // p
    patches = pixels.reshape(n, 3, side, p, side, p).transpose(0, 2, 4, 1, 3, 5).reshape(n, side * side, -1)
    x = jnp.dot(patches.astype(dtype), params["patch"], preferred_element_type=jnp.float32).astype(dtype)
    x = jnp.concatenate([jnp.broadcast_to(params["cls"], (n, 1, x.shape[-1])), x], axis=1) + params["positions"]
    x = _norm(params["pre_norm"], x, cfg.layer_norm_eps)

    def layer(x, w):
        h = _norm(w["norm1"], x, cfg.layer_norm_eps)
        q, k, v = (_dense(w[name], h).reshape(n, -1, heads, h.shape[-1] // heads) for name in
                   ("q_proj", "k_proj", "v_proj"))
        scores = jnp.einsum("nqhd,nkhd->nhqk", q, k, preferred_element_type=jnp.float32) * q.shape[-1] ** -0.5
        att = jnp.einsum("nhqk,nkhd->nqhd", jax.nn.softmax(scores, -1).astype(dtype), v).reshape(x.shape)
        x = x + _dense(w["out_proj"], att)
        h = _norm(w["norm2"], x, cfg.layer_norm_eps)
        return x + _dense(w["fc2"], _act(cfg.hidden_act, _dense(w["fc1"], h))), None

    x, _ = jax.lax.scan(layer, x, jax.tree.map(lambda a: a[:cfg.depth], params["layers"]))
    if cfg.select == "default":
        x = x[:, 1:]
    return _dense(params["linear_2"], _act(cfg.projector_act, _dense(params["linear_1"], x)))


def expand(ids: list[int], cfg: VisionConfig, pictures: int) -> list[int]:
    """`ids` with each image token repeated to a picture's length, as transformers' processor writes a prompt;
    `ValueError` unless they hold one image token for each of `pictures`."""
    if (marks := ids.count(cfg.image_token_id)) != pictures:
        raise ValueError(f"holds {marks} image tokens for {pictures} pictures")
    return [t for i in ids for t in ([i] * cfg.tokens_per_image if i == cfg.image_token_id else [i])]


def _rgb(image):
    """RGB as transformers' `convert_to_rgb` makes it: any transparency composited onto white."""
    from PIL import Image

    if "A" in image.getbands() or image.info.get("transparency") is not None:
        image = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", image.size, (255, 255, 255, 255)), image).convert("RGB")
    return image.convert("RGB")


def decode_image(data: bytes):
    """A picture's bytes (PNG, JPEG, WebP, GIF, ...) as an RGB PIL image (transparency on white); `ValueError` if they
    are none, or if its header says it is over `MAX_PIXELS` or `MAX_ASPECT` (checked before the pixels are decoded)."""
    from PIL import Image

    try:
        image = Image.open(io.BytesIO(data))
        w, h = image.size
        if w * h > MAX_PIXELS or max(w, h) > MAX_ASPECT * min(w, h):
            raise ValueError(f"the image is {w}x{h} pixels; at most {MAX_PIXELS:,} pixels, and sides at most "
                             f"{MAX_ASPECT}:1")
        image.load()
        return _rgb(image)
    except (OSError, ValueError, Image.DecompressionBombError, SyntaxError, MemoryError) as e:
        raise ValueError(f"could not decode the image: {e}") from None


def preprocess(image, cfg: VisionConfig) -> np.ndarray:
    """`[3, crop, crop]` float32 pixels of a PIL image, exactly as transformers' `CLIPImageProcessor` (its Pillow
    backend) makes them: RGB, the shortest edge resized to `resize_shortest` (bicubic on the uint8 picture, the other
    edge `int(edge * long / short)`), a center crop (zero padded where the picture is smaller), `/ 255`, then
    `(x - mean) / std` per channel."""
    from PIL import Image

    image = _rgb(image)
    w, h, s = *image.size, cfg.resize_shortest
    size = (s, s) if cfg.resize_square else (s, int(s * h / w)) if w <= h else (int(s * w / h), s)
    x = np.asarray(image.resize(size, Image.Resampling.BICUBIC)).transpose(2, 0, 1)
    c, (h, w) = cfg.crop_size, x.shape[1:]
    top, left = max(0, -(-(c - h) // 2)), max(0, -(-(c - w) // 2))  # transformers pads ceil((c - h) / 2) above
    x = np.pad(x, ((0, 0), (top, max(0, c - h - top)), (left, max(0, c - w - left))))
    top, left = (x.shape[1] - c) // 2, (x.shape[2] - c) // 2
    x = (x[:, top:top + c, left:left + c].astype(np.float64) * (1 / 255)).astype(np.float32)
    mean, std = (np.asarray(v, np.float32)[:, None, None] for v in (cfg.image_mean, cfg.image_std))
    return (x - mean) / std
