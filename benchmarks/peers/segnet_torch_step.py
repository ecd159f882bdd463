"""PyTorch peer of ``benchmarks/segnet_step_time.py``: the official MTAN-SegNet train step.

Runs in the peers venv (``.peers-venv``: torch CPU; cvxpy + ecos for the authors' Nash-MTL solver).
``segnet_step_time.py`` starts it with ``--serve`` and drives it with one JSON command per line on
stdin, one JSON line per reply:

* ``{"cmd": "setup", "method": "ew" | "nash_mtl", "width": w, "lr": lr, "image": [...],
  "segmentation": [...], "depth": [...], "normal": [...]}`` (NHWC arrays as nested lists): builds
  ``SegNetMTAN(width)`` (seed 0), Adam, runs one step; replies ``{"impl", "first_losses", "torch",
  "threads"}``;
* ``{"cmd": "time", "steps": n, "threads": t}``: n steps with t torch intra-op threads (default: the
  ``--threads`` count), replies ``{"s_per_step", "cpu_s_per_step"}``;
* ``{"cmd": "quit"}``.

``SegNetMTAN`` is lorenmt/mtan ``im2im_pred/model_segnet_mtan.py``'s ``SegNet`` transcribed layer for
layer (the same module names, so its state dict is the official one; identical to nash-mtl
``experiments/nyuv2/models.py`` ``_SegNet`` and LibMTL ``examples/nyu/segnet_mtan.py``), with the
filters scaled by ``width``; it returns the official outputs (log-softmax segmentation, depth, normals
divided by their norm). ``tests/fixtures/pretrained/make_segnet_reference.py`` loads this file by path
for the parity reference. Losses: the official ``model_fit`` (NLL ignoring -1; L1 over pixels with
depth != 0; 1 - cosine over pixels whose normal is non-zero).

Methods: 'ew': sum of the three losses, backward, Adam. 'nash_mtl': nash-mtl ``methods/weight_methods.py``
``NashMTL`` (``update_weights_every=1``, ``optim_niter=20``, ``max_norm=1``): per-task gradients of the
shared parameters (``SegNetMTAN.shared_parameters``: those every task uses, as mtl_jax's), Gram
matrix normalised by its norm, the CCP over ECOS solves (benchmarks/peers/torchjd_step.py
``CvxpyNashMTL``), ``sum(alpha_t L_t).backward()``, ``clip_grad_norm_(shared, 1)``, Adam. Without
cvxpy the reply's impl is 'nash_mtl_floor': that step without the solver (alpha = 1).
"""

from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

SEGNET_FILTERS = (64, 128, 256, 512, 512)


def segnet_filters(width: float) -> list[int]:
    return [max(1, int(round(f * width))) for f in SEGNET_FILTERS]


class SegNetMTAN(nn.Module):
    """lorenmt/mtan ``model_segnet_mtan.py`` ``SegNet`` (3 tasks: 13 classes, depth, normals), filters
    scaled by ``width``. forward(x NCHW) -> [log-softmax seg, depth, normals]."""

    def __init__(self, width: float = 1.0, class_nb: int = 13):
        super().__init__()
        filter = segnet_filters(width)
        self.class_nb = class_nb
        self.encoder_block = nn.ModuleList([self.conv_layer([3, filter[0]])])
        self.decoder_block = nn.ModuleList([self.conv_layer([filter[0], filter[0]])])
        for i in range(4):
            self.encoder_block.append(self.conv_layer([filter[i], filter[i + 1]]))
            self.decoder_block.append(self.conv_layer([filter[i + 1], filter[i]]))
        self.conv_block_enc = nn.ModuleList([self.conv_layer([filter[0], filter[0]])])
        self.conv_block_dec = nn.ModuleList([self.conv_layer([filter[0], filter[0]])])
        for i in range(4):
            if i == 0:
                self.conv_block_enc.append(self.conv_layer([filter[i + 1], filter[i + 1]]))
                self.conv_block_dec.append(self.conv_layer([filter[i], filter[i]]))
            else:
                self.conv_block_enc.append(nn.Sequential(self.conv_layer([filter[i + 1], filter[i + 1]]),
                                                         self.conv_layer([filter[i + 1], filter[i + 1]])))
                self.conv_block_dec.append(nn.Sequential(self.conv_layer([filter[i], filter[i]]),
                                                         self.conv_layer([filter[i], filter[i]])))
        self.encoder_att = nn.ModuleList([nn.ModuleList([self.att_layer([filter[0], filter[0], filter[0]])])])
        self.decoder_att = nn.ModuleList([nn.ModuleList([self.att_layer([2 * filter[0], filter[0], filter[0]])])])
        self.encoder_block_att = nn.ModuleList([self.conv_layer([filter[0], filter[1]])])
        self.decoder_block_att = nn.ModuleList([self.conv_layer([filter[0], filter[0]])])
        for j in range(3):
            if j < 2:
                self.encoder_att.append(nn.ModuleList([self.att_layer([filter[0], filter[0], filter[0]])]))
                self.decoder_att.append(nn.ModuleList([self.att_layer([2 * filter[0], filter[0], filter[0]])]))
            for i in range(4):
                self.encoder_att[j].append(self.att_layer([2 * filter[i + 1], filter[i + 1], filter[i + 1]]))
                self.decoder_att[j].append(self.att_layer([filter[i + 1] + filter[i], filter[i], filter[i]]))
        for i in range(4):
            if i < 3:
                self.encoder_block_att.append(self.conv_layer([filter[i + 1], filter[i + 2]]))
                self.decoder_block_att.append(self.conv_layer([filter[i + 1], filter[i]]))
            else:
                self.encoder_block_att.append(self.conv_layer([filter[i + 1], filter[i + 1]]))
                self.decoder_block_att.append(self.conv_layer([filter[i + 1], filter[i + 1]]))
        self.pred_task1 = self.conv_layer([filter[0], self.class_nb], pred=True)
        self.pred_task2 = self.conv_layer([filter[0], 1], pred=True)
        self.pred_task3 = self.conv_layer([filter[0], 3], pred=True)
        self.down_sampling = nn.MaxPool2d(kernel_size=2, stride=2, return_indices=True)
        self.up_sampling = nn.MaxUnpool2d(kernel_size=2, stride=2)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.xavier_normal_(m.weight)
                nn.init.constant_(m.bias, 0)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def conv_layer(self, channel, pred=False):
        if not pred:
            return nn.Sequential(nn.Conv2d(channel[0], channel[1], kernel_size=3, padding=1),
                                 nn.BatchNorm2d(channel[1]), nn.ReLU(inplace=True))
        return nn.Sequential(nn.Conv2d(channel[0], channel[0], kernel_size=3, padding=1),
                             nn.Conv2d(channel[0], channel[1], kernel_size=1, padding=0))

    def att_layer(self, channel):
        return nn.Sequential(nn.Conv2d(channel[0], channel[1], kernel_size=1, padding=0), nn.BatchNorm2d(channel[1]),
                             nn.ReLU(inplace=True), nn.Conv2d(channel[1], channel[2], kernel_size=1, padding=0),
                             nn.BatchNorm2d(channel[2]), nn.Sigmoid())

    def forward(self, x):
        g_encoder, g_decoder, g_maxpool, g_upsampl, indices = ([0] * 5 for _ in range(5))
        for i in range(5):
            g_encoder[i], g_decoder[-i - 1] = ([0] * 2 for _ in range(2))
        atten_encoder, atten_decoder = ([0] * 3 for _ in range(2))
        for i in range(3):
            atten_encoder[i], atten_decoder[i] = ([0] * 5 for _ in range(2))
        for i in range(3):
            for j in range(5):
                atten_encoder[i][j], atten_decoder[i][j] = ([0] * 3 for _ in range(2))
        for i in range(5):
            g_encoder[i][0] = self.encoder_block[i](x if i == 0 else g_maxpool[i - 1])
            g_encoder[i][1] = self.conv_block_enc[i](g_encoder[i][0])
            g_maxpool[i], indices[i] = self.down_sampling(g_encoder[i][1])
        for i in range(5):
            g_upsampl[i] = self.up_sampling(g_maxpool[-1] if i == 0 else g_decoder[i - 1][-1], indices[-i - 1])
            g_decoder[i][0] = self.decoder_block[-i - 1](g_upsampl[i])
            g_decoder[i][1] = self.conv_block_dec[-i - 1](g_decoder[i][0])
        for i in range(3):
            for j in range(5):
                if j == 0:
                    atten_encoder[i][j][0] = self.encoder_att[i][j](g_encoder[j][0])
                else:
                    atten_encoder[i][j][0] = self.encoder_att[i][j](
                        torch.cat((g_encoder[j][0], atten_encoder[i][j - 1][2]), dim=1))
                atten_encoder[i][j][1] = (atten_encoder[i][j][0]) * g_encoder[j][1]
                atten_encoder[i][j][2] = self.encoder_block_att[j](atten_encoder[i][j][1])
                atten_encoder[i][j][2] = F.max_pool2d(atten_encoder[i][j][2], kernel_size=2, stride=2)
            for j in range(5):
                previous = atten_encoder[i][-1][-1] if j == 0 else atten_decoder[i][j - 1][2]
                atten_decoder[i][j][0] = F.interpolate(previous, scale_factor=2, mode="bilinear", align_corners=True)
                atten_decoder[i][j][0] = self.decoder_block_att[-j - 1](atten_decoder[i][j][0])
                atten_decoder[i][j][1] = self.decoder_att[i][-j - 1](torch.cat((g_upsampl[j], atten_decoder[i][j][0]),
                                                                               dim=1))
                atten_decoder[i][j][2] = (atten_decoder[i][j][1]) * g_decoder[j][-1]
        t1_pred = F.log_softmax(self.pred_task1(atten_decoder[0][-1][-1]), dim=1)
        t2_pred = self.pred_task2(atten_decoder[1][-1][-1])
        t3_pred = self.pred_task3(atten_decoder[2][-1][-1])
        t3_pred = t3_pred / torch.norm(t3_pred, p=2, dim=1, keepdim=True)
        return [t1_pred, t2_pred, t3_pred]

    def shared_parameters(self):
        """The parameters every task uses: all but the prediction heads and the task attention modules
        (``encoder_att`` / ``decoder_att``), mtl_jax's ``shared`` (nash-mtl's ``shared_parameters``
        also take the attention modules, for which ``autograd.grad`` of one task's loss fails: the
        other tasks' modules are not in its graph)."""
        return [p for n, p in self.named_parameters() if "pred" not in n and not n.startswith(("encoder_att.", "decoder_att."))]


def official_losses(preds, segmentation, depth, normal):
    """lorenmt/mtan ``utils.model_fit``: NLL ignoring -1; L1 where depth != 0 (any channel); 1 - cosine
    where the normal is non-zero. Tensors NCHW."""
    seg_loss = F.nll_loss(preds[0], segmentation, ignore_index=-1)
    depth_mask = (torch.sum(depth, dim=1) != 0).float().unsqueeze(1)
    depth_loss = torch.sum(torch.abs(preds[1] - depth) * depth_mask) / torch.nonzero(depth_mask, as_tuple=False).size(0)
    normal_mask = (torch.sum(normal, dim=1) != 0).float().unsqueeze(1)
    normal_loss = 1 - torch.sum((preds[2] * normal) * normal_mask) / torch.nonzero(normal_mask,
                                                                                  as_tuple=False).size(0)
    return [seg_loss, depth_loss, normal_loss]


def nchw(array, dtype=torch.float32):
    """NHWC nested list / array -> contiguous NCHW tensor."""
    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(np.asarray(array), -1, 1))).to(dtype)


class Step:
    """Model, optimiser, method and one fixed batch."""

    def __init__(self, method: str, width: float, lr: float, image, segmentation, depth, normal):
        torch.manual_seed(0)
        self.model = SegNetMTAN(width).train()
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=lr)
        self.x = nchw(image)
        self.segmentation = torch.from_numpy(np.asarray(segmentation, np.int64))
        self.depth, self.normal = nchw(depth), nchw(normal)
        self.nash = None
        if method == "ew":
            self.impl = "ew"
        elif method == "nash_mtl":
            try:
                from torchjd_step import CvxpyNashMTL

                self.nash = CvxpyNashMTL(3)
                self.impl = "nash_mtl"
            except ImportError:
                self.impl = "nash_mtl_floor"
        else:
            raise ValueError(f"unknown method {method!r}; valid: ew, nash_mtl")

    def __call__(self) -> list[float]:
        losses = official_losses(self.model(self.x), self.segmentation, self.depth, self.normal)
        if self.impl == "ew":
            sum(losses).backward()
        else:
            shared = self.model.shared_parameters()
            grads = torch.stack([torch.cat([g.flatten() for g in torch.autograd.grad(loss, shared, retain_graph=True)])
                                 for loss in losses])
            if self.nash is not None:
                alpha = torch.from_numpy(self.nash.weights(grads)).float()
            else:
                (grads @ grads.T).cpu().numpy()  # the Gram matrix the solver reads
                alpha = torch.ones(3)
            sum(loss * alpha[i] for i, loss in enumerate(losses)).backward()
            torch.nn.utils.clip_grad_norm_(shared, 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return [v.item() for v in losses]


def handlers() -> dict:
    step = None

    def on_setup(cmd: dict) -> dict:
        nonlocal step
        try:
            step = Step(cmd["method"], cmd["width"], cmd["lr"], cmd["image"], cmd["segmentation"], cmd["depth"],
                        cmd["normal"])
        except ValueError as e:
            return {"error": str(e)}
        first = step()
        step()  # warm-up
        return {"impl": step.impl, "first_losses": first, "torch": torch.__version__, "threads": torch.get_num_threads()}

    threads = torch.get_num_threads()

    def on_time(cmd: dict) -> dict:
        torch.set_num_threads(cmd.get("threads", threads))
        start, cpu_start = time.perf_counter(), time.process_time()
        for _ in range(cmd["steps"]):
            step()
        return {"s_per_step": (time.perf_counter() - start) / cmd["steps"],
                "cpu_s_per_step": (time.process_time() - cpu_start) / cmd["steps"]}

    return {"setup": on_setup, "time": on_time}


def main():
    from serve import parse_peer_args, peer_parser, serve

    parser = peer_parser(__doc__.splitlines()[0])
    args = parse_peer_args(parser)
    if not args.serve:
        parser.error("run by benchmarks/segnet_step_time.py with --serve")
    serve(handlers())


if __name__ == "__main__":
    main()
