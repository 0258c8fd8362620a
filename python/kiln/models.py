"""Built-in example models with random weights (no downloads).

Each factory returns ``(model, example_inputs)`` with the model in eval mode. They cover
the three families Kiln is built for: image classification CNNs (ResNet), time-series
recurrent forecasters (LSTM/GRU) and Transformer text classifiers (BERT).
"""
from __future__ import annotations

import math

import torch
from torch import nn
import torch.nn.functional as F

__all__ = ["resnet18", "resnet50", "bert", "hf_bert", "lstm", "gru", "get", "NAMES"]


# ----------------------------------------------------------------------------- ResNet
class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        idt = x if self.downsample is None else self.downsample(x)
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + idt)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, width: int, stride: int = 1):
        super().__init__()
        cout = width * 4
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        idt = x if self.downsample is None else self.downsample(x)
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return F.relu(y + idt)


class ResNet(nn.Module):
    """The torchvision ResNet architecture, written out so no torchvision is needed."""

    def __init__(self, block, layers: list[int], num_classes: int = 1000):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        cin, stages = 64, []
        for i, n in enumerate(layers):
            width = 64 * 2**i
            blocks = []
            for j in range(n):
                blocks.append(block(cin, width, 2 if (j == 0 and i > 0) else 1))
                cin = width * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _randomize_bn(model: nn.Module, seed: int) -> None:
    # Fresh BatchNorm layers are the identity; give them trained-looking statistics so
    # conv+bn folding and the numerics are exercised for real.
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(n, generator=g) * 0.5 + 0.75)
            m.weight.data.copy_(torch.rand(n, generator=g) * 0.5 + 0.75)
            m.bias.data.copy_(torch.randn(n, generator=g) * 0.1)


def resnet18(batch: int = 1, image: int = 224, num_classes: int = 1000, seed: int = 0):
    torch.manual_seed(seed)
    model = ResNet(BasicBlock, [2, 2, 2, 2], num_classes)
    _randomize_bn(model, seed)
    return model.eval(), (torch.randn(batch, 3, image, image),)


def resnet50(batch: int = 1, image: int = 224, num_classes: int = 1000, seed: int = 0):
    torch.manual_seed(seed)
    model = ResNet(Bottleneck, [3, 4, 6, 3], num_classes)
    _randomize_bn(model, seed)
    return model.eval(), (torch.randn(batch, 3, image, image),)


# ----------------------------------------------------------------------------- BERT
class SelfAttention(nn.Module):
    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.heads, self.head_dim = heads, hidden // heads
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(hidden, hidden)
        self.value = nn.Linear(hidden, hidden)
        self.out = nn.Linear(hidden, hidden)

    def forward(self, x, mask):
        b, s, h = x.shape
        def split(t):
            return t.view(b, s, self.heads, self.head_dim).transpose(1, 2)
        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.head_dim)
        probs = torch.softmax(scores + mask, dim=-1)
        ctx = torch.matmul(probs, v).transpose(1, 2).reshape(b, s, h)
        return self.out(ctx)


class EncoderLayer(nn.Module):
    def __init__(self, hidden: int, heads: int, ffn: int):
        super().__init__()
        self.attn = SelfAttention(hidden, heads)
        self.ln1 = nn.LayerNorm(hidden, eps=1e-12)
        self.fc1 = nn.Linear(hidden, ffn)
        self.fc2 = nn.Linear(ffn, hidden)
        self.ln2 = nn.LayerNorm(hidden, eps=1e-12)

    def forward(self, x, mask):
        x = self.ln1(x + self.attn(x, mask))
        return self.ln2(x + self.fc2(F.gelu(self.fc1(x))))


class BertClassifier(nn.Module):
    """A BERT-base-style encoder classifier in plain PyTorch (post-LN, GELU, [CLS] pooler)."""

    def __init__(self, vocab=30522, hidden=768, layers=12, heads=12, ffn=3072, max_pos=512, num_labels=2):
        super().__init__()
        self.tok = nn.Embedding(vocab, hidden)
        self.pos = nn.Embedding(max_pos, hidden)
        self.typ = nn.Embedding(2, hidden)
        self.ln = nn.LayerNorm(hidden, eps=1e-12)
        self.layers = nn.ModuleList(EncoderLayer(hidden, heads, ffn) for _ in range(layers))
        self.pool = nn.Linear(hidden, hidden)
        self.cls = nn.Linear(hidden, num_labels)

    def forward(self, input_ids, attention_mask):
        s = input_ids.shape[1]
        pos = torch.arange(s, device=input_ids.device).unsqueeze(0)
        x = self.ln(self.tok(input_ids) + self.pos(pos) + self.typ(torch.zeros_like(input_ids)))
        mask = (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * -10000.0
        for layer in self.layers:
            x = layer(x, mask)
        return self.cls(torch.tanh(self.pool(x[:, 0])))


def _bert_inputs(batch: int, seq: int, vocab: int, seed: int):
    g = torch.Generator().manual_seed(seed + 1)
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.int64)
    mask[:, seq - seq // 8:] = 0  # some padding, so the mask path matters
    return ids, mask


def bert(batch: int = 1, seq: int = 128, layers: int = 12, hidden: int = 768, heads: int = 12,
         ffn: int = 3072, vocab: int = 30522, seed: int = 0):
    torch.manual_seed(seed)
    model = BertClassifier(vocab, hidden, layers, heads, ffn)
    return model.eval(), _bert_inputs(batch, seq, vocab, seed)


def hf_bert(batch: int = 1, seq: int = 128, layers: int = 12, hidden: int = 768, heads: int = 12,
            ffn: int = 3072, vocab: int = 30522, seed: int = 0):
    """Hugging Face ``BertForSequenceClassification`` from a random ``BertConfig``."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                     intermediate_size=ffn, num_labels=2)
    model = BertForSequenceClassification(cfg)
    return model.eval(), _bert_inputs(batch, seq, vocab, seed)


# ----------------------------------------------------------------------------- RNN forecasters
class Forecaster(nn.Module):
    """Sequence-to-one forecaster: a recurrent encoder, then a linear head on the last step."""

    def __init__(self, cell: str, features: int, hidden: int, layers: int, horizon: int):
        super().__init__()
        rnn = nn.LSTM if cell == "lstm" else nn.GRU
        self.rnn = rnn(features, hidden, num_layers=layers, batch_first=True)
        self.head = nn.Linear(hidden, horizon)

    def forward(self, x):
        y, _ = self.rnn(x)
        return self.head(y[:, -1])


def lstm(batch: int = 32, seq: int = 96, features: int = 8, hidden: int = 128, layers: int = 2,
         horizon: int = 24, seed: int = 0):
    torch.manual_seed(seed)
    return Forecaster("lstm", features, hidden, layers, horizon).eval(), (torch.randn(batch, seq, features),)


def gru(batch: int = 32, seq: int = 96, features: int = 8, hidden: int = 128, layers: int = 2,
        horizon: int = 24, seed: int = 0):
    torch.manual_seed(seed)
    return Forecaster("gru", features, hidden, layers, horizon).eval(), (torch.randn(batch, seq, features),)


NAMES = {"resnet18": resnet18, "resnet50": resnet50, "bert": bert, "hf_bert": hf_bert, "lstm": lstm, "gru": gru}


def get(name: str, **kwargs):
    """Look up an example model by name: ``kiln.models.get("resnet18")``."""
    try:
        return NAMES[name](**kwargs)
    except KeyError:
        raise KeyError(f"unknown example model {name!r}; known: {', '.join(NAMES)}") from None
