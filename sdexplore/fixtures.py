"""Tiny random-weight SD 1.x / SD 2.x / SDXL / SD3 / Flux.1 / Flux.2 [klein] / PixArt-Σ / Chroma / Sana pipelines
built in code: offline structure tests and demos.

They have the real architecture classes and the real CLIP tokenizer (SD3, Flux: plus a small offline T5 tokenizer;
PixArt-Σ and Chroma: that T5 tokenizer alone; Flux.2 [klein]: a small offline Qwen byte-level BPE tokenizer with
Qwen3's chat template; Sana: a small offline Gemma tokenizer) but random weights, so they draw noise: use them for
structure (shapes, hooks, restore guarantees), never for meaning. ``ALL_FIXTURE_FAMILIES`` lists every one; the
conformance suite (tests/test_conformance.py) runs on each.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any, Literal

import torch
from diffusers import (
    AutoencoderDC,
    AutoencoderKL,
    AutoencoderKLFlux2,
    AutoencoderKLQwenImage,
    AutoencoderKLWan,
    ChromaPipeline,
    ChromaTransformer2DModel,
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    Flux2KleinPipeline,
    Flux2Transformer2DModel,
    FluxPipeline,
    FluxTransformer2DModel,
    PixArtSigmaPipeline,
    PixArtTransformer2DModel,
    QwenImagePipeline,
    QwenImageTransformer2DModel,
    SanaPipeline,
    SanaTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
    UniPCMultistepScheduler,
    WanPipeline,
    WanTransformer3DModel,
    ZImagePipeline,
    ZImageTransformer2DModel,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    Gemma2Config,
    Gemma2Model,
    GemmaTokenizerFast,
    Qwen2TokenizerFast,
    Qwen3Config,
    Qwen3ForCausalLM,
    T5Config,
    T5EncoderModel,
    UMT5Config,
    UMT5EncoderModel,
)

from .families import FAMILIES
from .tokenizer import clip_tokenizer, t5_tokenizer

FixtureFamily = Literal[
    "sd1",
    "sd2",
    "sdxl",
    "sd3",
    "flux",
    "flux2",
    "pixart-sigma",
    "chroma",
    "sana",
    "z-image",
    "qwen-image",
    "wan",
]
#: The UNet fixture families: every capability (steps, steering, attention maps, walks, widgets) works on them.
FIXTURE_FAMILIES: tuple[str, ...] = ("sd1", "sd2", "sdxl")
#: The MMDiT fixture families (flow matching, a transformer denoiser): steps and steering work on each.
MMDIT_FIXTURE_FAMILIES: tuple[str, ...] = ("sd3", "flux")
#: Fixture families with part of the capabilities: Flux.2 [klein] (steps, steering, token labels, attention maps and
#: controls; not yet walks or text inspection, whose tests assume a T5 sequence).
PARTIAL_FIXTURE_FAMILIES: tuple[str, ...] = (
    "flux2",
    "pixart-sigma",
    "chroma",
    "sana",
    "z-image",
    "qwen-image",
)
#: Every fixture family, old and new: the conformance suite (tests/test_conformance.py) runs on each; what each can
#: do is its record's ``Family.capabilities``.
#: The video fixture families: latents (B, C, F, h, w), frame strips and maps per frame (Wan 2.x).
VIDEO_FIXTURE_FAMILIES: tuple[str, ...] = ("wan",)
ALL_FIXTURE_FAMILIES: tuple[str, ...] = (
    FIXTURE_FAMILIES + MMDIT_FIXTURE_FAMILIES + PARTIAL_FIXTURE_FAMILIES + VIDEO_FIXTURE_FAMILIES
)
#: Flux.1 fixture variants: "dev" (guidance-distilled: the scale is a transformer input; dynamic shifting) and
#: "schnell" (no guidance input; a fixed shift of 1).
FLUX_VARIANTS: tuple[str, ...] = ("dev", "schnell")
#: Call arguments a fast call of a fixture takes beyond its record's ``Family.call_defaults`` (which are the real
#: models' and apply to them too): Wan's short clip, 5 frames → 2 latent frames (the pipeline's default is 81).
FIXTURE_CALL_DEFAULTS: dict[str, dict[str, Any]] = {"wan": {"num_frames": 5}}


def fixture_call_defaults(family: str) -> dict[str, Any]:
    """The call arguments a fast call of the ``family`` fixture needs: its record's ``Family.call_defaults``, then
    the fixture's own (:data:`FIXTURE_CALL_DEFAULTS`)."""
    return {**dict(FAMILIES[family].call_defaults), **FIXTURE_CALL_DEFAULTS.get(family, {})}


_TEXT_HIDDEN = 32


@lru_cache(maxsize=2)
def _tokenizer(pad_token: str) -> CLIPTokenizer:
    return clip_tokenizer(pad_token=pad_token)


def _text_config(projection_dim: int | None = None) -> CLIPTextConfig:
    kwargs: dict[str, Any] = dict(
        vocab_size=49408,
        hidden_size=_TEXT_HIDDEN,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=1,
        hidden_act="gelu",
    )
    if projection_dim is not None:
        kwargs["projection_dim"] = projection_dim
    return CLIPTextConfig(**kwargs)


def _vae(latent_channels: int = 4, **extra: Any) -> AutoencoderKL:
    # Four blocks → 8× downsampling, like every real SD VAE: 64×64×3 pixels ↔ 8×8×latent_channels latents.
    return AutoencoderKL(
        block_out_channels=(8, 8, 16, 16),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=latent_channels,
        norm_num_groups=8,
        layers_per_block=1,
        sample_size=64,
        **extra,
    )


def _unet(family: str) -> UNet2DConditionModel:
    common: dict[str, Any] = dict(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=32,
    )
    if family == "sd1":
        return UNet2DConditionModel(**common, cross_attention_dim=_TEXT_HIDDEN, attention_head_dim=8)
    if family == "sd2":
        return UNet2DConditionModel(
            **common, cross_attention_dim=_TEXT_HIDDEN, attention_head_dim=(2, 4), use_linear_projection=True
        )
    # SDXL: both encoders' hidden states concatenated, plus pooled text + 6 time ids through "text_time".
    return UNet2DConditionModel(
        **common,
        cross_attention_dim=2 * _TEXT_HIDDEN,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=6 * 8 + _TEXT_HIDDEN,
    )


def _scheduler(prediction_type: str) -> DDIMScheduler:
    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )


# ---- SD3: MMDiT transformer, 16-channel VAE with a shift, CLIP-L + CLIP-G + T5, flow matching ------------------
_T5_WIDTH = 2 * _TEXT_HIDDEN  # SD3 zero-pads the CLIP-L ‖ CLIP-G hidden states (2 × 32) up to the T5 width


def _sd3_vae() -> AutoencoderKL:
    # SD3's VAE: 16 latent channels, no quant convs, and a shift: latents = (z − shift_factor) · scaling_factor
    # (the real values; random weights).
    return _vae(
        16, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False
    )


def _sd3_transformer() -> SD3Transformer2DModel:
    # 2×2 patches like SD3: an 8×8 latent is 16 image tokens; 2 joint blocks of 4 heads × 8 = 32 channels.
    return SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=_T5_WIDTH,
        caption_projection_dim=32,  # = heads × head dim (the context stream has the image stream's width)
        pooled_projection_dim=2 * _TEXT_HIDDEN,  # CLIP-L ‖ CLIP-G pooled
        pos_embed_max_size=16,  # up to 256×256 pixels
    )


def _t5() -> T5EncoderModel:
    return T5EncoderModel(
        T5Config(
            vocab_size=len(t5_tokenizer()),
            d_model=_T5_WIDTH,
            d_kv=8,
            d_ff=37,
            num_layers=1,
            num_heads=2,
            relative_attention_num_buckets=8,
            feed_forward_proj="relu",
            pad_token_id=0,
            eos_token_id=1,
            decoder_start_token_id=0,
        )
    )


def _sd3_parts() -> dict[str, torch.nn.Module]:
    return {
        "transformer": _sd3_transformer(),
        "vae": _sd3_vae(),
        "text_encoder": CLIPTextModelWithProjection(_text_config(projection_dim=_TEXT_HIDDEN)),
        "text_encoder_2": CLIPTextModelWithProjection(_text_config(projection_dim=_TEXT_HIDDEN)),
        "text_encoder_3": _t5(),
    }


# ---- Flux.1: double- and single-stream transformer, packed 16-channel latents, CLIP-L pooled + T5 sequence ------
def _flux_vae() -> AutoencoderKL:
    # Flux's VAE: 16 latent channels, no quant convs, latents = (z − 0.1159) · 0.3611 (the real values).
    return _vae(
        16, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False
    )


def _flux_transformer(guidance: bool) -> FluxTransformer2DModel:
    # Flux packs 2×2 latent patches into one token of 16 × 4 = 64 channels: an 8×8 latent is 16 image tokens.
    # 2 double-stream blocks then 2 single-stream blocks of 4 heads × 8 = 32 channels; RoPE over (id, row, col)
    # axes of 2 + 2 + 4 = 8 = the head dim (the real model: 16 + 56 + 56 = 128).
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=_T5_WIDTH,  # the T5 sequence's width
        pooled_projection_dim=_TEXT_HIDDEN,  # CLIP-L's pooled output
        guidance_embeds=guidance,  # dev: True; schnell: False
        axes_dims_rope=(2, 2, 4),
    )


def _flux_scheduler(variant: str) -> FlowMatchEulerDiscreteScheduler:
    if variant == "dev":  # FLUX.1-dev's scheduler config: the shift follows the image's token count
        return FlowMatchEulerDiscreteScheduler(
            shift=3.0,
            use_dynamic_shifting=True,
            base_shift=0.5,
            max_shift=1.15,
            base_image_seq_len=256,
            max_image_seq_len=4096,
        )
    return FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False)  # FLUX.1-schnell's


def _flux_parts(variant: str) -> dict[str, torch.nn.Module]:
    return {
        "transformer": _flux_transformer(guidance=variant == "dev"),
        "vae": _flux_vae(),
        "text_encoder": CLIPTextModel(_text_config()),  # Flux reads its pooler_output
        "text_encoder_2": _t5(),
    }


def _tiny_flux(variant: str) -> Any:
    state = _state(f"flux-{variant}")
    parts = _flux_parts(variant)
    for key, module in parts.items():
        module.load_state_dict(state[key])
        module.eval()
    pipe = FluxPipeline(
        scheduler=_flux_scheduler(variant),
        vae=parts["vae"],
        text_encoder=parts["text_encoder"],
        tokenizer=_tokenizer("<|endoftext|>"),
        text_encoder_2=parts["text_encoder_2"],
        tokenizer_2=t5_tokenizer(),
        transformer=parts["transformer"],
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ---- Flux.2 [klein]: Qwen3 text encoder, 32-channel VAE with batch-norm statistics, 128-channel packed tokens -----
#: Qwen's special tokens (a subset of Qwen3's added tokens, same strings): padding, the chat turn markers, and the
#: (empty) thinking block Flux.2 [klein]'s prompt template closes.
QWEN_SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>")
# Qwen2's pre-tokenizer split (as in Qwen2/Qwen3's tokenizer.json), followed by GPT-2's byte-level alphabet
_QWEN_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
# Qwen3's chat template, reduced to what Flux2KleinPipeline renders: one user turn, the assistant header and, with
# enable_thinking=False, an empty thinking block (the same text as Qwen3's own template gives for that call).
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)
# The BPE vocabulary, written out: GPT-2's 256 byte symbols, then the merges, then the special tokens. Each piece
# below is built by a chain of merges, left to right; the chains of Ġ-started pieces (a word after a space) rank
# first, so that a word is its longest Ġ-piece followed by the pieces of the rest ("Ġcir", "cle"), never cut by a
# merge of another word's ending. Frequent words are one token ("Ġred"); a few are two pieces, so word merging of
# Ġ-started pieces is exercised. Any text still encodes (byte by byte where no merge applies).
_QWEN_WORDS = (
    "a an the of on in at with and to is photo picture image big small red blue green white black yellow cat dog "
    "sky sea tree house car man woman city night day top left right bottom middle"
).split()
_QWEN_SPLIT_WORDS = {"circle": ("cir", "cle"), "square": ("squ", "are"), "background": ("back", "ground")}
_QWEN_BARE = ("user", "assistant")  # the chat template's role names (they follow a newline: no Ġ)
_QWEN_HIDDEN = 16
_QWEN_LAYERS = 27  # Flux2KleinPipeline stacks the hidden states of layers 9, 18 and 27 (3 × 16 = 48 features)


@lru_cache(maxsize=1)
def _qwen_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    from tokenizers import pre_tokenizers

    symbols = sorted(pre_tokenizers.ByteLevel.alphabet())  # the 256 byte-level symbols ("Ġ" is the space)
    spaced = ["Ġ" + w for w in _QWEN_WORDS] + ["Ġ" + first for first, _ in _QWEN_SPLIT_WORDS.values()]
    bare = list(_QWEN_BARE) + [p for pair in _QWEN_SPLIT_WORDS.values() for p in pair]
    merges: list[tuple[str, str]] = []
    for piece in spaced + bare:
        for i in range(2, len(piece) + 1):
            pair = (piece[: i - 1], piece[i - 1])
            if pair not in merges:
                merges.append(pair)
    tokens = symbols + ["".join(m) for m in merges] + list(QWEN_SPECIAL)
    vocab: dict[str, int] = {}
    for t in tokens:
        vocab.setdefault(t, len(vocab))
    return vocab, merges


def qwen_tokenizer(max_length: int = 512) -> Qwen2TokenizerFast:
    """A small Qwen tokenizer built offline: a byte-level BPE ``tokenizers`` model (Qwen2's split pattern, GPT-2's
    byte alphabet, so any text encodes) over a few hundred pieces written in code, with Qwen's special tokens
    (``<|endoftext|>`` pads, ``<|im_start|>``, ``<|im_end|>``, ``<think>``, ``</think>``) and Qwen3's chat template
    for one user turn, wrapped as ``Qwen2TokenizerFast`` (what ``Flux2KleinPipeline`` expects).

    Not Qwen's 151k vocabulary: ids differ from a real Qwen3, but words split into ``Ġ``-started pieces the same
    way ("circle" → "Ġc", "ir", "cle"), and the chat-templated text is the one the real template renders.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    vocab, merges = _qwen_vocab_and_merges()
    backend = Tokenizer(models.BPE(vocab=dict(vocab), merges=list(merges)))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_QWEN_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(list(QWEN_SPECIAL))
    tok = Qwen2TokenizerFast(
        tokenizer_object=backend,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        chat_template=QWEN_CHAT_TEMPLATE,
    )
    tok.model_max_length = max_length
    return tok


def _qwen3(layers: int = _QWEN_LAYERS) -> Qwen3ForCausalLM:
    return Qwen3ForCausalLM(
        Qwen3Config(
            vocab_size=len(_qwen_vocab_and_merges()[0]),
            hidden_size=_QWEN_HIDDEN,
            intermediate_size=24,
            num_hidden_layers=layers,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=8,
            max_position_embeddings=512,
            tie_word_embeddings=True,
            pad_token_id=_qwen_vocab_and_merges()[0]["<|endoftext|>"],
        )
    )


def _flux2_transformer() -> Flux2Transformer2DModel:
    # 2 double-stream and 2 single-stream blocks of 4 heads × 8 = 32 channels; tokens of 32 × 2 × 2 = 128
    # channels; RoPE over (t, row, column, text position) axes of 2 + 2 + 2 + 2 = 8 = the head dim (the real
    # models: 32 each); no guidance input (Klein is not guidance-distilled)
    return Flux2Transformer2DModel(
        patch_size=1,
        in_channels=128,
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=3 * _QWEN_HIDDEN,  # three Qwen3 layers stacked along the features
        timestep_guidance_channels=32,
        mlp_ratio=2.0,
        axes_dims_rope=(2, 2, 2, 2),
        guidance_embeds=False,
    )


def _flux2_vae() -> AutoencoderKLFlux2:
    # 32 latent channels, 8× downsampling like the real one: 64×64 pixels ↔ 8×8×32 latents ↔ 4×4 tokens of 128
    return AutoencoderKLFlux2(
        block_out_channels=(8, 8, 16, 16),
        latent_channels=32,
        norm_num_groups=8,
        layers_per_block=1,
        sample_size=64,
    )


def _flux2_parts() -> dict[str, torch.nn.Module]:
    vae = _flux2_vae()
    # batch-norm statistics of the 128 patchified channels, non-trivial so that normalising is visible
    vae.bn.running_mean.copy_(0.5 * torch.randn(128))
    vae.bn.running_var.copy_(torch.rand(128) + 0.5)
    return {"transformer": _flux2_transformer(), "vae": vae, "text_encoder": _qwen3()}


def _flux2_scheduler() -> FlowMatchEulerDiscreteScheduler:
    # FLUX.2's scheduler config; the pipeline passes its own resolution- and step-dependent mu
    return FlowMatchEulerDiscreteScheduler(
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
        time_shift_type="exponential",
    )


def _tiny_flux2() -> Any:
    state = _state("flux2")
    parts = _flux2_parts()
    for key, module in parts.items():
        module.load_state_dict(state[key])
        module.eval()
    pipe = Flux2KleinPipeline(
        scheduler=_flux2_scheduler(),
        vae=parts["vae"],
        text_encoder=parts["text_encoder"],
        tokenizer=qwen_tokenizer(),
        transformer=parts["transformer"],
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ---- PixArt-Σ: a DiT with cross-attention (attn2) to T5, ε and a learned variance, SDXL's 4-channel VAE -----------
def _pixart_parts() -> dict[str, torch.nn.Module]:
    # 2×2 patches, 2 blocks of 4 heads × 8 (self-attention, then cross-attention to the T5 sequence projected from
    # its width 64 to 32); 8 output channels: ε and the learned variance, as the real model
    transformer = PixArtTransformer2DModel(
        sample_size=8,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        in_channels=4,
        out_channels=8,
        patch_size=2,
        cross_attention_dim=32,
        caption_channels=_T5_WIDTH,
        norm_type="ada_norm_single",
        use_additional_conditions=False,
    )
    return {"transformer": transformer, "vae": _vae(scaling_factor=0.13025), "text_encoder": _t5()}


def _tiny_pixart_sigma() -> Any:
    state = _state("pixart-sigma")
    parts = _pixart_parts()
    for key, module in parts.items():
        module.load_state_dict(state[key])
        module.eval()
    # PixArt's training schedule (linear betas 1e-4 → 0.02, ε); DDIM so that x0 is the scheduler's own
    scheduler = DDIMScheduler(
        beta_start=0.0001, beta_end=0.02, beta_schedule="linear", clip_sample=False, set_alpha_to_one=False
    )
    pipe = PixArtSigmaPipeline(tokenizer=t5_tokenizer(), scheduler=scheduler, **parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ---- Chroma: Flux.1's transformer without CLIP (T5 alone, a timestep approximator), Flux's VAE and packing ------
def _chroma_parts() -> dict[str, torch.nn.Module]:
    # Flux's fixture shape (2 double- and 2 single-stream blocks, 4 heads × 8, RoPE axes 2 + 2 + 4) and a one-layer
    # approximator of width 32 in place of the pooled-vector and guidance embeddings
    transformer = ChromaTransformer2DModel(
        patch_size=1,
        in_channels=64,
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=_T5_WIDTH,
        axes_dims_rope=(2, 2, 4),
        approximator_num_channels=8,
        approximator_hidden_dim=32,
        approximator_layers=1,
    )
    return {"transformer": transformer, "vae": _flux_vae(), "text_encoder": _t5()}


def _tiny_chroma() -> Any:
    state = _state("chroma")
    parts = _chroma_parts()
    for key, module in parts.items():
        module.load_state_dict(state[key])
        module.eval()
    # Chroma's scheduler is Flux.1-dev's (dynamic shifting by the token count)
    pipe = ChromaPipeline(scheduler=_flux_scheduler("dev"), tokenizer=t5_tokenizer(), **parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ---- Sana: linear-attention DiT, cross-attention to Gemma-2, a 32-channel DC-AE, flow DPM-Solver -----------------
_GEMMA_SPECIAL = ("<pad>", "<eos>", "<bos>", "<unk>", "<mask>")  # Gemma's ids 0..4
_GEMMA_WORDS = (
    "a an the of on in at with and to is big small red blue green white black yellow sky sea tree house left "
    "right circle square background prompt start"
).split()


@lru_cache(maxsize=1)
def _gemma_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    import string

    pieces = list(_GEMMA_SPECIAL) + [f"<0x{b:02X}>" for b in range(256)]  # byte fallback: any text encodes
    pieces += sorted(set(string.ascii_letters + string.digits + string.punctuation)) + ["▁"]
    merges: list[tuple[str, str]] = []
    for word in _GEMMA_WORDS:  # "▁red" by a chain of merges; "a" at the start of a text has no ▁, as in Gemma
        piece = "▁" + word
        for i in range(2, len(piece) + 1):
            if (pair := (piece[: i - 1], piece[i - 1])) not in merges:
                merges.append(pair)
    vocab: dict[str, int] = {}
    for t in pieces + ["".join(m) for m in merges]:
        vocab.setdefault(t, len(vocab))
    return vocab, merges


def gemma_tokenizer(max_length: int = 300) -> GemmaTokenizerFast:
    """A small Gemma tokenizer built offline: a ``▁``-word BPE with byte fallback over a few hundred pieces written
    in code, Gemma's special tokens (``<pad>`` 0, ``<eos>`` 1, ``<bos>`` 2, added in front), wrapped as
    ``GemmaTokenizerFast`` (what ``SanaPipeline`` expects). Not Gemma's 256k vocabulary: the ids differ."""
    vocab, merges = _gemma_vocab_and_merges()
    tok = GemmaTokenizerFast(vocab=dict(vocab), merges=list(merges), add_bos_token=True)
    tok.model_max_length = max_length
    return tok


def _sana_parts() -> dict[str, torch.nn.Module]:
    # 2 blocks of 4 heads × 8, cross-attention to the 16-wide Gemma states; a 4-stage DC-AE (8×, 32 channels: 64
    # pixels ↔ 8×8 latents; the real one has 6 stages, 32×)
    transformer = SanaTransformer2DModel(
        in_channels=32,
        out_channels=32,
        num_attention_heads=4,
        attention_head_dim=8,
        num_layers=2,
        num_cross_attention_heads=4,
        cross_attention_head_dim=8,
        cross_attention_dim=32,
        caption_channels=16,
        sample_size=8,
        patch_size=1,
    )
    blocks = (8, 16, 32, 32)  # the last a multiple of the latent channels (the DC-AE's shortcut repeats them)
    vae = AutoencoderDC(
        latent_channels=32,
        attention_head_dim=8,
        encoder_block_types=("ResBlock",) * 4,
        decoder_block_types=("ResBlock",) * 4,
        encoder_block_out_channels=blocks,
        decoder_block_out_channels=blocks,
        encoder_layers_per_block=(1,) * 4,
        decoder_layers_per_block=(1,) * 4,
        encoder_qkv_multiscales=((),) * 4,
        decoder_qkv_multiscales=((),) * 4,
        scaling_factor=0.41407,  # Sana's DC-AE
    )
    gemma = Gemma2Model(
        Gemma2Config(
            vocab_size=len(gemma_tokenizer()),
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=8,
            pad_token_id=0,
            eos_token_id=1,
            bos_token_id=2,
        )
    )
    return {"transformer": transformer, "vae": vae, "text_encoder": gemma}


def _tiny_sana() -> Any:
    state = _state("sana")
    parts = _sana_parts()
    for key, module in parts.items():
        module.load_state_dict(state[key])
        module.eval()
    # Sana's scheduler: flow DPM-Solver++ with shift 3
    scheduler = DPMSolverMultistepScheduler(
        flow_shift=3.0, prediction_type="flow_prediction", use_flow_sigmas=True
    )
    pipe = SanaPipeline(tokenizer=gemma_tokenizer(), scheduler=scheduler, **parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ---- Z-Image: one single-stream DiT over [image ‖ caption] tokens, Qwen3's second-to-last hidden states ---------
def _zimage_parts() -> dict[str, torch.nn.Module]:
    # 2 main layers and 1 refiner layer each (image, caption) of 4 heads × 8 = 32 channels, 2×2 patches (an 8×8 latent
    # is 16 image tokens, padded to 32 as the model pads every part); RoPE axes 2 + 2 + 4 = the head dim; a 2-layer
    # Qwen3 (the pipeline reads hidden_states[-2]); Flux.1's 16-channel VAE and factors, as Z-Image uses
    transformer = ZImageTransformer2DModel(
        in_channels=16,
        dim=32,
        n_layers=2,
        n_refiner_layers=1,
        n_heads=4,
        n_kv_heads=4,
        cap_feat_dim=_QWEN_HIDDEN,
        axes_dims=[2, 2, 4],
        axes_lens=[1024, 64, 64],
    )
    return {"transformer": transformer, "vae": _flux_vae(), "text_encoder": _qwen3(layers=2).model}


def _tiny_zimage() -> Any:
    state = _state("z-image")
    parts = _zimage_parts()
    for key, module in parts.items():
        module.load_state_dict(state[key])
        module.eval()
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)  # Z-Image's (no dynamic shifting)
    pipe = ZImagePipeline(scheduler=scheduler, tokenizer=qwen_tokenizer(), **parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ---- Qwen-Image: an MMDiT (text first) over Qwen2.5-VL's last hidden states, a 3-D causal VAE, true CFG ---------
def _qwen_image_parts() -> dict[str, torch.nn.Module]:
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    vocab = _qwen_vocab_and_merges()[0]
    # the smallest Qwen2.5-VL the pipeline's text-only path takes: one text layer of width 16 (2 heads × 8, M-RoPE
    # sections 1 + 1 + 2 = half the head dim) and a one-block vision tower it never calls
    text_encoder = Qwen2_5_VLForConditionalGeneration(
        Qwen2_5_VLConfig(
            text_config=dict(
                vocab_size=len(vocab),
                hidden_size=_QWEN_HIDDEN,
                intermediate_size=24,
                num_hidden_layers=1,
                num_attention_heads=2,
                num_key_value_heads=1,
                rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]},
                bos_token_id=None,
                eos_token_id=vocab["<|im_end|>"],
                pad_token_id=vocab["<|endoftext|>"],
            ),
            vision_config=dict(
                depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=16
            ),
        )
    )
    # 2 blocks of 4 heads × 8, 2×2 packed tokens of 16 × 4 = 64 channels, RoPE axes 2 + 2 + 4; a 3-stage 3-D VAE
    # (8×, 16 channels, Qwen-Image's latent statistics: the config's defaults)
    transformer = QwenImageTransformer2DModel(
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=_QWEN_HIDDEN,
        axes_dims_rope=(2, 2, 4),
    )
    vae = AutoencoderKLQwenImage(base_dim=8, dim_mult=[1, 2, 2, 2], num_res_blocks=1)
    return {"transformer": transformer, "vae": vae, "text_encoder": text_encoder}


def _tiny_qwen_image() -> Any:
    state = _state("qwen-image")
    parts = _qwen_image_parts()
    for key, module in parts.items():
        module.load_state_dict(state[key])
        module.eval()
    scheduler = FlowMatchEulerDiscreteScheduler(  # Qwen-Image's: dynamic exponential shift by the token count
        base_image_seq_len=256,
        base_shift=0.5,
        max_image_seq_len=8192,
        max_shift=0.9,
        shift_terminal=0.02,
        time_shift_type="exponential",
        use_dynamic_shifting=True,
    )
    pipe = QwenImagePipeline(scheduler=scheduler, tokenizer=qwen_tokenizer(), **parts)
    # The pipeline drops the system prompt's tokens by count (34 of the real Qwen tokenizer); the small vocabulary
    # splits that text into more pieces, so the count is this tokenizer's own
    prefix = pipe.prompt_template_encode.split("{}")[0]
    pipe.prompt_template_encode_start_idx = len(pipe.tokenizer(prefix).input_ids)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ---- Wan 2.x: text-to-video DiT (space-time patches, cross-attention to UMT5), a causal 3D video VAE -------------
def _wan_parts() -> dict[str, torch.nn.Module]:
    # 2 blocks of 4 heads × 12 (RoPE: 4 dims each for frame, row and column), (1, 2, 2) patches: 5 frames of 64² →
    # 2 latent frames of 8 × 8 → 2 × 4 × 4 = 32 image tokens; a 4-level VAE (8× in space, 4× in time, 16 channels)
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=4,
        attention_head_dim=12,
        in_channels=16,
        out_channels=16,
        text_dim=_T5_WIDTH,
        freq_dim=32,
        ffn_dim=32,
        num_layers=2,
        rope_max_seq_len=32,
    )
    vae = AutoencoderKLWan(
        base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
    )
    umt5 = UMT5EncoderModel(
        UMT5Config(
            vocab_size=len(t5_tokenizer()),
            d_model=_T5_WIDTH,
            d_kv=8,
            d_ff=37,
            num_layers=1,
            num_heads=2,
            relative_attention_num_buckets=8,
            feed_forward_proj="gelu",
            pad_token_id=0,
            eos_token_id=1,
            decoder_start_token_id=0,
        )
    )
    return {"transformer": transformer, "vae": vae, "text_encoder": umt5}


def _tiny_wan() -> Any:
    state = _state("wan")
    parts = _wan_parts()
    for key, module in parts.items():
        module.load_state_dict(state[key])
        module.eval()
    # Wan 2.1 T2V's scheduler: UniPC on flow sigmas, shift 3
    scheduler = UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0
    )
    pipe = WanPipeline(tokenizer=t5_tokenizer(), scheduler=scheduler, **parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@lru_cache(maxsize=10)
def _state(family: str) -> dict[str, dict[str, torch.Tensor]]:
    """Random weights of each component, drawn once with a fixed seed (so every fixture is identical)."""
    torch.manual_seed(0)
    if family == "wan":
        parts = _wan_parts()
    elif family == "sana":
        parts = _sana_parts()
    elif family == "z-image":
        parts = _zimage_parts()
    elif family == "qwen-image":
        parts = _qwen_image_parts()
    elif family == "chroma":
        parts = _chroma_parts()
    elif family == "pixart-sigma":
        parts = _pixart_parts()
    elif family == "flux2":
        parts = _flux2_parts()
    elif family.startswith("flux-"):
        parts = _flux_parts(family.removeprefix("flux-"))
    elif family == "sd3":
        parts = _sd3_parts()
    else:
        parts = {"unet": _unet(family), "vae": _vae()}
        parts["text_encoder"] = CLIPTextModel(_text_config())
        if family == "sdxl":
            parts["text_encoder_2"] = CLIPTextModelWithProjection(_text_config(projection_dim=_TEXT_HIDDEN))
    return {k: {n: t.clone() for n, t in m.state_dict().items()} for k, m in parts.items()}


def _tiny_sd3(t5: bool) -> Any:
    state = _state("sd3")
    parts = _sd3_parts() if t5 else {k: m for k, m in _sd3_parts().items() if k != "text_encoder_3"}
    for key, module in parts.items():
        module.load_state_dict(state[key])
        module.eval()
    pipe = StableDiffusion3Pipeline(
        transformer=parts["transformer"],
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),  # SD3's scheduler and shift
        vae=parts["vae"],
        text_encoder=parts["text_encoder"],
        tokenizer=_tokenizer("<|endoftext|>"),  # CLIP-L pads with its end token, CLIP-G with "!" (as SD3's)
        text_encoder_2=parts["text_encoder_2"],
        tokenizer_2=_tokenizer("!"),
        text_encoder_3=parts.get("text_encoder_3"),
        tokenizer_3=t5_tokenizer() if t5 else None,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_pipeline(
    family: FixtureFamily = "sd1",
    *,
    prediction_type: str | None = None,
    t5: bool = True,
    variant: str | None = None,
) -> Any:
    """Build a fresh tiny random-weight pipeline of ``family`` ("sd1", "sd2", "sdxl", "sd3", "flux" or "flux2").

    Every call returns a new, independent pipeline with the same weights (fp32, CPU). The UNet families use
    DDIM: ``sd2`` defaults to v-prediction like SD 2.x 768 models; the others to epsilon. ``sd3`` is a
    ``StableDiffusion3Pipeline`` (MMDiT transformer, 16-channel VAE with SD3's scaling and shift factors,
    CLIP-L + CLIP-G + T5 with an offline T5 tokenizer, ``FlowMatchEulerDiscreteScheduler`` with shift 3);
    ``t5=False`` builds it with ``text_encoder_3=None, tokenizer_3=None`` (SD3 then uses zeros in T5's place).
    ``flux`` is a ``FluxPipeline`` (2 double-stream and 2 single-stream blocks, 2×2-packed 16-channel latents,
    a 16-channel VAE with Flux's scaling and shift factors, CLIP-L pooled + T5 with the offline T5 tokenizer);
    ``variant="dev"`` (the default) is guidance-distilled with dynamic shifting, ``variant="schnell"`` has no
    guidance input and a fixed shift. Pass ``height=64, width=64`` to a call (Flux's default is 1024²).
    ``flux2`` is a ``Flux2KleinPipeline`` (a 27-layer Qwen3 of width 16 with the offline :func:`qwen_tokenizer`,
    2 double- and 2 single-stream blocks, a 32-channel ``AutoencoderKLFlux2`` with batch-norm statistics, tokens of
    2×2 patches × 32 = 128 channels, CFG as two transformer calls at ``guidance_scale`` > 1); call it with
    ``prompt=`` (its first argument is ``image``). 64×64 pixels → 8×8 latents.
    ``pixart-sigma`` is a ``PixArtSigmaPipeline`` (2 DiT blocks with cross-attention to T5 through the offline T5
    tokenizer, ε and a learned variance, SDXL's VAE scaling, DDIM on PixArt's linear schedule); call it with
    ``use_resolution_binning=False`` (its aspect-ratio table starts at 256 pixels; ``Family.call_defaults``).
    ``chroma`` is a ``ChromaPipeline`` (Flux.1's fixture transformer without CLIP: T5 alone through the offline T5
    tokenizer, a timestep approximator, CFG as two transformer calls at ``guidance_scale`` > 1, Flux's VAE and
    2×2 packing); pass ``height=64, width=64``.
    ``sana`` is a ``SanaPipeline`` (2 blocks of linear self-attention and softmax cross-attention to a one-layer
    Gemma-2 through the offline :func:`gemma_tokenizer`, a 32-channel DC-AE of 8× here, flow DPM-Solver++ with shift
    3); call it with ``use_resolution_binning=False``.
    ``wan`` is a ``WanPipeline`` (text-to-video: 2 blocks of space-time self-attention and cross-attention to a
    one-layer UMT5 through the offline T5 tokenizer, (1, 2, 2) patches, a 16-channel causal video VAE of 8× in space
    and 4× in time, UniPC on flow sigmas with shift 3); call it with ``num_frames=5`` (2 latent frames; :func:`fixture_call_defaults`) and
    ``height=64, width=64``; its output is ``.frames`` (B, frames, H, W, 3).
    ``z-image`` is a ``ZImagePipeline`` (a single-stream DiT of 2 layers over the image tokens then the caption's,
    a 2-layer Qwen3 through the offline :func:`qwen_tokenizer`, Flux's VAE; CFG in one batch, prompt rows first).
    ``qwen-image`` is a ``QwenImagePipeline`` (2 MMDiT blocks, text first, over a one-layer Qwen2.5-VL's text path,
    a 16-channel 3-D causal VAE, 2×2 packed tokens; true CFG as two calls with a negative prompt). Pass
    ``height=64, width=64`` to both.
    """
    known = ALL_FIXTURE_FAMILIES
    if family not in known:
        raise ValueError(f"Unknown fixture family {family!r}; choose one of {known}.")
    if variant is not None and (family != "flux" or variant not in FLUX_VARIANTS):
        raise ValueError(
            f"variant= applies to the flux fixture only, one of {FLUX_VARIANTS}; got {variant!r}."
        )
    if family in MMDIT_FIXTURE_FAMILIES + ("flux2",) and prediction_type is not None:
        raise ValueError(f"The {family} fixture is a flow-matching model: it takes no prediction_type.")
    if family in ("z-image", "qwen-image"):
        if not t5 or prediction_type is not None:
            raise ValueError(
                f"The {family} fixture is fixed: a Qwen text encoder and flow matching; pass no t5= or "
                "prediction_type."
            )
        return _tiny_zimage() if family == "z-image" else _tiny_qwen_image()
    if family == "wan":
        if not t5 or prediction_type is not None:
            raise ValueError(
                "The wan fixture is fixed: UMT5 and flow matching; pass no t5= or prediction_type."
            )
        return _tiny_wan()
    if family == "sana":
        if not t5 or prediction_type is not None:
            raise ValueError(
                "The sana fixture is fixed: Gemma-2 and flow matching; pass no t5= or prediction_type."
            )
        return _tiny_sana()
    if family == "chroma":
        if not t5 or prediction_type is not None:
            raise ValueError(
                "The chroma fixture is fixed: T5 and flow matching; pass no t5= or prediction_type."
            )
        return _tiny_chroma()
    if family == "pixart-sigma":
        if not t5 or prediction_type is not None:
            raise ValueError(
                "The pixart-sigma fixture is fixed: T5 and ε-prediction; pass no t5= or prediction_type."
            )
        return _tiny_pixart_sigma()
    if family == "flux2":
        if not t5:
            raise ValueError("Flux.2 [klein] has no T5 encoder: t5=False applies to the sd3 fixture only.")
        return _tiny_flux2()
    if family == "flux":
        if not t5:
            raise ValueError("Flux needs its T5 encoder: t5=False applies to the sd3 fixture only.")
        return _tiny_flux(variant or "dev")
    if family == "sd3":
        return _tiny_sd3(t5)
    if not t5:
        raise ValueError(f"t5=False applies to the sd3 fixture only; {family!r} has no T5 encoder.")
    pred = prediction_type or ("v_prediction" if family == "sd2" else "epsilon")
    state = _state(family)
    unet = _unet(family)
    vae = _vae()
    te = CLIPTextModel(_text_config())
    for module, key in ((unet, "unet"), (vae, "vae"), (te, "text_encoder")):
        module.load_state_dict(state[key])
        module.eval()
    if family == "sdxl":
        te2 = CLIPTextModelWithProjection(_text_config(projection_dim=_TEXT_HIDDEN))
        te2.load_state_dict(state["text_encoder_2"])
        te2.eval()
        pipe = StableDiffusionXLPipeline(
            vae=vae,
            text_encoder=te,
            text_encoder_2=te2,
            tokenizer=_tokenizer("<|endoftext|>"),
            tokenizer_2=_tokenizer("!"),
            unet=unet,
            scheduler=_scheduler(pred),
            add_watermarker=False,
        )
    else:
        pipe = StableDiffusionPipeline(
            vae=vae,
            text_encoder=te,
            tokenizer=_tokenizer("!" if family == "sd2" else "<|endoftext|>"),
            unet=unet,
            scheduler=_scheduler(pred),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sd15_shaped_pipeline(device: str = "cuda", dtype: torch.dtype = torch.float16) -> Any:
    """A pipeline with Stable Diffusion 1.5's exact architecture and random weights (about 1.07 B parameters).

    Same compute and memory as the real checkpoint, so speed and memory benchmarks are honest without
    downloading weights. Configs follow SD 1.5's published ``config.json`` files; PNDM is replaced by DDIM.
    Weights are initialised directly on ``device`` (seconds on a GPU instead of a minute on the CPU).
    """
    with torch.device(device):
        return _sd15_shaped(device, dtype)


def _sd15_shaped(device: str, dtype: torch.dtype) -> Any:
    unet = UNet2DConditionModel(
        sample_size=64,
        in_channels=4,
        out_channels=4,
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=768,
        attention_head_dim=8,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        layers_per_block=2,
        sample_size=512,
        scaling_factor=0.18215,
    )
    te = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408,
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            max_position_embeddings=77,
            hidden_act="quick_gelu",
            bos_token_id=49406,
            eos_token_id=49407,
        )
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=te,
        tokenizer=_tokenizer("<|endoftext|>"),
        unet=unet,
        scheduler=_scheduler("epsilon"),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device=device, dtype=dtype)
