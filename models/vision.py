"""The vision side of the models that read pictures, as pure functions over a pytree of arrays (run once per picture,
outside the paged step programs: `engine.images`), and the picture's preprocessing:

- LLaVA (`LlavaForConditionalGeneration`): a CLIP tower and the two-layer projector into the language model's
  embedding space, the picture prepared as transformers' `CLIPImageProcessor` does. The features are the tower's
  hidden state after layer `feature_layer` (HF's `hidden_states[feature_layer]`, where `hidden_states[0]` is the
  pre-norm's output; no post-norm), without the class token under the "default" strategy, through `linear_1`, the
  activation and `linear_2`. A prompt holds a picture as its image token repeated (`expand`).
- Gemma 3 (`Gemma3ForConditionalGeneration`): a SigLIP tower (no class token, biased patches, a post-norm), its
  patches averaged over `pool` x `pool` squares, Gemma's RMS norm (`1 + w`) and one product into the embeddings;
  the picture resized square (bilinear) as `Gemma3ImageProcessor` does. A prompt holds a picture as the processor
  writes it in place of each `<start_of_image>` of the template's text: a blank line, that mark, the image token
  `tokens_per_image` times, `<end_of_image>` and a blank line (`sequence`); its tokens attend to each other both
  ways (`ModelConfig.image_block`)."""

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
    tower: str = "clip"  # or "siglip" (Gemma 3's)
    projector: str = "mlp"  # or "gemma3": RMS norm and one product, after `pool`
    pool: int = 1  # Gemma 3: the patch grid averaged over squares this wide
    mark_id: int = -1  # the token a template writes for a picture (Gemma 3's `<start_of_image>`; -1: the image token)
    end_id: int = -1  # Gemma 3's `<end_of_image>`
    resample: str = "bicubic"  # the resize's filter (Gemma 3's: bilinear)
    image_mean: tuple[float, ...] = CLIP_MEAN
    image_std: tuple[float, ...] = CLIP_STD
    crop_size: int = 336
    resize_shortest: int = 336  # the resized picture's shortest edge
    resize_square: bool = False  # True: resized to `resize_shortest` square, whatever its shape (size {height, width})

    @property
    def tokens_per_image(self) -> int:
        """Positions one picture's features take in a prompt."""
        return (self.image_size // self.patch_size // self.pool) ** 2 + (self.tower == "clip" and self.select == "full")

    @property
    def marks(self) -> int:
        """The token a template writes for each picture."""
        return self.image_token_id if self.mark_id < 0 else self.mark_id

    @property
    def bidirectional(self) -> bool:
        """Whether a picture's positions attend to each other both ways (Gemma 3's)."""
        return self.projector == "gemma3"

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
    """A LLaVA or Gemma 3 folder's `config.json` (and `preprocessor_config.json`, if it has one) as a
    `VisionConfig`."""
    if (config.get("architectures") or [""])[0] == "Gemma3ForConditionalGeneration":
        return _gemma3_config(config, preprocessor or {})
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


def _gemma3_config(config: dict, pre: dict) -> VisionConfig:
    """Gemma 3's vision side: a SigLIP tower, `mm_tokens_per_image` features a picture after the pooling."""
    v = config.get("vision_config") or {}
    if v.get("model_type", "siglip_vision_model") != "siglip_vision_model" or v.get("vision_use_head"):
        raise ValueError("a Gemma 3 vision tower other than SigLIP's (without its pooling head) is not supported")
    if pre.get("do_pan_and_scan"):
        raise ValueError("Gemma 3's pan and scan (do_pan_and_scan) is not supported")
    image, patch = v.get("image_size", 896), v.get("patch_size", 14)
    side, tokens = image // patch, config.get("mm_tokens_per_image", 256)
    per_side = int(round(tokens ** 0.5))
    if per_side * per_side != tokens or side % per_side:
        raise ValueError(f"mm_tokens_per_image {tokens} does not pool a {side} x {side} patch grid into squares")
    size, square = _size(pre.get("size"), image)
    if not square:
        size, square = image, True
    mean = tuple(pre.get("image_mean", (0.5, 0.5, 0.5)))
    return VisionConfig(
        hidden_size=v.get("hidden_size", 1152), intermediate_size=v.get("intermediate_size", 4304),
        num_layers=v.get("num_hidden_layers", 27), num_heads=v.get("num_attention_heads", 16), patch_size=patch,
        image_size=image, layer_norm_eps=v.get("layer_norm_eps", 1e-6),
        hidden_act=v.get("hidden_act", "gelu_pytorch_tanh"), feature_layer=-1, select="default",
        projector_act="", image_token_id=int(config.get("image_token_index", 262_144)), tower="siglip",
        projector="gemma3", pool=side // per_side, mark_id=int(config.get("boi_token_index", 255_999)),
        end_id=int(config.get("eoi_token_index", 256_000)), resample="bilinear", image_mean=mean,
        image_std=tuple(pre.get("image_std", (0.5, 0.5, 0.5))), crop_size=size, resize_shortest=size,
        resize_square=square)


def vision_params(tensors: dict[str, np.ndarray], dtype: str) -> dict:
    """The tower's and projector's tensors (HF names, any of `PREFIXES`; others ignored) as the pytree
    `image_features` reads, in `dtype`: the encoder layers stacked on a leading axis, linear weights as `[in, out]`,
    a projector without biases without `b`; CLIP's (LLaVA's) or SigLIP's and Gemma 3's projector, as the tensors
    say. A vision tensor it does not know is a `ValueError`."""
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
              "positions": get("vision_tower.embeddings.position_embedding.weight"),
              "layers": jax.tree.map(lambda *xs: np.stack(xs), *[layer(i) for i in range(count)])}
    siglip = "vision_tower.embeddings.class_embedding" not in t
    if siglip:  # Gemma 3's: biased patches, a post-norm, and its projector
        params.update(patch_bias=get("vision_tower.embeddings.patch_embedding.bias"),
                      post_norm=norm("vision_tower.post_layernorm"),
                      soft_norm=get("multi_modal_projector.mm_soft_emb_norm.weight"),
                      projection=get("multi_modal_projector.mm_input_projection_weight"))  # [vision, text]
    else:
        params.update(cls=get("vision_tower.embeddings.class_embedding"), pre_norm=norm("vision_tower.pre_layrnorm"),
                      linear_1=linear("multi_modal_projector.linear_1"),
                      linear_2=linear("multi_modal_projector.linear_2"))
    unknown = sorted(k for k in t if k not in used and (siglip or not k.startswith(UNUSED)))
    if unknown:
        raise ValueError(f"vision tensors not understood: {unknown[:5]}")
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
    if cfg.tower == "siglip":
        x = x + params["patch_bias"] + params["positions"]
    else:
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
    if cfg.projector == "gemma3":
        x = _norm(params["post_norm"], x, cfg.layer_norm_eps)
        k = cfg.pool  # the patch grid averaged over k x k squares, row by row as the patches run
        x = x.reshape(n, side // k, k, side // k, k, -1).astype(jnp.float32).mean((2, 4)).reshape(n, -1, x.shape[-1])
        x = x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + cfg.layer_norm_eps) * (1.0 + params["soft_norm"])
        return jnp.dot(x.astype(dtype), params["projection"], preferred_element_type=jnp.float32).astype(dtype)
    if cfg.select == "default":
        x = x[:, 1:]
    return _dense(params["linear_2"], _act(cfg.projector_act, _dense(params["linear_1"], x)))


def expand(ids: list[int], cfg: VisionConfig, pictures: int) -> list[int]:
    """`ids` with each image token repeated to a picture's length, as transformers' processor writes a prompt
    (LLaVA's; Gemma 3's prompts are written out as text: `sequence`); `ValueError` unless they hold one image token
    for each of `pictures`."""
    if cfg.mark_id >= 0:
        if (found := ids.count(cfg.image_token_id)) != pictures * cfg.tokens_per_image:
            raise ValueError(f"holds {found} image tokens for {pictures} pictures of {cfg.tokens_per_image}")
        return ids
    if (marks := ids.count(cfg.image_token_id)) != pictures:
        raise ValueError(f"holds {marks} image tokens for {pictures} pictures")
    return [t for i in ids for t in ([i] * cfg.tokens_per_image if i == cfg.image_token_id else [i])]


def sequence(cfg: VisionConfig, text_of) -> tuple[str, str] | None:
    """`(mark, what it becomes)` in a rendered prompt where the processor writes a picture out as text (Gemma 3's:
    a blank line, `<start_of_image>`, the image token `tokens_per_image` times, `<end_of_image>`, a blank line);
    `text_of(id)` is a token's text. None for LLaVA, whose image token is repeated after tokenizing (`expand`)."""
    if cfg.mark_id < 0:
        return None
    mark = text_of(cfg.mark_id)
    return mark, f"\n\n{mark}{text_of(cfg.image_token_id) * cfg.tokens_per_image}{text_of(cfg.end_id)}\n\n"


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
    edge `int(edge * long / short)`; or a square, and Gemma 3's filter is bilinear), a center crop (zero padded where
    the picture is smaller), `/ 255`, then `(x - mean) / std` per channel."""
    from PIL import Image

    image = _rgb(image)
    w, h, s = *image.size, cfg.resize_shortest
    size = (s, s) if cfg.resize_square else (s, int(s * h / w)) if w <= h else (int(s * w / h), s)
    x = np.asarray(image.resize(size, Image.Resampling[cfg.resample.upper()])).transpose(2, 0, 1)
    c, (h, w) = cfg.crop_size, x.shape[1:]
    top, left = max(0, -(-(c - h) // 2)), max(0, -(-(c - w) // 2))  # transformers pads ceil((c - h) / 2) above
    x = np.pad(x, ((0, 0), (top, max(0, c - h - top)), (left, max(0, c - w - left))))
    top, left = (x.shape[1] - c) // 2, (x.shape[2] - c) // 2
    x = (x[:, top:top + c, left:left + c].astype(np.float64) * (1 / 255)).astype(np.float32)
    mean, std = (np.asarray(v, np.float32)[:, None, None] for v in (cfg.image_mean, cfg.image_std))
    return (x - mean) / std
