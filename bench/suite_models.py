"""The model list of ``kiln bench suite``: Hugging Face architectures built from their
``transformers`` configs with seeded random weights (nothing is downloaded).

Every model runs at batch 1: text at sequence length 128, images at the config's size,
audio 1 s at 16 kHz (Whisper: 1 s of log-mel frames), time series at the config's context
length. Configs keep the library's defaults except where a default is huge (the decoders
are 7B-parameter models by default: here six layers of width 768) or where the issue's
list names a variant (BEiT with relative position biases, ResNet with basic blocks); the
``quick`` configs are tiny versions of the same architectures for CI (correctness only).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

SEQ = 128
AUDIO_SAMPLES = 16_000


@dataclass(frozen=True)
class SuiteModel:
    name: str
    suite: str  # text, decoder, speech, vision, timeseries
    cls: str  # the transformers class
    config: dict = field(default_factory=dict)  # overrides of the config's defaults (full run)
    quick: dict = field(default_factory=dict)  # overrides for --quick (on top of ``config``)
    # "kaiming": re-draw conv weights with variance-preserving init (seeded), for a model whose
    # library init shrinks activations layer by layer to nothing (MobileNetV1's outputs are
    # ~1e-32 otherwise, which no error bound can check)
    init: str = ""


# a small transformer body for --quick
_TINY_BERT = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                  vocab_size=1000, max_position_embeddings=160)
_DECODER = dict(hidden_size=768, num_hidden_layers=6, num_attention_heads=12, intermediate_size=3072,
                vocab_size=32000, max_position_embeddings=512, pad_token_id=0)
_GQA = dict(_DECODER, num_key_value_heads=4)
_TINY_DECODER = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                     vocab_size=1000, max_position_embeddings=160, pad_token_id=0)
_TINY_GQA = dict(_TINY_DECODER, num_key_value_heads=2)
_TINY_AUDIO = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                   conv_dim=(32, 32, 32, 32, 32, 32, 32), num_conv_pos_embeddings=16,
                   num_conv_pos_embedding_groups=4, classifier_proj_size=32)
_TINY_VIT = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, image_size=64)

MODELS: list[SuiteModel] = [
    # ---- text encoders (sequence classification)
    SuiteModel("bert", "text", "BertForSequenceClassification", {}, _TINY_BERT),
    SuiteModel("xlm-roberta", "text", "XLMRobertaForSequenceClassification", {}, _TINY_BERT),
    SuiteModel("mpnet", "text", "MPNetForSequenceClassification", {}, _TINY_BERT),
    SuiteModel("funnel", "text", "FunnelForSequenceClassification", {},
               dict(d_model=64, n_head=4, d_head=16, d_inner=128, block_sizes=[1, 1], vocab_size=1000)),
    SuiteModel("squeezebert", "text", "SqueezeBertForSequenceClassification", {},
               dict(_TINY_BERT, embedding_size=64)),
    SuiteModel("convbert", "text", "ConvBertForSequenceClassification", {},
               dict(_TINY_BERT, embedding_size=64, conv_kernel_size=5)),
    SuiteModel("ernie", "text", "ErnieForSequenceClassification", {}, _TINY_BERT),
    # the library's defaults (64 landmarks = segment_means_seq_len) take the exact-attention
    # path; its landmark path cannot be exported with transformers 5.24 (under torch.export the
    # padding mask is materialized as [b, 1, q, k], which the landmark scores cannot broadcast)
    SuiteModel("nystromformer", "text", "NystromformerForSequenceClassification", {},
               dict(_TINY_BERT, conv_kernel_size=5)),
    # ---- decoders (sequence classification heads; use_cache as the config defaults)
    SuiteModel("opt", "decoder", "OPTForSequenceClassification",
               dict(hidden_size=768, num_hidden_layers=6, num_attention_heads=12, ffn_dim=3072,
                    word_embed_proj_dim=768, vocab_size=32000, max_position_embeddings=512, pad_token_id=1),
               dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, ffn_dim=128, word_embed_proj_dim=64,
                    vocab_size=1000, max_position_embeddings=160)),
    SuiteModel("gpt-neo", "decoder", "GPTNeoForSequenceClassification",
               dict(hidden_size=768, num_layers=6, num_heads=12, intermediate_size=3072, vocab_size=32000,
                    max_position_embeddings=512, attention_types=[[["global", "local"], 3]], window_size=64,
                    pad_token_id=0),
               dict(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128, vocab_size=1000,
                    attention_types=[[["global", "local"], 1]], window_size=8)),
    SuiteModel("qwen2", "decoder", "Qwen2ForSequenceClassification", _GQA, _TINY_GQA),
    SuiteModel("phi", "decoder", "PhiForSequenceClassification", _DECODER, _TINY_DECODER),
    SuiteModel("mistral", "decoder", "MistralForSequenceClassification", dict(_GQA, sliding_window=64),
               dict(_TINY_GQA, sliding_window=8)),
    # ---- speech (1 s of 16 kHz audio)
    SuiteModel("wav2vec2", "speech", "Wav2Vec2ForSequenceClassification", {}, _TINY_AUDIO),
    SuiteModel("hubert", "speech", "HubertForSequenceClassification", {}, _TINY_AUDIO),
    SuiteModel("whisper-encoder", "speech", "WhisperForAudioClassification",
               dict(max_source_positions=50),  # 100 mel frames: 1 s at Whisper's 10 ms hop
               dict(d_model=64, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=128,
                    decoder_layers=1, decoder_attention_heads=4, decoder_ffn_dim=128, classifier_proj_size=32)),
    # ---- vision (image classification)
    SuiteModel("beit", "vision", "BeitForImageClassification", dict(use_relative_position_bias=True),
               dict(_TINY_VIT, patch_size=16)),
    SuiteModel("dinov2", "vision", "Dinov2ForImageClassification", {}, dict(_TINY_VIT, patch_size=14, image_size=56)),
    SuiteModel("convnextv2", "vision", "ConvNextV2ForImageClassification", {},
               dict(hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1], image_size=64)),
    SuiteModel("poolformer", "vision", "PoolFormerForImageClassification", {},
               dict(hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1], image_size=64)),
    SuiteModel("segformer", "vision", "SegformerForImageClassification", dict(image_size=224),
               dict(hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1], num_attention_heads=[1, 1, 2, 4],
                    image_size=64)),
    SuiteModel("mobilenetv1", "vision", "MobileNetV1ForImageClassification", {},
               dict(depth_multiplier=0.25, image_size=64), init="kaiming"),
    SuiteModel("bit", "vision", "BitForImageClassification", {},
               dict(hidden_sizes=[128, 256, 512, 1024], depths=[1, 1, 1, 1], embedding_size=32, image_size=64)),
    SuiteModel("resnet", "vision", "ResNetForImageClassification",
               dict(layer_type="basic", depths=[2, 2, 2, 2], hidden_sizes=[64, 128, 256, 512]),
               dict(depths=[1, 1, 1, 1], hidden_sizes=[16, 32, 64, 128], embedding_size=16, image_size=64)),
    # ---- time series (forecasting heads)
    SuiteModel("patchtst", "timeseries", "PatchTSTForPrediction",
               dict(num_input_channels=7, context_length=512, patch_length=16, patch_stride=8, prediction_length=96),
               dict(context_length=64, d_model=32, num_hidden_layers=1, ffn_dim=64)),
    SuiteModel("patchtsmixer", "timeseries", "PatchTSMixerForPrediction",
               dict(num_input_channels=7, context_length=512, patch_length=16, patch_stride=8, prediction_length=96),
               dict(context_length=64, d_model=16, num_layers=2)),
]

BY_NAME = {m.name: m for m in MODELS}
SUITES = tuple(dict.fromkeys(m.suite for m in MODELS))


def config_of(m: SuiteModel, quick: bool = False):
    import transformers

    cls = getattr(transformers, m.cls)
    cfg = cls.config_class(**{**m.config, **(m.quick if quick else {})})
    return cls, cfg


def build(name: str, quick: bool = False, seed: int = 0):
    """``(model, example_inputs)`` for one suite model: eval mode, seeded random weights."""
    m = BY_NAME[name]
    cls, cfg = config_of(m, quick)
    torch.manual_seed(seed)
    model = cls(cfg).eval()
    if m.init == "kaiming":
        with torch.no_grad():
            for mod in model.modules():
                if isinstance(mod, torch.nn.Conv2d):
                    torch.nn.init.kaiming_normal_(mod.weight, nonlinearity="relu")
    return model, inputs(name, quick, seed)


def inputs(name: str, quick: bool = False, seed: int = 0) -> tuple:
    """The example inputs ``build(name, quick, seed)`` returns, without building the model
    (the bf16 check's further draws of the same shapes)."""
    m = BY_NAME[name]
    _, cfg = config_of(m, quick)
    return _inputs(m, cfg, quick, torch.Generator().manual_seed(seed + 1))


def _inputs(m: SuiteModel, cfg, quick: bool, gen) -> tuple:
    if m.suite in ("text", "decoder"):
        seq = 32 if quick else SEQ
        # token 0 is the decoders' pad token: keep it out so the last token is the one classified
        return (torch.randint(2, cfg.vocab_size, (1, seq), generator=gen),)
    if m.suite == "speech":
        if m.cls.startswith("Whisper"):
            frames = 2 * cfg.max_source_positions  # the encoder requires exactly this many
            return (torch.randn(1, cfg.num_mel_bins, frames, generator=gen),)
        return (torch.randn(1, 4000 if quick else AUDIO_SAMPLES, generator=gen),)
    if m.suite == "vision":
        size = getattr(cfg, "image_size", 224)
        size = size if isinstance(size, int) else size[0]
        return (torch.randn(1, cfg.num_channels, size, size, generator=gen),)
    if m.suite == "timeseries":
        return (torch.randn(1, cfg.context_length, cfg.num_input_channels, generator=gen),)
    raise ValueError(m.suite)
