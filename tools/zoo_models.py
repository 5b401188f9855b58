"""The model zoo's architectures (tools/zoo.py measures them): transformers' vision, text and decoder
models at tiny configs with random init (no weights downloaded), and a few plain nn.Modules (bi-LSTM /
bi-GRU text classifiers, an M5-style audio CNN, a conv autoencoder). `build(name)` gives one in eval
mode, its BatchNorm statistics set from a few random batches (else a random-init CNN's activations
shrink layer by layer to ~1e-25).
"""
from __future__ import annotations

import contextlib
import io
import warnings
from dataclasses import dataclass

import numpy as np

VOCAB = 128


@dataclass
class ZooModel:
    """A torch module taking plain tensors, its inputs by name, and how to draw them."""
    name: str
    module: object
    inputs: dict  # name -> (kind, shape without the batch axis, high): "float" | "int" | "mask"
    family: str = ""

    def draw(self, n: int, seed: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(seed)
        out = {}
        for k, (kind, shape, high) in self.inputs.items():
            if kind == "float":
                out[k] = rng.standard_normal((n,) + tuple(shape)).astype(np.float32)
            elif kind == "int":
                out[k] = rng.integers(0, high, (n,) + tuple(shape)).astype(np.int64)
            else:  # attention mask: every row keeps at least half its positions, the rest padded
                L = shape[0]
                keep = rng.integers(L // 2, L + 1, n)
                out[k] = (np.arange(L)[None, :] < keep[:, None]).astype(np.int64)
        return out


# ------------------------------------------------------------------------------------------- wrappers
def _wrappers():
    """Modules with a plain-tensor forward signature (TorchScript and ONNX take their input names
    from it) returning one tensor: the ModelOutput field `key` of the wrapped model."""
    import torch

    class Wrapper(torch.nn.Module):
        def __init__(self, m, key):
            super().__init__()
            self.m, self.key = m, key

    class Pixels(Wrapper):
        def forward(self, pixel_values):
            return self.m(pixel_values=pixel_values)[self.key]

    class Tokens(Wrapper):
        def forward(self, input_ids):
            return self.m(input_ids=input_ids, use_cache=False)[self.key]

    class TokensMask(Wrapper):
        def forward(self, input_ids, attention_mask):
            return self.m(input_ids=input_ids, attention_mask=attention_mask)[self.key]

    class Features(Wrapper):
        def forward(self, input_features):
            return self.m(input_features=input_features)[self.key]

    return Pixels, Tokens, TokensMask, Features


def _recalibrate_batchnorm(module, draw, batches: int = 4) -> None:
    """BatchNorm with PyTorch's own init (scale 1, shift 0; some transformers inits draw the scale
    around 0) and running statistics from random batches (cumulative average), then eval mode."""
    import torch

    bns = [m for m in module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return
    for m in bns:
        m.reset_parameters()
        m.momentum = None
    module.train()
    with torch.no_grad():
        for s in range(batches):
            module(*[torch.from_numpy(a) for a in draw(8, 1000 + s).values()])
    module.eval()


# ------------------------------------------------------------------------------------------- models
def _vision(name, model_cls, cfg, key="logits", size=32, channels=3):
    Pixels = _wrappers()[0]
    return ZooModel(name, Pixels(model_cls(cfg), key), {"pixel_values": ("float", (channels, size, size), 0)}, "vision")


def _text(name, model_cls, cfg, key="last_hidden_state", mask=True, seq=16):
    _, Tokens, TokensMask, _ = _wrappers()
    inputs = {"input_ids": ("int", (seq,), VOCAB)}
    if mask:
        inputs["attention_mask"] = ("mask", (seq,), 2)
        return ZooModel(name, TokensMask(model_cls(cfg), key), inputs, "text")
    return ZooModel(name, Tokens(model_cls(cfg), key), inputs, "decoder")


def m_resnet():
    import transformers as t
    return _vision("resnet", t.ResNetForImageClassification, t.ResNetConfig(
        embedding_size=16, hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1], layer_type="basic", num_labels=10))


def m_mobilenet_v1():
    import transformers as t
    return _vision("mobilenet_v1", t.MobileNetV1ForImageClassification, t.MobileNetV1Config(
        depth_multiplier=0.25, image_size=32, min_depth=8, num_labels=10))


def m_mobilenet_v2():
    import transformers as t
    return _vision("mobilenet_v2", t.MobileNetV2ForImageClassification, t.MobileNetV2Config(
        depth_multiplier=0.35, image_size=32, min_depth=8, num_labels=10))


def m_efficientnet():
    import transformers as t
    return _vision("efficientnet", t.EfficientNetForImageClassification, t.EfficientNetConfig(
        image_size=32, width_coefficient=0.25, depth_coefficient=0.25, hidden_dim=320, num_labels=10))


def m_regnet():
    import transformers as t
    return _vision("regnet", t.RegNetForImageClassification, t.RegNetConfig(
        embedding_size=16, hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 2, 1], groups_width=8, num_labels=10))


def m_convnext():
    import transformers as t
    return _vision("convnext", t.ConvNextForImageClassification, t.ConvNextConfig(
        hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 2, 1], num_labels=10))


def m_vit():
    import transformers as t
    return _vision("vit", t.ViTForImageClassification, t.ViTConfig(
        image_size=32, patch_size=4, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=128, num_labels=10))


def m_swin():
    import transformers as t
    return _vision("swin", t.SwinForImageClassification, t.SwinConfig(
        image_size=32, patch_size=2, embed_dim=32, depths=[2, 2], num_heads=[2, 4], window_size=4, num_labels=10))


def m_mobilevit():
    import transformers as t
    return _vision("mobilevit", t.MobileViTForImageClassification, t.MobileViTConfig(
        image_size=64, hidden_sizes=[32, 48, 64], neck_hidden_sizes=[8, 16, 24, 32, 40, 48, 160],
        num_attention_heads=2, num_labels=10), size=64)


def m_segformer():
    import transformers as t
    return _vision("segformer", t.SegformerForSemanticSegmentation, t.SegformerConfig(
        num_encoder_blocks=2, depths=[1, 1], sr_ratios=[4, 2], hidden_sizes=[16, 32], patch_sizes=[7, 3],
        strides=[4, 2], num_attention_heads=[1, 2], mlp_ratios=[2, 2], decoder_hidden_size=32, num_labels=4), size=64)


def _rnn_classifier(name, rnn_cls):
    import torch

    class RNNClassifier(torch.nn.Module):
        """Embedding → 2-layer bidirectional RNN → mean over time → linear head."""

        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(VOCAB, 32)
            self.rnn = rnn_cls(32, 48, num_layers=2, batch_first=True, bidirectional=True)
            self.head = torch.nn.Linear(96, 4)

        def forward(self, input_ids):
            h, _ = self.rnn(self.emb(input_ids))
            return self.head(h.mean(1))

    return ZooModel(name, RNNClassifier(), {"input_ids": ("int", (24,), VOCAB)}, "rnn")


def m_bilstm():
    import torch
    return _rnn_classifier("bilstm", torch.nn.LSTM)


def m_bigru():
    import torch
    return _rnn_classifier("bigru", torch.nn.GRU)


def m_m5():
    from torch import nn

    class M5(nn.Module):
        """M5 (Dai et al. 2017) raw-waveform classifier: a wide strided first conv, then 3-tap convs."""

        def __init__(self, ch=32, n_out=10):
            super().__init__()
            layers, c_in = [], 1
            for i, (c, k, s) in enumerate([(ch, 80, 16), (ch, 3, 1), (2 * ch, 3, 1), (2 * ch, 3, 1)]):
                layers += [nn.Conv1d(c_in, c, k, stride=s), nn.BatchNorm1d(c), nn.ReLU(), nn.MaxPool1d(4)]
                c_in = c
            self.features = nn.Sequential(*layers)
            self.fc = nn.Linear(2 * ch, n_out)

        def forward(self, waveform):
            h = self.features(waveform)
            return self.fc(h.mean(-1))

    return ZooModel("m5", M5(), {"waveform": ("float", (1, 8000), 0)}, "audio")


def m_conv_autoencoder():
    from torch import nn

    class ConvAutoencoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = nn.Sequential(nn.Conv2d(1, 16, 3, 2, 1), nn.ReLU(), nn.Conv2d(16, 32, 3, 2, 1), nn.ReLU(),
                                     nn.Conv2d(32, 64, 3, 2, 1), nn.ReLU())
            self.dec = nn.Sequential(nn.ConvTranspose2d(64, 32, 3, 2, 1, output_padding=1), nn.ReLU(),
                                     nn.ConvTranspose2d(32, 16, 3, 2, 1, output_padding=1), nn.ReLU(),
                                     nn.ConvTranspose2d(16, 1, 3, 2, 1, output_padding=1), nn.Sigmoid())

        def forward(self, image):
            return self.dec(self.enc(image))

    return ZooModel("conv_autoencoder", ConvAutoencoder(), {"image": ("float", (1, 32, 32), 0)}, "vision")


_ENC = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
            max_position_embeddings=64, vocab_size=VOCAB)
_DEC = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64)


def m_bert():
    import transformers as t
    return _text("bert", t.BertModel, t.BertConfig(**_ENC))


def m_distilbert():
    import transformers as t
    return _text("distilbert", t.DistilBertModel, t.DistilBertConfig(
        vocab_size=VOCAB, dim=64, n_layers=2, n_heads=4, hidden_dim=128, max_position_embeddings=64))


def m_roberta():
    import transformers as t
    return _text("roberta", t.RobertaModel, t.RobertaConfig(**dict(_ENC, max_position_embeddings=80)))


def m_t5_encoder():
    import transformers as t
    return _text("t5_encoder", t.T5EncoderModel, t.T5Config(
        vocab_size=VOCAB, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4))


def m_whisper_encoder():
    import transformers as t
    Features = _wrappers()[3]
    cfg = t.WhisperConfig(num_mel_bins=16, d_model=64, encoder_layers=2, encoder_attention_heads=4,
                          encoder_ffn_dim=128, decoder_layers=1, decoder_attention_heads=4, decoder_ffn_dim=128,
                          max_source_positions=32, vocab_size=VOCAB, pad_token_id=0, bos_token_id=1,
                          eos_token_id=2, decoder_start_token_id=1)
    enc = t.WhisperModel(cfg).get_encoder()
    return ZooModel("whisper_encoder", Features(enc, "last_hidden_state"),
                    {"input_features": ("float", (16, 64), 0)}, "audio")


def m_gpt2():
    import transformers as t
    return _text("gpt2", t.GPT2LMHeadModel, t.GPT2Config(
        vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64), key="logits", mask=False)


def m_llama():
    import transformers as t
    return _text("llama", t.LlamaForCausalLM, t.LlamaConfig(**_DEC), key="logits", mask=False)


def m_qwen2():
    import transformers as t
    return _text("qwen2", t.Qwen2ForCausalLM, t.Qwen2Config(**_DEC), key="logits", mask=False)


def m_mistral():
    import transformers as t
    return _text("mistral", t.MistralForCausalLM, t.MistralConfig(**_DEC, sliding_window=8), key="logits", mask=False)


def m_gemma3_text():
    import transformers as t
    return _text("gemma3_text", t.Gemma3ForCausalLM, t.Gemma3TextConfig(
        **_DEC, head_dim=16, sliding_window=8, query_pre_attn_scalar=16), key="logits", mask=False)


MODELS = {f.__name__[2:]: f for f in (
    m_resnet, m_mobilenet_v1, m_mobilenet_v2, m_efficientnet, m_regnet, m_convnext, m_vit, m_swin, m_mobilevit,
    m_segformer, m_bilstm, m_bigru, m_m5, m_conv_autoencoder, m_bert, m_distilbert, m_roberta, m_t5_encoder,
    m_whisper_encoder, m_gpt2, m_llama, m_qwen2, m_mistral, m_gemma3_text)}


def build(name: str, seed: int = 0) -> ZooModel:
    """The zoo model `name`, random init from `seed`, in eval mode (BatchNorm statistics set)."""
    import torch

    torch.manual_seed(seed)
    with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        z = MODELS[name]()
    z.module.eval()
    _recalibrate_batchnorm(z.module, z.draw)
    return z


# ------------------------------------------------------------------------------------------- export
