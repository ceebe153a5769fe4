"""Model FLOPs utilisation: FLOPs per step, the device's peak, and their ratio.

A step's FLOPs come from XLA's cost analysis of the compiled step (per device: under
SPMD each device runs its own partition). XLA counts a `while` loop's body once, not
once per trip, so for scanned layer stacks the count comes from lowering the same step
unrolled (no compile needed). `analytic_flops` is the textbook count (matmuls and
convolutions only, backward = 2 x forward) and serves as a cross-check.

MFU = FLOPs per device per step / (seconds per step x peak FLOP/s per device). The
peaks are dense (no sparsity) vendor figures; `mfu.peak_flops` in the config overrides
them, and is needed on chips the table does not know (the CPU among them).
"""

from __future__ import annotations

import re
from typing import Any

import jax

from jaxclip.models.registry import ModelConfig
from jaxclip.models.vit import kept_patches

TERA = 1e12

# Dense peak FLOP/s per device, by compute dtype. GPU float32 is the TF32 tensor-core
# rate, which XLA uses for float32 matmuls by default; TPUs run float32 matmuls as
# bf16 passes at the default precision, so their float32 entry is the bf16 peak.
# Keys are matched as lower-case substrings of `device.device_kind`, first match wins.
PEAK_FLOPS: tuple[tuple[str, dict[str, float]], ...] = (
    ("tpu v6 lite", {"bfloat16": 918 * TERA, "float32": 918 * TERA}),  # v6e
    ("tpu v6e", {"bfloat16": 918 * TERA, "float32": 918 * TERA}),
    ("tpu v5 lite", {"bfloat16": 197 * TERA, "float32": 197 * TERA}),  # v5e
    ("tpu v5e", {"bfloat16": 197 * TERA, "float32": 197 * TERA}),
    ("tpu v5p", {"bfloat16": 459 * TERA, "float32": 459 * TERA}),
    ("tpu v5", {"bfloat16": 459 * TERA, "float32": 459 * TERA}),  # v5p reports "TPU v5"
    ("tpu v4", {"bfloat16": 275 * TERA, "float32": 275 * TERA}),
    ("h200", {"bfloat16": 989 * TERA, "float32": 494.5 * TERA}),
    ("h100 pcie", {"bfloat16": 756 * TERA, "float32": 378 * TERA}),
    ("h100", {"bfloat16": 989 * TERA, "float32": 494.5 * TERA}),  # SXM
    ("a100", {"bfloat16": 312 * TERA, "float32": 156 * TERA}),
)


def peak_flops(
    device: jax.Device | None = None,
    dtype: str = "bfloat16",
    override: float = 0.0,
) -> float | None:
    """Peak FLOP/s of one device for `dtype` compute; `override` > 0 wins; None if unknown."""
    if override and override > 0:
        return float(override)
    kind = (device or jax.devices()[0]).device_kind.lower()
    for key, peaks in PEAK_FLOPS:
        if key in kind:
            return peaks.get(dtype, peaks["bfloat16"])
    return None


def cost_flops(compiled_or_lowered: Any) -> float:
    """FLOPs of a compiled (or lowered) computation per device, from XLA's cost analysis.

    Beware: loops (`lax.scan`) are counted once, whatever their trip count.
    """
    analysis = compiled_or_lowered.cost_analysis()
    if isinstance(analysis, (list, tuple)):  # older JAX: one dict per partition
        analysis = analysis[0]
    return float(analysis.get("flops", 0.0)) if analysis else 0.0


def step_flops(compiled: Any, analytic_per_device: float) -> tuple[float, str]:
    """FLOPs per device of one compiled step, and where the number comes from.

    XLA's cost analysis when the step has no loops; with loops (scanned layers,
    micro-batch accumulation) XLA counts each body once, so the analytic count is used.
    """
    if re.search(r"\swhile\(", compiled.as_text() or ""):
        return analytic_per_device, "analytic (the compiled step has loops)"
    return cost_flops(compiled), "xla cost analysis"


def mfu(flops_per_step: float, seconds_per_step: float, peak: float | None) -> float:
    """Fraction of the peak reached; NaN when the peak or the timing is unknown."""
    if not peak or seconds_per_step <= 0:
        return float("nan")
    return flops_per_step / seconds_per_step / peak


# --- The analytic count: 2 FLOPs per multiply-add, matmuls and convolutions only.


def transformer_flops(tokens: int, width: int, layers: int, mlp_ratio: float) -> float:
    """Forward FLOPs of a pre-LN transformer stack for one sequence of `tokens`.

    Per layer: q/k/v and output projections (4 d^2 per token), the MLP (2 r d^2 per
    token), and attention scores and values (2 L d per token each; causal masks are
    not subtracted, since the kernels compute the full square).
    """
    per_token = 2 * (4 * width * width + 2 * mlp_ratio * width * width)
    attention = 2 * 2 * tokens * tokens * width
    return layers * (tokens * per_token + attention)


def resnet_flops(layers: tuple[int, ...], width: int, image_size: int, heads_out: int):
    """Forward FLOPs of OpenAI's ModifiedResNet (convolutions, attention pool)."""

    def conv(size: int, kernel: int, c_in: int, c_out: int) -> float:
        return 2 * size * size * kernel * kernel * c_in * c_out

    size = image_size // 2  # the stem's first conv strides by 2
    flops = conv(size, 3, 3, width // 2) + conv(size, 3, width // 2, width // 2)
    flops += conv(size, 3, width // 2, width)
    size //= 2  # average pool
    channels = width
    for index, blocks in enumerate(layers):
        planes = width * 2**index
        for block in range(blocks):
            stride = 2 if (index > 0 and block == 0) else 1
            flops += conv(size, 1, channels, planes) + conv(size, 3, planes, planes)
            out_size = size // stride
            flops += conv(out_size, 1, planes, 4 * planes)
            if stride > 1 or channels != 4 * planes:
                flops += conv(out_size, 1, channels, 4 * planes)
            channels, size = 4 * planes, out_size
    tokens = size * size + 1
    flops += 2 * channels * channels * (2 * tokens + 1)  # k, v over all tokens; one q
    flops += 2 * 2 * tokens * channels  # scores and weighted values of the one query
    flops += 2 * channels * heads_out  # c_proj to the embedding
    return flops


def map_head_flops(tokens: int, width: int, mlp_ratio: float) -> float:
    """SigLIP's attention-pooling head: one query over `tokens`, then its MLP."""
    flops = 2 * tokens * width * 2 * width  # k, v over all tokens
    flops += 2 * 2 * width * width  # the query's projection and the output's
    flops += 2 * 2 * tokens * width  # scores and weighted values of the one query
    return flops + 2 * 2 * width * int(width * mlp_ratio)


def attention_pool_flops(queries: int, tokens: int, width: int, context: int) -> float:
    """Attention of `queries` query tokens `width` wide over `tokens` tokens `context`
    wide (CoCa's pooler and cross-attention): q and output projections, k and v over
    the context, scores and weighted values."""
    flops = 2 * 2 * queries * width * width  # q and out projections
    flops += 2 * tokens * context * 2 * width  # k, v
    return flops + 2 * 2 * queries * tokens * width


def coca_flops(config: ModelConfig, image_tokens: int) -> dict[str, float]:
    """CoCa's forward FLOPs per sample beyond CLIP's towers: the attentional pooler
    (`image`: its `n_queries` over the ViT's `image_tokens`, and `proj`), the text
    tower's extra CLS position (`text`), and the decoder over `context_length - 1`
    tokens with its cross-attention to `n_queries - 1` image tokens and the
    projection to the vocabulary (`decoder`)."""
    vision, text, decoder = config.vision, config.text, config.decoder
    d, queries = config.embed_dim, decoder.n_queries
    pooler = attention_pool_flops(queries, image_tokens, d, vision.width)
    pooler += 2 * d * d  # proj of query 0
    length = text.context_length - 1
    decoder_flops = transformer_flops(length, d, decoder.layers, 4.0)  # OpenCLIP: 4x
    per_layer = attention_pool_flops(length, queries - 1, d, d)
    per_layer += length * 2 * 2 * 4.0 * d * d  # the cross block's MLP
    decoder_flops += decoder.layers * per_layer + 2 * length * d * text.vocab_size
    cls = transformer_flops(
        text.context_length + 1, text.width, text.layers, text.mlp_ratio
    ) - transformer_flops(text.context_length, text.width, text.layers, text.mlp_ratio)
    return {"image": pooler, "text": cls, "decoder": decoder_flops}


def forward_flops_per_sample(
    config: ModelConfig, patch_dropout: float = 0.0
) -> dict[str, float]:
    """Analytic forward FLOPs of one image and one text: {'image', 'text'}, and
    'decoder' for CoCa; with `patch_dropout`, a training image's (its ViT sees only
    the kept patches)."""
    vision, text = config.vision, config.text
    if vision.is_resnet:
        image = resnet_flops(
            tuple(vision.layers), vision.width, vision.image_size, config.embed_dim
        )
    else:
        grid = vision.image_size // vision.patch_size
        patch = 2 * grid * grid * vision.patch_size**2 * 3 * vision.width
        patches = kept_patches(grid * grid, patch_dropout)
        tokens = patches + (vision.pool == "tok")  # + the class token
        image = patch + transformer_flops(
            tokens, vision.width, vision.layers, vision.mlp_ratio
        )
        if vision.pool == "map":
            image += map_head_flops(tokens, vision.width, vision.mlp_ratio)
        elif not config.is_coca:
            image += 2 * vision.width * config.embed_dim
    text_flops = transformer_flops(
        text.context_length, text.width, text.layers, text.mlp_ratio
    )
    text_flops += 2 * text.width * config.embed_dim
    flops = {"image": float(image), "text": float(text_flops)}
    if config.is_coca:
        extra = coca_flops(config, tokens)
        flops = {part: flops.get(part, 0.0) + float(extra[part]) for part in extra}
    return flops


def analytic_flops(
    config: ModelConfig, batch_size: int, patch_dropout: float = 0.0
) -> float:
    """Analytic FLOPs of one training step over a global batch: 3 x forward + the loss
    (`patch_dropout`: the training config's `model.patch_dropout`).

    The backward pass costs twice the forward (gradients for inputs and weights). The
    contrastive loss's logits are a [B, B] matmul over `embed_dim`.
    """
    per_sample = forward_flops_per_sample(config, patch_dropout)
    forward = batch_size * sum(per_sample.values())
    loss = 2 * batch_size * batch_size * config.embed_dim
    return 3 * (forward + loss)
