"""CTIA vs the paper's MIA (Kornia) vs nnU-Net's own augmentation (batchgeneratorsv2), same batches, same run.

Batches (z-scored float32 image, int64 label):
  2D  28 x 1 x 128 x 128, passed as (28, 1, 1, 128, 128) (28 independent slices, z transforms are no-ops)
  2D  the same 28 slices as two 14-slice stacks (2, 1, 14, 128, 128) (z transforms act)
  3D  1 x 1 x 16 x 128 x 128
Figures (ms per batch: median over rounds of the mean of 5 calls, all candidates interleaved):
  CTIA forced: every CTIA transform of the paper's Table 1 on every image (batch p 1, noise/CWVRS/rotation
               p 1, each stack either slice skipping or slice interpolation), the honest cost figure;
  CTIA forced+rw: the same plus the extra random-window transform (off by default);
  CTIA default: the configured probabilities (what training pays on average);
  anchor 2D:   nnU-Net's 2D pipeline in batchgeneratorsv2, per sample: SpatialTransform (rotation p 0.2,
               +-180 deg; scaling p 0.2, 0.7..1.4) + noise p 0.1, brightness p 0.15, contrast p 0.15, gamma p 0.3;
  nnU-Net DA:  our `augment.name: nnunet` baseline (nnU-Net defaults incl. blur, low-res, crop), batch gate 1;
  anchor 3D:   nnU-Net DA on the 3D stack (nnU-Net's dummy-2D pipeline for 16 x 128 x 128), batch gate 1;
  paper MIA forced / default: `augment.name: mia` (Table 1's MIA column on Kornia) with every transform on
               every image (gate 1, all p 1) / its configured probabilities.
Anchors and nnU-Net DA run on the CPU always (batchgeneratorsv2 is CPU-only); with --device cuda CTIA and
the paper's MIA run on the GPU (synchronised, after warm-up).

    python benchmarks/bench_augment.py [--threads 2] [--repeats 20] [--device cpu|cuda] [--malloc-tuned]

--malloc-tuned raises glibc's mmap/trim thresholds (mallopt) for the whole run, anchors included: batched CTIA
allocates MB-sized tensors, which glibc by default maps and unmaps per call; on a VM every first touch of such
memory page-faults (seen here: ~2 ms per fresh 2-4 MB tensor under load). bgv2's per-sample tensors (64 kB)
stay below the threshold. PyTorch recommends jemalloc/tcmalloc for CPU work for the same reason.
"""
from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import time

import torch
from batchgeneratorsv2.transforms.intensity.brightness import MultiplicativeBrightnessTransform
from batchgeneratorsv2.transforms.intensity.contrast import BGContrast, ContrastTransform
from batchgeneratorsv2.transforms.intensity.gamma import GammaTransform
from batchgeneratorsv2.transforms.intensity.gaussian_noise import GaussianNoiseTransform
from batchgeneratorsv2.transforms.spatial.spatial import SpatialTransform
from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms
from batchgeneratorsv2.transforms.utils.random import RandomTransform

from ctseg.augment import CTIAConfig, CTIAugmenter, MIAConfig, NNUNetAugConfig, NNUNetAugmenter, PaperMIAugmenter
from ctseg.runtime import tune_malloc


class _Plan:
    lower, upper, mean, std = -160.0, 240.0, 60.0, 80.0


def _batch(shape, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(shape, generator=g).clamp(-2.75, 2.25)
    label = (image > 1.0).long() + (image > 1.8).long()
    return image.to(device), label.to(device)


def _time_interleaved(fns: dict, repeats: int, device, block: int = 5) -> dict:
    """ms per call of each fn as (wall, cpu): `repeats` rounds, each timing a block of `block` calls of every fn in
    turn (interleaved, so load from other processes hits all alike); medians over rounds of the block means.
    cpu is process CPU time (all threads): robust to other processes on a shared machine, unlike wall time."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for fn in fns.values():
        for _ in range(3):
            fn()
    sync()
    wall = {k: [] for k in fns}
    cpu = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(block):
                fn()
            sync()
            wall[k].append((time.perf_counter() - t0) / block)
            cpu[k].append((time.process_time() - c0) / block)
    return {k: (statistics.median(wall[k]) * 1e3, statistics.median(cpu[k]) * 1e3) for k in fns}


def nnunet_2d_anchor():
    """nnU-Net's default 2D augmentation core in batchgeneratorsv2 (per sample (1, 128, 128))."""
    return ComposeTransforms([
        SpatialTransform((128, 128), patch_center_dist_from_border=0, random_crop=False, p_elastic_deform=0,
                         p_rotation=0.2, rotation=(-math.pi, math.pi), p_scaling=0.2, scaling=(0.7, 1.4),
                         p_synchronize_scaling_across_axes=1, bg_style_seg_sampling=False),
        RandomTransform(GaussianNoiseTransform((0, 0.1), p_per_channel=1, synchronize_channels=True), 0.1),
        RandomTransform(MultiplicativeBrightnessTransform(BGContrast((0.75, 1.25)), False, 1), 0.15),
        RandomTransform(ContrastTransform(BGContrast((0.75, 1.25)), True, False, 1), 0.15),
        RandomTransform(GammaTransform(BGContrast((0.7, 1.5)), 0, False, 1, 1), 0.3),
    ])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=20, help="rounds of 5 calls each")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--malloc-tuned", action="store_true", help="keep freed memory in the heap (glibc mallopt)")
    args = ap.parse_args()
    if args.malloc_tuned:
        tune_malloc()  # what the ctseg CLI does at start
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cpu = torch.device("cpu")

    forced = CTIAConfig(p_batch_2d=1, p_batch_3d=1, noise_p=1, cwvrs_p=1, rotation_p=1,
                        slice_skip_p=0.5, slice_interp_p=0.5, z_mode="stack")
    forced_extra = forced.model_copy(update={"random_window_p": 1.0})
    default = CTIAConfig()
    gen = torch.Generator(device=device).manual_seed(0)
    cpu_gen = torch.Generator().manual_seed(0)

    def ctia(cfg, dim, batch):
        aug = CTIAugmenter(cfg, dim, _Plan())
        return lambda: aug(*batch, gen)

    anchor = nnunet_2d_anchor()
    img28, lab28 = _batch((28, 1, 1, 128, 128), cpu)

    def run_anchor():
        for i in range(28):
            anchor(image=img28[i, :, 0].clone(), segmentation=lab28[i, :, 0].to(torch.int16))

    nn_cfg = NNUNetAugConfig(p_batch_2d=1, p_batch_3d=1)
    mia2d, mia3d = NNUNetAugmenter(nn_cfg, "2d"), NNUNetAugmenter(nn_cfg, "3d")
    mia_forced = MIAConfig(p_batch_2d=1, p_batch_3d=1, rotation_p=1, scale_p=1, shear_p=1, crop_p=1, gamma_p=1,
                           contrast_p=1, brightness_p=1, noise_p=1)
    b3_cpu = _batch((1, 1, 16, 128, 128), cpu)
    fns = {"anchor2d": run_anchor, "mia2d": lambda: mia2d(img28, lab28, cpu_gen),
           "anchor3d": lambda: mia3d(*b3_cpu, cpu_gen)}
    cases = [("2D 28x(1x128x128)", (28, 1, 1, 128, 128), "2d", "anchor2d"),
             ("2D 2x(14x128x128)", (2, 1, 14, 128, 128), "2d", "anchor2d"),
             ("3D 1x16x128x128", (1, 1, 16, 128, 128), "3d", "anchor3d")]
    for name, shape, dim, _ in cases:
        batch = _batch(shape, device)
        for label, cfg in (("forced", forced), ("forced+rw", forced_extra), ("default", default)):
            fns[f"CTIA {label} {name}"] = ctia(cfg, dim, batch)
        for label, cfg in (("forced", mia_forced), ("default", MIAConfig())):
            aug = PaperMIAugmenter(cfg, dim, _Plan())
            fns[f"MIA {label} {name}"] = (lambda a, b: lambda: a(*b, gen))(aug, batch)
    if device.type == "cuda":  # anchors are CPU work: time them apart from the GPU figures
        on_device = ("CTIA", "MIA")
        ms = _time_interleaved({k: v for k, v in fns.items() if not k.startswith(on_device)}, args.repeats, cpu)
        ms.update(_time_interleaved({k: v for k, v in fns.items() if k.startswith(on_device)}, args.repeats, device))
    else:
        ms = _time_interleaved(fns, args.repeats, device)
    a2, mia, a3 = ms["anchor2d"], ms["mia2d"], ms["anchor3d"]
    rows = [(f"CTIA {label} {name}", ms[f"CTIA {label} {name}"], ms[anchor])
            for name, _, _, anchor in cases for label in ("forced", "forced+rw", "default")]
    rows += [(f"MIA {label} {name}", ms[f"MIA {label} {name}"], ms[anchor])
             for name, _, _, anchor in cases for label in ("forced", "default")]

    where = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or platform.machine()
    print(f"torch {torch.__version__}, {args.threads} threads, CTIA on {device} ({where}); anchors on CPU; "
          f"load average {os.getloadavg()[0]:.1f}; malloc tuned: {args.malloc_tuned}; figures: wall ms / CPU ms per batch")
    print(f"anchor nnU-Net 2D bgv2 (rot/scale + noise, brightness, contrast, gamma), 28 x 128 x 128: "
          f"{a2[0]:8.2f} / {a2[1]:8.2f}")
    print(f"nnU-Net DA (full nnU-Net default) 2D, 28 x 128 x 128:                          {mia[0]:8.2f} / {mia[1]:8.2f}")
    print(f"anchor nnU-Net DA 3D (dummy-2D pipeline), 1 x 16 x 128 x 128:                    {a3[0]:8.2f} / {a3[1]:8.2f}")
    for name, (w, c), (aw, ac) in rows:
        print(f"{name:32s} {w:8.3f} / {c:8.3f} ms   anchor {aw:8.2f} / {ac:8.2f} ms   "
              f"speed-up wall {aw / w:5.1f}x  cpu {ac / c:5.1f}x")


if __name__ == "__main__":
    main()
