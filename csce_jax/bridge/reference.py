"""A PyTorch reference of the release's network, DSF and loss (described in docs/model.md).

It carries its own ResNet-50 with torchvision's module names, so it needs torch but not
torchvision. Module names of the CSCE part follow the release's ``ResNet_DOLG``
(``localmodel``, ``conv_f4_s1``, ``conv_f4_s2``, ``conv_last``, ``fc``, ``fc_t``,
``ce_fc.centroids``), including its ``input`` Sequential that registers the stem, layer1 and
layer2 a second time, so that ``state_dict()`` has the keys of a release checkpoint and loads
our ``.pt`` exports with ``strict=True``. Used by ``csce-compare``, the
parity tests and ``benchmarks/bench_train_step.py``. It imports torch at module level; nothing
else in the package imports it at module level.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F


class Bottleneck(nn.Module):
    def __init__(self, in_ch: int, width: int, stride: int):
        super().__init__()
        out_ch = width * 4
        self.conv1 = nn.Conv2d(in_ch, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_ch, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or in_ch != out_ch:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False), nn.BatchNorm2d(out_ch)
            )

    def forward(self, x):
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        short = x if self.downsample is None else self.downsample(x)
        return self.relu(y + short)


class ResNet50(nn.Module):
    """torchvision-named ResNet v1.5 (with fc), width multiplier and per-stage depths."""

    def __init__(self, width: float = 1.0, depths=(3, 4, 6, 3), num_classes: int = 1000):
        super().__init__()
        stem, *widths = [max(1, round(c * width)) for c in (64, 64, 128, 256, 512)]
        self.conv1 = nn.Conv2d(3, stem, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        in_ch = stem
        for s, (w, d) in enumerate(zip(widths, depths, strict=True)):
            blocks = []
            for i in range(d):
                blocks.append(Bottleneck(in_ch, w, 2 if (i == 0 and s > 0) else 1))
                in_ch = w * 4
            setattr(self, f"layer{s + 1}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_ch, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")


def _fan_out_init(conv: nn.Conv2d) -> None:
    fan_out = conv.kernel_size[0] * conv.kernel_size[1] * conv.out_channels
    conv.weight.data.normal_(0.0, math.sqrt(2.0 / fan_out))


class SpatialAttention2d(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv1 = nn.Conv2d(ch, ch, 1)
        self.bn = nn.BatchNorm2d(ch, eps=1e-5, momentum=0.9)
        self.act1 = nn.ReLU()
        self.conv2 = nn.Conv2d(ch, 1, 1)
        self.softplus = nn.Softplus(beta=1, threshold=20)
        _fan_out_init(self.conv1)
        _fan_out_init(self.conv2)

    def forward(self, x):
        x = self.bn(self.conv1(x))
        n = F.normalize(x, p=2, dim=1)
        a = self.softplus(self.conv2(self.act1(x)))
        return a * n


class CosSim(nn.Module):
    def __init__(self, centroids: torch.Tensor):
        super().__init__()
        self.centroids = nn.Parameter(centroids.clone(), requires_grad=False)

    def forward(self, v):
        nv = v / v.norm(dim=-1, keepdim=True)
        nc = self.centroids / self.centroids.norm(dim=-1, keepdim=True)
        return nv @ nc.t()


class ReleaseNet(nn.Module):
    """The release's ResNet_DOLG forward; returns a dict of named intermediates."""

    def __init__(
        self,
        centroids: torch.Tensor,
        width: float = 1.0,
        depths=(3, 4, 6, 3),
        num_windows: int = 52,
        signt: float = 0.01,
    ):
        super().__init__()
        r = ResNet50(width, depths)
        self.conv1, self.bn1, self.relu, self.maxpool = r.conv1, r.bn1, r.relu, r.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = r.layer1, r.layer2, r.layer3, r.layer4
        self.input = nn.Sequential(
            self.conv1, self.bn1, self.relu, self.maxpool, self.layer1, self.layer2
        )
        d3 = self.layer3[-1].conv3.out_channels
        d4 = self.layer4[-1].conv3.out_channels
        self.d3 = d3
        self.conv_f4_s1 = nn.Conv2d(d4, d3 // 4, 1)
        self.conv_f4_s2 = nn.Conv2d(d4, d3 // 16, 1)
        self.unfold1 = nn.Unfold(kernel_size=2, stride=1)
        self.unfold2 = nn.Unfold(kernel_size=4, stride=1)
        self.conv_last = nn.Conv1d(num_windows, 1, 1)
        self.localmodel = SpatialAttention2d(d3)
        bits = centroids.shape[1]
        self.fc = nn.Linear(2 * d3, bits)
        self.fc_t = nn.Linear(2 * d3, 1)
        self.ce_fc = CosSim(centroids)
        self.signt = signt

    def forward(self, x):
        x = self.input(x)
        f3 = self.layer3(x)
        f4 = self.layer4(f3)
        fl = self.localmodel(f3)
        g = torch.cat([self.unfold1(self.conv_f4_s1(f4)), self.unfold2(self.conv_f4_s2(f4))], 2)
        s = torch.norm(g, p=2, dim=[1, 2])
        p = torch.bmm(g, torch.bmm(g.transpose(1, 2), fl.flatten(2))).view(fl.shape)
        orth = fl - p / (s * s).view(-1, 1, 1, 1)
        fo = orth.mean(dim=(2, 3))
        fg = self.conv_last(g.transpose(1, 2)).view(-1, self.d3)
        fe = torch.cat([fg, fo], 1)
        v = self.fc(fe)
        t = torch.clamp(self.fc_t(fe), -self.signt, self.signt)
        return {
            "f3": f3,
            "f4": f4,
            "f_local": fl,
            "windows": g,
            "f_orth": fo,
            "f_g": fg,
            "f_e": fe,
            "v": v,
            "t": t,
            "logits": self.ce_fc(v),
        }


def release_dsf(v: torch.Tensor, t: torch.Tensor, half: float = 32.0) -> torch.Tensor:
    """The release's thresholded sign, row by row (its hard-coded 64-bit balance by default)."""
    rows = []
    for i in range(v.shape[0]):
        val, thr = v[i].detach(), t[i].detach()
        fill = -torch.ones_like(val) if (val > 0).sum() > half else torch.ones_like(val)
        keep = ~((val < thr) & (val > -thr))
        rows.append(torch.where(keep, val, fill))
    return torch.stack(rows).sign()


def release_loss(logits, v, labels, t, margins, *, scale=10.0, quan=1.0, half=32.0):
    """The release's single-label arc-margin loss with given per-sample margins, cs quantisation."""
    onehot = torch.zeros_like(logits)
    onehot.scatter_(1, labels[:, None], margins[:, None].to(logits.dtype))
    z = scale * torch.cos(torch.acos(logits.clamp(-0.99999, 0.99999)) + onehot)
    ce = F.cross_entropy(z, labels)
    u = 2 * F.hardtanh(v, -0.5, 0.5)
    b = release_dsf(u, t, half)
    q = (1.0 - F.cosine_similarity(u, b, dim=1)).mean()
    return ce + quan * q, ce, q


def release_multilabel_loss(logits, v, labels, t, margin, *, scale=10.0, quan=1.0, half=32.0):
    """The release's multi-label loss: arc margin ``margin`` on every positive, softmax CE
    against labels / (number of positives) ("label_smoothing"), cs quantisation. A row with
    no positive label divides by zero there (NaN), as in the release."""
    labels = labels.to(logits.dtype)
    z = scale * torch.cos(torch.acos(logits.clamp(-0.99999, 0.99999)) + labels * margin)
    ce = -(labels / labels.sum(dim=1, keepdim=True) * F.log_softmax(z, dim=1)).sum(dim=1).mean()
    u = 2 * F.hardtanh(v, -0.5, 0.5)
    b = release_dsf(u, t, half)
    q = (1.0 - F.cosine_similarity(u, b, dim=1)).mean()
    return ce + quan * q, ce, q
